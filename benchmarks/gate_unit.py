"""What the hematoxylin gate should remove, by slide type (a benchmark, not a test; prints JSON).

For each model given, each annotated tile of ``benchmarks/quality.py``'s datasets is segmented once by the
network and its instances extracted three ways (:func:`nucseg.instances.extract_instances`):

  * ``pixel``: foreground only above the image's hematoxylin Otsu level (the gate until this benchmark);
  * ``nucleus``: the network's nuclei, each kept whole when at least half of it is above the level;
  * ``off``: the network alone.

Tiles are grouped by slide type from their TCGA barcodes (DX: FFPE diagnostic slides; TS/BS/MS: frozen
sections; CryoNuSeg's tiles are frozen sections by construction). Output: per model, dataset, group and
unit the mean AJI / Dice / PQ / F1; per dataset and group, paired over the models, the mean difference
``nucleus - pixel`` and ``nucleus - off`` in AJI with the number of models ahead; and the mean AJI of
``auto`` (:func:`nucseg.instances.gate_unit_for`: nucleus on DX, pixel otherwise) against each unit.

    python benchmarks/gate_unit.py --model NAME=PATH [--model ...] [--out gate_unit.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_datasets, print_json  # noqa: E402

UNITS = ("pixel", "nucleus", "off")
METRICS = ("aji", "dice", "pq", "f1")


def group_of(dataset: str, slide_type: str) -> str:
    """``ffpe`` (DX), ``frozen`` (TS/BS/MS, and every CryoNuSeg tile) or ``unknown``."""
    from nucseg.instances import FFPE_SLIDE_TYPES, SLIDE_TYPES

    if dataset == "cryonuseg":
        return "frozen"
    if slide_type in FFPE_SLIDE_TYPES:
        return "ffpe"
    return "frozen" if slide_type in SLIDE_TYPES else "unknown"


def tile_metrics(weights: str, samples: list) -> list[dict]:
    """Per tile: its slide type and the metrics of each unit, the network run once per tile."""
    import torch

    from nucseg.evaluate import instances_on_image
    from nucseg.instances import InstanceParams, extract_instances, hematoxylin_gate
    from nucseg.metrics import instance_metrics
    from nucseg.model import load_weights, predict
    from nucseg.resample import resample_to
    from nucseg.stain import hematoxylin_od

    device = torch.device("cpu")
    model, meta = load_weights(weights, device)
    mpp = float(meta["mpp"])
    rows = []
    for s in samples:
        work = resample_to(s.image, s.mpp, mpp)
        prob = predict(model, work[None], device)[0]
        gate = hematoxylin_gate(hematoxylin_od(work), mpp)
        row = {"id": s.id, "slide_type": s.slide_type}
        for unit in UNITS:
            params = InstanceParams(hematoxylin_gate=unit != "off", gate_unit="pixel" if unit == "off" else unit)
            labels = instances_on_image(extract_instances(prob, mpp, params, gate=gate), prob[0],
                                        params.foreground_threshold, s.labels.shape)
            row[unit] = {k: v for k, v in instance_metrics(s.labels, labels).items() if k in METRICS}
        rows.append(row)
    return rows


def summarize(per_model: dict[str, dict[str, list[dict]]]) -> dict:
    """Means per model/dataset/group/unit and the paired comparisons over models."""
    from nucseg.instances import gate_unit_for

    means, paired = {}, {}
    for model, datasets in per_model.items():
        for dataset, rows in datasets.items():
            for group in sorted({group_of(dataset, r["slide_type"]) for r in rows}) + ["all"]:
                sel = [r for r in rows if group == "all" or group_of(dataset, r["slide_type"]) == group]
                entry = {u: {k: float(np.mean([r[u][k] for r in sel])) for k in METRICS} for u in UNITS}
                entry["auto"] = {"aji": float(np.mean([r[gate_unit_for(r["slide_type"])]["aji"] for r in sel]))}
                entry["n_tiles"] = len(sel)
                means.setdefault(model, {}).setdefault(dataset, {})[group] = entry
                for other in ("pixel", "off"):
                    by_group = paired.setdefault(dataset, {}).setdefault(group, {})
                    by_group.setdefault(f"nucleus_minus_{other}", []).append(
                        entry["nucleus"]["aji"] - entry[other]["aji"])
                paired[dataset][group].setdefault("auto_minus_pixel", []).append(
                    entry["auto"]["aji"] - entry["pixel"]["aji"])
    summary = {d: {g: {k: {"mean": round(float(np.mean(v)), 4), "models_ahead": int(np.sum(np.array(v) > 0)),
                           "n_models": len(v)} for k, v in comps.items()} for g, comps in groups.items()}
               for d, groups in paired.items()}
    return {"means": means, "paired_over_models": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    with tempfile.TemporaryDirectory() as tmp:
        datasets = load_datasets(Path(tmp))
        per_model = {name: {d: tile_metrics(path, samples) for d, samples in datasets.items()}
                     for name, path in models.items()}
    print_json({"models": models, **summarize(per_model)}, args.out)


if __name__ == "__main__":
    main()
