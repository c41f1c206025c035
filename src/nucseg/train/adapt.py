"""Label-free adaptation of a trained model to one cohort's own tissue.

The paper synthesises per tissue type from that type's textures. Here a trained model (the shipped one by
default) is adapted instead of trained anew: synthetic patches drawn on the cohort's textures are weighted by a
discriminator against the cohort's real patches (w = D/(1-D)), and the model self-trains on those real patches,
pseudo-labelled by itself, mixed with the weighted synthetic ones. No label is read anywhere.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from .. import __version__, io
from ..model import load_weights, save_weights
from ..synth import SynthParams, generate_dataset, load_textures
from .data import list_shards
from .fit import DISCRIMINATOR_FIELDS, data_fingerprint, importance_weighting, self_train, settings_key
from .params import ADAPT_STEPS, TrainParams

log = logging.getLogger(__name__)


def adapt_model(init_weights, synth_dirs: list[str | Path], out_dir: str | Path, params: TrainParams = TrainParams(),
                progress: bool = True, command: str | None = None) -> dict:
    """Adapt ``init_weights`` to the cohort of ``synth_dirs``; write ``model.pt`` and ``model_card.json``.

    Parameters
    ----------
    init_weights : path
        The model to start from (its architecture and working resolution are kept).
    synth_dirs : list of path
        Synth outputs drawn on the cohort's textures; their ``real.npz`` are the cohort's real patches.
    params : TrainParams
        ``self_training_steps`` (the adaptation's length), ``self_training_lr``, ``self_training_share``,
        ``pseudo_label_band``, the discriminator's fields and ``weighted``; the architecture and ``mpp`` come
        from ``init_weights``.

    Returns
    -------
    dict
        The model card.
    """
    started = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net, meta = load_weights(init_weights)
    params = replace(params, mpp=float(meta.get("mpp", params.mpp)), base=net.down[0][0].out_channels,
                     depth=net.depth)
    if params.self_training_steps < 1:
        raise ValueError("adaptation needs self_training_steps >= 1")
    synth_params = [json.loads((Path(d) / "params.json").read_text())["params"] for d in synth_dirs]
    for d, made in zip(synth_dirs, synth_params, strict=True):  # the network sees nuclei at its own scale only
        if abs(made["mpp"] - params.mpp) > 1e-6:
            raise ValueError(f"{d}: synthetic patches at {made['mpp']} µm/px, but {init_weights} works at "
                             f"{params.mpp} µm/px (set mpp_work to it)")
    pl.seed_everything(params.seed, workers=True, verbose=False)
    shards = list_shards(synth_dirs)
    real = np.concatenate([np.load(Path(d) / "real.npz")["patches"] for d in synth_dirs])
    data_key = data_fingerprint(synth_dirs) + meta["model_id"]
    disc_key = settings_key(data_key, params, DISCRIMINATOR_FIELDS)
    weights, w_stats, disc_seconds = importance_weighting(real, shards, out_dir, params, disc_key, progress)
    self_key = settings_key(data_key, params, [f for f in asdict(params) if f not in ("num_workers", "accelerator")])
    adapted = self_train(net.train(), real, synth_dirs, weights if params.weighted else None, params, out_dir,
                         self_key, progress)
    card = {"name": out_dir.name, "nucseg_version": __version__, "architecture": "UNet", "mpp": params.mpp,
            "adapted_from": {"path": str(init_weights), "model_id": meta["model_id"]},
            "params": asdict(params), "command": command,
            "training_data": {"synth_dirs": [str(d) for d in synth_dirs], "n_synthetic": int(len(weights)),
                              "n_real": int(len(real)), "manual_labels": 0,
                              "synth_params": synth_params},
            "importance_weights": w_stats, "self_training": adapted, "metrics": adapted["metrics"],
            "phase_time_s": {"discriminator": disc_seconds, "self_training": adapted["seconds"]},
            "this_run_s": round(time.monotonic() - started, 1)}
    card["model_id"] = save_weights(net, out_dir / "model.pt", {"mpp": params.mpp, "name": out_dir.name,
                                                                 "adapted_from": meta["model_id"],
                                                                 "metrics": adapted["metrics"]})
    io.write_json(out_dir / "model_card.json", card)
    log.info("adapted model %s written (%.0f s)", card["model_id"][:12], card["this_run_s"])
    return card


def adapt_to_images(images_dir, mpp: float, init_weights, out_dir, *, n_patches: int = 1024,
                    params: TrainParams = TrainParams(self_training_steps=ADAPT_STEPS), progress: bool = True) -> dict:
    """Adapt ``init_weights`` to a folder of unlabelled images (the cohort), label-free; return the card.

    The images are the textures of the synthetic patches and the real class of both the discriminator and the
    self-training; nothing outside ``images_dir`` is read (annotations beside it stay closed). Writes
    ``out_dir/synth`` and ``out_dir/model`` (``model.pt``, ``model_card.json``).
    """
    _, meta = load_weights(init_weights)
    model_mpp = float(meta.get("mpp", 0.5))
    textures = load_textures([], [{"path": str(images_dir), "mpp": mpp}], model_mpp)
    synth = Path(out_dir) / "synth"
    generate_dataset(textures, synth, SynthParams(n_patches=n_patches, mpp=model_mpp, seed=params.seed),
                     progress=progress)
    return adapt_model(init_weights, [synth], Path(out_dir) / "model", params, progress=progress)
