"""Optional GAN refiner: make synthetic patches look more like the cohort's real tissue (SimGAN).

Shrivastava et al. (CVPR 2017) refine simulated images with a network trained against real images by a
local adversarial loss plus a self-regularisation term ``λ·|R(x) − x|₁`` that keeps the annotation valid.
Here the refiner is a small residual network that sees the synthetic RGB patch and, as conditions, its
foreground and boundary targets; it predicts a *correction* added to the input (zero at
initialisation), so it starts as the identity and only changes appearance: nuclear rims, chromatin,
noise, colour. The discriminator is a local (patch) discriminator on real tissue crops vs refined
crops, with a history buffer of earlier refined crops (SimGAN §3.2).

The refined output has exactly the shard format of the synth stage (``image``, ``instances``,
``boundary``; only ``image`` replaced), plus ``real.npz`` and ``params.json``, so the training stage
reads a refined folder like any synth output.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from . import io
from .model import resolve_device
from .stain import nuclear_pixels
from .synth import contact_sheet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefinerParams:
    """Refiner training and inference parameters (crops are px at ``mpp`` µm/px)."""

    steps: int = 1000
    batch_size: int = 16
    crop: int = 64
    lr: float = 5e-4
    disc_lr: float = 2e-4
    l1_weight: float = 2.0        # self-regularisation λ: higher keeps refined closer to the synthetic input
    stain_weight: float = 2.0     # penalty on hematoxylin added outside the masks or removed inside them
    base: int = 16
    n_blocks: int = 4
    disc_base: int = 32
    disc_warmup: int = 100        # discriminator-only steps first, so the refiner starts from useful gradients
    history: int = 512            # refined crops kept for the discriminator (0: no history buffer)
    condition: bool = True        # feed the foreground/boundary targets to the refiner
    max_synthetic: int = 512      # synthetic patches held in memory for training
    min_mask_dice_ratio: float = 0.9  # fail if refined patches' nuclei stop matching the masks (0: off)
    mpp: float = 0.5
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0          # torch CPU threads (0: torch's default)


# ---------------------------------------------------------------- networks

def _nets():
    """Network classes, built on first use (keeps ``import nucseg.refiner`` free of torch for the CLI)."""

    class ResBlock(nn.Module):
        def __init__(self, ch: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(ch, ch, 3, padding=1, padding_mode="reflect"), nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(ch, ch, 3, padding=1, padding_mode="reflect"))
            self.act = nn.LeakyReLU(0.2, inplace=True)

        def forward(self, x):
            return self.act(x + self.body(x))

    class Refiner(nn.Module):
        """Residual image-to-image network: ``refined = clamp(x + f(x, targets), -1, 1)``.

        Inputs are normalised RGB in [-1, 1] (NCHW) and, when ``condition``, two target channels
        (foreground, boundary) in {0, 1}. Fully convolutional: trained on crops, applied to patches.
        """

        def __init__(self, base: int = 16, n_blocks: int = 4, condition: bool = True):
            super().__init__()
            self.base, self.n_blocks, self.condition = base, n_blocks, condition
            self.head = nn.Sequential(nn.Conv2d(3 + 2 * condition, base, 3, padding=1, padding_mode="reflect"),
                                      nn.LeakyReLU(0.2, inplace=True))
            self.blocks = nn.Sequential(*[ResBlock(base) for _ in range(n_blocks)])
            self.out = nn.Conv2d(base, 3, 1)
            # Zero correction at start: training begins from the identity, where the masks are valid.
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

        def forward(self, x, targets=None):
            inp = torch.cat([x, targets.to(x.dtype)], dim=1) if self.condition else x
            return (x + self.out(self.blocks(self.head(inp)))).clamp(-1, 1)

        def arch(self) -> dict:
            return {"base": self.base, "n_blocks": self.n_blocks, "condition": self.condition}

    class PatchDiscriminator(nn.Module):
        """Local discriminator: a map of real/refined logits, each seeing ~38 px (one or two nuclei)."""

        def __init__(self, base: int = 32):
            super().__init__()
            layers, cin = [], 3
            sn = nn.utils.parametrizations.spectral_norm  # Lipschitz-bounded: steadier small-batch GAN training
            for i in range(3):
                cout = base * 2**i
                layers += [sn(nn.Conv2d(cin, cout, 4, stride=2, padding=1)), nn.LeakyReLU(0.2, inplace=True)]
                cin = cout
            self.net = nn.Sequential(*layers, sn(nn.Conv2d(cin, 1, 3, padding=1)))

        def forward(self, x):
            return self.net(x)

    return Refiner, PatchDiscriminator


def build_refiner(base: int = 16, n_blocks: int = 4, condition: bool = True):
    """A fresh refiner network (identity at initialisation)."""
    return _nets()[0](base, n_blocks, condition)


def to_input(images_uint8, targets=None):
    """uint8 NHWC images (and float NCHW targets) to the refiner's float NCHW input in [-1, 1]."""
    x = images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x if targets is None else (x, targets.float())


