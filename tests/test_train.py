import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nucseg.model import UNet, load_weights, predict
from nucseg.train.modules import importance_weights, per_sample_loss, stratified_weights


def test_importance_weight_formula_and_clip():
    p = torch.tensor([0.5, 0.6, 0.1, 0.9, 0.0, 1.0])
    w = importance_weights(p, (0.2, 2.0))
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(1.5)
    assert w[2] == pytest.approx(0.2)      # 0.111 clipped up
    assert w[3] == pytest.approx(2.0)      # 9 clipped down
    assert w[4] == pytest.approx(0.2) and w[5] == pytest.approx(2.0)
    # Flattened: the same weights to the power λ (λ = 0 would be unweighted), so their order is kept.
    flat = importance_weights(p, (0.2, 2.0), power=0.5)
    torch.testing.assert_close(flat, w.sqrt())
    assert flat.max() / flat.min() == pytest.approx(10 ** 0.5)


@pytest.mark.parametrize("setting, field", [
    ({"weight_clip": (2.0, 0.2)}, "weight_clip"), ({"weight_clip": (0.0, 2.0)}, "weight_clip"),
    ({"mpp": 0}, "mpp"), ({"depth": 0}, "depth"), ({"max_steps": 0}, "max_steps"),
    ({"weight_strata": -1}, "weight_strata"), ({"contrast_strata": 5}, "contrast_strata"),
    ({"average_last": 1.0}, "average_last"), ({"hard_examples": 1.5}, "hard_examples"),
    ({"disc_folds": 0}, "disc_folds"), ({"stain_jitter": 1.0}, "stain_jitter")])
def test_nonsensical_training_settings_are_refused_by_name(setting, field):
    from nucseg.train import TrainParams

    TrainParams()   # the defaults pass
    with pytest.raises(ValueError, match=rf"\b{field} = "):
        TrainParams(**setting)
    # Contrast strata are fine once there are strata of crowding to split.
    TrainParams(weight_strata=10, contrast_strata=5)


def test_train_cli_refuses_a_bad_setting_before_reading_any_data(tmp_path, caplog):
    from nucseg.cli import main

    # No shards exist: the refusal must come from the settings, not from missing data.
    with caplog.at_level("ERROR"):
        assert main(["train", "--synth", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "m"),
                     "--weight-clip", "2", "0.2"]) == 1
    assert "weight_clip = (2.0, 0.2)" in caplog.text
    assert not (tmp_path / "m").exists()


def test_train_cli_checks_its_teachers_before_reading_any_data(tmp_path, caplog):
    from nucseg.cli import main

    args = ["train", "--synth", str(tmp_path / "absent"), "--out-dir", str(tmp_path / "m")]
    with caplog.at_level("ERROR"):
        assert main(args + ["--self-training-steps", "5", "--teachers", str(tmp_path / "large.pt")]) == 1
        assert f"model weights {tmp_path / 'large.pt'} not found" in caplog.text
        teacher = _constant_teacher(tmp_path / "large.pt", 0.0)
        assert main(args + ["--teachers", str(teacher)]) == 1    # without self-training it would be unused
        assert "set self_training_steps > 0" in caplog.text
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


def test_stratified_weights_split_each_stratum_again():
    # Within each half by crowding, faint nuclei (low contrast) get low weights: split by contrast too, each
    # quarter averages 1, so the preference for contrast goes as well; order within a quarter stays.
    fraction = np.repeat([0.1, 0.3], 4) + np.arange(8) * 1e-3
    # The crowded half's nuclei are all fainter than the sparse half's: bins of contrast over all patches would
    # not split either half; bins within each half do.
    contrast = np.array([50.0, 60.0, 55.0, 65.0, 9.0, 5.0, 10.0, 4.0])
    weights = np.array([0.2, 1.0, 0.4, 2.0, 0.6, 0.3, 0.9, 0.3])
    out = stratified_weights(weights, fraction, 2, contrast, 2)
    for quarter in ([0, 2], [1, 3], [5, 7], [4, 6]):
        np.testing.assert_allclose(out[quarter].mean(), 1, rtol=1e-6)
        np.testing.assert_allclose(out[quarter], weights[quarter] / weights[quarter].mean(), rtol=1e-6)
    # Without the second quantity, or with one bin of it, the strata are those of crowding alone.
    np.testing.assert_allclose(stratified_weights(weights, fraction, 2, contrast, 1), stratified_weights(weights, fraction, 2))


