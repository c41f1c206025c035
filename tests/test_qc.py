import json

import numpy as np
import pandas as pd
import pytest

from nucseg.qc import QCParams, aggregate, grade, grade_summary, patch_verdict


@pytest.mark.parametrize("pct, expected", [
    (0.0, "Best"), (0.01, "Good"), (6.67, "Good"), (6.68, "Adequate"), (13.3, "Adequate"),
    (13.4, "Problematic"), (20.0, "Problematic"), (20.01, "Unacceptable"), (None, "Unacceptable"),
])
def test_grade_thresholds(pct, expected):
    assert grade(pct) == expected


def test_failed_slides_are_unacceptable():
    assert grade(0.0, failed=True) == "Unacceptable"


def patch_with_nuclei(rng, centres, r=6):
    img = np.full((64, 64, 3), (230, 160, 200), np.float32) + rng.normal(0, 3, (64, 64, 3))
    yy, xx = np.mgrid[:64, :64]
    mask = np.zeros((64, 64), bool)
    for cy, cx in centres:
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[m] = (80, 45, 130)
        mask |= m
    return np.clip(img, 0, 255).astype(np.uint8), mask


def test_patch_verdicts(rng):
    params = QCParams()
    image, truth = patch_with_nuclei(rng, [(15, 15), (40, 45), (50, 15)])
    good = patch_verdict(image, truth, params)
    assert not good["bad"] and good["recall"] > 0.8 and good["precision"] > 0.8
    missed = patch_verdict(image, np.zeros_like(truth), params)
    assert missed["bad"] and missed["reason"] == "missed nuclei"
    wrong = np.zeros_like(truth)
    wrong[20:35, 20:35] = True   # a "nucleus" on unstained tissue
    false = patch_verdict(image, wrong, params)
    assert false["bad"]


def test_aggregate_types_and_summary(tmp_path):
    rows = []
    for i, (status, pct) in enumerate([("ok", 0.0), ("ok", 10.0), ("failed", None)]):
        row = {"slide_id": f"s{i}", "cancer_type": "BRCA" if i < 2 else "LUAD", "status": status,
               "pct_bad_patches": pct, "grade": grade(pct, status != "ok"), "n_nuclei": 10 * i,
               "seconds_by_stage": json.dumps({"tissue": 1.0})}
        path = tmp_path / f"s{i}.json"
        path.write_text(json.dumps(row))
        rows.append(path)
    table = aggregate(rows, tmp_path / "out.parquet", {"config_hash": "abc"})
    back = pd.read_parquet(tmp_path / "out.parquet")
    assert len(back) == 3 and list(back.columns)[:3] == ["slide_id", "cancer_type", "source"]
    assert back.n_nuclei.tolist() == [0, 10, 20]
    summary = grade_summary(table)
    assert summary.loc["BRCA", "Best"] == 1 and summary.loc["BRCA", "Adequate"] == 1
    assert summary.loc["LUAD", "Unacceptable"] == 1
    # Aggregates of aggregates (per type -> all) keep every row.
    again = aggregate([tmp_path / "out.parquet"], tmp_path / "all.parquet")
    assert len(again) == 3
