import cv2
import numpy as np
import pytest
from skimage.draw import polygon as draw_polygon

from nucseg.instances import (FEATURE_COLUMNS, InstanceParams, center_map, describe_instances, extract_instances,
                              gate_unit_for, hematoxylin_gate, hematoxylin_level, instance_outlines, label_peaks,
                              outline, relabel, touching_labels)
from nucseg.stain import hematoxylin_od


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_touching_nuclei_are_separated_by_boundary_probability():
    shape = (80, 80)
    a, b = disc(shape, 40, 28, 12), disc(shape, 40, 50, 12)
    fg = (a | b).astype(np.float32)
    bnd = np.zeros(shape, np.float32)
    bnd[:, 38:41] = 1.0 * fg[:, 38:41]      # the seam between them
    labels = extract_instances(np.stack([fg, bnd]), mpp=0.25)
    assert labels.max() == 2
    assert labels[40, 28] != labels[40, 50] and labels[40, 28] > 0
    # Where the boundary head misses the seam, the neck between them still splits them (distance-map markers).
    assert extract_instances(np.stack([fg, np.zeros(shape, np.float32)]), mpp=0.25).max() == 2


def test_center_map_peaks_once_per_nucleus_whatever_its_size():
    shape = (100, 100)
    labels = np.zeros(shape, np.int32)
    labels[disc(shape, 30, 30, 20)] = 1            # a large nucleus
    labels[disc(shape, 30, 62, 12) & (labels == 0)] = 2   # touching it
    labels[disc(shape, 80, 80, 5)] = 3             # a small one
    center = center_map(labels)
    assert center.dtype == np.float32 and center[labels == 0].max() == 0
    for k in (1, 2, 3):
        assert center[labels == k].max() == pytest.approx(1.0)   # normalised per nucleus
        assert center[labels == k].min() == 0                    # its edge
    assert center[30, 30] > 0.9 and center[80, 80] > 0.7
    # Along the line through both centres the map dips to 0 at their shared edge: two cores.
    line = center[30, 30:63]
    assert line.min() == 0 and 0 < int(np.argmin(line)) < len(line) - 1


def test_centre_head_makes_one_core_per_nucleus():
    shape = (100, 100)
    labels = np.zeros(shape, np.int32)
    labels[disc(shape, 30, 30, 20)] = 1
    labels[disc(shape, 30, 62, 12) & (labels == 0)] = 2
    labels[disc(shape, 80, 80, 8)] = 3
    fg = (labels > 0).astype(np.float32)
    no_boundary = np.zeros(shape, np.float32)
    # A blurred prediction of the centre map: still one core per nucleus, touching nuclei kept apart.
    center = cv2.GaussianBlur(center_map(labels), (0, 0), 1.5)
    out = extract_instances(np.stack([fg, no_boundary, center]), mpp=0.25)
    assert out.max() == 3
    assert len({out[30, 30], out[30, 62], out[80, 80]} - {0}) == 3
    # The large nucleus stays whole.
    assert (out[labels == 1] == out[30, 30]).mean() > 0.9
    # No centre above the threshold (a blurred image): each foreground component is one nucleus.
    weak = extract_instances(np.stack([fg, no_boundary, 0.4 * center]), mpp=0.25)
    assert weak.max() == 2 and weak[30, 30] == weak[30, 62] != weak[80, 80]


def test_hematoxylin_gate_drops_foreground_on_paler_purple_tissue():
    shape = (120, 120)
    image = np.empty(shape + (3,), np.uint8)
    image[:] = (165, 120, 190)                      # basophilic tumour: purple cytoplasm between the nuclei
    image[:, 108:] = (230, 160, 200)                # and a strip of eosin-pink stroma
    nuclei = np.zeros(shape, bool)
    for cy in range(14, 120, 26):
        for cx in range(14, 100, 26):
            nuclei |= disc(shape, cy, cx, 9)
    image[nuclei] = (90, 55, 140)
    gate = hematoxylin_gate(hematoxylin_od(image), 0.25)
    between, stroma = (40, 27), (60, 114)
    assert gate[nuclei].mean() > 0.95 and not gate[between] and not gate[stroma]
    # A network that calls the cytoplasm nucleus too: the gate keeps only the two nuclei.
    fg = np.zeros(shape, np.float32)
    fg[:, :108] = 1.0
    bnd = np.zeros(shape, np.float32)
    prob = np.stack([fg, bnd])
    gated = extract_instances(prob, 0.25, InstanceParams(hematoxylin_gate=True), gate=gate)
    assert gated.max() == 20 and gated[between] == 0
    assert abs((gated > 0).sum() - nuclei.sum()) < 0.25 * nuclei.sum()  # the 0.5 µm blur widens them a little
    # Off (the default), the cytoplasm is foreground again.
    ungated = extract_instances(prob, 0.25, InstanceParams(max_area_um2=1e4), gate=gate)
    assert ungated[between] > 0
    # An image without contrast has no level to split at: nothing is gated.
    assert hematoxylin_gate(np.zeros((20, 20), np.float32), 0.25).all()


