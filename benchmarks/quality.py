"""Segmentation quality on every annotated source (a benchmark, not a test; prints JSON).

Methods, all in one run on the same tiles: each model given (default: the model shipped in the package,
plus ``results/models/unweighted/model.pt`` when it exists: the importance-weighting ablation) with the
hematoxylin gate as configured by default (``gate``: ``auto``), and the classical baseline (hematoxylin +
Otsu + distance-transform watershed). ``--gates off pixel nucleus`` adds each model under those gates.

Sources (evaluation only, never used for training or tuning):
  * ``monuseg``: the 18 MoNuSeg tiles at 40x (../shared/data/nuclei/monuseg; one XML lacks µm/px: 0.25);
  * ``monuseg_20x``: the same tiles downsampled to 0.5 µm/px (generalisation to 20x scans);
  * ``cryonuseg``: the 2 CryoNuSeg frozen-section tiles, ImageJ ROIs rasterised to label maps
    (needs ``pip install roifile``);
  * ``glioma_tcga36``: 36 TCGA glioma tiles (label maps; read its README on how they were annotated);
  * any ``--dataset NAME=DIR`` (MoNuSeg or label-map layout, as ``nucseg evaluate --dataset``).

Per source: each method's mean metrics and each model's AJI lead over classical; over sources: the mean
AJI of each method (every source weighs the same). A change to the model or its defaults is adopted only
when that mean improves and no source drops by more than 0.01 AJI (docs/model.md).

    python benchmarks/quality.py [--model NAME=PATH ...] [--gates off pixel nucleus] [--tta N]
                                 [--dataset NAME=DIR ...] [--out quality.json]
    python benchmarks/quality.py --export sources/     # each source as a folder for `nucseg evaluate --dataset`
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

    from nucseg.evaluate import Sample, rasterize

    samples = []
    for folder in sorted((DATA / "cryonuseg_samples").iterdir()):
        image = tifffile.imread(next(folder.glob("*.tif")))[..., :3]
        rois = ImagejRoi.fromfile(folder / "RoiSet.zip")
        polygons = [np.asarray(r.coordinates()) for r in rois if r.coordinates() is not None]
        # ImageJ coordinates are pixel corners: shift to the pixel-centre convention of rasterize().
        labels = rasterize([p - 0.5 for p in polygons if len(p) >= 3], image.shape[:2])
        samples.append(Sample(folder.name, image, labels, 0.25))
    write_label_maps(samples, out)
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


def write_label_maps(samples, out: Path) -> None:
    """Write ``samples`` in the label-map layout ``nucseg evaluate --dataset`` reads (images/, labels/, manifest)."""
    import tifffile

    (out / "images").mkdir(parents=True)
    (out / "labels").mkdir()
    rows = ["id,mpp,slide_type"]
    for s in samples:
        tifffile.imwrite(out / "images" / f"{s.id}.tif", s.image)
        np.save(out / "labels" / f"{s.id}.npy", s.labels)
        rows.append(f"{s.id},{s.mpp},{s.slide_type}")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")


def print_json(result: dict, out: Path | None) -> None:
    """Print the benchmark's result, and write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.write_text(text + "\n")
    print(text)


def load_datasets(tmp: Path, extra: dict[str, str] | None = None) -> dict:
    """The benchmark's sources by name (CryoNuSeg's label maps are written under ``tmp``); absent ones skipped."""
    from nucseg.evaluate import load_dataset

    datasets = {}
    if (DATA / "monuseg").is_dir():
        monuseg = load_dataset(DATA / "monuseg", default_mpp=0.25)
        datasets.update(monuseg=monuseg, monuseg_20x=downsampled(monuseg, 2.0))
    if (DATA / "cryonuseg_samples").is_dir() and (cryo := cryonuseg_as_label_maps(tmp / "cryonuseg")):
        datasets["cryonuseg"] = load_dataset(cryo)
    if (DATA / "glioma_tcga36").is_dir():
        datasets["glioma_tcga36"] = load_dataset(DATA / "glioma_tcga36")
    for name, root in (extra or {}).items():
        datasets[name] = load_dataset(root)
    return datasets


def score_source(samples, models: dict, gates: list[str], tta: int) -> dict:
    """One source: classical, then each model with the default gate and each of ``gates``."""
    from nucseg.evaluate import evaluate
    from nucseg.instances import InstanceParams

    entry = {"n_images": len(samples),
             "n_nuclei": int(sum(len(np.unique(s.labels)) - 1 for s in samples)),
             "classical": evaluate(samples, "classical", progress=False)["mean"]}
    for name, path in models.items():
        entry[name] = evaluate(samples, "model", path, "auto", progress=False, tta=tta)["mean"]
        for gate in gates:
            params = InstanceParams(hematoxylin_gate=gate != "off")
            entry[f"{name}_gate_{gate}"] = evaluate(samples, "model", path, "auto", progress=False, tta=tta,
                                                    instance_params=params,
                                                    gate_unit="auto" if gate == "off" else gate)["mean"]
    methods = [k for k in entry if isinstance(entry[k], dict)]
    entry["lead_over_classical_aji"] = {m: round(entry[m]["aji"] - entry["classical"]["aji"], 4)
                                        for m in methods if m != "classical"}
    return entry


def over_sources(sources: dict) -> dict:
    """Mean AJI of each method over the sources (each weighs the same), and its worst lead over classical."""
    methods = [m for m in next(iter(sources.values())) if isinstance(next(iter(sources.values()))[m], dict)
               and "aji" in next(iter(sources.values()))[m]]
    out = {}
    for m in methods:
        ajis = [entry[m]["aji"] for entry in sources.values()]
        out[m] = {"mean_aji": round(float(np.mean(ajis)), 4)}
        if m != "classical":
            out[m]["min_lead_over_classical_aji"] = min(e["lead_over_classical_aji"][m] for e in sources.values())
    return out


def main() -> None:
    from nucseg.cli import default_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR",
                        help="another annotated source (MoNuSeg or label-map layout)")
    parser.add_argument("--gates", nargs="*", default=[], choices=("off", "pixel", "nucleus"),
                        help="also each model under these hematoxylin gates (rows NAME_gate_G)")
    parser.add_argument("--tta", type=int, default=1, metavar="N", help="test-time augmentations of the models")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="only write each source to DIR/NAME in the label-map layout (e.g. for "
                        "`nucseg evaluate --dataset DIR/monuseg_20x --adapt OUT`), then exit")
    args = parser.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    if not models:
        models["shipped"] = str(default_weights())
        unweighted = REPO / "results" / "models" / "unweighted" / "model.pt"
        if unweighted.is_file():
            models["unweighted"] = str(unweighted)

    with tempfile.TemporaryDirectory() as tmp:
        datasets = load_datasets(Path(tmp), dict(d.split("=", 1) for d in args.dataset))
        if args.export:
            for name, samples in datasets.items():
                write_label_maps(samples, args.export / name)
            return
        result = {"models": models, "tta": args.tta, "datasets": {}}
        for name, samples in datasets.items():
            result["datasets"][name] = score_source(samples, models, args.gates, args.tta)
            print(f"{name}: done", file=sys.stderr)
        result["over_sources"] = over_sources(result["datasets"])
    print_json(result, args.out)


if __name__ == "__main__":
    main()
