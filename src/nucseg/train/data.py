"""Streaming access to synthetic shards, augmentation, and the Lightning DataModule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def list_shards(synth_dirs: list[str | Path]) -> list[tuple[Path, int, int]]:
    """``(shard path, first global index, count)`` for every shard of the given synth outputs."""
    shards, start = [], 0
    for d in synth_dirs:
        d = Path(d)
        meta = json.loads((d / "params.json").read_text())
        for s in meta["shards"]:
            shards.append((d / s["file"], start, int(s["count"])))
            start += int(s["count"])
    return shards


def read_shard_images(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return data["image"]


def nucleus_contrast(images: np.ndarray, instances: np.ndarray) -> np.ndarray:
    """Mean grey level around the nuclei minus that of the nuclei, per NHWC uint8 image (0 without nuclei)."""
    grey = images.astype(np.float32).mean(axis=-1)
    fg = instances > 0
    n_fg, n_bg = fg.sum(axis=(1, 2)), (~fg).sum(axis=(1, 2))
    nucleus = (grey * fg).sum(axis=(1, 2)) / np.maximum(n_fg, 1)
    background = (grey * ~fg).sum(axis=(1, 2)) / np.maximum(n_bg, 1)
    return np.where((n_fg > 0) & (n_bg > 0), background - nucleus, 0.0)


def crowding(shards) -> np.ndarray:
    """Share of nucleus pixels of every sample of the given shards, in their order (the strata of
    ``TrainParams.weight_strata``)."""
    fractions = []
    for path, _, _ in shards:
        with np.load(path) as data:
            fractions.append((data["instances"] > 0).mean(axis=(1, 2)))
    return np.concatenate(fractions)


def augment(image: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
            stain_jitter: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """Flips, rot90, scale, blur or sharpening, and stain/brightness jitter. ``image`` HWC uint8, ``targets`` CHW.

    ``stain_jitter``: each channel's optical density is scaled by U(1 − s, 1 + s) and shifted by N(0, s/5).
    """
    k = int(rng.integers(4))
    image, targets = np.rot90(image, k, axes=(0, 1)), np.rot90(targets, k, axes=(1, 2))
    if rng.random() < 0.5:
        image, targets = image[:, ::-1], targets[:, :, ::-1]
    if rng.random() < 0.5:  # scanners and objectives differ slightly in pixel size
        image, targets = _rescale(np.ascontiguousarray(image), np.ascontiguousarray(targets), rng.uniform(0.8, 1.25))
    img = image.astype(np.float32)
    if rng.random() < 0.3:  # focus
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.3, 1.2))
    elif rng.random() < 0.4:
        img = sharpen(img, rng.uniform(0.3, 1.0))
    # Stain differences between labs: jitter the optical densities of hematoxylin and eosin.
    od = -np.log(np.clip(img, 1, 255) / 255.0)
    od = od * rng.uniform(1 - stain_jitter, 1 + stain_jitter, 3) + rng.normal(0, stain_jitter / 5, 3)
    img = 255.0 * np.exp(-np.clip(od, 0, None))
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.85, 1.15) + mean + rng.normal(0, 6)
    return np.clip(img, 0, 255).astype(np.uint8), np.ascontiguousarray(targets)


def sharpen(image: np.ndarray, amount: float, sigma: float = 1.0) -> np.ndarray:
    """Unsharp mask of a float image: ``image + amount * (image - blur(image, sigma))``.

    Many textures are 20x images upsampled to the working resolution, softer than a sharp 40x scan,
    whose crisp chromatin would otherwise cut vesicular nuclei into pieces.
    """
    return image + amount * (image - cv2.GaussianBlur(image, (0, 0), sigma))


def _rescale(image: np.ndarray, targets: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Zoom by ``factor`` about the centre, keeping the size (reflect-padding when shrinking)."""
    h, w = image.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    img = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    tgt = np.stack([cv2.resize(t, size, interpolation=cv2.INTER_NEAREST_EXACT) for t in targets])
    if factor >= 1:
        y, x = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        return img[y:y + h, x:x + w], tgt[:, y:y + h, x:x + w]
    py, px = h - img.shape[0], w - img.shape[1]
    pad = ((py // 2, py - py // 2), (px // 2, px - px // 2))
    return np.pad(img, pad + ((0, 0),), mode="reflect"), np.pad(tgt, ((0, 0),) + pad, mode="reflect")


class ShardStream(IterableDataset):
    """Iterate synthetic samples shard by shard (only one shard per worker in memory).

    Yields ``(image uint8 HWC, targets float32 (2,H,W), weight float32, index int64)``; targets are the
    foreground and boundary maps, in the order of :data:`nucseg.model.OUTPUTS`.
    """

    def __init__(self, shards, weights: np.ndarray | None, augment: bool, seed: int = 0, stain_jitter: float = 0.15,
                 same_order: bool = False):
        self.shards = shards
        self.same_order = same_order  # every pass in the first pass's order (validation: comparable passes)
        self.weights = weights
        self.augment = augment
        self.stain_jitter = stain_jitter
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return sum(c for _, _, c in self.shards)

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        rng = np.random.default_rng([self.seed, self.epoch, wid])
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        self.epoch += 0 if self.same_order else 1
        for k in order[wid::nworkers]:
            path, start, count = self.shards[k]
            with np.load(path) as data:
                images, inst, bnd = data["image"], data["instances"], data["boundary"]
            for i in rng.permutation(count):
                targets = np.stack([inst[i] > 0, bnd[i] > 0]).astype(np.float32)
                image = images[i]
                if self.augment:
                    image, targets = augment(image, targets, rng, self.stain_jitter)
                w = 1.0 if self.weights is None else float(self.weights[start + i])
                yield (torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(targets),
                       torch.tensor(w, dtype=torch.float32), torch.tensor(start + i))


class SynthDataModule(pl.LightningDataModule):
    """Synthetic shards for training, with importance weights per sample and a held-out shard for validation."""

    def __init__(self, synth_dirs, weights: np.ndarray | None = None, batch_size: int = 8,
                 num_workers: int = 0, seed: int = 0, stain_jitter: float = 0.15):
        super().__init__()
        self.stain_jitter = stain_jitter
        self.shards = list_shards(synth_dirs)
        if not self.shards:
            raise ValueError(f"no synthetic shards under {synth_dirs}")
        self.weights = weights
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        # The last shard is held out when there are several: validation on unseen synthetic patches.
        self.train_shards = self.shards[:-1] if len(self.shards) > 1 else self.shards
        self.val_shards = self.shards[-1:]

    def train_dataloader(self):
        ds = ShardStream(self.train_shards, self.weights, augment=True, seed=self.seed, stain_jitter=self.stain_jitter)
        return DataLoader(ds, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        # The same held-out batches every time: validation passes (and a rerun's, fit_phase) are comparable.
        return DataLoader(ShardStream(self.val_shards, None, augment=False, seed=self.seed, same_order=True),
                          batch_size=self.batch_size, num_workers=0)

    def steps_per_epoch(self) -> int:
        return math.ceil(sum(c for _, _, c in self.train_shards) / self.batch_size)
