"""Training orchestration: discriminator → importance weights → weighted segmentation network."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from .. import __version__, io
from ..model import OUTPUTS, save_weights
from .data import SynthDataModule, crowding, list_shards, read_shard_images
from .modules import (DiscriminatorModule, SegmentationModule, TrainingClock, effective_sample_size,
                      importance_weights, stratified_weights)
from .params import TrainParams
from .pseudo import pseudo_label

log = logging.getLogger(__name__)


def _trainer(out_dir: Path, max_steps: int, params: TrainParams, progress: bool, name: str, **kw) -> pl.Trainer:
    use_gpu = params.accelerator in ("auto", "gpu") and torch.cuda.is_available()
    return pl.Trainer(
        max_steps=max_steps, accelerator="gpu" if use_gpu else "cpu", devices=1,
        precision="16-mixed" if use_gpu else "32-true", default_root_dir=out_dir,
        logger=pl.loggers.CSVLogger(out_dir, name=name, version=0), enable_progress_bar=progress,
        enable_model_summary=False, log_every_n_steps=10, deterministic=False, **kw)


def fit_phase(module: pl.LightningModule, dm, max_steps: int, ckpt_dir: Path, key: str, stale: str, out_dir: Path,
              params: TrainParams, progress: bool, name: str,
              callbacks=()) -> tuple[pl.Trainer, dict[str, float], float | None]:
    """Train ``module`` on ``dm`` for ``max_steps``, resumably: the trainer, the final metrics and the phase's
    seconds over all its runs (:class:`TrainingClock`; None where an older checkpoint did not record them).

    ``ckpt_dir/last.ckpt`` is resumed only if ``ckpt_dir/key.txt`` holds ``key`` (the data and parameters it
    was made from); otherwise the folder is removed and ``stale`` logged. A phase that an earlier run finished
    logs nothing when resumed, so its held-out metrics are then measured again on the restored network, and the
    card of a rerun still has them. ``name``: the CSV logger's folder under ``out_dir``.
    """
    resume, key_file = ckpt_dir / "last.ckpt", ckpt_dir / "key.txt"
    if resume.exists() and not (key_file.exists() and key_file.read_text() == key):
        log.warning("%s: %s", resume, stale)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key)
    # No version counter: a resumed run must overwrite last.ckpt (not write last-v1.ckpt beside it), or
    # the next resume would start again from the first interruption.
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, enable_version_counter=False,
                                           every_n_train_steps=max(1, min(200, max_steps // 5)))
    clock = TrainingClock(resuming=resume.exists())
    trainer = _trainer(out_dir, max_steps, params, progress, name, callbacks=[ckpt_cb, clock, *callbacks],
                       limit_val_batches=4, check_val_every_n_epoch=1)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume.exists() else None)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "val_loss" not in metrics:
        metrics.update(trainer.validate(module, datamodule=dm, verbose=False)[0])
    return trainer, metrics, clock.seconds()


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def random_crops(images: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size`` × ``size`` crop at a random place of each NHWC image (the discriminator's input)."""
    n, h, w, _ = images.shape
    ys, xs = rng.integers(0, h - size + 1, n), rng.integers(0, w - size + 1, n)
    return np.stack([im[y:y + size, x:x + size] for im, y, x in zip(images, ys, xs, strict=True)])


def train_discriminator(real: np.ndarray, shards, out_dir: Path, params: TrainParams,
                        progress: bool) -> DiscriminatorModule:
    """Fit P(real | patch) on real tissue patches vs a sample of synthetic patches."""
    rng = np.random.default_rng(params.seed)
    # Both classes cropped alike, never beyond the smaller of them (patches may be smaller than disc_crop).
    crop = min(params.disc_crop, *real.shape[1:3])
    synth = []
    budget = params.disc_max_synthetic
    for path, _, _ in shards:
        if budget <= 0:
            break
        images = read_shard_images(path)[:budget]
        crop = min(crop, *images.shape[1:3])
        synth.append(random_crops(images, crop, rng))   # cropped shard by shard: only the crops are kept
        budget -= len(images)
    synth = np.concatenate(synth)
    real = random_crops(real, crop, rng)
    images = torch.from_numpy(np.concatenate([real, synth]))
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(synth))])
    # Balance the classes: real patches are usually far fewer than synthetic ones.
    sample_w = torch.where(labels > 0, 1.0 / len(real), 1.0 / len(synth)).double()
    loader = DataLoader(TensorDataset(images, labels), batch_size=32,
                        sampler=WeightedRandomSampler(sample_w, num_samples=len(labels),
                                                      generator=torch.Generator().manual_seed(params.seed)))
    module = DiscriminatorModule(lr=params.disc_lr)
    _trainer(out_dir, params.disc_steps, params, progress, "discriminator",
             enable_checkpointing=False).fit(module, loader)
    return module.eval()


@torch.inference_mode()
def score_synthetic(disc: DiscriminatorModule, shards, batch: int = 64) -> np.ndarray:
    """P(real) of every sample of the given shards, in their order."""
    probs = []
    for path, _, _ in shards:
        images = torch.from_numpy(read_shard_images(path))
        for i in range(0, len(images), batch):
            probs.append(disc(images[i:i + batch]).float())
    return torch.cat(probs).numpy()


