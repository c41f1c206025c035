"""Compiled loops (numba) for the post-processing steps that no library call does fast enough.

Each gives the library result it replaces to the bit; the tests compare them (the flooding on maps built to tie).
Compiled once per machine (numba's cache beside this file, or in the user's cache folder when that is
read-only) and released from the GIL, so post-processing threads run them beside the network.
"""
import numba
import numpy as np

_JIT = {"cache": True, "nogil": True}


@numba.njit(**_JIT, inline="always")
def _sortable(bits: np.uint32) -> np.uint64:
    """A float32's bits as an unsigned integer in the float's order (-0.0 as 0.0, so they tie as floats do)."""
    if bits == np.uint32(0x80000000):
        return np.uint64(0x80000000)
    if bits & np.uint32(0x80000000):
        return np.uint64(~bits)
    return np.uint64(bits | np.uint32(0x80000000))


@numba.njit(**_JIT, inline="always")
def _push(keys, where, items, key, index):
    child = items
    while child > 0:
        parent = (child - 1) >> 1
        if key < keys[parent]:
            keys[child], where[child] = keys[parent], where[parent]
            child = parent
        else:
            break
    keys[child], where[child] = key, index


@numba.njit(**_JIT, inline="always")
def _sift_last_to_root(keys, where, items):
    key, index = keys[items], where[items]
    i = 0
    while 2 * i + 1 < items:
        child = 2 * i + 1
        if child + 1 < items and keys[child + 1] < keys[child]:
            child += 1
        if keys[child] < key:
            keys[i], where[i] = keys[child], where[child]
            i = child
        else:
            break
    keys[i], where[i] = key, index


