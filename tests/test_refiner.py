"""The optional GAN refiner: shard format kept, targets untouched, masks still aligned, deterministic."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from nucseg.refiner import (RefinerParams, build_refiner, load_refiner, mask_dice, refine_images,
                            stain_consistency, to_input, train_refiner)
from nucseg.synth import SynthParams, generate_dataset, load_textures, make_patch

from .conftest import REPO, SHARED, need
from .test_synth import texture

TINY = RefinerParams(steps=6, batch_size=4, crop=32, base=8, n_blocks=2, disc_base=8, history=8,
                     disc_warmup=2, max_synthetic=16, device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("refiner")
    textures = [texture(rng, 160) for _ in range(3)]
    generate_dataset(textures, root / "shards", SynthParams(n_patches=10, patch_size=64, shard_size=4, mpp=0.25),
                     progress=False)
    np.savez(root / "patches.npz", patches=np.stack(textures), mpp=0.25)
    return root


def tiny_data(synth_dir):
    from nucseg.refiner import load_synthetic

    images, targets = load_synthetic(synth_dir / "shards", 16, 0)
    real = load_textures([synth_dir / "patches.npz"], None, 0.25)
    return images, targets, real


def test_refine_command_writes_shards_the_trainer_reads(synth_dir, tmp_path):
    from nucseg.cli import main
    from nucseg.train.data import ShardStream, list_shards

    out, weights, sheet = tmp_path / "refined", tmp_path / "refiner.pt", tmp_path / "sheet.png"
    flags = ["--steps", "6", "--batch-size", "4", "--crop", "32", "--base", "8", "--n-blocks", "2",
             "--disc-base", "8", "--history", "8", "--disc-warmup", "2", "--device", "cpu", "--num-threads", "1"]
    rc = main(["--no-progress", "refine", "--synth", str(synth_dir / "shards"), "--patches",
               str(synth_dir / "patches.npz"), "--out-dir", str(out), "--weights", str(weights),
               "--contact-sheet", str(sheet), *flags])
    assert rc == 0
    src_shards, new_shards = list_shards([synth_dir / "shards"]), list_shards([out])
    assert [(p.name, s, c) for p, s, c in src_shards] == [(p.name, s, c) for p, s, c in new_shards]
    for (a_path, *_), (b_path, *_) in zip(src_shards, new_shards, strict=True):
        with np.load(a_path) as a, np.load(b_path) as b:
            assert sorted(a.files) == sorted(b.files)
            assert np.array_equal(a["instances"], b["instances"]) and np.array_equal(a["boundary"], b["boundary"])
            assert b["image"].shape == a["image"].shape and b["image"].dtype == np.uint8
    # The training stage streams the refined folder unchanged (it also needs real.npz).
    image, targets, weight, index = next(iter(ShardStream(new_shards, None, augment=False)))
    assert image.shape == (64, 64, 3) and targets.shape == (2, 64, 64)
    assert (out / "real.npz").is_file()
    meta = json.loads((out / "params.json").read_text())
    assert meta["refiner"]["params"]["steps"] == 6 and meta["params"]["patch_size"] == 64
    assert {"mask_dice_before", "mask_dice_after", "disc_acc"} <= set(meta["refiner"]["metrics"])
    assert json.loads((out / "refiner.json").read_text())["refiner_id"] == meta["refiner"]["refiner_id"]

    # Weights only, small, and they reproduce the written shards exactly.
    payload = torch.load(weights, weights_only=True)
    assert set(payload) == {"state_dict", "arch", "meta"} and weights.stat().st_size < 100_000
    net, wmeta = load_refiner(weights)
    assert wmeta["refiner_id"] == meta["refiner"]["refiner_id"]
    with np.load(src_shards[0][0]) as a, np.load(new_shards[0][0]) as b:
        again = refine_images(net, a["image"], a["instances"], a["boundary"])
        assert np.array_equal(again, b["image"])

    import cv2

    png = cv2.imread(str(sheet))
    assert png.shape == (3 * 64, 8 * 64, 3)  # synthetic / refined / real rows


def test_refiner_that_moves_nuclei_off_their_masks_fails(synth_dir, tmp_path):
    """The mask check guards the labels: an unmet ratio fails and leaves no params.json (not complete)."""
    from nucseg.refiner import refine_dataset

    real = load_textures([synth_dir / "patches.npz"], None, 0.25)
    with pytest.raises(ValueError, match="no longer match their masks"):
        refine_dataset(synth_dir / "shards", tmp_path / "out", real, replace(TINY, min_mask_dice_ratio=1.5),
                       progress=False)
    assert not (tmp_path / "out" / "params.json").exists()


def test_training_is_deterministic_in_seed(synth_dir):
    images, targets, real = tiny_data(synth_dir)
    a, _ = train_refiner(images, targets, real, TINY)
    b, _ = train_refiner(images, targets, real, TINY)
    c, _ = train_refiner(images, targets, real, replace(TINY, seed=1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_refiner_starts_as_identity_and_keeps_shape():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    inst = np.zeros((3, 40, 48), np.uint16)
    inst[:, 10:20, 10:20] = 1
    out = refine_images(build_refiner(8, 2), images, inst, np.zeros_like(inst, np.uint8))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert np.array_equal(out, images)  # zero correction at initialisation


def test_stain_consistency_penalises_new_nuclei_outside_masks():
    img = np.full((1, 32, 32, 3), (225, 160, 200), np.uint8)
    fg = np.zeros((1, 32, 32), np.float32)
    fg[0, 4:12, 4:12] = 1
    img[0, 4:12, 4:12] = (100, 60, 150)
    x = to_input(torch.from_numpy(img))
    darker_nucleus, dot_outside, faded_nucleus = img.copy(), img.copy(), img.copy()
    darker_nucleus[0, 4:12, 4:12] = (70, 40, 130)
    dot_outside[0, 20:26, 20:26] = (90, 50, 140)
    faded_nucleus[0, 4:12, 4:12] = (200, 150, 200)
    fg_t = torch.from_numpy(fg)

    def loss(a):
        return float(stain_consistency(to_input(torch.from_numpy(a)), x, fg_t))

    assert loss(img) == 0 and loss(darker_nucleus) == 0
    assert loss(dot_outside) > 0.01 and loss(faded_nucleus) > 0.01


def test_mask_dice_sees_misaligned_nuclei(rng):
    # Without the unlabelled clutter, which the hematoxylin detector (rightly) finds too.
    params = SynthParams(patch_size=128, mpp=0.25, cytoplasm_per_patch=(0, 0), wash_probability=0.0)
    tex = texture(rng, 200)
    patches = [make_patch(tex, s, params) for s in range(6)]
    images = np.stack([p["image"] for p in patches])
    inst = np.stack([p["instances"] for p in patches])
    aligned = mask_dice(images, inst)
    shifted = mask_dice(np.roll(images, 12, axis=2), inst)
    assert aligned > 0.5 and shifted < 0.8 * aligned


def test_refined_nuclei_stay_on_their_masks_real_textures():
    """On real tissue: the refiner's hematoxylin mask agrees with the instance masks as well as before."""
    folder = need(SHARED / "tissue" / "quip_cnn_segmentation" / "refer")
    textures = load_textures([], [{"path": folder, "mpp": 0.25}], 0.25)[:24]
    params = SynthParams(patch_size=128, mpp=0.25)
    patches = [make_patch(textures[i % len(textures)], i, params) for i in range(24)]
    images = np.stack([p["image"] for p in patches])
    inst = np.stack([p["instances"] for p in patches])
    bnd = np.stack([p["boundary"] for p in patches])
    from nucseg.refiner import targets_of

    rp = RefinerParams(steps=60, batch_size=8, crop=48, disc_warmup=10, history=64, device="cpu", num_threads=1)
    net, _ = train_refiner(list(images[:16]), list(targets_of(inst[:16], bnd[:16])), textures, rp)
    refined = refine_images(net, images, inst, bnd)
    assert np.abs(refined.astype(int) - images).mean() > 0  # it did change the appearance
    assert mask_dice(refined, inst) >= 0.9 * mask_dice(images, inst)


