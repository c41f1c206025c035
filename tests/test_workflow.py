"""End-to-end: the real Snakemake workflow on a small demo cohort plus broken slides, in a temp dir.

The cohort: two good demo slides (40x, 20x); a slide without µm/px (fallback, recorded, still
segmented); a truncated file; a file that is not a slide; a blank slide. One run serves every test here,
including the HTML report checked in a real headless browser.
"""

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
    # The whole label-free chain (synth -> train -> segment), small: no self-training, a shallow network.
    "model": {"checkpoint": "train", "name": "e2e",
              "train": {"max_steps": 150, "disc_steps": 10, "batch_size": 8, "base": 8, "depth": 3, "lr": 0.005,
                        "self_training_steps": 0}},
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
    # Broken slides in the cohort: each must be graded with its failure named, not crash the run.
    import numpy as np
    import tifffile

    from nucseg.demo import demo_slide_image, make_demo_slide, write_pyramidal_tiff

    incoming = work / "incoming"
    incoming.mkdir()
    make_demo_slide(incoming / "full.tiff", 512, 512, 0.25, seed=3)
    (incoming / "broken.svs").write_bytes((incoming / "full.tiff").read_bytes()[:4000])   # truncated
    (incoming / "notaslide.svs").write_text("slide_id\tcancer_type\tsource\n")             # not a slide
    # No resolution tags: the configured mpp_fallback is used, recorded, and the slide segmented.
    tifffile.imwrite(incoming / "nompp.tiff", demo_slide_image((640, 768), 0.25, seed=4), tile=(256, 256),
                     compression="jpeg", photometric="rgb")
    write_pyramidal_tiff(incoming / "blank.tiff", np.full((512, 640, 3), (242, 240, 244), np.uint8), 0.25)
    sheet = work / "config" / "cohorts" / "DEMO.tsv"
    # One frozen section (TS): its hematoxylin gate works by pixel, the FFPE (DX) slides' by nucleus.
    sheet.write_text(sheet.read_text() + "".join(f"{sid}\tDEMO\tincoming/{name}\t{SLIDE_TYPES.get(sid, 'DX')}\n"
                                                 for sid, name in BROKEN.items()))
    proc = snakemake(work)
    return work, proc


BROKEN = {"DEMO-BROKEN": "broken.svs", "DEMO-NOTASLIDE": "notaslide.svs", "DEMO-NOMPP": "nompp.tiff",
          "DEMO-BLANK": "blank.tiff"}
OK_SLIDES = ["DEMO-01", "DEMO-02", "DEMO-NOMPP"]
SLIDE_TYPES = {"DEMO-NOMPP": "TS"}
ALL_SLIDES = sorted(["DEMO-01", "DEMO-02", *BROKEN])


def test_dry_run_plans_every_stage(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump(TEST_CONFIG))
    out = snakemake(tmp_path, "-n", "--quiet", "rules").stdout
    for rule in ("demo_slide", "tissue", "synth", "train", "segment", "qc_cohort", "qc_all",
                 "report_grades", "report_histograms", "report_thumbnails"):
        assert rule in out


