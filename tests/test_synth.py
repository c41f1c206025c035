import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Point, Polygon

from nucseg.instances import boundary_map
from nucseg.synth import (SynthParams, draw_nuclei, generate_dataset, load_textures, make_patch, smooth_outline,
                          star_polygon, texture_stats)


def test_generator_defaults_are_the_shipped_recipe():
    """SynthParams() draws what the shipped model was trained on (its card's generator parameters)."""
    card = json.loads((Path(__file__).resolve().parents[1] / "src" / "nucseg" / "weights" /
                       "default_card.json").read_text())
    recipe = card["training_data"]["synth_params"][0]
    for name, value in vars(SynthParams()).items():
        if name != "workers":   # how it ran, not what it drew
            assert recipe[name] == (list(value) if isinstance(value, tuple) else value), name


def test_star_polygon_is_star_shaped_around_origin(rng):
    for n in (10, 17):
        pts = star_polygon(rng, radius=10, n_vertices=n, irregularity=0.35, spikiness=0.12)
        assert pts.shape == (n, 2)
        poly = Polygon(pts)
        assert poly.is_valid and poly.contains(Point(0, 0))
        r = np.hypot(*pts.T)
        assert r.min() >= 3 and r.max() <= 17


def _max_turn(points):
    edges = np.roll(points, -1, axis=0) - points
    heading = np.arctan2(edges[:, 1], edges[:, 0])
    return np.abs(np.angle(np.exp(1j * (np.roll(heading, -1) - heading)))).max()


def test_smooth_outline_rounds_corners_and_keeps_the_shape(rng):
    pts = star_polygon(rng, radius=10, n_vertices=12, irregularity=0.35, spikiness=0.12)
    smooth = smooth_outline(pts)
    assert smooth.shape == (4 * len(pts), 2)
    before, after = Polygon(pts), Polygon(smooth)
    assert after.is_valid and 0.85 * before.area < after.area <= before.area
    assert after.symmetric_difference(before).area < 0.1 * before.area  # corners cut, shape kept
    assert _max_turn(smooth) < 0.5 * _max_turn(pts)


