"""Can the image decide whether and how to gate by hematoxylin? (a benchmark, not a test; prints JSON)

Each annotated tile of ``benchmarks/quality.py``'s sources is segmented once by the network; its instances are
extracted three ways (:func:`nucseg.inference.image_instances`): ``off`` (the network alone, the default),
``pixel`` (foreground only above the image's hematoxylin Otsu level) and ``nucleus`` (the network's nuclei, each
kept when at least half of it is above the level). Per tile it also measures what the image shows about the
network's agreement with its stain, label-free:

  * ``spill``: the share of the network's foreground below the image's hematoxylin level;
  * ``nuclei_off_stain``: the share of its nuclei mostly below the level (what the nucleus gate removes);
  * ``stain_excess``: the stained share of the image minus the foreground share.

Reported per source: mean AJI of each choice, of the per-tile best choice (an oracle no rule can beat), and of
the rules "gate (pixel or nucleus) where ``spill`` <= t, else off" for a range of t; plus the correlation of
each statistic with each gate's per-tile gain over ``off``. The adoption rule of docs/model.md applies.

    python benchmarks/gate_choice.py [--checkpoint model.pt] [--dataset NAME=DIR ...] [--out gate_choice.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_datasets, print_json  # noqa: E402

CHOICES = ("off", "pixel", "nucleus")
STATISTICS = ("spill", "nuclei_off_stain", "stain_excess")
THRESHOLDS = (0.04, 0.05, 0.06, 0.07, 0.08, 0.1)


def tile_row(sample, model, device, mpp: float) -> dict:
    """One tile: the AJI of each choice and the image's statistics."""
    from nucseg.evaluate import instances_on_image
    from nucseg.inference import image_instances
    from nucseg.instances import InstanceParams, hematoxylin_gate, hematoxylin_level
    from nucseg.metrics import instance_metrics
    from nucseg.model import predict
    from nucseg.resample import resample_to
    from nucseg.stain import hematoxylin_od

    work = resample_to(sample.image, sample.mpp, mpp)
    prob = predict(model, work[None], device)[0]
    hema = hematoxylin_od(work)
    level = hematoxylin_level([hema], mpp)
    row = {"id": sample.id}
    maps = {}
    for choice in CHOICES:
        params = InstanceParams(hematoxylin_gate=choice != "off", gate_unit="pixel" if choice == "off" else choice)
        maps[choice] = image_instances(work, prob, mpp, params, level, hematoxylin=hema)
        pred = instances_on_image(maps[choice], prob[0], params.foreground_threshold, sample.labels.shape)
        row[choice] = instance_metrics(sample.labels, pred)["aji"]
    stained = hematoxylin_gate(hema, mpp, level)
    foreground = prob[0] > InstanceParams().foreground_threshold
    off = maps["off"]
    areas = np.bincount(off.ravel())[1:]
    above = np.bincount(off.ravel(), weights=stained.ravel(), minlength=len(areas) + 1)[1:]
    row.update(spill=float((~stained[foreground]).mean()) if foreground.any() else 0.0,
               nuclei_off_stain=float((above[areas > 0] < 0.5 * areas[areas > 0]).mean()) if areas.any() else 0.0,
               stain_excess=float(stained.mean() - foreground.mean()))
    return row


def summarize(rows_by_source: dict[str, list[dict]]) -> dict:
    """Mean AJI per source of each choice, the oracle and the spill rules; correlations over all tiles."""
    out, rules = {}, {}
    for source, rows in rows_by_source.items():
        aji = {c: np.array([r[c] for r in rows]) for c in CHOICES}
        spill = np.array([r["spill"] for r in rows])
        entry = {c: round(float(v.mean()), 4) for c, v in aji.items()}
        entry["oracle"] = round(float(np.max(np.stack(list(aji.values())), axis=0).mean()), 4)
        entry["n_tiles"] = len(rows)
        for unit in ("pixel", "nucleus"):
            for t in THRESHOLDS:
                name = f"{unit}_where_spill_le_{t}"
                entry[name] = round(float(np.where(spill <= t, aji[unit], aji["off"]).mean()), 4)
                rules.setdefault(name, []).append(entry[name] - entry["off"])
        out[source] = entry
    methods = [k for k in next(iter(out.values())) if k != "n_tiles"]
    over = {m: {"mean_aji": round(float(np.mean([e[m] for e in out.values()])), 4),
                "min_change_vs_off": round(float(min(e[m] - e["off"] for e in out.values())), 4)} for m in methods}
    flat = [r for rows in rows_by_source.values() for r in rows]
    corr = {s: {f"{c}_gain": round(float(np.corrcoef([r[s] for r in flat], [r[c] - r["off"] for r in flat])[0, 1]), 3)
                for c in ("pixel", "nucleus")} for s in STATISTICS}
    return {"per_source": out, "over_sources": over, "correlation_with_gain_over_off": corr}


def main() -> None:
    import torch

    from nucseg.cli import default_weights
    from nucseg.model import load_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="model.pt (default: the shipped model)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device("cpu")
    weights = args.checkpoint or default_weights()
    model, meta = load_weights(weights, device)
    with tempfile.TemporaryDirectory() as tmp:
        datasets = load_datasets(Path(tmp), dict(d.split("=", 1) for d in args.dataset))
        rows = {name: [tile_row(s, model, device, float(meta["mpp"])) for s in samples]
                for name, samples in datasets.items()}
    print_json({"model_id": meta["model_id"], **summarize(rows), "tiles": rows}, args.out)


if __name__ == "__main__":
    main()
