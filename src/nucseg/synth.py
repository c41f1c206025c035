"""Synthetic training data: random polygon nuclei drawn on real tissue textures (Hou et al., 2019).

A patch is made from a real tissue texture (a patch sampled by the tissue stage, or an image from a
folder of unlabelled H&E): its nuclei are removed by inpainting to give a background, its hematoxylin
channel sets the nuclear colour and the patch's nucleus density, and star-shaped random polygons with
rounded corners are composited onto it with blurred rims and chromatin texture (a fifth of the patches
have large, mostly vesicular carcinoma nuclei). Under the nuclei, half
the patches get a patchy hematoxylin cast over all their tissue and some get soft-edged regions of dark,
nucleus-coloured cytoplasm; faint nucleus-like distractors and small debris are drawn too. None of these
is labelled. Half of the vesicular nuclei get a crisp membrane around a cleared interior
(``crisp_vesicular``) and large-nucleus patches are packed (``large_coverage``).
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
from tqdm import tqdm

from . import io
from .instances import boundary_map
from .resample import resample_to
from .stain import hematoxylin_od, nuclear_pixels, tissue_pixels

log = logging.getLogger(__name__)

DEFAULT_NUCLEUS_RGB = np.array([95.0, 60.0, 140.0])  # typical hematoxylin-stained nucleus


@dataclass(frozen=True)
class SynthParams:
    """Generator parameters; sizes are physical (µm), images are at ``mpp`` µm/px.

    The defaults are the generator of the shipped model (``src/nucseg/weights/default.pt``).
    """

    n_patches: int = 3072
    patch_size: int = 128                          # 64 µm at 0.5 µm/px
    mpp: float = 0.5
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
    distractors_per_patch: tuple[int, int] = (0, 3)
    cytoplasm_per_patch: tuple[int, int] = (0, 4)  # dark basophilic cytoplasm: nucleus-coloured, unlabelled
    wash_probability: float = 0.5                 # share of patches whose whole tissue gets a hematoxylin cast
    vesicular_fraction: float = 0.45              # nuclei with pale, textured chromatin and a dark rim
    vesicular_clearing: tuple[float, float] = (0.35, 0.6)  # how much paler a vesicular centre is than its rim
    # Share of the vesicular nuclei drawn as real carcinoma nuclei look at 40x: a crisp membrane about half
    # a micron wide around a clear interior (cleared by 45-75 %) holding discrete chromatin clumps and
    # one or two nucleoli, instead of a centre fading gradually towards the middle (0 = none).
    crisp_vesicular: float = 0.5
    # Nuclear area fraction of the large-nucleus patches (carcinoma: packed, touching nuclei) drawn from
    # this range instead of the texture's own; (0, 0) = the texture's own.
    large_coverage: tuple[float, float] = (0.25, 0.5)
    debris_per_patch: tuple[int, int] = (0, 12)
    shard_size: int = 256
    real_per_texture: int = 1   # crops of each texture into real.npz, the discriminator's real class
    seed: int = 1
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


def remove_nuclei(rgb: np.ndarray, nuclei: np.ndarray, mpp: float) -> np.ndarray:
    """Background texture: the image with its (candidate) nuclei inpainted away (OpenCV Telea)."""
    # Dilate past the stained rim: faint remnants of real nuclei in the background would be labelled
    # background and teach the network to ignore pale nuclei.
    radius = max(1, round(1.0 / mpp))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
    mask = cv2.dilate(nuclei.astype(np.uint8), kernel)
    return cv2.inpaint(rgb, mask, max(3, radius * 2), cv2.INPAINT_TELEA)


def texture_stats(rgb: np.ndarray, mpp: float) -> dict:
    """Background (:func:`remove_nuclei`), nuclear colour, tissue mask and hematoxylin mass of a real texture."""
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
    return {"background": remove_nuclei(rgb, nuclei, mpp), "colour": colour, "tissue": tissue,
            "h_mass": h_mass, "nuclear_fraction": nuclear_fraction}


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def draw_nuclei(background: np.ndarray, tissue: np.ndarray, colour: np.ndarray, coverage: float,
                rng: np.random.Generator, params: SynthParams) -> tuple[np.ndarray, np.ndarray]:
    """Composite random nuclei onto ``background`` where ``tissue`` is true.

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
    if large and params.large_coverage[1] > 0:  # drawn only when asked for: without it the random stream is unchanged
        coverage = rng.uniform(*params.large_coverage)
    elong = rng.uniform(*params.elongation)
    theta = rng.uniform(0, np.pi)
    mean_area = np.pi * (np.mean(params.radius_um) * bias * px) ** 2
    target = int(rng.poisson(coverage * tissue.sum() / mean_area))
    image = background.astype(np.float32)
    instances = np.zeros((h, w), np.int32)
    occupied = np.zeros((h, w), bool)
    label, tries = 0, 0
    tissue_yx = np.argwhere(tissue)
    if len(tissue_yx) == 0:
        return background.copy(), instances
    if rng.random() < params.wash_probability:
        _wash(image, tissue, colour, rng, px)
    for _ in range(int(rng.integers(params.cytoplasm_per_patch[0], params.cytoplasm_per_patch[1] + 1))):
        _draw_cytoplasm(image, tissue, colour, rng, px)
    while label < target and tries < target * 10 + 50:  # dense tiles need many placements to reach the target
        tries += 1
        r = rng.uniform(*params.radius_um) * bias * px
        poly = star_polygon(rng, r, int(rng.integers(params.vertices[0], params.vertices[1] + 1)),
                            params.irregularity, params.spikiness)
        poly = smooth_outline(warp(poly, elong * rng.uniform(0.85, 1.15), theta + rng.normal(0, 0.35)))
        cy, cx = tissue_yx[rng.integers(len(tissue_yx))] + rng.uniform(-0.5, 0.5, 2)
        mask, (y0, x0) = _raster(poly + (cx, cy), h, w)
        if mask is None or mask.sum() < 4:
            continue
        region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
        if (occupied[region] & mask).sum() > params.max_overlap * mask.sum():
            continue
        label += 1
        vesicular = rng.random() < vesicular_fraction
        # Drawn only when asked for, so that without crisp nuclei the random stream is unchanged.
        crisp = vesicular and params.crisp_vesicular > 0 and rng.random() < params.crisp_vesicular
        _composite(image, mask, region, colour, rng, px, alpha_range=(0.7, 0.95),
                   vesicular="crisp" if crisp else vesicular, clearing=params.vesicular_clearing)
        instances[region][mask] = label
        occupied[region] |= mask
    _draw_clutter(image, colour, rng, px, params)
    # Optical blur and sensor noise, as in a scanned slide; a sharp 40x scan has next to no blur.
    sigma = rng.uniform(0.2, 0.9)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image += rng.normal(0, rng.uniform(1.0, 3.0), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).round().astype(np.uint8), instances


