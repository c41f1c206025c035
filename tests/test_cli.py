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
                           "--out", str(tmp_path / "y.svs"), "--slide-id", "S1"], capture_output=True, text=True)
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