def texture(rng, size=160):
    """A pink texture with a few dark purple blobs standing in for real nuclei."""
    img = np.full((size, size, 3), (225, 150, 190), np.float32) + rng.normal(0, 4, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    for cy, cx in [(40, 40), (100, 120), (130, 30)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = (90, 50, 140)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_inpainting_removes_dark_nuclei(rng):
    img = texture(rng)
    stats = texture_stats(img, 0.25)
    bg = stats["background"]
    assert img[40, 40].mean() < 110 and bg[40, 40].mean() > 160
    assert np.abs(stats["colour"] - (90, 50, 140)).max() < 40


def test_nuclei_drawn_only_on_tissue_with_limited_overlap(rng):
    bg = np.full((200, 200, 3), (225, 150, 190), np.uint8)
    tissue = np.zeros((200, 200), bool)
    tissue[:, :100] = True
    params = SynthParams(distractors_per_patch=(0, 0), debris_per_patch=(0, 0), cytoplasm_per_patch=(0, 0),
                         wash_probability=0.0, max_overlap=0.15)
    image, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.3, rng, params)
    assert inst.max() >= 3
    # Coverage 0.3 of the tissue half, give or take the Poisson count and the overlap limit.
    assert 0.1 < (inst[:, :100] > 0).mean() < 0.6
    ids, areas = np.unique(inst, return_counts=True)
    # Centres are drawn on tissue: all but the rims of border nuclei stay on the left half.
    assert (inst[:, 130:] > 0).sum() == 0
    # Nuclei are darker than the background they were drawn on.
    assert image[inst > 0].mean() < image[inst == 0].mean() - 30
    # Occlusion is limited: every nucleus keeps most of its area visible.
    assert areas[1:].min() > 0.3 * np.median(areas[1:])


def test_cytoplasm_is_dark_unlabelled_soft_and_paler_than_nuclei(rng):
    bg = np.full((200, 200, 3), (225, 150, 190), np.uint8)
    tissue = np.zeros((200, 200), bool)
    tissue[:, :100] = True
    colour = np.array([90.0, 50, 140])
    params = SynthParams(cytoplasm_per_patch=(4, 4), distractors_per_patch=(0, 0), debris_per_patch=(0, 0),
                         wash_probability=0.0)
    image, inst = draw_nuclei(bg, tissue, colour, 0.0, rng, params)
    assert inst.max() == 0  # clutter is never labelled
    darkening = bg.mean(-1) - image.astype(np.float32).mean(-1)
    assert (darkening[:, :100] > 25).mean() > 0.05
    assert np.abs(darkening[:, 140:]).mean() < 3  # only on tissue (plus a blurred rim)
    # Soft edges: between clear tissue and the dark core lie many partly darkened pixels.
    assert ((darkening[:, :100] > 8) & (darkening[:, :100] < 20)).mean() > 0.02
    # Drawn under the nuclei and paler than them: darkness alone does not make a nucleus.
    image, inst = draw_nuclei(bg, tissue, colour, 0.2, rng, params)
    grey = image.astype(np.float32).mean(-1)
    clutter = (inst == 0) & tissue & (bg.mean(-1) - grey > 25)
    assert inst.max() > 3 and clutter.any() and grey[inst > 0].mean() < grey[clutter].mean() - 10


def test_wash_tints_all_tissue_and_nothing_else(rng):
    bg = np.full((200, 200, 3), (225, 150, 190), np.uint8)
    tissue = np.zeros((200, 200), bool)
    tissue[:, :100] = True
    clutter = dict(cytoplasm_per_patch=(0, 0), distractors_per_patch=(0, 0), debris_per_patch=(0, 0))
    colour = np.array([90.0, 50, 140])
    washed, inst = draw_nuclei(bg, tissue, colour, 0.0, rng, SynthParams(wash_probability=1.0, **clutter))
    plain, _ = draw_nuclei(bg, tissue, colour, 0.0, rng, SynthParams(wash_probability=0.0, **clutter))
    darkening = plain.astype(np.float32).mean(-1) - washed.astype(np.float32).mean(-1)
    assert inst.max() == 0
    # Patchy (30-100 % strength) but everywhere on the tissue.
    assert (darkening[:, :90] > 2).mean() > 0.97 and darkening[:, :90].mean() > 8
    assert np.abs(darkening[:, 110:]).mean() < 2
    # Towards the nuclear colour: blue over red rises.
    def blue_over_red(image):
        return (image[:, :90, 2].astype(float) - image[:, :90, 0]).mean()

    assert blue_over_red(washed) > blue_over_red(plain)


def test_boundary_map_marks_instance_rims():
    inst = np.zeros((20, 20), np.int32)
    inst[5:15, 2:10] = 1
    inst[5:15, 10:18] = 2
    b = boundary_map(inst)
    assert b[5:15, 9].all() and b[5:15, 10].all()   # the shared edge, on both sides
    assert not b[8:12, 4:8].any()                   # interiors are not boundary


def test_patch_is_deterministic_in_seed(rng):
    tex = texture(rng, 300)
    params = SynthParams(patch_size=128)
    a, b, c = make_patch(tex, 5, params), make_patch(tex, 5, params), make_patch(tex, 6, params)
    many = [make_patch(tex, s, params)["instances"].max() for s in range(8)]
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["instances"], b["instances"])
    assert not np.array_equal(a["image"], c["image"])
    assert max(many) > 0


