"""Pseudo-labels for self-training: the network's own instances on unlabelled real tissue as targets.

No manual label is involved: the real patches are the discriminator's unlabelled real class (``real.npz``)
and the targets are what the network trained on synthetic data finds in them.
"""

from __future__ import annotations

import numpy as np
import torch

from ..instances import InstanceParams, center_map, extract_instances, hematoxylin_gate
from ..model import UNet, predict
from ..synth import boundary_map, hematoxylin_od


def pseudo_targets(prob: np.ndarray, labels: np.ndarray, band: tuple[float, float] = (0.3, 0.7),
                   center: bool = False) -> np.ndarray:
    """Training targets from an instance map, with a mask of the pixels to learn from.

    Parameters
    ----------
    prob : (C, H, W) float array, the network's probabilities (channel 0 the foreground).
    labels : (H, W) int array, the instances extracted from ``prob``.
    band : foreground probabilities strictly inside ``(low, high)`` are too uncertain to teach.
    center : add the centre map of the instances (networks with the centre head).

    Returns
    -------
    (K + 1, H, W) float32: foreground, boundary, [centre,] then the mask of valid pixels. A pixel is valid
    when its foreground probability is outside ``band`` and agrees with the instance map (pixels the
    instance extraction dropped, e.g. too small or outside the hematoxylin gate, are left out).
    """
    fg = labels > 0
    uncertain = (prob[0] > band[0]) & (prob[0] < band[1])
    valid = ~uncertain & (fg == (prob[0] > 0.5))
    maps = [fg, boundary_map(labels) > 0] + ([center_map(labels)] if center else []) + [valid]
    return np.stack(maps).astype(np.float32)


def pseudo_label(net: UNet, patches: np.ndarray, mpp: float, band: tuple[float, float] = (0.3, 0.7),
                 tta: int = 8, params: InstanceParams = InstanceParams(),
                 device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`pseudo_targets` of every uint8 NHWC patch, from ``net``'s ``tta``-view average (the teacher
    sees every symmetry of the patch, the student one augmented view) and the shared instance extraction
    with its hematoxylin gate, as whole-slide inference runs it.

    Returns
    -------
    (N, K + 1, H, W) float32.
    """
    center = net.head.out_channels > 2
    out = []
    was_training = net.training
    net.eval()
    for patch in patches:
        prob = predict(net, patch[None], torch.device(device), tta)[0]
        gate = hematoxylin_gate(hematoxylin_od(patch), mpp) if params.hematoxylin_gate else None
        labels = extract_instances(prob, mpp, params, gate=gate)
        out.append(pseudo_targets(prob, labels, band, center))
    net.train(was_training)
    return np.stack(out)
