"""Whole-slide image access: one small interface over tiffslide (default) and openslide.

All coordinates are level-0 pixels. Reads at a physical resolution (µm/px) pick the pyramid level
closest to (and not coarser than) the requested resolution and resample from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BACKENDS = ("tiffslide", "openslide")

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


class Slide:
    """A whole-slide image opened with tiffslide or openslide.

    Parameters
    ----------
    path : path-like
        Slide file (SVS, generic tiled TIFF, anything the backend reads).
    backend : {"tiffslide", "openslide"}
    """

    def __init__(self, path, backend: str = "tiffslide"):
        self.path = Path(path)
        if backend not in BACKENDS:
            raise ValueError(f"unknown slide backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend
        if not self.path.exists():
            raise SlideError(f"{self.path}: file not found")
        try:
            if backend == "tiffslide":
                import tiffslide  # the chosen backend only: each reader is imported on use

                self._slide = tiffslide.TiffSlide(str(self.path))
            else:
                import openslide  # the chosen backend only: it needs its native library

                self._slide = openslide.OpenSlide(str(self.path))
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
            raw = props.get(f"{self.backend}.mpp-{axis}")
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


def open_slide(path, backend: str = "tiffslide") -> Slide:
    """Open a slide, raising :class:`SlideError` with the file name and reason on failure."""
    return Slide(path, backend=backend)
