"""Label-free adaptation to a cohort: no label is opened, the model changes, the workflow wires it per type."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from nucseg import io
from nucseg.evaluate import images_mpp, load_dataset
from nucseg.train import TrainParams, adapt_to_images

from .conftest import REPO

@pytest.fixture
def dataset(tmp_path, demo_slide):
    """Two annotated 256² tiles cut from the demo slide (labels: one square each), with a manifest."""
    from nucseg.slides import open_slide

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    with open_slide(demo_slide) as slide:
        for i, (x, y) in enumerate(((300, 300), (700, 500))):
            io.write_png(root / "images" / f"t{i}.png", slide.read_region((x, y), 0, (256, 256)))
            labels = np.zeros((256, 256), np.uint16)
            labels[100:120, 100:120] = 1
            io.write_png(root / "labels" / f"t{i}.png", labels)
    (root / "manifest.csv").write_text("id,mpp\nt0,0.25\nt1,0.25\n")
    return root


def _never_read(files) -> None:
    """Mark files as not read since their last change (atime before mtime: the next read updates it)."""
    for f in files:
        os.utime(f, (0, f.stat().st_mtime))


def test_adaptation_opens_no_label_and_changes_the_model(dataset, real_model, tmp_path):
    """Labels are proven unread by their access times (C-level reads, e.g. OpenCV's, bypass Python's hooks)."""
    labels = sorted((dataset / "labels").iterdir())
    _never_read(labels)
    params = TrainParams(self_training_steps=3, disc_steps=5, batch_size=4, disc_max_synthetic=32, seed=0)
    card = adapt_to_images(dataset / "images", images_mpp(dataset), real_model, tmp_path / "adapted", n_patches=32,
                           params=params, progress=False)
    assert [f.stat().st_atime for f in labels] == [0.0] * len(labels)
    adapted = tmp_path / "adapted" / "model" / "model.pt"
    assert adapted.is_file() and card["training_data"]["manual_labels"] == 0
    assert card["adapted_from"]["model_id"] == io.file_sha256(real_model)
    assert card["self_training"]["steps"] == 3 and card["training_data"]["n_real"] > 0
    import torch

    before = torch.load(real_model, weights_only=True)["state_dict"]
    after = torch.load(adapted, weights_only=True)["state_dict"]
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    # Scoring reads them, and the access times show it (else this file system does not record reads).
    load_dataset(dataset)
    if any(f.stat().st_atime == 0.0 for f in labels):
        pytest.skip("this file system does not update access times (noatime): label reads cannot be observed")


def test_adaptation_refuses_synthetic_patches_at_another_scale(tmp_path, demo_tissue, real_model):
    from nucseg.synth import SynthParams, generate_dataset, load_textures
    from nucseg.train import adapt_model

    generate_dataset(load_textures([demo_tissue / "patches.npz"], None, 0.25), tmp_path / "s",
                     SynthParams(n_patches=8, patch_size=128, shard_size=8, mpp=0.25), progress=False)
    with pytest.raises(ValueError, match="0.25 µm/px"):
        adapt_model(real_model, [tmp_path / "s"], tmp_path / "m", TrainParams(self_training_steps=1))


def test_adapt_switch_plans_one_adapted_model_per_type_and_no_training(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    (tmp_path / "config" / "cohorts" / "OTHER.tsv").write_text(
        "slide_id\tcancer_type\tsource\nO1\tOTHER\tresources/demo/DEMO-02.tiff\n")
    (tmp_path / "config" / "two.yaml").write_text(yaml.safe_dump({"cohorts": {"OTHER": "config/cohorts/OTHER.tsv"}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                          "--configfile", "config/config.yaml", "config/demo.yaml", "config/two.yaml",
                          "config/adapt.yaml", "-n", "-p"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    adapts = [line for line in lines if " adapt --init " in line]
    assert len(adapts) == 2 and not any(" train --synth " in line for line in lines)
    for cancer_type in ("DEMO", "OTHER"):
        assert any(f"--synth results/synth/{cancer_type}/shards --out-dir results/models/adapted/{cancer_type}" in a
                   for a in adapts)
        assert all(f"--checkpoint results/models/adapted/{cancer_type}/model.pt" in line
                   for line in lines if " segment " in line and f"results/{cancer_type}/" in line)
