"""How realistic is the synthetic training data? (a benchmark, not a test; prints JSON).

(a) Nucleus statistics of the synthetic masks vs the manual annotations of the 18 MoNuSeg tiles
    (../shared/data/nuclei/monuseg, µm/px from the XML, 0.25 where missing): nucleus area (µm², nuclei
    not touching the image border), density (nuclei per 100 µm × 100 µm and per mm², counted by
    centroid in windows of the synthetic patch's physical size) and nuclear area fraction; mean, median,
    quartiles and the Wasserstein distance between the distributions. MoNuSeg is only a yardstick here:
    it never reaches the generator, the refiner or the classifier.
(b) A fresh real-vs-synthetic classifier (the discriminator CNN of the training stage, trained from
    scratch for a fixed budget on a train split, scored on a held-out split): balanced accuracy and AUC
    for the synthetic patches before and after the GAN refiner (``nucseg.refiner``). 0.5 = the
    classifier cannot tell synthetic from real; lower is more realistic.

Real tissue = the unlabelled images of ../shared/data/tissue (folders with a known µm/px) and patches of
the two real Aperio slides (tissue detection run here). Real images are split per folder (the last
``--test-fraction`` of each folder's sorted files, so overlapping crops of one source tile stay on one
side) into a train part (generator textures, refiner's real class, classifier's real class) and a test
part seen only by the classifier's evaluation. Synthetic patches are split the same way by index.

    python benchmarks/synth_realism.py [--n-synth 384] [--refiner-steps 600] [--out realism.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nucseg.metrics import roc_auc

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MPP = 0.25
# Folders of ../shared/data/tissue whose µm/px is known (stated or measured; see its README).
TISSUE_DIRS = {"quip_cnn_segmentation": 0.25, "henorm_examples": 0.25, "tiatoolbox_target": 0.25,
               "openslide_os1_crop": 0.2271, "u24_lymphocyte": 0.5, "kather_nct_crc_samples": 0.5,
               "prov_gigapath_tiles": 0.5, "instanseg_example": 0.5001}
SLIDES = {"CMU-1-Small-Region.svs": None, "TCGA-CR-7395-01A-01-TS1.svs": 0.25}  # the TCGA file has no mpp


# ---------------------------------------------------------------- real tissue

def real_groups(tmp: Path) -> dict[str, list[np.ndarray]]:
    """Real unlabelled tissue at ``MPP``, one list per source (folder or slide), in sorted file order."""
    from nucseg.synth import load_textures
    from nucseg.tissue import detect_tissue

    groups = {}
    for name, mpp in TISSUE_DIRS.items():
        if (DATA / "tissue" / name).is_dir():
            groups[name] = load_textures([], [{"path": DATA / "tissue" / name, "mpp": mpp}], MPP)
    for name, fallback in SLIDES.items():
        path = DATA / "slides" / "aperio" / name
        if path.is_file():
            facts = detect_tissue(path, tmp / path.stem, path.stem, mpp_work=MPP, mpp_fallback=fallback)
            if facts["status"] == "ok":
                groups[path.stem] = load_textures([tmp / path.stem / "patches.npz"], None, MPP)
    if not groups:
        raise SystemExit(f"no real tissue under {DATA} (the shared data folder must be beside the repo)")
    return groups


def split_groups(groups: dict[str, list], test_fraction: float) -> tuple[list, list]:
    """Train/test split per source: the last ``test_fraction`` of each source's images are test."""
    train, test = [], []
    for images in groups.values():
        n_test = int(round(len(images) * test_fraction)) if len(images) > 1 else 0
        train += images[:len(images) - n_test]
        test += images[len(images) - n_test:]
    return train, test


# ---------------------------------------------------------------- nucleus statistics

def instance_stats(labels: np.ndarray, mpp: float, window_px: int) -> tuple[list, list, list]:
    """Areas (µm², nuclei off the border), and per window of ``window_px``: count/mm², area fraction."""
    from skimage.measure import regionprops

    h, w = labels.shape
    props = regionprops(labels)
    areas, centroids = [], []
    for p in props:
        y0, x0, y1, x1 = p.bbox
        if y0 > 0 and x0 > 0 and y1 < h and x1 < w:
            areas.append(p.area * mpp**2)
        centroids.append(p.centroid)
    centroids = np.asarray(centroids).reshape(-1, 2)
    densities, fractions = [], []
    window_mm2 = (window_px * mpp / 1000) ** 2
    for y in range(0, h - window_px + 1, window_px):
        for x in range(0, w - window_px + 1, window_px):
            inside = ((centroids[:, 0] >= y) & (centroids[:, 0] < y + window_px)
                      & (centroids[:, 1] >= x) & (centroids[:, 1] < x + window_px)).sum()
            densities.append(inside / window_mm2)
            fractions.append(float((labels[y:y + window_px, x:x + window_px] > 0).mean()))
    return areas, densities, fractions


