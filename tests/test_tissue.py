import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from shapely.geometry import Polygon

from nucseg import io
from nucseg.tissue import TissueParams, detect_tissue, mask_to_polygons, tile_grid, tissue_mask

from .conftest import CMU, FIXTURES, MONUSEG, TCGA_TS, need


def test_tissue_mask_finds_pink_region_and_ignores_glass_and_specks(rng):
    img = np.full((200, 300, 3), 240, np.uint8)
    img[50:150, 60:200] = (220, 140, 190)           # tissue, 100 x 140 px
    img[10:13, 280:283] = (150, 60, 140)             # a speck of dust: too small to keep
    img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    mask = tissue_mask(img, mpp=8.0, params=TissueParams(closing_um=16, min_region_um2=64 * 50))
    assert mask[60:140, 70:190].all()
    assert not mask[:40].any() and not mask[:, 220:].any()


def test_polygons_scale_to_level0():
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    polys = mask_to_polygons(mask, scale=0.25)      # 1 mask px = 4 level-0 px
    assert len(polys) == 1
    # Along the mask pixels' outer edges: columns 10..19 are level-0 40..80, rows 5..14 are 20..60.
    assert polys[0].bounds == pytest.approx((40, 20, 80, 60))
    assert polys[0].area == pytest.approx(mask.sum() * 16)
    assert polys[0].is_valid
    # A hole shrinks to its pixels' edges too (OpenCV cuts its corners diagonally: within a mask pixel).
    mask[8:11, 13:17] = False
    ring = mask_to_polygons(mask, scale=0.25)[0]
    assert len(ring.interiors) == 1
    assert Polygon(ring.interiors[0]).bounds == pytest.approx((52, 32, 68, 44))
    assert abs(ring.area - mask.sum() * 16) <= 16


def test_tile_grid_keeps_tissue_tiles():
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True
    tiles = tile_grid(mask, scale=0.1, tile_level0=50, slide_size=(100, 100), min_fraction=0.5)
    assert tiles[["x", "y"]].values.tolist() == [[0, 0]]
    assert tiles.tissue_fraction.iloc[0] == 1.0


def test_detect_tissue_on_demo_slide(demo_tissue):
    facts = json.loads((demo_tissue / "wsi.json").read_text())
    assert facts["status"] == "ok" and facts["mpp_source"] == "slide"
    gdf = gpd.read_parquet(demo_tissue / "tissue.parquet")
    area_mm2 = gdf.area.sum() * 0.25**2 / 1e6
    assert area_mm2 == pytest.approx(facts["tissue_area_mm2"], rel=0.1)
    assert 0.02 < area_mm2 <= 1536 * 1280 * 0.25**2 / 1e6 + 1e-9
    x0, y0, x1, y1 = gdf.total_bounds
    assert x0 >= 0 and y0 >= 0 and x1 <= 1536 and y1 <= 1280  # tissue ends at the slide's edge
    meta = io.read_provenance(demo_tissue / "tissue.parquet")
    assert meta["mpp"] == "0.25" and meta["status"] == "ok"
    tiles = pd.read_parquet(demo_tissue / "tiles.parquet")
    # Every tile centre on the tissue side of the grid lies within reach of the tissue polygons.
    union = shapely.union_all(gdf.geometry.values)
    centres = shapely.points(tiles.x + tiles.w / 2, tiles.y + tiles.h / 2)
    assert (shapely.distance(union, centres) < 512).all()
    with np.load(demo_tissue / "patches.npz") as data:
        assert data["patches"].shape[1:] == (256, 256, 3)


def test_real_slide_without_mpp_uses_fallback_and_says_so(tmp_path):
    facts = detect_tissue(need(TCGA_TS), tmp_path, "ts1", mpp_fallback=0.25)
    assert facts["status"] == "ok"
    assert facts["mpp_source"] == "fallback" and facts["slide_mpp"] is None
    assert io.read_provenance(tmp_path / "tissue.parquet")["mpp_source"] == "fallback"
    assert facts["tissue_area_mm2"] > 0.1


def test_blur_verdict_does_not_depend_on_the_working_resolution(tmp_path):
    """The real 10x-equivalent frozen section, given its ~1 µm/px: sampled for textures at 0.25 or at 0.5
    µm/px (the shipped model's, which config/adapt.yaml and config/train.yaml set), its sharpness is
    measured on the same pixels, so turning adaptation on cannot fail a slide that passes without it."""
    facts = [detect_tissue(need(TCGA_TS), tmp_path / str(w), "ts1", mpp_work=w, mpp_override=1.0)
             for w in (0.25, 0.5)]
    keys = ("status", "sharpness_median", "blurred_fraction", "n_sharpness_patches")
    assert facts[0]["n_tissue_tiles"] > facts[1]["n_tissue_tiles"]  # two tile grids, one blur sample
    assert {k: facts[0][k] for k in keys} == {k: facts[1][k] for k in keys}
    assert facts[0]["status"] == "ok" and facts[0]["n_sharpness_patches"] == 16