def test_gate_by_nucleus_keeps_pale_nuclei_whole_and_drops_false_ones():
    shape = (100, 160)
    dark, pale, false = disc(shape, 50, 30, 14), disc(shape, 50, 80, 14), disc(shape, 50, 130, 14)
    # The gate (hematoxylin above the level) covers the dark nucleus, the pale one's rim (open on one
    # side) and chromatin clumps (over half of it), and a sliver of the false one (cytoplasm called nucleus).
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = disc(shape, 50, 80, 9)
    ring = pale & ~inside & ~((xx > 86) & (abs(yy - 50) < 6))
    clumps = disc(shape, 50, 80, 6) & ((yy // 4 + xx // 4) % 3 == 0)
    gate = dark | ring | clumps | (false & (xx > 140))
    assert 0.5 < gate[pale].mean() < 0.8 and gate[false].mean() < 0.3
    prob = np.stack([(dark | pale | false).astype(np.float32), np.zeros(shape, np.float32)])
    by_nucleus = extract_instances(prob, 0.25, InstanceParams(hematoxylin_gate=True, gate_unit="nucleus"), gate=gate)
    assert by_nucleus.max() == 2 and by_nucleus[50, 130] == 0
    assert by_nucleus[dark].min() > 0 and by_nucleus[pale].min() > 0      # every pixel of both kept
    by_pixel = extract_instances(prob, 0.25, InstanceParams(hematoxylin_gate=True, gate_unit="pixel"), gate=gate)
    assert by_pixel[50, 130] == 0 and (by_pixel[pale] > 0).mean() < 0.8     # the pale nucleus loses its inside
    # Without a gate, or with the gate off, the unit does not matter.
    ungated = extract_instances(prob, 0.25, InstanceParams(hematoxylin_gate=False, gate_unit="nucleus"), gate=gate)
    assert ungated.max() == 3
    with pytest.raises(ValueError, match="gate_unit 'nuclei'"):
        extract_instances(prob, 0.25, InstanceParams(gate_unit="nuclei"), gate=gate)


@pytest.mark.parametrize("slide_type, unit", [("DX", "nucleus"), ("TS", "pixel"), ("BS", "pixel"),
                                              ("MS", "pixel"), ("", "pixel")])
def test_gate_unit_by_slide_type(slide_type, unit):
    assert gate_unit_for(slide_type) == unit


def test_size_limits_in_um2():
    shape = (100, 100)
    fg = (disc(shape, 20, 20, 2) | disc(shape, 60, 60, 10)).astype(np.float32)
    prob = np.stack([fg, np.zeros(shape, np.float32)])
    # r=2 px at 0.25 µm/px is 0.8 µm² (< 6 µm²): dropped; r=10 px is ~20 µm²: kept.
    labels = extract_instances(prob, mpp=0.25)
    assert labels.max() == 1 and labels[60, 60] == 1
    # The same pixels at 1 µm/px are 13 and 314 µm²: both kept.
    assert extract_instances(prob, mpp=1.0, params=InstanceParams(min_marker_um2=1)).max() == 2


def test_features_of_a_disc_and_an_ellipse():
    labels = np.zeros((60, 100), np.int32)
    labels[disc(labels.shape, 30, 25, 10)] = 1
    yy, xx = np.mgrid[:60, :100]
    labels[((yy - 30) / 8.0) ** 2 + ((xx - 70) / 20.0) ** 2 <= 1] = 2
    hema = np.where(labels == 1, 0.3, 0.1).astype(np.float32)
    polys, feats = describe_instances(labels, hema, np.full(labels.shape, 0.9, np.float32))
    assert len(polys) == 2
    d, e = feats.iloc[0], feats.iloc[1]
    assert d.area_px == pytest.approx(np.pi * 100, rel=0.05)
    assert (d.centroid_x, d.centroid_y) == pytest.approx((25.5, 30.5), abs=0.1)  # pixel-centre convention
    assert d.eccentricity < 0.2 and d.solidity > 0.9  # OpenCV: contour area / hull area
    assert e.eccentricity == pytest.approx(np.sqrt(1 - (8 / 20) ** 2), abs=0.05)
    assert d.mean_hematoxylin_od == pytest.approx(0.3) and e.mean_hematoxylin_od == pytest.approx(0.1)
    assert d.perimeter_px == pytest.approx(2 * np.pi * 10, rel=0.15)


def test_outline_covers_the_mask_it_was_traced_from():
    """Outlines run along the pixels' outer edges: drawn again (pixel centres inside), they give back
    the mask, and their area is the pixel count, not half a pixel short on every side."""
    mask = disc((40, 40), 19, 21, 9)
    points = outline(mask)
    rr, cc = draw_polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, mask.shape)  # (j + 0.5, i + 0.5) centres
    redrawn = np.zeros_like(mask)
    redrawn[rr, cc] = True
    assert (redrawn == mask).all()
    x, y = points.T
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert area == pytest.approx(mask.sum(), rel=0.03)
    assert (points[:, 0].min(), points[:, 0].max()) == pytest.approx((12.0, 31.0), abs=0.01)  # columns 12..30


def test_outline_crosses_where_the_interpolated_probability_does():
    prob = np.full((25, 25), 0.1, np.float32)
    prob[5:15, 5:15] = 0.9
    prob[5:15, 15] = 0.3       # right of the square: 0.9 -> 0.3 crosses 0.5 two thirds of the way
    prob[5:15, 4] = 0.45       # left: 0.9 -> 0.45 crosses 0.5 eight ninths of the way out
    points = outline(prob > 0.5, prob, 0.5)
    x, y = points.T
    # Pixel centres: the square's right column 14.5, the next 15.5; its left column 5.5, the one before 4.5.
    assert x.max() == pytest.approx(14.5 + 2 / 3, abs=1e-4)
    assert x.min() == pytest.approx(5.5 - 8 / 9, abs=1e-4)
    assert (y.min(), y.max()) == pytest.approx((5.0, 15.0), abs=1e-4)  # 0.9 -> 0.1: half-way, the pixel edge
    # Without the probability, the pixel edges.
    x = outline(prob > 0.5)[:, 0]
    assert (x.min(), x.max()) == pytest.approx((5.0, 15.0))


def test_instance_outlines_name_each_instance_and_cover_its_pixels():
    labels = np.zeros((30, 40), np.int32)
    labels[disc(labels.shape, 12, 10, 6)] = 1
    labels[20, 25:35] = 3  # a line of pixels one wide; label 2 is absent
    outlines = dict(instance_outlines(labels))
    assert sorted(outlines) == [1, 3]

    def area(points):
        x, y = points.T
        return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))

    assert area(outlines[1]) == pytest.approx((labels == 1).sum(), rel=0.03)
    # Marching squares cuts each of the line's four corners by an eighth of a pixel.
    assert area(outlines[3]) == pytest.approx(10 - 4 / 8)
    x, y = outlines[3].T
    assert (x.min(), x.max(), y.min(), y.max()) == pytest.approx((25.0, 35.0, 20.0, 21.0))