def summary(values) -> dict:
    v = np.asarray(values, float)
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, [0.25, 0.5, 0.75])
    return {"n": int(v.size), "mean": round(float(v.mean()), 3), "q25": round(float(q[0]), 3),
            "median": round(float(q[1]), 3), "q75": round(float(q[2]), 3)}


def compare(synthetic, real) -> dict:
    from scipy.stats import ks_2samp, wasserstein_distance

    out = {"synthetic": summary(synthetic), "monuseg": summary(real)}
    if len(synthetic) and len(real):
        out["wasserstein"] = round(float(wasserstein_distance(synthetic, real)), 3)
        out["ks_statistic"] = round(float(ks_2samp(synthetic, real).statistic), 4)
    return out


def mask_statistics(instances: np.ndarray, patch_mpp: float) -> dict:
    """Synthetic masks vs MoNuSeg annotations: area, density and area fraction distributions."""
    from nucseg.evaluate import load_dataset

    window_um = instances.shape[1] * patch_mpp
    syn = [instance_stats(inst.astype(np.int32), patch_mpp, inst.shape[0]) for inst in instances]
    root = DATA / "nuclei" / "monuseg"
    if not root.is_dir():
        return {"skipped": f"{root} not present"}
    real = [instance_stats(s.labels, s.mpp, int(round(window_um / s.mpp))) for s in load_dataset(root, 0.25)]
    result = {"window_um": window_um, "n_monuseg_tiles": len(real), "n_synthetic_patches": len(syn)}
    for k, name in enumerate(("area_um2", "nuclei_per_mm2", "area_fraction")):
        result[name] = compare(np.concatenate([s[k] for s in syn]), np.concatenate([r[k] for r in real]))
    for key in ("synthetic", "monuseg"):  # the same density in nuclei per 100 µm × 100 µm
        d = result["nuclei_per_mm2"][key]
        result.setdefault("nuclei_per_100um2", {})[key] = {k: round(v / 100, 3) if k != "n" else v
                                                           for k, v in d.items()}
    return result


# ---------------------------------------------------------------- synthetic data