def test_real_slide_with_mpp(tmp_path):
    facts = detect_tissue(need(CMU), tmp_path, "cmu", backend="openslide")
    assert facts["status"] == "ok" and facts["mpp"] == pytest.approx(0.499)
    with np.load(tmp_path / "patches.npz") as data:  # read at 0.25 µm/px, but only 20x detail in them
        assert float(data["mpp"]) == 0.25 and float(data["scan_mpp"]) == pytest.approx(0.499)
    # Most of this small region is tissue, but not all (glass at the edges).
    assert 0.2 < facts["tissue_area_mm2"] / (2220 * 2967 * 0.499**2 / 1e6) < 0.95


@pytest.mark.parametrize("name, reason", [("boxes.tiff", "pixel size"), ("small.svs", "blank slide")])
def test_bad_slides_recorded_not_raised(tmp_path, name, reason):
    facts = detect_tissue(need(FIXTURES / name), tmp_path, "bad")
    assert facts["status"] == "failed" and reason in facts["failure_reason"]
    assert json.loads((tmp_path / "wsi.json").read_text())["failure_stage"] == "wsi_qc"
    assert len(gpd.read_parquet(tmp_path / "tissue.parquet")) == 0
    assert io.read_provenance(tmp_path / "tissue.parquet")["status"] == "failed"


def test_not_a_slide_recorded(tmp_path):
    bogus = tmp_path / "x.svs"
    bogus.write_bytes(b"\x00" * 1000)
    facts = detect_tissue(bogus, tmp_path / "out", "x")
    assert facts["status"] == "failed" and "not a readable slide" in facts["failure_reason"]
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary files left behind


# ---------------------------------------------------------------- WSI QC on slides made from real tissue

GLASS = (242, 240, 244)