def test_dataset_shards_independent_of_workers(tmp_path, rng):
    textures = [texture(rng, 200) for _ in range(3)]
    params = SynthParams(n_patches=10, patch_size=96, shard_size=4)
    meta1 = generate_dataset(textures, tmp_path / "w1", params, progress=False)
    generate_dataset(textures, tmp_path / "w2", SynthParams(**{**params.__dict__, "workers": 2}), progress=False)
    assert [s["count"] for s in meta1["shards"]] == [4, 4, 2]
    for s in meta1["shards"]:
        with np.load(tmp_path / "w1" / s["file"]) as a, np.load(tmp_path / "w2" / s["file"]) as b:
            assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["instances"], b["instances"])
            assert a["image"].shape[1:] == (96, 96, 3)
            # Boundaries are exactly the instance rims.
            assert ((a["boundary"] > 0) <= (a["instances"] > 0)).all()
    assert sum(np.load(tmp_path / "w1" / s["file"])["instances"].max() > 0 for s in meta1["shards"]) >= 2
    saved = json.loads((tmp_path / "w1" / "params.json").read_text())
    assert saved["params"]["patch_size"] == 96 and saved["n_textures"] == 3


def test_no_textures_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no real textures"):
        generate_dataset([], tmp_path, SynthParams(n_patches=2), progress=False)


def test_texture_folders_take_8_bit_images_in_any_layout_and_skip_the_rest(tmp_path, rng):
    import tifffile

    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (40, 48), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), rgb[..., ::-1])
    cv2.imwrite(str(tmp_path / "b.png"), np.dstack([rgb[..., ::-1], np.full((40, 48), 255, np.uint8)]))  # RGBA
    tifffile.imwrite(tmp_path / "c.tif", rgb)
    tifffile.imwrite(tmp_path / "d.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    tifffile.imwrite(tmp_path / "e.tif", grey)
    tifffile.imwrite(tmp_path / "f.tif", rgb.astype(np.uint16) * 257)  # 16-bit: not a brightfield scan as stored
    tifffile.imwrite(tmp_path / "g.tif", rgb / 255.0)  # float
    (tmp_path / "h.png").write_bytes(b"not a png")
    textures = load_textures([], [{"path": str(tmp_path), "mpp": 0.5}], mpp=0.5)
    assert len(textures) == 5  # a-e read, f-h skipped (logged), none stops the others
    for texture in textures[:4]:
        assert texture.dtype == np.uint8 and np.array_equal(texture, rgb)
    assert np.array_equal(textures[4], np.dstack([grey] * 3))


def _blank_tissue(size):
    return np.full((size, size, 3), (225, 150, 190), np.uint8), np.ones((size, size), bool)


def test_nucleus_sizes_are_physical_at_any_mpp():
    """The same µm parameters give the same nucleus areas in µm² at 40x and at 20x."""
    from skimage.measure import regionprops

    medians = {}
    for mpp, size in ((0.25, 256), (0.5, 128)):  # the same 64 µm field
        params = SynthParams(mpp=mpp, distractors_per_patch=(0, 0), debris_per_patch=(0, 0), max_overlap=0.0)
        areas = []
        for seed in range(12):
            bg, tissue = _blank_tissue(size)
            _, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.2, np.random.default_rng(seed), params)
            areas += [p.area * mpp**2 for p in regionprops(inst)
                      if p.bbox[0] > 0 and p.bbox[1] > 0 and p.bbox[2] < size and p.bbox[3] < size]
        medians[mpp] = np.median(areas)
        r_lo, r_hi = params.radius_um
        b_lo, b_hi = params.size_bias[0], max(params.size_bias[1], params.large_size_bias[1])
        assert np.pi * (0.3 * r_lo * b_lo) ** 2 < min(areas) and max(areas) < np.pi * (1.7 * r_hi * b_hi) ** 2
    assert abs(medians[0.25] - medians[0.5]) < 0.25 * medians[0.25]


def test_large_nucleus_patches_have_larger_nuclei():
    """``large_fraction`` patches draw carcinoma-sized nuclei: about (1.68 / 1.05)² the area."""
    from skimage.measure import regionprops

    def median_area(large_fraction):
        params = SynthParams(large_fraction=large_fraction, distractors_per_patch=(0, 0), debris_per_patch=(0, 0),
                             cytoplasm_per_patch=(0, 0), max_overlap=0.0)
        areas = []
        for seed in range(8):
            bg, tissue = _blank_tissue(256)
            _, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.2, np.random.default_rng(seed), params)
            areas += [p.area for p in regionprops(inst)]
        return np.median(areas)

    assert median_area(1.0) > 1.8 * median_area(0.0)


