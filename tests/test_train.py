import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nucseg.model import UNet, load_weights, predict
from nucseg.train.modules import importance_weights, per_sample_loss, stratified_weights

# The small_model fixture's training parameters (tests/conftest.py): a brief run at 40x, without the recipe's
# strata and self-training, so that a test training the same model again resumes it.
SMALL = dict(max_steps=150, batch_size=8, disc_steps=20, base=8, lr=5e-3, depth=3, weight_strata=0,
             self_training_steps=0, mpp=0.25)


def test_importance_weight_formula_and_clip():
    p = torch.tensor([0.5, 0.6, 0.1, 0.9, 0.0, 1.0])
    w = importance_weights(p, (0.2, 2.0))
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1.5)
    assert w[2] == pytest.approx(0.2)      # 0.111 clipped up
    assert w[3] == pytest.approx(2.0)      # 9 clipped down
    assert w[4] == pytest.approx(0.2) and w[5] == pytest.approx(2.0)


def test_training_defaults_are_the_shipped_recipe():
    """TrainParams() trains what the shipped model's card says it was trained with (src/nucseg/weights)."""
    from nucseg.train import TrainParams

    card = json.loads((Path(__file__).resolve().parents[1] / "src" / "nucseg" / "weights" /
                       "default_card.json").read_text())
    for name, value in vars(TrainParams()).items():
        if name not in ("num_workers", "accelerator"):   # how it ran, not what it computed
            assert card["params"][name] == (list(value) if isinstance(value, tuple) else value), name


@pytest.mark.parametrize("setting, field", [
    ({"weight_clip": (2.0, 0.2)}, "weight_clip"), ({"weight_clip": (0.0, 2.0)}, "weight_clip"),
    ({"mpp": 0}, "mpp"), ({"depth": 0}, "depth"), ({"max_steps": 0}, "max_steps"),
    ({"weight_strata": -1}, "weight_strata"), ({"disc_crop": 8}, "disc_crop"),
    ({"self_training_share": 1.0}, "self_training_share"), ({"stain_jitter": 1.0}, "stain_jitter")])
def test_nonsensical_training_settings_are_refused_by_name(setting, field):
    from nucseg.train import TrainParams

    TrainParams()   # the defaults pass
    with pytest.raises(ValueError, match=rf"\b{field} = "):
        TrainParams(**setting)


def test_train_cli_refuses_a_bad_setting_before_reading_any_data(tmp_path, caplog):
    from nucseg.cli import main

    # No shards exist: the refusal must come from the settings, not from missing data.
    with caplog.at_level("ERROR"):
        assert main(["train", "--synth", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "m"),
                     "--weight-clip", "2", "0.2"]) == 1
    assert "weight_clip = (2.0, 0.2)" in caplog.text
    assert not (tmp_path / "m").exists()


def test_stratified_weights_keep_each_stratum_s_share():
    # Crowded patches (high fraction) get low weights, sparse ones high: the preference between strata goes,
    # the order within a stratum stays.
    fraction = np.array([0.05, 0.06, 0.07, 0.08, 0.30, 0.31, 0.32, 0.33])
    weights = np.array([1.0, 2.0, 1.5, 0.5, 0.2, 0.2, 0.4, 0.2])
    out = stratified_weights(weights, fraction, 2)
    np.testing.assert_allclose(out[:4], weights[:4] / 1.25, rtol=1e-6)
    np.testing.assert_allclose(out[4:], weights[4:] / 0.25, rtol=1e-6)
    assert out[:4].mean() == pytest.approx(1) and out[4:].mean() == pytest.approx(1)
    assert out[6] > out[4] == out[5] and out[1] > out[2] > out[0] > out[3]
    # The strata are quantile bins, so their order in the input does not matter; one stratum changes nothing.
    order = np.random.default_rng(0).permutation(8)
    np.testing.assert_allclose(stratified_weights(weights[order], fraction[order], 2), out[order], rtol=1e-6)
    np.testing.assert_allclose(stratified_weights(weights, fraction, 0), weights)


def test_nucleus_contrast_is_background_minus_nucleus_grey():
    from nucseg.train.data import nucleus_contrast

    images = np.full((3, 8, 8, 3), 200, np.uint8)
    labels = np.zeros((3, 8, 8), np.int32)
    images[0, 2:4, 2:4] = (60, 90, 90)      # grey 80 under a nucleus, 200 around it
    labels[0, 2:4, 2:4] = 1
    labels[1, 5:7, 5:7] = 1                 # a nucleus as pale as its surroundings
    np.testing.assert_allclose(nucleus_contrast(images, labels), [120.0, 0.0, 0.0])  # the third has no nucleus