def test_hematoxylin_level_over_a_mask():
    hema = np.full((200, 200), 0.1, np.float32)     # cytoplasm
    hema[40:80, 40:80] = hema[120:160, 100:140] = 0.4  # nuclei
    glass = np.zeros((200, 400), np.float32)
    with_glass = np.hstack([hema, glass])
    tissue = np.hstack([np.ones_like(hema, bool), np.zeros_like(glass, bool)])
    alone = hematoxylin_level([hema], 0.25)
    assert 0.1 < alone < 0.4
    # The same up to the smoothing's reach into the glass along the tissue's edge.
    assert hematoxylin_level([with_glass], 0.25, [tissue]) == pytest.approx(alone, rel=0.1)
    assert hematoxylin_level([with_glass], 0.25) < 0.1  # unmasked, Otsu splits the glass from the tissue


def test_relabel_is_consecutive():
    labels = np.array([[0, 5, 5], [9, 0, 2]])
    out = relabel(labels)
    assert sorted(np.unique(out)) == [0, 1, 2, 3]
    assert (out[labels == 0] == 0).all()


def test_touching_labels_counts_shared_edges_only():
    labels = np.zeros((8, 10), np.int32)
    labels[1:4, 1:3], labels[1:4, 3:5] = 1, 2   # side by side
    labels[4:6, 5:7] = 3                        # meets 2 only at a corner
    labels[6:8, 8:10] = 4                       # alone
    assert touching_labels(labels).tolist() == [1, 2]
    labels[4, 4] = 3                            # now 3 shares an edge with 2 as well
    assert touching_labels(labels).tolist() == [1, 2, 3]
    assert touching_labels(np.zeros((4, 4), np.int32)).size == 0


