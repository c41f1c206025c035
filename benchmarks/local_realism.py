"""Where do synthetic patches look unreal? (a diagnostic, not a test; prints JSON).

A fully convolutional real-vs-synthetic discriminator with a 29 px receptive field (14.5 µm at 0.5 µm/px),
one logit per 4 × 4 px, is trained with a per-location BCE on most of a synthetic output's real crops
(``real.npz``, the training discriminator's real class) and all its shards but the last, then scored on the
held-out real crops and the last shard. Reported: AUC per location and per patch (mean of the map), the
share of synthetic locations whose clipped importance weight w = p / (1 − p) sits at the 0.2 floor, on the
drawn nuclei (over half of the 4 × 4 block labelled nucleus) and elsewhere, and how the patch means rank
patches against the training stage's P(real) (``--p-real``: an ``importance_weights.npz``).

``--view`` transforms both classes first, to find the discriminator's cue: ``grey`` (colour removed),
``blur`` (Gaussian σ 1 px) or ``half`` (half the resolution and back). docs/experiments.md, "Where within a
patch", has the figures for the shipped recipe's shards:

    python benchmarks/local_realism.py --synth results/synth/HNSC/shards \
        --p-real results/models/recipe/importance_weights.npz [--view grey]
"""

from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

from nucseg.metrics import two_sample_auc
from nucseg.model import normalize
from nucseg.train.data import list_shards


def local_discriminator() -> nn.Sequential:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
    return nn.Sequential(*block(3, 16, 1), *block(16, 32, 2), *block(32, 32, 1), *block(32, 64, 2),
                         *block(64, 64, 1), *block(64, 64, 1), nn.Conv2d(64, 1, 1))


def view(images: np.ndarray, kind: str) -> np.ndarray:
    if kind == "grey":
        return np.repeat(images.mean(-1, keepdims=True).astype(np.uint8), 3, -1)
    if kind == "blur":
        return np.stack([cv2.GaussianBlur(im, (0, 0), 1.0) for im in images])
    if kind == "half":
        h, w = images.shape[1:3]
        return np.stack([cv2.resize(cv2.resize(im, (w // 2, h // 2), interpolation=cv2.INTER_AREA), (w, h))
                         for im in images])
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", required=True, help="a synth output folder (shards, params.json, real.npz)")
    ap.add_argument("--p-real", help="importance_weights.npz of a model trained on these shards")
    ap.add_argument("--view", choices=["rgb", "grey", "blur", "half"], default="rgb")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--held-out-real", type=int, default=44)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    shards = list_shards([args.synth])
    with np.load(f"{args.synth}/real.npz") as data:
        real = view(data["patches"], args.view)
    order = rng.permutation(len(real))
    real_train, real_test = real[order[args.held_out_real:]], real[order[:args.held_out_real]]
    synth_train = view(np.concatenate([np.load(p)["image"] for p, _, _ in shards[:-1]]), args.view)
    with np.load(shards[-1][0]) as data:
        synth_test, labels = view(data["image"], args.view), data["instances"]

    net = local_discriminator()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    started = time.monotonic()
    for _ in range(args.steps):
        batch = torch.from_numpy(np.concatenate([real_train[rng.integers(len(real_train), size=16)],
                                                 synth_train[rng.integers(len(synth_train), size=16)]]))
        batch = torch.rot90(batch, int(rng.integers(4)), (1, 2))
        if rng.random() < 0.5:
            batch = batch.flip(2)
        logits = net(normalize(batch))
        target = torch.cat([torch.ones(16), torch.zeros(16)])[:, None, None, None].expand_as(logits)
        loss = F.binary_cross_entropy_with_logits(logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.monotonic() - started

    net.eval()
    with torch.no_grad():
        def p_real(images):
            return torch.cat([torch.sigmoid(net(normalize(torch.from_numpy(images[i:i + 64]))))
                              for i in range(0, len(images), 64)]).numpy()[:, 0]
        p_r, p_s = p_real(real_test), p_real(synth_test)
    w = np.clip(p_s / (1 - p_s), 0.2, 2.0)
    at_floor = w <= 0.2 + 1e-4
    nuclei = F.avg_pool2d(torch.from_numpy((labels > 0).astype(np.float32))[:, None], 4)[:, 0].numpy() > 0.5
    out = {"synth": args.synth, "view": args.view, "steps": args.steps, "train_s": round(train_s, 1),
           "n_real_test": len(real_test), "n_synthetic_test": len(synth_test),
           "auc_per_location": two_sample_auc(p_r, p_s),
           "auc_per_patch": two_sample_auc(p_r.mean((1, 2)), p_s.mean((1, 2))),
           "floor_share": float(at_floor.mean()), "floor_share_on_nuclei": float(at_floor[nuclei].mean()),
           "floor_share_elsewhere": float(at_floor[~nuclei].mean()),
           "mean_weight_on_nuclei": float(w[nuclei].mean()), "mean_weight_elsewhere": float(w[~nuclei].mean())}
    if args.p_real:
        start = shards[-1][1]
        p_patch = np.load(args.p_real)["p_real"][start:start + len(synth_test)]
        out["spearman_patch_mean_vs_p_real"] = float(spearmanr(p_s.mean((1, 2)), p_patch).statistic)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