def test_overlap_limit_zero_keeps_every_nucleus_whole():
    """With max_overlap 0 no nucleus is drawn over another: each is one solid star-shaped region."""
    from skimage.measure import label, regionprops

    def solidities(max_overlap):
        params = SynthParams(distractors_per_patch=(0, 0), debris_per_patch=(0, 0), max_overlap=max_overlap)
        out = []
        for seed in range(6):
            bg, tissue = _blank_tissue(192)
            _, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.45, np.random.default_rng(seed), params)
            for p in regionprops(inst):
                out.append(p.solidity)
                if max_overlap == 0:
                    assert label(p.image, connectivity=2).max() == 1, "a nucleus was split by another one"
        return np.array(out)

    whole, occluded = solidities(0.0), solidities(0.6)
    assert whole.min() > 0.75
    assert occluded.min() < whole.min()  # a permissive limit lets later nuclei cut into earlier ones


def test_masks_align_with_the_rendered_nuclei(rng):
    """Each labelled nucleus is darker in hematoxylin than the ring just outside its mask."""
    import cv2

    from nucseg.stain import hematoxylin_od, nuclear_pixels

    tex = texture(rng, 300)
    # At 40x, where the figures below were measured, and without crisp vesicular nuclei, whose cleared
    # interiors are pale by design and so left out by the hematoxylin detector.
    params = SynthParams(patch_size=128, mpp=0.25, coverage=(0.2, 0.3), distractors_per_patch=(0, 0),
                         debris_per_patch=(0, 0), cytoplasm_per_patch=(0, 0), wash_probability=0.0, crisp_vesicular=0.0)
    inside_darker, total, inter, union = 0, 0, 0, 0
    for seed in range(6):
        patch = make_patch(tex, seed, params)
        inst, hema = patch["instances"], hematoxylin_od(patch["image"])
        for k in range(1, inst.max() + 1):
            mask = (inst == k).astype(np.uint8)
            if mask.sum() < 20:
                continue
            ring = (cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0) & (inst == 0)
            if ring.sum() < 10:
                continue
            total += 1
            inside_darker += hema[mask > 0].mean() > hema[ring].mean()
        pred = nuclear_pixels(patch["image"], hema)
        inter += (pred & (inst > 0)).sum()
        union += pred.sum() + (inst > 0).sum()
    assert total > 10 and inside_darker >= 0.9 * total
    # The nuclei found in the rendered image are the labelled ones: ≈ 0.99 here, 0.92 with masks shifted
    # by 2 px, 0.85 by 4 px.
    assert 2 * inter / union > 0.95


def test_real_crops_are_distinct_crops_of_large_textures(rng):
    from nucseg.synth import real_crops

    large = rng.integers(0, 255, (400, 500, 3), dtype=np.uint8)
    small = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)  # upsampled to one crop: copies would add nothing
    crops = real_crops([large, small], 128, per_texture=3)
    assert crops.shape == (4, 128, 128, 3)
    from_large = [c for c in crops if not np.array_equal(c, crops[1])]
    assert len({c.tobytes() for c in from_large}) == 3
    for c in from_large:  # each is a window of the texture
        hits = np.argwhere((large[:-127, :-127] == c[0, 0]).all(axis=2))
        assert any(np.array_equal(large[y:y + 128, x:x + 128], c) for y, x in hits)
    assert np.array_equal(real_crops([large, small], 128, 1), crops[:2])


# Nuclei alone on blank tissue: no clutter, no wash, no overlaps.
_NUCLEI_ONLY = dict(distractors_per_patch=(0, 0), debris_per_patch=(0, 0), cytoplasm_per_patch=(0, 0),
                    wash_probability=0.0, max_overlap=0.0)


