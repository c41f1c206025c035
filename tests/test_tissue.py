import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from nucseg import io
from nucseg.tissue import TissueParams, detect_tissue, mask_to_polygons, tile_grid, tissue_mask

from .conftest import CMU, FIXTURES, TCGA_TS, need


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
    x0, y0, x1, y1 = polys[0].bounds
    assert (x0, y0) == pytest.approx((42, 22), abs=1) and (x1, y1) == pytest.approx((78, 58), abs=1)
    assert polys[0].is_valid


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
    assert 0.02 < area_mm2 < 1536 * 1280 * 0.25**2 / 1e6
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


def test_real_slide_with_mpp(tmp_path):
    facts = detect_tissue(need(CMU), tmp_path, "cmu", backend="openslide")
    assert facts["status"] == "ok" and facts["mpp"] == pytest.approx(0.499)
    # Most of this small region is tissue, but not all (glass at the edges).
    assert 0.2 < facts["tissue_area_mm2"] / (2220 * 2967 * 0.499**2 / 1e6) < 0.95


@pytest.mark.parametrize("name, reason", [("boxes.tiff", "pixel size"), ("small.svs", "too little tissue")])
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
