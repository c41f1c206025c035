import json

import numpy as np
import pandas as pd
import pytest

from nucseg.grading import SIGNALS, QCParams, grade, grade_summary
from nucseg.qc import aggregate, patch_signals


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


def patch_verdict(image, nuclei_mask, params, hematoxylin_level=None):
    """The stain-coverage and shape signals of a patch at the QC resolution, and its verdict."""
    return patch_signals(image, None, nuclei_mask, [], [], params, params.mpp, hematoxylin_level)


def test_patch_verdicts(rng):
    params = QCParams()
    image, truth = patch_with_nuclei(rng, [(15, 15), (40, 45), (50, 15)])
    good = patch_verdict(image, truth, params)
    assert set(SIGNALS) <= set(good)    # every declared signal is measured
    assert not good["bad"] and good["recall"] > 0.8 and good["precision"] > 0.8
    missed = patch_verdict(image, np.zeros_like(truth), params)
    assert missed["bad"] and missed["reason"] == "missed nuclei"
    wrong = np.zeros_like(truth)
    wrong[20:35, 20:35] = True   # a "nucleus" on unstained tissue
    false = patch_verdict(image, wrong, params)
    assert false["bad"] and "nuclei on unstained tissue" in false["reason"]


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


def test_grading_levels_apply_to_stored_signals():
    from nucseg.grading import grade_patches, regrade

    patches = pd.DataFrame({"disagreement": [0.2, 0.6, np.nan], "entropy": [0.1, 0.1, 0.1],
                            "missed": [0.0, 0.0, 0.8], "false": [0.0, 0.0, 0.0], "shape": [0.0, 0.0, 0.0]})
    graded = grade_patches(patches, QCParams())
    assert graded.bad.tolist() == [False, True, True]
    assert graded.score.tolist() == pytest.approx([0.4, 1.2, 0.8 / 0.65])
    assert graded.reason.tolist() == ["", "unstable under augmentation", "missed nuclei"]
    # Looser levels: the same signals, fewer bad patches, a better grade.
    loose = QCParams(max_disagreement=0.8, min_recall=0.1)
    assert grade_patches(patches, loose).bad.tolist() == [False, False, False]
    row = {"slide_id": "s", "status": "ok", "pct_bad_patches": 66.7, "grade": "Unacceptable"}
    assert regrade(row, patches, loose) == {**row, "pct_bad_patches": 0.0, "grade": "Best"}
    failed = {"slide_id": "f", "status": "failed", "pct_bad_patches": None, "grade": "Unacceptable"}
    assert regrade(failed, patches, loose)["grade"] == "Unacceptable"


def test_aggregate_regrades_from_patch_signals(tmp_path):
    rows = []
    for i, disagreement in enumerate([0.1, 0.3]):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "qc.json").write_text(json.dumps({"slide_id": f"s{i}", "cancer_type": "BRCA", "status": "ok",
                                               "pct_bad_patches": 0.0, "grade": "Best"}))
        pd.DataFrame({"disagreement": [disagreement] * 4, "entropy": [0.0] * 4, "missed": [0.0] * 4,
                      "false": [0.0] * 4, "shape": [0.0] * 4}).to_parquet(d / "qc_patches.parquet")
        rows.append(d / "qc.json")
    as_recorded = aggregate(rows, tmp_path / "a.parquet")
    assert as_recorded.grade.tolist() == ["Best", "Best"]
    strict = aggregate(rows, tmp_path / "b.parquet", levels=QCParams(max_disagreement=0.2))
    assert strict.grade.tolist() == ["Best", "Unacceptable"] and strict.pct_bad_patches.tolist() == [0.0, 100.0]


# ---------------------------------------------------------------- label-free signals

