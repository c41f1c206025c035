"""Tissue detection and WSI QC facts from a low-resolution pyramid level.

Outputs per slide (DESIGN.md): ``tissue.parquet`` (tissue polygons, level-0 px), ``tissue.png`` (mask
preview), ``tiles.parquet`` (tissue tiles on a grid at the working resolution), ``wsi.json`` (WSI-QC facts)
and ``patches.npz`` (a sample of real tissue patches at the working resolution: texture source for the
synth stage and "real" class for the discriminator).

WSI QC, before any segmentation: the slide must open, have a plausible µm/px (``min_mpp``-``max_mpp``,
or a per-slide override), not be blank or mostly background, hold enough tissue, not be mostly pen ink,
and not be blurred. The measurements are recorded in ``wsi.json`` as facts (``tissue_fraction``,
``grey_std``, ``pen_fraction``, ``sharpness_median``, ``blurred_fraction``, ...); the slide fails, with
the reason, only beyond the :class:`TissueParams` thresholds (:func:`wsi_verdict`). Pen ink is cut out of
the tissue mask whether or not the slide fails.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from shapely.geometry import Polygon

from . import io
from .download import read_failure_record
from .slides import SlideError, open_slide, resolve_mpp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
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
    # WSI QC (facts in wsi.json; the slide fails only beyond these thresholds).
    min_mpp: float = 0.1             # level-0 µm/px outside [min, max] fails unless the sheet overrides it
    max_mpp: float = 2.0
    blank_std: float = 2.0           # grey-level std of the whole thumbnail below this: blank slide
    min_tissue_fraction: float = 0.002  # tissue share of the slide area below this: mostly background
    pen_saturation: float = 80.0     # ink: blue/green pixels at least this saturated (0-255), or near black
    pen_margin_um: float = 40.0      # tissue this close to ink is dropped with it (stroke edges, halo)
    max_pen_fraction: float = 0.3    # ink share of tissue + ink above this fails the slide
    blur_mpp: float = 1.0            # resolution the sharpness of the sampled patches is measured at
    blur_patch_um: float = 64.0      # their edge (µm); read for the blur check alone, whatever mpp_work is
    min_sharpness: float = 250.0     # variance of the Laplacian over tissue pixels; below: blurred patch
    max_blurred_fraction: float = 0.5  # share of blurred sampled patches above this fails the slide


def tissue_mask(rgb: np.ndarray, mpp: float, params: TissueParams = TissueParams(),
                exclude: np.ndarray | None = None) -> np.ndarray:
    """Binary tissue mask of an RGB image at ``mpp`` µm/px.

    Otsu threshold on HSV saturation, clipped to a plausible band so slides that are all tissue or all
    glass are not split in two, then closing, small-object removal and hole filling (sizes in µm).
    Pixels of ``exclude`` (pen ink, see :func:`ink_mask`), grown by ``pen_margin_um``, are never tissue.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = cv2.GaussianBlur(hsv[..., 1], (3, 3), 0)
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    thr = float(np.clip(otsu, params.min_saturation, params.max_saturation))
    # Near-black pixels (scanner edges, marker ink) are saturated but not tissue.
    mask = (sat > thr) & (hsv[..., 2] > 40)
    drop = None
    if exclude is not None and exclude.any():
        r = max(1, round(params.pen_margin_um / mpp))
        drop = cv2.dilate(exclude.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)) > 0
        mask &= ~drop
    radius = max(1, round(params.closing_um / mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0
    min_px = params.min_region_um2 / mpp**2
    mask = _remove_small(mask, min_px)
    mask = ~_remove_small(~mask, params.min_hole_um2 / mpp**2)
    if drop is not None:
        mask &= ~drop  # closing and hole filling must not bring the ink back
    return mask


# Pen ink hue bands on OpenCV's 0-180 hue scale. H&E is pink to purple (hue ~125-180 and 0-10):
# hematoxylin's blue-purple sits at ~130, marker blue at ~100-120, green at ~40-90.
INK_HUES = ((35, 95), (95, 125))


def ink_mask(rgb: np.ndarray, params: TissueParams = TissueParams()) -> np.ndarray:
    """Pen marks on a thumbnail: strongly saturated blue/green pixels, and near-black ones.

    Near-black regions touching the image border are scanner margins, not ink, and are left out.
    """
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    coloured = np.zeros(hue.shape, bool)
    for lo, hi in INK_HUES:
        coloured |= (hue >= lo) & (hue < hi)
    coloured &= (sat >= params.pen_saturation) & (val < 235)
    black = _off_border(val < 60)
    ink = (coloured | black).astype(np.uint8)
    # Single pixels of that colour are JPEG noise or debris, not a stroke.
    return cv2.morphologyEx(ink, cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0


def _off_border(mask: np.ndarray) -> np.ndarray:
    """``mask`` without the connected regions that touch the image border."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = np.ones(n, bool)
    keep[edge] = False
    keep[0] = False
    return keep[labels]


def sharpness(rgb: np.ndarray) -> float:
    """Variance of the Laplacian of the grey image over its tissue pixels.

    For patches read at a moderate resolution (``TissueParams.blur_mpp``, 1 µm/px) so 20x and 40x scans are
    comparable. NaN when less than a quarter of the patch is tissue (glass and fat are smooth whatever the
    focus). Measured values: sharp real tissue 350-4800 (10th percentile >= 800); the same after a 1 µm
    Gaussian blur 90-410, after 2 µm 10-45.
    """
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    tissue = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1] > 20
    if tissue.mean() < 0.25:
        return float("nan")
    return float(cv2.Laplacian(grey, cv2.CV_32F, ksize=1)[tissue].var())


def blur_facts(patches: np.ndarray, params: TissueParams = TissueParams()) -> dict:
    """Median sharpness of tissue patches read at ``params.blur_mpp`` and the share of them that is blurred."""
    values = np.array([sharpness(p) for p in patches], float)
    values = values[~np.isnan(values)]
    if not len(values):
        return {"sharpness_median": None, "blurred_fraction": None, "n_sharpness_patches": 0}
    return {"sharpness_median": round(float(np.median(values)), 1),
            "blurred_fraction": round(float(np.mean(values < params.min_sharpness)), 4),
            "n_sharpness_patches": int(len(values))}


def wsi_verdict(facts: dict, params: TissueParams = TissueParams()) -> str | None:
    """The first WSI-QC failure the recorded facts show, as a reason for ``wsi.json``; None if none.

    Checks, in order: implausible µm/px (unless overridden), blank slide, pen marks (before the tissue
    checks: ink removed from the mask may be why too little tissue is left), mostly background, too
    little tissue, blur. Facts not measured yet (None) are skipped.
    """
    mpp = facts.get("mpp")
    if mpp is not None and facts.get("mpp_source") != "override" and not params.min_mpp <= mpp <= params.max_mpp:
        return (f"implausible pixel size {mpp:.4g} µm/px ({facts.get('mpp_source')}; plausible "
                f"{params.min_mpp}-{params.max_mpp}); set the slide's mpp in the sample sheet to override")
    if facts.get("grey_std") is not None and facts["grey_std"] < params.blank_std:
        return f"blank slide: thumbnail grey-level std {facts['grey_std']:.2f} < {params.blank_std}"
    if facts.get("pen_fraction") is not None and facts["pen_fraction"] > params.max_pen_fraction:
        return (f"pen marks: ink covers {100 * facts['pen_fraction']:.1f} % of tissue + ink "
                f"(> {100 * params.max_pen_fraction:.3g} %)")
    if facts.get("tissue_fraction") is not None and facts["tissue_fraction"] < params.min_tissue_fraction:
        return (f"mostly background: tissue covers {100 * facts['tissue_fraction']:.3f} % of the slide "
                f"(< {100 * params.min_tissue_fraction:.3g} %)")
    area = facts.get("tissue_area_mm2")
    if area is not None and area < params.min_tissue_mm2:
        return f"too little tissue: {area:.4f} mm² < {params.min_tissue_mm2} mm²"
    if facts.get("blurred_fraction") is not None and facts["blurred_fraction"] > params.max_blurred_fraction:
        return (f"blurred: {100 * facts['blurred_fraction']:.0f} % of sampled tissue patches have sharpness "
                f"< {params.min_sharpness} (median {facts['sharpness_median']}; > "
                f"{100 * params.max_blurred_fraction:.3g} % allowed)")
    return None


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
        # OpenCV's contours run through the edge pixels' centres; out to their outer edges (holes shrink
        # alike), or every tissue border loses half a mask pixel (4 µm at the default 8 µm/px) and the
        # nuclei along it.
        polygons.extend(_polygon_parts(shapely.buffer(poly, 0.5 / scale, join_style="mitre")))
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
    def spans(extent: int, mask_extent: int):
        """Each tile's level-0 start and end along one axis, and the mask rows/columns it covers."""
        start = np.arange(int(np.ceil(extent / tile_level0))) * tile_level0
        end = np.minimum(start + tile_level0, extent)
        m0 = (start * scale).astype(np.int64)
        m1 = np.maximum(m0 + 1, np.ceil(end * scale).astype(np.int64))
        return start, end, np.minimum(m0, mask_extent), np.minimum(m1, mask_extent)

    x0, x1, mx0, mx1 = spans(slide_size[0], mask.shape[1])
    y0, y1, my0, my1 = spans(slide_size[1], mask.shape[0])
    # Tissue pixels per tile from a summed-area table: one pass, however many tiles.
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    table[1:, 1:] = mask.cumsum(0).cumsum(1)
    sums = (table[np.ix_(my1, mx1)] - table[np.ix_(my0, mx1)] - table[np.ix_(my1, mx0)]
            + table[np.ix_(my0, mx0)])
    count = np.outer(my1 - my0, mx1 - mx0)
    frac = np.where(count > 0, sums / np.maximum(count, 1), 0.0)
    j, i = np.nonzero(frac >= min_fraction)
    left, top = np.round(x0[i]), np.round(y0[j])
    return pd.DataFrame({"x": left, "y": top, "w": np.round(x1[i]) - left, "h": np.round(y1[j]) - top,
                         "tissue_fraction": frac[j, i]}).astype(
        {"x": "int64", "y": "int64", "w": "int64", "h": "int64", "tissue_fraction": "float64"})


def seed_from(text: str) -> int:
    """Stable per-name random seed (Python's ``hash`` is salted per process)."""
    return zlib.crc32(text.encode())


def sample_patches(slide, tiles: pd.DataFrame, n: int, patch_size: int, scale_work: float,
                   seed: int) -> np.ndarray:
    """Read up to ``n`` random patches of ``patch_size`` px (``scale_work`` px per level-0 px) from the tissue tiles."""
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


def sharpness_patches(slide, mask: np.ndarray, scale: float, mpp: float, params: TissueParams,
                      seed: int) -> np.ndarray:
    """Up to ``params.n_patches`` tissue patches of ``params.blur_patch_um`` read at ``params.blur_mpp``.

    Drawn from a grid of their own size over ``mask`` (``scale``: mask px per level-0 px), so the blur
    verdict depends neither on ``mpp_work`` nor on the tile size: a slide that passes with one
    configuration passes with any other.
    """
    side0 = params.blur_patch_um / mpp
    grid = tile_grid(mask, scale, side0, slide.dimensions, params.min_tile_fraction)
    size = max(8, round(params.blur_patch_um / params.blur_mpp))
    return sample_patches(slide, grid, params.n_patches, size, mpp / params.blur_mpp, seed)


def slide_tissue(slide, mpp: float, params: TissueParams = TissueParams()):
    """Thumbnail at ``params.mask_mpp`` and its pen-ink and tissue masks (ink excluded from tissue).

    Returns
    -------
    thumb : ndarray (h, w, 3) uint8
    scale : float, thumbnail px per level-0 px
    ink, tissue : ndarray (h, w) bool
    """
    thumb, scale = slide.read_thumbnail(params.mask_mpp, mpp)
    ink = ink_mask(thumb, params)
    return thumb, scale, ink, tissue_mask(thumb, mpp / scale, params, exclude=ink)


def detect_tissue(slide_path, out_dir, slide_id: str, *, mpp_work: float = 0.25,
                  mpp_override: float | None = None, mpp_fallback: float | None = None,
                  backend: str = "auto", params: TissueParams = TissueParams()) -> dict:
    """Run tissue detection and WSI QC for one slide and write its outputs to ``out_dir``.

    Never raises for a bad slide: the failure is recorded in ``wsi.json`` (``status: failed``, the
    ``failure_stage`` -- download, wsi_qc, or tissue for any other error -- and the reason) and the other
    outputs are written empty, so downstream stages grade it Unacceptable.

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
             "tissue_area_mm2": 0.0, "n_tissue_tiles": 0, "mpp_work": mpp_work,
             # WSI-QC facts (None until measured): see wsi_verdict() for the checks on them.
             "tissue_fraction": None, "grey_std": None, "pen_fraction": None, "pen_area_mm2": None,
             "sharpness_median": None, "blurred_fraction": None, "n_sharpness_patches": 0}
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
            _check({"mpp": info.mpp, "mpp_source": info.source}, params)  # before anything is read at it
            thumb, scale, ink, mask = slide_tissue(slide, info.mpp, params)
            mask_mpp = info.mpp / scale
            area_mm2 = float(mask.sum()) * mask_mpp**2 / 1e6
            polygons = mask_to_polygons(mask, scale)
            tiles = tile_grid(mask, scale, params.tile_size * mpp_work / info.mpp, slide.dimensions,
                              params.min_tile_fraction)
            preview = _preview(thumb, mask, ink)
            n_ink = int(ink.sum())
            facts.update(tissue_area_mm2=area_mm2, n_tissue_tiles=len(tiles),
                         tissue_fraction=round(float(mask.mean()), 6),
                         grey_std=round(float(cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY).std()), 3),
                         pen_fraction=round(n_ink / max(1, n_ink + int(mask.sum())), 4),
                         pen_area_mm2=round(n_ink * mask_mpp**2 / 1e6, 4))
            _check(facts, params)
            patches = sample_patches(slide, tiles, params.n_patches, params.patch_size,
                                     info.mpp / mpp_work, seed_from(slide_id))
            facts.update(blur_facts(sharpness_patches(slide, mask, scale, info.mpp, params, seed_from(slide_id)),
                                    params))
            _check(facts, params)
    except Exception as exc:  # this slide's problem, whatever it is: recorded, never a failed job
        reason = str(exc).replace(str(slide_path) + ": ", "")
        if isinstance(exc, (_DownloadFailed, SlideError)):
            stage = "download" if isinstance(exc, _DownloadFailed) else "wsi_qc"
        else:
            stage, reason = "tissue", f"{type(exc).__name__}: {reason}"
        facts.update(status="failed", failure_stage=stage, failure_reason=reason)
        log.error("slide %s: failed %s: %s", slide_id, stage, reason)
        # A failed slide contributes nothing downstream (no tiles, no textures for the synth stage).
        polygons, tiles, patches = [], tiles.iloc[0:0], patches[:0]
    facts["seconds"] = round(time.monotonic() - started, 3)
    _write_outputs(out_dir, slide_id, facts, polygons, tiles, preview, patches)
    return facts


class _DownloadFailed(Exception):
    pass


def _check(facts: dict, params: TissueParams) -> None:
    reason = wsi_verdict(facts, params)
    if reason:
        raise SlideError(reason)


def _preview(thumb: np.ndarray, mask: np.ndarray, ink: np.ndarray | None = None) -> np.ndarray:
    """Thumbnail with the tissue outline drawn in green (and excluded pen ink outlined in red)."""
    preview = thumb.copy()
    width = max(1, min(preview.shape[:2]) // 300)
    if ink is not None and ink.any():
        contours, _ = cv2.findContours(ink.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(preview, contours, -1, (220, 0, 0), width)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(preview, contours, -1, (0, 200, 0), width)
    return preview


def _write_outputs(out_dir: Path, slide_id, facts, polygons, tiles, preview, patches) -> None:
    mpp = facts["mpp"]
    meta = io.provenance(slide_id=slide_id, mpp=mpp, mpp_source=facts["mpp_source"], status=facts["status"])
    area = [p.area * mpp**2 / 1e6 for p in polygons] if mpp else [0.0] * len(polygons)
    gdf = gpd.GeoDataFrame({"area_mm2": np.asarray(area, float)}, geometry=list(polygons), crs=None)
    io.write_geoparquet(out_dir / "tissue.parquet", gdf, meta)
    io.write_table(out_dir / "tiles.parquet", tiles, meta)
    io.write_png(out_dir / "tissue.png", preview)
    # scan_mpp: the detail the patches really hold (a 20x slide read at a 40x working resolution is upsampled).
    io.write_npz(out_dir / "patches.npz", patches=patches, mpp=np.float64(facts["mpp_work"]),
                 scan_mpp=np.float64(max(mpp or 0.0, facts["mpp_work"])))
    io.write_json(out_dir / "wsi.json", facts)  # last: its presence means the others are complete
