"""Kill-safe resume: SIGKILL a multi-slide run during segmentation, rerun, compare with a clean run."""

from __future__ import annotations

import base64
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.slow

SLIDES = {f"DEMO-0{i}": {"width": 1024, "height": 896, "mpp": 0.25, "seed": i} for i in range(1, 5)}


def prepare(workdir: Path, checkpoint: Path) -> Path:
    shutil.copytree(REPO / "config", workdir / "config")
    sheet = "slide_id\tcancer_type\tsource\n" + "".join(f"{s}\tDEMO\tresources/demo/{s}.tiff\n" for s in SLIDES)
    (workdir / "config" / "cohorts" / "DEMO.tsv").write_text(sheet)
    config = {"demo": {"slides": SLIDES}, "model": {"checkpoint": str(checkpoint)}, "qc": {"n_patches": 5},
              "segment": {"tile_size": 256}}
    (workdir / "config" / "test.yaml").write_text(yaml.safe_dump(config))
    return workdir


def command(workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--configfile", "config/config.yaml", "config/test.yaml", "--cores", "1", *extra]


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def outputs(workdir: Path) -> dict[Path, int]:
    """Every result file and its modification time."""
    return {p: p.stat().st_mtime_ns for p in (workdir / "results").rglob("*") if p.is_file()}


def incomplete_outputs(workdir: Path) -> set[Path]:
    """Outputs Snakemake had marked as being written when it died (its .snakemake/incomplete records)."""
    root = workdir / ".snakemake" / "incomplete"
    found = set()
    for record in root.rglob("*") if root.exists() else []:
        if record.is_file() and record.name != "migration_underway":
            parts = record.relative_to(root).parts
            b64 = "".join(p.lstrip("@") for p in parts)
            found.add((workdir / base64.urlsafe_b64decode(b64).decode()).resolve())
    return found


def test_sigkill_during_segmentation_then_resume(tmp_path, small_model):
    clean = prepare(tmp_path / "clean", small_model)
    proc = subprocess.run(command(clean), capture_output=True, text=True, env=env(), cwd=clean)
    assert proc.returncode == 0, proc.stderr[-3000:]

    work = prepare(tmp_path / "killed", small_model)
    proc = subprocess.Popen(command(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
                            cwd=work, start_new_session=True)
    segment_logs = work / "logs" / "segment" / "DEMO"
    deadline = time.monotonic() + 600
    # Wait until one slide's segment job (segmentation, then QC signals) is done and the next has started,
    # then kill at a random moment.
    while time.monotonic() < deadline:
        done = list((work / "results" / "DEMO").glob("*/qc.json"))
        started = list(segment_logs.glob("*.log")) if segment_logs.exists() else []
        if done and len(started) > len(done):
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 1.0))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Finished = written and recorded as done; a job killed between the two is rightly rerun.
    incomplete = incomplete_outputs(work)
    before = {p: t for p, t in outputs(work).items() if p.resolve() not in incomplete}
    finished = {p for p in before if p.name == "nuclei.parquet"}
    assert finished and len(finished) < len(SLIDES)
    # A killed writer leaves at most a hidden temporary file, never a visible half-written result.
    assert all(".tmp" in p.name or p.name == ".snakemake_timestamp" for p in outputs(work) if p.name.startswith("."))

    # A SIGKILLed Snakemake leaves its lock behind: unlock, then resume.
    subprocess.run(command(work, "--unlock"), check=True, capture_output=True, env=env(), cwd=work)
    rerun = subprocess.run(command(work, "--rerun-incomplete"), capture_output=True, text=True, env=env(), cwd=work)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = outputs(work)
    # Leftovers were cleaned up (.snakemake_timestamp is Snakemake's own marker in directory outputs).
    assert not [p for p in after if p.name.startswith(".") and p.name != ".snakemake_timestamp"]
    # Nothing that had finished ran again.
    for path in before:
        if path.suffix in (".parquet", ".json", ".png", ".npz"):
            assert after[path] == before[path], f"{path} was rewritten"
    # The result equals an uninterrupted run's.
    a = pd.read_parquet(clean / "results/qc/slides.parquet").drop(columns=["seconds_by_stage"])
    b = pd.read_parquet(work / "results/qc/slides.parquet").drop(columns=["seconds_by_stage"])
    pd.testing.assert_frame_equal(a, b)
    for slide in SLIDES:
        na = gpd.read_parquet(clean / f"results/DEMO/{slide}/nuclei.parquet")
        nb = gpd.read_parquet(work / f"results/DEMO/{slide}/nuclei.parquet")
        assert len(na) == len(nb) and na.geometry.geom_equals(nb.geometry).all()