def to_uint8(x):
    """Inverse of :func:`to_input` for images: float NCHW in [-1, 1] to uint8 NHWC."""

    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


# Ruifrok & Johnston's hematoxylin row of skimage's ``hed_from_rgb``: H = Σ_c OD_c · HED_FROM_RGB_H[c]
# with OD_c = log(max(rgb_c, 1e-6)) / log(1e-6), as in :func:`skimage.color.rgb2hed`.
HED_FROM_RGB_H = (1.87798274, -0.06590806, -0.60190736)
H_SCALE = 0.05  # typical hematoxylin OD contrast of a nucleus over its background (skimage units)


def hematoxylin(x):
    """Differentiable hematoxylin OD ``(N, H, W)`` of refiner-space images (NCHW in [-1, 1])."""

    od = torch.log(((x.float() + 1) / 2).clamp_min(1e-6)) / math.log(1e-6)
    return torch.einsum("nchw,c->nhw", od, od.new_tensor(HED_FROM_RGB_H)).clamp_min(0)


def stain_consistency(refined, synthetic, foreground):
    """Hematoxylin added outside the nuclei plus hematoxylin removed inside them (in units of ``H_SCALE``).

    The adversarial loss pushes synthetic patches towards real tissue, which is denser in nuclei than
    any one synthetic patch; without this term the refiner paints nucleus-like dots on the background,
    and the masks would miss them.
    """

    dh = (hematoxylin(refined) - hematoxylin(synthetic)) / H_SCALE
    fg = foreground.to(dh.dtype)
    return (F.relu(dh) * (1 - fg) + F.relu(-dh) * fg).mean()


