"""End-to-end: the real Snakemake workflow on a small demo cohort (plus a broken slide), in a temp dir."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import shapely
import yaml

from nucseg import io

from .conftest import REPO

pytestmark = pytest.mark.slow

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
TEST_CONFIG = {
    "demo": {"slides": {"DEMO-01": {"width": 1280, "height": 1024, "mpp": 0.25, "seed": 1},
                        "DEMO-02": {"width": 768, "height": 640, "mpp": 0.5, "seed": 2}}},
    "synth": {"params": {"n_patches": 64, "patch_size": 128, "shard_size": 32}},
    "model": {"name": "e2e", "train": {"max_steps": 150, "disc_steps": 10, "batch_size": 8, "base": 8, "lr": 0.005}},
    "qc": {"n_patches": 10},
}


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = SNAKEMAKE + ["-d", str(workdir), "--configfile", "config/config.yaml", "config/test.yaml",
                       "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("workflow")
    shutil.copytree(REPO / "config", work / "config")
    (work / "config" / "test.yaml").write_text(yaml.safe_dump(TEST_CONFIG))
    # A truncated slide in the cohort: it must be graded, not crash the run.
    broken = work / "incoming" / "broken.svs"
    broken.parent.mkdir()
    sheet = work / "config" / "cohorts" / "DEMO.tsv"
    sheet.write_text(sheet.read_text() + "DEMO-BROKEN\tDEMO\tincoming/broken.svs\tDX\n")
    from nucseg.demo import make_demo_slide

    make_demo_slide(work / "incoming" / "full.tiff", 512, 512, 0.25, seed=3)
    broken.write_bytes((work / "incoming" / "full.tiff").read_bytes()[:4000])
    proc = snakemake(work)
    return work, proc


def test_dry_run_plans_every_stage(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump(TEST_CONFIG))
    out = snakemake(tmp_path, "-n", "--quiet", "rules").stdout
    for rule in ("demo_slide", "download", "tissue", "synth", "train", "segment", "qc", "qc_cohort", "qc_all"):
        assert rule in out


def test_every_output_exists_and_is_consistent(run):
    work, _ = run
    slides = pd.read_parquet(work / "results/qc/slides.parquet")
    assert sorted(slides.slide_id) == ["DEMO-01", "DEMO-02", "DEMO-BROKEN"]
    assert pd.read_parquet(work / "results/qc/DEMO.parquet").shape[0] == 3
    ok = slides[slides.status == "ok"]
    assert sorted(ok.slide_id) == ["DEMO-01", "DEMO-02"]
    assert (ok.n_nuclei > 20).all() and ok.grade.notna().all()
    assert set(ok.mpp) == {0.25, 0.5} and set(ok.mpp_source) == {"slide"}
    model_id = json.loads((work / "results/models/e2e/model_card.json").read_text())["model_id"]
    assert set(ok.model_id) == {model_id}
    for slide_id in ok.slide_id:
        d = work / "results" / "DEMO" / slide_id
        nuclei = gpd.read_parquet(d / "nuclei.parquet")
        tissue = shapely.union_all(gpd.read_parquet(d / "tissue.parquet").geometry.values)
        assert shapely.contains_xy(tissue, nuclei.centroid_x, nuclei.centroid_y).all()
        meta = io.read_provenance(d / "nuclei.parquet")
        assert meta["model_id"] == model_id and len(meta["config_hash"]) == 16 and meta["mpp_source"] == "slide"
        assert (d / "tissue.png").stat().st_size > 0 and (d / "qc_patches.parquet").exists()
        assert (work / "logs" / "segment" / "DEMO" / f"{slide_id}.log").read_text().strip()
    grades = pd.read_csv(work / "results/qc/grades.tsv", sep="\t", index_col=0)
    assert grades.loc["DEMO"].sum() == 3
    assert (work / "results/synth/DEMO/contact_sheet.png").stat().st_size > 0


def test_nuclei_dataset_is_queryable_without_loading_everything(run):
    import duckdb
    import pyarrow.dataset as ds

    work, _ = run
    root = work / "results" / "nuclei"
    dataset = ds.dataset(root, format="parquet", partitioning="hive")
    assert {"cancer_type", "slide_id", "area_um2", "geometry"} <= set(dataset.schema.names)
    one = dataset.to_table(filter=ds.field("slide_id") == "DEMO-02", columns=["area_um2"])
    per_slide = gpd.read_parquet(work / "results/DEMO/DEMO-02/nuclei.parquet")
    assert one.num_rows == len(per_slide)
    counts = duckdb.sql(f"SELECT slide_id, count(*) AS n, avg(area_um2) AS mean_area FROM "
                        f"read_parquet('{root}/*/*/*.parquet', hive_partitioning=true) "
                        "GROUP BY slide_id ORDER BY slide_id").fetchall()
    slides = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id")
    assert [(sid, n) for sid, n, _ in counts] == [(sid, slides.n_nuclei[sid]) for sid in ("DEMO-01", "DEMO-02")]
    # The broken slide's empty file is there too, but holds no rows.
    assert (root / "cancer_type=DEMO" / "slide_id=DEMO-BROKEN" / "nuclei.parquet").exists()


def test_broken_slide_is_recorded_not_fatal(run):
    work, _ = run
    row = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id").loc["DEMO-BROKEN"]
    assert row.status == "failed" and row.grade == "Unacceptable" and row.failure_stage == "wsi_qc"
    assert "broken" in (work / "logs/tissue/DEMO/DEMO-BROKEN.log").read_text().lower()
    assert row.failure_reason


def test_rerun_is_a_no_op_and_param_change_replans_only_downstream(run):
    work, _ = run
    assert "Nothing to be done" in snakemake(work, "-n").stdout + snakemake(work, "-n").stderr
    out = snakemake(work, "-n", "--config", "qc={'n_patches': 11}").stdout
    planned = planned_jobs(out)
    assert planned == {"qc": 3, "qc_cohort": 1, "qc_all": 1, "all": 1}, out[-2000:]
    # A segmentation parameter: segment and everything after it, never download, tissue or training.
    out = snakemake(work, "-n", "--config", "segment={'min_area_um2': 7.0}").stdout
    assert planned_jobs(out) == {"segment": 3, "qc": 3, "qc_cohort": 1, "qc_all": 1, "all": 1}, out[-2000:]


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    rows = re.findall(r"^([A-Za-z_]\w*)\s+(\d+)$", dry_run_output, re.M)
    return {rule: int(n) for rule, n in rows if rule != "total"}
