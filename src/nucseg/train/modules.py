"""LightningModules: the real-vs-synthetic discriminator and the importance-weighted segmenter."""

from __future__ import annotations

import math
import time

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from ..model import UNet, normalize
from .data import augment


def importance_weights(p_real: torch.Tensor, clip: tuple[float, float] = (0.2, 2.0)) -> torch.Tensor:
    """w = D / (1 − D) for discriminator outputs D = P(real | x), clipped to ``clip``.

    Under the discriminator's density-ratio estimate, weighting a synthetic sample's loss by w gives the
    expected loss under the real distribution (Hou et al., 2019).
    """
    p = p_real.clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).clamp(*clip)


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size as a share of the samples, (Σw)² / (N Σw²), in (0, 1]."""
    w = np.asarray(weights, dtype=np.float64)
    return float(min(1.0, w.sum() ** 2 / (len(w) * (w ** 2).sum())))


def quantile_strata(values: np.ndarray, n_strata: int) -> np.ndarray:
    """Index (0 … ``n_strata`` − 1) of each value's quantile bin."""
    edges = np.quantile(values, np.linspace(0, 1, n_strata + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def stratified_weights(weights: np.ndarray, strata_by: np.ndarray, n_strata: int) -> np.ndarray:
    """Divide each weight by the mean weight of its stratum, so every stratum keeps its share of the samples.

    Strata are ``n_strata`` quantile bins of ``strata_by`` (e.g. each patch's nucleus-pixel fraction). The
    density ratio p_real(x) / p_synth(x) factors into the ratio of the strata's frequencies and the ratio
    within a stratum; this keeps the second only. Where the discriminator's preference between strata is not
    a real difference of the two distributions (it finds crowded synthetic patches easier to spot because
    they show more synthetic nuclei), that preference would otherwise shift the label distribution the
    network learns.

    Parameters
    ----------
    weights : (N,) array of importance weights.
    strata_by : (N,) array, the quantity to stratify by.
    n_strata : number of quantile bins; ≤ 1 leaves the weights as they are.

    Returns
    -------
    (N,) float32 array; its mean within every stratum is 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if n_strata <= 1:
        return weights.astype(np.float32)
    _, stratum = np.unique(quantile_strata(strata_by, n_strata), return_inverse=True)
    means = np.bincount(stratum, weights) / np.bincount(stratum)
    return (weights / means[stratum]).astype(np.float32)


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, boundary_weight: float = 1.0,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCE + soft Dice on foreground and BCE on boundary (targets in [0, 1], channels in the order of
    :data:`nucseg.model.OUTPUTS`); one value per sample ``(N,)``. ``valid`` ``(N, H, W)``: only these pixels
    count (pseudo-labels, :func:`nucseg.train.pseudo.pseudo_targets`)."""
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    prob = torch.sigmoid(logits[:, 0])
    fg = targets[:, 0]
    if valid is None:
        bce = bce.mean(dim=(2, 3))
    else:
        bce = (bce * valid[:, None]).sum(dim=(2, 3)) / valid.sum(dim=(1, 2)).clamp_min(1)[:, None]
        prob, fg = prob * valid, fg * valid
    inter = (prob * fg).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2)) + fg.sum(dim=(1, 2)) + 1)
    return bce[:, 0] + boundary_weight * bce[:, 1] + dice


class Discriminator(nn.Module):
    """Small CNN scoring P(real) of an RGB patch (any size; global average pooling)."""

    def __init__(self, base: int = 16):
        super().__init__()
        layers, cin = [], 3
        for i in range(4):
            cout = base * 2**i
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3))).squeeze(1)


