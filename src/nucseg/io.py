"""Atomic file output, provenance metadata and the Parquet/GeoParquet writers shared by all stages.

Every output is written to a temporary name in its destination directory and moved into place with
``os.replace``, so a killed job never leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import shapely
import tifffile

from . import __version__

PROVENANCE_PREFIX = "nucseg."


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Parameters
    ----------
    path : path-like
        Final destination.
    suffix : str, optional
        Suffix of the temporary file (some writers choose the format by extension). Defaults to the
        destination's suffix.
    """
    tmp_path = temp_beside(path, suffix)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def temp_beside(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """Create an empty temporary file in ``path``'s directory (hidden, same extension last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a writer killed earlier (SIGKILL skips cleanup): one writer per output at a time.
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp*"):
        stale.unlink(missing_ok=True)
    # The temporary name keeps the real extension last: some writers pick the format by it.
    return _create_exclusive(path.parent, f".{path.name}.", ".tmp" + (path.suffix if suffix is None else suffix))


def _create_exclusive(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file ``folder/prefix<random>suffix`` with mode ``0o666`` less the umask.

    Unlike :func:`tempfile.mkstemp` (always 0600, which ``os.replace`` would carry onto the output), the
    kernel applies the process umask (and any default ACL) at creation, as for any ordinary file: no need
    to read the umask, whose only reader (``os.umask``) changes it for all threads meanwhile.
    """
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"no free temporary name in {folder} for {prefix}*{suffix}")


def link_or_copy(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Place ``src`` at ``dest`` atomically: a hard link when on the same file system, else a copy."""
    dest = Path(dest)
    tmp = temp_beside(dest)
    tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (numpy scalars are converted)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write arrays to a compressed ``.npz`` atomically."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write an 8/16-bit grey or RGB image as PNG atomically."""

    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    with atomic_path(path, suffix=".png") as tmp:
        if not cv2.imwrite(str(tmp), image):
            raise OSError(f"could not write PNG {path}")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def provenance(**facts: Any) -> dict[str, str]:
    """Key-value metadata every Parquet output carries (DESIGN.md: Provenance).

    Values are stored as strings under ``nucseg.<key>``; ``nucseg.version`` is always set.
    """
    meta = {f"{PROVENANCE_PREFIX}version": __version__}
    for key, value in facts.items():
        if value is not None:
            meta[f"{PROVENANCE_PREFIX}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return meta


def read_provenance(path: str | os.PathLike) -> dict[str, str]:
    """Return the ``nucseg.*`` key-value metadata of a Parquet file, prefix stripped."""

    meta = pq.read_schema(path).metadata or {}
    out = {}
    for key, value in meta.items():
        key = key.decode()
        if key.startswith(PROVENANCE_PREFIX):
            out[key[len(PROVENANCE_PREFIX):]] = value.decode()
    return out


def write_table(path: str | os.PathLike, frame, metadata: Mapping[str, str] | None = None) -> None:
    """Write a pandas DataFrame to Parquet atomically with extra key-value metadata."""

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **(metadata or {})})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def write_geoparquet(path: str | os.PathLike, gdf, metadata: Mapping[str, str] | None = None) -> None:
    """Write a GeoDataFrame as GeoParquet 1.1 (bbox covering column) atomically, with metadata."""

    with atomic_path(path, suffix=".parquet") as tmp:
        gdf.to_parquet(tmp, schema_version="1.1.0", write_covering_bbox=True, index=False)
        if metadata:
            # geopandas has no hook for extra key-value metadata: rewrite the footer's schema.
            table = pq.read_table(tmp)
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
            pq.write_table(table, tmp)


