"""Hostile and careless inputs: refused at planning with the file and key named, or recorded per slide.

Real Snakemake runs in temporary folders: no sheet or config value may ever reach a shell as code, no bad
slide may stop its cohort's tables from being built.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import yaml

from .conftest import REPO
from .http_server import FileServer

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
SHEET_HEADER = "slide_id\tcancer_type\tsource\tslide_type\tmpp\tmpp_force\tmd5\n"


def snakemake(workdir: Path, *args: str, configfiles=("config/config.yaml",)) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [*SNAKEMAKE, "-d", str(workdir), "--configfile", *configfiles, "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)


def workdir_with(tmp_path: Path, rows: list[str], overlay: dict | None = None) -> Path:
    """A run folder: the repo's config, a cohort TEST of ``rows`` and an optional overlay config/test.yaml."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "config" / "cohorts" / "TEST.tsv").write_text(SHEET_HEADER + "".join(r + "\n" for r in rows))
    base = {"cohorts": {"TEST": "config/cohorts/TEST.tsv"}, "download": {"retries": 0}, "qc": {"n_patches": 5}}
    (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump({**base, **(overlay or {})}))
    return tmp_path


def plan(work: Path) -> subprocess.CompletedProcess:
    return snakemake(work, "-n", configfiles=("config/config.yaml", "config/test.yaml"))


# ------------------------------------------------------------------------------------------ the config


@pytest.mark.parametrize("overlay, key", [
    ({"segment": {"tile_szie": 256}}, "segment.tile_szie"),
    ({"model": {"train": {"max_stpes": 10}}}, "model.train.max_stpes"),
    ({"segmnet": {"tile_size": 256}}, "segmnet"),
    ({"segment": {"tile_size": "big"}}, "segment.tile_size"),
    ({"segment": {"tile_size": 0}}, "segment.tile_size"),
    ({"segment": {"tile_size": -512}}, "segment.tile_size"),
    ({"segment": {"batch_size": -1}}, "segment.batch_size"),
    ({"qc": {"bad_score": "high"}}, "qc.bad_score"),
    ({"tissue": {"max_mpp": 0}}, "tissue.max_mpp"),
    ({"synth": {"refiner": {"params": {"stepz": 3}}}}, "synth.refiner.params.stepz"),
    ({"model": {"checkpoint": "train", "name": "default"}}, "model.name"),
])
def test_bad_config_is_refused_at_planning_naming_key_and_file(tmp_path, overlay, key):
    work = workdir_with(tmp_path, ["S1\tTEST\tnowhere.svs\t\t\t\t"], overlay)
    proc = plan(work)
    assert proc.returncode != 0
    problem = next((line for line in (proc.stdout + proc.stderr).splitlines() if f": {key}:" in line), None)
    assert problem is not None, proc.stderr[-3000:]
    assert "config/test.yaml" in problem
    assert not (work / "results").exists() and not (work / "logs").exists()


def test_a_key_set_in_the_base_config_is_named_with_that_file(tmp_path):
    work = workdir_with(tmp_path, ["S1\tTEST\tnowhere.svs\t\t\t\t"])
    base = work / "config" / "config.yaml"
    base.write_text(base.read_text().replace("  tile_size: 512\n  margin_um", "  tile_size: 0\n  margin_um", 1))
    proc = plan(work)
    assert proc.returncode != 0
    assert "config/config.yaml: segment.tile_size:" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------ the sample sheet


