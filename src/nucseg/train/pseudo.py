"""Pseudo-labels for self-training: the instances the network finds on unlabelled real tissue, as targets.

No manual label is involved: the real patches are the discriminator's unlabelled real class (``real.npz``)
and the targets are what the network, trained on synthetic data, finds in them.
"""

from __future__ import annotations

import numpy as np
import torch

from ..inference import segment_images
from ..instances import InstanceParams, boundary_map
from ..model import UNet


def pseudo_targets(prob: np.ndarray, labels: np.ndarray, band: tuple[float, float] = (0.3, 0.7)) -> np.ndarray:
    """Training targets from an instance map, with a mask of the pixels to learn from.

    Parameters
    ----------
    prob : (C, H, W) float array, the network's probabilities (channel 0 the foreground).
    labels : (H, W) int array, the instances extracted from ``prob``.
    band : foreground probabilities strictly inside ``(low, high)`` are too uncertain to teach.

    Returns
    -------
    (3, H, W) float32: foreground, boundary, then the mask of valid pixels. A pixel is valid when its
    foreground probability is outside ``band`` and agrees with the instance map (pixels the instance
    extraction dropped, e.g. too small or outside the hematoxylin gate, are left out).
    """
    fg = labels > 0
    uncertain = (prob[0] > band[0]) & (prob[0] < band[1])
    valid = ~uncertain & (fg == (prob[0] > 0.5))
    return np.stack([fg, boundary_map(labels) > 0, valid]).astype(np.float32)


def pseudo_label(net: UNet, patches: np.ndarray, mpp: float, band: tuple[float, float] = (0.3, 0.7),
                 tta: int = 8, params: InstanceParams = InstanceParams(hematoxylin_gate=True),
                 device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`pseudo_targets` of every uint8 NHWC patch, from ``net``'s ``tta``-view average (the labels see
    every symmetry of the patch, the training step one augmented view) through the shared inference path
    (:func:`nucseg.inference.segment_images`).

    The pseudo-labels keep the hematoxylin gate (by pixel) that made the shipped model, although
    segmentation now runs without it: a confident label is worth more than a complete one here.

    Returns
    -------
    (N, 3, H, W) float32.
    """
    device = torch.device(device)
    mode = net.training
    net.eval()
    out = []
    for patch in patches:
        probs, labels = segment_images(net, patch[None], device, mpp, params, tta)
        out.append(pseudo_targets(probs[0], labels[0], band))
    net.train(mode)
    return np.stack(out)
