"""Is the importance-weight discriminator overconfident? (a benchmark, not a test; prints JSON; label-free).

For each seed, the training stage's discriminator (``nucseg.train.fit.train_discriminator``, same
parameters as ``nucseg train``) is trained on three quarters of a synth folder's real crops and on all
its shards but the last two, then scored on the held-out quarter and on the second-to-last shard (the
last one is the segmentation network's validation shard). Reported per seed: held-out AUC, the share of
each class called right, and the temperature T minimising the class-balanced log loss of
sigmoid(logit / T) on the held-out patches (T ≈ 1: calibrated; T ≫ 1: overconfident, the weights'
floor would be an artefact; T ≈ 1 with a high AUC: the synthetic patches are recognisably synthetic).
No annotated tile is used.

    python benchmarks/discriminator_calibration.py [--synth results/synth/HNSC/shards] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nucseg.metrics import two_sample_auc  # noqa: E402
from quality import REPO, print_json  # noqa: E402


def calibration(real_logits: np.ndarray, synth_logits: np.ndarray) -> dict:
    from scipy.optimize import minimize_scalar

    def balanced_log_loss(log_t: float) -> float:
        t = np.exp(log_t)
        return float((np.logaddexp(0, -real_logits / t).mean() + np.logaddexp(0, synth_logits / t).mean()) / 2)

    fit = minimize_scalar(balanced_log_loss, bounds=(-3, 4), method="bounded")
    return {"auc": round(two_sample_auc(real_logits, synth_logits), 3),
            "real_called_real": round(float((real_logits > 0).mean()), 3),
            "synthetic_called_synthetic": round(float((synth_logits < 0).mean()), 3),
            "temperature": round(float(np.exp(fit.x)), 3), "log_loss_t1": round(balanced_log_loss(0.0), 3),
            "log_loss_fitted": round(float(fit.fun), 3)}


def main() -> None:
    import torch

    from nucseg.model import normalize
    from nucseg.train.data import list_shards, read_shard_images
    from nucseg.train.fit import random_crops, train_discriminator
    from nucseg.train.params import TrainParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth", type=Path, default=REPO / "results" / "synth" / "HNSC" / "shards")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--disc-steps", type=int, default=400, help="as the shipped model's training")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    shards = list_shards([args.synth])
    if len(shards) < 3:
        raise SystemExit(f"{args.synth}: needs at least 3 shards, has {len(shards)}")
    real = np.load(args.synth / "real.npz")["patches"]
    result = {"synth": str(args.synth), "n_real": int(len(real)), "disc_steps": args.disc_steps, "seeds": {}}
    for seed in args.seeds:
        rng = np.random.default_rng(100 + seed)
        order = rng.permutation(len(real))
        held_real, train_real = real[order[:len(real) // 4]], real[order[len(real) // 4:]]
        params = TrainParams(disc_steps=args.disc_steps, seed=seed)
        with tempfile.TemporaryDirectory() as tmp:
            disc = train_discriminator(train_real, shards[:-2], Path(tmp), params, progress=False)
        size = params.disc_crop
        held_synth = random_crops(read_shard_images(shards[-2][0]), size, rng)
        with torch.inference_mode():
            real_logits = disc.net(normalize(torch.from_numpy(random_crops(held_real, size, rng)))).numpy()
            synth_logits = disc.net(normalize(torch.from_numpy(held_synth))).numpy()
        result["seeds"][str(seed)] = calibration(real_logits, synth_logits)
    print_json(result, args.out)


if __name__ == "__main__":
    main()