def test_nucleus_contrast_is_background_minus_nucleus_grey():
    from nucseg.train.data import nucleus_contrast

    images = np.full((3, 8, 8, 3), 200, np.uint8)
    labels = np.zeros((3, 8, 8), np.int32)
    images[0, 2:4, 2:4] = (60, 90, 90)      # grey 80 under a nucleus, 200 around it
    labels[0, 2:4, 2:4] = 1
    labels[1, 5:7, 5:7] = 1                 # a nucleus as pale as its surroundings
    np.testing.assert_allclose(nucleus_contrast(images, labels), [120.0, 0.0, 0.0])  # the third has no nucleus


def test_per_sample_loss_is_per_sample():
    targets = torch.zeros(2, 3, 16, 16)
    targets[:, 0, 4:12, 4:12] = 1
    targets[:, 2, 6:10, 6:10] = 1
    good = torch.where(targets > 0, 10.0, -10.0)
    logits = torch.stack([good[0], -good[1]])   # first right, second wrong
    loss = per_sample_loss(logits, targets)
    assert loss.shape == (2,) and loss[0] < 0.05 < 1.0 < loss[1]
    # The centre map counts: the same foreground with a wrong centre costs more.
    wrong_centre = good[:1].clone()
    wrong_centre[:, 2] = -wrong_centre[:, 2]
    assert per_sample_loss(wrong_centre, targets[:1])[0] > loss[0] + 1.0


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


@pytest.fixture(scope="module")
def centre_model(small_model, tmp_path_factory) -> Path:
    """The small model's recipe with the optional centre head."""
    from nucseg.train import TrainParams, train_model

    out = tmp_path_factory.mktemp("centre") / "model"
    params = TrainParams(max_steps=150, batch_size=8, disc_steps=20, base=8, lr=5e-3, center_head=True)
    train_model([small_model.parent.parent / "synth"], out, params, progress=False)
    return out / "model.pt"


def test_default_model_has_no_centre_head(small_model):
    card = json.loads((small_model.parent / "model_card.json").read_text())
    assert card["outputs"] == ["foreground", "boundary"] and card["center_calibration"] is None
    assert load_weights(small_model)[0].head.out_channels == 2