def test_default_config_segments_with_the_shipped_model_and_trains_nothing(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    command = SNAKEMAKE + ["-d", str(tmp_path), "--configfile", "config/config.yaml", "config/demo.yaml", "-n", "-p"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, check=True).stdout
    jobs = planned_jobs(out)
    assert jobs["segment"] == 2 and "synth" not in jobs and "train" not in jobs, jobs
    shipped = str(REPO / "src" / "nucseg" / "weights" / "default.pt")
    assert all(f"--checkpoint {shipped}" in line for line in out.splitlines() if " segment " in line)


# The shipped recipe's overlay names the real slides of ../shared/data beside the repo, not beside a test folder.
TRAIN_OVERLAYS = sorted(p.name for p in (REPO / "config").glob("train*.yaml") if p.name != "train_shipped_recipe.yaml")


@pytest.mark.parametrize("overlay", TRAIN_OVERLAYS)
def test_training_overlays_plan_their_model_with_their_settings(tmp_path, overlay):
    """Each config/train_*.yaml (their commands are in the README and docs/experiments.md) plans a train job
    into its own model folder whose command carries every setting the overlay names."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    settings = yaml.safe_load((REPO / "config" / overlay).read_text())
    name = settings["model"]["name"]
    test_config = {**TEST_CONFIG, **settings, "model": {**TEST_CONFIG["model"], **settings["model"],
                                                        "train": {**TEST_CONFIG["model"]["train"],
                                                                  **settings["model"].get("train", {})}}}
    (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump(test_config))
    out = snakemake(tmp_path, "-n", "-p", f"results/models/{name}/model.pt").stdout
    assert sum(line.strip() == "rule train:" for line in out.splitlines()) == 1
    command = next(line for line in out.splitlines() if " train --synth " in line)
    assert settings["model"]["checkpoint"] == "train" and name not in ("default", "shipped")
    assert f"--out-dir results/models/{name} " in command
    for key, value in settings["model"].get("train", {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            expected = flag if value else "--no-" + flag[2:]
        elif isinstance(value, list):
            expected = f"{flag} {' '.join(map(str, value))}"
        else:
            expected = f"{flag}={value}"
        assert re.search(rf"(^| ){re.escape(expected)}( |$)", command), key


def test_every_output_exists_and_is_consistent(run):
    work, _ = run
    slides = pd.read_parquet(work / "results/qc/slides.parquet")
    assert sorted(slides.slide_id) == ALL_SLIDES
    assert pd.read_parquet(work / "results/qc/DEMO.parquet").shape[0] == len(ALL_SLIDES)
    ok = slides[slides.status == "ok"]
    assert sorted(ok.slide_id) == OK_SLIDES
    assert (ok.n_nuclei > 20).all() and ok.grade.notna().all() and (ok.n_patches_checked > 0).all()
    assert set(ok.mpp) == {0.25, 0.5}
    assert ok.set_index("slide_id").mpp_source.to_dict() == {"DEMO-01": "slide", "DEMO-02": "slide",
                                                            "DEMO-NOMPP": "fallback"}
    for seconds in ok.seconds_by_stage:   # per-stage timing, QC included
        assert {"tissue", "segment", "qc"} <= set(json.loads(seconds))
    card = json.loads((work / "results/models/e2e/model_card.json").read_text())
    assert set(ok.model_id) == {card["model_id"]}
    # The card says how the model was made: the train rule's command line and the generator's parameters.
    assert card["command"].startswith("nucseg") and " train " in card["command"]
    assert "results/synth/DEMO" in card["command"] and card["training_data"]["synth_params"][0]["n_patches"] > 0
    for slide_id in ok.slide_id:
        d = work / "results" / "DEMO" / slide_id
        nuclei = gpd.read_parquet(d / "nuclei.parquet")
        tissue = shapely.union_all(gpd.read_parquet(d / "tissue.parquet").geometry.values)
        assert shapely.contains_xy(tissue, nuclei.centroid_x, nuclei.centroid_y).all()
        meta = io.read_provenance(d / "nuclei.parquet")
        assert meta["model_id"] == card["model_id"] and len(meta["config_hash"]) == 16
        assert meta["mpp_source"] == ("fallback" if slide_id == "DEMO-NOMPP" else "slide")
        assert meta["gate_unit"] == "off" and float(meta["hematoxylin_level"]) > 0  # no gate; level for QC
        assert (d / "tissue.png").stat().st_size > 0 and (d / "qc_overlay.png").stat().st_size > 0
        patches = pd.read_parquet(d / "qc_patches.parquet")
        assert len(patches) and {"disagreement", "entropy", "missed", "false", "shape", "score"} <= set(patches)
        assert patches.disagreement.notna().all()   # the model-based signals were measured
        assert io.read_provenance(d / "qc_patches.parquet")["qc_model_id"] == card["model_id"]
        assert (work / "logs" / "segment" / "DEMO" / f"{slide_id}.log").read_text().strip()
    grades = pd.read_csv(work / "results/qc/grades.tsv", sep="\t", index_col=0)
    assert grades.loc["DEMO"].sum() == len(ALL_SLIDES)
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
    assert [(sid, n) for sid, n, _ in counts] == [(sid, slides.n_nuclei[sid]) for sid in OK_SLIDES]
    # The broken slide's empty file is there too, but holds no rows.
    assert (root / "cancer_type=DEMO" / "slide_id=DEMO-BROKEN" / "nuclei.parquet").exists()


@pytest.mark.parametrize("slide_id, reason", [("DEMO-BROKEN", "cannot read"),
                                               ("DEMO-NOTASLIDE", "not a readable slide"),
                                               ("DEMO-BLANK", "blank slide")])
def test_broken_slides_are_recorded_not_fatal(run, slide_id, reason):
    work, _ = run
    row = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id").loc[slide_id]
    assert row.status == "failed" and row.grade == "Unacceptable" and row.failure_stage == "wsi_qc"
    assert reason in row.failure_reason and row.n_nuclei == 0 and row.n_patches_checked == 0
    assert slide_id in (work / f"logs/tissue/DEMO/{slide_id}.log").read_text()
    facts = json.loads((work / f"results/DEMO/{slide_id}/wsi.json").read_text())
    assert facts["status"] == "failed" and facts["failure_reason"] == row.failure_reason
    # Every failure also has its card in the report's thumbnails (all Unacceptable slides are shown).
    assert (work / f"results/report/thumbnails/Unacceptable/DEMO/{slide_id}.png").stat().st_size > 0


def test_rerun_is_a_no_op_and_param_change_replans_only_downstream(run):
    work, _ = run
    assert "Nothing to be done" in snakemake(work, "-n").stdout + snakemake(work, "-n").stderr
    n = len(ALL_SLIDES)
    report = {"report_grades": 1, "report_histograms": 1, "report_thumbnails": 1}
    # A QC grading level: only the aggregates re-grade from the stored patch signals.
    out = snakemake(work, "-n", "--config", "qc={'n_patches': 10, 'max_entropy': 0.4}").stdout
    assert planned_jobs(out) == {"qc_cohort": 1, "qc_all": 1, **report, "all": 1}, out[-2000:]
    # What QC measures (here: how many patches) and segmentation parameters rerun the segment jobs and
    # everything after them, never download, tissue or training.
    for change in ("qc={'n_patches': 11}", "segment={'min_area_um2': 7.0}"):
        out = snakemake(work, "-n", "--config", change).stdout
        assert planned_jobs(out) == {"segment": n, "qc_cohort": 1, "qc_all": 1, **report, "all": 1}, out[-2000:]
    # How the segment jobs run (tile readers, post-processing processes, batch size) re-segments nothing.
    result = snakemake(work, "-n", "--config", "segment={'workers': 1, 'postprocess_workers': 2, 'batch_size': 2}")
    assert "Nothing to be done" in result.stdout + result.stderr, result.stdout[-2000:]


def test_new_grading_levels_regrade_without_segmenting_again(run):
    work, _ = run
    segmented = {p: p.stat().st_mtime_ns for p in (work / "results" / "DEMO").glob("*/nuclei.parquet")}
    before = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id")
    try:
        # Every patch passes at an absurd level: every readable slide becomes Best; failures stay failed.
        snakemake(work, "results/qc/slides.parquet", "--config", "qc={'n_patches': 10, 'bad_score': 1000.0}")
        after = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id")
        ok = after.status == "ok"
        assert (after.pct_bad_patches[ok] == 0).all() and (after.grade[ok] == "Best").all()
        assert (after.grade[~ok] == "Unacceptable").all()
        # The default levels give back exactly the grades measured with them.
        snakemake(work, "results/qc/slides.parquet")
        again = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id")
        pd.testing.assert_series_equal(again.grade, before.grade)
        pd.testing.assert_series_equal(again.pct_bad_patches, before.pct_bad_patches)
    finally:
        snakemake(work, "results/qc/slides.parquet")
    assert {p: p.stat().st_mtime_ns for p in segmented} == segmented   # nothing was segmented again


def test_report_renders_in_a_headless_browser(run):
    """`snakemake --report`: grade table, histograms, slide thumbnails and contact sheets, as Chromium shows them."""
    from . import report_browser as browser

    work, _ = run
    snakemake(work, "--report", "report.html")
    report = work / "report.html"
    assert report.stat().st_size > 0
    if browser.chromium() is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run does): the report was built "
                    "but not rendered")
    dom = browser.render(report, ["Quality control", "Grades", "eye:grade table per cancer type"], work)
    assert browser.clicked(dom) == 3
    (table,) = browser.iframe_documents(dom)
    assert "grade-table" in table and "<th>DEMO</th>" in table and "Unacceptable" in table
    for label, name in (("% bad patches per slide", "pct_bad_patches.png"),
                        ("nuclei per mm² of tissue", "nuclei_density.png")):
        dom = browser.render(report, ["Quality control", "Distributions", f"eye:{label}"], work)
        assert browser.decoded_images(dom).get(name, (0, 0))[0] >= 600, (name, browser.decoded_images(dom))
    # Every Unacceptable slide has a thumbnail; the browser lists them and shows one.
    dom = browser.render(report, ["Slides", "Unacceptable", "eye:DEMO-BLANK"], work)
    text = browser.visible_text(dom)
    assert all(s in text for s in ("DEMO-BLANK", "DEMO-BROKEN", "DEMO-NOTASLIDE"))
    assert browser.decoded_images(dom).get("DEMO-BLANK.png", (0, 0))[0] > 0
    dom = browser.render(report, ["Synthetic data", "eye:DEMO"], work)
    assert browser.decoded_images(dom).get("contact_sheet.png", (0, 0))[0] > 0


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run as {rule: count}."""
    rows = re.findall(r"^([A-Za-z_]\w*)\s+(\d+)$", dry_run_output, re.M)
    return {rule: int(n) for rule, n in rows if rule != "total"}