def test_per_sample_loss_is_per_sample():
    targets = torch.zeros(2, 2, 16, 16)
    targets[:, 0, 4:12, 4:12] = 1
    targets[:, 1, 4:12, 4] = 1
    good = torch.where(targets > 0, 10.0, -10.0)
    logits = torch.stack([good[0], -good[1]])   # first right, second wrong
    loss = per_sample_loss(logits, targets)
    assert loss.shape == (2,) and loss[0] < 0.05 < 1.0 < loss[1]
    # The boundary counts, by its weight: the same foreground with a wrong boundary costs more.
    wrong_boundary = good[:1].clone()
    wrong_boundary[:, 1] = -wrong_boundary[:, 1]
    assert per_sample_loss(wrong_boundary, targets[:1])[0] > loss[0] + 1.0
    assert per_sample_loss(wrong_boundary, targets[:1], boundary_weight=0)[0] == pytest.approx(
        per_sample_loss(good[:1], targets[:1], boundary_weight=0)[0])


def test_unet_shapes_and_padding():
    net = UNet(base=4, depth=3).eval()
    probs = predict(net, np.zeros((2, 50, 70, 3), np.uint8), torch.device("cpu"))
    assert probs.shape == (2, 3, 50, 70) and (probs >= 0).all() and (probs <= 1).all()


def test_training_writes_weights_card_and_resumes(small_model):
    model, meta = load_weights(small_model)
    card = json.loads((small_model.parent / "model_card.json").read_text())
    assert meta["model_id"] == card["model_id"] and len(card["model_id"]) == 64
    assert card["training_data"]["manual_labels"] == 0
    assert card["training_data"]["synth_params"][0]["patch_size"] == 128   # the generator's parameters
    assert card["global_step"] == 150
    w = np.load(small_model.parent / "importance_weights.npz")["weight"]
    assert len(w) == card["training_data"]["n_synthetic"] and (w >= 0.2 - 1e-6).all() and (w <= 2 + 1e-6).all()
    assert (small_model.parent / "checkpoints" / "last.ckpt").exists()
    assert card["metrics"]["val_dice"] > 0.5   # it learned the synthetic task
    phases = card["phase_time_s"]
    assert phases["discriminator"] > 0 and phases["synthetic"] > 0 and phases["self_training"] == 0
    assert card["wall_time_s"] == pytest.approx(sum(phases.values()), abs=0.2)
    assert card["wall_time_s"] <= card["this_run_s"] + 0.2


def test_trained_model_has_foreground_and_boundary_outputs(small_model):
    card = json.loads((small_model.parent / "model_card.json").read_text())
    assert card["outputs"] == ["foreground", "boundary"]
    assert load_weights(small_model)[0].head.out_channels == 2


def test_resume_from_last_checkpoint(small_model, tmp_path):
    import shutil

    from nucseg.train import TrainParams, train_model

    root = small_model.parent.parent
    out = tmp_path / "model"
    shutil.copytree(small_model.parent, out)
    weights_mtime = (out / "importance_weights.npz").stat().st_mtime_ns
    first = json.loads((out / "model_card.json").read_text())["phase_time_s"]
    params = TrainParams(**{**SMALL, "max_steps": 160})
    card = train_model([root / "synth"], out, params, progress=False)
    # 150 steps were done: training continues to 160; the importance weights are reused, not recomputed.
    assert card["global_step"] == 160
    # The card's times are the whole training's: the first run's discriminator and 150 steps, plus 10 steps.
    assert card["phase_time_s"]["discriminator"] == first["discriminator"]
    # (The checkpoint's clock stopped at the last step, before the first run's final validation.) The three
    # times are rounded to 0.1 s each: the bound allows that rounding.
    assert (0.9 * first["synthetic"] < card["phase_time_s"]["synthetic"]
            <= first["synthetic"] + card["this_run_s"] + 0.15)
    assert (out / "importance_weights.npz").stat().st_mtime_ns == weights_mtime
    # The resumed run replaced last.ckpt (no last-v1.ckpt), so a second resume continues from step 160.
    assert not list((out / "checkpoints").glob("last-v*.ckpt"))
    p_real = np.load(out / "importance_weights.npz")["p_real"]
    np.testing.assert_allclose(np.load(out / "importance_weights.npz")["weight"],
                               np.clip(p_real / (1 - p_real), 0.2, 2.0), rtol=1e-5)
    assert card["importance_weights"]["clipped_low"] == pytest.approx(
        float((np.clip(p_real / (1 - p_real), 0.2, 2.0) <= 0.2 + 1e-6).mean()))
    # Stratified by crowding: from the stored scores, without retraining the discriminator; within each third
    # of the patches by nucleus-pixel fraction the weights average 1, and the card says how P(real) follows
    # crowding.
    card = train_model([root / "synth"], out, TrainParams(**{**vars(params), "max_steps": 175, "weight_strata": 3}),
                       progress=False)
    fraction = np.concatenate([(np.load(f)["instances"] > 0).mean(axis=(1, 2))
                               for f in sorted((root / "synth").glob("shard-*.npz"))])
    with np.load(out / "importance_weights.npz") as data:
        np.testing.assert_array_equal(data["p_real"], p_real)
        w = data["weight"]
    # (Ties share a stratum: here over a third of the patches have no nuclei, so one tercile is empty.)
    tercile = np.searchsorted(np.quantile(fraction, [1 / 3, 2 / 3]), fraction, side="right")
    strata = np.unique(tercile)
    assert len(strata) >= 2
    np.testing.assert_allclose([w[tercile == k].mean() for k in strata], 1, rtol=1e-5)
    stats = card["importance_weights"]
    assert -1 <= stats["p_real_vs_crowding"] <= 1 and 0 < stats["effective_sample_size"] <= 1


