import json

import numpy as np
import pytest
from shapely.geometry import Point, Polygon

from nucseg.synth import (SynthParams, boundary_map, draw_nuclei, generate_dataset, make_patch,
                          star_polygon, texture_stats)


def test_star_polygon_is_star_shaped_around_origin(rng):
    for n in (10, 17):
        pts = star_polygon(rng, radius=10, n_vertices=n, irregularity=0.35, spikiness=0.12)
        assert pts.shape == (n, 2)
        poly = Polygon(pts)
        assert poly.is_valid and poly.contains(Point(0, 0))
        r = np.hypot(*pts.T)
        assert r.min() >= 3 and r.max() <= 17


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
    params = SynthParams(distractors_per_patch=(0, 0), debris_per_patch=(0, 0), max_overlap=0.15)
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
