"""LightningModules: the real-vs-synthetic discriminator and the importance-weighted segmenter."""

from __future__ import annotations

import math
import time

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.nn import functional as F

from ..model import OUTPUTS, UNet, normalize
from .data import augment


def importance_weights(p_real: torch.Tensor, clip: tuple[float, float] = (0.2, 2.0),
                       power: float = 1.0) -> torch.Tensor:
    """w = D / (1 − D) for discriminator outputs D = P(real | x), clipped to ``clip``, raised to ``power``.

    Under the discriminator's density-ratio estimate, weighting a synthetic sample's loss by w gives the
    expected loss under the real distribution (Hou et al., 2019). A ``power`` λ < 1 flattens the weights
    (Shimodaira, 2000): λ = 1 is unbiased under the estimate, λ = 0 is unweighted; in between trades that
    bias for a larger effective sample size.
    """
    p = p_real.clamp(1e-6, 1 - 1e-6)
    return (p / (1 - p)).clamp(*clip) ** power


def effective_sample_size(weights: np.ndarray) -> float:
    """Kish's effective sample size as a share of the samples, (Σw)² / (N Σw²), in (0, 1]."""
    w = np.asarray(weights, dtype=np.float64)
    return float(min(1.0, w.sum() ** 2 / (len(w) * (w ** 2).sum())))


