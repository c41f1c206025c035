"""QC parameters and grading: patch signals against their levels, slide grades and the grade table.

Shared by the qc stage (which measures the signals), aggregation (which re-grades stored signals with new
levels) and the report (which draws verdicts and the grade table), so none of them imports another.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

GRADES = ("Best", "Good", "Adequate", "Problematic", "Unacceptable")

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


@dataclass(frozen=True)
class Signal:
    """A per-patch QC signal, declared once: everything else (the patch table's columns, the grading levels,
    re-grading, the workflow's list of levels, the docs' table) is derived from :data:`QC_SIGNALS`.

    Attributes
    ----------
    name : str
        The ``qc_patches.parquet`` column (measured by :func:`nucseg.qc.patch_signals`).
    level_key : str
        The :class:`QCParams` field setting the level at which the signal alone marks a patch bad.
    reason : str
        What a patch bad by this signal is called (its ``reason``).
    description : str
        How the signal is measured (docs/qc.md's table).
    complement : bool
        The level is 1 − the field (the field is a minimum share, the signal the share missing).
    """

    name: str
    level_key: str
    reason: str
    description: str
    complement: bool = False

    def level(self, params: QCParams) -> float:
        """The signal's level under ``params``."""
        value = float(getattr(params, self.level_key))
        return 1 - value if self.complement else value


QC_SIGNALS = (
    Signal("disagreement", "max_disagreement", "unstable under augmentation",
           "1 − mean pairwise AJI of the nucleus instances found under the augmentations (same instance "
           "extraction as the segment stage; 0 when every map has < 3 nuclei)"),
    Signal("entropy", "max_entropy", "uncertain foreground",
           "mean binary entropy (bits) of the augmentation-averaged foreground probability over nucleus-ish "
           "pixels (stained or predicted foreground)"),
    Signal("missed", "min_recall", "missed nuclei",
           "1 − share of the strongly hematoxylin-stained area covered by the segmented nuclei (patches with "
           "≥ `min_stain_fraction` stain)", complement=True),
    Signal("false", "min_precision", "nuclei on unstained tissue",
           "1 − share of the segmented nucleus area that is stained", complement=True),
    Signal("shape", "max_shape_outliers", "implausible nucleus size/shape",
           "share of the patch's segmented nuclei with area outside `area_range_um2` or solidity < "
           "`min_solidity`; 0 below 3 nuclei"),
)
SIGNALS = tuple(s.name for s in QC_SIGNALS)

# The grading levels: applied to stored signals, so changing them re-grades slides at aggregation
# without measuring anything again (the other QCParams fields decide what is measured).
LEVELS = (*(s.level_key for s in QC_SIGNALS), "bad_score")


def signals_table(params: QCParams = QCParams()) -> str:
    """The signals as docs/qc.md's Markdown table (a test keeps the page equal to it)."""
    rows = ["| signal (`qc_patches.parquet` column) | what | level |", "|---|---|---|"]
    for s in QC_SIGNALS:
        value = getattr(params, s.level_key)
        level = f"1 − `{s.level_key}` = {s.level(params):.2f}" if s.complement else f"`{s.level_key}` {value}"
        rows.append(f"| `{s.name}` | {s.description} | {level} |")
    return "\n".join(rows)


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


def signal_ratios(signals: pd.DataFrame, params: QCParams) -> pd.DataFrame:
    """Each signal divided by the level at which it alone marks a patch bad (NaN signals count 0)."""
    return pd.DataFrame({s.name: pd.to_numeric(signals[s.name], errors="coerce").astype(float) / s.level(params)
                         for s in QC_SIGNALS}, index=signals.index).fillna(0.0)


def grade_patches(patches: pd.DataFrame, params: QCParams) -> pd.DataFrame:
    """The patches with ``score``, ``bad`` and ``reason`` (re)computed from their signals and the levels."""
    ratios = signal_ratios(patches, params)
    over = ratios > params.bad_score
    reasons = [", ".join(s.reason for s in QC_SIGNALS if row[s.name]) for row in over.to_dict("records")]
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