def _draw_clutter(image, colour, rng, px, params: SynthParams) -> None:
    """Unlabelled faint nucleus-like distractors and small debris, drawn in place over the nuclei."""
    h, w = image.shape[:2]
    for _ in range(int(rng.integers(params.distractors_per_patch[0], params.distractors_per_patch[1] + 1))):
        r = rng.uniform(*params.radius_um) * px * rng.uniform(0.8, 1.6)
        poly = warp(star_polygon(rng, r, 12, 0.3, 0.1), rng.uniform(1, 2), rng.uniform(0, np.pi))
        mask, (y0, x0) = _raster(poly + rng.uniform(0, (w, h)), h, w)
        if mask is not None:
            region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            _composite(image, mask, region, colour, rng, px, alpha_range=(0.08, 0.18), rim=2.0)
    for _ in range(int(rng.integers(params.debris_per_patch[0], params.debris_per_patch[1] + 1))):
        r = rng.uniform(0.4, 1.0) * px
        mask, (y0, x0) = _raster(star_polygon(rng, r, 7, 0.5, 0.3) + rng.uniform(0, (w, h)), h, w)
        if mask is not None:
            region = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
            _composite(image, mask, region, colour * rng.uniform(0.8, 1.1), rng, px, alpha_range=(0.25, 0.55))


def _draw_cytoplasm(image, tissue, colour, rng, px) -> None:
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
    image[:] = blend(image, tone * (1 + 0.06 * granules[..., None]), alpha[..., None])