def targets_of(instances: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Refiner conditions ``(N, 2, H, W)`` float32 from a shard's instance and boundary maps."""
    return np.stack([instances > 0, boundary > 0], axis=1).astype(np.float32)


def save_refiner(net, path, meta: dict) -> str:
    """Save weights only (float32 tensors, JSON architecture and metadata); return the file's sha256.

    The network is small (tens of kB), so float32 is kept: refined shards written from the in-memory
    network and those from the reloaded file are the same.
    """

    state = {k: v.detach().cpu().float() for k, v in net.state_dict().items()}
    payload = {"state_dict": state, "arch": json.dumps(net.arch()), "meta": json.dumps(meta, default=str)}
    with io.atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return io.file_sha256(path)


def load_refiner(path, device="cpu"):
    """Load a refiner saved by :func:`save_refiner` (``weights_only=True``): ``(net in eval mode, meta)``."""

    payload = torch.load(Path(path), map_location=device, weights_only=True)
    net = build_refiner(**json.loads(payload["arch"]))
    net.load_state_dict(payload["state_dict"])
    meta = json.loads(payload["meta"])
    meta["refiner_id"] = io.file_sha256(path)
    return net.to(device).eval(), meta


# ---------------------------------------------------------------- training data

def random_crop_batch(pool: list[np.ndarray], n: int, size: int, rng: np.random.Generator,
                      extra: list[np.ndarray] | None = None):
    """``n`` random crops of ``size`` px from images of ``pool`` (with flips/rot90), and of ``extra``.

    ``extra`` holds per-image arrays aligned with ``pool`` (CHW targets), cropped at the same place.
    Images smaller than ``size`` are upscaled first.
    """
    images, extras = [], []
    for _ in range(n):
        k = int(rng.integers(len(pool)))
        img = pool[k]
        h, w = img.shape[:2]
        if h < size or w < size:
            img = cv2.resize(img, (max(w, size), max(h, size)), interpolation=cv2.INTER_LINEAR)
            h, w = img.shape[:2]
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        rot, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        crop = _orient(img[y:y + size, x:x + size], rot, flip, axes=(0, 1))
        images.append(crop)
        if extra is not None:
            extras.append(_orient(extra[k][:, y:y + size, x:x + size], rot, flip, axes=(1, 2)))
    images = np.stack(images)
    return (images, np.stack(extras)) if extra is not None else images


def _orient(a: np.ndarray, rot: int, flip: bool, axes) -> np.ndarray:
    a = np.rot90(a, rot, axes=axes)
    if flip:
        a = np.flip(a, axis=axes[1])
    return np.ascontiguousarray(a)


def load_synthetic(synth_dir, max_patches: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Up to ``max_patches`` synthetic patches and their targets, an even sample over all shards."""
    from .train.data import list_shards  # heavy (Lightning): imported on use

    shards = list_shards([synth_dir])
    total = sum(c for *_, c in shards)
    if total == 0:
        raise ValueError(f"{synth_dir}: no synthetic patches")
    keep = np.sort(np.random.default_rng(seed).permutation(total)[:max_patches])
    images, targets = [], []
    for path, start, count in shards:
        idx = keep[(keep >= start) & (keep < start + count)] - start
        if len(idx) == 0:
            continue
        with np.load(path) as data:
            images += list(data["image"][idx])
            targets += list(targets_of(data["instances"][idx], data["boundary"][idx]))
    return images, targets


# ---------------------------------------------------------------- Lightning module

def mix_history(history, fake, size: int, generator):
    """SimGAN's history buffer (§3.2): ``fake`` with half its crops swapped for earlier refined ones.

    Returns ``(crops for the discriminator, updated buffer)``: the new crops are added to ``history``
    (at most ``size`` crops), replacing random old ones once it is full. ``size`` 0: no buffer.
    """

    if size <= 0:
        return fake, history
    n = len(fake)
    half = n // 2
    if len(history) >= half > 0:
        idx = torch.randint(len(history), (half,), generator=generator).to(fake.device)
        out = torch.cat([fake[:n - half], history[idx].to(fake.dtype)])
    else:
        out = fake
    if len(history) < size:
        history = torch.cat([history, fake[: size - len(history)]])
    else:
        slots = torch.randperm(size, generator=generator)[:half].to(fake.device)
        history[slots] = fake[:half]
    return out, history


def _module_class():
    import pytorch_lightning as pl  # heavy (Lightning, torch): imported on use

    _, PatchDiscriminator = _nets()

    class RefinerModule(pl.LightningModule):
        """SimGAN training: one refiner and one discriminator update per step (manual optimisation)."""

        def __init__(self, params: RefinerParams):
            super().__init__()
            self.automatic_optimization = False
            self.cfg = params
            self.refiner = build_refiner(params.base, params.n_blocks, params.condition)
            self.disc = PatchDiscriminator(params.disc_base)
            self.register_buffer("history", torch.zeros(0, 3, params.crop, params.crop), persistent=False)
            self._gen = torch.Generator().manual_seed(params.seed + 1)
            self.trace: list[dict] = []  # per-step losses, for the metrics of the last steps

        def training_step(self, batch, batch_idx):
            synth, targets, real = batch
            x, targets = to_input(synth, targets)
            real = to_input(real)
            if x.device.type == "cpu":  # oneDNN convolutions are faster channels-last on CPU
                x, targets, real = (t.contiguous(memory_format=torch.channels_last) for t in (x, targets, real))
            opt_r, opt_d = self.optimizers()
            refined, refiner_losses = self._refiner_step(opt_r, x, targets)
            disc_losses = self._discriminator_step(opt_d, refined, real)
            values = {**refiner_losses, **disc_losses}
            self.log_dict(values, prog_bar=True)
            self.trace.append({k: float(v.detach()) for k, v in values.items()})

        def _refiner_step(self, opt_r, x, targets):
            """Refiner: fool the discriminator while staying close to the synthetic input (after the
            discriminator's warm-up; until then the refiner is the identity and only scored)."""
            warm = len(self.trace) < self.cfg.disc_warmup
            self.toggle_optimizer(opt_r)
            with torch.set_grad_enabled(not warm):
                refined = self.refiner(x, targets)
                logits = self.disc(refined)
                adv = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
                reg = (refined - x).abs().mean()
                stain = stain_consistency(refined, x, targets[:, 0])
                loss_r = adv + self.cfg.l1_weight * reg + self.cfg.stain_weight * stain
            if not warm:
                opt_r.zero_grad()
                self.manual_backward(loss_r)
                opt_r.step()
            self.untoggle_optimizer(opt_r)
            return refined, {"loss_refiner": loss_r, "loss_adv": adv, "l1": reg, "stain": stain}

        def _discriminator_step(self, opt_d, refined, real):
            """Discriminator: real crops vs refined ones, half of them from the history buffer so the
            refiner cannot reintroduce artefacts the discriminator has forgotten."""
            self.toggle_optimizer(opt_d)
            fake, self.history = mix_history(self.history, refined.detach().float(), self.cfg.history, self._gen)
            lr_, lf = self.disc(real), self.disc(fake)
            loss_d = (F.binary_cross_entropy_with_logits(lr_, torch.ones_like(lr_))
                      + F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf)))
            opt_d.zero_grad()
            self.manual_backward(loss_d)
            opt_d.step()
            self.untoggle_optimizer(opt_d)
            acc = 0.5 * ((lr_ > 0).float().mean() + (lf < 0).float().mean())
            return {"loss_disc": loss_d, "disc_acc": acc}

        def configure_optimizers(self):
            betas = (0.5, 0.999)
            return (torch.optim.Adam(self.refiner.parameters(), lr=self.cfg.lr, betas=betas),
                    torch.optim.Adam(self.disc.parameters(), lr=self.cfg.disc_lr, betas=betas))

    return RefinerModule


class _CropStream:
    """``steps`` batches of ``(synthetic crops, their targets, real crops)``, deterministic in ``seed``."""

    def __init__(self, synth_images, synth_targets, real_images, params: RefinerParams):
        self.synth_images, self.synth_targets, self.real = synth_images, synth_targets, real_images
        self.cfg = params

    def __iter__(self):

        rng = np.random.default_rng([self.cfg.seed, 17])
        p = self.cfg
        for _ in range(p.steps):
            synth, targets = random_crop_batch(self.synth_images, p.batch_size, p.crop, rng, self.synth_targets)
            real = random_crop_batch(self.real, p.batch_size, p.crop, rng)
            yield torch.from_numpy(synth), torch.from_numpy(targets), torch.from_numpy(real)


def train_refiner(synth_images: list[np.ndarray], synth_targets: list[np.ndarray], real: list[np.ndarray],
                  params: RefinerParams = RefinerParams(), out_dir=None, progress: bool = False):
    """Train a refiner adversarially against ``real`` crops; return ``(refiner in eval mode, metrics)``.

    Deterministic given ``params.seed`` on a given device. Uses CUDA with 16-bit mixed precision when
    ``params.device`` resolves to a GPU.
    """
    import pytorch_lightning as pl  # heavy (Lightning, torch): imported on use


    if not real:
        raise ValueError("no real tissue images for the refiner's discriminator")
    if not synth_images:
        raise ValueError("no synthetic patches to refine")
    if params.num_threads > 0:
        torch.set_num_threads(params.num_threads)
    device = resolve_device(params.device)
    pl.seed_everything(params.seed, workers=True, verbose=False)
    module = _module_class()(params)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)

    class _Stream(IterableDataset):
        def __iter__(self):
            return iter(_CropStream(synth_images, synth_targets, real, params))

    gpu = device.type == "cuda"
    logger = pl.loggers.CSVLogger(out_dir, name="refiner", version=0) if out_dir else False
    # One epoch of exactly ``steps`` batches (Lightning's step count would include every optimizer
    # step, and none of the refiner's during the discriminator warm-up).
    trainer = pl.Trainer(max_epochs=1, max_steps=-1, accelerator="gpu" if gpu else "cpu", devices=1,
                         precision="16-mixed" if gpu else "32-true", default_root_dir=out_dir,
                         logger=logger, enable_checkpointing=False, enable_progress_bar=progress,
                         enable_model_summary=False, log_every_n_steps=10)
    started = time.monotonic()
    trainer.fit(module, DataLoader(_Stream(), batch_size=None, num_workers=0))
    # Losses averaged over the last 10 % of the steps (single steps are noisy).
    tail = module.trace[-max(1, len(module.trace) // 10):]
    metrics = {k: round(float(np.mean([t[k] for t in tail])), 4) for k in tail[0]} if tail else {}
    metrics["train_seconds"] = round(time.monotonic() - started, 1)
    metrics["steps"] = len(module.trace)
    return module.refiner.cpu().eval(), metrics


# ---------------------------------------------------------------- inference

def refine_images(net, images: np.ndarray, instances: np.ndarray, boundary: np.ndarray,
                  device="cpu", batch: int = 16) -> np.ndarray:
    """Refined uint8 NHWC images for uint8 NHWC ``images`` and their targets (same shape and dtype)."""

    device = torch.device(device)
    net = net.to(device).eval()
    targets = targets_of(instances, boundary)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x, t = to_input(torch.from_numpy(images[i:i + batch]).to(device),
                            torch.from_numpy(targets[i:i + batch]).to(device))
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.float16):
                    y = net(x, t)
            else:
                y = net(x, t)
            out.append(to_uint8(y).cpu().numpy())
    return np.concatenate(out) if out else images.copy()


def mask_dice(images: np.ndarray, instances: np.ndarray) -> float:
    """Pooled Dice of the hematoxylin-based nuclear mask of ``images`` with the instance masks.

    The same detector (:func:`nucseg.stain.nuclear_pixels`: Otsu on hematoxylin OD) scores synthetic
    and refined patches, so the ratio of the two tells whether refinement moved nuclei away from
    their labels.
    """
    inter = total = 0
    for img, inst in zip(images, instances, strict=True):
        pred, true = nuclear_pixels(img), inst > 0
        inter += int((pred & true).sum())
        total += int(pred.sum() + true.sum())
    return 2 * inter / total if total else 1.0


def refine_dataset(synth_dir, out_dir, real: list[np.ndarray], params: RefinerParams = RefinerParams(),
                   weights_path=None, contact_sheet_path=None, progress: bool = True) -> dict:
    """Train a refiner on ``synth_dir`` vs ``real`` and write refined shards to ``out_dir``.

    Parameters
    ----------
    synth_dir : path
        A synth stage output (``params.json``, ``shard-*.npz``, ``real.npz``).
    out_dir : path
        Receives ``shard-*.npz`` (same names, keys and targets; ``image`` refined), ``real.npz`` (copied),
        ``refiner.json`` (parameters, metrics) and ``params.json`` last (the synth metadata plus a
        ``refiner`` entry), so a half-written folder never looks complete.
    real : list of ndarray
        Real tissue images at ``params.mpp`` (:func:`nucseg.synth.load_textures`).
    weights_path : path, optional
        Where the refiner weights go (default ``out_dir/refiner.pt``).
    contact_sheet_path : path, optional
        PNG: synthetic patches, the same refined, real tissue.

    Returns
    -------
    dict
        What ``refiner.json`` holds.
    """
    from .train.data import list_shards  # heavy (Lightning): imported on use

    synth_dir, out_dir = Path(synth_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = Path(weights_path) if weights_path else out_dir / "refiner.pt"
    meta = io.read_json(synth_dir / "params.json")
    images, targets = load_synthetic(synth_dir, params.max_synthetic, params.seed)
    log.info("refiner: %d synthetic patches, %d real images, %d steps", len(images), len(real), params.steps)
    net, metrics = train_refiner(images, targets, real, params, out_dir, progress)
    refiner_id = save_refiner(net, weights_path, {"params": asdict(params), "metrics": metrics,
                                                  "synth_dir": str(synth_dir)})

    device = resolve_device(params.device)
    shards = list_shards([synth_dir])
    check = {"before": [], "after": [], "instances": []}
    bar = tqdm(total=sum(c for *_, c in shards), desc="refine", unit="patch", disable=not progress)
    for path, _, count in shards:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        refined = refine_images(net, arrays["image"], arrays["instances"], arrays["boundary"], device)
        if len(check["before"]) < 64:  # a sample for the mask check and the contact sheet
            take = 64 - len(check["before"])
            check["before"] += list(arrays["image"][:take])
            check["after"] += list(refined[:take])
            check["instances"] += list(arrays["instances"][:take])
        io.write_npz(out_dir / path.name, **{**arrays, "image": refined})
        bar.update(count)
    bar.close()

    before, after = np.stack(check["before"]), np.stack(check["after"])
    dice_before = mask_dice(before, check["instances"])
    dice_after = mask_dice(after, check["instances"])
    metrics.update({"mask_dice_before": round(dice_before, 4), "mask_dice_after": round(dice_after, 4),
                    "mean_abs_change": round(float(np.abs(after.astype(np.int16) - before).mean()), 3)})
    if contact_sheet_path:
        real_sheet = random_crop_batch(real, 8, before.shape[1], np.random.default_rng(params.seed))
        io.write_png(contact_sheet_path, contact_sheet(before, after, real_sheet))  # synthetic / refined / real
    if params.min_mask_dice_ratio > 0 and dice_after < params.min_mask_dice_ratio * dice_before:
        raise ValueError(f"refined nuclei no longer match their masks: hematoxylin-mask Dice {dice_after:.3f} "
                         f"after vs {dice_before:.3f} before refinement (< {params.min_mask_dice_ratio} x); "
                         f"raise --l1-weight (now {params.l1_weight})")

    io.link_or_copy(synth_dir / "real.npz", out_dir / "real.npz")
    result = {"params": asdict(params), "metrics": metrics, "refiner_id": refiner_id,
              "weights": str(weights_path), "synth_dir": str(synth_dir), "n_real": len(real),
              "n_patches": int(meta.get("n_patches", sum(c for *_, c in shards)))}
    io.write_json(out_dir / "refiner.json", result)
    io.write_json(out_dir / "params.json", {**meta, "refiner": result})
    log.info("refiner %s: %s", refiner_id[:12], metrics)
    return result

