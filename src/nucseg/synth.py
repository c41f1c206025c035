"""Synthetic training data: random polygon nuclei drawn on real tissue textures (Hou et al., 2019).

A patch is made from a real tissue texture (a patch sampled by the tissue stage, or an image from a
folder of unlabelled H&E): its nuclei are removed by inpainting to give a background, its hematoxylin
channel sets the nuclear colour and the patch's nucleus density, and star-shaped random polygons with
rounded corners are composited onto it with blurred rims and chromatin texture (a fifth of the patches
have large, mostly vesicular carcinoma nuclei). Under the nuclei, half
the patches get a patchy hematoxylin cast over all their tissue and some get soft-edged regions of dark,
nucleus-coloured cytoplasm; faint nucleus-like distractors and small debris are drawn too. None of these
is labelled. Optionally (``real_nuclei_fraction``) some nuclei are the texture's own isolated real nuclei,
moved to random places instead of drawn; the inpainted holes get texture copied from elsewhere
(``textured_background``); a patch is rendered at its texture's scan resolution (``match_source_resolution``);
some nuclei are drawn faint (``pale_fraction``); vesicular nuclei get a crisp membrane around a cleared
interior (``crisp_vesicular``) and large-nucleus patches are packed (``large_coverage``); a patch gets its texture's colour statistics
(``match_texture_colour``).
Targets are an instance map and a boundary map.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from skimage.color import rgb2hed
from skimage.segmentation import find_boundaries

from . import io

log = logging.getLogger(__name__)

DEFAULT_NUCLEUS_RGB = np.array([95.0, 60.0, 140.0])  # typical hematoxylin-stained nucleus


@dataclass
class SynthParams:
    """Generator parameters; sizes are physical (µm), images are at ``mpp`` µm/px."""

    n_patches: int = 512
    patch_size: int = 256
    mpp: float = 0.25
    radius_um: tuple[float, float] = (2.1, 3.3)   # the paper: 8.5-13 px at 40x (0.25 µm/px)
    size_bias: tuple[float, float] = (0.75, 1.35)  # per-patch factor shared by all its nuclei (tumour: larger)
    large_fraction: float = 0.2                    # share of patches of large carcinoma nuclei ...
    large_size_bias: tuple[float, float] = (1.35, 2.0)  # ... with this size factor (radius up to 6.6 µm)
    elongation: tuple[float, float] = (1.0, 2.2)   # per-patch shared warp
    vertices: tuple[int, int] = (10, 17)
    irregularity: float = 0.35
    spikiness: float = 0.12
    coverage: tuple[float, float] = (0.04, 0.40)   # nuclear area fraction: the texture's own, within these bounds
    max_overlap: float = 0.15
    # Share of the nuclei placed against one already drawn (centres (r1 + r2) × 0.75-0.95 apart) instead of
    # anywhere: real nuclei crowd in nests and lymphocyte clusters, touching with no visible seam. Off by
    # default: measured, it did not teach the network to split such pairs (docs/experiments.md).
    cluster_fraction: float = 0.0
    distractors_per_patch: tuple[int, int] = (0, 3)
    cytoplasm_per_patch: tuple[int, int] = (0, 4)  # dark basophilic cytoplasm: nucleus-coloured, unlabelled
    wash_probability: float = 0.5                 # share of patches whose whole tissue gets a hematoxylin cast
    vesicular_fraction: float = 0.45              # nuclei with pale, textured chromatin and a dark rim
    vesicular_clearing: tuple[float, float] = (0.35, 0.6)  # how much paler a vesicular centre is than its rim
    # Share of the other nuclei drawn faint (hypochromatic: opacity 0.35-0.6 instead of 0.7-0.95).
    pale_fraction: float = 0.0
    # Share of the vesicular nuclei drawn as real carcinoma nuclei look at 40x: a crisp membrane about half
    # a micron wide around a clear interior (cleared by 45-75 %) holding discrete chromatin clumps and
    # one or two nucleoli, instead of the default's centre fading gradually towards the middle.
    crisp_vesicular: float = 0.0
    # Nuclear area fraction of the large-nucleus patches (carcinoma: packed, touching nuclei) drawn from
    # this range instead of the texture's own; (0, 0) = the texture's own.
    large_coverage: tuple[float, float] = (0.0, 0.0)
    debris_per_patch: tuple[int, int] = (0, 12)
    # Share of the nuclei that are real ones moved elsewhere in their own texture (when it has isolated
    # nuclei to take): real chromatin, membranes and outlines instead of drawn ones; labelled exactly as pasted.
    # Off by default: measured, it tied with drawn nuclei at best (docs/experiments.md, "Tried and not adopted").
    real_nuclei_fraction: float = 0.0
    real_nucleus_um2: tuple[float, float] = (8.0, 150.0)   # area of an isolated real nucleus worth moving
    # Fill the holes left by the texture's removed nuclei with fine texture copied from elsewhere in it,
    # not only Telea's smooth smear (which a discriminator can use to spot synthetic patches).
    textured_background: bool = False
    # Render each patch at its texture's own resolution (down to the source's µm/px and back): nuclei
    # drawn on a texture upsampled from 20x are then no sharper than the tissue around them.
    match_source_resolution: bool = False
    # Give each finished patch the colour statistics of the real texture it was made from (mean and spread
    # of each CIELAB channel over the tissue): washes and cytoplasm clutter make patches bluer and flatter
    # than real tissue. Off by default: measured, the model segmented real tiles worse (docs/experiments.md).
    match_texture_colour: bool = False
    # Lay nuclei, washes and cytoplasm onto the background as stain does (Beer-Lambert): blend optical densities,
    # so a partly opaque nucleus over pink stroma darkens it towards purple, instead of mixing the two
    # colours' intensities (which gives paler, greyer mixtures than stained tissue has). Off by default:
    # measured, the discriminator found the patches less real and the model tied (docs/experiments.md).
    absorbance_blend: bool = False
    shard_size: int = 128
    real_per_texture: int = 1   # crops of each texture into real.npz, the discriminator's real class
    seed: int = 0
    workers: int = 1


def star_polygon(rng: np.random.Generator, radius: float, n_vertices: int, irregularity: float,
                 spikiness: float) -> np.ndarray:
    """Random star-shaped polygon around the origin, ``(n, 2)`` array of ``(x, y)``.

    Angular steps are jittered by ``irregularity`` and radii by ``spikiness`` (both as fractions).
    """
    steps = rng.uniform(1 - irregularity, 1 + irregularity, n_vertices)
    angles = np.cumsum(steps / steps.sum() * 2 * np.pi) + rng.uniform(0, 2 * np.pi)
    radii = np.clip(rng.normal(radius, spikiness * radius, n_vertices), 0.3 * radius, 1.7 * radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def smooth_outline(points: np.ndarray, iterations: int = 2) -> np.ndarray:
    """Chaikin corner cutting of a closed polygon: rounded like a real nuclear membrane, not faceted."""
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0)
        points = np.stack([0.75 * points + 0.25 * nxt, 0.25 * points + 0.75 * nxt], axis=1).reshape(-1, 2)
    return points


def warp(points: np.ndarray, elongation: float, angle: float) -> np.ndarray:
    """Stretch points by ``elongation`` along direction ``angle`` (area-preserving)."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    scale = np.diag([math.sqrt(elongation), 1 / math.sqrt(elongation)])
    return points @ (rot @ scale @ rot.T).T


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (colour deconvolution, Ruifrok & Johnston), float32 >= 0."""
    return np.clip(rgb2hed(rgb)[..., 0], 0, None).astype(np.float32)


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are stained tissue (not glass/lumen): saturation above a low threshold."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    return cv2.medianBlur((sat > 20).astype(np.uint8), 5) > 0


def nuclear_pixels(rgb: np.ndarray, hema: np.ndarray | None = None) -> np.ndarray:
    """Strongly hematoxylin-stained pixels (candidate real nuclei) of a texture."""
    from skimage.filters import threshold_otsu

    hema = hematoxylin_od(rgb) if hema is None else hema
    dark = 255 - cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # Otsu on H catches pale and dense nuclei; the percentile rule catches few, very dark ones when
    # Otsu splits at a high value.
    otsu = max(0.02, 0.9 * float(threshold_otsu(hema))) if hema.max() > hema.min() else np.inf
    relative = (hema >= max(0.02, float(np.percentile(hema, 85)))) & (dark > np.percentile(dark, 70))
    return (hema > otsu) | relative


def remove_nuclei(rgb: np.ndarray, nuclei: np.ndarray, mpp: float,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Background texture: the image with its (candidate) nuclei inpainted away (OpenCV Telea).

    With ``rng`` the holes also get fine texture copied from elsewhere in the image
    (:func:`add_texture_detail`) instead of staying smooth smears.
    """
    # Dilate past the stained rim: faint remnants of real nuclei in the background would be labelled
    # background and teach the network to ignore pale nuclei.
    radius = max(1, round(1.0 / mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
    mask = cv2.dilate(nuclei.astype(np.uint8), kernel)
    smooth = cv2.inpaint(rgb, mask, max(3, radius * 2), cv2.INPAINT_TELEA)
    if rng is None:
        return smooth
    return add_texture_detail(smooth, rgb, mask > 0, rng, sigma=1.5 / mpp, block=round(12.0 / mpp))


def add_texture_detail(smooth: np.ndarray, rgb: np.ndarray, holes: np.ndarray, rng: np.random.Generator,
                       sigma: float, block: int, tries: int = 40) -> np.ndarray:
    """Give inpainted holes the fine texture of the rest of the image.

    The detail of ``rgb`` (itself minus its local mean over non-hole pixels, Gaussian ``sigma`` px) is
    copied, one hole (or ``block``-px piece of a large hole) at a time, from a randomly shifted place
    whose pixels are not holes, and added to ``smooth`` (the inpainted image), which keeps the colour.

    Parameters
    ----------
    smooth : ndarray (H, W, 3) uint8
        Inpainted image.
    rgb : ndarray (H, W, 3) uint8
        The original image the detail is taken from.
    holes : ndarray (H, W) bool
        Inpainted pixels.
    rng : numpy.random.Generator
    sigma : float
        Scale (px) separating colour (kept from ``smooth``) from detail (copied).
    block : int
        Largest piece (px) of a hole that is filled from one place.
    tries : int
        Shifts tried per piece; the one with the fewest hole pixels under it is used.

    Returns
    -------
    ndarray (H, W, 3) uint8
    """
    h, w = holes.shape
    valid = (~holes).astype(np.float32)
    weight = cv2.GaussianBlur(valid, (0, 0), sigma)
    local_mean = cv2.GaussianBlur(rgb.astype(np.float32) * valid[..., None], (0, 0), sigma)
    detail = rgb.astype(np.float32) - local_mean / np.maximum(weight, 1e-3)[..., None]
    out = smooth.astype(np.float32)
    n, components, boxes, _ = cv2.connectedComponentsWithStats(holes.astype(np.uint8), connectivity=8)
    for i in range(1, n):
        x, y, bw, bh = boxes[i, :4]
        for y0 in range(y, y + bh, block):
            for x0 in range(x, x + bw, block):
                ph, pw = min(block, y + bh - y0), min(block, x + bw - x0)
                piece = components[y0:y0 + ph, x0:x0 + pw] == i
                if not piece.any() or ph >= h or pw >= w:
                    continue
                sy, sx = _least_covered_shift(holes, piece, rng, tries)
                take = piece & ~holes[sy:sy + ph, sx:sx + pw]
                out[y0:y0 + ph, x0:x0 + pw][take] += detail[sy:sy + ph, sx:sx + pw][take]
    return np.clip(out, 0, 255).round().astype(np.uint8)


def _least_covered_shift(holes: np.ndarray, piece: np.ndarray, rng, tries: int) -> tuple[int, int]:
    """Of ``tries`` random places for ``piece``, the first with no ``holes`` under it, else the least covered."""
    (h, w), (ph, pw) = holes.shape, piece.shape
    best, best_bad = (0, 0), np.inf
    for _ in range(tries):
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        bad = int(holes[sy:sy + ph, sx:sx + pw][piece].sum())
        if bad < best_bad:
            best, best_bad = (sy, sx), bad
            if bad == 0:
                break
    return best


def isolated_nuclei(rgb: np.ndarray, hema: np.ndarray, nuclei: np.ndarray, mpp: float,
                    area_um2: tuple[float, float] = (8.0, 150.0), min_solidity: float = 0.93,
                    min_contrast: float = 0.05) -> list[tuple[np.ndarray, np.ndarray]]:
    """Real nuclei of a texture that can be moved whole: ``(mask, rgb)`` crops, one per nucleus.

    Candidates are the components of ``nuclei`` (:func:`nuclear_pixels`, holes filled) with nothing else
    within 1 µm and clear of the image border (a cut nucleus is not a whole one). Each is trimmed to
    where its smoothed hematoxylin ``hema`` is above half-way between its interior (75th percentile) and
    the 1 µm ring around it: ``nuclei`` is a loose detection that takes in a halo of cytoplasm, and a
    label larger than the dark nucleus teaches the network to grow nuclei into their surroundings. Kept
    when the trimmed mask is inside ``area_um2``, convex (solidity ≥ ``min_solidity``: two touching
    nuclei make a waisted, less solid component) and at least ``min_contrast`` OD darker than its ring
    (paler blobs are more likely cytoplasm). The mask is what gets pasted and labelled.
    """
    from scipy import ndimage as ndi

    mask = cv2.morphologyEx(nuclei.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    mask = ndi.binary_fill_holes(mask).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    smooth = cv2.GaussianBlur(hema.astype(np.float32), (0, 0), max(0.5, 0.25 / mpp))
    h, w = mask.shape
    pad = max(2, round(1.0 / mpp))
    ring_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pad + 1,) * 2)
    lo, hi = area_um2[0] / mpp**2, area_um2[1] / mpp**2
    found = []
    for k in range(1, n):
        x, y, bw, bh, area = stats[k]
        if area < lo or x < pad or y < pad or x + bw + pad > w or y + bh + pad > h:
            continue
        window = (slice(y - pad, y + bh + pad), slice(x - pad, x + bw + pad))
        comp = labels[window] == k
        ring = (cv2.dilate(comp.astype(np.uint8), ring_kernel) > 0) & ~comp
        if (labels[window][ring] > 0).any():  # a neighbour within 1 µm: not isolated
            continue
        values = smooth[window]
        inner, outer = np.percentile(values[comp], 75), np.median(values[ring])
        if inner - outer < min_contrast:
            continue
        trimmed = ndi.binary_fill_holes(comp & (values > (inner + outer) / 2)).astype(np.uint8)
        count, parts, part_stats, _ = cv2.connectedComponentsWithStats(trimmed, connectivity=8)
        if count < 2:
            continue
        trimmed = parts == 1 + int(np.argmax(part_stats[1:, cv2.CC_STAT_AREA]))
        if not lo <= trimmed.sum() <= hi:
            continue
        contours, _ = cv2.findContours(trimmed.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        outline = contours[0]
        hull = cv2.contourArea(cv2.convexHull(outline))
        if hull <= 0 or cv2.contourArea(outline) / hull < min_solidity:
            continue
        tx, ty, tw, th = cv2.boundingRect(outline)
        crop = (slice(ty, ty + th), slice(tx, tx + tw))
        found.append((trimmed[crop].copy(), rgb[window][crop].copy()))
    return found


def texture_stats(rgb: np.ndarray, mpp: float, real_nucleus_um2: tuple[float, float] | None = None,
                  fill_rng: np.random.Generator | None = None) -> dict:
    """Background, nuclear colour and hematoxylin mass of a real texture; with ``real_nucleus_um2`` also
    its :func:`isolated_nuclei` of that area range (``"real_nuclei"``); with ``fill_rng`` a textured
    background (:func:`remove_nuclei`)."""
    hema = hematoxylin_od(rgb)
    nuclei = nuclear_pixels(rgb, hema)
    tissue = tissue_pixels(rgb)
    if nuclei.sum() > 50:
        colour = np.median(rgb[nuclei].astype(np.float64), axis=0)
    else:
        colour = DEFAULT_NUCLEUS_RGB
    # Blend towards a canonical nuclear colour so pale or mis-stained sources stay plausible.
    colour = 0.7 * colour + 0.3 * DEFAULT_NUCLEUS_RGB
    h_mass = float((hema[tissue] > 0.12).mean()) if tissue.any() else 0.0
    nuclear_fraction = float(nuclei[tissue].mean()) if tissue.any() else 0.0
    real = isolated_nuclei(rgb, hema, nuclei, mpp, real_nucleus_um2) if real_nucleus_um2 else []
    return {"background": remove_nuclei(rgb, nuclei, mpp, fill_rng), "colour": colour, "tissue": tissue,
            "h_mass": h_mass, "nuclear_fraction": nuclear_fraction, "real_nuclei": real}


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def draw_nuclei(background: np.ndarray, tissue: np.ndarray, colour: np.ndarray, coverage: float,
                rng: np.random.Generator, params: SynthParams,
                real_nuclei: list[tuple[np.ndarray, np.ndarray]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Composite random nuclei onto ``background`` where ``tissue`` is true.

    With ``real_nuclei`` (:func:`isolated_nuclei` of the same texture) a ``params.real_nuclei_fraction``
    share of the nuclei are those real ones, turned and flipped at random, instead of polygons.

    Returns
    -------
    image : ndarray (H, W, 3) uint8
    instances : ndarray (H, W) int32, 0 = background, labels 1..n in drawing order
    """
    h, w = background.shape[:2]
    px = 1.0 / params.mpp
    large = rng.random() < params.large_fraction
    bias = rng.uniform(*(params.large_size_bias if large else params.size_bias))
    # Large carcinoma nuclei are mostly vesicular: open chromatin, a nucleolus, a dark membrane.
    vesicular_fraction = max(params.vesicular_fraction, 0.8) if large else params.vesicular_fraction
    if large and params.large_coverage[1] > 0:  # drawn only when asked for: the random stream stays as before
        coverage = rng.uniform(*params.large_coverage)
    elong = rng.uniform(*params.elongation)
    theta = rng.uniform(0, np.pi)
    mean_area = np.pi * (np.mean(params.radius_um) * bias * px) ** 2
    if real_nuclei and params.real_nuclei_fraction > 0:  # the count that gives ``coverage`` with both kinds
        real_area = np.mean([mask.sum() for mask, _ in real_nuclei])
        mean_area += params.real_nuclei_fraction * (real_area - mean_area)
    target = int(rng.poisson(coverage * tissue.sum() / mean_area))
    image = background.astype(np.float32)
    instances = np.zeros((h, w), np.int32)
    occupied = np.zeros((h, w), bool)
    label, tries = 0, 0
    placed = []  # (y, x, radius) of the drawn polygons, for clustered placement
    tissue_yx = np.argwhere(tissue)
    if len(tissue_yx) == 0:
        return background.copy(), instances
    if rng.random() < params.wash_probability:
        _wash(image, tissue, colour, rng, px, params.absorbance_blend)
    for _ in range(int(rng.integers(params.cytoplasm_per_patch[0], params.cytoplasm_per_patch[1] + 1))):
        _draw_cytoplasm(image, tissue, colour, rng, px, params.absorbance_blend)
    while label < target and tries < target * 10 + 50:  # dense tiles need many placements to reach the target
        tries += 1
        # The draw for a real nucleus only happens when there are some: without them the random stream,
        # and so every patch, is the same as before this option existed.
        real = real_nuclei[rng.integers(len(real_nuclei))] if (
            real_nuclei and rng.random() < params.real_nuclei_fraction) else None
        if real is not None:
            mask, pixels = _turned(*real, rng)
            cy, cx = tissue_yx[rng.integers(len(tissue_yx))]
            mask, pixels, (y0, x0) = _clipped(mask, pixels, cy - mask.shape[0] // 2, cx - mask.shape[1] // 2, h, w)
        else:
            r = rng.uniform(*params.radius_um) * bias * px
            poly = star_polygon(rng, r, int(rng.integers(params.vertices[0], params.vertices[1] + 1)),
                                params.irregularity, params.spikiness)
            poly = smooth_outline(warp(poly, elong * rng.uniform(0.85, 1.15), theta + rng.normal(0, 0.35)))
            cy, cx = tissue_yx[rng.integers(len(tissue_yx))] + rng.uniform(-0.5, 0.5, 2)
            # Drawn only when asked for, so that without clusters the random stream is as before.
            if placed and params.cluster_fraction > 0 and rng.random() < params.cluster_fraction:
                by, bx = _beside(placed[rng.integers(len(placed))], r, elong, rng)
                if 0 <= by < h and 0 <= bx < w and tissue[int(by), int(bx)]:
                    cy, cx = by, bx
            mask, (y0, x0) = _raster(poly + (cx, cy), h, w)
        if mask is None or mask.sum() < 4:
            continue
        region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        if (occupied[region] & mask).sum() > params.max_overlap * mask.sum():
            continue
        label += 1
        if real is not None:
            _paste(image, mask, region, pixels)
        else:
            vesicular = rng.random() < vesicular_fraction
            # Drawn only when asked for, so that without pale nuclei the random stream is as before.
            pale = not vesicular and params.pale_fraction > 0 and rng.random() < params.pale_fraction
            crisp = vesicular and params.crisp_vesicular > 0 and rng.random() < params.crisp_vesicular
            _composite(image, mask, region, colour, rng, px, alpha_range=(0.35, 0.6) if pale else (0.7, 0.95),
                       vesicular="crisp" if crisp else vesicular, clearing=params.vesicular_clearing,
                       absorbance=params.absorbance_blend)
        instances[region][mask] = label
        occupied[region] |= mask
        if real is None:
            placed.append((cy, cx, r))
    for _ in range(int(rng.integers(params.distractors_per_patch[0], params.distractors_per_patch[1] + 1))):
        r = rng.uniform(*params.radius_um) * px * rng.uniform(0.8, 1.6)
        poly = warp(star_polygon(rng, r, 12, 0.3, 0.1), rng.uniform(1, 2), rng.uniform(0, np.pi))
        mask, (y0, x0) = _raster(poly + rng.uniform(0, (w, h)), h, w)
        if mask is not None:
            region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            _composite(image, mask, region, colour, rng, px, alpha_range=(0.08, 0.18), rim=2.0,
                       absorbance=params.absorbance_blend)
    for _ in range(int(rng.integers(params.debris_per_patch[0], params.debris_per_patch[1] + 1))):
        r = rng.uniform(0.4, 1.0) * px
        mask, (y0, x0) = _raster(star_polygon(rng, r, 7, 0.5, 0.3) + rng.uniform(0, (w, h)), h, w)
        if mask is not None:
            region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            _composite(image, mask, region, colour * rng.uniform(0.8, 1.1), rng, px, alpha_range=(0.25, 0.55),
                       absorbance=params.absorbance_blend)
    # Optical blur and sensor noise, as in a scanned slide; a sharp 40x scan has next to no blur.
    sigma = rng.uniform(0.2, 0.9)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += rng.normal(0, rng.uniform(1.0, 3.0), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), instances


def _beside(nucleus: tuple[float, float, float], radius: float, elongation: float,
            rng: np.random.Generator) -> tuple[float, float]:
    """A centre for a nucleus of ``radius`` touching ``nucleus`` ``(y, x, radius)`` in a random direction.

    The patch's nuclei share one elongation; their centres are set apart by the mean of the long and short
    radii, so elongated neighbours touch rather than leave a gap or overlap beyond ``max_overlap``.
    """
    y, x, r0 = nucleus
    angle = rng.uniform(0, 2 * np.pi)
    reach = (r0 + radius) * (1 + elongation) / (2 * np.sqrt(elongation)) * rng.uniform(0.75, 0.95)
    return y + reach * np.sin(angle), x + reach * np.cos(angle)


def _draw_cytoplasm(image, tissue, colour, rng, px, absorbance: bool = False) -> None:
    """One soft-edged region of basophilic cytoplasm (radius 5-15 µm), drawn in place, unlabelled.

    Inpainting removes everything hematoxylin-dark from the backgrounds, so without these the network
    learns "dark purple = nucleus" and segments purple cytoplasm of real tissue; here darkness alone
    is not a nucleus, its sharp rim, shape and chromatin are.
    """
    h, w = tissue.shape
    poly = warp(star_polygon(rng, rng.uniform(5, 15) * px, 16, 0.5, 0.3), rng.uniform(1, 3), rng.uniform(0, np.pi))
    mask = np.zeros((h, w), np.uint8)  # the whole canvas: a blur inside the bounding box would cut it square
    cv2.fillPoly(mask, [np.round(poly + rng.uniform(0, (w, h))).astype(np.int32)], 1)
    alpha = cv2.GaussianBlur((mask & tissue).astype(np.float32), (0, 0), rng.uniform(0.5, 2.0) * px)
    alpha *= rng.uniform(0.3, 0.65)
    granules = _smooth_noise(rng, (h, w), max(0.6, 0.4 * px))
    tone = np.minimum(colour * rng.uniform(1.0, 1.35) + rng.normal(0, 6, 3), 255)
    image[:] = blend(image, tone * (1 + 0.06 * granules[..., None]), alpha[..., None], absorbance)


def _wash(image, tissue, colour, rng, px, absorbance: bool = False) -> None:
    """A patchy hematoxylin cast over all the tissue, in place: strongly stained or basophilic sections
    where cytoplasm and stroma are purple too and nuclei stand out only by being darker still."""
    patchy = 0.65 + 0.35 * np.tanh(_smooth_noise(rng, tissue.shape, 8 * px))  # ~10 µm blotches
    alpha = cv2.GaussianBlur(tissue.astype(np.float32), (0, 0), px) * patchy * rng.uniform(0.25, 0.65)
    tone = np.minimum(colour * rng.uniform(1.05, 1.4), 255)
    image[:] = blend(image, tone, alpha[..., None], absorbance)


def _turned(mask: np.ndarray, pixels: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """A random quarter turn and flip of a real nucleus (exact: no resampling of its chromatin)."""
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    mask, pixels = np.rot90(mask, k), np.rot90(pixels, k)
    return (mask[:, ::-1], pixels[:, ::-1]) if flip else (mask, pixels)


def _clipped(mask, pixels, y0: int, x0: int, h: int, w: int):
    """Clip a crop placed at ``(y0, x0)`` to an ``h`` × ``w`` canvas: (mask or None, pixels, (y0, x0))."""
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y0 + mask.shape[0], h), min(x0 + mask.shape[1], w)
    if cy1 <= cy0 or cx1 <= cx0:
        return None, None, (0, 0)
    sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    return mask[sl], pixels[sl], (cy0, cx0)


def _paste(image, mask, region, pixels) -> None:
    """Paste a real nucleus's pixels in place; half a pixel of feathering so its cut edge is not a step."""
    alpha = np.maximum(cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.5), mask)[..., None]
    image[region] = image[region] * (1 - alpha) + pixels.astype(np.float32) * alpha


def _raster(poly: np.ndarray, h: int, w: int):
    """Rasterise a polygon into its clipped bounding box: (bool mask, (y0, x0)) or (None, ...)."""
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None, (0, 0)
    canvas = np.zeros((cy1 - cy0, cx1 - cx0), np.uint8)
    pts = np.round((poly - (cx0, cy0)) * 16).astype(np.int32)  # 4 fractional bits
    cv2.fillPoly(canvas, [pts], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool), (cy0, cx0)


def blend(base: np.ndarray, tone: np.ndarray, alpha: np.ndarray, absorbance: bool = False) -> np.ndarray:
    """``tone`` laid over ``base`` (float RGB, 0-255) with opacity ``alpha`` (broadcastable).

    ``absorbance``: interpolate optical densities, −log(I / 255), instead of intensities: a stain layer of
    fraction ``alpha`` of the full thickness absorbs that fraction of its optical density (Beer-Lambert).
    """
    if not absorbance:
        return base * (1 - alpha) + tone * alpha
    return 255.0 * np.exp(-(_optical_density(base) * (1 - alpha) + _optical_density(tone) * alpha))


def _optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(rgb, 1.0, 255.0) / 255.0)


def _composite(image, mask, region, colour, rng, px, alpha_range, rim: float = 1.0,
               vesicular: bool | str = False, clearing: tuple[float, float] = SynthParams.vesicular_clearing,
               absorbance: bool = False) -> None:
    """Alpha-blend one nucleus with a blurred rim and chromatin texture into ``image`` in place.

    ``vesicular``: False, True (centre fading towards the middle) or ``"crisp"`` (:func:`_crisp_vesicular`).
    """
    hh, ww = mask.shape
    alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), rim * rng.uniform(0.4, 0.9))
    alpha = np.maximum(alpha, mask * 0.85) * rng.uniform(*alpha_range)
    # Chromatin: fine and coarse texture (granules and clumps, ~0.3 and ~1 µm).
    chroma = 0.6 * _smooth_noise(rng, (hh, ww), max(0.6, 0.3 * px)) + 0.4 * _smooth_noise(rng, (hh, ww), max(1.0, px))
    tone = colour * rng.uniform(0.75, 1.15) + rng.normal(0, 6, 3)
    strength = 0.12
    if vesicular == "crisp":
        alpha = _crisp_vesicular(alpha, mask, rng, px)
        strength = 0.15
    elif vesicular:  # open chromatin: pale, textured centre, dark nuclear membrane, a nucleolus or two
        dist = _depth_inside(mask)
        centre = np.clip(dist / (dist.max() + 1e-6), 0, 1)
        alpha = alpha * (1 - rng.uniform(*clearing) * np.sqrt(centre))
        strength = rng.uniform(0.2, 0.35)
        ys, xs = np.nonzero(centre > 0.5)
        for _ in range(int(rng.integers(0, 3)) if len(ys) else 0):
            k = rng.integers(len(ys))
            cv2.circle(alpha, (int(xs[k]), int(ys[k])), max(1, round(rng.uniform(0.4, 0.8) * px)),
                       float(alpha_range[1]), -1)
    nucleus = tone[None, None, :] * (1 + strength * chroma[..., None])
    image[region] = blend(image[region], nucleus, alpha[..., None], absorbance)