def test_centre_head_is_calibrated_on_held_out_synthetic_patches(centre_model, small_model):
    from nucseg.instances import InstanceParams, extract_instances
    from nucseg.train.data import list_shards

    card = json.loads((centre_model.parent / "model_card.json").read_text())
    assert card["outputs"] == ["foreground", "boundary", "center"]
    cal = card["center_calibration"]
    best = cal["threshold"]
    aji = np.array(list(cal["synthetic_aji"].values()))
    smoothed = np.convolve(np.pad(aji, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    assert list(cal["synthetic_aji"])[int(np.argmax(smoothed))] == str(best) and max(aji) > 0.3
    assert cal["bias_shift"] == pytest.approx(-np.log(best / (1 - best)), abs=1e-3)
    # The saved weights carry the shift: at the default threshold 0.5 they cut the same cores, hence the same
    # nuclei, as the unshifted network at the chosen threshold.
    model, _ = load_weights(centre_model)
    with np.load(list_shards([small_model.parent.parent / "synth"])[-1][0]) as data:   # the held-out shard
        images = data["image"][:cal["n_patches"]]
    shifted = predict(model, images, torch.device("cpu"))
    with torch.no_grad():
        model.head.bias[2] -= cal["bias_shift"]
    unshifted = predict(model, images, torch.device("cpu"))
    params = InstanceParams(center_threshold=best)
    for s, u in zip(shifted, unshifted):
        np.testing.assert_array_equal(extract_instances(s, 0.25), extract_instances(u, 0.25, params))


def test_resume_from_last_checkpoint(small_model, tmp_path):
    import shutil

    from nucseg.train import TrainParams, train_model

    root = small_model.parent.parent
    out = tmp_path / "model"
    shutil.copytree(small_model.parent, out)
    weights_mtime = (out / "importance_weights.npz").stat().st_mtime_ns
    first = json.loads((out / "model_card.json").read_text())["phase_time_s"]
    params = TrainParams(max_steps=160, batch_size=8, disc_steps=20, base=8, lr=5e-3)
    card = train_model([root / "synth"], out, params, progress=False)
    # 150 steps were done: training continues to 160; the importance weights are reused, not recomputed.
    assert card["global_step"] == 160
    # The card's times are the whole training's: the first run's discriminator and 150 steps, plus 10 steps.
    assert card["phase_time_s"]["discriminator"] == first["discriminator"]
    # (The checkpoint's clock stopped at the last step, before the first run's final validation.)
    assert 0.9 * first["synthetic"] < card["phase_time_s"]["synthetic"] < first["synthetic"] + card["this_run_s"]
    assert (out / "importance_weights.npz").stat().st_mtime_ns == weights_mtime
    # The resumed run replaced last.ckpt (no last-v1.ckpt), so a second resume continues from step 160.
    assert not list((out / "checkpoints").glob("last-v*.ckpt"))
    # A new weight power applies to the stored discriminator scores without retraining the discriminator.
    p_real = np.load(out / "importance_weights.npz")["p_real"]
    card = train_model([root / "synth"], out, TrainParams(**{**vars(params), "max_steps": 170, "weight_power": 0.5}),
                       progress=False)
    assert card["global_step"] == 170
    with np.load(out / "importance_weights.npz") as data:
        np.testing.assert_array_equal(data["p_real"], p_real)
        np.testing.assert_allclose(data["weight"], np.clip(p_real / (1 - p_real), 0.2, 2.0) ** 0.5, rtol=1e-5)
    assert card["importance_weights"]["clipped_low"] == pytest.approx(
        float((np.clip(p_real / (1 - p_real), 0.2, 2.0) <= 0.2 + 1e-6).mean()))
    # Stratified by crowding: still from the stored scores; within each third of the patches by nucleus-pixel
    # fraction the weights average 1, and the card says how P(real) follows crowding.
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
    assert -1 <= stats["p_real_vs_contrast"] <= 1


def test_each_synthetic_patch_is_scored_by_a_discriminator_that_never_saw_it(small_model, tmp_path, monkeypatch):
    import nucseg.train.fit as fit
    from nucseg.train import TrainParams
    from nucseg.train.data import list_shards

    synth = small_model.parent.parent / "synth"
    shards = list_shards([synth])
    real = np.load(synth / "real.npz")["patches"]
    seen, trained = [], fit.train_discriminator

    def recording(real, shards, *args, **kwargs):
        seen.append({str(s[0]) for s in shards})
        return trained(real, shards, *args, **kwargs)

    monkeypatch.setattr(fit, "train_discriminator", recording)
    scored = []
    monkeypatch.setattr(fit, "score_synthetic", lambda disc, held, _score=fit.score_synthetic: (
        scored.append({str(s[0]) for s in held}) or _score(disc, held)))
    p = fit.cross_fitted_p_real(real, shards, tmp_path, TrainParams(disc_steps=5, disc_folds=2), progress=False)
    assert len(seen) == 2 and all(not (a & b) for a, b in zip(seen, scored))      # held-out folds
    assert set().union(*scored) == {str(s[0]) for s in shards}                    # every shard scored once
    assert len(p) == sum(c for *_, c in shards) and np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    # One fold: the old in-sample scoring, one discriminator.
    seen.clear()
    fit.cross_fitted_p_real(real, shards, tmp_path, TrainParams(disc_steps=5, disc_folds=1), progress=False)
    assert len(seen) == 1


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
    monkeypatch.setattr(fit, "random_crops", lambda images, size, rng: crops.append(crop(images, size, rng)) or crops[-1])
    shards = list_shards([synth])
    fit.train_discriminator(real, shards, tmp_path, TrainParams(disc_steps=2, disc_crop=1000), False)
    synth_size = fit.read_shard_images(shards[0][0]).shape[1]
    assert {c.shape[1:3] for c in crops} == {(synth_size, synth_size)}
    assert sum(len(c) for c in crops) == len(real) + sum(count for *_, count in shards)


def test_augmentation_keeps_targets_aligned(rng):
    from skimage.segmentation import find_boundaries

    from nucseg.instances import center_map
    from nucseg.train.data import augment

    image = np.full((64, 64, 3), 230, np.uint8)
    image[20:40, 10:30] = (80, 40, 130)
    labels = np.zeros((64, 64), np.int32)
    labels[20:40, 10:30] = 1
    targets = np.stack([labels > 0, find_boundaries(labels, mode="inner"), center_map(labels)]).astype(np.float32)
    for _ in range(30):
        img, tgt = augment(image, targets, rng)
        assert img.shape == (64, 64, 3) and tgt.shape == (3, 64, 64)
        dark = img.mean(axis=2) < 140  # the core, away from blurred rims
        # The nucleus stays under its label whatever the flip, rotation, zoom, blur or stain jitter.
        assert dark.any() and (tgt[0][dark] > 0).mean() > 0.97 and set(np.unique(tgt[:2])) <= {0.0, 1.0}
        # Target maps are moved, never interpolated: the centre map keeps its values and its peak.
        assert set(np.unique(tgt[2])) <= set(np.unique(targets[2])) and tgt[2].max() == 1.0
        assert (tgt[0][tgt[2] > 0] == 1).all()


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


def test_weight_average_is_the_mean_of_the_iterates_after_its_start():
    from types import SimpleNamespace

    from torch import nn

    from nucseg.train.modules import WeightAverage

    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    average, seen = WeightAverage(start_step=3), []
    for step in range(1, 7):
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(float(step * step))
        net[1].num_batches_tracked.fill_(step)
        if step > 3:
            seen.append(float(step * step))
        average.on_train_batch_end(SimpleNamespace(global_step=step), SimpleNamespace(net=net), None, None, step)
    assert average.n_averaged == 3
    assert torch.allclose(average.average["0.weight"], torch.full((2, 2), np.mean(seen)))
    assert average.average["1.num_batches_tracked"] == 6   # counters are copied, not averaged
    restored = WeightAverage(start_step=3)
    restored.load_state_dict(average.state_dict())
    assert restored.n_averaged == 3 and torch.equal(restored.average["0.bias"], average.average["0.bias"])


def test_training_saves_the_averaged_weights_and_resumes_the_average(small_model, tmp_path):
    from nucseg.train import TrainParams, train_model

    root = small_model.parent.parent
    out = tmp_path / "model"
    params = TrainParams(max_steps=40, batch_size=8, disc_steps=20, base=8, lr=5e-3, average_last=0.25)
    card = train_model([root / "synth"], out, params, progress=False)
    # Steps 31-40 averaged (the last quarter of 40); the saved weights are their mean, not the last iterate.
    assert card["weight_averaging"]["from_step"] == 30 and card["weight_averaging"]["n_averaged"] == 10
    saved, _ = load_weights(out / "model.pt")
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    last_iterate = {k[len("net."):]: v for k, v in last["state_dict"].items() if k.startswith("net.")}
    average = next(v for k, v in last["callbacks"].items() if "WeightAverage" in k)["average"]
    for name, value in saved.state_dict().items():
        if value.is_floating_point():   # float16 on disk
            torch.testing.assert_close(value, average[name].float(), atol=2e-3, rtol=2e-3)
    assert any(not torch.equal(average[k], v) for k, v in last_iterate.items())
    assert "val_loss" in card["metrics"] and "val_loss" in card["weight_averaging"]["last_iterate_metrics"]
    # Resumed with more steps, the average continues from the checkpoint's.
    card = train_model([root / "synth"], out, TrainParams(**{**vars(params), "max_steps": 50}), progress=False)
    assert card["global_step"] == 50 and card["weight_averaging"]["n_averaged"] == 10 + 10


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
    params = TrainParams(max_steps=150, batch_size=8, disc_steps=20, base=8, lr=5e-3)   # the fixture's
    with caplog.at_level("WARNING"):
        card = train_model([synth], out, params, progress=False)
    assert "scoring again" in caplog.text and "training from scratch" in caplog.text
    assert card["global_step"] == 150 and card["metrics"]   # trained (a stale resume logs no metrics)
    assert not np.array_equal(np.load(out / "importance_weights.npz")["p_real"], old_p_real)


def test_a_downsampling_discriminator_sees_only_block_averages():
    from nucseg.train.modules import DiscriminatorModule

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    # Shuffle the pixels inside each 4 x 4 block: the block means stay, the fine detail changes.
    blocks = images.reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 8, 16, 3)
    shuffled = np.take_along_axis(blocks, rng.permuted(np.tile(np.arange(16)[:, None], (2, 8, 8, 1, 3)), axis=3), 3)
    shuffled = shuffled.reshape(2, 8, 8, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)
    assert not np.array_equal(shuffled, images)
    torch.manual_seed(0)
    coarse, fine = DiscriminatorModule(downsample=4).eval(), DiscriminatorModule().eval()
    with torch.no_grad():
        a, b = (torch.from_numpy(x) for x in (images, shuffled))
        torch.testing.assert_close(coarse(a), coarse(b))
        assert not torch.allclose(fine(a), fine(b))


def test_gradient_reversal_and_its_ramp():
    from nucseg.train.modules import _GradientReversal, adaptation_ramp

    x = torch.randn(3, 4, requires_grad=True)
    (_GradientReversal.apply(x, 0.3) * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.3 * torch.arange(4.0).expand(3, 4))   # identity forward, reversed back
    ramp = [adaptation_ramp(p) for p in np.linspace(0, 1, 11)]
    assert ramp[0] == 0 and all(b > a for a, b in zip(ramp, ramp[1:])) and 0.99 < ramp[-1] <= 1


def test_output_space_adaptation(small_model, tmp_path):
    """The network trains against an output discriminator on the unlabelled real patches; only the network ships."""
    from nucseg.train import TrainParams, train_model
    from nucseg.train.modules import SegmentationModule

    root = small_model.parent.parent
    out = tmp_path / "model"
    params = TrainParams(max_steps=30, batch_size=8, disc_steps=20, base=8, lr=5e-3, adapt_weight=0.5,
                         adapt_real_batch=4)
    card = train_model([root / "synth"], out, params, progress=False)
    assert {"adapt_loss", "adapt_acc"} <= set(card["metrics"])
    assert 0 < card["metrics"]["adapt_scale"] <= 0.5
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert any(k.startswith("output_disc.") for k in state)
    net, _ = load_weights(out / "model.pt")   # the plain U-Net: the discriminator is not part of the model
    assert not any("output_disc" in k for k in net.state_dict())

    # Real batches depend on the step alone (a resumed run draws the same ones) and must fit the patch size.
    module = SegmentationModule(base=4, depth=2, adapt_weight=1.0, adapt_real_batch=3)
    module.real_patches = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 40, 40, 3), np.uint8))
    first, again = module._real_batch((32, 32)), module._real_batch((32, 32))
    assert first.shape == (3, 32, 32, 3) and torch.equal(first, again)
    with pytest.raises(ValueError, match="smaller than the synthetic"):
        module._real_batch((64, 64))