def _wash(image, tissue, colour, rng, px) -> None:
    """A patchy hematoxylin cast over all the tissue, in place: strongly stained or basophilic sections
    where cytoplasm and stroma are purple too and nuclei stand out only by being darker still."""
    patchy = 0.65 + 0.35 * np.tanh(_smooth_noise(rng, tissue.shape, 8 * px))  # ~10 µm blotches
    alpha = cv2.GaussianBlur(tissue.astype(np.float32), (0, 0), px) * patchy * rng.uniform(0.25, 0.65)
    tone = np.minimum(colour * rng.uniform(1.05, 1.4), 255)
    image[:] = blend(image, tone, alpha[..., None])


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


def blend(base: np.ndarray, tone: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``tone`` laid over ``base`` (float RGB, 0-255) with opacity ``alpha`` (broadcastable)."""
    return base * (1 - alpha) + tone * alpha


def _composite(image, mask, region, colour, rng, px, alpha_range, rim: float = 1.0,
               vesicular: bool | str = False, clearing: tuple[float, float] = SynthParams.vesicular_clearing) -> None:
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
    image[region] = blend(image[region], nucleus, alpha[..., None])


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


def make_patch(texture: np.ndarray, seed: int, params: SynthParams) -> dict:
    """One synthetic patch from a real texture (already at ``params.mpp``), deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    texture = _random_crop(texture, params.patch_size, rng)
    if rng.random() < 0.5:
        texture = texture[:, ::-1]
    texture = np.ascontiguousarray(np.rot90(texture, int(rng.integers(4))))
    stats = texture_stats(texture, params.mpp)
    # Density from the source tile's hematoxylin mass: redraw about the nuclear area its real nuclei had.
    lo, hi = params.coverage
    coverage = float(np.clip(stats["nuclear_fraction"] * rng.uniform(0.8, 1.2), lo, hi))
    image, instances = draw_nuclei(stats["background"], stats["tissue"], stats["colour"], coverage, rng, params)
    return {"image": image, "instances": instances, "boundary": boundary_map(instances),
            "coverage": coverage}


def _random_crop(image: np.ndarray, size: int, rng) -> np.ndarray:
    h, w = image.shape[:2]
    if h < size or w < size:
        image = cv2.resize(image, (max(w, size), max(h, size)), interpolation=cv2.INTER_LINEAR)
        h, w = image.shape[:2]
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return image[y:y + size, x:x + size]


def load_textures(patch_files: list[str | os.PathLike], texture_dirs: list[dict] | None,
                  mpp: float) -> list[np.ndarray]:
    """Real textures at ``mpp``: patches written by the tissue stage plus images of folders.

    ``texture_dirs`` entries are ``{"path": DIR, "mpp": float}``; images (PNG/JPEG/TIFF) are resampled
    from their ``mpp`` to the working resolution.
    """
    textures: list[np.ndarray] = []
    for f in patch_files:
        with np.load(f) as data:
            arr = data["patches"]
            src_mpp = float(data["mpp"]) if "mpp" in data else mpp
        textures.extend(resample_to(patch, src_mpp, mpp) for patch in arr)
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
            textures.append(resample_to(img, float(entry["mpp"]), mpp))
    return textures


def _read_rgb(path: Path) -> np.ndarray | None:
    """RGB uint8 texture, or None where the file cannot be read or is not an 8-bit colour or grey image
    (16-bit or float files are not brightfield scans as stored)."""
    try:
        pixels = io.read_pixels(path)
        return io.as_rgb8(pixels) if pixels.dtype == np.uint8 else None
    except Exception:  # noqa: BLE001 - any decoding failure means: not a usable texture
        return None


def _make_shard(args) -> dict:
    textures, start, count, params = args
    images, instances, boundaries = [], [], []
    for i in range(start, start + count):
        seed = params.seed * 1_000_003 + i
        patch = make_patch(textures[np.random.default_rng(seed).integers(len(textures))], seed, params)
        images.append(patch["image"])
        instances.append(patch["instances"].astype(np.uint16))
        boundaries.append(patch["boundary"])
    return {"image": np.stack(images), "instances": np.stack(instances), "boundary": np.stack(boundaries)}


def generate_dataset(textures: list[np.ndarray], out_dir, params: SynthParams,
                     real_patches: np.ndarray | None = None, progress: bool = True) -> dict:
    """Generate ``params.n_patches`` synthetic patches into shards under ``out_dir``.

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
        jobs.append((textures, start, count, params))
        start += count
    shards = []
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