def test_discriminator_crops_both_classes_to_the_smaller_patches(small_model, tmp_path, monkeypatch):
    """Synthetic patches smaller than ``disc_crop`` (coarse working resolutions) train, cropped like the
    real ones; this used to fail inside numpy with "high <= 0"."""
    import nucseg.train.fit as fit
    from nucseg.train import TrainParams
    from nucseg.train.data import list_shards

    synth = small_model.parent.parent / "synth"
    real = np.load(synth / "real.npz")["patches"]
    real = np.concatenate([real, real[:, ::-1]], axis=1)        # taller than the synthetic patches
    crops, crop = [], fit.random_crops
    def recording_crop(images, size, rng):
        crops.append(crop(images, size, rng))
        return crops[-1]

    monkeypatch.setattr(fit, "random_crops", recording_crop)
    shards = list_shards([synth])
    fit.train_discriminator(real, shards, tmp_path, TrainParams(disc_steps=2, disc_crop=1000), False)
    synth_size = fit.read_shard_images(shards[0][0]).shape[1]
    assert {c.shape[1:3] for c in crops} == {(synth_size, synth_size)}
    assert sum(len(c) for c in crops) == len(real) + sum(count for *_, count in shards)


def test_augmentation_keeps_targets_aligned(rng):
    from skimage.segmentation import find_boundaries

    from nucseg.train.data import augment

    image = np.full((64, 64, 3), 230, np.uint8)
    image[20:40, 10:30] = (80, 40, 130)
    labels = np.zeros((64, 64), np.int32)
    labels[20:40, 10:30] = 1
    targets = np.stack([labels > 0, find_boundaries(labels, mode="inner")]).astype(np.float32)
    for _ in range(30):
        img, tgt = augment(image, targets, rng)
        assert img.shape == (64, 64, 3) and tgt.shape == (2, 64, 64)
        dark = img.mean(axis=2) < 140  # the core, away from blurred rims
        # The nucleus stays under its label whatever the flip, rotation, zoom, blur or stain jitter; target
        # maps are moved, never interpolated.
        assert dark.any() and (tgt[0][dark] > 0).mean() > 0.97 and set(np.unique(tgt)) <= {0.0, 1.0}
        assert (tgt[0][tgt[1] > 0] == 1).all()   # the boundary stays on its nucleus


def test_sharpening_raises_edge_contrast_and_keeps_the_mean():
    import cv2

    from nucseg.train.data import augment, sharpen

    image = np.full((64, 64, 3), 220, np.uint8)
    image[16:48, 16:48] = (90, 50, 140)
    soft = cv2.GaussianBlur(image, (0, 0), 1.5)

    def edge_energy(img):
        return cv2.Laplacian(np.asarray(img, np.float32).mean(axis=2), cv2.CV_32F).var()

    sharp = sharpen(soft.astype(np.float32), 0.8)
    assert edge_energy(sharp) > 1.3 * edge_energy(soft)
    assert abs(sharp.mean() - soft.mean()) < 1.0
    targets = np.zeros((2, 64, 64), np.float32)
    energies = [edge_energy(augment(soft, targets, np.random.default_rng(i), stain_jitter=0.0)[0]) for i in range(40)]
    # Some augmented copies are sharper than the input, some (focus blur) softer.
    assert max(energies) > 1.5 * edge_energy(soft) and min(energies) < 0.8 * edge_energy(soft)