@pytest.mark.parametrize("row, expected", [
    ("S1\tTEST\tslide.svs\t\t0\t\t", "mpp: 0.0 µm/px is outside [0.1, 2.0]"),
    ("S1\tTEST\tslide.svs\t\t5\t\t", "mpp: 5.0 µm/px is outside [0.1, 2.0]"),
    ("S1\tTEST\tslide.svs\t\t1e-7\ttrue\t", "mpp: 1e-07 µm/px is outside [0.01, 20.0]"),
    ("-h\tTEST\tslide.svs\t\t\t\t", "slide_id: '-h' does not match"),
    ("--help\tTEST\tslide.svs\t\t\t\t", "slide_id: '--help' does not match"),
    ("S1\tTEST\tslide.svs\tXX\t\t\t", "slide_type: 'XX' does not match"),
    ("S1\tOTHER\tslide.svs\t\t\t\t", "cancer_type: 'OTHER' in the sheet of cohort 'TEST'"),
])
def test_bad_sheet_row_is_refused_at_planning_naming_sheet_and_row(tmp_path, row, expected):
    work = workdir_with(tmp_path, ["OK1\tTEST\tslide.svs\t\t\t\t", row])
    proc = plan(work)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert f"config/cohorts/TEST.tsv: data row 2 (slide_id '{row.split(chr(9))[0]}'): {expected}" in out, out[-3000:]


def test_forced_mpp_outside_the_qc_range_is_planned(tmp_path):
    (tmp_path / "slide.svs").touch()
    work = workdir_with(tmp_path, ["S1\tTEST\tslide.svs\t\t5\ttrue\t"])
    proc = plan(work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tissue" in proc.stdout


# --------------------------------------------------------------------- schema and dataclasses agree


def _sections():
    from nucseg.grading import QCParams
    from nucseg.refiner import RefinerParams
    from nucseg.segment import SegmentParams
    from nucseg.synth import SynthParams
    from nucseg.tissue import TissueParams
    from nucseg.train import TrainParams

    # (path in the config, dataclass, fields the workflow sets itself, keys that are no dataclass field)
    return [(("tissue",), TissueParams, set(), set()),
            (("synth", "params"), SynthParams, {"mpp", "workers"}, set()),
            (("synth", "refiner", "params"), RefinerParams, {"mpp", "num_threads"}, set()),
            (("model", "train"), TrainParams, {"mpp"}, set()),
            (("segment",), SegmentParams, set(), set()),
            (("qc",), QCParams, set(), set())]


def _section_schema(schema, path):
    node = schema
    for key in path:
        node = node["properties"][key]
    return node


@pytest.mark.parametrize("path, cls, workflow_set, extra", _sections(),
                         ids=lambda v: ".".join(v) if isinstance(v, tuple) else None)
def test_schema_and_parameter_dataclass_agree(path, cls, workflow_set, extra):
    """Every dataclass field has a schema entry (and no other key), whose type its default satisfies."""
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    section = _section_schema(schema, path)
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    assert set(section["properties"]) - extra == set(fields) - workflow_set
    assert section["additionalProperties"] is False
    defaults = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if k not in workflow_set}
    # The defaults, placed where the config holds them, pass the schema.
    config = {"cohorts": {"X": "x.tsv"}}
    node = config
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = defaults
    jsonschema.Draft202012Validator(schema).validate(config)


def test_shipped_configs_pass_the_schema():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(base)
    for overlay in sorted((REPO / "config").glob("*.yaml")):
        merged = _merge(base, yaml.safe_load(overlay.read_text()) or {})
        errors = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(merged)]
        assert not errors, (overlay.name, errors)


def _merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


# ------------------------------------------------------------------- a real run with hostile values

ODD_NAME = "it's \"odd\" $HOME `id` ü slide.tiff"
INJECTION = "/x' -h; touch INJECTED_MARKER; echo '"