@pytest.mark.parametrize("min_distance", [1, 2, 4])
def test_label_peaks_are_skimages_per_label_peaks(rng, min_distance):
    """The same peaks, in the same order, as skimage's per-label peak_local_max: smooth blobs, plateaus
    (quantised values) and flat labels included."""
    from scipy import ndimage as ndi
    from skimage.feature import peak_local_max

    for trial in range(12):
        image = ndi.gaussian_filter(rng.random((160, 160)), 3).astype(np.float32)
        labels, n = ndi.label(image > np.percentile(image, 60))
        if trial % 3 == 1:
            image = np.round(image * 25) / 25
        if trial % 3 == 2:
            image[labels == 1] = image[labels == 1].mean()  # a flat label
        expected = peak_local_max(image, min_distance=min_distance, labels=labels, exclude_border=False)
        assert n > 3 and len(expected) >= n
        np.testing.assert_array_equal(label_peaks(image, labels, min_distance), expected)


def _reference_features(labels, hema, score, level=0.5):
    """describe_instances as it was written per instance: outline() and OpenCV on each instance's window."""
    import cv2
    from scipy import ndimage as ndi

    polygons, rows = [], []
    for label, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, x0 = max(sl[0].start - 1, 0), max(sl[1].start - 1, 0)
        window = (slice(y0, sl[0].stop + 1), slice(x0, sl[1].stop + 1))
        inside = labels[window] == label
        points = outline(inside, score[window], level) + (x0, y0)
        m = cv2.moments(inside.astype(np.uint8), binaryImage=True)
        polygons.append(points)
        mu20, mu02, mu11 = m["mu20"] / m["m00"], m["mu02"] / m["m00"], m["mu11"] / m["m00"]
        common = np.sqrt(4 * mu11**2 + (mu20 - mu02) ** 2)
        l1, l2 = (mu20 + mu02 + common) / 2, (mu20 + mu02 - common) / 2
        contours, _ = cv2.findContours(inside.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        contour = max(contours, key=cv2.contourArea)
        hull = cv2.contourArea(cv2.convexHull(contour))
        solidity = min(1.0, cv2.contourArea(contour) / hull) if hull else 1.0
        rows.append((label, m["m10"] / m["m00"] + x0 + 0.5, m["m01"] / m["m00"] + y0 + 0.5,
                     np.sqrt(1 - l2 / l1) if l1 > 0 else 0.0, solidity,
                     float(hema[window][inside].mean()), float(score[window][inside].mean())))
    return polygons, np.array(rows)


def _awkward_labels(rng, shape=(70, 90)):
    """Touching blobs, nuclei with holes, on the map's edges, and parts that touch only at a corner."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(ndi.gaussian_filter(rng.random(shape), 2) > 0.5)
    labels[labels % 4 == 0] += 1                        # merge some into their neighbours' labels
    labels[10:16, 10:16] = 50
    labels[12:14, 12:14] = 0                            # a hole
    labels[0:3, 30:40] = 51                             # on the top edge
    labels[40, 85:90] = 52                              # on the right edge
    labels[60, 60] = labels[61, 61] = labels[62, 62] = 53   # only corners touch: three outlines, one kept
    labels[64:66, 70:72] = labels[66:68, 72:74] = 54
    return labels


def test_outlines_and_features_are_those_traced_one_instance_at_a_time(rng):
    """All instances are outlined at once; each outline is outline()'s of the instance alone, to the bit
    (vertex order and start included), and the pixel features are OpenCV's moments per instance."""
    for _ in range(6):
        labels = _awkward_labels(rng)
        score = rng.random(labels.shape).astype(np.float32)
        hema = rng.random(labels.shape).astype(np.float32)
        expected, rows = _reference_features(labels, hema, score)
        polys, feats = describe_instances(labels, hema, score)
        assert feats.label.tolist() == rows[:, 0].astype(int).tolist()
        for a, b in zip(expected, polys, strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(feats[["centroid_x", "centroid_y", "eccentricity", "solidity"]].to_numpy(),
                                      rows[:, 1:5])
        # Means are summed in float64 over all instances at once, numpy's per-instance means in float32.
        np.testing.assert_allclose(feats[["mean_hematoxylin_od", "score"]].to_numpy(), rows[:, 5:], rtol=1e-6)
        outlines = instance_outlines(labels, score)
        assert [k for k, _ in outlines] == feats.label.tolist()
        for (_, a), b in zip(outlines, polys, strict=True):
            np.testing.assert_array_equal(a, b)


def test_outlines_are_simple_rings_written_as_geos_writes_them(rng):
    """Segmentation writes each outline as a polygon's WKB without GEOS checking it: the rings traced from
    awkward maps (holes, corner contacts, labels touching labels, salt-and-pepper noise, interpolated or plain
    crossings) are valid polygons, and the WKB, bounds and types are GEOS's own."""
    import shapely
    from scipy import ndimage as ndi

    from nucseg.instances import instance_table
    from nucseg.io import EncodedGeometries

    maps = [_awkward_labels(rng) for _ in range(3)]
    for share in (0.3, 0.5, 0.6):  # noise: 4-connected pieces (labels meeting at corners) and 8-connected ones
        noise = rng.random((60, 60)) < share
        maps += [ndi.label(noise)[0], ndi.label(noise, np.ones((3, 3)))[0]]
    n = 0
    for labels in maps:
        for score in (None, rng.random(labels.shape).astype(np.float32)):
            vertices, starts, _ = instance_table(labels.astype(np.int32), score=score)
            lengths = np.diff(np.r_[starts, len(vertices)])
            ours = EncodedGeometries.polygons(vertices, lengths)
            polygons = [shapely.Polygon(vertices[a:a + m]) for a, m in zip(starts, lengths, strict=True)]
            assert shapely.is_valid(polygons).all()
            geos = EncodedGeometries.of(polygons)
            assert ours.wkb.tolist() == geos.wkb.tolist()
            np.testing.assert_array_equal(ours.bounds, geos.bounds)
            np.testing.assert_array_equal(ours.type_ids, geos.type_ids)
            n += len(polygons)
    assert n > 1000
    assert len(EncodedGeometries.polygons(np.zeros((0, 2)), np.zeros(0, np.int64))) == 0


def test_describing_the_instances_a_caller_selects_by_centroid(rng):
    labels = _awkward_labels(rng)
    hema = rng.random(labels.shape).astype(np.float32)
    polys, feats = describe_instances(labels, hema)
    seen = {}

    def select(ids, cx, cy):
        seen.update(ids=ids, cx=cx, cy=cy)
        return cx < 45  # the left half, as a tile owns the nuclei whose centroid is in its core

    sub_polys, sub = describe_instances(labels, hema, select=select)
    assert seen["ids"].tolist() == feats.label.tolist()
    np.testing.assert_array_equal(seen["cx"], feats.centroid_x.to_numpy())  # the same numbers as described
    np.testing.assert_array_equal(seen["cy"], feats.centroid_y.to_numpy())
    left = feats.centroid_x.to_numpy() < 45
    assert 0 < left.sum() < len(feats) and sub.label.tolist() == feats.label[left].tolist()
    pd_testing = pytest.importorskip("pandas.testing")
    pd_testing.assert_frame_equal(sub.reset_index(drop=True), feats[left].reset_index(drop=True))
    for a, b in zip(sub_polys, [p for p, k in zip(polys, left, strict=True) if k], strict=True):
        np.testing.assert_array_equal(a, b)
    empty_polys, empty = describe_instances(labels, select=lambda ids, cx, cy: np.zeros(len(ids), bool))
    assert empty_polys == [] and empty.empty and list(empty.columns) == ["label", *FEATURE_COLUMNS]


def test_fast_mask_operations_are_scipys(rng):
    from scipy import ndimage as ndi

    from nucseg.instances import distance_to_background, fill_holes

    for trial in range(20):
        mask = ndi.gaussian_filter(rng.random((60 + trial, 80)), 1 + trial % 5) > 0.5 - 0.01 * trial
        np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))
        np.testing.assert_array_equal(distance_to_background(mask), ndi.distance_transform_edt(mask).astype(np.float32))
    full = np.ones((30, 40), bool)
    np.testing.assert_array_equal(distance_to_background(full), ndi.distance_transform_edt(full).astype(np.float32))