def generate(textures: list[np.ndarray], n: int, patch_size: int, seed: int) -> dict[str, np.ndarray]:
    from nucseg.synth import SynthParams, make_patch

    params = SynthParams(patch_size=patch_size, mpp=MPP, seed=seed)
    out = {"image": [], "instances": [], "boundary": []}
    for i in range(n):
        s = seed * 1_000_003 + i
        patch = make_patch(textures[np.random.default_rng(s).integers(len(textures))], s, params)
        for k in out:
            out[k].append(patch[k])
    return {k: np.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------- real-vs-synthetic classifier

def fixed_crops(images: list[np.ndarray], size: int, per_image: int, seed: int) -> np.ndarray:
    from nucseg.refiner import random_crop_batch

    rng = np.random.default_rng(seed)
    return np.concatenate([random_crop_batch([im], per_image, size, rng) for im in images])


def classifier_score(real_train, synth_train, real_test: np.ndarray, synth_test: np.ndarray, crop: int,
                     steps: int, seed: int, batch: int = 32) -> dict:
    """Train a fresh real-vs-synthetic CNN; balanced accuracy and AUC on the test crops."""
    import torch
    from torch.nn import functional as F

    from nucseg.model import normalize
    from nucseg.refiner import random_crop_batch
    from nucseg.train.modules import Discriminator

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = Discriminator(base=16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    labels = torch.cat([torch.ones(batch // 2), torch.zeros(batch // 2)])
    net.train()
    for _ in range(steps):  # balanced batches, random crops with flips/rotations
        x = np.concatenate([random_crop_batch(real_train, batch // 2, crop, rng),
                            random_crop_batch(synth_train, batch // 2, crop, rng)])
        loss = F.binary_cross_entropy_with_logits(net(normalize(torch.from_numpy(x))), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.inference_mode():
        scores = np.concatenate([net(normalize(torch.from_numpy(np.ascontiguousarray(a[i:i + 64])))).numpy()
                                 for a in (real_test, synth_test) for i in range(0, len(a), 64)])
    y = np.concatenate([np.ones(len(real_test)), np.zeros(len(synth_test))])
    pred = scores > 0
    balanced = 0.5 * (pred[y > 0].mean() + (~pred[y == 0]).mean())
    return {"accuracy": round(float(balanced), 4), "auc": round(roc_auc(scores, y), 4)}


def realism(real_train, real_test_crops, synth_train, synth_test_crops, args) -> dict:
    runs = [classifier_score(real_train, synth_train, real_test_crops, synth_test_crops, args.crop,
                             args.classifier_steps, args.seed + k) for k in range(args.classifier_seeds)]
    return {"accuracy": round(float(np.mean([r["accuracy"] for r in runs])), 4),
            "accuracy_std": round(float(np.std([r["accuracy"] for r in runs])), 4),
            "auc": round(float(np.mean([r["auc"] for r in runs])), 4),
            "auc_std": round(float(np.std([r["auc"] for r in runs])), 4), "runs": runs}


# ---------------------------------------------------------------- main

def main() -> None:
    from nucseg.refiner import RefinerParams, mask_dice, refine_images, targets_of, train_refiner

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-synth", type=int, default=384, help="synthetic patches generated")
    parser.add_argument("--patch-size", type=int, default=256, help="synthetic patch side, px at 0.25 µm/px")
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--refiner-steps", type=int, default=600)
    parser.add_argument("--refiner-batch", type=int, default=16)
    parser.add_argument("--refiner-crop", type=int, default=64)
    parser.add_argument("--l1-weight", type=float, default=RefinerParams.l1_weight)
    parser.add_argument("--crop", type=int, default=128, help="classifier input side, px")
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--classifier-seeds", type=int, default=5,
                        help="classifiers trained per condition (same seeds before and after: paired)")
    parser.add_argument("--real-crops", type=int, default=2, help="test crops per real test image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a machine shared with other jobs; 0: torch's default)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    timing = {}

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        groups = real_groups(Path(tmp))
    real_train, real_test = split_groups(groups, args.test_fraction)
    timing["load_real_s"] = round(time.monotonic() - started, 1)

    t = time.monotonic()
    synth = generate(real_train, args.n_synth, args.patch_size, args.seed)
    n_train = int(round(args.n_synth * (1 - args.test_fraction)))
    timing["generate_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    stats = mask_statistics(synth["instances"], MPP)
    timing["mask_stats_s"] = round(time.monotonic() - t, 1)

    t = time.monotonic()
    params = RefinerParams(steps=args.refiner_steps, batch_size=args.refiner_batch, crop=args.refiner_crop,
                           l1_weight=args.l1_weight, seed=args.seed, mpp=MPP, device="cpu")
    targets = targets_of(synth["instances"][:n_train], synth["boundary"][:n_train])
    net, refiner_metrics = train_refiner(list(synth["image"][:n_train]), list(targets), real_train, params)
    refined = refine_images(net, synth["image"], synth["instances"], synth["boundary"])
    timing["refiner_s"] = round(time.monotonic() - t, 1)
    refiner_metrics.update({
        "mask_dice_before": round(mask_dice(synth["image"], synth["instances"]), 4),
        "mask_dice_after": round(mask_dice(refined, synth["instances"]), 4),
        "mean_abs_change": round(float(np.abs(refined.astype(np.int16) - synth["image"]).mean()), 3)})

    t = time.monotonic()
    real_test_crops = fixed_crops(real_test, args.crop, args.real_crops, args.seed + 101)
    scores = {}
    for name, images in (("before_refiner", synth["image"]), ("after_refiner", refined)):
        test_crops = fixed_crops(list(images[n_train:]), args.crop, 1, args.seed + 202)
        scores[name] = realism(real_train, real_test_crops, list(images[:n_train]), test_crops, args)
    for key in ("accuracy", "auc"):  # paired by classifier seed: same initialisation and crops
        before, after = (np.array([r[key] for r in scores[n]["runs"]]) for n in ("before_refiner", "after_refiner"))
        scores[f"{key}_change"] = round(float((after - before).mean()), 4)
        scores[f"{key}_lower_in_runs"] = f"{int((after < before).sum())}/{len(before)}"
    timing["classifier_s"] = round(time.monotonic() - t, 1)
    timing["total_s"] = round(time.monotonic() - started, 1)

    result = {
        "data": {"real_sources": {k: len(v) for k, v in groups.items()}, "real_train_images": len(real_train),
                 "real_test_images": len(real_test), "real_test_crops": int(len(real_test_crops)),
                 "synthetic_train": n_train, "synthetic_test": args.n_synth - n_train,
                 "patch_size": args.patch_size, "mpp": MPP},
        "mask_statistics": stats,
        "refiner": refiner_metrics,
        "real_vs_synthetic_classifier": scores,
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "timing": timing,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
