"""The demo cohort through a real single-node SLURM cluster (tests/slurm/start_cluster.sh starts one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.slow


def cluster_ready() -> str | None:
    """None when a SLURM node is up, else why not."""
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "SLURM is not installed (run tests/slurm/start_cluster.sh as root)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if proc.returncode != 0 or not re.search(r"idle|mixed|allocated", proc.stdout):
        return f"no SLURM node is up ({proc.stdout.strip() or proc.stderr.strip()}); run tests/slurm/start_cluster.sh"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed"
    return None


def run(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", "config/config.yaml", "config/test.yaml", *extra]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def prepare(workdir: Path, checkpoint: Path) -> Path:
    shutil.copytree(REPO / "config", workdir / "config")
    config = {"demo": {"slides": {"DEMO-01": {"width": 1024, "height": 768, "mpp": 0.25, "seed": 1},
                                  "DEMO-02": {"width": 640, "height": 512, "mpp": 0.5, "seed": 2}}},
              "model": {"checkpoint": str(checkpoint)}, "qc": {"n_patches": 5}}
    (workdir / "config" / "test.yaml").write_text(yaml.safe_dump(config))
    return workdir


def test_demo_through_slurm_matches_local_run(tmp_path, small_model):
    reason = cluster_ready()
    if reason:
        pytest.skip(reason)
    local = prepare(tmp_path / "local", small_model)
    run(local, "--cores", "2")
    cluster = prepare(tmp_path / "slurm", small_model)
    proc = run(cluster, "--workflow-profile", str(REPO / "workflow" / "profiles" / "slurm"),
               "--slurm-no-account", "--slurm-keep-successful-logs", "--slurm-init-seconds-before-status-checks", "2",
               "--seconds-between-status-checks", "2",
               # One 2-CPU node: ask for what it has.
               "--set-resources", "segment:cpus_per_task=1", "synth:cpus_per_task=1", "train:cpus_per_task=1",
               "--set-threads", "segment=1", "synth=1", "train=1")
    log = proc.stdout + proc.stderr
    job_ids = re.findall(r"submitted with SLURM jobid (\d+)", log)
    # Per slide: demo slide and segment as their own jobs, tissue in a group job (the profile's
    # slide_prep group); plus synth, train, the aggregates and the report figures.
    assert len(job_ids) >= 8, log[-3000:]
    slurm_logs = cluster / ".snakemake" / "slurm_logs"
    assert len(list(slurm_logs.glob("rule_segment/**/*.log"))) == 2
    # The plugin names a group job's folder group_<group>_<rules>.
    assert list(slurm_logs.glob("group_slide_prep_*/*.log")), "no SLURM job ran group slide_prep"
    queue = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(job_ids) <= set(queue)   # the jobs really went through this cluster
    # Same outputs as the local run.
    a = pd.read_parquet(local / "results/qc/slides.parquet").drop(columns="seconds_by_stage")
    b = pd.read_parquet(cluster / "results/qc/slides.parquet").drop(columns="seconds_by_stage")
    pd.testing.assert_frame_equal(a, b)
    for slide in ("DEMO-01", "DEMO-02"):
        na = gpd.read_parquet(local / f"results/DEMO/{slide}/nuclei.parquet")
        nb = gpd.read_parquet(cluster / f"results/DEMO/{slide}/nuclei.parquet")
        assert len(na) == len(nb) > 0
        assert na.geometry.geom_equals(nb.geometry).all()