def quantile_strata(values: np.ndarray, n_strata: int) -> np.ndarray:
    """Index (0 … ``n_strata`` − 1) of each value's quantile bin."""
    edges = np.quantile(values, np.linspace(0, 1, n_strata + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def stratified_weights(weights: np.ndarray, strata_by: np.ndarray, n_strata: int,
                       then_by: np.ndarray | None = None, n_then: int = 0) -> np.ndarray:
    """Divide each weight by the mean weight of its stratum, so every stratum keeps its share of the samples.

    Strata are ``n_strata`` quantile bins of ``strata_by`` (e.g. each patch's nucleus-pixel fraction) and,
    with ``then_by``, each of these split again into ``n_then`` quantile bins of ``then_by`` (e.g. nucleus
    contrast) within it. The density ratio p_real(x) / p_synth(x) factors into the ratio of the strata's
    frequencies and the ratio within a stratum; this keeps the second only. Where the discriminator's
    preference between strata is not a real difference of the two distributions (it finds crowded
    synthetic patches easier to spot because they show more synthetic nuclei), that preference would
    otherwise shift the label distribution the network learns.

    Parameters
    ----------
    weights : (N,) array of importance weights.
    strata_by : (N,) array, the quantity to stratify by.
    n_strata : number of quantile bins; ≤ 1 leaves the weights as they are.
    then_by : (N,) array, optional, the quantity to split each stratum by.
    n_then : number of quantile bins of ``then_by`` within each stratum; ≤ 1 splits none.

    Returns
    -------
    (N,) float32 array; its mean within every stratum is 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if n_strata <= 1:
        return weights.astype(np.float32)
    stratum = quantile_strata(strata_by, n_strata)
    if then_by is not None and n_then > 1:
        split = np.zeros_like(stratum)
        for s in np.unique(stratum):
            inside = stratum == s
            split[inside] = quantile_strata(np.asarray(then_by)[inside], n_then)
        stratum = stratum * n_then + split
    _, stratum = np.unique(stratum, return_inverse=True)
    means = np.bincount(stratum, weights) / np.bincount(stratum)
    return (weights / means[stratum]).astype(np.float32)


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, boundary_weight: float = 1.0,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCE + soft Dice on foreground, BCE on boundary and, for a third output, on the centre map (soft
    targets in [0, 1]); one value per sample ``(N,)``. ``valid`` ``(N, H, W)``: only these pixels count
    (pseudo-labels, :func:`nucseg.train.pseudo.pseudo_targets`)."""
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
    return bce[:, 0] + boundary_weight * bce[:, 1] + bce[:, 2:].sum(dim=1) + dice


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
    """P(real | patch). ``downsample`` k > 1: the network sees the patch averaged over k × k pixels, i.e.
    its composition (how many nuclei, how large, what colours) but not the fine detail of how they were drawn."""

    def __init__(self, lr: float = 1e-3, base: int = 16, augment: bool = False, downsample: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.net = Discriminator(base)

    def _logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = normalize(images_uint8)
        if self.hparams.downsample > 1:
            x = F.avg_pool2d(x, self.hparams.downsample)
        return self.net(x)

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self._logits(images_uint8))

    def training_step(self, batch, batch_idx):
        images, is_real = batch
        if self.hparams.augment:
            # Orientation carries no information about realism; without this the network can memorise
            # the few hundred real patches instead of learning what makes tissue look real.
            k = int(torch.randint(4, (1,)))
            images = torch.rot90(images, k, dims=(1, 2))
            if torch.rand(1).item() < 0.5:
                images = images.flip(2)
        logits = self._logits(images)
        loss = F.binary_cross_entropy_with_logits(logits, is_real)
        acc = ((logits > 0).float() == is_real).float().mean()
        self.log_dict({"disc_loss": loss, "disc_acc": acc}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class _GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient backwards is multiplied by ``-scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class OutputDiscriminator(nn.Module):
    """Fully convolutional patch classifier on the network's output probabilities: logit of P(real tissue)
    for each 8 × 8-pixel neighbourhood (Tsai et al., 2018, at a quarter of their width)."""

    def __init__(self, in_channels: int, base: int = 32):
        super().__init__()
        layers, cin = [], in_channels
        for i in range(3):
            layers += [nn.Conv2d(cin, base * 2**i, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
            cin = base * 2**i
        self.net = nn.Sequential(*layers, nn.Conv2d(cin, 1, 3, padding=1))

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        return self.net(probs)


def adaptation_ramp(progress: float) -> float:
    """DANN's schedule of the reversed gradient's scale, 0 at the start to ~1 at the end (Ganin et al., 2016):
    the discriminator first learns what tells the domains apart while the network's outputs are still noise."""
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


# Bounds of the hard-example transform: each channel's optical density scaled by 1 ± 0.2 and shifted by
# ± 0.04 (the range of the stain jitter, a little wider), and the fine detail x − blur(x) added back
# scaled by ± 0.6 (from a mild blur to a mild unsharp mask): changes a scanner or a lab could make.
HARD_BOUNDS = (0.2, 0.04, 0.6)


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """Gaussian blur (σ 1 px) of an NCHW float tensor, channel by channel, reflected at the edges."""
    k = torch.exp(-torch.arange(-2, 3, dtype=x.dtype, device=x.device) ** 2 / 2)
    k = (k / k.sum()).view(1, 1, 1, 5)
    n, c, h, w = x.shape
    y = F.pad(x.reshape(n * c, 1, h, w), (2, 2, 2, 2), mode="reflect")
    return F.conv2d(F.conv2d(y, k), k.transpose(2, 3)).reshape(n, c, h, w)


def photometric_transform(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Stain and focus change of float NCHW RGB images (0-255) by per-sample parameters ``theta`` (N, 7).

    ``theta[:, :3]`` scales each channel's optical density by ``1 + θ``, ``theta[:, 3:6]`` shifts it, and
    ``theta[:, 6]`` adds ``θ`` × the image's fine detail (negative blurs, positive sharpens). Zero is the
    identity; every step is differentiable in ``theta``.
    """
    detail = images - _blur3(images)
    x = (images + theta[:, 6, None, None, None] * detail).clamp(1.0, 255.0)
    od = -torch.log(x / 255.0)
    od = od * (1 + theta[:, :3, None, None]) + theta[:, 3:6, None, None]
    return 255.0 * torch.exp(-od.clamp_min(0.0))


def hard_example_parameters(net_loss, images: torch.Tensor, bounds=HARD_BOUNDS) -> tuple[torch.Tensor, torch.Tensor]:
    """The transform of :func:`photometric_transform` within ``bounds`` that most raises each sample's loss,
    to first order: one signed-gradient step from the identity to the bounds (FGSM in parameter space).

    ``net_loss`` maps transformed float NCHW images to one loss per sample. The task-adversarial half of
    Hou et al. (2019), whose synthesiser also learns to make examples the segmenter finds hard, restricted
    here to changes that keep a patch realistic by construction. Returns the parameters ``(N, 7)`` and the
    loss of each untransformed sample.
    """
    theta = torch.zeros(len(images), 7, device=images.device, requires_grad=True)
    loss = net_loss(photometric_transform(images, theta))
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    scale, shift, detail = bounds
    bound = torch.tensor([scale] * 3 + [shift] * 3 + [detail], device=images.device)
    return grad.sign() * bound, loss.detach()


class WeightAverage(pl.Callback):
    """Running mean of the network's state (weights and BatchNorm statistics) after each step from
    ``start_step`` on, kept in the checkpoint so that an interrupted run resumes its average too.

    Averaging the iterates of one run (stochastic weight averaging; SWAD for domain generalisation,
    Cha et al., 2021) lands in a flatter region of the loss than the last iterate, which is meant to
    transfer better to data unlike the training data (here it did not: docs/experiments.md).
    """

    def __init__(self, start_step: int):
        self.start_step = start_step
        self.n_averaged = 0
        self.average: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step <= self.start_step:
            return
        state = pl_module.net.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
        self.n_averaged += 1
        for k, v in state.items():
            if v.is_floating_point():
                self.average[k] += (v.detach() - self.average[k]) / self.n_averaged
            else:
                self.average[k] = v.detach().clone()   # BatchNorm's step counter

    def state_dict(self) -> dict:
        return {"start_step": self.start_step, "n_averaged": self.n_averaged, "average": self.average}

    def load_state_dict(self, state_dict: dict) -> None:
        self.n_averaged, self.average = state_dict["n_averaged"], state_dict["average"]


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

    With ``adapt_weight`` > 0 and unlabelled real tissue patches in ``real_patches`` (uint8 NHWC, set by the
    caller; not part of the state), each step also passes ``adapt_real_batch`` of them through the network in
    the same batch, and an :class:`OutputDiscriminator` learns to tell its output probabilities on real
    patches from those on synthetic ones; its gradient reaches the network reversed and scaled by
    ``adapt_weight`` × :func:`adaptation_ramp`, so the network learns to give real tissue outputs shaped like
    those of synthetic tissue (output-space adaptation, label-free).

    Self-training: with ``pseudo_batch`` > 0 and ``pseudo_labelled`` set by the caller (real uint8 NHWC
    patches and their :func:`nucseg.train.pseudo.pseudo_label` targets; not part of the state), each step
    adds ``pseudo_batch`` augmented real patches whose loss counts only their valid pixels; the batch's
    loss is the mean over synthetic and real samples together.
    """

    def __init__(self, base: int = 16, depth: int = 3, lr: float = 2e-3, weighted: bool = True,
                 boundary_weight: float = 1.0, max_steps: int = 1000, center_head: bool = False,
                 adapt_weight: float = 0.0, adapt_real_batch: int = 16, hard_examples: float = 0.0,
                 pseudo_batch: int = 0, stain_jitter: float = 0.15, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net = UNet(base=base, depth=depth, out_channels=len(OUTPUTS) if center_head else 2)
        self.output_disc = OutputDiscriminator(self.net.head.out_channels) if adapt_weight > 0 else None
        self.real_patches: torch.Tensor | None = None
        self.pseudo_labelled: tuple[np.ndarray, np.ndarray] | None = None

    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(images_uint8))

    def training_step(self, batch, batch_idx):
        images, targets, weights, _ = batch
        hard = self.hparams.hard_examples > 0
        if hard:
            images, clean_losses = self._harden(images, targets)
        adapting = self.output_disc is not None and self.real_patches is not None
        if adapting:
            real = self._real_batch(targets.shape[2:])
            if images.is_floating_point():  # hardened: float NCHW
                real = real.permute(0, 3, 1, 2).float()
            logits_all = self(torch.cat([images, real]))
            logits = logits_all[:len(images)]
        else:
            logits = self(images)
        losses = per_sample_loss(logits, targets, self.hparams.boundary_weight)
        if hard and len(clean_losses):
            self.log("hard_gain", (losses[:len(clean_losses)].detach() - clean_losses).mean())
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
        if adapting:
            scale = self.hparams.adapt_weight * adaptation_ramp(self.global_step / max(1, self.hparams.max_steps))
            d_logits = self.output_disc(_GradientReversal.apply(torch.sigmoid(logits_all), scale))
            is_real = torch.zeros_like(d_logits)
            is_real[len(images):] = 1.0
            adv = F.binary_cross_entropy_with_logits(d_logits, is_real)
            acc = ((d_logits > 0).float() == is_real).float().mean()
            self.log_dict({"adapt_loss": adv, "adapt_acc": acc, "adapt_scale": scale})
            loss = loss + adv
        return loss

    def _harden(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``hard_examples`` share of the batch replaced by its hard examples
        (:func:`hard_example_parameters`; float NCHW 0-255 from here on), and their losses before."""
        x = images.permute(0, 3, 1, 2).float()
        n = round(len(x) * self.hparams.hard_examples)
        if n == 0:
            return x, x.new_zeros(0)
        theta, clean_losses = hard_example_parameters(
            lambda imgs: per_sample_loss(self(imgs), targets[:n], self.hparams.boundary_weight), x[:n])
        with torch.no_grad():
            hard = photometric_transform(x[:n], theta)
        return torch.cat([hard, x[n:]]), clean_losses

    def _real_batch(self, size) -> torch.Tensor:
        """``adapt_real_batch`` real patches, cropped to ``size`` and turned by a random quarter turn and flip,
        drawn from a generator seeded by the step (the same patches on a resumed run)."""
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        real = self.real_patches
        if real.shape[1] < size[0] or real.shape[2] < size[1]:
            raise ValueError(f"real patches {tuple(real.shape[1:3])} are smaller than the synthetic ones {tuple(size)}")
        idx = torch.randint(len(real), (self.hparams.adapt_real_batch,), generator=g)
        y = int(torch.randint(real.shape[1] - size[0] + 1, (1,), generator=g))
        x = int(torch.randint(real.shape[2] - size[1] + 1, (1,), generator=g))
        batch = real[idx, y:y + size[0], x:x + size[1]]
        batch = torch.rot90(batch, int(torch.randint(4, (1,), generator=g)), dims=(1, 2))
        if torch.rand(1, generator=g).item() < 0.5:
            batch = batch.flip(2)
        return batch.to(self.device)

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
