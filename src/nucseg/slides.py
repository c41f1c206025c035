"""Whole-slide image access: one small interface over the slide readers of :data:`READERS`.

A slide is a file, or a folder holding one (multi-file formats: MIRAX's ``.mrxs`` beside its data folder,
DICOM series). The reader is picked by the file's content (:func:`pick_reader`), not its name; a format is
added in one place, :func:`register_reader`. All coordinates are level-0 pixels. Reads at a physical
resolution (µm/px) pick the pyramid level closest to (and not coarser than) the requested resolution and
resample from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

# Pixel sizes outside this range are not plausible for a brightfield scan (e.g. the 72-dpi default
# resolution tag of generic TIFFs gives ~353 µm/px); they are treated as missing.
PLAUSIBLE_MPP = (0.05, 20.0)


class SlideError(RuntimeError):
    """A slide cannot be opened or read; the message names the file and the reason."""


@dataclass(frozen=True)
class MppInfo:
    mpp: float
    source: str  # "slide", "override" or "fallback"
    slide_value: float | None = None  # what the file said, if anything


def resolve_mpp(slide_mpp: float | None, override: float | None = None,
                fallback: float | None = None) -> MppInfo:
    """Decide the level-0 pixel size from an override, the slide's own value, or a fallback.

    Raises
    ------
    SlideError
        If the slide value is missing or implausible and no fallback is configured.
    """
    if override is not None and not _isnan(override):
        return MppInfo(float(override), "override", slide_mpp)
    if slide_mpp is not None and PLAUSIBLE_MPP[0] <= slide_mpp <= PLAUSIBLE_MPP[1]:
        return MppInfo(float(slide_mpp), "slide", slide_mpp)
    if fallback is not None:
        return MppInfo(float(fallback), "fallback", slide_mpp)
    raise SlideError(f"slide pixel size missing or implausible ({slide_mpp}) and no fallback mpp")


def _isnan(value) -> bool:
    try:
        return math.isnan(value)
    except TypeError:
        return False


@dataclass(frozen=True)
class Reader:
    """A slide-reading library: how to recognise a file it reads and how to open it.

    Attributes
    ----------
    name : str
        The ``--backend`` / ``slide_backend`` value that forces this reader.
    recognises : callable
        ``recognises(path) -> bool`` from the file's content (it must not raise for foreign files).
    open : callable
        ``open(path) -> handle`` with OpenSlide's interface (``dimensions``, ``level_dimensions``,
        ``level_downsamples``, ``properties``, ``read_region``, ``close``).
    """

    name: str
    recognises: Callable[[Path], bool]
    open: Callable[[Path], object]


READERS: dict[str, Reader] = {}


def register_reader(reader: Reader) -> None:
    """Add a slide reader; :func:`pick_reader` tries readers in the order they were registered."""
    READERS[reader.name] = reader


TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF, both byte orders


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in TIFF_MAGIC


def _open_tiffslide(path: Path):
    import tiffslide  # imported on use, as each reader

    return tiffslide.TiffSlide(str(path))


def _openslide_recognises(path: Path) -> bool:
    try:
        import openslide  # needs its native library (openslide-bin)
    except ImportError:
        return False
    return openslide.OpenSlide.detect_format(str(path)) is not None


def _open_openslide(path: Path):
    import openslide  # needs its native library: imported only when used

    return openslide.OpenSlide(str(path))


# TIFF-based files (SVS, NDPI, generic tiled TIFF, ...) go to tiffslide (pure Python); everything else
# OpenSlide knows (MIRAX, DICOM, VMS, ...) to OpenSlide.
register_reader(Reader("tiffslide", _is_tiff, _open_tiffslide))
register_reader(Reader("openslide", _openslide_recognises, _open_openslide))
BACKENDS = ("auto", *READERS)  # the CLI's and the config's choices


def slide_file(path: Path) -> tuple[Path, Reader | None]:
    """The file to open for ``path``, and the reader that recognised it when one was asked: the path itself
    (reader None), or for a folder the first file in it (by name; else in its only subfolder) that a reader
    recognises (else its first file, reader None, which then fails to open).

    Raises
    ------
    SlideError
        When ``path`` does not exist or the folder holds no slide.
    """
    if not path.exists():
        raise SlideError(f"{path}: file not found")
    if not path.is_dir():
        return path, None
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file()]
    for candidate in files:
        reader = pick_reader(candidate, quiet=True)
        if reader is not None:
            return candidate, reader
    if not files and len(entries) == 1:  # a linked folder (e.g. a DICOM series)
        return slide_file(entries[0])
    if files:  # none is a slide: opening the first says why
        return files[0], None
    raise SlideError(f"{path}: no slide file in this folder")


def pick_reader(path: Path, quiet: bool = False) -> Reader | None:
    """The first registered reader that recognises ``path`` by its content.

    Raises
    ------
    SlideError
        When none does (unless ``quiet``: then None).
    """
    for reader in READERS.values():
        try:
            if reader.recognises(path):
                return reader
        except OSError:
            continue
    if quiet:
        return None
    raise SlideError(f"{path}: not a readable slide (no reader recognises it: {', '.join(READERS)})")


class Slide:
    """A whole-slide image opened with a reader of :data:`READERS`.

    Parameters
    ----------
    path : path-like
        Slide file (SVS, generic tiled TIFF, anything a reader reads), or a folder holding one
        (:func:`slide_file`).
    backend : str
        ``auto`` (the reader is picked by the file's content, :func:`pick_reader`) or a reader's name.
    """

    def __init__(self, path, backend: str = "auto"):
        if backend != "auto" and backend not in READERS:
            raise ValueError(f"unknown slide backend {backend!r}; choose auto or one of {tuple(READERS)}")
        self.path, found = slide_file(Path(path))
        reader = (found or pick_reader(self.path)) if backend == "auto" else READERS[backend]
        self.backend = reader.name
        try:
            self._slide = reader.open(self.path)
            self.dimensions = tuple(int(v) for v in self._slide.dimensions)
            self.level_dimensions = [tuple(int(v) for v in d) for d in self._slide.level_dimensions]
            self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        except Exception as exc:  # the libraries raise many types for bad files
            raise SlideError(f"{self.path}: not a readable slide ({type(exc).__name__}: {exc})") from exc
        if self.dimensions[0] <= 0 or self.dimensions[1] <= 0:
            raise SlideError(f"{self.path}: empty image")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._slide.close()

    @property
    def properties(self) -> dict:
        return dict(self._slide.properties)

    @property
    def mpp(self) -> float | None:
        """The level-0 pixel size the file states (mean of x and y), or None."""
        props = self._slide.properties
        values = []
        for axis in ("x", "y"):
            raw = props.get(f"{self.backend}.mpp-{axis}", props.get(f"openslide.mpp-{axis}"))
            try:
                values.append(float(raw))
            except (TypeError, ValueError):
                return None
        if not all(v > 0 and math.isfinite(v) for v in values):
            return None
        return float(np.mean(values))

    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample does not exceed ``downsample`` (+1 % slack)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01:
                best = level
        return best

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read an RGB uint8 array; ``location`` is level-0, ``size`` (w, h) is in level pixels.

        Transparent / out-of-bounds pixels come back white, as on a glass slide.
        """
        try:
            region = self._slide.read_region((int(location[0]), int(location[1])), int(level),
                                             (int(size[0]), int(size[1])))
        except Exception as exc:
            raise SlideError(f"{self.path}: cannot read region {location} level {level}: {exc}") from exc
        rgba = np.asarray(region)
        if rgba.ndim == 3 and rgba.shape[2] == 4:
            alpha = rgba[..., 3:4].astype(np.float32) / 255.0
            rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
            return rgb.round().astype(np.uint8)
        return np.ascontiguousarray(rgba[..., :3])

    def read_scaled(self, box: tuple[float, float, float, float], scale: float,
                    out_size: tuple[int, int] | None = None) -> np.ndarray:
        """Read a level-0 box ``(x, y, w, h)`` resampled by ``scale`` (output px per level-0 px).

        Uses the pyramid level closest to the target resolution, then resizes (area interpolation
        when shrinking, linear when enlarging).
        """
        x, y, w, h = box
        if out_size is None:
            out_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        level = self.best_level(1.0 / scale)
        ds = self.level_downsamples[level]
        lw, lh = max(1, math.ceil(w / ds)), max(1, math.ceil(h / ds))
        region = self.read_region((round(x), round(y)), level, (lw, lh))
        if region.shape[1] == out_size[0] and region.shape[0] == out_size[1]:
            return region
        shrink = out_size[0] < region.shape[1]
        return cv2.resize(region, out_size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def read_grid(self, origin: tuple[int, int], size: tuple[int, int], scale: float) -> np.ndarray:
        """Pixels ``[x0, x0+w) × [y0, y0+h)`` of the slide resampled onto a global grid.

        The grid has ``scale`` pixels per level-0 pixel and is anchored at the slide origin, so two reads
        that overlap return the same pixels where they overlap (up to one grey level of interpolation
        rounding), whatever their origins: block-wise inference then does not depend on the tiling.
        Pixels outside the slide are white.
        """
        x0, y0 = origin
        w, h = size
        level = self.best_level(1.0 / scale)
        ds = self.level_downsamples[level]
        f = 1.0 / (scale * ds)  # source-level pixels per output pixel
        lx0 = math.floor(((x0 + 0.5) / scale) / ds - 0.5) - 2
        ly0 = math.floor(((y0 + 0.5) / scale) / ds - 0.5) - 2
        lw = math.ceil(w * f) + 5
        lh = math.ceil(h * f) + 5
        lw_max, lh_max = self.level_dimensions[level]
        cx0, cy0 = max(lx0, 0), max(ly0, 0)
        cx1, cy1 = min(lx0 + lw, lw_max), min(ly0 + lh, lh_max)
        region = np.full((lh, lw, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            loc = (round(cx0 * ds), round(cy0 * ds))
            region[cy0 - ly0:cy1 - ly0, cx0 - lx0:cx1 - lx0] = self.read_region(loc, level, (cx1 - cx0, cy1 - cy0))
        if f > 1.0:  # shrinking: low-pass first so the resampling does not alias
            region = cv2.GaussianBlur(region, (0, 0), 0.5 * f)
        # Output pixel u (centre at index u) samples region index (x0 + u + 0.5) * f - 0.5 - lx0.
        tx = (x0 + 0.5) * f - 0.5 - lx0
        ty = (y0 + 0.5) * f - 0.5 - ly0
        matrix = np.array([[f, 0.0, tx], [0.0, f, ty]])
        out = cv2.warpAffine(region, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255))
        # Outside the slide stays white even where interpolation touched the border.
        work_w, work_h = self.dimensions[0] * scale, self.dimensions[1] * scale
        if x0 < 0 or y0 < 0 or x0 + w > work_w or y0 + h > work_h:
            xs, ys = np.arange(x0, x0 + w), np.arange(y0, y0 + h)
            out[(ys < 0) | (ys >= math.floor(work_h))] = 255
            out[:, (xs < 0) | (xs >= math.floor(work_w))] = 255
        return out

    def read_thumbnail(self, target_mpp: float, level0_mpp: float) -> tuple[np.ndarray, float]:
        """Whole slide at about ``target_mpp`` from a low-resolution level.

        Returns
        -------
        image : ndarray (H, W, 3) uint8
        scale : float
            Image pixels per level-0 pixel.
        """
        scale = level0_mpp / target_mpp
        w, h = self.dimensions
        out = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = self.read_scaled((0, 0, w, h), scale, out_size=out)
        return image, out[0] / w


def open_slide(path, backend: str = "auto") -> Slide:
    """Open a slide, raising :class:`SlideError` with the file name and reason on failure."""
    return Slide(path, backend=backend)