def test_photometric_transform_identity_and_direction():
    from nucseg.train.modules import photometric_transform

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.uniform(40, 230, (2, 3, 24, 24)).astype(np.float32))
    theta = torch.zeros(2, 7)
    torch.testing.assert_close(photometric_transform(images, theta), images, atol=1e-3, rtol=1e-4)
    darker = theta.clone()
    darker[:, :3] = 0.2                      # more stain: every pixel darker
    assert (photometric_transform(images, darker) < images - 1e-3).all()
    blur, sharp = theta.clone(), theta.clone()
    blur[:, 6], sharp[:, 6] = -0.6, 0.6
    assert photometric_transform(images, blur).std() < images.std() < photometric_transform(images, sharp).std()


def test_hard_examples_raise_the_loss(small_model, tmp_path):
    """The chosen transform makes the network's loss higher than on the untransformed patches, and training
    with hard examples runs and logs that gain."""
    from nucseg.train import TrainParams, train_model
    from nucseg.train.modules import SegmentationModule, hard_example_parameters, photometric_transform

    root = small_model.parent.parent
    with np.load(root / "synth" / "shard-00000.npz") as data:
        images = torch.from_numpy(data["image"][:16]).permute(0, 3, 1, 2).float()
        targets = torch.from_numpy(np.stack([data["instances"][:16] > 0, data["boundary"][:16] > 0], 1)).float()
    module = SegmentationModule(base=8, depth=3)
    module.net, _ = load_weights(small_model)
    module.eval()

    def loss_of(x):
        return per_sample_loss(module(x), targets)

    theta, clean = hard_example_parameters(loss_of, images)
    assert theta.shape == (16, 7)
    torch.testing.assert_close(theta.abs().max(0).values, torch.tensor([.2] * 3 + [.04] * 3 + [.6]))
    with torch.no_grad():
        torch.testing.assert_close(clean, loss_of(images), atol=1e-4, rtol=1e-4)   # the identity, up to rounding
        hard = loss_of(photometric_transform(images, theta))
        opposite = loss_of(photometric_transform(images, -theta))
    # To first order the step raises the loss as much as the opposite step lowers it; the comparison with the
    # opposite step cancels the second-order terms that make "hard > clean" a coin toss on a few patches of a
    # barely trained network.
    assert hard.mean() > clean.mean()
    assert (hard > opposite).float().mean() >= 0.75

    card = train_model([root / "synth"], tmp_path / "model", TrainParams(max_steps=10, batch_size=8, disc_steps=10,
                                                                          base=8, hard_examples=0.5), progress=False)
    assert "hard_gain" in card["metrics"] and card["params"]["hard_examples"] == 0.5


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
    # A narrower band keeps more; the centre map comes before the mask.
    assert pseudo_targets(prob, labels, (0.5, 0.5))[2][28:30, 2:6].all()
    assert pseudo_targets(prob, labels, center=True).shape == (4, 32, 32)