def test_stain_jitter_widens_the_colour_spread(rng):
    from nucseg.train.data import augment

    image = np.full((32, 32, 3), (200, 120, 170), np.uint8)
    targets = np.zeros((2, 32, 32), np.float32)

    def hue_spread(s):
        means = [augment(image, targets, np.random.default_rng(i), stain_jitter=s)[0].reshape(-1, 3).mean(0)
                 for i in range(60)]
        # Brightness/contrast jitter moves all channels together; the stain jitter moves them apart.
        return np.std([m - m.mean() for m in means], axis=0).mean()

    assert hue_spread(0.0) < 0.5 * hue_spread(0.15) and hue_spread(0.35) > 1.8 * hue_spread(0.15)


def test_training_clock_counts_fit_only_and_carries_over_a_resume():
    import time

    from nucseg.train.modules import TrainingClock

    clock = TrainingClock()
    clock.on_train_start(None, None)
    time.sleep(0.05)
    clock.on_train_end(None, None)
    ran = clock.seconds()
    time.sleep(0.05)
    assert 0.05 <= ran == clock.seconds() < 0.09   # stopped at the end of fit
    resumed = TrainingClock(resuming=True)
    assert resumed.seconds() is None               # a checkpoint without a clock: unknown
    resumed.load_state_dict(clock.state_dict())
    resumed.on_train_start(None, None)
    time.sleep(0.02)
    assert ran + 0.02 <= resumed.seconds() < ran + 0.06


def test_changed_data_is_not_resumed_from_a_stale_run(small_model, tmp_path, caplog):
    """Snakemake reruns training when the synthetic data changed: the old scores and checkpoint must not be used."""
    import shutil

    from nucseg.train import TrainParams, train_model

    synth, out = tmp_path / "synth", tmp_path / "model"
    shutil.copytree(small_model.parent.parent / "synth", synth)
    shutil.copytree(small_model.parent, out)
    old_p_real = np.load(out / "importance_weights.npz")["p_real"]
    shard = sorted(synth.glob("shard-*.npz"))[0]
    with np.load(shard) as data:
        arrays = dict(data)
    arrays["image"] = np.ascontiguousarray(arrays["image"][:, ::-1])   # other patches, same count
    np.savez_compressed(shard, **arrays)
    params = TrainParams(**SMALL)   # the fixture's
    with caplog.at_level("WARNING"):
        card = train_model([synth], out, params, progress=False)
    assert "scoring again" in caplog.text and "training from scratch" in caplog.text
    assert card["global_step"] == 150 and card["metrics"]   # trained (a stale resume logs no metrics)
    assert not np.array_equal(np.load(out / "importance_weights.npz")["p_real"], old_p_real)


def test_pseudo_targets_keep_only_confident_pixels_that_agree_with_the_instances():
    from nucseg.train.pseudo import pseudo_targets

    labels = np.zeros((32, 32), np.int32)
    labels[4:12, 4:10], labels[4:12, 10:16] = 1, 2          # two touching nuclei
    prob = np.full((2, 32, 32), 0.05, np.float32)
    prob[0][labels > 0] = 0.95
    prob[0, 20:26, 20:26] = 0.9      # foreground the instance extraction dropped (e.g. outside the gate)
    prob[0, 28:30, 2:6] = 0.5        # uncertain
    t = pseudo_targets(prob, labels, (0.3, 0.7))
    fg, boundary, valid = t
    assert t.shape == (3, 32, 32) and t.dtype == np.float32
    np.testing.assert_array_equal(fg, labels > 0)
    assert boundary[4:12, 9].all() and boundary[4:12, 10].all()   # the seam between the two is taught
    assert not valid[20:26, 20:26].any() and not valid[28:30, 2:6].any()
    assert valid[labels > 0].all() and valid[0, :].all()
    # A narrower band keeps more.
    assert pseudo_targets(prob, labels, (0.5, 0.5))[2][28:30, 2:6].all()


def _constant_net(logit: float) -> UNet:
    """A network that says ``sigmoid(logit)`` everywhere, for every output."""
    net = UNet(base=4, depth=1, out_channels=2)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(logit)
    return net.train()


