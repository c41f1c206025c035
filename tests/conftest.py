"""Shared fixtures: paths to the real data beside the repo, a demo slide, a small trained model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
APERIO = SHARED / "slides" / "aperio"
FIXTURES = SHARED / "slides" / "format_fixtures"
CMU = APERIO / "CMU-1-Small-Region.svs"
TCGA_TS = APERIO / "TCGA-CR-7395-01A-01-TS1.svs"
MONUSEG = SHARED / "nuclei" / "monuseg"


def need(path: Path) -> Path:
    """Skip the test with a clear reason when the shared data is not beside the repo."""
    if not path.exists():
        pytest.skip(f"{path} not present (the shared data folder ../shared/data is not beside this clone)")
    return path


@pytest.fixture(scope="session")
def demo_slide(tmp_path_factory) -> Path:
    """A generated 40x demo slide (pyramidal TIFF with mpp 0.25)."""
    from nucseg.demo import make_demo_slide

    return make_demo_slide(tmp_path_factory.mktemp("demo") / "demo.tiff", 1536, 1280, 0.25, seed=7)


@pytest.fixture(scope="session")
def demo_tissue(demo_slide, tmp_path_factory) -> Path:
    from nucseg.tissue import detect_tissue

    out = tmp_path_factory.mktemp("tissue")
    facts = detect_tissue(demo_slide, out, "demo")
    assert facts["status"] == "ok", facts
    return out


@pytest.fixture(scope="session")
def small_model(demo_tissue, tmp_path_factory) -> Path:
    """A small model trained briefly on synthetic data drawn on the demo slide's textures."""
    from nucseg.synth import SynthParams, generate_dataset, load_textures
    from nucseg.train import TrainParams, train_model

    root = tmp_path_factory.mktemp("model")
    textures = load_textures([demo_tissue / "patches.npz"], None, 0.25)
    generate_dataset(textures, root / "synth", SynthParams(n_patches=96, patch_size=128, shard_size=32, mpp=0.25,
                                                           crisp_vesicular=0.0, large_coverage=(0.0, 0.0), seed=0),
                     progress=False)
    # Small and quick, not the shipped recipe (the dataclass defaults): no self-training, 0.25 µm/px.
    params = TrainParams(max_steps=150, batch_size=8, disc_steps=20, base=8, depth=3, lr=5e-3, weight_strata=0,
                         self_training_steps=0, mpp=0.25)
    train_model([root / "synth"], root / "model", params, progress=False)
    return root / "model" / "model.pt"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def real_model(request) -> Path:
    """The model shipped in the package (trained on real tissue textures), else the small demo model."""
    from nucseg.cli import default_weights

    try:
        return default_weights()
    except FileNotFoundError:
        return request.getfixturevalue("small_model")  # trained only when needed
