"""From network probabilities to nucleus instances, polygons and per-nucleus features.

One function, :func:`extract_instances`, turns the network's probabilities into an instance map;
evaluation, whole-slide inference and QC all call it, gated by :func:`hematoxylin_gate` of the same
image. All size parameters are in µm / µm².
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import find_contours
from skimage.segmentation import find_boundaries, watershed


@dataclass(frozen=True)
class InstanceParams:
    foreground_threshold: float = 0.5
    marker_threshold: float = 0.5      # two-output models: foreground minus boundary probability above it = cores
    min_marker_um2: float = 1.5
    min_area_um2: float = 6.0
    max_area_um2: float = 400.0
    min_distance_um: float = 2.0       # between the centres of two touching nuclei
    smooth_um: float = 0.25            # blur of the core distance map before its peaks are taken
    hematoxylin_gate: bool = False     # foreground only where hematoxylin is above the image's Otsu level
    gate_unit: str = "pixel"           # what the gate removes: "pixel"s below the level, or whole "nucleus"es
    center_threshold: float = 0.5      # three-output models: centre map above it = cores (training calibrates to 0.5)


def _smoothed(hematoxylin: np.ndarray, mpp: float) -> np.ndarray:
    # Over 0.5 µm, so chromatin texture does not punch holes in pale nuclei.
    return cv2.GaussianBlur(hematoxylin.astype(np.float32), (0, 0), max(0.5, 0.5 / mpp))


def hematoxylin_level(hematoxylin: list[np.ndarray], mpp: float,
                      masks: list[np.ndarray] | None = None) -> float | None:
    """Otsu level of the smoothed hematoxylin density pooled over images (e.g. windows of one slide),
    over the pixels of ``masks`` (bool, one per image; e.g. the stained tissue) when given.

    None when there is no contrast to split (then :func:`hematoxylin_gate` gates nothing).
    """
    smoothed = [_smoothed(h, mpp) for h in hematoxylin]
    if masks is not None:
        smoothed = [s[m] for s, m in zip(smoothed, masks, strict=True)]
    values = np.concatenate([s.ravel() for s in smoothed])
    if not values.size or values.max() <= values.min():
        return None
    return float(threshold_otsu(values))


# TCGA slide types (the sample sheet's ``slide_type``): DX slides are formalin-fixed, paraffin-embedded
# (FFPE); TS/BS/MS are frozen sections (top/bottom/middle of the frozen sample).
SLIDE_TYPES = ("DX", "TS", "BS", "MS")
FFPE_SLIDE_TYPES = ("DX",)
GATE_UNITS = ("pixel", "nucleus")


def gate_unit_for(slide_type: str, setting: str = "auto") -> str:
    """The hematoxylin gate's unit for a slide type: ``setting`` when it names a unit; ``"auto"``:
    ``"nucleus"`` for FFPE (DX) slides, else ``"pixel"``.

    On the network's nuclei in FFPE tissue the pixel gate cuts the pale chromatin and rims of large
    vesicular nuclei into pieces; there it only needs to remove whole false nuclei (cytoplasm or stroma
    called nucleus). In frozen sections nuclei are swollen and smeared and the network's foreground
    spills into the purple cytoplasm around them, which the pixel gate trims. Slides of unknown type get
    the pixel gate. docs/experiments.md has the measurements.
    """
    if setting == "auto":
        return "nucleus" if slide_type in FFPE_SLIDE_TYPES else "pixel"
    if setting not in GATE_UNITS:
        raise ValueError(f"gate_unit {setting!r}: auto, {' or '.join(GATE_UNITS)}")
    return setting


def hematoxylin_gate(hematoxylin: np.ndarray, mpp: float, level: float | None = None) -> np.ndarray:
    """Pixels whose hematoxylin density (an image's H channel, e.g. ``nucseg.stain.hematoxylin_od``)
    is above ``level``, by default the image's own Otsu level (:func:`hematoxylin_level`).

    Whole slides pass one level for the slide, so the result does not depend on how it is tiled.

    The network was trained on synthetic tissue; where real cytoplasm or stroma is as purple as its
    nuclei it calls them nuclei too, with high confidence. Nuclei are where hematoxylin concentrates
    *relative to the rest of the image*, whatever the stain: this per-image level (the classical
    baseline's, no parameter, no label) adapts the foreground to each image's staining.
    """
    if level is None:
        level = hematoxylin_level([hematoxylin], mpp)
    if level is None:
        return np.ones(hematoxylin.shape, bool)  # a flat image has no level to split at: gate nothing
    return _smoothed(hematoxylin, mpp) > level


def center_map(labels: np.ndarray) -> np.ndarray:
    """Training target of the centre head: each pixel's distance to its nucleus's edge over that nucleus's
    largest distance (float32 in [0, 1]; 1 on the nucleus's centre line, 0 on its edge and background).

    Normalised per nucleus, a large pale nucleus has one centre like a small dark one, and two touching
    nuclei have two, separated by zeros along their shared edge.
    """
    inside = (labels > 0) & ~find_boundaries(labels, mode="inner")
    dist = cv2.distanceTransform(inside.astype(np.uint8), cv2.DIST_L2, 5)
    peak = ndi.maximum(dist, labels, np.arange(int(labels.max()) + 1))
    peak = np.asarray(peak, np.float32)
    peak[peak == 0] = np.inf
    return (dist / peak[labels]).astype(np.float32)


def extract_instances(prob: np.ndarray, mpp: float, params: InstanceParams = InstanceParams(),
                      gate: np.ndarray | None = None) -> np.ndarray:
    """Instance map from ``prob`` ``(C, H, W)``: foreground, boundary and (C = 3) centre probabilities at ``mpp``.

    ``gate`` (bool ``(H, W)``, e.g. :func:`hematoxylin_gate` of the image; used when
    ``params.hematoxylin_gate``) limits the foreground to its pixels before holes are filled
    (``params.gate_unit`` ``"pixel"``), or keeps only the nuclei with at least half of their pixels in it
    (``"nucleus"``; see :func:`gate_unit_for`).

    The foreground mask (holes filled: pale vesicular nuclei) is cut into cores, one per nucleus, which
    are grown by watershed inside the mask. Two-output models: the cores are the foreground minus the
    predicted boundaries, split further at the peaks of their distance map at least ``min_distance_um``
    apart (in crowded real tissue the boundary head often misses the seam between touching nuclei), and
    they grow over the boundary probability. With a centre head (:func:`center_map`) the cores are where
    the centre map exceeds ``center_threshold``, they grow down the centre map, and a foreground
    component without a core is one nucleus.
    Instances smaller than ``min_area_um2`` or larger than ``max_area_um2`` are removed.

    Returns
    -------
    ndarray (H, W) int32, 0 = background, 1..n instances.
    """
    if params.gate_unit not in GATE_UNITS:
        raise ValueError(f"gate_unit {params.gate_unit!r}: one of {', '.join(GATE_UNITS)}")
    fg, bnd = prob[0], prob[1]
    gate = gate if params.hematoxylin_gate else None
    if gate is not None and params.gate_unit == "pixel":
        fg = np.where(gate, fg, 0.0)
    mask = ndi.binary_fill_holes(fg > params.foreground_threshold)
    if len(prob) > 2:
        cores = mask & (prob[2] > params.center_threshold)
        relief = -prob[2]
    else:
        cores = mask & ((fg - bnd) > params.marker_threshold)
        relief = bnd
    cores = cv2.morphologyEx(cores.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, core_labels, stats, _ = cv2.connectedComponentsWithStats(cores, connectivity=4)
    small = stats[:, cv2.CC_STAT_AREA] < params.min_marker_um2 / mpp**2
    small[0] = False
    core_labels[small[core_labels]] = 0
    if len(prob) > 2:
        markers = _with_coreless_components(core_labels, n, mask)
    else:
        markers = _split_cores(core_labels, n, mpp, params) if core_labels.max() else core_labels
    if markers.max() == 0:
        return np.zeros(fg.shape, np.int32)
    labels = watershed(relief, markers, mask=mask | (core_labels > 0)).astype(np.int32)
    areas = np.bincount(labels.ravel())
    bad = (areas < params.min_area_um2 / mpp**2) | (areas > params.max_area_um2 / mpp**2)
    if gate is not None and params.gate_unit == "nucleus":
        bad |= np.bincount(labels.ravel(), weights=gate.ravel(), minlength=len(areas)) < 0.5 * areas
    bad[0] = False
    labels[bad[labels]] = 0
    return relabel(labels)


def _with_coreless_components(core_labels: np.ndarray, n: int, mask: np.ndarray) -> np.ndarray:
    """The cores, plus each foreground component without a core as one more marker.

    Where the image is blurred the centre map stays below the threshold; the foreground still shows the
    nucleus, which is one nucleus rather than none.
    """
    components, _ = ndi.label(mask)
    has_core = np.zeros(int(components.max()) + 1, bool)
    has_core[components[core_labels > 0]] = True
    coreless = (components > 0) & ~has_core[components]
    markers = core_labels.copy()
    markers[coreless] = n + components[coreless]
    return markers


def _split_cores(core_labels: np.ndarray, n: int, mpp: float, params: InstanceParams) -> np.ndarray:
    """Markers at the peaks of the cores' distance map, plus one per core without a peak."""
    dist = ndi.distance_transform_edt(core_labels > 0).astype(np.float32)
    dist = cv2.GaussianBlur(dist, (0, 0), max(0.3, params.smooth_um / mpp))
    peaks = label_peaks(dist, core_labels, max(1, round(params.min_distance_um / mpp)))
    markers = np.zeros(core_labels.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    # A core whose distance map is flat has no peak: it still is one nucleus.
    seen = np.zeros(n, bool)
    seen[core_labels[tuple(peaks.T)]] = True
    missing = ~seen
    missing[0] = False
    orphan = missing[core_labels]
    markers[orphan] = len(peaks) + core_labels[orphan]
    return markers


def label_peaks(image: np.ndarray, labels: np.ndarray, min_distance: int) -> np.ndarray:
    """``skimage.feature.peak_local_max(image, min_distance, labels=labels, exclude_border=False)``, faster.

    The same peaks in the same order: each label's local maxima within its own pixels, in a window of
    ``2 * min_distance + 1``. skimage spaces every label's candidates with a k-d tree; most cores have one
    candidate, which needs no spacing, so only labels with several are handed to skimage.
    """
    threshold = image.min()  # peak_local_max's default threshold: the whole image's minimum
    size = 2 * min_distance + 1
    background = np.finfo(image.dtype).min if np.issubdtype(image.dtype, np.floating) else np.iinfo(image.dtype).min
    found = []
    for index, roi in enumerate(ndi.find_objects(labels)):
        if roi is None:
            continue
        inside = labels[roi] == index + 1
        crop = np.where(inside, image[roi], background)
        peak = crop == ndi.maximum_filter(crop, size=size, mode="nearest")
        candidates = peak & (crop > threshold)
        if np.all(peak[inside]) or np.count_nonzero(candidates) > 1:
            # A flat label (skimage's special case) or several candidates to space: skimage itself.
            coords = peak_local_max(image[roi], min_distance=min_distance, threshold_abs=threshold,
                                    labels=inside.astype(np.int32), exclude_border=False)
        else:
            coords = np.argwhere(candidates)
        found.append(coords + [s.start for s in roi])
    return np.vstack(found) if found else np.empty((0, 2), np.intp)


def boundary_map(instances: np.ndarray) -> np.ndarray:
    """Inner boundaries of all instances (uint8 0/1), the target that separates touching nuclei."""
    return find_boundaries(instances, mode="inner").astype(np.uint8)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 1..n keeping 0 as background."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def touching_labels(labels: np.ndarray) -> np.ndarray:
    """Sorted ids of the nuclei of instance map ``labels`` that share a pixel edge with another nucleus.

    These are the pairs the network has to separate along a seam; nuclei that only meet at a corner do not count.
    """
    ids = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1], labels[1:])):
        contact = (a != b) & (a > 0) & (b > 0)
        ids += [a[contact], b[contact]]
    return np.unique(np.concatenate(ids))


FEATURE_COLUMNS = ["centroid_x", "centroid_y", "area_px", "perimeter_px", "eccentricity", "solidity",
                   "mean_hematoxylin_od", "score"]


def outline(inside: np.ndarray, probability: np.ndarray | None = None, level: float = 0.5,
            min_margin: float = 0.05) -> np.ndarray | None:
    """Outline of a mask along its pixels' outer edges, sub-pixel where a probability map says where.

    Marching squares on a field that is above ``level`` on the mask's pixels and below it elsewhere, so
    the outline runs between every inside and outside pixel centre and the polygon covers the mask's
    area (an outline through the boundary pixels' centres would cut half a pixel off every side). With
    ``probability`` (the foreground probability the mask was thresholded from) the field is ``level ±
    |probability − level|`` (at least ``min_margin`` from it), so the outline crosses where the
    interpolated probability does; without it, at the pixel edges' midpoints.

    Parameters
    ----------
    inside : ndarray (H, W) bool
    probability : ndarray (H, W) float, optional
    level, min_margin : float

    Returns
    -------
    ndarray (k, 2) float (x, y), pixel ``(i, j)`` covering ``[j, j+1) × [i, i+1)``; the outline of the
    largest part (holes ignored), or None for an empty mask.
    """
    margin = 0.5 if probability is None else np.maximum(np.abs(probability - level), min_margin)
    field = np.full((inside.shape[0] + 2, inside.shape[1] + 2), level - 1.0)
    field[1:-1, 1:-1] = np.where(inside, level + margin, level - margin)
    contours = find_contours(field, level)
    if not contours:
        return None
    # The largest ring by area is the outer outline (the others are holes or smaller parts).
    contour = contours[0] if len(contours) == 1 else max(contours, key=lambda c: abs(_closed_ring_area(c)))
    return contour[:-1, ::-1] - 0.5  # closed ring without its repeated vertex; padded (row, col) -> (x, y)


def _closed_ring_area(ring: np.ndarray) -> float:
    """Signed shoelace area of a ring whose last vertex repeats its first."""
    return 0.5 * float(ring[:-1, 0] @ ring[1:, 1] - ring[:-1, 1] @ ring[1:, 0])


def _pixel_solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area of the outline through a mask's edge pixels' centres (OpenCV).

    Kept on the pixels rather than the smoother written outline: QC's shape check (``min_solidity``) was
    set on it, and ragged masks score lower on it (docs/experiments.md, "Outlines along the pixel edges").
    """
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contour = max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(contour))
    return float(min(1.0, cv2.contourArea(contour) / hull)) if hull > 0 else 1.0


def _outlined(labels: np.ndarray, score: np.ndarray | None, level: float) -> list[tuple]:
    """Each instance with an area: ``(label, window, inside, (x0, y0), polygon, area)``. The window is its
    bounding box with one pixel of context on each side (so its outline can sit between the edge pixels and
    the next), ``inside`` the instance's pixels in it and ``(x0, y0)`` its origin; the polygon is
    :func:`outline`'s, in the map's pixel units.

    A list, not a generator: tracing every outline first and then measuring every instance is about a tenth
    faster than alternating the two.
    """
    out = []
    for label, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, x0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
        window = (slice(y0, sl[0].stop + 1), slice(x0, sl[1].stop + 1))
        inside = labels[window] == label
        points = outline(inside, None if score is None else score[window], level)
        if points is None or len(points) < 3:
            continue
        points = points + (x0, y0)
        area = abs(_closed_ring_area(np.vstack([points, points[:1]])))
        if area > 0:
            out.append((label, window, inside, (x0, y0), points, area))
    return out


def instance_outlines(labels: np.ndarray, score: np.ndarray | None = None, level: float = 0.5
                      ) -> list[tuple[int, np.ndarray]]:
    """``(label, polygon)`` of each instance with an area: its :func:`outline`, sub-pixel where ``score``
    (the foreground probability) crosses ``level`` (the foreground threshold), in the map's pixel units
    (pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``). Labels absent from the map are skipped.
    """
    return [(label, points) for label, _, _, _, points, _ in _outlined(labels, score, level)]


def describe_instances(labels: np.ndarray, hematoxylin: np.ndarray | None = None,
                       score: np.ndarray | None = None, level: float = 0.5
                       ) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Outline polygon (:func:`instance_outlines`) and shape/intensity features of each instance, in the
    map's pixel units.

    Pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``; its centre is ``(j + 0.5, i + 0.5)``. Area and
    perimeter are the polygon's; centroid, eccentricity and solidity (:func:`_pixel_solidity`) come from
    the instance's pixels, and ``mean_hematoxylin_od`` and ``score`` are means over them.

    Returns
    -------
    polygons : list of ndarray (k, 2) float (x, y)
    features : DataFrame with :data:`FEATURE_COLUMNS` plus ``label``
    """
    polygons, rows = [], []
    for label, window, inside, (x0, y0), points, area in _outlined(labels, score, level):
        ring = np.vstack([points, points[:1]])
        crop = inside.astype(np.uint8)
        m = cv2.moments(crop, binaryImage=True)
        cx, cy = m["m10"] / m["m00"] + x0 + 0.5, m["m01"] / m["m00"] + y0 + 0.5
        mu20, mu02, mu11 = m["mu20"] / m["m00"], m["mu02"] / m["m00"], m["mu11"] / m["m00"]
        common = np.sqrt(4 * mu11**2 + (mu20 - mu02) ** 2)
        l1, l2 = (mu20 + mu02 + common) / 2, (mu20 + mu02 - common) / 2
        ecc = float(np.sqrt(1 - l2 / l1)) if l1 > 0 else 0.0
        rows.append({
            "label": label, "centroid_x": cx, "centroid_y": cy, "area_px": area,
            "perimeter_px": float(np.hypot(*np.diff(ring, axis=0).T).sum()),
            "eccentricity": ecc, "solidity": _pixel_solidity(crop),
            "mean_hematoxylin_od": float(hematoxylin[window][inside].mean()) if hematoxylin is not None else np.nan,
            "score": float(score[window][inside].mean()) if score is not None else np.nan,
        })
        polygons.append(points)
    return polygons, pd.DataFrame(rows, columns=["label"] + FEATURE_COLUMNS)