def test_pseudo_labels_are_the_network_s_confident_instances():
    from nucseg.train.pseudo import pseudo_label

    patches = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    background = _constant_net(-8.0)
    sure = pseudo_label(background, patches, 0.5, tta=2)
    assert sure.shape == (2, 3, 32, 32)
    assert not sure[:, 0].any() and sure[:, 2].all()      # nothing is nucleus, and every pixel is sure of it
    assert background.training                           # labelled in eval mode, left as it was
    # A network that cannot decide (0.5 everywhere, inside the uncertainty band) teaches no pixel.
    assert not pseudo_label(_constant_net(0.0), patches, 0.5, tta=2)[:, -1].any()


def test_masked_loss_ignores_invalid_pixels():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 2, 16, 16), (torch.rand(3, 2, 16, 16) > 0.5).float()
    valid = torch.ones(3, 16, 16)
    torch.testing.assert_close(per_sample_loss(logits, targets, valid=valid), per_sample_loss(logits, targets))
    valid[:, :, :8] = 0
    changed = logits.clone()
    changed[:, :, :, :8] = 10.0
    torch.testing.assert_close(per_sample_loss(changed, targets, valid=valid),
                               per_sample_loss(logits, targets, valid=valid))
    assert not torch.allclose(per_sample_loss(changed, targets), per_sample_loss(logits, targets))


def test_self_training_fine_tunes_the_trained_network_and_resumes(small_model, tmp_path):
    import shutil

    from nucseg.train import TrainParams, train_model

    root = small_model.parent.parent
    out = tmp_path / "model"
    shutil.copytree(small_model.parent, out)
    params = TrainParams(**{**SMALL, "self_training_steps": 12})
    card = train_model([root / "synth"], out, params, progress=False)
    # The synthetic training is reused (the self-training settings are not part of its key), then fine-tuned.
    assert card["global_step"] == 150
    st = card["self_training"]
    assert st["steps"] == 12 and st["real_per_batch"] == 4
    assert st["n_real_patches"] == len(np.load(root / "synth" / "real.npz")["patches"])
    assert 0 < st["valid_fraction"] <= 1 and 0 <= st["foreground_fraction"] < 1
    assert (out / "checkpoints" / "self_training" / "last.ckpt").exists()
    before, _ = load_weights(small_model)
    after, _ = load_weights(out / "model.pt")
    pairs = zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    # Run again: both phases are complete, nothing is retrained and the same weights come out. The card still
    # has both phases' held-out metrics (measured again) and times (from the checkpoints).
    first = card
    card = train_model([root / "synth"], out, params, progress=False)
    again, _ = load_weights(out / "model.pt")
    for a, b in zip(after.state_dict().values(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert card["self_training"]["steps"] == 12
    for name in ("val_loss", "val_dice", "self_training_val_loss", "self_training_val_dice"):
        assert card["metrics"][name] == pytest.approx(first["metrics"][name], rel=1e-4)  # the same batches
    # (Read back from the checkpoints, saved at the last step: the final validation pass is not in them.)
    assert card["phase_time_s"] == pytest.approx(first["phase_time_s"], abs=0.5)
    assert card["self_training"]["seconds"] > 0
    assert card["wall_time_s"] == pytest.approx(first["wall_time_s"], abs=1.0)
    assert card["wall_time_s"] > card["this_run_s"]


def test_local_realism_benchmark_runs_on_a_synth_output(small_model):
    """benchmarks/local_realism.py (docs/experiments.md, "Where within a patch"): its AUC and a short run."""
    import subprocess
    import sys

    from nucseg.metrics import two_sample_auc  # the benchmarks' one AUC

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "local_realism.py"
    assert two_sample_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert two_sample_auc(np.array([1.0, 4.0]), np.array([2.0, 3.0])) == 0.5

    root = small_model.parent.parent
    run = subprocess.run([sys.executable, str(path), "--synth", str(root / "synth"), "--steps", "3",
                          "--held-out-real", "2", "--p-real", str(small_model.parent / "importance_weights.npz")],
                         capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    assert out["n_real_test"] == 2 and out["n_synthetic_test"] == 32   # the last shard is held out
    for key in ("auc_per_location", "auc_per_patch", "floor_share", "floor_share_on_nuclei"):
        assert 0 <= out[key] <= 1
    assert -1 <= out["spearman_patch_mean_vs_p_real"] <= 1
