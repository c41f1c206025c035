"""Importance-weighting ablation over training seeds (a benchmark, not a test; prints JSON).

One run of each arm says little: two trainings that differ only in their seed differ by about as much as
the weighted and unweighted models do. This compares them over several seeds. For each seed, a weighted
and an unweighted model trained from the same shards with the same seed, steps and architecture:

    for s in 1 2 3; do
      snakemake --configfile config/config.yaml config/train_shipped_recipe.yaml --cores 2 \\
        --config "model={name: weighted_s$s, train: {seed: $s}}" results/models/weighted_s$s/model.pt
      snakemake --configfile config/config.yaml config/train_shipped_recipe.yaml config/train_unweighted.yaml \\
        --cores 2 \\
        --config "model={name: unweighted_s$s, train: {seed: $s}}" results/models/unweighted_s$s/model.pt
    done
    python benchmarks/weighting_ablation.py \\
        --pair 0 results/models/recipe/model.pt results/models/unweighted/model.pt \\
        --pair 1 results/models/weighted_s1/model.pt results/models/unweighted_s1/model.pt ... [--out ablation.json]

(seed 0 is ``config/train_shipped_recipe.yaml``'s model, the shipped model's recipe, and
``config/train_unweighted.yaml``'s). On a GPU the same pairs train in
under a minute each with the train rule's command (``snakemake -n -p`` prints it), seed and output folder
changed, ``--no-weighted`` for the unweighted arm (docs/experiments.md: 14 seeds). Datasets as in
``benchmarks/quality.py``; each model with the hematoxylin gate (the default) and without it (the network
alone). Reported per dataset and gate: each seed's mean AJI / Dice / PQ / F1 for both arms, the weighted
minus unweighted difference per seed, its mean and standard deviation over seeds, and per tile (averaged
over seeds) how many tiles the weighted arm wins with a Wilcoxon signed-rank p-value.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import load_datasets, print_json  # noqa: E402

METRICS = ("aji", "dice", "pq", "f1")


def summarize(per_seed: dict) -> dict:
    """Paired weighted-minus-unweighted differences over seeds, and per tile (means over seeds)."""
    from scipy.stats import wilcoxon

    seeds = sorted(per_seed)
    out = {"seeds": {}}
    for seed in seeds:
        w, u = per_seed[seed]["weighted"], per_seed[seed]["unweighted"]
        out["seeds"][seed] = {"weighted": w["mean"], "unweighted": u["mean"],
                              "difference": {m: w["mean"][m] - u["mean"][m] for m in METRICS}}
    for m in METRICS:
        diffs = np.array([out["seeds"][s]["difference"][m] for s in seeds])
        out[f"{m}_difference"] = {"mean": float(diffs.mean()),
                                  "sd": float(diffs.std(ddof=1)) if len(diffs) > 1 else None,
                                  "min": float(diffs.min()), "max": float(diffs.max()),
                                  "seeds_weighted_ahead": int((diffs > 0).sum()), "n_seeds": len(diffs)}
    tile_diff = np.mean([[a["aji"] - b["aji"] for a, b in zip(per_seed[s]["weighted"]["images"],
                                                               per_seed[s]["unweighted"]["images"], strict=True)]
                         for s in seeds], axis=0)
    out["tiles_aji"] = {"n_tiles": len(tile_diff), "weighted_ahead": int((tile_diff > 0).sum()),
                        "mean_difference": float(tile_diff.mean()),
                        "wilcoxon_p": float(wilcoxon(tile_diff).pvalue) if len(tile_diff) >= 6 else None}
    return out


def main() -> None:
    from nucseg.evaluate import evaluate
    from nucseg.instances import InstanceParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("SEED", "WEIGHTED", "UNWEIGHTED"),
                        help="a seed's weighted and unweighted model.pt")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    pairs = {seed: {"weighted": w, "unweighted": u} for seed, w, u in args.pair}

    result = {"pairs": pairs, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, samples in load_datasets(Path(tmp)).items():
            entry = {}
            for gate in (True, False):
                params = InstanceParams(hematoxylin_gate=gate)
                per_seed = {seed: {arm: evaluate(samples, "model", path, "auto", progress=False, instance_params=params)
                                   for arm, path in arms.items()}
                            for seed, arms in pairs.items()}
                entry["gated" if gate else "ungated"] = summarize(per_seed)
            result["datasets"][name] = entry
            print(f"{name}: done", file=sys.stderr, flush=True)
    print_json(result, args.out)


if __name__ == "__main__":
    main()