@pytest.mark.slow
def test_hostile_sheet_runs_no_command_and_every_slide_is_graded_or_recorded(tmp_path):
    """One good slide under an odd name, one under a `$(...)` name, an injection URL (HTTP 404), a download
    with the wrong md5 and a truncated file: the cohort tables are built, every slide has its row."""
    from nucseg.demo import make_demo_slide

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    good = make_demo_slide(incoming / ODD_NAME, 768, 640, 0.25, seed=5)
    shutil.copy(good, incoming / "$(touch INJECTED_SUBST).tiff")
    (incoming / "cut.svs").write_bytes(good.read_bytes()[:3000])
    with FileServer({"good.tiff": good}) as server:
        rows = [f"ODD\tTEST\tincoming/{ODD_NAME}\tDX\t\t\t",
                "SUBST\tTEST\tincoming/$(touch INJECTED_SUBST).tiff\t\t\t\t",
                f"INJ\tTEST\t{server.url}{INJECTION}\t\t\t\t",
                f"BADMD5\tTEST\t{server.url}/data/good.tiff\t\t\t\t{'0' * 32}",
                "CUT\tTEST\tincoming/cut.svs\t\t\t\t"]
        work = workdir_with(tmp_path, rows, {"build": ["TEST"]})
        proc = snakemake(work, "results/qc/slides.parquet", configfiles=("config/config.yaml", "config/test.yaml"))
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert not list(tmp_path.rglob("INJECTED*")) and not list(REPO.glob("INJECTED*"))
    slides = pd.read_parquet(work / "results/qc/slides.parquet").set_index("slide_id")
    assert sorted(slides.index) == ["BADMD5", "CUT", "INJ", "ODD", "SUBST"]
    for ok in ("ODD", "SUBST"):
        assert slides.loc[ok, "status"] == "ok" and slides.loc[ok, "n_nuclei"] > 0
        assert slides.loc[ok, "grade"] != "Unacceptable" or slides.loc[ok, "pct_bad_patches"] > 20
    expected = {"INJ": ("download", "HTTP 404"), "BADMD5": ("download", "md5 mismatch"), "CUT": ("wsi_qc", "")}
    for slide_id, (stage, reason) in expected.items():
        row = slides.loc[slide_id]
        assert (row.status, row.grade, row.failure_stage) == ("failed", "Unacceptable", stage)
        assert reason in row.failure_reason
    # The injection text is a source like any other: recorded as given.
    assert slides.loc["INJ", "source"] == f"{server.url}{INJECTION}"


# ------------------------------------------------------------- errors inside a per-slide stage


def test_any_tissue_error_is_recorded_for_the_slide(tmp_path, demo_slide):
    from nucseg.tissue import detect_tissue

    facts = detect_tissue(demo_slide, tmp_path, "zero", mpp_override=0.0)  # ZeroDivisionError inside
    assert (facts["status"], facts["failure_stage"]) == ("failed", "tissue")
    assert facts["failure_reason"].startswith("ZeroDivisionError")
    assert yaml.safe_load((tmp_path / "wsi.json").read_text())["failure_stage"] == "tissue"
    assert len(pd.read_parquet(tmp_path / "tiles.parquet")) == 0


def test_a_segment_error_is_recorded_in_an_empty_file_and_graded(tmp_path, demo_slide, demo_tissue, real_model):
    """The slide passed tissue detection, then its file breaks: segment records it, QC grades it."""
    from nucseg import io
    from nucseg.grading import QCParams
    from nucseg.qc import slide_qc
    from nucseg.segment import segment_slide

    broken = tmp_path / "broken.tiff"
    broken.write_bytes(demo_slide.read_bytes()[:5000])
    out = tmp_path / "nuclei.parquet"
    summary = segment_slide(broken, out, real_model, tissue_path=demo_tissue / "tissue.parquet",
                            slide_id="demo", progress=False)
    assert (summary["status"], summary["failure_stage"], summary["n_nuclei"]) == ("failed", "segment", 0)
    meta = io.read_provenance(out)
    assert meta["status"] == "failed" and meta["failure_reason"] == summary["failure_reason"]
    assert len(pd.read_parquet(out)) == 0
    row = slide_qc(demo_tissue / "wsi.json", out, demo_tissue / "tiles.parquet", broken, tmp_path / "qc.json",
                   tmp_path / "qc_patches.parquet", cancer_type="T", params=QCParams(n_patches=2))
    assert (row["status"], row["failure_stage"], row["grade"]) == ("failed", "segment", "Unacceptable")
    assert row["failure_reason"] == summary["failure_reason"]


def test_a_model_error_fails_the_job_instead_of_grading_every_slide(tmp_path, demo_slide, demo_tissue):
    from nucseg.segment import segment_slide

    with pytest.raises(FileNotFoundError):
        segment_slide(demo_slide, tmp_path / "n.parquet", tmp_path / "missing.pt",
                      tissue_path=demo_tissue / "tissue.parquet", progress=False)
    assert not (tmp_path / "n.parquet").exists()