def _depth_inside(mask: np.ndarray) -> np.ndarray:
    """Each pixel's distance to the outside of ``mask``, the edge of the crop counting as outside."""
    return cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]


def _crisp_vesicular(alpha: np.ndarray, mask: np.ndarray, rng, px: float) -> np.ndarray:
    """Opacity of a carcinoma nucleus with open chromatin: a membrane 0.35-0.7 µm wide at full opacity, a
    clear interior (opacity cut by 45-75 %), chromatin clumps (~0.7 µm) and one or two nucleoli (0.5-1 µm)."""
    dist = _depth_inside(mask)
    membrane = dist <= max(1.0, rng.uniform(0.35, 0.7) * px)
    full = float(alpha.max())
    opacity = np.where(membrane, alpha, alpha * (1 - rng.uniform(0.45, 0.75)))
    specks = _smooth_noise(rng, mask.shape, max(0.7, 0.35 * px)) > rng.uniform(0.6, 1.2)
    opacity = np.where(specks & mask & ~membrane, np.maximum(opacity, 0.75 * full), opacity)
    ys, xs = np.nonzero(dist > 0.35 * dist.max())
    for _ in range(int(rng.integers(1, 3)) if len(ys) else 0):
        k = rng.integers(len(ys))
        cv2.circle(opacity, (int(xs[k]), int(ys[k])), max(1, round(rng.uniform(0.25, 0.5) * px)), full, -1)
    return cv2.GaussianBlur(opacity, (0, 0), 0.5)


