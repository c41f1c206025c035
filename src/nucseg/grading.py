"""QC parameters and grading: patch signals against their levels, slide grades and the grade table.

Shared by the qc stage (which measures the signals), aggregation (which re-grades stored signals with new
levels) and the report (which draws verdicts and the grade table), so none of them imports another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

GRADES = ("Best", "Good", "Adequate", "Problematic", "Unacceptable")

SIGNALS = ("disagreement", "entropy", "missed", "false", "shape")


@dataclass(frozen=True)
class QCParams:
    """What the qc stage measures (patches, resolution, TTA) and the levels it grades against (:data:`LEVELS`)."""

    n_patches: int = 50           # patches sampled per slide
    patch_um: float = 64.0        # patch edge
    mpp: float = 0.5              # resolution the stain-coverage check reads at
    hema_threshold: float = 0.04  # floor of the hematoxylin OD counted as nuclear stain (lower on faded slides)
    min_stain_fraction: float = 0.02
    min_recall: float = 0.35      # of stained area covered by nuclei
    min_precision: float = 0.30   # of nucleus area that is stained
    # Model-based signals: the network runs on each patch at its working resolution.
    tta: int = 4                  # test-time augmentations (1-8 dihedral transforms; 1 = none)
    context_um: float = 8.0       # read around each patch so the network sees no artificial border
    batch_size: int = 8
    device: str = "auto"
    max_disagreement: float = 0.5    # 1 - mean pairwise AJI of the TTA instance maps (AJI < 0.5: unstable)
    max_entropy: float = 0.5         # bits; mean binary entropy of the TTA-mean foreground probability
    area_range_um2: tuple = (10.0, 250.0)  # plausible nucleus area (lymphocyte fragment .. large tumour nucleus)
    min_solidity: float = 0.8        # below: ragged or merged outline
    max_shape_outliers: float = 0.5  # share of a patch's nuclei out of range (needs >= 3 nuclei)
    bad_score: float = 1.0           # a patch is bad when its score (largest signal/level ratio) exceeds this


# The grading levels: applied to stored signals, so changing them re-grades slides at aggregation
# without measuring anything again (the other QCParams fields decide what is measured).
LEVELS = ("max_disagreement", "max_entropy", "min_recall", "min_precision", "max_shape_outliers", "bad_score")


def grade(pct_bad: float | None, failed: bool = False) -> str:
    """TCIA grade from the percentage of bad patches (DESIGN.md thresholds)."""
    if failed or pct_bad is None or np.isnan(pct_bad):
        return "Unacceptable"
    if pct_bad <= 0:
        return "Best"
    if pct_bad <= 6.67:
        return "Good"
    if pct_bad <= 13.3:
        return "Adequate"
    if pct_bad <= 20:
        return "Problematic"
    return "Unacceptable"


SIGNAL_REASONS = {"disagreement": "unstable under augmentation", "entropy": "uncertain foreground",
                  "missed": "missed nuclei", "false": "nuclei on unstained tissue",
                  "shape": "implausible nucleus size/shape"}


def signal_ratios(signals: pd.DataFrame, params: QCParams) -> pd.DataFrame:
    """Each signal divided by the level at which it alone marks a patch bad (NaN signals count 0)."""
    levels = {"disagreement": params.max_disagreement, "entropy": params.max_entropy,
              "missed": 1 - params.min_recall, "false": 1 - params.min_precision,
              "shape": params.max_shape_outliers}
    return pd.DataFrame({k: pd.to_numeric(signals[k], errors="coerce").astype(float) / levels[k]
                         for k in SIGNALS}, index=signals.index).fillna(0.0)


def grade_patches(patches: pd.DataFrame, params: QCParams) -> pd.DataFrame:
    """The patches with ``score``, ``bad`` and ``reason`` (re)computed from their signals and the levels."""
    ratios = signal_ratios(patches, params)
    over = ratios > params.bad_score
    reasons = [", ".join(SIGNAL_REASONS[k] for k in SIGNALS if row[k]) for row in over.to_dict("records")]
    return patches.assign(score=ratios.max(axis=1) if len(ratios) else pd.Series(dtype=float),
                          bad=over.any(axis=1), reason=reasons)


def regrade(row: dict, patches: pd.DataFrame, params: QCParams) -> dict:
    """A slide's QC row with % bad patches and grade recomputed from its patches' signals."""
    row = dict(row)
    if row.get("status") == "ok" and len(patches):
        row["pct_bad_patches"] = float(100 * grade_patches(patches, params).bad.mean())
    row["grade"] = grade(as_float(row.get("pct_bad_patches")), failed=row.get("status") != "ok")
    return row


def as_float(value):
    """``value`` as a float; None where it is none (missing, empty or not a number)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def grade_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Slides per grade and cancer type (the release's Table 2 form)."""
    counts = pd.crosstab(table.cancer_type, pd.Categorical(table.grade, categories=GRADES))
    return counts.reindex(columns=list(GRADES), fill_value=0)