class DiscriminatorModule(pl.LightningModule):
    """P(real | patch): the discriminator whose odds are the importance weights."""

    def __init__(self, lr: float = 1e-3, base: int = 16):
        super().__init__()
        self.save_hyperparameters()
        self.net = Discriminator(base)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(normalize(images_uint8)))

    def training_step(self, batch, batch_idx):
        images, is_real = batch
        logits = self.net(normalize(images))
        loss = F.binary_cross_entropy_with_logits(logits, is_real)
        acc = ((logits > 0).float() == is_real).float().mean()
        self.log_dict({"disc_loss": loss, "disc_acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TrainingClock(pl.Callback):
    """Seconds spent in ``trainer.fit`` over every run that continued one checkpoint, kept in it, so that the
    card of a resumed run reports the whole training time and not only its own.

    ``resuming``: the run continues a checkpoint. If that checkpoint holds no clock (an older version wrote
    it), the time before it is unknown and :meth:`seconds` says so with None.
    """

    def __init__(self, resuming: bool = False):
        self.previous: float | None = None if resuming else 0.0
        self._started: float | None = None

    def on_train_start(self, trainer, pl_module):
        self._started = time.monotonic()

    def on_train_end(self, trainer, pl_module):
        # Stopped here: what runs after the phase (the next phase, the card) is not its time.
        self.previous, self._started = self.seconds(), None

    def seconds(self) -> float | None:
        if self.previous is None:
            return None
        return self.previous + (time.monotonic() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.previous = state_dict["seconds"]


class SegmentationModule(pl.LightningModule):
    """U-Net trained on synthetic patches with per-sample importance weights.

    The loss of sample i is multiplied by w_i / mean(w) over the batch (weights normalised per batch so
    the learning rate keeps its meaning); with ``weighted=False`` every w_i is 1 (the ablation).

    Self-training: with ``pseudo_batch`` > 0 and ``pseudo_labelled`` set by the caller (real uint8 NHWC
    patches and their :func:`nucseg.train.pseudo.pseudo_label` targets; not part of the state), each step
    adds ``pseudo_batch`` augmented real patches whose loss counts only their valid pixels; the batch's
    loss is the mean over synthetic and real samples together.
    """

    def __init__(self, base: int = 16, depth: int = 4, lr: float = 2e-3, weighted: bool = True,
                 boundary_weight: float = 1.0, max_steps: int = 1000, pseudo_batch: int = 0,
                 stain_jitter: float = 0.15, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        # Foreground and boundary (OUTPUTS[:2]); networks with a centre output still load for inference.
        self.net = UNet(base=base, depth=depth, out_channels=2)
        self.pseudo_labelled: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(images_uint8))

    def training_step(self, batch, batch_idx):
        images, targets, weights, _ = batch
        losses = per_sample_loss(self(images), targets, self.hparams.boundary_weight)
        if self.hparams.weighted:
            w = weights / weights.mean().clamp_min(1e-6)
        else:
            w = torch.ones_like(weights)
        loss = (losses * w).mean()
        if self.pseudo_labelled is not None and self.hparams.pseudo_batch > 0:
            real, real_targets = self._pseudo_batch(targets.shape[2:])
            real_losses = per_sample_loss(self(real), real_targets[:, :-1], self.hparams.boundary_weight,
                                          valid=real_targets[:, -1])
            self.log("pseudo_loss", real_losses.mean())
            loss = (loss * len(losses) + real_losses.sum()) / (len(losses) + len(real_losses))
        self.log("train_loss", loss, prog_bar=True)
        self.log_dict({"w_mean": weights.mean(), "w_min": weights.min(), "w_max": weights.max()})
        return loss

    def _pseudo_batch(self, size) -> tuple[torch.Tensor, torch.Tensor]:
        """``pseudo_batch`` pseudo-labelled real patches, cropped to ``size`` and augmented as the synthetic
        ones (:func:`nucseg.train.data.augment`), drawn from a generator seeded by the step (resumable)."""
        patches, targets = self.pseudo_labelled
        h, w = size
        if patches.shape[1] < h or patches.shape[2] < w:
            raise ValueError(f"real patches {patches.shape[1:3]} are smaller than the synthetic ones {(h, w)}")
        rng = np.random.default_rng([self.hparams.seed, self.global_step])
        images, maps = [], []
        for i in rng.integers(len(patches), size=self.hparams.pseudo_batch):
            y, x = rng.integers(patches.shape[1] - h + 1), rng.integers(patches.shape[2] - w + 1)
            image, target = augment(patches[i, y:y + h, x:x + w], targets[i, :, y:y + h, x:x + w], rng,
                                    self.hparams.stain_jitter)
            images.append(image)
            maps.append(target)
        return (torch.from_numpy(np.stack(images)).to(self.device),
                torch.from_numpy(np.stack(maps)).to(self.device))

    def validation_step(self, batch, batch_idx):
        images, targets, _, _ = batch
        logits = self(images)
        loss = per_sample_loss(logits, targets, self.hparams.boundary_weight).mean()
        pred = logits[:, 0] > 0
        fg = targets[:, 0] > 0.5
        dice = 2 * (pred & fg).sum() / (pred.sum() + fg.sum()).clamp_min(1)
        self.log_dict({"val_loss": loss, "val_dice": dice}, prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self._lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up over 5 % of the steps, then cosine decay to 2 %.

        Computed from ``max_steps`` at call time, so a resumed run may extend training.
        """
        total = max(2, self.hparams.max_steps)
        warm = max(1, total // 20)
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))
