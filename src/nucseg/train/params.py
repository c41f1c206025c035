"""Training parameters (kept free of heavy imports: the CLI builds its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainParams:
    max_steps: int = 2000
    batch_size: int = 8
    lr: float = 2e-3
    base: int = 16
    depth: int = 3
    weighted: bool = True
    weight_clip: tuple[float, float] = (0.2, 2.0)
    weight_power: float = 1.0    # w ** power after clipping; < 1 flattens the weights (docs/experiments.md)
    # > 1: divide each weight by the mean weight of its patch's stratum of nucleus-pixel fraction (this many
    # quantile bins), so the weights reorder patches of like crowding but no longer favour sparse patches as
    # a whole (the discriminator's P(real) falls with crowding: docs/experiments.md). 0 = off.
    weight_strata: int = 0
    # > 1: split each stratum of crowding again into this many quantile bins of nucleus contrast (background
    # minus nucleus grey level): within strata of crowding the discriminator finds faint nuclei the least real,
    # and faint nuclei are those the network misses on real tissue (docs/experiments.md). 0 = off.
    contrast_strata: int = 0
    disc_steps: int = 300
    disc_lr: float = 1e-3
    disc_crop: int = 128
    disc_max_synthetic: int = 2000
    # Off by default (the paper's in-sample scoring): on, they spread the weights (33 % at the floor instead
    # of 53-85 %) but the model segmented real tiles worse (docs/experiments.md).
    disc_folds: int = 1          # > 1: cross-fitting, each synthetic patch scored by a discriminator that never saw it
    disc_augment: bool = False   # random flips / quarter turns of the discriminator's training patches
    disc_downsample: int = 1     # > 1: the discriminator judges patches averaged over k x k pixels (composition only)
    boundary_weight: float = 1.0
    # A third output, the centre map (docs/experiments.md). Off by default: on clean tiles it tied
    # with the boundary-only model, on blurred ones it segmented clearly worse.
    center_head: bool = False
    # Save the mean of the network's weights over the last ``average_last`` share of the steps instead of the
    # last step's (0 = off). Off by default: measured, worse on real tiles than the last iterate (docs/experiments.md).
    average_last: float = 0.0
    # Output-space domain adaptation (Tsai et al., 2018; gradient reversal, Ganin & Lempitsky, 2015): > 0 adds a
    # discriminator telling the network's outputs on real tissue crops (the discriminator's real patches) from
    # those on synthetic patches, whose reversed gradient, scaled by this weight, makes outputs on real tissue
    # look like outputs on synthetic tissue. Off (0) by default: measured, the network then called far more of
    # real tissue nucleus and segmented it worse (docs/experiments.md, "Tried and not adopted").
    adapt_weight: float = 0.0
    adapt_real_batch: int = 16
    # Task-adversarial hard examples (Hou et al., 2019): this share of each batch gets the stain and focus change,
    # within fixed realistic bounds, that most raises the network's loss on it (one signed-gradient step;
    # ~1.4x the time per step at 0.5). 0 = off: measured, a tie with the gate and worse without it
    # (docs/experiments.md).
    hard_examples: float = 0.0
    # Self-training, label-free: after the synthetic training, this many steps more in which
    # ``self_training_share`` of each batch are the real tissue patches (real.npz, the discriminator's real class)
    # with the network's own instances as targets (8-view test-time augmentation, the shared instance
    # extraction); pixels whose foreground probability lies inside ``pseudo_label_band`` are left out.
    # 0 = off (docs/experiments.md).
    self_training_steps: int = 0
    self_training_lr: float = 5e-4
    self_training_share: float = 0.5
    pseudo_label_band: tuple[float, float] = (0.3, 0.7)
    stain_jitter: float = 0.15   # training augmentation: per-channel optical-density scale U(1 ± s)
    mpp: float = 0.25
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
            ("weight_power", self.weight_power >= 0, "0 or more"),
            ("weight_strata", self.weight_strata >= 0, "0 (off) or a number of strata"),
            ("contrast_strata", self.contrast_strata >= 0 and (self.contrast_strata <= 1 or self.weight_strata > 1),
             "0 (off), or a number of bins within the strata of weight_strata, which must then be > 1"),
            ("disc_steps", self.disc_steps >= 1, "at least 1"),
            ("disc_lr", self.disc_lr > 0, "positive"),
            ("disc_crop", self.disc_crop >= 16, "at least 16 pixels"),
            ("disc_max_synthetic", self.disc_max_synthetic >= 1, "at least 1 patch"),
            ("disc_folds", self.disc_folds >= 1, "at least 1"),
            ("disc_downsample", self.disc_downsample >= 1, "at least 1 (1 = full resolution)"),
            ("boundary_weight", self.boundary_weight >= 0, "0 or more"),
            ("average_last", 0 <= self.average_last < 1, "a share of the steps in [0, 1)"),
            ("adapt_weight", self.adapt_weight >= 0, "0 (off) or more"),
            ("adapt_real_batch", self.adapt_real_batch >= 1, "at least 1"),
            ("hard_examples", 0 <= self.hard_examples <= 1, "a share of the batch in [0, 1]"),
            ("self_training_steps", self.self_training_steps >= 0, "0 (off) or more"),
            ("self_training_lr", self.self_training_lr > 0, "positive"),
            ("self_training_share", 0 < self.self_training_share < 1, "a share of the batch in (0, 1)"),
            ("pseudo_label_band", 0 <= self.pseudo_label_band[0] <= 0.5 <= self.pseudo_label_band[1] <= 1,
             "(low, high) with 0 <= low <= 0.5 <= high <= 1"),
            ("stain_jitter", 0 <= self.stain_jitter < 1, "in [0, 1): optical density is scaled by U(1 ± s)"),
            ("mpp", self.mpp > 0, "a positive pixel size in µm"),
            ("num_workers", self.num_workers >= 0, "0 or more"),
        ]
