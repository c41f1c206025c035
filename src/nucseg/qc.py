"""Segmentation QC per slide, slide grades, and aggregation into Parquet tables.

Per-patch check (label-free). In ``n_patches`` patches sampled over the tissue, the signals declared in
:data:`nucseg.grading.QC_SIGNALS` are measured (:func:`patch_signals`: agreement of the nucleus instances
under test-time augmentation, foreground entropy, stained area missed, nuclei on unstained tissue,
implausible shapes), each divided by the level at which it alone marks the patch bad (a :class:`QCParams`
field). The instance-level agreement replaced the foreground-mask Dice between augmentations, which stays
near 1 even where nuclei are merged or split.

The patch's badness ``score`` is the largest of these ratios (the checks are OR-ed: any one beyond its
level is enough), and the patch is *bad* when ``score > bad_score`` (1.0). Neither the levels nor the
combination were fitted to annotated data; ``benchmarks/qc_validity.py`` only measures how well the
score separates patches with poor AJI against manual annotations. The slide's grade follows the TCIA
release's thresholds on % bad patches.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import torch
from shapely.geometry import box
from skimage.filters import threshold_otsu

from . import __version__, io
from .grading import SIGNALS, QCParams, as_float, grade, grade_patches, regrade
from .inference import image_instances, view_probabilities
from .instances import GATE_UNITS, InstanceParams
from .metrics import instance_metrics
from .model import load_weights, resolve_device
from .report import slide_overlay
from .slides import SlideError, open_slide
from .stain import hematoxylin_od
from .tissue import seed_from

log = logging.getLogger(__name__)

SLIDE_COLUMNS = ["slide_id", "cancer_type", "source", "status", "failure_stage", "failure_reason", "mpp",
                 "mpp_source", "width", "height", "tissue_area_mm2", "n_nuclei", "nuclei_per_mm2",
                 "n_patches_checked", "pct_bad_patches", "grade", "model_id", "nucseg_version",
                 "config_hash", "seconds_by_stage"]

PATCH_COLUMNS = ["x", "y", "size", "n_nuclei", "stain_fraction", "nuclei_fraction", "recall", "precision",
                 *SIGNALS, "score", "bad", "reason"]


# ---------------------------------------------------------------- per-patch signals (pure functions)

def stain_mask(image: np.ndarray, hema_threshold: float) -> np.ndarray:
    """Strongly hematoxylin-stained pixels: this patch's H split at Otsu, never below ``hema_threshold``."""
    hema = hematoxylin_od(image)
    # Stain levels differ between labs: a per-patch threshold, with a floor for patches without nuclei.
    otsu = float(threshold_otsu(hema)) if hema.max() > hema.min() else np.inf
    stain = hema > max(hema_threshold, otsu)
    return cv2.morphologyEx(stain.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0


def stain_floor(params: QCParams, hematoxylin_level: float | None = None) -> float:
    """The least hematoxylin OD counted as nuclear stain: ``hema_threshold``, lowered to the slide's
    hematoxylin level where that is below it.

    The floor keeps a nucleus-free patch's Otsu split from calling noise stain. On a faded slide whole
    nuclei lie below a fixed floor (hematoxylin at a third: the slide's level 0.015-0.03 OD instead of
    0.045-0.09), and every correctly segmented nucleus would count as "on unstained tissue".
    """
    if hematoxylin_level is None:
        return params.hema_threshold
    return min(params.hema_threshold, hematoxylin_level)


def stain_coverage(image: np.ndarray, nuclei_mask: np.ndarray, params: QCParams,
                   hema_floor: float | None = None) -> dict:
    """How the segmented nuclei cover one patch's nuclear stain, and the ``missed`` and ``false`` signals.

    ``hema_floor``: the least OD counted as stain (:func:`stain_floor`; default ``params.hema_threshold``).
    ``missed`` is 0 on a patch with less than ``min_stain_fraction`` stain, ``false`` on one whose nuclei
    cover less than 0.5 % of it: too little to judge.
    """
    stain = stain_mask(image, params.hema_threshold if hema_floor is None else hema_floor)
    n_stain, n_nuc = int(stain.sum()), int(nuclei_mask.sum())
    both = int((stain & nuclei_mask).sum())
    recall = both / n_stain if n_stain else np.nan
    precision = both / n_nuc if n_nuc else np.nan
    stain_fraction, nuclei_fraction = n_stain / stain.size, n_nuc / stain.size
    missed = 1 - recall if stain_fraction >= params.min_stain_fraction else 0.0
    false = 1 - precision if nuclei_fraction >= 0.005 else 0.0
    return {"stain_fraction": stain_fraction, "nuclei_fraction": nuclei_fraction, "recall": recall,
            "precision": precision, "missed": float(np.nan_to_num(missed)), "false": float(np.nan_to_num(false))}


def tta_disagreement(probs: np.ndarray, mpp_work: float, instance_params: InstanceParams | None = None,
                     image: np.ndarray | None = None, level: float | None = None) -> float:
    """1 − mean pairwise AJI of the instance maps of ``probs`` ``(K, C, H, W)`` (TTA predictions).

    Instances are extracted exactly as the segment stage does (:func:`nucseg.inference.image_instances`),
    so the signal measures what the grade judges: whether the *nuclei* (not only the foreground) stay
    the same when the input is flipped or rotated. With one prediction there is nothing to compare, and
    with fewer than 3 nuclei in every prediction too little to judge (one speck found or not in glass
    or stroma would swing AJI from 1 to 0): both give 0. ``image``, ``level``: the patch and the slide's
    gate level, needed when ``instance_params.hematoxylin_gate``, as in the segment stage.
    """
    if len(probs) < 2:
        return 0.0
    params = instance_params or InstanceParams()
    hema = hematoxylin_od(image) if params.hematoxylin_gate else None
    maps = [image_instances(image, p, mpp_work, params, level, hematoxylin=hema) for p in probs]
    if max(int(m.max()) for m in maps) < 3:
        return 0.0
    ajis = [instance_metrics(maps[i], maps[j])["aji"] for i in range(len(maps)) for j in range(i + 1, len(maps))]
    return float(1.0 - np.mean(ajis))


def foreground_entropy(foreground: np.ndarray, region: np.ndarray) -> float:
    """Mean binary entropy (bits) of the TTA-mean foreground probability over ``region`` (0 if empty)."""
    p = np.clip(foreground.mean(0)[region], 1e-6, 1 - 1e-6)
    if not p.size:
        return 0.0
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


def shape_outliers(areas_um2: np.ndarray, solidity: np.ndarray, params: QCParams) -> float:
    """Share of nuclei with implausible area or solidity (0 when fewer than 3 nuclei: too few to judge)."""
    areas_um2, solidity = np.asarray(areas_um2, float), np.asarray(solidity, float)
    if len(areas_um2) < 3:
        return 0.0
    lo, hi = params.area_range_um2
    odd = (areas_um2 < lo) | (areas_um2 > hi) | (solidity < params.min_solidity)
    return float(odd.mean())


def _resize_to(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask resampled by ``factor`` (area averaging when shrinking; mask majority)."""
    if abs(factor - 1) < 1e-3:
        return image, mask
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    small = cv2.resize(image, size, interpolation=interp)
    small_mask = cv2.resize(mask.astype(np.float32), size, interpolation=interp) > 0.5
    return small, small_mask


def patch_signals(image: np.ndarray, probs: np.ndarray | None, nuclei_mask: np.ndarray,
                  areas_um2: np.ndarray, solidity: np.ndarray, params: QCParams,
                  mpp_work: float = 0.25, hematoxylin_level: float | None = None, gate_unit: str = "pixel") -> dict:
    """All QC signals of one patch, its badness score and verdict.

    Parameters
    ----------
    image : ndarray (S, S, 3) uint8
        The patch at the model's working resolution ``mpp_work``.
    probs : ndarray (K, C, S, S) or None
        The network's probabilities (foreground first) of the K test-time augmentations, mapped back
        onto the patch.
        None: the model signals are not measured (NaN, no contribution to the score).
    nuclei_mask : ndarray (S, S) bool
        Pixels covered by the segmented nuclei.
    areas_um2, solidity : array-like
        Features of the segmented nuclei whose centroid lies in the patch.
    hematoxylin_level : float or None
        The slide's hematoxylin gate level, so the TTA instances are extracted as the segment stage's
        (:func:`nucseg.instances.hematoxylin_gate`), and the stain floor of a faded slide is lowered to
        it (:func:`stain_floor`); None: ungated.
    gate_unit : str
        The gate's unit the segment stage used (``pixel`` or ``nucleus``, :func:`nucseg.instances.gate_unit_for`;
        ``off``: no gate, the level only lowers the stain floor).
    """
    floor = stain_floor(params, hematoxylin_level)
    small, small_mask = _resize_to(image, nuclei_mask, mpp_work / params.mpp)
    out = stain_coverage(small, small_mask, params, floor)
    out.update(shape=shape_outliers(areas_um2, solidity, params), disagreement=np.nan, entropy=np.nan)
    if probs is not None:
        fg = probs[:, 0]
        region = (fg > 0.5).any(0) | stain_mask(image, floor)
        gated = hematoxylin_level is not None and gate_unit != "off"
        inst = InstanceParams(hematoxylin_gate=gated, gate_unit=gate_unit if gated else "pixel")
        out.update(disagreement=tta_disagreement(probs, mpp_work, inst, image, hematoxylin_level),
                   entropy=foreground_entropy(fg, region))
    out.update(grade_patches(pd.DataFrame([out]), params).iloc[0][["score", "bad", "reason"]].to_dict())
    return out


# ---------------------------------------------------------------- one slide

def check_patches(slide_path, nuclei, tiles: pd.DataFrame, mpp: float, slide_id: str, backend: str,
                  params: QCParams, model=None, device=None, mpp_work: float = 0.25,
                  hematoxylin_level: float | None = None, gate_unit: str = "pixel") -> pd.DataFrame:
    """Sample patches over the tissue tiles and judge each (see :func:`patch_signals`).

    ``hematoxylin_level``, ``gate_unit``: the slide's gate level (None: no gate) and unit the segment
    stage used.

    Patches are read at the model's working resolution on the same global grid the segment stage reads
    (:meth:`nucseg.slides.Slide.read_grid`), with ``context_um`` around them for the network.
    """
    if tiles.empty:
        return pd.DataFrame(columns=PATCH_COLUMNS)
    rng = np.random.default_rng(seed_from(slide_id))
    scale = mpp / mpp_work                      # working px per level-0 px
    size = max(8, round(params.patch_um / mpp_work))
    margin = round(params.context_um / mpp_work) if model is not None else 0
    side0 = size / scale
    picks = rng.choice(len(tiles), size=min(params.n_patches, len(tiles)), replace=False)
    sindex = nuclei.sindex
    cx, cy = nuclei.centroid_x.to_numpy(), nuclei.centroid_y.to_numpy()
    areas, solidity = nuclei.area_um2.to_numpy(), nuclei.solidity.to_numpy()
    geoms = nuclei.geometry.values
    origins, images, masks, feats = [], [], [], []
    with open_slide(slide_path, backend) as slide:
        for k in picks:
            t = tiles.iloc[int(k)]
            x = t.x + rng.uniform(0, max(0.0, t.w - side0))
            y = t.y + rng.uniform(0, max(0.0, t.h - side0))
            ox, oy = round(x * scale), round(y * scale)
            images.append(slide.read_grid((ox - margin, oy - margin), (size + 2 * margin,) * 2, scale))
            x0, y0 = ox / scale, oy / scale
            hits = sindex.query(_box(x0, y0, side0), predicate="intersects")
            mask = np.zeros((size, size), np.uint8)
            for geom in geoms[hits]:
                pts = (np.asarray(geom.exterior.coords) * scale - (ox, oy)) * 16
                cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, shift=4)
            inside = hits[(cx[hits] >= x0) & (cx[hits] < x0 + side0) & (cy[hits] >= y0) & (cy[hits] < y0 + side0)]
            origins.append((int(x0), int(y0), len(hits)))
            masks.append(mask.astype(bool))
            feats.append((areas[inside], solidity[inside]))
    images = np.stack(images)
    probs = None
    if model is not None:
        probs = view_probabilities(model, images, device, params.tta, params.batch_size)
        probs = probs[..., margin:margin + size, margin:margin + size]
        images = images[:, margin:margin + size, margin:margin + size]
    rows = []
    for i, (x0, y0, n) in enumerate(origins):
        signals = patch_signals(images[i], None if probs is None else probs[i], masks[i], *feats[i], params,
                                mpp_work, hematoxylin_level, gate_unit)
        rows.append({"x": x0, "y": y0, "size": int(round(side0)), "n_nuclei": n, **signals})
    return pd.DataFrame(rows).reindex(columns=PATCH_COLUMNS)


def _box(x, y, side):
    return box(x, y, x + side, y + side)


def slide_qc(wsi_json, nuclei_path, tiles_path, slide_path, out_json, out_patches, *, cancer_type: str,
             source: str = "", config_hash: str = "", backend: str = "auto",
             params: QCParams = QCParams(), weights=None, tissue_path=None, out_overlay=None) -> dict:
    """Grade one slide; write its row (``qc.json``) and patch verdicts (``qc_patches.parquet``).

    Parameters
    ----------
    weights : path, optional
        Model weights for the model-based signals (TTA disagreement, entropy); without them only the
        stain-coverage and shape signals are measured.
    tissue_path, out_overlay : path, optional
        With ``out_overlay``, also write a thumbnail with the tissue outline (from ``tissue_path``),
        the nuclei and the checked patches (red: bad) for the report.
    """
    started = time.monotonic()
    facts = io.read_json(wsi_json)
    slide_id = facts["slide_id"]
    nuc_meta = io.read_provenance(nuclei_path)
    row = {c: None for c in SLIDE_COLUMNS}
    row.update(slide_id=slide_id, cancer_type=cancer_type, source=source, status=facts["status"],
               failure_stage=facts.get("failure_stage"), failure_reason=facts.get("failure_reason"),
               mpp=facts.get("mpp"), mpp_source=facts.get("mpp_source"), width=facts.get("width"),
               height=facts.get("height"), tissue_area_mm2=facts.get("tissue_area_mm2", 0.0),
               model_id=nuc_meta.get("model_id"), nucseg_version=__version__, config_hash=config_hash)
    if facts["status"] == "ok" and nuc_meta.get("status") == "failed":  # recorded by the segment stage
        row.update(status="failed", failure_stage=nuc_meta.get("failure_stage", "segment"),
                   failure_reason=nuc_meta.get("failure_reason"))
    seconds = {"tissue": facts.get("seconds"), "segment": as_float(nuc_meta.get("seconds"))}
    patches = pd.DataFrame(columns=PATCH_COLUMNS)
    nuclei = None
    model_id = None
    if row["status"] == "ok":
        nuclei = gpd.read_parquet(nuclei_path)
        tiles = pd.read_parquet(tiles_path)
        row["n_nuclei"] = len(nuclei)
        area = facts["tissue_area_mm2"] or np.nan
        row["nuclei_per_mm2"] = len(nuclei) / area if area else None
        model, device, mpp_work = None, None, float(facts.get("mpp_work") or 0.25)
        if weights is not None:
            device = resolve_device(params.device)
            model, meta = load_weights(weights, device)
            if device.type == "cpu":
                model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
            mpp_work, model_id = float(meta.get("mpp", mpp_work)), meta["model_id"]
        try:
            # Nuclei files written before the gate had a unit were gated by pixel.
            unit = nuc_meta.get("gate_unit") if nuc_meta.get("gate_unit") in (*GATE_UNITS, "off") else "pixel"
            patches = check_patches(slide_path, nuclei, tiles, facts["mpp"], slide_id, backend, params, model,
                                    device, mpp_work, as_float(nuc_meta.get("hematoxylin_level")), unit)
        except SlideError as exc:
            row.update(status="failed", failure_stage="qc", failure_reason=str(exc))
        except Exception as exc:  # this slide's problem: recorded, so its cohort's tables are still built
            log.error("slide %s: QC failed: %s: %s", slide_id, type(exc).__name__, exc)
            row.update(status="failed", failure_stage="qc", failure_reason=f"{type(exc).__name__}: {exc}")
        row["n_patches_checked"] = len(patches)
        row["pct_bad_patches"] = float(100 * patches.bad.mean()) if len(patches) else None
    else:
        row.update(n_nuclei=0, n_patches_checked=0)
    row["grade"] = grade(row["pct_bad_patches"], failed=row["status"] != "ok")
    io.write_table(out_patches, patches, io.provenance(slide_id=slide_id, qc_model_id=model_id,
                                                       qc_params=json.dumps(vars(params))))
    if out_overlay is not None:
        io.write_png(out_overlay, slide_overlay(slide_path, nuclei, patches, tissue_path, backend))
    seconds["qc"] = round(time.monotonic() - started, 3)
    row["seconds_by_stage"] = json.dumps(seconds)
    io.write_json(out_json, row)
    log.info("slide %s: grade %s (%s%% bad of %s patches, %s nuclei) in %.1f s", slide_id, row["grade"],
             None if row["pct_bad_patches"] is None else round(row["pct_bad_patches"], 2),
             row["n_patches_checked"], row["n_nuclei"], seconds["qc"])
    return row


def aggregate(qc_jsons: list, out_path, metadata: dict | None = None, levels: QCParams | None = None) -> pd.DataFrame:
    """Concatenate per-slide QC rows (``qc.json`` files or other aggregates' Parquet) into one table.

    With ``levels``, each ``qc.json`` row is re-graded (:func:`regrade`) from the patch signals in the
    ``qc_patches.parquet`` beside it, so new grading levels need no new measurement.
    """
    frames = []
    rows = []
    for path in qc_jsons:
        path = Path(path)
        if path.suffix == ".parquet":
            frames.append(pd.read_parquet(path))
            continue
        row = io.read_json(path)
        if levels is not None:
            beside = path.with_name("qc_patches.parquet")
            patches = pd.read_parquet(beside) if row.get("status") == "ok" else pd.DataFrame(columns=PATCH_COLUMNS)
            row = regrade(row, patches, levels)
        rows.append(row)
    if rows:
        frames.append(pd.DataFrame(rows))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SLIDE_COLUMNS)
    table = table.reindex(columns=SLIDE_COLUMNS)
    for col in ("mpp", "tissue_area_mm2", "nuclei_per_mm2", "pct_bad_patches"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("float64")
    for col in ("width", "height", "n_nuclei", "n_patches_checked"):
        table[col] = pd.to_numeric(table[col], errors="coerce").astype("Int64")
    for col in set(SLIDE_COLUMNS) - {"mpp", "tissue_area_mm2", "nuclei_per_mm2", "pct_bad_patches",
                                     "width", "height", "n_nuclei", "n_patches_checked"}:
        table[col] = table[col].astype("string")
    table = table.sort_values(["cancer_type", "slide_id"], ignore_index=True)
    io.write_table(out_path, table, io.provenance(**(metadata or {})))
    return table


