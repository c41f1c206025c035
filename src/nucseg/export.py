"""Exports of a slide's ``nuclei.parquet``: QuPath GeoJSON and the TCIA release's per-tile CSVs.

Both stream the Parquet file batch by batch, so memory does not grow with the slide.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import shapely

from . import io

MEASUREMENTS = ["area_um2", "perimeter_um", "eccentricity", "solidity", "mean_hematoxylin_od", "score"]


def _batches(nuclei_path, batch_size: int = 20_000):
    """Yield ``(pyarrow batch, shapely geometries)`` from a nuclei GeoParquet file."""
    for batch in pq.ParquetFile(nuclei_path).iter_batches(batch_size=batch_size):
        yield batch, shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))


def to_qupath(nuclei_path, out_path) -> int:
    """Write a GeoJSON FeatureCollection QuPath imports as detections (File → Import objects).

    Coordinates are level-0 pixels, as QuPath expects. Returns the number of features.
    """
    n = 0
    with io.atomic_path(out_path, suffix=".geojson") as tmp, open(tmp, "w") as fh:
        fh.write('{"type": "FeatureCollection", "features": [\n')
        for batch, geoms in _batches(nuclei_path):
            cols = {m: batch.column(m).to_numpy(zero_copy_only=False) for m in MEASUREMENTS}
            for i, geom in enumerate(geoms):
                feature = {"type": "Feature", "geometry": shapely.geometry.mapping(geom),
                           "properties": {"objectType": "detection",
                                          "classification": {"name": "Nucleus", "color": [0, 160, 255]},
                                          "measurements": {m: _num(cols[m][i]) for m in MEASUREMENTS}}}
                fh.write((",\n" if n else "") + json.dumps(feature))
                n += 1
        fh.write("\n]}\n")
    return n


def _num(value):
    value = float(value)
    return None if np.isnan(value) else round(value, 5)


def polygon_text(geom) -> str:
    """TCIA polygon notation: ``[x1:y1:x2:y2:...]`` (level-0 px, ring not closed)."""
    coords = np.asarray(geom.exterior.coords)[:-1]
    return "[" + ":".join(f"{v:.1f}" for v in coords.ravel()) + "]"


def to_tcia(nuclei_path, out_dir, slide_id: str | None = None) -> list[Path]:
    """One ``*-features.csv`` per owning tile with ``AreaInPixels,PhysicalSize,Polygon``, as in the TCIA release.

    ``AreaInPixels`` is the polygon area in level-0 pixels, ``PhysicalSize`` the nucleus area in µm².
    Files are named ``{slide_id}_x{tile_x}_y{tile_y}-features.csv``.
    """
    meta = io.read_provenance(nuclei_path)
    slide_id = slide_id or meta.get("slide_id") or Path(nuclei_path).stem
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[tuple[int, int], Path] = {}
    current, fh, writer = None, None, None
    try:
        # Segment writes each tile's nuclei together, so one file is open at a time.
        for batch, geoms in _batches(nuclei_path):
            tx, ty = batch.column("tile_x").to_numpy(), batch.column("tile_y").to_numpy()
            area_um2 = batch.column("area_um2").to_numpy()
            for geom, x, y, a in zip(geoms, tx, ty, area_um2, strict=True):
                key = (int(x), int(y))
                if key != current:
                    if fh:
                        fh.close()
                    path = out_dir / f"{slide_id}_x{key[0]}_y{key[1]}-features.csv"
                    fh = open(path, "a" if key in written else "w", newline="")
                    writer = csv.writer(fh)
                    if key not in written:
                        writer.writerow(["AreaInPixels", "PhysicalSize", "Polygon"])
                    written[key], current = path, key
                writer.writerow([round(geom.area, 1), round(float(a), 3), polygon_text(geom)])
    finally:
        if fh:
            fh.close()
    return sorted(written.values())
