"""Tissue detection and WSI QC facts from a low-resolution pyramid level.

Outputs per slide (DESIGN.md): ``tissue.parquet`` (tissue polygons, level-0 px), ``tissue.png`` (mask
preview), ``tiles.parquet`` (tissue tiles on a grid at the working resolution), ``wsi.json`` (WSI-QC facts)
and ``patches.npz`` (a sample of real tissue patches at the working resolution: texture source for the
synth stage and "real" class for the discriminator).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import Polygon

from . import io
from .download import read_failure_record
from .slides import SlideError, open_slide, resolve_mpp

log = logging.getLogger(__name__)


@dataclass
class TissueParams:
    """Tissue detection parameters; all sizes are physical."""

    mask_mpp: float = 8.0            # resolution the mask is computed at
    min_saturation: float = 15.0     # Otsu threshold is clipped to [min, max] (0-255 scale)
    max_saturation: float = 40.0
    closing_um: float = 60.0         # morphological closing radius
    min_region_um2: float = 20000.0  # tissue fragments smaller than this are dropped
    min_hole_um2: float = 20000.0    # holes smaller than this are filled
    min_tissue_mm2: float = 0.02     # less tissue than this fails WSI QC
    tile_size: int = 512             # tile edge at the working resolution (px)
    min_tile_fraction: float = 0.25  # a tile is tissue when this fraction of it is tissue
    n_patches: int = 16              # real patches sampled per slide
    patch_size: int = 256            # their edge at the working resolution (px)


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """Binary tissue mask of an RGB image at ``mpp`` µm/px.

    Otsu threshold on HSV saturation, clipped to a plausible band so slides that are all tissue or all
    glass are not split in two, then closing, small-object removal and hole filling (sizes in µm).
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.GaussianBlur(hsv[..., 1], (3, 3), 0)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = float(np.clip(otsu, params.min_saturation, params.max_saturation))
    # Near-black pixels (scanner edges, marker ink) are saturated but not tissue.
    mask = (sat > thr) & (hsv[..., 2] > 40)
    radius = max(1, round(params.closing_um / mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
    min_px = params.min_region_um2 / mpp**2
    mask = _remove_small(mask, min_px)
    mask = ~_remove_small(~mask, params.min_hole_um2 / mpp**2)
    return mask


def _remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def mask_to_polygons(mask: np.ndarray, scale: float) -> list[Polygon]:
    """Polygons (with holes) of a binary mask, in level-0 px given ``scale`` mask px per level-0 px."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polygons = []
    for i, contour in enumerate(contours):
        if hierarchy[i][3] != -1 or len(contour) < 3:
            continue  # holes are attached to their parent below
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(_contour_to_level0(contours[child], scale))
            child = hierarchy[child][0]
        poly = shapely.make_valid(Polygon(_contour_to_level0(contour, scale), holes))
        polygons.extend(_polygon_parts(poly))
    return polygons


def _contour_to_level0(contour: np.ndarray, scale: float) -> np.ndarray:
    # Pixel centres: mask pixel i covers level-0 [i/scale, (i+1)/scale).
    return (contour[:, 0, :].astype(np.float64) + 0.5) / scale


def _polygon_parts(geom) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and g.area > 0]


def tile_grid(mask: np.ndarray, scale: float, tile_level0: float, slide_size: tuple[int, int],
              min_fraction: float) -> pd.DataFrame:
    """Tiles of edge ``tile_level0`` (level-0 px) on a grid anchored at the origin, with tissue fraction.

    Returns a frame with ``x, y, w, h`` (level-0 px, ints) and ``tissue_fraction``, keeping tiles with at
    least ``min_fraction`` tissue.
    """
    width, height = slide_size
    rows = []
    step = tile_level0
    for j in range(int(np.ceil(height / step))):
        for i in range(int(np.ceil(width / step))):
            x0, y0 = i * step, j * step
            x1, y1 = min(x0 + step, width), min(y0 + step, height)
            mx0, my0 = int(x0 * scale), int(y0 * scale)
            mx1, my1 = max(mx0 + 1, int(np.ceil(x1 * scale))), max(my0 + 1, int(np.ceil(y1 * scale)))
            frac = float(mask[my0:my1, mx0:mx1].mean()) if mask[my0:my1, mx0:mx1].size else 0.0
            if frac >= min_fraction:
                rows.append((round(x0), round(y0), round(x1) - round(x0), round(y1) - round(y0), frac))
    return pd.DataFrame(rows, columns=["x", "y", "w", "h", "tissue_fraction"]).astype(
        {"x": "int64", "y": "int64", "w": "int64", "h": "int64", "tissue_fraction": "float64"})


def seed_from(text: str) -> int:
    """Stable per-name random seed (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode())


def sample_patches(slide, tiles: pd.DataFrame, n: int, patch_size: int, scale_work: float,
                   seed: int) -> np.ndarray:
    """Read up to ``n`` random patches of ``patch_size`` working px from the tissue tiles."""
    rng = np.random.default_rng(seed)
    candidates = tiles[tiles.tissue_fraction >= 0.5]
    if candidates.empty:
        candidates = tiles
    if candidates.empty or n <= 0:
        return np.zeros((0, patch_size, patch_size, 3), np.uint8)
    side0 = patch_size / scale_work
    patches = []
    picks = rng.choice(len(candidates), size=n, replace=len(candidates) < n)
    for k in picks:
        t = candidates.iloc[int(k)]
        x = t.x + rng.uniform(0, max(0.0, t.w - side0))
        y = t.y + rng.uniform(0, max(0.0, t.h - side0))
        patches.append(slide.read_scaled((x, y, side0, side0), scale_work, (patch_size, patch_size)))
    return np.stack(patches)


def detect_tissue(slide_path, out_dir, slide_id: str, *, mpp_work: float = 0.25,
                  mpp_override: float | None = None, mpp_fallback: float | None = None,
                  backend: str = "tiffslide", params: TissueParams = TissueParams()) -> dict:
    """Run tissue detection and WSI QC for one slide and write its outputs to ``out_dir``.

    Never raises for a bad slide: the failure is recorded in ``wsi.json`` (``status: failed`` with the
    reason) and the other outputs are written empty, so downstream stages grade it "failed WSI QC".

    Returns
    -------
    dict
        The WSI-QC facts written to ``wsi.json``.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    facts = {"slide_id": slide_id, "path": str(slide_path), "backend": backend, "status": "ok",
             "failure_stage": None, "failure_reason": None, "mpp": None, "mpp_source": None,
             "slide_mpp": None, "width": None, "height": None, "n_levels": None,
             "tissue_area_mm2": 0.0, "n_tissue_tiles": 0, "mpp_work": mpp_work}
    polygons, tiles = [], tile_grid(np.zeros((1, 1), bool), 1.0, 1.0, (0, 0), 1.0)
    preview = np.zeros((1, 1, 3), np.uint8)
    patches = np.zeros((0, params.patch_size, params.patch_size, 3), np.uint8)
    try:
        failure = read_failure_record(slide_path)
        if failure is not None:
            raise _DownloadFailed(failure["reason"])
        with open_slide(slide_path, backend) as slide:
            facts.update(width=slide.dimensions[0], height=slide.dimensions[1],
                         n_levels=len(slide.level_dimensions), slide_mpp=slide.mpp)
            info = resolve_mpp(slide.mpp, mpp_override, mpp_fallback)
            facts.update(mpp=info.mpp, mpp_source=info.source)
            if info.source == "fallback":
                log.warning("slide %s: no usable mpp in file (%s); using fallback %.4f µm/px",
                            slide_id, info.slide_value, info.mpp)
            thumb, scale = slide.read_thumbnail(params.mask_mpp, info.mpp)
            mask_mpp = info.mpp / scale
            mask = tissue_mask(thumb, mask_mpp, params)
            area_mm2 = float(mask.sum()) * mask_mpp**2 / 1e6
            polygons = mask_to_polygons(mask, scale)
            tiles = tile_grid(mask, scale, params.tile_size * mpp_work / info.mpp, slide.dimensions,
                              params.min_tile_fraction)
            preview = _preview(thumb, mask)
            facts.update(tissue_area_mm2=area_mm2, n_tissue_tiles=len(tiles))
            if area_mm2 < params.min_tissue_mm2:
                raise SlideError(f"too little tissue: {area_mm2:.4f} mm² < {params.min_tissue_mm2} mm²")
            patches = sample_patches(slide, tiles, params.n_patches, params.patch_size,
                                     info.mpp / mpp_work, seed_from(slide_id))
    except (SlideError, _DownloadFailed) as exc:
        reason = str(exc).replace(str(slide_path) + ": ", "")
        stage = "download" if isinstance(exc, _DownloadFailed) else "wsi_qc"
        facts.update(status="failed", failure_stage=stage, failure_reason=reason)
        log.error("slide %s: failed %s: %s", slide_id, stage, reason)
        polygons, tiles = [], tiles.iloc[0:0]
    facts["seconds"] = round(time.monotonic() - started, 3)
    _write_outputs(out_dir, slide_id, facts, polygons, tiles, preview, patches)
    return facts


class _DownloadFailed(Exception):
    pass


def _preview(thumb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Thumbnail with the tissue outline drawn in green."""
    preview = thumb.copy()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(preview, contours, -1, (0, 200, 0), max(1, min(preview.shape[:2]) // 300))
    return preview


def _write_outputs(out_dir: Path, slide_id, facts, polygons, tiles, preview, patches) -> None:
    import geopandas as gpd

    mpp = facts["mpp"]
    meta = io.provenance(slide_id=slide_id, mpp=mpp, mpp_source=facts["mpp_source"], status=facts["status"])
    area = [p.area * mpp**2 / 1e6 for p in polygons] if mpp else [0.0] * len(polygons)
    gdf = gpd.GeoDataFrame({"area_mm2": np.asarray(area, float)}, geometry=list(polygons), crs=None)
    io.write_geoparquet(out_dir / "tissue.parquet", gdf, meta)
    io.write_table(out_dir / "tiles.parquet", tiles, meta)
    io.write_png(out_dir / "tissue.png", preview)
    io.write_npz(out_dir / "patches.npz", patches=patches, mpp=np.float64(facts["mpp_work"]))
    io.write_json(out_dir / "wsi.json", facts)  # last: its presence means the others are complete
