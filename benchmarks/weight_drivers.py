"""What do the importance weights prefer? (a benchmark, not a test; prints JSON).

For a trained model's ``importance_weights.npz`` (the discriminator's P(real) and the final weight of every
synthetic patch) and the synthetic shards it was trained on, the Spearman correlation of P(real) and of the
weight with properties of each patch, over all patches and within strata of crowding (the same quantile bins
of nucleus-pixel fraction as ``model.train.weight_strata``), and the mean weight per fifth of the patches by
each property. Label-side properties come from the instance maps (known by construction), image-side ones
from the pixels under and around the nuclei; ``touching_fraction`` is the share of a patch's nuclei that
share an edge with another one. Label-free: no annotated tile is read.

    python benchmarks/weight_drivers.py results/models/recipe/importance_weights.npz \
        --synth results/synth/HNSC/shards [--strata 10] [--out drivers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from nucseg.instances import touching_labels  # noqa: E402
from nucseg.train.data import list_shards, nucleus_contrast  # noqa: E402
from nucseg.train.modules import quantile_strata  # noqa: E402


def patch_properties(images: np.ndarray, instances: np.ndarray, mpp: float) -> dict[str, np.ndarray]:
    """Per-patch properties of NHWC uint8 ``images`` and their instance maps ``instances`` (N, H, W)."""
    grey = images.astype(np.float32).mean(axis=-1)
    fg = instances > 0
    n_fg = fg.sum(axis=(1, 2))
    counts = np.array([len(np.unique(lab[lab > 0])) for lab in instances])
    with np.errstate(invalid="ignore", divide="ignore"):
        nucleus_grey = np.where(n_fg > 0, (grey * fg).sum(axis=(1, 2)) / n_fg, np.nan)
        background_grey = (grey * ~fg).sum(axis=(1, 2)) / (~fg).sum(axis=(1, 2))
        mean_area = np.where(counts > 0, n_fg * mpp**2 / counts, np.nan)
        touching = np.where(counts > 0, [len(touching_labels(lab)) for lab in instances] / np.maximum(counts, 1),
                            np.nan)
    return {"nucleus_fraction": fg.mean(axis=(1, 2)), "nucleus_count": counts.astype(float),
            "mean_nucleus_area_um2": mean_area, "nucleus_grey": nucleus_grey, "background_grey": background_grey,
            "nucleus_contrast": nucleus_contrast(images, instances),   # background minus nucleus grey level
            "touching_fraction": touching}


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 10 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return round(float(spearmanr(a[ok], b[ok]).statistic), 3)


def drivers(p_real: np.ndarray, weight: np.ndarray, props: dict[str, np.ndarray], n_strata: int) -> dict:
    strata = quantile_strata(props["nucleus_fraction"], n_strata)   # the strata of model.train.weight_strata
    out = {}
    for name, values in props.items():
        within = [_spearman(p_real[strata == s], values[strata == s]) for s in range(n_strata)]
        fifth_edges = np.nanquantile(values, [0.2, 0.4, 0.6, 0.8])
        fifths = np.digitize(values, fifth_edges)
        out[name] = {
            "spearman_p_real": _spearman(p_real, values),
            "spearman_weight": _spearman(weight, values),
            "spearman_p_real_within_crowding_strata": within,
            "mean_within_crowding_strata": round(float(np.mean([r for r in within if r is not None])), 3)
            if any(r is not None for r in within) else None,
            "mean_weight_by_fifth": [round(float(weight[(fifths == q) & np.isfinite(values)].mean()), 3)
                                     for q in range(5)],
            "fifth_edges": np.round(fifth_edges, 3).tolist(),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path, help="a model's importance_weights.npz")
    ap.add_argument("--synth", nargs="+", required=True, help="the synth dirs the model was trained on")
    ap.add_argument("--strata", type=int, default=10, help="quantile bins of nucleus-pixel fraction")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    with np.load(args.weights) as data:
        p_real, weight = data["p_real"].astype(float), data["weight"].astype(float)
    parts = []
    for synth_dir in args.synth:
        mpp = float(json.loads((Path(synth_dir) / "params.json").read_text())["params"]["mpp"])
        for path, _, _ in list_shards([synth_dir]):
            with np.load(path) as shard:
                parts.append(patch_properties(shard["image"], shard["instances"], mpp))
    props = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(props["nucleus_fraction"]) != len(p_real):
        raise SystemExit(f"{args.weights}: {len(p_real)} scores but {len(props['nucleus_fraction'])} patches "
                         f"in {args.synth}: not the shards this model was trained on")
    result = {"weights": str(args.weights), "n_patches": len(p_real), "strata": args.strata,
              "at_floor": round(float((p_real / (1 - p_real) <= 0.2 + 1e-6).mean()), 3),
              "drivers": drivers(p_real, weight, props, args.strata)}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