@dataclass(frozen=True)
class EncodedGeometries:
    """Geometries as :class:`GeoParquetWriter` stores them: WKB, bounds and GEOS type ids.

    A block's nuclei cross from a post-processing process to the writer in this form: pickling shapely
    objects one by one cost the worker about 4 ms per 512² block, these arrays 0.2 ms; the writer then
    neither encodes nor measures them again.

    Attributes
    ----------
    wkb : ndarray of bytes, shape (n,)
    bounds : ndarray (n, 4) float64
        xmin, ymin, xmax, ymax of each geometry.
    type_ids : ndarray (n,) int
        ``shapely.get_type_id`` of each geometry.
    """

    wkb: np.ndarray
    bounds: np.ndarray
    type_ids: np.ndarray

    @classmethod
    def of(cls, geometries) -> EncodedGeometries:
        """Encode a sequence of shapely geometries."""
        geometries = np.asarray(geometries, dtype=object)
        return cls(shapely.to_wkb(geometries), shapely.bounds(geometries).reshape(-1, 4),
                   shapely.get_type_id(geometries))

    @classmethod
    def polygons(cls, vertices: np.ndarray, lengths: np.ndarray) -> EncodedGeometries:
        """Polygons without holes, each one ring of ``lengths[i]`` vertices (one after another in ``vertices``
        ``(k, 2)``, x then y, not closed), written as WKB the way GEOS writes it, without building geometries.

        The rings must be simple (no self-intersection or self-contact), as outlines traced by marching
        squares are: nothing here checks it.
        """
        lengths, vertices = np.asarray(lengths, np.int64), np.asarray(vertices, "<f8")
        if not len(lengths):
            return cls.of([])
        starts = np.r_[0, np.cumsum(lengths)[:-1]]
        closed = lengths + 1  # WKB rings repeat their first vertex
        ring = np.repeat(np.arange(len(lengths)), closed)
        step = np.arange(len(ring)) - np.repeat(np.cumsum(closed) - closed, closed)
        coords = vertices[starts[ring] + step % lengths[ring]].tobytes()
        header = np.zeros(len(lengths), [("order", "u1"), ("type", "<u4"), ("rings", "<u4"), ("points", "<u4")])
        header["order"], header["type"], header["rings"], header["points"] = 1, 3, 1, closed
        heads, ends = header.tobytes(), 16 * np.cumsum(closed)
        spans = zip((ends - 16 * closed).tolist(), ends.tolist(), strict=True)
        wkb = np.empty(len(lengths), object)
        wkb[:] = [heads[13 * i:13 * i + 13] + coords[a:b] for i, (a, b) in enumerate(spans)]
        low, high = np.minimum.reduceat(vertices, starts), np.maximum.reduceat(vertices, starts)
        return cls(wkb, np.column_stack([low, high]), np.full(len(lengths), 3, np.int32))

    def __len__(self) -> int:
        return len(self.wkb)

    def take(self, index) -> EncodedGeometries:
        """The geometries at ``index`` (integer indices or a boolean mask)."""
        return EncodedGeometries(self.wkb[index], self.bounds[index], self.type_ids[index])

    def decode(self) -> np.ndarray:
        """The shapely geometries."""
        return shapely.from_wkb(self.wkb)