# What the discriminator's scores depend on besides the data; the network's checkpoint depends on every
# parameter but these (a resumed run may extend max_steps; workers and device do not change the result).
DISCRIMINATOR_FIELDS = ("disc_steps", "disc_lr", "disc_crop", "disc_max_synthetic", "seed")
RESUMABLE_CHANGES = ("max_steps", "num_workers", "accelerator")
# Added after the synthetic training: changing them keeps its checkpoint and redoes the self-training only.
SELF_TRAINING_FIELDS = ("self_training_steps", "self_training_lr", "self_training_share", "pseudo_label_band")


def self_train(net, real: np.ndarray, synth_dirs, weights: np.ndarray | None, params: TrainParams, out_dir: Path,
               key: str, progress: bool) -> dict:
    """Fine-tune ``net`` in place on synthetic batches mixed with real patches that ``net`` itself
    pseudo-labelled (:func:`nucseg.train.pseudo.pseudo_label`), for ``params.self_training_steps`` steps.

    Resumable like the synthetic training (``checkpoints/self_training/last.ckpt``, kept only under the same
    ``key``). Returns the card's summary: pseudo-label statistics, steps, final metrics.
    """
    device = next(net.parameters()).device
    targets = pseudo_label(net, real, params.mpp, params.pseudo_label_band, device=device)
    n_real = max(1, round(params.batch_size * params.self_training_share))
    summary = {"n_real_patches": int(len(real)), "real_per_batch": n_real,
               "foreground_fraction": float(targets[:, 0].mean()), "valid_fraction": float(targets[:, -1].mean())}
    log.info("self-training on %d pseudo-labelled real patches: %s", len(real), summary)
    dm = SynthDataModule(synth_dirs, weights, max(1, params.batch_size - n_real), params.num_workers, params.seed,
                         params.stain_jitter)
    module = SegmentationModule(base=params.base, depth=params.depth, lr=params.self_training_lr,
                                weighted=params.weighted, boundary_weight=params.boundary_weight,
                                max_steps=params.self_training_steps, pseudo_batch=n_real,
                                stain_jitter=params.stain_jitter, seed=params.seed)
    module.net.load_state_dict(net.state_dict())
    module.pseudo_labelled = (real, targets)
    trainer, metrics, seconds = fit_phase(
        module, dm, params.self_training_steps, out_dir / "checkpoints" / "self_training", key,
        "made from another model or parameters; self-training from the start", out_dir, params, progress,
        "self_training")
    net.load_state_dict(module.net.state_dict())
    return {**summary, "steps": int(trainer.global_step), "seconds": _rounded(seconds),
            "metrics": {f"self_training_{k}": v for k, v in metrics.items()}}


def data_fingerprint(synth_dirs: list[str | Path]) -> str:
    """sha256 over the contents of the synthetic data (parameters, shards, real patches) of ``synth_dirs``."""
    files = [Path(d) / name for d in synth_dirs for name in ("params.json", "real.npz")]
    files += [path for path, _, _ in list_shards(synth_dirs)]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{io.file_sha256(path)};".encode())
    return digest.hexdigest()


def settings_key(data: str, params: TrainParams, fields) -> str:
    return hashlib.sha256(json.dumps([data, {f: getattr(params, f) for f in fields}], default=str).encode()).hexdigest()


def importance_weighting(real: np.ndarray, shards, out_dir: Path, params: TrainParams, disc_key: str,
                         progress: bool) -> tuple[np.ndarray, dict, float | None]:
    """The importance weight of every synthetic sample (global index order), its summary for the card and
    the discriminator's seconds (None where an older version did not record them).

    The discriminator's scores are reused from ``out_dir/importance_weights.npz`` if made under ``disc_key``
    (the same data and discriminator parameters), else trained and scored again; the weights are recomputed
    from the scores every time, so a changed clip or number of strata takes effect on resume.
    """
    weights_file = out_dir / "importance_weights.npz"
    p_real = stored = seconds = None
    if weights_file.exists():  # the discriminator's scores from an earlier (interrupted) run
        with np.load(weights_file) as data:
            if "key" in data and str(data["key"]) == disc_key:
                p_real, stored = data["p_real"], data["weight"]
                seconds = float(data["seconds"]) if "seconds" in data else None  # older versions
            else:
                log.warning("%s: made from other data or discriminator parameters; scoring again", weights_file)
    if p_real is None:
        if len(real) == 0:
            raise ValueError("no real patches for the discriminator")
        started = time.monotonic()
        p_real = score_synthetic(train_discriminator(real, shards, out_dir, params, progress), shards)
        seconds = time.monotonic() - started
    clipped = importance_weights(torch.from_numpy(p_real), params.weight_clip).numpy()
    fraction = crowding(shards)
    weights = stratified_weights(clipped, fraction, params.weight_strata)
    if stored is None or not np.array_equal(stored, weights):
        io.write_npz(weights_file, p_real=p_real, weight=weights, key=np.str_(disc_key),
                     **({} if seconds is None else {"seconds": seconds}))
    stats = {"mean": float(weights.mean()), "std": float(weights.std()),
             "quantiles": dict(zip(["min", "q10", "q50", "q90", "max"],
                                   np.quantile(weights, [0, .1, .5, .9, 1]).round(4).tolist(), strict=True)),
             "clipped_low": float((clipped <= params.weight_clip[0] + 1e-6).mean()),
             "clipped_high": float((clipped >= params.weight_clip[1] - 1e-6).mean()),
             "effective_sample_size": effective_sample_size(weights),
             "p_real_vs_crowding": float(spearmanr(p_real, fraction).statistic)}  # see weight_strata
    log.info("importance weights: %s", stats)
    return weights, stats, seconds


