"""Report figures: histograms, grade table, thumbnail selection, per-slide overlays (no browser here;
the rendered report is checked in Chromium by tests/test_workflow.py)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from nucseg import report
from nucseg.cli import main
from nucseg.grading import grade

from .conftest import CMU, need


def slides_table(n_per_type: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for ctype in ("BRCA", "LUAD"):
        for i in range(n_per_type):
            failed = i == 0
            pct = None if failed else float(rng.choice([0.0, 4.0, 10.0, 16.0, 40.0]))
            rows.append({"slide_id": f"{ctype}-{i:02d}", "cancer_type": ctype, "status": "failed" if failed else "ok",
                         "failure_stage": "wsi_qc" if failed else None,
                         "failure_reason": "blank slide" if failed else None, "pct_bad_patches": pct,
                         "nuclei_per_mm2": None if failed else float(rng.uniform(500, 4000)),
                         "n_nuclei": 0 if failed else 100, "grade": grade(pct, failed)})
    return pd.DataFrame(rows)


def test_histograms_are_pngs_with_bars(tmp_path):
    written = report.histograms(slides_table(), tmp_path)
    assert [p.name for p in written] == ["pct_bad_patches.png", "nuclei_density.png"]
    for path in written:
        img = cv2.imread(str(path))
        assert img.shape == (480, 900, 3)
        # Bars in the two cancer types' colours (BGR on disk).
        for rgb in report.PALETTE[:2]:
            assert (np.abs(img.astype(int) - rgb[::-1]).sum(-1) < 10).sum() > 100


def test_grade_table_counts_every_slide():
    table = slides_table()
    text = report.grade_table_html(table)
    assert "<th>BRCA</th><td>8</td>" in text and "<th>LUAD</th><td>8</td>" in text
    assert "<th>all types</th><td>16</td>" in text
    # One failed slide per type, counted Unacceptable and in the failure column.
    assert text.count("<td>1</td></tr>") == 2 and "<td>2</td></tr>" in text


def test_thumbnails_show_every_unacceptable_slide_and_a_spread_sample(tmp_path):
    table = slides_table(20)
    chosen = report.select_thumbnails(table, 6)
    unacceptable = set(table.slide_id[table.grade == "Unacceptable"])
    assert unacceptable <= set(chosen.slide_id)
    others = chosen[chosen.grade != "Unacceptable"]
    assert len(others) == 6 and others.grade.nunique() >= 3          # not six slides of one grade
    assert report.select_thumbnails(table, 6).equals(chosen)         # deterministic
    for r in table.itertuples():
        path = tmp_path / "results" / r.cancer_type / r.slide_id / "qc_overlay.png"
        path.parent.mkdir(parents=True)
        cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    pattern = str(tmp_path / "results" / "{cancer_type}" / "{slide_id}" / "qc_overlay.png")
    written = report.thumbnails(table, pattern, tmp_path / "thumbs", 6)
    assert len(written) == len(chosen)
    assert all(p.relative_to(tmp_path / "thumbs").parts[0] in report.GRADE_COLOURS for p in written)


def test_overlay_of_an_unreadable_slide_is_a_card(tmp_path):
    bogus = tmp_path / "x.svs"
    bogus.write_bytes(b"not a slide")
    row = {"slide_id": "X", "cancer_type": "BRCA", "grade": "Unacceptable", "status": "failed",
           "failure_stage": "wsi_qc", "failure_reason": "not a readable slide (TiffFileError: µm²)"}
    img = report.annotate_overlay(report.slide_overlay(bogus), row)
    assert img.ndim == 3 and img.shape[1] == 640
    assert tuple(img[5, 2]) == report.GRADE_COLOURS["Unacceptable"]   # the grade stripe


def test_overlay_of_a_real_slide_marks_bad_patches(tmp_path):
    import geopandas as gpd
    from shapely.geometry import Point

    slide = need(CMU)
    nuclei = gpd.GeoDataFrame({"centroid_x": [500.0, 800.0], "centroid_y": [600.0, 900.0], "area_um2": [40.0, 50.0]},
                              geometry=[Point(500, 600).buffer(8), Point(800, 900).buffer(8)])
    patches = pd.DataFrame({"x": [200, 1200], "y": [300, 1500], "size": [256, 256], "bad": [True, False]})
    row = {"slide_id": "CMU", "cancer_type": "X", "grade": "Problematic", "status": "ok", "pct_bad_patches": 50.0,
           "n_patches_checked": 2, "width": 2220}
    body = report.slide_overlay(slide, nuclei, patches, backend="openslide")
    red = lambda img: ((img[..., 0] > 200) & (img[..., 1] < 30) & (img[..., 2] < 30)).sum()  # noqa: E731
    assert max(body.shape[:2]) <= 1024 and red(body) == 0        # verdicts are not drawn per slide
    img = report.annotate_overlay(body, row, patches)
    assert img.shape[0] > body.shape[0] and red(img) > 50          # header, and the bad patch's outline
    # Only the bad patch is red: the good one (lower right) keeps its cyan outline.
    scale = body.shape[1] / 2220
    x, y = round(1200 * scale), round(1500 * scale) + img.shape[0] - body.shape[0]
    assert red(img[y - 3:y + 30, x - 3:x + 30]) == 0


def test_thumbnails_regrade_patches_with_the_given_levels(tmp_path):
    from nucseg.grading import QCParams

    table = slides_table(4).assign(status="ok", grade="Good", width=1000)
    for r in table.itertuples():
        d = tmp_path / r.cancer_type / r.slide_id
        d.mkdir(parents=True)
        cv2.imwrite(str(d / "qc_overlay.png"), np.full((100, 100, 3), 255, np.uint8))
        pd.DataFrame({"x": [100], "y": [100], "size": [300], "disagreement": [0.3], "entropy": [0.1],
                      "missed": [0.0], "false": [0.0], "shape": [0.0]}).to_parquet(d / "qc_patches.parquet")
    pattern = str(tmp_path / "{cancer_type}" / "{slide_id}" / "qc_overlay.png")
    reds = []
    for level in (0.5, 0.2):   # disagreement 0.3: good at the default level, bad at 0.2
        out = tmp_path / f"thumbs{level}"
        written = report.thumbnails(table, pattern, out, 8, QCParams(max_disagreement=level))
        img = cv2.imread(str(written[0]))[..., ::-1]
        reds.append(((img[..., 0] > 200) & (img[..., 1] < 30) & (img[..., 2] < 30)).sum())
    assert reds[0] == 0 and reds[1] > 20


def test_report_figures_cli(tmp_path, capsys):
    table = slides_table()
    table.to_parquet(tmp_path / "slides.parquet")
    assert main(["-q", "report-figures", "grades", "--slides", str(tmp_path / "slides.parquet"),
                 "--out", str(tmp_path / "grades.html")]) == 0
    assert "grade-table" in (tmp_path / "grades.html").read_text()
    assert main(["-q", "report-figures", "histograms", "--slides", str(tmp_path / "slides.parquet"),
                 "--out", str(tmp_path / "fig")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["files"]) == 2 and all((tmp_path / "fig" / n).is_file()
                                          for n in ("pct_bad_patches.png", "nuclei_density.png"))


@pytest.mark.parametrize("text", ["µm²", "≤ 6.67 %", "naïve"])
def test_ascii_text_for_opencv(text):
    assert report.ascii_text(text).isascii()
