"""Pseudo-labels for self-training: the instances a teacher finds on unlabelled real tissue, as targets.

No manual label is involved: the real patches are the discriminator's unlabelled real class (``real.npz``)
and the targets are what networks trained on synthetic data find in them: the network itself, or teachers
(larger networks, trained by the same pipeline) whose knowledge it is to learn.
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


def pseudo_label(teachers: list[UNet], patches: np.ndarray, mpp: float, center: bool = False,
                 band: tuple[float, float] = (0.3, 0.7), tta: int = 8, params: InstanceParams = InstanceParams(),
                 device: torch.device | str = "cpu") -> np.ndarray:
    """:func:`pseudo_targets` of every uint8 NHWC patch, from the teachers' probabilities (each one's
    ``tta``-view average, then their mean: the teacher sees every symmetry of the patch, the student one
    augmented view) and the shared instance extraction with its hematoxylin gate, as whole-slide inference
    runs it. ``center``: add the centre map (a student with the centre head).

    Returns
    -------
    (N, K + 1, H, W) float32.
    """
    device = torch.device(device)
    modes = [t.training for t in teachers]
    for t in teachers:
        t.eval()
    out = []
    for patch in patches:
        probs = [predict(t, patch[None], device, tta)[0] for t in teachers]
        channels = min(len(q) for q in probs)  # teachers with and without the centre head share two outputs
        prob = np.mean([q[:channels] for q in probs], axis=0)
        gate = hematoxylin_gate(hematoxylin_od(patch), mpp) if params.hematoxylin_gate else None
        labels = extract_instances(prob, mpp, params, gate=gate)
        out.append(pseudo_targets(prob, labels, band, center))
    for t, mode in zip(teachers, modes):
        t.train(mode)
    return np.stack(out)
