"""GDC acquisition against a GDC-like server on 127.0.0.1: cohort sheets, downloads, a poisoned slide."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from nucseg.download import (DownloadError, build_cohort, cohort_from_manifest, fetch_slide,
                             read_failure_record, safe_slide_id)
from nucseg.download.gdc import CohortError, parse_barcode, query_files

from .conftest import CMU, REPO, TCGA_TS, need
from .http_server import FileServer

IDS = [f"{i:08x}-0000-4000-8000-{i:012x}" for i in range(1, 8)]


def catalogue(n: int = 7) -> tuple[dict, list[dict]]:
    files, hits = {}, []
    for i in range(n):
        path = need(TCGA_TS) if i % 2 else need(CMU)
        name = f"TCGA-AA-{1000 + i:04d}-01Z-00-DX1.{IDS[i].upper()}.svs"
        files[IDS[i]] = path
        hits.append(FileServer.hit(IDS[i], path, name, "TCGA-BRCA" if i < 5 else "TCGA-LUAD"))
    return files, hits


def test_paging_returns_every_file():
    files, hits = catalogue()
    with FileServer(files, hits) as server:
        got = query_files("TCGA-BRCA", api_url=server.url, page_size=2)
        pages = [r for r in server.requests if r["path"] == "/files"]
    assert sorted(h["file_id"] for h in got) == IDS[:5]
    assert len(pages) == 3 and [p["body"]["from"] for p in pages] == [0, 2, 4]
    filters = json.dumps(pages[0]["body"]["filters"])
    for needle in ('"Slide Image"', '"SVS"', '"open"', '"Diagnostic Slide"', '"TCGA-BRCA"'):
        assert needle in filters


def test_cohort_sheet_columns_and_ids():
    files, hits = catalogue()
    with FileServer(files, hits) as server:
        sheet = build_cohort("TCGA-BRCA", api_url=server.url)
    assert list(sheet.columns)[:3] == ["slide_id", "cancer_type", "source"]
    assert (sheet.cancer_type == "BRCA").all() and len(sheet) == 5
    assert sheet.slide_id.iloc[0] == "TCGA-AA-1000-01Z-00-DX1"
    assert (sheet.slide_type == "DX").all() and sheet.case_id.iloc[0] == "TCGA-AA-1000"
    assert sheet.md5.str.fullmatch("[0-9a-f]{32}").all()


def test_barcodes_and_unsafe_names():
    assert parse_barcode("TCGA-CR-7395-01A-01-TS1.abc.svs")["slide_type"] == "TS"
    assert parse_barcode("TCGA-A1-A0SB-01Z-00-DX1.x.svs")["case_id"] == "TCGA-A1-A0SB"
    assert safe_slide_id("slide 1.svs".replace(" ", "_")) == "slide_1"
    for bad in ("../etc/passwd.svs", "/abs/x.svs", "a/b.svs", "..", "a\\b.svs", "sp ace.svs", ""):
        with pytest.raises(CohortError):
            safe_slide_id(bad)


def test_manifest_import(tmp_path):
    manifest = tmp_path / "gdc_manifest.txt"
    manifest.write_text("id\tfilename\tmd5\tsize\tstate\n"
                        f"{IDS[0]}\tTCGA-AA-0001-01Z-00-DX1.{IDS[0]}.svs\t{'a' * 32}\t123\treleased\n"
                        f"{IDS[1]}\tTCGA-AA-0001-01Z-00-DX1.{IDS[1]}.svs\t{'b' * 32}\t456\treleased\n")
    sheet = cohort_from_manifest(manifest, "BRCA")
    # Two files with one barcode get distinct ids.
    assert sheet.slide_id.is_unique and sheet.slide_id.str.startswith("TCGA-AA-0001-01Z-00-DX1").all()
    assert sheet["size"].tolist() == ["123", "456"]
    (tmp_path / "bad.txt").write_text("foo\tbar\n1\t2\n")
    with pytest.raises(CohortError, match="not a GDC manifest"):
        cohort_from_manifest(tmp_path / "bad.txt", "BRCA")


def test_resumed_download_is_byte_identical_and_bad_md5_never_yields_a_slide(tmp_path):
    files, hits = catalogue(2)
    with FileServer(files, hits) as server:
        server.drop_after, server.fail_next, server.delay = 300_000, 1, 0.05
        md5 = hits[0]["md5sum"]
        out = fetch_slide(IDS[0], tmp_path / "a.svs", "a", md5=md5, size=hits[0]["file_size"],
                          api_url=server.url, backoff=0.01)
        assert hashlib.md5(out.read_bytes()).hexdigest() == md5
        server.corrupt.add(IDS[1])
        with pytest.raises(DownloadError, match="slide b: md5 mismatch") as exc:
            fetch_slide(IDS[1], tmp_path / "b.svs", "b", md5=hits[1]["md5sum"], api_url=server.url)
        assert exc.value.permanent
    assert not (tmp_path / "b.svs").exists() and not (tmp_path / "b.svs.part").exists()


def test_slow_response_times_out_and_is_retried(tmp_path):
    files, hits = catalogue(1)
    with FileServer(files, hits) as server:
        server.slow_next, server.slow_seconds = 1, 1.0
        out = fetch_slide(IDS[0], tmp_path / "a.svs", "a", md5=hits[0]["md5sum"], api_url=server.url,
                          timeout=0.3, backoff=0.01)
        assert len([r for r in server.requests if r["path"].startswith("/data")]) == 2
    assert hashlib.md5(out.read_bytes()).hexdigest() == hits[0]["md5sum"]


def test_cli_cohort_and_failure_record(tmp_path):
    files, hits = catalogue()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with FileServer(files, hits) as server:
        subprocess.run(["nucseg", "cohort", "--project", "TCGA-LUAD", "--api-url", server.url,
                        "--out", str(tmp_path / "LUAD.tsv")], check=True, env=env, capture_output=True)
        server.corrupt.add(IDS[5])
        proc = subprocess.run(["nucseg", "download", "--source", IDS[5], "--out-dir", str(tmp_path / "s"),
                               "--slide-id", "S5", "--md5", hits[5]["md5sum"], "--api-url", server.url,
                               "--on-failure", "record"], env=env, capture_output=True, text=True)
    sheet = pd.read_csv(tmp_path / "LUAD.tsv", sep="\t", comment="#", dtype=str)
    assert sorted(sheet.source) == IDS[5:7]
    assert proc.returncode == 0 and "md5 mismatch" in proc.stderr
    record = read_failure_record(tmp_path / "s")
    assert record["slide_id"] == "S5" and "md5 mismatch" in record["reason"]


@pytest.mark.slow
def test_snakemake_over_gdc_cohort_with_a_poisoned_slide(tmp_path, small_model):
    """Three GDC slides, one served with wrong bytes: two finish, the third is recorded as failed."""
    files, hits = catalogue(3)
    with FileServer(files, hits) as server:
        (tmp_path / "config" / "cohorts").mkdir(parents=True)
        subprocess.run([sys.executable, "-m", "nucseg.cli", "cohort", "--project", "TCGA-BRCA", "--api-url",
                        server.url, "--out", str(tmp_path / "config/cohorts/BRCA.tsv")], check=True,
                       capture_output=True)
        server.corrupt.add(IDS[2])
        server.drop_after = 500_000
        # The shipped config with its cohorts replaced (only the base URL differs from a real GDC run).
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        config.pop("demo")
        config.update(cohorts={"BRCA": "config/cohorts/BRCA.tsv"}, gdc={"api_url": server.url}, keep_slides=False,
                      qc={"n_patches": 5})
        config["model"]["checkpoint"] = str(small_model)
        config["segment"]["tile_size"] = 1024
        (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                               "--cores", "2"],
                              cwd=tmp_path, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    table = pd.read_parquet(tmp_path / "results/qc/slides.parquet").set_index("slide_id")
    assert len(table) == 3
    poisoned = table.loc["TCGA-AA-1002-01Z-00-DX1"]
    assert poisoned.status == "failed" and poisoned.failure_stage == "download"
    assert "md5 mismatch" in poisoned.failure_reason and poisoned.grade == "Unacceptable"
    good = table.drop("TCGA-AA-1002-01Z-00-DX1")
    assert (good.status == "ok").all() and (good.n_nuclei > 0).all()
    assert table.loc["TCGA-AA-1001-01Z-00-DX1", "mpp_source"] == "fallback"  # the TCGA slide has no mpp
    # Disk-bounded mode: slides are removed once segmented and graded.
    assert not list((tmp_path / "resources" / "slides").rglob("*.svs"))
    # The first transfer was dropped mid-body and resumed with a Range request.
    logs = "".join(p.read_text() for p in (tmp_path / "logs" / "tissue" / "BRCA").glob("*.log"))
    assert "resuming at byte" in logs
