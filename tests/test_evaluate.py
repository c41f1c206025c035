import numpy as np
import pytest

from nucseg.evaluate import instances_on_image, load_dataset, predict_classical, rasterize, read_aperio_xml
from nucseg.metrics import instance_metrics, roc_auc

from .conftest import MONUSEG, need


def square(labels, label, y, x, h=10, w=10):
    labels[y:y + h, x:x + w] = label
    return labels


def test_perfect_and_empty_predictions():
    true = square(square(np.zeros((40, 40), np.int32), 1, 2, 2), 2, 20, 20)
    m = instance_metrics(true, true.copy() * 3)   # label values do not matter
    assert m["aji"] == m["dice"] == m["pq"] == m["f1"] == 1.0 and m["tp"] == 2
    e = instance_metrics(true, np.zeros_like(true))
    assert e["aji"] == 0 and e["dice"] == 0 and e["f1"] == 0 and e["fn"] == 2


def test_merged_prediction():
    true = square(square(np.zeros((30, 30), np.int32), 1, 5, 0), 2, 5, 10)
    pred = square(np.zeros_like(true), 7, 5, 0, w=20)
    m = instance_metrics(true, pred)
    # Each true square has IoU 100/200 with the merged object: AJI = 200 / (200 + 200).
    assert m["aji"] == pytest.approx(0.5) and m["dice"] == 1.0
    assert m["tp"] == 0 and m["pq"] == 0 and m["f1"] == 0    # IoU must exceed 0.5


def test_shifted_and_spurious_objects():
    true = square(np.zeros((40, 40), np.int32), 1, 5, 5)
    pred = square(square(np.zeros_like(true), 1, 5, 7), 2, 30, 30, 4, 4)
    m = instance_metrics(true, pred)
    iou = 80 / 120
    # AJI: (80) / (120 + 16 for the unmatched prediction).
    assert m["aji"] == pytest.approx(80 / 136)
    assert m["tp"] == 1 and m["fp"] == 1 and m["fn"] == 0
    assert m["sq"] == pytest.approx(iou) and m["dq"] == pytest.approx(1 / 1.5)
    assert m["pq"] == pytest.approx(iou / 1.5) and m["f1"] == pytest.approx(2 / 3)
    assert m["dice"] == pytest.approx(2 * 80 / (100 + 116))


def test_rasterisation_uses_pixel_centres():
    poly = np.array([[0.5, 0.5], [3.5, 0.5], [3.5, 3.5], [0.5, 3.5]])
    labels = rasterize([poly, poly + 10], (20, 20))
    assert (labels == 1).sum() == 9 and labels[1:4, 1:4].all() and not labels[0].any()
    assert (labels == 2).sum() == 9


def test_instances_found_at_half_resolution_keep_their_size_on_the_image():
    """Instances found at the working resolution are drawn on a grid twice as fine as their outlines:
    a 5 x 5 nucleus becomes 10 x 10 (cut at the corners), and moves out by one fine pixel on a side
    where the foreground probability outside it is close to the threshold."""
    labels = np.zeros((20, 20), np.int32)
    labels[5:10, 5:10] = 1
    fg = np.where(labels > 0, 0.9, 0.1).astype(np.float32)
    out = instances_on_image(labels, fg, 0.5, (40, 40))
    assert out.max() == 1 and 96 <= (out == 1).sum() <= 100
    assert not out[:10].any() and not out[20:].any() and not out[:, :10].any() and not out[:, 20:].any()
    fg[5:10, 10] = 0.45  # almost foreground right of it: the outline crosses 8/9 of the way to that column
    grown = instances_on_image(labels, fg, 0.5, (40, 40))
    assert grown[11:19, 20].all() and not grown[:, 21:].any() and (grown[:, :19] == out[:, :19]).all()


def test_classical_baseline_finds_dark_discs(rng):
    img = np.full((120, 120, 3), (230, 170, 210), np.float32) + rng.normal(0, 3, (120, 120, 3))
    yy, xx = np.mgrid[:120, :120]
    for cy, cx in [(30, 30), (30, 80), (85, 50)]:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = (90, 50, 140)
    labels = predict_classical(np.clip(img, 0, 255).astype(np.uint8), mpp=0.25)
    assert labels.max() == 3


