"""Metrics shared by evaluation, QC, training and the benchmarks.

Instance-segmentation metrics of two instance maps: AJI (Kumar et al. 2017), pixel Dice of the
foreground, PQ (one-to-one matching at IoU > 0.5; Kirillov et al. 2019), detection F1 at the same
matching, and object counts. And the area under the ROC curve of a score, as the benchmarks report it.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import mannwhitneyu


def _overlaps(true: np.ndarray, pred: np.ndarray):
    """Pairwise intersections (sparse) and the areas of each object."""
    t_ids, t_area = np.unique(true, return_counts=True)
    p_ids, p_area = np.unique(pred, return_counts=True)
    t_area_d = dict(zip(t_ids.tolist(), t_area.tolist(), strict=True))
    p_area_d = dict(zip(p_ids.tolist(), p_area.tolist(), strict=True))
    both = (true > 0) & (pred > 0)
    pairs, counts = np.unique(np.stack([true[both], pred[both]]), axis=1, return_counts=True)
    return pairs, counts, t_area_d, p_area_d


def instance_metrics(true: np.ndarray, pred: np.ndarray) -> dict:
    """AJI, Dice, PQ (with SQ, DQ), detection F1 and counts of two instance maps."""
    pairs, inter, t_area, p_area = _overlaps(true, pred)
    t_ids = [i for i in t_area if i != 0]
    p_ids = [i for i in p_area if i != 0]
    n_true, n_pred = len(t_ids), len(p_ids)
    fg_t, fg_p = true > 0, pred > 0
    denom = fg_t.sum() + fg_p.sum()
    dice = 2 * (fg_t & fg_p).sum() / denom if denom else 1.0
    iou = {}
    for (t, p), c in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        iou[(t, p)] = (c, c / (t_area[t] + p_area[p] - c))
    # AJI: each true object with its best-IoU prediction; unused predictions add to the union.
    best = {}
    for (t, p), (c, v) in iou.items():
        if t not in best or v > best[t][2]:
            best[t] = (p, c, v)
    inter_sum, union_sum, used = 0, 0, set()
    for t in t_ids:
        if t in best:
            p, c, _ = best[t]
            inter_sum += c
            union_sum += t_area[t] + p_area[p] - c
            used.add(p)
        else:
            union_sum += t_area[t]
    union_sum += sum(p_area[p] for p in p_ids if p not in used)
    aji = inter_sum / union_sum if union_sum else 1.0
    # IoU > 0.5 matches are unique in both directions.
    matched = [v for (c, v) in iou.values() if v > 0.5]
    tp = len(matched)
    fp, fn = n_pred - tp, n_true - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if (tp + fp + fn) else 1.0
    sq = float(np.mean(matched)) if matched else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0
    return {"aji": float(aji), "dice": float(dice), "pq": float(dq * sq), "sq": sq, "dq": float(dq), "f1": float(f1),
            "n_true": n_true, "n_pred": n_pred, "tp": tp, "fp": fp, "fn": fn}


def roc_auc(scores, labels) -> float | None:
    """Area under the ROC curve of ``scores`` for telling ``labels`` True (positive) from False.

    The Mann-Whitney U of the positives' scores over the negatives', divided by ``n_pos * n_neg``: the
    chance that a random positive scores above a random negative, ties counting half. NaN scores
    count as 0.

    Returns
    -------
    float or None
        None without both classes (the AUC is undefined).
    """
    scores, labels = np.nan_to_num(np.asarray(scores, float)).ravel(), np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return None
    return float(mannwhitneyu(scores[labels], scores[~labels]).statistic / (n_pos * n_neg))


def two_sample_auc(positive, negative) -> float | None:
    """:func:`roc_auc` of two samples of scores: ``positive`` (e.g. real) against ``negative`` (synthetic)."""
    positive, negative = np.asarray(positive, float).ravel(), np.asarray(negative, float).ravel()
    labels = np.r_[np.ones(positive.size, bool), np.zeros(negative.size, bool)]
    return roc_auc(np.r_[positive, negative], labels)
