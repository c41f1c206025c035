"""The embedded demo cohort: small pyramidal TIFF slides made here, so the pipeline runs offline.

Each slide is a generated tissue section (stroma with fibre texture, epithelial nests, lumina, glass
around it) on which :mod:`nucseg.synth` draws nuclei; it is written as a tiled, JPEG-compressed,
pyramidal TIFF with its pixel size in the resolution tags, which tiffslide and openslide both read.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile

from .io import atomic_path
from .synth import SynthParams, draw_nuclei

GLASS = np.array([242.0, 240.0, 244.0])
STROMA = np.array([232.0, 160.0, 196.0])
EPITHELIUM = np.array([214.0, 150.0, 190.0])


def _field(rng, shape, sigma) -> np.ndarray:
    """Smooth random field in [0, 1]."""
    noise = cv2.GaussianBlur(rng.standard_normal(shape).astype(np.float32), (0, 0), sigma)
    noise -= noise.min()
    return noise / (noise.max() + 1e-6)


def tissue_section(shape: tuple[int, int], mpp: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An H&E-like section without nuclei.

    Returns
    -------
    image : (H, W, 3) uint8
    tissue : (H, W) bool, where there is tissue (not glass or lumen)
    epithelium : (H, W) bool, dense-cellular regions
    """
    h, w = shape
    um = 1.0 / mpp
    small = (max(8, h // 16), max(8, w // 16))
    blob = cv2.resize(_field(rng, small, max(small) / 6), (w, h), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:h, 0:w]
    vignette = 1 - (((yy - h / 2) / (h / 2)) ** 2 + ((xx - w / 2) / (w / 2)) ** 2) / 2
    section = (0.6 * blob + 0.6 * vignette) > 0.62
    nests = cv2.resize(_field(rng, small, max(small) / 12), (w, h), interpolation=cv2.INTER_CUBIC) > 0.6
    lumen = cv2.resize(_field(rng, small, max(small) / 20), (w, h), interpolation=cv2.INTER_CUBIC) > 0.85
    tissue = section & ~lumen
    epithelium = tissue & nests
    # Fibres: noise smeared along one direction, varying the eosin intensity.
    fibres = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=6 * um, sigmaY=0.6 * um)
    fibres = fibres / (fibres.std() + 1e-6)
    shade = _field(rng, small, 2.0)
    shade = cv2.resize(shade, (w, h), interpolation=cv2.INTER_CUBIC)[..., None]
    image = np.empty((h, w, 3), np.float32)
    image[:] = GLASS
    stroma = STROMA * (0.92 + 0.12 * shade) + 10 * fibres[..., None]
    image = np.where(tissue[..., None], stroma, image)
    image = np.where(epithelium[..., None], EPITHELIUM * (0.95 + 0.08 * shade), image)
    soft = cv2.GaussianBlur(tissue.astype(np.float32), (0, 0), 1.5)[..., None]
    image = image * soft + GLASS * (1 - soft)
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), tissue, epithelium


def demo_slide_image(shape: tuple[int, int], mpp: float, seed: int) -> np.ndarray:
    """A full demo slide image: tissue section with synthetic nuclei, dense in epithelium."""
    rng = np.random.default_rng(seed)
    image, tissue, epithelium = tissue_section(shape, mpp, rng)
    params = SynthParams(mpp=mpp, distractors_per_patch=(0, 0), debris_per_patch=(0, 0), cytoplasm_per_patch=(0, 0),
                         wash_probability=0.0, size_bias=(0.9, 1.15), large_fraction=0.0, crisp_vesicular=0.0,
                         large_coverage=(0.0, 0.0))
    colour = np.array([80.0, 50.0, 135.0])
    # Draw in 512-px windows so nuclear size and shape vary across the slide like real tissue.
    h, w = shape
    step = 512
    for y in range(0, h, step):
        for x in range(0, w, step):
            win = (slice(y, min(y + step, h)), slice(x, min(x + step, w)))
            for mask, coverage in ((epithelium[win], 0.30), (tissue[win] & ~epithelium[win], 0.06)):
                if mask.sum() < 100:
                    continue
                drawn, _ = draw_nuclei(image[win], mask, colour, coverage, rng, params)
                image[win] = drawn
    return image


def write_pyramidal_tiff(path, image: np.ndarray, mpp: float, levels: int = 3, tile: int = 256,
                         quality: int = 90) -> None:
    """Write a tiled JPEG pyramidal TIFF (levels downsampled by 4) with µm/px in resolution tags."""
    res = (1e4 / mpp, 1e4 / mpp)  # pixels per centimetre
    with atomic_path(path, suffix=".tiff") as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=False) as tif:
            level = image
            for i in range(levels):
                if i and min(level.shape[:2]) < tile:
                    break
                tif.write(level, tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                          photometric="rgb", resolution=res, resolutionunit="CENTIMETER",
                          subfiletype=1 if i else 0, metadata=None)
                level = cv2.resize(level, (level.shape[1] // 4, level.shape[0] // 4), interpolation=cv2.INTER_AREA)
                res = (res[0] / 4, res[1] / 4)


def make_demo_slide(path, width: int, height: int, mpp: float, seed: int) -> Path:
    """Generate and write one demo slide; returns its path."""
    image = demo_slide_image((height, width), mpp, seed)
    write_pyramidal_tiff(path, image, mpp)
    return Path(path)