def test_monuseg_annotations_load():
    root = need(MONUSEG)
    polygons, mpp = read_aperio_xml(root / "annotations" / "TCGA-2Z-A9J9-01A-01-TS1.xml")
    assert len(polygons) > 100 and 0.2 < mpp < 0.3
    samples = load_dataset(root, default_mpp=0.25)  # one XML lacks MicronsPerPixel (40x: 0.25)
    assert len(samples) == 18
    # Slide types from the TCGA barcodes of the ids: FFPE diagnostic slides and frozen sections.
    types = {x.id: x.slide_type for x in samples}
    assert types["TCGA-50-5931-01Z-00-DX1"] == "DX" and types["TCGA-2Z-A9J9-01A-01-TS1"] == "TS"
    assert types["TCGA-CU-A0YN-01A-02-BSB"] == "BS" and set(types.values()) == {"DX", "TS", "BS"}
    s = samples[0]
    assert s.image.shape == (1000, 1000, 3) and s.labels.max() > 100
    # Nuclei are darker than the rest of the tile: image and annotation line up.
    grey = s.image.mean(axis=2)
    assert grey[s.labels > 0].mean() < grey[s.labels == 0].mean() - 20


def test_label_map_layout_through_the_cli(tmp_path, rng, caplog):
    import json

    import cv2

    from nucseg.cli import main

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    img = np.full((96, 96, 3), (230, 170, 210), np.float32) + rng.normal(0, 3, (96, 96, 3))
    labels = np.zeros((96, 96), np.int32)
    yy, xx = np.mgrid[:96, :96]
    for i, (cy, cx) in enumerate([(25, 25), (25, 70), (70, 45)], start=1):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= 64
        img[m] = (90, 50, 140)
        labels[m] = i
    cv2.imwrite(str(root / "images" / "a.png"), np.clip(img, 0, 255).astype(np.uint8)[..., ::-1])
    cv2.imwrite(str(root / "labels" / "a.png"), labels.astype(np.uint16))
    np.save(root / "labels" / "b.npy", labels)
    cv2.imwrite(str(root / "images" / "b.png"), np.clip(img, 0, 255).astype(np.uint8)[..., ::-1])
    (root / "manifest.csv").write_text("id,mpp,slide_type\na,0.25,FFPE\nb,0.25,\n")
    with caplog.at_level("WARNING"):
        assert [x.slide_type for x in load_dataset(root)] == ["FFPE", ""]
    assert "slide_type 'FFPE' of a is not one of DX, TS, BS, MS" in caplog.text
    (root / "manifest.csv").write_text("id,mpp,slide_type\na,0.25,DX\nb,0.25,\n")
    # The shipped model with test-time augmentation (the 3 flat discs are easy: it must find them all).
    assert main(["-q", "evaluate", "--dataset", str(root), "--tta", "8", "--out", str(tmp_path / "tta.json")]) == 0
    result = json.loads((tmp_path / "tta.json").read_text())
    assert result["tta"] == 8 and result["mean"]["f1"] == 1.0
    assert {r["gate_unit"] for r in result["images"]} == {"off"}  # no gate by default, as segment
    # With the gate, its unit follows each image's slide type (manifest), unless given.
    assert main(["-q", "evaluate", "--dataset", str(root), "--hematoxylin-gate",
                 "--out", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    assert [(r["slide_type"], r["gate_unit"]) for r in result["images"]] == [("DX", "nucleus"), ("", "pixel")]
    assert main(["-q", "evaluate", "--dataset", str(root), "--hematoxylin-gate", "--gate-unit", "pixel",
                 "--out", str(tmp_path / "p.json")]) == 0
    assert {r["gate_unit"] for r in json.loads((tmp_path / "p.json").read_text())["images"]} == {"pixel"}
    assert main(["-q", "evaluate", "--dataset", str(root), "--method", "classical", "--out", str(tmp_path / "m.json"),
                 "--save-predictions", str(tmp_path / "pred")]) == 0
    result = json.loads((tmp_path / "m.json").read_text())
    assert [r["id"] for r in result["images"]] == ["a", "b"]
    assert result["mean"]["f1"] == 1.0 and result["mean"]["aji"] > 0.8
    pred = cv2.imread(str(tmp_path / "pred" / "a.png"), cv2.IMREAD_UNCHANGED)
    assert pred.dtype == np.uint16 and pred.shape == (96, 96) and pred.max() == 3


def _discs(rng, size=96):
    """An RGB tile with three dark discs on pink and its instance map."""
    img = np.full((size, size, 3), (230, 170, 210), np.float32) + rng.normal(0, 3, (size, size, 3))
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    for i, (cy, cx) in enumerate([(25, 25), (25, 70), (70, 45)], start=1):
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= 64
        img[m] = (90, 50, 140)
        labels[m] = i
    return np.clip(img, 0, 255).astype(np.uint8), labels


def test_label_map_layout_reads_the_formats_other_tools_write(tmp_path, rng):
    import cv2
    import tifffile
    from scipy.io import savemat

    img, labels = _discs(rng)
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    # 16-bit planar (channel-first) TIFF image, HoVer-Net .mat labels.
    tifffile.imwrite(root / "images" / "a.tif", np.moveaxis(img.astype(np.uint16) * 256, -1, 0),
                     photometric="rgb", planarconfig="separate")
    savemat(root / "labels" / "a.mat", {"inst_map": labels.astype(np.float64), "type_map": labels > 0})
    # RGBA PNG image, colour-coded labels (one colour per nucleus, black background).
    cv2.imwrite(str(root / "images" / "b.png"), np.dstack([img[..., ::-1], np.full(img.shape[:2], 255, np.uint8)]))
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 200, 30], [40, 40, 250]], np.uint8)
    cv2.imwrite(str(root / "labels" / "b.png"), palette[labels][..., ::-1])
    # Float image in [0, 1], grey label image saved as RGB.
    tifffile.imwrite(root / "images" / "c.tif", img.astype(np.float32) / 255)
    tifffile.imwrite(root / "labels" / "c.tif", np.repeat(labels[..., None].astype(np.uint8), 3, axis=-1))
    samples = load_dataset(root, default_mpp=0.25)
    assert [s.id for s in samples] == ["a", "b", "c"]
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape == img.shape
        assert np.abs(s.image.astype(int) - img).max() <= 1, s.id
        assert s.labels.dtype == np.int32 and s.labels.shape == labels.shape
        # The same nuclei, whatever ids the format gave them.
        assert instance_metrics(labels, s.labels)["aji"] == 1.0
        assert s.labels.max() == 3 and (s.labels[labels == 0] == 0).all()


