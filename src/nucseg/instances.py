"""From network probabilities to nucleus instances, polygons and per-nucleus features.

One function, :func:`extract_instances`, turns the network's probabilities into an instance map;
evaluation, whole-slide inference and QC all call it, gated by :func:`hematoxylin_gate` of the same
image. All size parameters are in µm / µm².
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.measure import find_contours
from skimage.segmentation import find_boundaries

from .kernels import (boundary_cells, crossings, exact_roots, flood, hull_areas, label_maxima, ring_positions,
                      window_sums)


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
    mask = fill_holes(fg > params.foreground_threshold)
    if len(prob) > 2:
        cores = mask & (prob[2] > params.center_threshold)
        relief = -prob[2]
    else:
        cores = mask & ((fg - bnd) > params.marker_threshold)
        relief = bnd
    cores = cv2.morphologyEx(cores.view(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, core_labels = cv2.connectedComponents(cores, connectivity=4)  # without stats: twice as fast
    small = np.bincount(core_labels.ravel(), minlength=n) < params.min_marker_um2 / mpp**2
    small[0] = False
    if small.any():
        core_labels[small[core_labels]] = 0
    if len(prob) > 2:
        markers = _with_coreless_components(core_labels, n, mask)
    else:
        markers = _split_cores(core_labels, n, mpp, params) if core_labels.max() else core_labels
    if markers.max() == 0:
        return np.zeros(fg.shape, np.int32)
    labels = flood_markers(relief, markers, mask | (core_labels > 0))
    areas = np.bincount(labels.ravel())
    bad = (areas < params.min_area_um2 / mpp**2) | (areas > params.max_area_um2 / mpp**2)
    if gate is not None and params.gate_unit == "nucleus":
        bad |= np.bincount(labels.ravel(), weights=gate.ravel(), minlength=len(areas)) < 0.5 * areas
    return _renumbered(labels, (areas > 0) & ~bad)


def flood_markers(relief: np.ndarray, markers: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``skimage.segmentation.watershed(relief, markers, mask=mask)`` as int32, faster: the flooding runs only
    where it has a choice to make, in :func:`nucseg.kernels.flood`.

    A 4-connected component of ``mask`` holding the pixels of one marker label is all that label's (and one
    without a marker stays 0), whatever the relief; most nuclei are such components. Only the components with
    two or more markers are flooded. Within a component the flooding order does not depend on the pixels
    outside it, so the labels are the watershed's to the pixel.

    Parameters
    ----------
    relief : ndarray (H, W) float32 (as the network's probabilities; other types are cast to it)
    markers : ndarray (H, W) int, 0 = no marker; nonzero only inside ``mask``
    mask : ndarray (H, W) bool
    """
    n, components = cv2.connectedComponents(mask.view(np.uint8), connectivity=4)
    marked = np.flatnonzero(markers)
    span = int(markers.max()) + 1
    component, label = np.divmod(np.unique(components.ravel()[marked].astype(np.int64) * span
                                           + markers.ravel()[marked]), span)  # distinct (component, label)
    n_labels = np.bincount(component, minlength=n)
    single = n_labels[component] == 1
    lut = np.zeros(n, np.int32)
    lut[component[single]] = label[single]
    out = lut[components]
    crowded = n_labels > 1
    if crowded.any():
        region = crowded[components]
        out[region] = markers[region]
        flood(np.ascontiguousarray(relief, np.float32), out, region)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes(mask)``, faster: the background not 4-connected to the border.

    Parameters
    ----------
    mask : ndarray (H, W) bool

    Returns
    -------
    ndarray (H, W) bool
    """
    n, parts = cv2.connectedComponents((~mask).view(np.uint8), connectivity=4)  # 0: the mask's pixels
    open_to_border = np.zeros(n, bool)
    for edge in (parts[0], parts[-1], parts[:, 0], parts[:, -1]):
        open_to_border[edge] = True
    open_to_border[0] = False
    return ~open_to_border[parts]


def distance_to_background(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(mask)`` as float32, faster (OpenCV's exact transform).

    OpenCV takes the square root in single precision; its squared distances, whole numbers, are recovered
    and rooted as scipy does, so the values are scipy's to the bit.

    Parameters
    ----------
    mask : ndarray (H, W) bool

    Returns
    -------
    ndarray (H, W) float32, each pixel's Euclidean distance to the nearest pixel outside ``mask``.
    """
    dist = cv2.distanceTransform(np.ascontiguousarray(mask).view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    top = float(dist.max()) if dist.size else 0.0
    if top > 1000:  # squared distances past ~1e6 no longer round back exactly from single precision
        return ndi.distance_transform_edt(mask).astype(np.float32)
    return exact_roots(dist)


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
    dist = distance_to_background(core_labels > 0)
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
    ``2 * min_distance + 1``, above the image's minimum, highest first and at least ``min_distance`` apart
    (Chebyshev) within a label. All labels' maxima are found at once; the spacing is skimage's greedy one,
    kept per label in Python (most labels have one candidate); labels whose pixels are all maxima
    (skimage's special case of a flat label) are handed to skimage itself.

    Returns
    -------
    ndarray (k, 2) int, (row, column) of each peak, label by label.
    """
    rows, cols = _label_maxima(image, labels, min_distance)
    owner = labels[rows, cols]
    n = int(labels.max()) + 1 if labels.size else 1
    area = np.bincount(labels.ravel(), minlength=n)
    flat = (np.bincount(owner, minlength=n) == area) & (area > 0)
    flat[0] = False
    keep = (image[rows, cols] > image.min()) & ~flat[owner]
    rows, cols, owner = rows[keep], cols[keep], owner[keep]
    order = np.lexsort((-image[rows, cols], owner))  # per label, highest first; raster order among equals
    rows, cols, owner = rows[order], cols[order], owner[order]
    if min_distance > 1:
        spaced = _spaced(rows, cols, owner, min_distance)
        rows, cols, owner = rows[spaced], cols[spaced], owner[spaced]
    parts = [(owner, np.stack([rows, cols], axis=1))]
    if flat.any():
        parts.append(_flat_label_peaks(image, labels, np.flatnonzero(flat), min_distance))
    owner = np.concatenate([p[0] for p in parts])
    coords = np.concatenate([p[1] for p in parts]).astype(np.intp)
    return coords[np.argsort(owner, kind="stable")]


def _label_maxima(image: np.ndarray, labels: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column, in raster order, of every labelled pixel not below any pixel of its own label within
    ``radius`` (a square window; the image's outside counts as no label)."""
    return np.divmod(label_maxima(image, labels, max(radius, 1)), labels.shape[1])


def _padded(array: np.ndarray, width: int, value=0, dtype=None) -> np.ndarray:
    """``np.pad(array, width, constant_values=value)`` (as ``dtype``), without np.pad's overhead."""
    out = np.full((array.shape[0] + 2 * width, array.shape[1] + 2 * width), value, dtype or array.dtype)
    out[width:-width, width:-width] = array
    return out


def _spaced(rows: np.ndarray, cols: np.ndarray, owner: np.ndarray, min_distance: int) -> np.ndarray:
    """Indices of the candidates (grouped by ``owner``, best first) that skimage's greedy spacing keeps: each
    unless closer than ``min_distance`` (Chebyshev) to one already kept of its owner."""
    first = np.r_[True, owner[1:] != owner[:-1]] if len(owner) else np.empty(0, bool)
    crowded = np.flatnonzero(~first)  # a candidate after its label's first: spacing to check
    starts = np.flatnonzero(first)
    group_start = starts[np.searchsorted(starts, crowded, side="right") - 1]
    keep, r, c = [True] * len(owner), rows.tolist(), cols.tolist()
    for i, s in zip(crowded.tolist(), group_start.tolist(), strict=True):
        for j in range(s, i):
            if keep[j] and abs(r[i] - r[j]) < min_distance and abs(c[i] - c[j]) < min_distance:
                keep[i] = False
                break
    return np.flatnonzero(keep)


def _flat_label_peaks(image: np.ndarray, labels: np.ndarray, flat: np.ndarray,
                      min_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Owner and coordinates of the peaks of labels ``flat`` (every pixel a maximum), by skimage."""
    threshold = image.min()
    objects = ndi.find_objects(labels)
    owners, coords = [], []
    for label in flat.tolist():
        roi = objects[label - 1]
        inside = (labels[roi] == label).astype(np.int32)
        found = peak_local_max(image[roi], min_distance=min_distance, threshold_abs=threshold, labels=inside,
                               exclude_border=False)
        owners.append(np.full(len(found), label))
        coords.append(found + [s.start for s in roi])
    return np.concatenate(owners), np.concatenate(coords)


def boundary_map(instances: np.ndarray) -> np.ndarray:
    """Inner boundaries of all instances (uint8 0/1), the target that separates touching nuclei."""
    return find_boundaries(instances, mode="inner").astype(np.uint8)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 1..n keeping 0 as background (``labels``: non-negative integers), in label order."""
    return _renumbered(labels, np.bincount(labels.ravel()) > 0)


def _renumbered(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``labels`` with the labels ``keep`` (bool per label) numbered 1..n in order, the others 0."""
    keep = keep.copy()
    keep[0] = False
    lut = np.cumsum(keep, dtype=np.int32)
    lut[~keep] = 0
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
    contour = contours[0] if len(contours) == 1 else max(contours, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(contour))
    return float(min(1.0, cv2.contourArea(contour) / hull)) if hull > 0 else 1.0


# Marching squares as skimage.measure.find_contours (fully_connected="low") draws one cell, by case (the
# corners inside: 1 upper left, 2 upper right, 4 lower left, 8 lower right): its segments from edge to edge
# (0 top, 1 bottom, 2 left, 3 right), in skimage's order; the saddles 6 and 9 keep the inside corners apart.
_CASE_SEGMENTS = {1: ((0, 2),), 2: ((3, 0),), 3: ((3, 2),), 4: ((2, 1),), 5: ((0, 1),), 6: ((3, 0), (2, 1)),
                  7: ((3, 1),), 8: ((1, 3),), 9: ((0, 2), (1, 3)), 10: ((1, 0),), 11: ((1, 2),), 12: ((2, 3),),
                  13: ((0, 3),), 14: ((2, 0),)}
_SEGMENT_TABLE = np.full((16, 2, 2), -1, np.intp)  # [case, k-th segment, from/to edge]
for _case, _segments in _CASE_SEGMENTS.items():
    _SEGMENT_TABLE[_case, :len(_segments)] = _segments


def _cell_segments(padded: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every marching-squares segment of every label of ``padded`` (a label map with a border of zeros),
    each label's own field: its pixels inside, all others outside.

    Returns
    -------
    cell, label, k, case, from_edge, to_edge : ndarray
        Per segment: its cell (flat, row-major over the ``(H - 1) x (W - 1)`` cells, a cell named by its
        upper-left pixel), its label, its rank in the cell (0, or 1 for a saddle's second), the cell's case
        for the label (bits 1, 2, 4, 8: its upper left, upper right, lower left, lower right corner) and the
        segment's edges.
    """
    cell, label, case = boundary_cells(padded)
    saddle = _SEGMENT_TABLE[case, 1, 0] >= 0
    cell, label = np.r_[cell, cell[saddle]], np.r_[label, label[saddle]]
    k = np.r_[np.zeros(len(case), np.intp), np.ones(int(saddle.sum()), np.intp)]
    case = np.r_[case, case[saddle]]
    edges = _SEGMENT_TABLE[case, k]
    return cell, label, k, case, edges[:, 0], edges[:, 1]


def _ring_positions(from_key: np.ndarray, to_key: np.ndarray, emitted: np.ndarray) -> tuple[np.ndarray, ...]:
    """The closed rings the segments form, and where each segment comes in its ring.

    Segment ``i`` runs from crossing ``from_key[i]`` to ``to_key[i]``; ``emitted`` (unique) orders the segments
    as skimage emits them. skimage's ring starts where the last segment it emits ends.

    Returns
    -------
    ring : ndarray
        Per segment, its ring's id (the ``emitted`` of the ring's last segment).
    position : ndarray
        Per segment, its rank in its ring counted from the ring's start.
    """
    segment_of = np.empty(int(from_key.max()) + 1 if len(from_key) else 0, np.int32)  # crossing -> its segment
    segment_of[from_key] = np.arange(len(from_key), dtype=np.int32)
    return ring_positions(segment_of[to_key], emitted)


def _outline_rings(labels: np.ndarray, ids: np.ndarray, origins: np.ndarray, score: np.ndarray | None,
                   level: float, min_margin: float = 0.05) -> tuple[np.ndarray, np.ndarray, _Boundary]:
    """:func:`outline` of each instance of ``ids`` (sorted), all at once, to the bit.

    ``origins`` ``(n_labels + 1, 2)``: per label, the (x0, y0) of the window :func:`outline` would be
    called on (its bounding box with one pixel of context). Returns the vertices ``(k, 2)`` (x, y), instance
    after instance, where each instance's start, and the instances' boundary cells.
    """
    keep = np.zeros(len(origins), bool)
    keep[ids] = True
    padded = _padded(np.where(keep[labels], labels, 0), 1)
    margin = 0.5 if score is None else np.maximum(np.abs(score - level), min_margin)
    inside = _padded(np.broadcast_to(level + margin, labels.shape), 1, dtype=np.float64).ravel()
    outside = _padded(np.broadcast_to(level - margin, labels.shape), 1, level - 1.0, np.float64).ravel()
    cell, label, k, case, from_edge, to_edge = _cell_segments(padded)
    key, row, col, vertical, fraction = crossings(cell, label, from_edge, padded, inside, outside, level)
    to_key = crossings(cell, label, to_edge, padded, inside, outside, level)[0]
    ring, position = _ring_positions(key, to_key, (cell * 2 + k) * len(origins) + label)
    # Window coordinates as skimage returns them (the padded map's shifted by the window origin), then the
    # map's, in outline()'s order of operations.
    x0, y0 = origins[label, 0], origins[label, 1]
    x = ((col - x0) + np.where(vertical, 0.0, fraction) - 0.5) + x0
    y = ((row - y0) + np.where(vertical, fraction, 0.0) - 0.5) + y0
    first = k == 0
    cells = cell[first], label[first], case[first], padded.shape[1]
    order = _ring_order(ring, position)
    x, y, label, emitted = x[order], y[order], label[order], ((cell * 2 + k) * len(origins))[order]
    starts = np.flatnonzero(np.r_[True, ring[order][1:] != ring[order][:-1]])
    boundary = _Boundary(*cells, np.bincount(label[starts], minlength=len(origins)))
    area = np.abs(_ring_sums(x * _next_in_ring(y, starts) - _next_in_ring(x, starts) * y, starts))
    # The largest ring of each instance (the others are holes or smaller parts); among equal ones skimage's first.
    best = np.lexsort((np.minimum.reduceat(emitted, starts), -area, label[starts]))
    best = best[np.r_[True, label[starts][best][1:] != label[starts][best][:-1]]]
    lengths = np.diff(np.r_[starts, len(x)])[best]
    take = np.repeat(starts[best] - np.cumsum(np.r_[0, lengths[:-1]]), lengths) + np.arange(lengths.sum())
    return np.stack([x[take], y[take]], axis=1), np.r_[0, np.cumsum(lengths)[:-1]], boundary


class _Boundary(NamedTuple):
    """The cells of a padded label map where instances end, once per cell and instance (:func:`_cell_segments`):
    ``cell`` (flat over the cells of a map ``width`` pixels wide), ``label`` and ``case``; and ``rings``, the
    number of outline rings of each label (its parts and holes)."""
    cell: np.ndarray
    label: np.ndarray
    case: np.ndarray
    width: int
    rings: np.ndarray


_CORNERS_IN = np.array([bin(case).count("1") for case in range(16)])
_LONE_CORNER = np.zeros((16, 2), np.intp)  # (row, column) in its cell of the one corner of cases 1, 2, 4, 8
_LONE_CORNER[[1, 2, 4, 8]] = [(0, 0), (0, 1), (1, 0), (1, 1)]


def _ring_order(ring: np.ndarray, position: np.ndarray) -> np.ndarray:
    """``np.lexsort((position, ring))`` where each ring's positions are 0, 1, ...: rings in order of their ids,
    each from its start, without sorting the segments."""
    heads = np.sort(ring[position == 0])  # each ring's id once
    rank = np.searchsorted(heads, ring)
    first = np.r_[0, np.cumsum(np.bincount(rank, minlength=len(heads)))[:-1]]
    order = np.empty(len(ring), np.intp)
    order[first[rank] + position] = np.arange(len(ring))
    return order


def _next_in_ring(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Each ring vertex's successor's value (rings stored one after another from ``starts``; the last vertex's
    successor is its ring's first)."""
    nxt = np.arange(1, len(values) + 1)
    nxt[np.r_[starts[1:], len(values)] - 1] = starts
    return values[nxt]


def _ring_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per ring, the sum of ``values`` over its vertices."""
    return np.add.reduceat(values, starts) if len(values) else np.zeros(0)


def _present_labels(objects: list) -> np.ndarray:
    """The labels that occur in the map ``ndi.find_objects`` gave ``objects`` for, in order."""
    return np.array([label for label, sl in enumerate(objects, start=1) if sl is not None], np.int64)


def _window_origins(objects: list) -> np.ndarray:
    """Per label (row 0: background), (x0, y0) of its bounding box (``ndi.find_objects``) grown by a pixel of
    context, clipped to the map."""
    origins = np.zeros((len(objects) + 1, 2), np.int64)
    if objects:
        starts = np.array([(sl[1].start, sl[0].start) if sl is not None else (1, 1) for sl in objects])
        origins[1:] = np.maximum(starts - 1, 0)
    return origins


def instance_outlines(labels: np.ndarray, score: np.ndarray | None = None, level: float = 0.5
                      ) -> list[tuple[int, np.ndarray]]:
    """``(label, polygon)`` of each instance: its :func:`outline` (traced for all instances at once),
    sub-pixel where ``score`` (the foreground probability) crosses ``level`` (the foreground threshold), in
    the map's pixel units (pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``). Labels absent from the map are
    skipped.
    """
    objects = ndi.find_objects(labels)
    ids = _present_labels(objects)
    vertices, starts, _ = _outline_rings(labels, ids, _window_origins(objects), score, level)
    return list(zip(ids.tolist(), np.split(vertices, starts[1:]), strict=True))


def _window_sums(labels: np.ndarray, origins: np.ndarray, hematoxylin: np.ndarray | None,
                 score: np.ndarray | None) -> np.ndarray:
    """:func:`nucseg.kernels.window_sums`: per label, its pixels' moments in its window (``origins``,
    :func:`_window_origins`) and their hematoxylin and score sums, for all windows at once."""
    none = np.empty((0, 0), np.float32)
    return window_sums(labels, origins, none if hematoxylin is None else hematoxylin, none if score is None else score)


def _first_moments(sums: np.ndarray, ids: np.ndarray, origins: np.ndarray) -> tuple[np.ndarray, ...]:
    """``m00``, ``m10``, ``m01`` (float64) of each of ``ids`` (``sums``: :func:`_window_sums`) and its centroid
    in the map's pixel units (pixel centres at ``j + 0.5``)."""
    m00, m10, m01 = sums[ids, 0], sums[ids, 1], sums[ids, 2]
    return m00, m10, m01, m10 / m00 + origins[ids, 0] + 0.5, m01 / m00 + origins[ids, 1] + 0.5


def _pixel_features(labels: np.ndarray, ids: np.ndarray, objects: list, origins: np.ndarray, sums: np.ndarray,
                    first: tuple[np.ndarray, ...], boundary: _Boundary, hematoxylin: bool, score: bool
                    ) -> dict[str, np.ndarray]:
    """Eccentricity, solidity and mean hematoxylin and score (when ``hematoxylin``, ``score``) of the pixels
    of each of ``ids`` (``sums``: :func:`_window_sums`; ``first``: their :func:`_first_moments`).

    The moments are sums over each instance's pixels in its window, as ``cv2.moments`` computes them (integer
    sums in window coordinates, then its central-moment formulas), so centroids and eccentricities equal the
    per-window values to the bit; the means are float64 sums.
    """
    m00, m10, m01 = first[:3]
    m20, m02, m11 = sums[ids, 3], sums[ids, 4], sums[ids, 5]
    cx, cy = m10 * (1.0 / m00), m01 * (1.0 / m00)
    mu20, mu02, mu11 = (m20 - m10 * cx) / m00, (m02 - m01 * cy) / m00, (m11 - m10 * cy) / m00
    common = np.sqrt(4 * mu11**2 + (mu20 - mu02) ** 2)
    l1, l2 = (mu20 + mu02 + common) / 2, (mu20 + mu02 - common) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(1 - l2 / l1), 0.0)
    nan = np.full(len(ids), np.nan)
    return {"eccentricity": eccentricity, "solidity": _solidities(labels, ids, objects, origins, boundary, m00),
            "mean_hematoxylin_od": sums[ids, 6] / m00 if hematoxylin else nan,
            "score": sums[ids, 7] / m00 if score else nan}


def _solidities(labels: np.ndarray, ids: np.ndarray, objects: list, origins: np.ndarray, boundary: _Boundary,
                areas: np.ndarray) -> np.ndarray:
    """:func:`_pixel_solidity` of each of ``ids`` (``areas``: their pixel counts), to the bit.

    Most instances are one piece without holes and without two of their pixels meeting only at a corner;
    their solidity comes from their boundary cells (cells of 2 x 2 pixel centres): the outline through the
    edge pixels' centres encloses each cell whose four corners are the instance's and half of each cell with
    three, and the convex hull's corners are pixels alone in a cell. The others go to OpenCV on their windows.
    """
    n = len(origins)
    corners = _CORNERS_IN[boundary.case]
    full_cells = (4 * areas - np.bincount(boundary.label, corners, n)[ids]) / 4  # each pixel is in 4 cells
    area = full_cells + 0.5 * np.bincount(boundary.label, corners == 3, n)[ids]
    hull = _hull_areas(boundary, ids)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(hull > 0, np.minimum(1.0, area / hull), 1.0)
    irregular = boundary.rings != 1
    irregular[boundary.label[(boundary.case == 6) | (boundary.case == 9)]] = True
    origin = origins.tolist()
    for k in np.flatnonzero(irregular[ids]).tolist():
        label = int(ids[k])
        rows, cols = objects[label - 1]
        x0, y0 = origin[label]
        out[k] = _pixel_solidity((labels[y0:rows.stop + 1, x0:cols.stop + 1] == label).view(np.uint8))
    return out


def _hull_areas(boundary: _Boundary, ids: np.ndarray) -> np.ndarray:
    """Area of the convex hull of the pixel centres of each of ``ids`` (sorted), from its corners alone in a cell
    (a pixel the hull turns at is alone in the cell on its outer side)."""
    lone = _CORNERS_IN[boundary.case] == 1
    label, case = boundary.label[lone], boundary.case[lone]
    row, col = np.divmod(boundary.cell[lone], boundary.width - 1)
    return hull_areas(label.astype(np.int64), col + _LONE_CORNER[case, 1], row + _LONE_CORNER[case, 0],
                      ids.astype(np.int64))


def describe_instances(labels: np.ndarray, hematoxylin: np.ndarray | None = None,
                       score: np.ndarray | None = None, level: float = 0.5, select=None
                       ) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Outline polygon (:func:`instance_outlines`) and shape/intensity features of each instance, in the
    map's pixel units: :func:`instance_table`'s (same parameters), one polygon per instance.

    Returns
    -------
    polygons : list of ndarray (k, 2) float (x, y)
    features : DataFrame with :data:`FEATURE_COLUMNS` plus ``label``, in label order
    """
    vertices, starts, frame = instance_table(labels, hematoxylin, score, level, select)
    return np.split(vertices, starts[1:]) if len(frame) else [], frame


def instance_table(labels: np.ndarray, hematoxylin: np.ndarray | None = None, score: np.ndarray | None = None,
                   level: float = 0.5, select=None) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Outlines (:func:`instance_outlines`) and shape/intensity features of the instances, in the map's pixel
    units, the outlines' vertices in one array.

    Pixel ``(i, j)`` covers ``[j, j+1) × [i, i+1)``; its centre is ``(j + 0.5, i + 0.5)``. Area and
    perimeter are the polygon's; centroid, eccentricity and solidity (:func:`_pixel_solidity`) come from
    the instance's pixels, and ``mean_hematoxylin_od`` and ``score`` are means over them.

    Parameters
    ----------
    select : callable, optional
        ``select(labels, centroid_x, centroid_y)`` of all instances present (arrays, label order) returns
        which of them to describe (bool array), e.g. those whose centroid a tile owns; the others are neither
        outlined nor measured. Default: all.

    Returns
    -------
    vertices : ndarray (k, 2) float (x, y)
        The outlines, one after another.
    starts : ndarray of int
        Where each instance's outline starts in ``vertices``.
    features : DataFrame with :data:`FEATURE_COLUMNS` plus ``label``, in label order
    """
    objects = ndi.find_objects(labels)
    ids = _present_labels(objects)
    origins = _window_origins(objects)
    sums = _window_sums(labels, origins, hematoxylin, score)
    first = _first_moments(sums, ids, origins)
    if select is not None and len(ids):
        chosen = np.asarray(select(ids, *first[3:]), bool)
        ids, first = ids[chosen], tuple(values[chosen] for values in first)
    if not len(ids):
        return np.zeros((0, 2)), np.zeros(0, np.int64), pd.DataFrame(columns=["label"] + FEATURE_COLUMNS)
    vertices, starts, boundary = _outline_rings(labels, ids, origins, score, level)
    x, y = vertices.T
    features = _pixel_features(labels, ids, objects, origins, sums, first, boundary, hematoxylin is not None,
                               score is not None)
    features["centroid_x"], features["centroid_y"] = first[3:]
    features["area_px"] = np.abs(0.5 * _ring_sums(x * _next_in_ring(y, starts) - _next_in_ring(x, starts) * y,
                                                  starts))
    features["perimeter_px"] = _ring_sums(np.hypot(_next_in_ring(x, starts) - x, _next_in_ring(y, starts) - y),
                                          starts)
    return vertices, starts, pd.DataFrame({"label": ids, **{name: features[name] for name in FEATURE_COLUMNS}})