def train_model(synth_dirs: list[str | Path], out_dir: str | Path, params: TrainParams = TrainParams(),
                progress: bool = True, command: str | None = None) -> dict:
    """Train the segmentation network from synthetic shards; write weights and a model card.

    Outputs in ``out_dir``: ``model.pt`` (weights only), ``model_card.json``, ``importance_weights.npz``,
    ``checkpoints/last.ckpt`` (resume point: rerunning continues from it), CSV logs under
    ``segmentation/`` and ``discriminator/``. ``command`` (the command line that ran this) goes into the card,
    beside the generator parameters of each synth dir, so the card says how its data and weights were made.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(params.seed, workers=True, verbose=False)
    shards = list_shards(synth_dirs)
    real = np.concatenate([np.load(Path(d) / "real.npz")["patches"] for d in synth_dirs])
    log.info("training on %d synthetic patches from %d shard(s); %d real patches for the discriminator",
             sum(c for *_, c in shards), len(shards), len(real))

    # An earlier run's discriminator scores and checkpoint are reused only if made from the same data and
    # parameters: when snakemake reruns training because its inputs changed, nothing stale may carry over.
    data_key = data_fingerprint(synth_dirs)
    net_key = settings_key(data_key, params,
                           [f for f in asdict(params) if f not in RESUMABLE_CHANGES + SELF_TRAINING_FIELDS])
    weights, w_stats, disc_seconds = importance_weighting(real, shards, out_dir, params,
                                                          settings_key(data_key, params, DISCRIMINATOR_FIELDS),
                                                          progress)
    sample_weights = weights if params.weighted else None
    dm = SynthDataModule(synth_dirs, sample_weights, params.batch_size, params.num_workers, params.seed,
                         params.stain_jitter)
    module = SegmentationModule(base=params.base, depth=params.depth, lr=params.lr, weighted=params.weighted,
                                boundary_weight=params.boundary_weight, max_steps=params.max_steps, seed=params.seed)
    # (The self-training's checkpoints lie inside this folder: a stale synthetic phase takes them with it.)
    trainer, metrics, synthetic_seconds = fit_phase(
        module, dm, params.max_steps, out_dir / "checkpoints", net_key,
        "made from other data or training parameters; training from scratch", out_dir, params, progress,
        "segmentation")
    self_training = None
    if params.self_training_steps > 0:
        self_key = settings_key(data_key, params,
                                [f for f in asdict(params) if f not in ("num_workers", "accelerator")])
        self_training = self_train(module.net, real, synth_dirs, sample_weights, params, out_dir, self_key, progress)
        metrics = {**metrics, **self_training["metrics"]}

    # Each phase's time summed over the runs that made it (an interrupted or resumed phase counts all of its
    # runs; None where an older version did not record it); this run's own time beside them. A phase finished
    # by an earlier run reports its checkpoint's time, saved at its last step, before its final validation.
    phases = {"discriminator": _rounded(disc_seconds), "synthetic": _rounded(synthetic_seconds),
              "self_training": self_training["seconds"] if self_training else 0.0}
    card = {
        "name": out_dir.name, "nucseg_version": __version__, "architecture": "UNet",
        "outputs": list(OUTPUTS[:module.net.head.out_channels]), "mpp": params.mpp, "params": asdict(params),
        "command": command,
        "training_data": {"synth_dirs": [str(d) for d in synth_dirs], "n_synthetic": int(len(weights)),
                          "n_real_for_discriminator": int(len(real)), "manual_labels": 0,
                          "synth_params": [json.loads((Path(d) / "params.json").read_text())["params"]
                                           for d in synth_dirs]},
        "importance_weights": w_stats, "metrics": metrics, "self_training": self_training,
        "global_step": int(trainer.global_step),
        "wall_time_s": None if None in phases.values() else round(sum(phases.values()), 1),
        "phase_time_s": phases, "this_run_s": round(time.monotonic() - started, 1),
        "hardware": {"device": "cuda" if torch.cuda.is_available() else "cpu",
                     "cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    card["model_id"] = save_weights(module.net, out_dir / "model.pt",
                                    {"mpp": params.mpp, "name": out_dir.name, "metrics": metrics})
    io.write_json(out_dir / "model_card.json", card)
    log.info("model %s written (%.0f s, step %d, %s)", card["model_id"][:12], card["this_run_s"],
             trainer.global_step, metrics)
    return card