@numba.njit(**_JIT)
def flood(relief: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> None:
    """``skimage.segmentation.watershed(relief, labels, mask=mask)`` (scikit-image 0.26), in place in ``labels``.

    The same priority queue as skimage's: a binary heap on (level, time of entry), markers entering at their
    own level at time 0 in raster order, a pixel labelled when it enters, at no lower level than the pixel it
    came from, neighbours taken up, left, right, down. Both orders are packed into one integer key (the level's
    float32 bits in its upper half, the time in the lower), so the heap's arrangement, and with it the order in
    which tied markers leave it, is skimage's. Costs O(flooded pixels), not O(map).

    Parameters
    ----------
    relief : ndarray (H, W) float32, C-contiguous
    labels : ndarray (H, W) int32, C-contiguous; the markers, filled in place inside ``mask`` (outside it,
        labels are left as they are, and ignored)
    mask : ndarray (H, W) bool, C-contiguous
    """
    height, width = labels.shape
    level, label, inside = relief.ravel().view(np.uint32), labels.ravel(), mask.ravel()
    keys = np.empty(np.count_nonzero(inside), np.uint64)  # each pixel of the mask enters once
    where = np.empty(len(keys), np.int64)
    items = 0
    for start in range(height * width):
        if label[start] != 0 and inside[start]:
            _push(keys, where, items, _sortable(level[start]) << np.uint64(32), start)
            items += 1
    age = np.uint64(0)
    while items > 0:
        floor, pixel = keys[0] >> np.uint64(32), where[0]
        items -= 1
        if items > 0:
            _sift_last_to_root(keys, where, items)
        row, col = divmod(pixel, width)
        for step in range(4):
            if step == 0:
                if row == 0:
                    continue
                neighbour = pixel - width
            elif step == 1:
                if col == 0:
                    continue
                neighbour = pixel - 1
            elif step == 2:
                if col == width - 1:
                    continue
                neighbour = pixel + 1
            else:
                if row == height - 1:
                    continue
                neighbour = pixel + width
            if not inside[neighbour] or label[neighbour] != 0:
                continue
            age += np.uint64(1)
            label[neighbour] = label[pixel]
            _push(keys, where, items, (max(_sortable(level[neighbour]), floor) << np.uint64(32)) | age, neighbour)
            items += 1


@numba.njit(**_JIT)
def exact_roots(distance: np.ndarray) -> np.ndarray:
    """Each float32 distance rounded to the whole squared distance it approximates and rooted again in double
    precision, as float32: ``scipy.ndimage.distance_transform_edt``'s values from OpenCV's."""
    out = np.empty_like(distance)
    for i in range(distance.shape[0]):
        for j in range(distance.shape[1]):
            d = distance[i, j]
            out[i, j] = np.float32(np.sqrt(np.float64(np.int32(np.rint(d * d)))))
    return out


@numba.njit(**_JIT)
def _below_a_neighbour(image, labels, row, col, radius) -> bool:
    """Whether a pixel of the same label within ``radius`` (a square window, clipped to the map) is higher."""
    height, width = labels.shape
    label, value = labels[row, col], image[row, col]
    for r in range(max(0, row - radius), min(height, row + radius + 1)):
        for c in range(max(0, col - radius), min(width, col + radius + 1)):
            if labels[r, c] == label and image[r, c] > value:
                return True
    return False


@numba.njit(**_JIT)
def label_maxima(image: np.ndarray, labels: np.ndarray, radius: int) -> np.ndarray:
    """Flat indices, in raster order, of the labelled pixels not below any pixel of their own label within
    ``radius`` (at least 1; a square window; outside the map counts as no label): the candidates of
    ``skimage.feature.peak_local_max(image, labels=labels)`` before its threshold and spacing.

    Parameters
    ----------
    image : ndarray (H, W) float
    labels : ndarray (H, W) int, 0 = no label
    radius : int
    """
    height, width = labels.shape
    found = np.empty(height * width, np.int64)
    n = 0
    for row in range(height):
        for col in range(width):
            # Most pixels have a higher neighbour right next to them: look there first.
            if labels[row, col] != 0 and not _below_a_neighbour(image, labels, row, col, 1) and \
                    not (radius > 1 and _below_a_neighbour(image, labels, row, col, radius)):
                found[n] = row * width + col
                n += 1
    return found[:n]


@numba.njit(**_JIT)
def boundary_cells(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each 2 x 2 cell of a label map and label whose field (its pixels in, others out) changes in the cell.

    Parameters
    ----------
    padded : ndarray (H, W) int, a label map with a border of zeros

    Returns
    -------
    cell, label, case : ndarray
        The cell (flat, row-major over the ``(H - 1) x (W - 1)`` cells, named by their upper-left pixel), the
        label and its corners in the cell (bits 1, 2, 4, 8: upper left, upper right, lower left, lower right).
        Ordered by the corner where the label first occurs in the cell (in that bit order), then by cell.
    """
    height, width = padded.shape
    size = (height - 1) * (width - 1)
    cells, labels = np.empty((4, size), np.int64), np.empty((4, size), padded.dtype)
    cases, counts = np.empty((4, size), np.uint8), np.zeros(4, np.int64)
    for row in range(height - 1):
        for col in range(width - 1):
            corners = (padded[row, col], padded[row, col + 1], padded[row + 1, col], padded[row + 1, col + 1])
            if corners[0] == corners[1] and corners[0] == corners[2] and corners[0] == corners[3]:
                continue
            for first in range(4):
                label = corners[first]
                seen = label == 0
                for j in range(first):
                    seen |= corners[j] == label
                if seen:
                    continue
                case = 0
                for j in range(4):
                    if corners[j] == label:
                        case |= 1 << j
                n = counts[first]
                cells[first, n], labels[first, n], cases[first, n] = row * (width - 1) + col, label, case
                counts[first] += 1
    return _joined(cells, counts), _joined(labels, counts), _joined(cases, counts)


@numba.njit(**_JIT)
def _joined(rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The first ``counts[j]`` values of each row ``j``, one row after another."""
    out, start = np.empty(counts.sum(), rows.dtype), 0
    for j in range(len(counts)):
        out[start:start + counts[j]] = rows[j, :counts[j]]
        start += counts[j]
    return out


@numba.njit(**_JIT)
def crossings(cell: np.ndarray, label: np.ndarray, edge: np.ndarray, padded: np.ndarray, inside: np.ndarray,
              outside: np.ndarray, level: float) -> tuple[np.ndarray, ...]:
    """Where each marching-squares segment end crosses ``level`` on its cell's ``edge`` (0 top, 1 bottom, 2 left,
    3 right), for the segment's ``label``, as skimage's ``find_contours`` interpolates it.

    ``cell`` is flat over the cells of ``padded`` (a label map with a border of zeros); ``inside``/``outside``:
    the field's value at each pixel (flat, as ``padded``) when it is or is not the label's. Returns the
    crossing's key (unique per edge and label), the edge's upper/left pixel (row, column, in ``padded``), whether
    the edge is vertical and the crossing's fraction along it.
    """
    width, flat, n = padded.shape[1], padded.ravel(), len(cell)
    key, row, col = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64)
    vertical, fraction = np.empty(n, np.bool_), np.empty(n)
    for i in range(n):
        r, c = divmod(cell[i], width - 1)
        r += edge[i] == 1
        c += edge[i] == 3
        down = edge[i] >= 2
        a = r * width + c
        b = a + (width if down else 1)
        a_in = flat[a] == label[i]
        va = inside[a] if a_in else outside[a]
        vb = outside[b] if a_in else inside[b]
        key[i] = (a * 2 + down) * 2 + (not a_in)
        row[i], col[i], vertical[i], fraction[i] = r, c, down, (level - va) / (vb - va)
    return key, row, col, vertical, fraction


@numba.njit(**_JIT)
def ring_positions(successor: np.ndarray, emitted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment of closed rings (``successor``: the next segment in its ring), its ring's id, the largest
    ``emitted`` in the ring, and its rank counted from the ring's start, the successor of that segment."""
    n = len(successor)
    ring, position, done = np.empty(n, emitted.dtype), np.empty(n, np.int64), np.zeros(n, np.bool_)
    for segment in range(n):
        if done[segment]:
            continue
        last, at = segment, successor[segment]
        while at != segment:
            if emitted[at] > emitted[last]:
                last = at
            at = successor[at]
        at, rank = successor[last], 0
        while True:
            ring[at], position[at], done[at] = emitted[last], rank, True
            if at == last:
                break
            at, rank = successor[at], rank + 1
    return ring, position


@numba.njit(**_JIT)
def window_sums(labels: np.ndarray, origins: np.ndarray, hematoxylin: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Per label, float64 sums over its pixels, added in raster order as ``np.bincount`` adds them.

    Parameters
    ----------
    labels : ndarray (H, W) int, 0 = none
    origins : ndarray (n_labels, 2) int, per label the (x0, y0) of the window its moments are taken in
    hematoxylin, score : ndarray (H, W) float, or empty ``(0, 0)`` when there are none

    Returns
    -------
    ndarray (n_labels, 8) float64: the pixel count, x, y, x², y² and xy in the label's window (``cv2.moments``'
    raw moments m00, m10, m01, m20, m02, m11), hematoxylin and score (0 when not given).
    """
    sums = np.zeros((len(origins), 8))
    with_hematoxylin, with_score = hematoxylin.size > 0, score.size > 0
    for row in range(labels.shape[0]):
        for col in range(labels.shape[1]):
            label = labels[row, col]
            if label == 0:
                continue
            x, y = col - origins[label, 0], row - origins[label, 1]
            total = sums[label]
            total[0] += 1.0
            total[1] += x
            total[2] += y
            total[3] += x * x
            total[4] += y * y
            total[5] += x * y
            if with_hematoxylin:
                total[6] += np.float64(hematoxylin[row, col])
            if with_score:
                total[7] += np.float64(score[row, col])
    return sums


@numba.njit(**_JIT, inline="always")
def _turn(ax, ay, bx, by, cx, cy) -> int:
    return (bx - ax) * (cy - ay) - (by - ay) * (cx - ax)


@numba.njit(**_JIT)
def _hull_area(xs: np.ndarray, ys: np.ndarray) -> float:
    """Area of the convex hull of integer points sorted by x then y (Andrew's monotone chain), exact."""
    n = len(xs)
    hull = np.empty(2 * n + 1, np.int64)
    size = 0
    for sweep in range(2):  # the lower chain left to right, then the upper one back
        base = size
        for k in range(n):
            i = k if sweep == 0 else n - 1 - k
            while size - base >= 2 and _turn(xs[hull[size - 2]], ys[hull[size - 2]], xs[hull[size - 1]],
                                             ys[hull[size - 1]], xs[i], ys[i]) <= 0:
                size -= 1
            hull[size] = i
            size += 1
        size -= 1  # each chain's last point starts the other
    twice = 0
    for k in range(size):
        a, b = hull[k], hull[(k + 1) % size]
        twice += xs[a] * ys[b] - xs[b] * ys[a]
    return 0.5 * abs(twice)


@numba.njit(**_JIT)
def hull_areas(owner: np.ndarray, xs: np.ndarray, ys: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Area of the convex hull of the integer points (``xs``, ``ys``) of each of ``ids`` (``owner``: each point's
    id), as ``cv2.contourArea(cv2.convexHull(points))`` gives it (the same double, whole or half)."""
    # By owner, then x, then y, in one key: ids and coordinates below 2**21 (a map of 2 million px a side).
    order = np.argsort(owner * np.int64(1 << 42) + xs * np.int64(1 << 21) + ys)
    owner, xs, ys = owner[order], xs[order], ys[order]
    areas = np.zeros(len(ids))
    start = 0
    for k in range(len(ids)):
        while start < len(owner) and owner[start] < ids[k]:
            start += 1
        end = start
        while end < len(owner) and owner[end] == ids[k]:
            end += 1
        if end - start >= 3:
            areas[k] = _hull_area(xs[start:end], ys[start:end])
        start = end
    return areas
