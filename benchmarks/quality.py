"""Segmentation quality on annotated real tiles (a benchmark, not a test; prints JSON).

Methods, all in one run on the same tiles: each model given (default: the model shipped in the package,
plus ``results/models/unweighted/model.pt`` when it exists: the importance-weighting ablation) and the
classical baseline (hematoxylin + Otsu + distance-transform watershed). Models run as ``nucseg evaluate``
does, with the hematoxylin gate; ``--ungated`` adds each model without it (the network alone).

Datasets (evaluation only, never used for training or tuning):
  * ``monuseg``: the 18 MoNuSeg tiles at 40x (../shared/data/nuclei/monuseg; one XML lacks µm/px: 0.25);
  * ``monuseg_20x``: the same tiles downsampled to 0.5 µm/px (generalisation to 20x scans);
  * ``cryonuseg``: the 2 CryoNuSeg frozen-section tiles, ImageJ ROIs rasterised to label maps
    (needs ``pip install roifile``).

    python benchmarks/quality.py [--model NAME=PATH ...] [--ungated] [--tta N] [--out quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "nuclei"


def cryonuseg_as_label_maps(out: Path) -> Path | None:
    """Write the CryoNuSeg samples in the label-map layout (images/ + labels/ + manifest.csv)."""
    try:
        from roifile import ImagejRoi
    except ImportError:
        print("roifile not installed: skipping CryoNuSeg", file=sys.stderr)
        return None
    import tifffile

    from nucseg.evaluate import rasterize

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    rows = ["id,mpp"]
    for folder in sorted((DATA / "cryonuseg_samples").iterdir()):
        image = tifffile.imread(next(folder.glob("*.tif")))[..., :3]
        rois = ImagejRoi.fromfile(folder / "RoiSet.zip")
        polygons = [np.asarray(r.coordinates()) for r in rois if r.coordinates() is not None]
        # ImageJ coordinates are pixel corners: shift to the pixel-centre convention of rasterize().
        labels = rasterize([p - 0.5 for p in polygons if len(p) >= 3], image.shape[:2])
        tifffile.imwrite(out / "images" / f"{folder.name}.tif", image)
        np.save(out / "labels" / f"{folder.name}.npy", labels)
        rows.append(f"{folder.name},0.25")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return out


def downsampled(samples, factor: float):
    from nucseg.evaluate import Sample

    out = []
    for s in samples:
        size = (round(s.image.shape[1] / factor), round(s.image.shape[0] / factor))
        image = cv2.resize(s.image, size, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(s.labels.astype(np.float32), size, interpolation=cv2.INTER_NEAREST).astype(np.int32)
        out.append(Sample(s.id, image, labels, s.mpp * factor, s.slide_type))
    return out


def print_json(result: dict, out: Path | None) -> None:
    """Print the benchmark's result, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)


def load_datasets(tmp: Path) -> dict:
    """The benchmark's datasets by name (CryoNuSeg's label maps are written under ``tmp``)."""
    from nucseg.evaluate import load_dataset

    monuseg = load_dataset(DATA / "monuseg", default_mpp=0.25)
    datasets = {"monuseg": monuseg, "monuseg_20x": downsampled(monuseg, 2.0)}
    cryo = cryonuseg_as_label_maps(tmp / "cryonuseg")
    if cryo:
        datasets["cryonuseg"] = load_dataset(cryo)
    return datasets


def main() -> None:
    from nucseg.cli import default_weights
    from nucseg.evaluate import evaluate
    from nucseg.instances import InstanceParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ungated", action="store_true",
                        help="also each model without the hematoxylin gate (rows NAME_ungated)")
    parser.add_argument("--tta", type=int, default=1, metavar="N",
                        help="N > 1: also each model with N test-time augmentations (rows NAME_ttaN)")
    args = parser.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    if not models:
        models["default"] = str(default_weights())
        unweighted = REPO / "results" / "models" / "unweighted" / "model.pt"
        if unweighted.is_file():
            models["unweighted"] = str(unweighted)

    with tempfile.TemporaryDirectory() as tmp:
        datasets = load_datasets(Path(tmp))
        result = {"models": models, "datasets": {}}
        for name, samples in datasets.items():
            entry = {"n_images": len(samples), "n_nuclei": int(sum(s.labels.max() > 0 and len(np.unique(s.labels)) - 1
                                                                 for s in samples))}
            entry["classical"] = evaluate(samples, "classical", progress=False)["mean"]
            for model_name, path in models.items():
                entry[model_name] = evaluate(samples, "model", path, "auto", progress=False)["mean"]
                if args.ungated:
                    entry[f"{model_name}_ungated"] = evaluate(samples, "model", path, "auto", progress=False,
                                                              instance_params=InstanceParams(hematoxylin_gate=False))["mean"]
                if args.tta > 1:
                    entry[f"{model_name}_tta{args.tta}"] = evaluate(samples, "model", path, "auto", progress=False,
                                                                   tta=args.tta)["mean"]
            for model_name in models:
                entry[f"{model_name}_minus_classical_aji"] = round(entry[model_name]["aji"] - entry["classical"]["aji"], 4)
            result["datasets"][name] = entry
    print_json(result, args.out)


if __name__ == "__main__":
    main()