def test_config_without_refiner_section_still_validates():
    from snakemake.utils import validate

    for name in ("aperio.yaml", "train_shipped_recipe.yaml", "demo.yaml"):
        cfg = yaml.safe_load((REPO / "config" / name).read_text())
        cfg.setdefault("cohorts", {"X": "x.tsv"})
        cfg.get("synth", {}).pop("refiner", None)
        validate(cfg, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
        assert cfg["synth"]["refiner"]["enabled"] is False and cfg["synth"]["refiner"]["params"] == {}


def test_workflow_plans_refine_before_train_when_enabled(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    model = {"checkpoint": "train", "name": "mine"}   # a model this workflow trains

    def plan(extra: dict) -> str:
        (tmp_path / "config" / "test.yaml").write_text(yaml.safe_dump({**extra, "model": model}))
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
               "results/models/mine/model.pt", "--configfile", "config/config.yaml", "config/test.yaml",
               "-n", "-p"]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    on = plan({"synth": {"refiner": {"enabled": True, "params": {"steps": 10}}}})
    assert "nucseg --no-progress refine --synth results/synth/DEMO/shards" in on
    assert re.search(r"--steps[= ]10\b", on) and "--weights results/synth/DEMO/refiner.pt" in on
    assert "train --synth results/synth/DEMO/refined " in on
    off = plan({})  # the default: no refiner
    assert "nucseg --no-progress refine" not in off
    assert "train --synth results/synth/DEMO/shards " in off