def _constant_teacher(path: Path, logit: float, mpp: float = 0.25) -> Path:
    """A weights file whose network says ``sigmoid(logit)`` everywhere, for every output."""
    from nucseg.model import save_weights

    net = UNet(base=4, depth=1, out_channels=2)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.fill_(logit)
    save_weights(net, path, {"mpp": mpp})
    return path


def test_pseudo_labels_are_the_mean_of_the_teachers(tmp_path):
    from nucseg.train.pseudo import pseudo_label

    background, nucleus = (load_weights(_constant_teacher(tmp_path / f"{n}.pt", logit))[0]
                           for n, logit in (("background", -8.0), ("nucleus", 8.0)))
    patches = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    alone = pseudo_label([background], patches, 0.5, tta=2)
    assert alone.shape == (2, 3, 32, 32)
    assert not alone[:, 0].any() and alone[:, 2].all()      # nothing is nucleus, and every pixel is sure of it
    # Two teachers that disagree everywhere: their mean, 0.5, is inside the uncertainty band, so no pixel teaches.
    assert not pseudo_label([background, nucleus], patches, 0.5, tta=2)[:, -1].any()
    assert pseudo_label([background], patches, 0.5, center=True, tta=1).shape == (2, 4, 32, 32)


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
    params = TrainParams(max_steps=150, batch_size=8, disc_steps=20, base=8, lr=5e-3, self_training_steps=12)
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
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    # Run again: both phases are complete, nothing is retrained and the same weights come out. The card still
    # has both phases' held-out metrics (measured again) and times (from the checkpoints).
    first = card
    card = train_model([root / "synth"], out, params, progress=False)
    again, _ = load_weights(out / "model.pt")
    for a, b in zip(after.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert card["self_training"]["steps"] == 12
    for name in ("val_loss", "val_dice", "self_training_val_loss", "self_training_val_dice"):
        assert card["metrics"][name] == pytest.approx(first["metrics"][name], rel=1e-4)  # the same batches
    # (Read back from the checkpoints, saved at the last step: the final validation pass is not in them.)
    assert card["phase_time_s"] == pytest.approx(first["phase_time_s"], abs=0.5)
    assert card["self_training"]["seconds"] > 0
    assert card["wall_time_s"] == pytest.approx(first["wall_time_s"], abs=1.0)
    assert card["wall_time_s"] > card["this_run_s"]
    assert card["self_training"]["teachers"] == []

    # A teacher's labels instead of its own: the self-training is redone (not resumed), and the card names it.
    # This teacher calls every pixel background, so the student learns to find fewer nuclei on real tissue.
    teacher = _constant_teacher(tmp_path / "teacher.pt", -8.0)
    card = train_model([root / "synth"], out, params, progress=False, teachers=[teacher])
    st = card["self_training"]
    assert st["foreground_fraction"] == 0 and st["valid_fraction"] == 1
    assert st["teachers"] == [{"path": str(teacher), "model_id": load_weights(teacher)[1]["model_id"]}]
    taught, _ = load_weights(out / "model.pt")
    real = np.load(root / "synth" / "real.npz")["patches"][:8]
    fg_self, fg_taught = (predict(net, real, torch.device("cpu"))[:, 0].mean() for net in (after, taught))
    assert fg_taught < fg_self

    with pytest.raises(ValueError, match="self_training_steps"):
        train_model([root / "synth"], tmp_path / "no_self_training", TrainParams(max_steps=1), progress=False,
                    teachers=[teacher])
    elsewhere = _constant_teacher(tmp_path / "at_20x.pt", 0.0, mpp=0.5)
    with pytest.raises(ValueError, match=r"at_20x\.pt: works at 0\.5"):
        train_model([root / "synth"], tmp_path / "wrong_scale", params, progress=False, teachers=[elsewhere])


def test_local_realism_benchmark_runs_on_a_synth_output(small_model):
    """benchmarks/local_realism.py (docs/experiments.md, "Where within a patch"): its AUC and a short run."""
    import importlib.util
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "local_realism.py"
    spec = importlib.util.spec_from_file_location("local_realism", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert bench.auc(np.array([1.0, 4.0]), np.array([2.0, 3.0])) == 0.5

    root = small_model.parent.parent
    run = subprocess.run([sys.executable, str(path), "--synth", str(root / "synth"), "--steps", "3",
                          "--held-out-real", "2", "--p-real", str(small_model.parent / "importance_weights.npz")],
                         capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    assert out["n_real_test"] == 2 and out["n_synthetic_test"] == 32   # the last shard is held out
    for key in ("auc_per_location", "auc_per_patch", "floor_share", "floor_share_on_nuclei"):
        assert 0 <= out[key] <= 1
    assert -1 <= out["spearman_patch_mean_vs_p_real"] <= 1
