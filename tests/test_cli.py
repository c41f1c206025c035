import subprocess
import sys

import pytest

from nucseg import __version__
from nucseg.cli import build_parser, main

STAGES = ["download", "cohort", "evaluate", "export", "publish", "tissue", "synth", "refine", "train", "segment", "qc",
          "aggregate", "report-figures", "demo-slide"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and __version__ in capsys.readouterr().out


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = capsys.readouterr().out
    assert text.startswith(f"usage: nucseg {stage}") and len(text.splitlines()) > 3


def test_parameter_flags_come_from_the_dataclasses():
    from nucseg.segment import SegmentParams

    args = build_parser().parse_args(["segment", "s.svs", "--out", "n.parquet", "--tile-size", "1024"])
    assert args.tile_size == 1024 and args.margin_um == SegmentParams().margin_um
    args = build_parser().parse_args(["train", "--synth", "d", "--out-dir", "m", "--no-weighted",
                                      "--weight-clip", "0.1", "3"])
    assert args.weighted is False and args.weight_clip == [0.1, 3.0]


def test_console_script_errors_name_the_stage_and_file(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nucseg.cli", "download", "--source", str(tmp_path / "x.svs"),
                           "--out-dir", str(tmp_path / "y"), "--slide-id", "S1"], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "download failed" in proc.stderr and "slide S1" in proc.stderr and "x.svs" in proc.stderr


def test_segment_uses_the_shipped_model_by_default(demo_slide, tmp_path):
    from nucseg import io
    from nucseg.cli import default_weights

    weights = default_weights()
    assert weights.is_file() and (weights.parent / "default_card.json").is_file()
    assert main(["-q", "segment", str(demo_slide), "--out", str(tmp_path / "n.parquet")]) == 0
    meta = io.read_provenance(tmp_path / "n.parquet")
    assert meta["model_id"] == io.file_sha256(weights) and meta["status"] == "ok"
    assert meta["gate_unit"] == "off"  # no hematoxylin gate by default
    # With the gate, a slide named by its TCGA barcode says its type: a diagnostic (FFPE) slide is gated by nucleus.
    assert main(["-q", "segment", str(demo_slide), "--out", str(tmp_path / "dx.parquet"), "--hematoxylin-gate",
                 "--slide-id", "TCGA-A1-A0SB-01Z-00-DX1"]) == 0
    assert io.read_provenance(tmp_path / "dx.parquet")["gate_unit"] == "nucleus"


def test_cohort_inputs_come_from_the_sheet_not_the_command_line(tmp_path, monkeypatch, capsys):
    """3,000 slides' paths would overflow one shell argument (128 KiB): aggregate and publish read the sheet."""
    import json

    import pandas as pd

    monkeypatch.chdir(tmp_path)
    ids = [f"TCGA-{i:02d}-0000-01Z-00-DX1" for i in range(3)]
    (tmp_path / "BRCA.tsv").write_text("# a comment line\nslide_id\tcancer_type\tsource\n"
                                       + "".join(f"{s}\tBRCA\t{s}.svs\n" for s in ids))
    for s in ids:
        d = tmp_path / "results" / "BRCA" / s
        d.mkdir(parents=True)
        (d / "qc.json").write_text(json.dumps({"slide_id": s, "cancer_type": "BRCA", "status": "failed"}))
        (d / "nuclei.parquet").write_bytes(b"x")
    assert main(["-q", "aggregate", "--sheet", "BRCA.tsv", "--out", "t.parquet", "--regrade"]) == 0
    table = pd.read_parquet(tmp_path / "t.parquet")
    assert table.slide_id.tolist() == ids and (table.grade == "Unacceptable").all()
    assert main(["-q", "publish", "--sheet", "BRCA.tsv", "--dataset", "ds", "--cancer-type", "BRCA"]) == 0
    assert sorted(p.parent.name for p in (tmp_path / "ds").rglob("nuclei.parquet")) == [f"slide_id={s}" for s in ids]
    capsys.readouterr()
    with pytest.raises(SystemExit, match="no input files"):
        main(["-q", "aggregate", "--out", "u.parquet"])
