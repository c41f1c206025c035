"""From image regions to nucleus instances: the network, test-time augmentation, the hematoxylin gate and
instance extraction, in one place.

Whole-slide inference (``nucseg segment``), evaluation on annotated tiles, QC's agreement check and the
self-training's pseudo-labels all segment through these functions, so a change to the gate or to the
extraction reaches all four. Whole-slide inference runs the network and the extraction in different
threads or processes; it calls :func:`image_instances` on the network's output.
"""

from __future__ import annotations

import numpy as np

from .instances import InstanceParams, extract_instances, hematoxylin_gate
from .model import DIHEDRAL, predict, predict_views
from .stain import hematoxylin_od


def image_instances(image: np.ndarray, prob: np.ndarray, mpp: float, params: InstanceParams = InstanceParams(),
                    level: float | None = None, hematoxylin: np.ndarray | None = None) -> np.ndarray:
    """Instance map of ``image`` from the network's probabilities ``prob`` ``(C, H, W)`` on it.

    Parameters
    ----------
    image : ndarray (H, W, 3) uint8
        The region at ``mpp``, the model's working resolution.
    params : InstanceParams
        Extraction; with ``params.hematoxylin_gate`` the foreground is gated by the image's hematoxylin
        (:func:`nucseg.instances.hematoxylin_gate`).
    level : float, optional
        The gate's hematoxylin level (a whole slide's, so the nuclei do not depend on the tiling); None:
        the image's own Otsu level.
    hematoxylin : ndarray (H, W), optional
        ``hematoxylin_od(image)`` when the caller has it already.

    Returns
    -------
    ndarray (H, W) int32, 0 = background, 1..n instances (:func:`nucseg.instances.extract_instances`).
    """
    gate = None
    if params.hematoxylin_gate:
        hema = hematoxylin_od(image) if hematoxylin is None else hematoxylin
        gate = hematoxylin_gate(hema, mpp, level)
    return extract_instances(prob, mpp, params, gate=gate)


def segment_images(model, images: np.ndarray, device, mpp: float, params: InstanceParams = InstanceParams(),
                   tta: int = 1, level: float | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """The network's probabilities on NHWC uint8 ``images`` (averaged over ``tta`` dihedral views,
    :func:`nucseg.model.predict`) and each image's instance map (:func:`image_instances`).

    Returns
    -------
    probs : ndarray (N, C, H, W) float32
    labels : list of ndarray (H, W) int32
    """
    probs = predict(model, images, device, tta)
    return probs, [image_instances(image, prob, mpp, params, level) for image, prob in zip(images, probs, strict=True)]


def view_probabilities(model, images: np.ndarray, device, n_views: int = 4, batch_size: int = 8) -> np.ndarray:
    """Probabilities of NHWC uint8 images under each of ``n_views`` dihedral transforms, mapped back (not
    averaged: QC compares the instances of each view).

    Returns
    -------
    ndarray (N, K, C, H, W) float32, C the model's outputs
    """
    n_views = int(np.clip(n_views, 1, len(DIHEDRAL)))
    return np.concatenate([np.stack(list(predict_views(model, images[start:start + batch_size], device, n_views)),
                                    axis=1)
                           for start in range(0, len(images), batch_size)])