def test_tta_disagreement_is_zero_for_identical_predictions_and_grows_with_change():
    from nucseg.qc import tta_disagreement

    prob = np.zeros((2, 64, 64), np.float32)
    yy, xx = np.mgrid[:64, :64]
    for cy, cx in [(16, 16), (40, 44), (50, 14)]:
        prob[0][(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = 0.95
    same = np.stack([prob] * 4)
    assert tta_disagreement(same, 0.25) == pytest.approx(0.0)
    assert tta_disagreement(same[:1], 0.25) == 0.0      # nothing to compare
    changed = same.copy()
    changed[2:, 0, 10:22, 10:22] = 0.0                  # two augmentations lose a nucleus
    assert 0.1 < tta_disagreement(changed, 0.25) < 1.0


def test_foreground_entropy_bits():
    from nucseg.qc import foreground_entropy

    region = np.ones((8, 8), bool)
    assert foreground_entropy(np.full((4, 8, 8), 0.5), region) == pytest.approx(1.0)
    assert foreground_entropy(np.full((4, 8, 8), 0.999), region) < 0.02
    assert foreground_entropy(np.full((4, 8, 8), 0.5), ~region) == 0.0


def test_shape_outliers():
    from nucseg.qc import shape_outliers

    params = QCParams()
    assert shape_outliers([30, 40], [0.95, 0.95], params) == 0.0           # too few nuclei to judge
    assert shape_outliers([30, 40, 5, 500], [0.95, 0.6, 0.95, 0.95], params) == pytest.approx(0.75)


def test_dihedral_tta_maps_predictions_back(monkeypatch):
    """With a pixel-wise (hence equivariant) network every augmentation maps back onto the same output."""
    import nucseg.model
    from nucseg.inference import view_probabilities
    from nucseg.model import DIHEDRAL

    def pixelwise(model, images, device):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 255  # 3 outputs

    monkeypatch.setattr(nucseg.model, "_predict_once", pixelwise)
    images = np.random.default_rng(0).integers(0, 255, (3, 24, 24, 3), np.uint8)
    probs = view_probabilities(None, images, None, n_views=len(DIHEDRAL), batch_size=2)
    assert probs.shape == (3, 8, 3, 24, 24)
    expected = pixelwise(None, images, None)
    for k in range(len(DIHEDRAL)):
        np.testing.assert_array_equal(probs[:, k], expected)


def test_patch_score_is_the_largest_signal_ratio(rng):
    from nucseg.qc import patch_signals

    params = QCParams()
    image, truth = patch_with_nuclei(rng, [(15, 15), (40, 45), (50, 15)])
    probs = np.stack([np.stack([truth * 0.95, np.zeros_like(truth, float)])] * 4).astype(np.float32)
    good = patch_signals(image, probs, truth, [60, 70, 80], [0.95, 0.95, 0.95], params)
    assert not good["bad"] and good["score"] < 1 and good["disagreement"] == pytest.approx(0)
    # Model signals alone: an unsure network (p = 0.5 everywhere on the nuclei) is flagged.
    unsure = probs.copy()
    unsure[:, 0][:, truth] = 0.55
    out = patch_signals(image, unsure, truth, [60, 70, 80], [0.95, 0.95, 0.95], params)
    assert out["bad"] and "uncertain foreground" in out["reason"]
    # Nucleus shapes alone.
    out = patch_signals(image, probs, truth, [3, 4, 900], [0.95, 0.95, 0.95], params)
    assert out["bad"] and out["reason"] == "implausible nucleus size/shape" and out["score"] == pytest.approx(2.0)
    # Without the model the model signals are NaN and do not count.
    out = patch_signals(image, None, truth, [60, 70, 80], [0.95] * 3, params)
    assert np.isnan(out["disagreement"]) and not out["bad"]


@pytest.fixture(scope="module")
def shipped_model():
    import torch

    from nucseg.cli import default_weights
    from nucseg.model import load_weights

    model, meta = load_weights(default_weights())
    return model, meta, torch.device("cpu")


def test_signals_on_a_real_tile_flag_an_out_of_focus_copy(shipped_model):
    """MoNuSeg tile, shipped model: the patch's segmentation scores worse once the patch is blurred."""
    import cv2

    from nucseg.evaluate import load_dataset
    from nucseg.inference import segment_images, view_probabilities
    from nucseg.instances import describe_instances
    from nucseg.qc import patch_signals
    from nucseg.resample import resample_to

    from .conftest import MONUSEG, need

    model, meta, device = shipped_model
    mpp = float(meta["mpp"])                                         # the model's working resolution
    sample = load_dataset(need(MONUSEG), default_mpp=0.25)[0]
    params = QCParams()
    start, size, ctx = round(75 / mpp), round(64 / mpp), round(4 / mpp)  # a 64 µm patch with 4 µm context
    inner = (slice(ctx, -ctx), slice(ctx, -ctx))
    scores = []
    # σ 3 µm: far out of focus (at σ 2 µm the shipped 20x model still reaches patch AJI ≈ 0.3 here).
    for image in (sample.image, cv2.GaussianBlur(sample.image, (0, 0), 3.0 / 0.25)):
        work = resample_to(image, sample.mpp, mpp)
        crop = np.ascontiguousarray(work[start:start + size + 2 * ctx, start:start + size + 2 * ctx])
        labels = segment_images(model, crop[None], device, mpp)[1][0][inner]
        _, feats = describe_instances(labels)
        probs = view_probabilities(model, crop[None], device, params.tta)[0][(...,) + inner]
        scores.append(patch_signals(crop[inner], probs, labels > 0, feats.area_px * mpp**2,
                                    feats.solidity, params))
    sharp, blurred = scores
    assert blurred["score"] > sharp["score"] and blurred["bad"]
    assert blurred["missed"] > sharp["missed"]


def test_slide_qc_end_to_end(demo_slide, demo_tissue, tmp_path):
    """qc.json row, per-patch signals, overlay and timing on the demo slide with the shipped model."""
    from nucseg.cli import default_weights
    from nucseg.qc import PATCH_COLUMNS, slide_qc
    from nucseg.segment import SegmentParams, segment_slide

    weights = default_weights()
    nuclei = tmp_path / "nuclei.parquet"
    segment_slide(demo_slide, nuclei, weights, tissue_path=demo_tissue / "tissue.parquet", slide_id="demo",
                  params=SegmentParams(device="cpu"), progress=False)
    row = slide_qc(demo_tissue / "wsi.json", nuclei, demo_tissue / "tiles.parquet", demo_slide,
                   tmp_path / "qc.json", tmp_path / "qc_patches.parquet", cancer_type="DEMO",
                   params=QCParams(n_patches=6, device="cpu"), weights=weights,
                   tissue_path=demo_tissue / "tissue.parquet", out_overlay=tmp_path / "qc_overlay.png")
    assert row["status"] == "ok" and row["n_patches_checked"] == 6 and row["grade"] in GRADES_OK
    assert json.loads(row["seconds_by_stage"])["qc"] > 0
    patches = pd.read_parquet(tmp_path / "qc_patches.parquet")
    assert list(patches.columns) == PATCH_COLUMNS and patches.disagreement.notna().all()
    assert (patches.score >= 0).all() and patches.bad.dtype == bool
    assert row["pct_bad_patches"] == pytest.approx(100 * patches.bad.mean())
    import cv2

    overlay = cv2.imread(str(tmp_path / "qc_overlay.png"))
    assert overlay is not None and overlay.shape[1] >= 512


GRADES_OK = ("Best", "Good", "Adequate", "Problematic", "Unacceptable")


def test_signal_declarations_name_real_levels():
    """Each declared signal's level is a QCParams number; the grading levels are theirs plus bad_score
    (the workflow reads the same declarations: tests/test_workflow.py re-grades on a level change)."""
    from nucseg.grading import LEVELS, QC_SIGNALS

    params = QCParams()
    assert LEVELS == (*(s.level_key for s in QC_SIGNALS), "bad_score")
    for signal in QC_SIGNALS:
        assert isinstance(getattr(params, signal.level_key), float) and 0 < signal.level(params) <= 1


def test_stain_floor_follows_a_faded_slide(rng):
    from skimage.color import hed2rgb, rgb2hed

    from nucseg.instances import hematoxylin_level
    from nucseg.qc import stain_floor
    from nucseg.stain import hematoxylin_od

    params = QCParams()
    image, truth = patch_with_nuclei(rng, [(15, 15), (40, 45), (50, 15)])
    hed = rgb2hed(image)
    hed[..., 0] *= 0.3   # hematoxylin at 30 %: a faded slide
    faded = (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)
    level = hematoxylin_level([hematoxylin_od(faded)], 0.5)
    assert level < params.hema_threshold < hematoxylin_level([hematoxylin_od(image)], 0.5)
    # With the fixed floor the faded nuclei are "unstained", and their correct segmentation looks false.
    assert patch_verdict(faded, truth, params)["reason"] == "nuclei on unstained tissue"
    lowered = patch_verdict(faded, truth, params, level)
    assert not lowered["bad"] and lowered["recall"] > 0.8 and lowered["precision"] > 0.8
    # Still a check: nuclei where there is no stain are false, and a well-stained slide keeps the floor.
    wrong = np.zeros_like(truth)
    wrong[20:35, 20:35] = True
    assert patch_verdict(faded, wrong, params, level)["bad"]
    assert stain_floor(params, 0.09) == stain_floor(params, None) == params.hema_threshold