def boundary_map(instances: np.ndarray) -> np.ndarray:
    """Inner boundaries of all instances (uint8 0/1), the target that separates touching nuclei."""
    return find_boundaries(instances, mode="inner").astype(np.uint8)


def make_patch(texture: np.ndarray, seed: int, params: SynthParams, source_mpp: float | None = None) -> dict:
    """One synthetic patch from a real texture (already at ``params.mpp``), deterministic in ``seed``.

    ``source_mpp`` is the texture's own pixel size before resampling (used by
    ``params.match_source_resolution``).
    """
    rng = np.random.default_rng(seed)
    texture = _random_crop(texture, params.patch_size, rng)
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    texture = np.ascontiguousarray(np.rot90(texture, int(rng.integers(4))))
    # The fill has its own random stream, so a patch's nuclei are the same with and without it.
    stats = texture_stats(texture, params.mpp, params.real_nucleus_um2 if params.real_nuclei_fraction > 0 else None,
                          np.random.default_rng([seed, 1]) if params.textured_background else None)
    # Density from the source tile's hematoxylin mass: redraw about the nuclear area its real nuclei had.
    lo, hi = params.coverage
    coverage = float(np.clip(stats["nuclear_fraction"] * rng.uniform(0.8, 1.2), lo, hi))
    image, instances = draw_nuclei(stats["background"], stats["tissue"], stats["colour"], coverage, rng,
                                   params, stats["real_nuclei"])
    if params.match_texture_colour:
        image = match_colour(image, texture, stats["tissue"])
    if params.match_source_resolution and source_mpp is not None:
        image = at_resolution(image, source_mpp / params.mpp)
    return {"image": image, "instances": instances, "boundary": boundary_map(instances),
            "coverage": coverage}