def test_hematoxylin_od_is_skimages(rng):
    from skimage.color import rgb2hed

    rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 254, 3]]
    np.testing.assert_array_equal(hematoxylin_od(rgb), np.clip(rgb2hed(rgb)[..., 0], 0, None).astype(np.float32))
    view = rgb[:, ::3]  # not contiguous
    np.testing.assert_array_equal(hematoxylin_od(view), np.clip(rgb2hed(view)[..., 0], 0, None).astype(np.float32))


def test_flooding_only_crowded_components_is_the_watershed(rng):
    """flood_markers labels single-marker components directly and floods the others; the result is
    skimage's watershed over the whole mask, pixel for pixel (no marker, one, several; a label in two
    components; markers at the map's edge)."""
    from scipy import ndimage as ndi
    from skimage.segmentation import watershed

    from nucseg.instances import flood_markers

    for _ in range(8):
        mask = ndi.gaussian_filter(rng.random((80, 90)), 2) > 0.48
        relief = ndi.gaussian_filter(rng.random(mask.shape), 1).astype(np.float32)
        markers = np.where(mask & (rng.random(mask.shape) < 0.01), rng.integers(1, 12, mask.shape), 0)
        markers[0, mask[0]] = 12
        expected = watershed(relief, markers, mask=mask)
        assert np.unique(expected).size > 3
        np.testing.assert_array_equal(flood_markers(relief, markers, mask), expected)