@pytest.fixture(scope="module")
def mosaic():
    """A 20x "slide" image (0.5 µm/px, 2400 x 2000 px): 9 real MoNuSeg tiles on glass."""
    import cv2
    import tifffile

    tiles = sorted(need(MONUSEG / "images").glob("*.tif"))[:9]
    rng = np.random.default_rng(0)
    canvas = np.clip(np.full((2000, 2400, 3), GLASS, np.float32) + rng.normal(0, 1.5, (2000, 2400, 3)), 0, 255)
    canvas = canvas.astype(np.uint8)
    for i, path in enumerate(tiles):
        small = cv2.resize(tifffile.imread(path)[..., :3], (500, 500), interpolation=cv2.INTER_AREA)
        y, x = 250 + (i // 3) * 500, 450 + (i % 3) * 500
        canvas[y:y + 500, x:x + 500] = small
    return canvas


def write_slide(path, image, mpp: float | None = 0.5):
    """Pyramidal TIFF; ``mpp=None`` writes no resolution tags (the slide has no pixel size)."""
    import tifffile

    from nucseg.demo import write_pyramidal_tiff

    if mpp is not None:
        write_pyramidal_tiff(path, image, mpp)
    else:
        tifffile.imwrite(path, image, tile=(256, 256), compression="jpeg", photometric="rgb")
    return path


def draw_pen(image, strokes, width_px, colour, alpha=0.8):
    import cv2

    ink = image.copy()
    for p, q in strokes:
        cv2.line(ink, p, q, colour, width_px)
    return cv2.addWeighted(ink, alpha, image, 1 - alpha, 0)


def test_real_tissue_mosaic_passes_every_check(tmp_path, mosaic):
    facts = detect_tissue(write_slide(tmp_path / "s.tiff", mosaic), tmp_path / "out", "s")
    assert facts["status"] == "ok", facts["failure_reason"]
    assert facts["pen_fraction"] < 0.01 and facts["blurred_fraction"] == 0.0
    assert facts["sharpness_median"] > 1000 and facts["n_sharpness_patches"] >= 8
    assert 0.3 < facts["tissue_fraction"] < 0.7 and facts["grey_std"] > 10
    assert facts["tissue_area_mm2"] == pytest.approx(1500 * 1500 * 0.5**2 / 1e6, rel=0.2)


def test_pen_strokes_are_cut_out_of_the_tissue(tmp_path, mosaic):
    blue, green = ((500, 400), (1800, 700)), ((600, 1500), (1900, 1300))
    inked = draw_pen(mosaic, [blue], 100, (40, 70, 165))          # marker strokes 50 µm wide
    inked = draw_pen(inked, [green], 100, (40, 140, 80))
    facts = detect_tissue(write_slide(tmp_path / "s.tiff", inked), tmp_path / "out", "s")
    assert facts["status"] == "ok", facts["failure_reason"]
    assert 0.03 < facts["pen_fraction"] < 0.3
    tissue = shapely.union_all(gpd.read_parquet(tmp_path / "out" / "tissue.parquet").geometry.values)
    # Points on the strokes (level-0 px = image px here) are not tissue; the tissue between them is.
    for (x0, y0), (x1, y1) in (blue, green):
        xs, ys = np.linspace(x0, x1, 7)[1:-1], np.linspace(y0, y1, 7)[1:-1]
        assert not shapely.contains_xy(tissue, xs, ys).any()
    assert shapely.contains_xy(tissue, [1200, 1200], [1000, 1100]).all()


def test_heavy_pen_marks_fail_the_slide(tmp_path, mosaic):
    strokes = [((450, y), (1950, y + 60)) for y in range(300, 1750, 220)]
    inked = draw_pen(mosaic, strokes, 170, (30, 60, 170))
    facts = detect_tissue(write_slide(tmp_path / "s.tiff", inked), tmp_path / "out", "s")
    assert facts["status"] == "failed" and facts["failure_stage"] == "wsi_qc"
    assert facts["failure_reason"].startswith("pen marks") and facts["pen_fraction"] > 0.3


def test_blurred_slide_fails(tmp_path, mosaic):
    import cv2

    blurred = cv2.GaussianBlur(mosaic, (0, 0), 2.0 / 0.5)          # 2 µm: out of focus
    facts = detect_tissue(write_slide(tmp_path / "s.tiff", blurred), tmp_path / "out", "s")
    assert facts["status"] == "failed" and facts["failure_reason"].startswith("blurred")
    assert facts["blurred_fraction"] > 0.5 and facts["sharpness_median"] < 250
    assert facts["pen_fraction"] < 0.01   # the other facts are still recorded
    with np.load(tmp_path / "out" / "patches.npz") as data:
        assert len(data["patches"]) == 0  # a failed slide gives the synth stage no textures


def test_blank_slide_fails(tmp_path, mosaic):
    blank = np.full_like(mosaic, GLASS)
    noise = np.random.default_rng(1).integers(-2, 3, blank.shape[:2])
    blank[..., 0] = np.clip(blank[..., 0].astype(int) + noise, 0, 255)
    facts = detect_tissue(write_slide(tmp_path / "s.tiff", blank), tmp_path / "out", "s")
    assert facts["status"] == "failed" and facts["failure_reason"].startswith("blank slide")
    assert facts["grey_std"] < 2.0


def test_mostly_background_fails(tmp_path, mosaic):
    sparse = np.full_like(mosaic, GLASS)
    sparse[1000:1060, 1000:1060] = mosaic[1000:1060, 1000:1060]   # one 30 µm speck of tissue
    facts = detect_tissue(write_slide(tmp_path / "s.tiff", sparse), tmp_path / "out", "s",
                          params=TissueParams(min_region_um2=100))
    assert facts["status"] == "failed"
    assert facts["failure_reason"].startswith(("mostly background", "too little tissue"))
    assert facts["tissue_fraction"] < 0.002


def test_absurd_mpp_fails_unless_overridden(tmp_path, mosaic):
    path = write_slide(tmp_path / "s.tiff", mosaic, mpp=5.0)
    facts = detect_tissue(path, tmp_path / "a", "s")
    assert facts["status"] == "failed" and "implausible pixel size 5" in facts["failure_reason"]
    assert facts["mpp_source"] == "slide" and facts["mpp"] == pytest.approx(5.0)
    facts = detect_tissue(path, tmp_path / "b", "s", mpp_override=0.5)
    assert facts["status"] == "ok" and facts["mpp_source"] == "override"


def test_slide_without_mpp_uses_fallback_or_fails(tmp_path, mosaic):
    path = write_slide(tmp_path / "s.tiff", mosaic, mpp=None)
    facts = detect_tissue(path, tmp_path / "a", "s", mpp_fallback=0.5)
    assert facts["status"] == "ok" and facts["mpp_source"] == "fallback" and facts["slide_mpp"] is None
    facts = detect_tissue(path, tmp_path / "b", "s")
    assert facts["status"] == "failed" and "pixel size" in facts["failure_reason"]


def test_wsi_verdict_thresholds():
    from nucseg.tissue import wsi_verdict

    ok = {"mpp": 0.25, "mpp_source": "slide", "grey_std": 30.0, "tissue_fraction": 0.3, "tissue_area_mm2": 50.0,
          "pen_fraction": 0.05, "blurred_fraction": 0.1, "sharpness_median": 900.0}
    assert wsi_verdict(ok) is None
    assert wsi_verdict({**ok, "mpp": 0.05}).startswith("implausible pixel size")
    assert wsi_verdict({**ok, "mpp": 0.05, "mpp_source": "override"}) is None
    assert wsi_verdict({**ok, "pen_fraction": 0.31}).startswith("pen marks")
    assert wsi_verdict({**ok, "blurred_fraction": 0.6}).startswith("blurred")
    assert wsi_verdict({**ok, "blurred_fraction": None}) is None     # not measured: not judged