def test_bad_files_are_named_and_skipped_without_stopping_the_others(tmp_path, rng):
    import json

    import cv2

    from nucseg.cli import main

    img, labels = _discs(rng)
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for sid in ("good", "short", "broken", "nolabel", "probability"):
        cv2.imwrite(str(root / "images" / f"{sid}.png"), img[..., ::-1])
    np.save(root / "labels" / "good.npy", labels)
    np.save(root / "labels" / "short.npy", labels[:-8])
    np.save(root / "labels" / "broken.npy", labels)
    (root / "images" / "broken.png").write_bytes(b"not a png")
    np.save(root / "labels" / "probability.npy", labels / 3.0)
    with pytest.raises(ValueError, match=r"images/broken\.png: not a readable image"):
        load_dataset(root, default_mpp=0.25)  # without a list to record them in, the first bad file raises
    out = tmp_path / "m.json"
    assert main(["-q", "evaluate", "--dataset", str(root), "--method", "classical", "--mpp", "0.25",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["id"] for r in result["images"]] == ["good"] and result["mean"]["f1"] == 1.0
    reasons = {s["id"]: s["reason"] for s in result["skipped"]}
    assert set(reasons) == {"short", "broken", "nolabel", "probability"}
    assert reasons["short"].endswith("labels/short.npy: label map is 96x88 px, its image 96x96")
    assert "no annotations/nolabel.xml or labels/nolabel." in reasons["nolabel"]
    assert "not whole numbers" in reasons["probability"]
    # Nothing readable at all: an error, not an empty result.
    np.save(root / "labels" / "good.npy", labels[:, :-1])
    assert main(["-q", "evaluate", "--dataset", str(root), "--method", "classical", "--mpp", "0.25",
                 "--out", str(tmp_path / "none.json")]) != 0
    assert not (tmp_path / "none.json").exists()


def test_roc_auc_counts_ties_half_and_needs_both_classes():
    # Positives 2, 3 against negatives 1, 2: three pairs won, one tied.
    assert roc_auc([1, 2, 2, 3], [False, False, True, True]) == 0.875
    assert roc_auc([np.nan, 1.0], [False, True]) == 1.0  # NaN scores count as 0
    assert roc_auc([1, 2], [True, True]) is None
