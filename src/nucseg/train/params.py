"""Training parameters (kept free of heavy imports: the CLI builds its flags from them).

The defaults are the recipe of the shipped model (``src/nucseg/weights/default.pt``; docs/experiments.md has
the evidence for each value).
"""

from __future__ import annotations

from dataclasses import dataclass

# Self-training steps of ``nucseg evaluate --adapt`` (an adaptation to a folder of images): about 9 min for 36
# tiles of 512² on 2 CPU cores (docs/model.md, "Adaptation").
ADAPT_STEPS = 200


@dataclass(frozen=True)
class TrainParams:
    max_steps: int = 1200
    batch_size: int = 32         # 128 px patches at 0.5 µm/px: the pixels per step of 8 patches of 256 px
    lr: float = 2e-3
    base: int = 16
    depth: int = 4
    # False: every sample weighs 1 (the unweighted ablation).
    weighted: bool = True
    weight_clip: tuple[float, float] = (0.2, 2.0)
    # > 1: divide each weight by the mean weight of its patch's stratum of nucleus-pixel fraction (this many
    # quantile bins), so the weights reorder patches of like crowding but no longer favour sparse patches as
    # a whole (the discriminator's P(real) falls with crowding: docs/experiments.md). 0 = off.
    weight_strata: int = 10
    disc_steps: int = 400
    disc_lr: float = 1e-3
    disc_crop: int = 128
    disc_max_synthetic: int = 2000
    boundary_weight: float = 1.0
    # Self-training, label-free: after the synthetic training, this many steps more in which
    # ``self_training_share`` of each batch are the real tissue patches (real.npz, the discriminator's real class)
    # with the network's own instances as targets (8-view test-time augmentation, the shared instance
    # extraction); pixels whose foreground probability lies inside ``pseudo_label_band`` are left out.
    # 0 = off (docs/experiments.md).
    self_training_steps: int = 600
    self_training_lr: float = 5e-4
    self_training_share: float = 0.5
    pseudo_label_band: tuple[float, float] = (0.3, 0.7)
    stain_jitter: float = 0.15   # training augmentation: per-channel optical-density scale U(1 ± s)
    mpp: float = 0.5
    seed: int = 0
    num_workers: int = 0
    accelerator: str = "auto"

    def __post_init__(self):
        problems = [f"{name} = {getattr(self, name)!r}: {why}" for name, ok, why in self._rules()
                    if not ok]
        if problems:
            raise ValueError("invalid training parameters: " + "; ".join(problems))

    def _rules(self):
        """(field, holds, what it must be) for every setting with a limit; checked on construction so that
        nonsense fails at once with its name instead of training an empty or unweighted model."""
        low, high = self.weight_clip
        return [
            ("max_steps", self.max_steps >= 1, "at least 1 step (0 would write an untrained model)"),
            ("batch_size", self.batch_size >= 1, "at least 1"),
            ("lr", self.lr > 0, "positive"),
            ("base", self.base >= 1, "at least 1 channel"),
            ("depth", self.depth >= 1, "at least 1 downsampling (0 has no network to train)"),
            ("weight_clip", 0 < low <= high, "(low, high) with 0 < low <= high"),
            ("weight_strata", self.weight_strata >= 0, "0 (off) or a number of strata"),
            ("disc_steps", self.disc_steps >= 1, "at least 1"),
            ("disc_lr", self.disc_lr > 0, "positive"),
            ("disc_crop", self.disc_crop >= 16, "at least 16 pixels"),
            ("disc_max_synthetic", self.disc_max_synthetic >= 1, "at least 1 patch"),
            ("boundary_weight", self.boundary_weight >= 0, "0 or more"),
            ("self_training_steps", self.self_training_steps >= 0, "0 (off) or more"),
            ("self_training_lr", self.self_training_lr > 0, "positive"),
            ("self_training_share", 0 < self.self_training_share < 1, "a share of the batch in (0, 1)"),
            ("pseudo_label_band", 0 <= self.pseudo_label_band[0] <= 0.5 <= self.pseudo_label_band[1] <= 1,
             "(low, high) with 0 <= low <= 0.5 <= high <= 1"),
            ("stain_jitter", 0 <= self.stain_jitter < 1, "in [0, 1): optical density is scaled by U(1 ± s)"),
            ("mpp", self.mpp > 0, "a positive pixel size in µm"),
            ("num_workers", self.num_workers >= 0, "0 or more"),
        ]