def test_compiled_flood_breaks_ties_as_skimages_heap_does(rng):
    """Where levels tie (plateaus, markers at one level; negative levels and -0.0 as the centre head gives),
    the order pixels leave the queue decides the labels: the compiled flood's is skimage's."""
    from skimage.segmentation import watershed

    from nucseg.kernels import flood

    differs = negative_zeros = 0
    for trial in range(200):
        shape = tuple(rng.integers(3, 40, 2))
        levels = rng.integers(-2, 3, shape) if trial % 4 < 2 else rng.random(shape) * 0.01
        relief = np.asarray(levels if trial % 2 else np.abs(levels), np.float32)  # the same levels in float32
        if trial % 4 == 1:  # -0.0 ties with 0.0
            relief[(relief == 0) & (rng.random(shape) < 0.5)] = -0.0
            negative_zeros += np.signbit(relief[relief == 0]).any()
        mask = rng.random(shape) < 0.8
        markers = np.where(mask & (rng.random(shape) < 0.08), rng.integers(1, 6, shape), 0).astype(np.int32)
        expected = watershed(relief, markers, mask=mask)
        differs += not np.array_equal(expected, watershed(relief.T, markers.T, mask=mask.T).T)  # another order
        flood(relief, markers, mask)
        np.testing.assert_array_equal(markers, expected)
    assert differs > 50 and negative_zeros > 40  # maps where the order of flooding matters; -0.0 in them


def test_compiled_hull_areas_are_opencvs(rng):
    """Convex hulls of integer points, with duplicates, collinear runs and fewer than three points, have
    OpenCV's areas exactly."""
    from nucseg.kernels import hull_areas

    owner, xs, ys, expected = [], [], [], []
    for label in range(1, 301):
        n = int(rng.integers(1, 30))
        x = rng.integers(0, 12, n) if label % 3 else np.full(n, 5)  # every third label: a vertical line
        y = rng.integers(0, 12, n) if label % 5 else 2 * x  # every fifth: a diagonal
        points = np.stack([x, y], axis=1).astype(np.int32)
        expected.append(cv2.contourArea(cv2.convexHull(points)))
        owner += [label] * n
        xs += x.tolist()
        ys += y.tolist()
    order = rng.permutation(len(owner))
    got = hull_areas(*(np.asarray(v, np.int64)[order] for v in (owner, xs, ys)), np.arange(1, 301))
    np.testing.assert_array_equal(got, expected)
    assert (np.asarray(expected) == 0).sum() > 50 and (np.asarray(expected) > 0).sum() > 100