def match_colour(image: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``image`` with the mean and standard deviation of each CIELAB channel of ``reference`` (Reinhard et
    al., 2001), both measured over ``mask`` (default: all pixels); uint8 RGB in and out.

    A per-channel affine map: what is darker or bluer than its surroundings stays so, only the overall
    colour balance and contrast move to the reference's.
    """
    if mask is None or mask.sum() < 16:
        mask = np.ones(image.shape[:2], bool)
    lab, ref = (cv2.cvtColor(x.astype(np.float32) / 255, cv2.COLOR_RGB2LAB) for x in (image, reference))
    mu, sd = lab[mask].mean(0), lab[mask].std(0) + 1e-6
    lab = (lab - mu) * (ref[mask].std(0) / sd) + ref[mask].mean(0)
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255, 0, 255).round().astype(np.uint8)


def at_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """``image`` as if scanned ``factor`` times coarser and resampled back to its own grid (same shape)."""
    if factor < 1.2:
        return image
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _random_crop(image: np.ndarray, size: int, rng) -> np.ndarray:
    h, w = image.shape[:2]
    if h < size or w < size:
        image = cv2.resize(image, (max(w, size), max(h, size)), interpolation=cv2.INTER_LINEAR)
        h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return image[y:y + size, x:x + size]


def load_textures(patch_files: list[str | os.PathLike], texture_dirs: list[dict] | None,
                  mpp: float, with_mpp: bool = False):
    """Real textures at ``mpp``: patches written by the tissue stage plus images of folders.

    ``texture_dirs`` entries are ``{"path": DIR, "mpp": float}``; images (PNG/JPEG/TIFF) are resampled
    from their ``mpp`` to the working resolution. Returns the list of textures, or with ``with_mpp``
    ``(textures, source_mpps)``: each texture's pixel size before resampling.
    """
    textures: list[np.ndarray] = []
    source_mpps: list[float] = []
    for f in patch_files:
        with np.load(f) as data:
            arr = data["patches"]
            src_mpp = float(data["mpp"]) if "mpp" in data else mpp
            scan_mpp = float(data["scan_mpp"]) if "scan_mpp" in data else src_mpp  # the tissue stage's, ≥ mpp
        for patch in arr:
            textures.append(_resample(patch, src_mpp, mpp))
            source_mpps.append(scan_mpp)
    for entry in texture_dirs or []:
        root = Path(entry["path"])
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff"})
        if not files:
            raise FileNotFoundError(f"texture folder {root} holds no PNG/JPEG/TIFF images")
        for p in files:
            img = _read_rgb(p)
            if img is None:
                log.warning("texture %s: unreadable or not an 8-bit colour or grey image, skipped", p)
                continue
            textures.append(_resample(img, float(entry["mpp"]), mpp))
            source_mpps.append(float(entry["mpp"]))
    return (textures, source_mpps) if with_mpp else textures


def _read_rgb(path: Path) -> np.ndarray | None:
    """RGB uint8 texture, or None where the file cannot be read or is not an 8-bit colour or grey image
    (16-bit or float files are not brightfield scans as stored)."""
    try:
        pixels = io.read_pixels(path)
        return io.as_rgb8(pixels) if pixels.dtype == np.uint8 else None
    except Exception:  # noqa: BLE001 - any decoding failure means: not a usable texture
        return None


def _resample(image: np.ndarray, src_mpp: float, dst_mpp: float) -> np.ndarray:
    if abs(src_mpp - dst_mpp) / dst_mpp < 0.02:
        return image
    f = src_mpp / dst_mpp
    size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA)


def _make_shard(args) -> dict:
    textures, source_mpps, start, count, params = args
    images, instances, boundaries = [], [], []
    for i in range(start, start + count):
        seed = params.seed * 1_000_003 + i
        k = np.random.default_rng(seed).integers(len(textures))
        patch = make_patch(textures[k], seed, params, source_mpps[k] if source_mpps else None)
        images.append(patch["image"])
        instances.append(patch["instances"].astype(np.uint16))
        boundaries.append(patch["boundary"])
    return {"image": np.stack(images), "instances": np.stack(instances), "boundary": np.stack(boundaries)}


def generate_dataset(textures: list[np.ndarray], out_dir, params: SynthParams,
                     real_patches: np.ndarray | None = None, progress: bool = True,
                     source_mpps: list[float] | None = None) -> dict:
    """Generate ``params.n_patches`` synthetic patches into shards under ``out_dir``.

    ``source_mpps`` (one per texture, :func:`load_textures` ``with_mpp``) are the textures' own pixel
    sizes, for ``params.match_source_resolution``.

    Writes ``shard-XXXXX.npz`` (``image`` uint8 NHWC, ``instances`` uint16, ``boundary`` uint8),
    ``real.npz`` (real patches for the discriminator) and ``params.json`` last, listing the shards.
    The result depends only on the textures and ``params`` (each patch has its own seed), not on the
    number of workers.
    """
    if not textures:
        raise ValueError("no real textures to draw on: every slide of the cohort failed tissue detection?")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, start = [], 0
    while start < params.n_patches:
        count = min(params.shard_size, params.n_patches - start)
        jobs.append((textures, source_mpps, start, count, params))
        start += count
    shards = []
    from tqdm import tqdm

    bar = tqdm(total=params.n_patches, desc="synth", unit="patch", disable=not progress)
    with ProcessPoolExecutor(max_workers=max(1, params.workers)) if params.workers > 1 else _Serial() as pool:
        for k, shard in enumerate(pool.map(_make_shard, jobs)):
            name = f"shard-{k:05d}.npz"
            io.write_npz(out_dir / name, **shard)
            shards.append({"file": name, "count": int(len(shard["image"]))})
            bar.update(len(shard["image"]))
    bar.close()
    if real_patches is None:
        real_patches = real_crops(textures, params.patch_size, params.real_per_texture)
    io.write_npz(out_dir / "real.npz", patches=real_patches)
    meta = {"params": asdict(params), "shards": shards, "n_patches": params.n_patches,
            "n_textures": len(textures), "n_real": int(len(real_patches))}
    io.write_json(out_dir / "params.json", meta)
    return meta


def real_crops(textures: list[np.ndarray], size: int, per_texture: int = 1) -> np.ndarray:
    """Random ``size`` crops of real textures: ``per_texture`` from each texture larger than ``size``, one from
    the others (more would be copies). The discriminator's real class: more distinct crops, less to memorise."""
    crops = []
    for k in range(max(1, per_texture)):
        for i, t in enumerate(textures):
            if k == 0 or min(t.shape[:2]) > size:
                crops.append(_random_crop(t, size, np.random.default_rng(i + k * len(textures))))
    return np.stack(crops)


class _Serial:
    """Stand-in for a process pool when ``workers == 1`` (keeps tracebacks simple)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def contact_sheet(*rows: np.ndarray, n: int = 8) -> np.ndarray:
    """One row of ``n`` patches per argument (e.g. synthetic above real), RGB uint8.

    Patches are resized to the first row's patch size; short rows are padded white, empty rows left out.
    """
    size = rows[0].shape[1]

    def row(arr):
        arr = [a if a.shape[:2] == (size, size) else cv2.resize(a, (size, size)) for a in arr[:n]]
        return np.concatenate(arr + [np.full((size, size, 3), 255, np.uint8)] * (n - len(arr)), axis=1)

    return np.concatenate([row(r) for r in rows if len(r)], axis=0)