class GeoParquetWriter:
    """Stream polygons to a GeoParquet 1.1 file in row groups; the file appears only on :meth:`close`.

    Writes WKB geometries with a ``bbox`` covering column and the ``geo`` metadata geopandas writes
    (``to_parquet(schema_version="1.1.0", write_covering_bbox=True)``), plus extra key-value metadata.
    Memory stays bounded by ``row_group_size`` rows whatever the total.

    Parameters
    ----------
    columns : dict
        Attribute column name -> pyarrow type, in output order (geometry and bbox come last).
    """

    def __init__(self, path, columns: Mapping[str, Any], metadata: Mapping[str, str] | None = None,
                 row_group_size: int = 50_000):

        self.path = Path(path)
        self._tmp = temp_beside(self.path, ".parquet")
        bbox_type = pa.struct([(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])
        geometry_field = pa.field("geometry", pa.binary(),
                                  metadata={"ARROW:extension:name": "geoarrow.wkb", "ARROW:extension:metadata": "{}"})
        self.schema = pa.schema([pa.field(k, t) for k, t in columns.items()] + [geometry_field, ("bbox", bbox_type)])
        # Without the stored Arrow schema, readers take the schema metadata from the footer, where
        # close() adds "geo" (known only at the end: the bbox of all rows).
        self._writer = pq.ParquetWriter(self._tmp, self.schema, store_schema=False)
        self._metadata = dict(metadata or {})
        self._pending: list = []
        self._pending_rows = 0
        self.row_group_size = row_group_size
        self.n_rows = 0
        self.bounds = [np.inf, np.inf, -np.inf, -np.inf]
        self.geometry_types: set[str] = set()

    def write(self, frame, geometries) -> None:
        """Append rows: a pandas DataFrame of the attribute columns and the matching geometries (shapely, or
        :class:`EncodedGeometries`)."""

        if not isinstance(geometries, EncodedGeometries):
            geometries = EncodedGeometries.of(geometries)
        if len(geometries) == 0:
            return
        bounds = geometries.bounds
        self.bounds = [min(self.bounds[0], bounds[:, 0].min()), min(self.bounds[1], bounds[:, 1].min()),
                       max(self.bounds[2], bounds[:, 2].max()), max(self.bounds[3], bounds[:, 3].max())]
        self.geometry_types.update(np.unique(geometries.type_ids).tolist())
        arrays = [pa.array(frame[name].to_numpy(), type=self.schema.field(name).type)
                  for name in self.schema.names[:-2]]
        arrays.append(pa.array(geometries.wkb, type=pa.binary()))
        arrays.append(pa.StructArray.from_arrays([pa.array(bounds[:, i]) for i in range(4)],
                                                 names=["xmin", "ymin", "xmax", "ymax"]))
        self._pending.append(pa.Table.from_arrays(arrays, schema=self.schema))
        self._pending_rows += len(geometries)
        if self._pending_rows >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:

        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=self.row_group_size)
            self.n_rows += self._pending_rows
            self._pending, self._pending_rows = [], 0

    def close(self, metadata: Mapping[str, str] | None = None) -> None:
        """Finish the file (adding ``metadata``) and move it into place."""
        self._metadata.update(metadata or {})
        self._flush()
        names = {0: "Point", 1: "LineString", 3: "Polygon", 6: "MultiPolygon"}
        geo = {"primary_column": "geometry", "version": "1.1.0",
               "creator": {"library": "nucseg", "version": __version__},
               "columns": {"geometry": {
                   "encoding": "WKB", "crs": None,
                   "geometry_types": sorted(names.get(t, "Geometry") for t in self.geometry_types),
                   "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}}}}}
        if self.n_rows:
            geo["columns"]["geometry"]["bbox"] = [float(v) for v in self.bounds]
        self._writer.add_key_value_metadata({"geo": json.dumps(geo), **self._metadata})
        self._writer.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Drop the partial file (nothing appears at ``path``)."""
        self._writer.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


def read_pixels(path: str | os.PathLike) -> np.ndarray:
    """The pixels of an image file as stored (TIFF by tifffile, else OpenCV), colour channels as RGB.

    TIFFs go through tifffile (series 0, full resolution): OpenCV cannot decode some, e.g. OME-TIFF with
    2x2 JPEG subsampling. Bit depth and layout are kept (16-bit, grey, channel-first planes); OpenCV's
    BGR(A) becomes RGB.
    """

    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return tifffile.imread(path)
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("not a readable image")
    return img[..., 2::-1] if img.ndim == 3 else img  # BGR(A) to RGB


def as_rgb8(image: np.ndarray) -> np.ndarray:
    """An image as RGB uint8 ``(H, W, 3)``: grey repeated, alpha dropped, channel-first planes moved last,
    16-bit scaled by 1/257 and floats in [0, 1] by 255."""
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (3, 4) and img.shape[-1] not in (3, 4):
        img = np.moveaxis(img, 0, -1)  # planar TIFF
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] < 3:
        raise ValueError(f"not an RGB or grey image (shape {img.shape})")
    img = img[..., :3]
    if img.dtype == np.uint16:
        img = img / 257.0
    elif img.dtype.kind == "f" and np.nanmax(img) <= 1.0:
        img = img * 255.0
    if img.dtype != np.uint8:
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img)
