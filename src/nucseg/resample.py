"""Resampling an image from one pixel size to another (shared by synthesis, evaluation and the benchmarks)."""

from __future__ import annotations

import cv2
import numpy as np


def resample_to(image: np.ndarray, src_mpp: float, dst_mpp: float) -> np.ndarray:
    """``image`` at ``src_mpp`` µm/px resampled to ``dst_mpp`` µm/px.

    Parameters
    ----------
    image : ndarray (H, W[, C])
        The image; returned unchanged when the pixel sizes differ by less than 2 %.
    src_mpp, dst_mpp : float
        Its pixel size and the wanted one, in µm.

    Returns
    -------
    ndarray
        Bilinear when enlarging, area-averaged when shrinking (no aliasing of fine chromatin).
    """
    f = src_mpp / dst_mpp
    if abs(f - 1) < 0.02:
        return image
    size = (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f)))
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA)