def _nucleus_contrast(centre_only=False, seeds=range(4), **params):
    """Mean hematoxylin of each drawn nucleus (or of its centre) above its blank background, and the
    instance maps, for ``SynthParams(**_NUCLEI_ONLY, **params)``."""
    from nucseg.stain import hematoxylin_od

    values, maps = [], []
    for seed in seeds:
        bg, tissue = _blank_tissue(160)
        img, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.15, np.random.default_rng(seed),
                                SynthParams(**_NUCLEI_ONLY, **params))
        hema = hematoxylin_od(img)
        base = np.median(hema[inst == 0])
        for k in range(1, inst.max() + 1):
            mask = inst == k
            if centre_only:
                dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
                mask = dist > 0.6 * dist.max()
            values.append(hema[mask].mean() - base)
        maps.append(inst)
    return np.array(values), np.stack(maps)


def test_vesicular_clearing_pales_the_centres_only():
    """A stronger clearing gives paler centres with the very same nuclei (same random draws)."""
    # (Crisp vesicular nuclei have their own clearing: all fade here.)
    weak, maps_weak = _nucleus_contrast(centre_only=True, vesicular_fraction=1.0, crisp_vesicular=0.0,
                                        vesicular_clearing=(0.2, 0.2))
    strong, maps_strong = _nucleus_contrast(centre_only=True, vesicular_fraction=1.0, crisp_vesicular=0.0,
                                            vesicular_clearing=(0.8, 0.8))
    assert (maps_weak == maps_strong).all()
    assert np.median(strong) < 0.6 * np.median(weak)


def _rim_and_interior(**params):
    """Hematoxylin of each drawn nucleus's outer 1.5 px ring and of its interior beyond it, above the background."""
    from nucseg.stain import hematoxylin_od

    rims, insides = [], []
    for seed in range(4):
        bg, tissue = _blank_tissue(160)
        img, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.15, np.random.default_rng(seed),
                                SynthParams(**_NUCLEI_ONLY, mpp=0.25, vesicular_fraction=1.0, **params))
        hema = hematoxylin_od(img)
        base = np.median(hema[inst == 0])
        for k in range(1, inst.max() + 1):
            dist = cv2.distanceTransform((inst == k).astype(np.uint8), cv2.DIST_L2, 3)
            if dist.max() < 6:
                continue
            rims.append(hema[(dist > 0) & (dist <= 1.5)].mean() - base)
            insides.append(hema[dist > 3].mean() - base)
    return np.array(rims), np.array(insides)


def test_crisp_vesicular_nuclei_have_a_membrane_around_a_clear_interior():
    soft_rim, soft_inside = _rim_and_interior(crisp_vesicular=0.0)
    crisp_rim, crisp_inside = _rim_and_interior(crisp_vesicular=1.0)
    assert len(soft_rim) > 10 and len(crisp_rim) > 10
    # A fading centre has a blurred rim; the crisp membrane is the darkest part of the nucleus.
    assert np.median(crisp_rim / crisp_inside) > 1.3 * np.median(soft_rim / soft_inside)
    assert (crisp_inside > 0).mean() > 0.95   # cleared, not empty: chromatin and nucleoli stay


def test_large_coverage_packs_the_large_nucleus_patches():
    def nuclear_fraction(**params):
        values = []
        for seed in range(6):
            bg, tissue = _blank_tissue(256)
            _, inst = draw_nuclei(bg, tissue, np.array([90.0, 50, 140]), 0.08, np.random.default_rng(seed),
                                  SynthParams(**{**_NUCLEI_ONLY, "max_overlap": 0.15}, large_fraction=1.0, **params))
            values.append((inst > 0).mean())
        return np.mean(values)

    texture_own, packed = nuclear_fraction(large_coverage=(0.0, 0.0)), nuclear_fraction(large_coverage=(0.35, 0.45))
    assert texture_own < 0.12 and packed > 2.5 * texture_own
