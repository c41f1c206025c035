"""Segmentation QC per slide, slide grades, and aggregation into Parquet tables.

Per-patch check (label-free): in patches sampled over the tissue, compare the strongly
hematoxylin-stained area with the area covered by segmented nuclei. A patch is *bad* when most
hematoxylin mass is not covered by nuclei (missed nuclei) or most nucleus area lies on unstained
tissue (false nuclei). The slide's grade follows the TCIA release's thresholds on % bad patches.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from . import __version__, io
from .slides import SlideError, open_slide
from .synth import hematoxylin_od
from .tissue import seed_from

log = logging.getLogger(__name__)

GRADES = ("Best", "Good", "Adequate", "Problematic", "Unacceptable")

SLIDE_COLUMNS = ["slide_id", "cancer_type", "source", "status", "failure_stage", "failure_reason", "mpp",
                 "mpp_source", "width", "height", "tissue_area_mm2", "n_nuclei", "nuclei_per_mm2",
                 "n_patches_checked", "pct_bad_patches", "grade", "model_id", "nucseg_version",
                 "config_hash", "seconds_by_stage"]

PATCH_COLUMNS = ["x", "y", "size", "n_nuclei", "stain_fraction", "nuclei_fraction", "recall", "precision",
                 "bad", "reason"]


@dataclass
class QCParams:
    n_patches: int = 50           # patches sampled per slide
    patch_um: float = 64.0        # patch edge
    mpp: float = 0.5              # resolution the check reads at
    hema_threshold: float = 0.04  # floor of the hematoxylin OD counted as nuclear stain
    min_stain_fraction: float = 0.02
    min_recall: float = 0.35      # of stained area covered by nuclei
    min_precision: float = 0.30   # of nucleus area that is stained


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


def patch_verdict(image: np.ndarray, nuclei_mask: np.ndarray, params: QCParams) -> dict:
    """Stain-coverage statistics of one patch and whether its segmentation looks bad."""
    from skimage.filters import threshold_otsu

    hema = hematoxylin_od(image)
    # Stain levels differ between labs: split this patch's H at Otsu, never below the floor.
    otsu = float(threshold_otsu(hema)) if hema.max() > hema.min() else np.inf
    stain = hema > max(params.hema_threshold, otsu)
    stain = cv2.morphologyEx(stain.astype(np.uint8), cv2.MORPH_OPEN, np.ones((2, 2), np.uint8)) > 0
    n_stain, n_nuc = int(stain.sum()), int(nuclei_mask.sum())
    both = int((stain & nuclei_mask).sum())
    recall = both / n_stain if n_stain else np.nan
    precision = both / n_nuc if n_nuc else np.nan
    stain_fraction = n_stain / stain.size
    missed = stain_fraction >= params.min_stain_fraction and recall < params.min_recall
    false = n_nuc >= 0.005 * stain.size and precision < params.min_precision
    return {"stain_fraction": stain_fraction, "nuclei_fraction": n_nuc / stain.size, "recall": recall,
            "precision": precision, "bad": bool(missed or false),
            "reason": "missed nuclei" if missed else ("nuclei on unstained tissue" if false else "")}


def check_patches(slide_path, nuclei, tiles: pd.DataFrame, mpp: float, slide_id: str, backend: str,
                  params: QCParams) -> pd.DataFrame:
    """Sample patches over the tissue tiles and judge each (see :func:`patch_verdict`)."""
    if tiles.empty:
        return pd.DataFrame(columns=PATCH_COLUMNS)
    rng = np.random.default_rng(seed_from(slide_id))
    side0 = params.patch_um / mpp
    scale = mpp / params.mpp
    out = int(round(side0 * scale))
    rows = []
    picks = rng.choice(len(tiles), size=min(params.n_patches, len(tiles)), replace=False)
    sindex = nuclei.sindex
    with open_slide(slide_path, backend) as slide:
        for k in picks:
            t = tiles.iloc[int(k)]
            x = t.x + rng.uniform(0, max(0.0, t.w - side0))
            y = t.y + rng.uniform(0, max(0.0, t.h - side0))
            image = slide.read_scaled((x, y, side0, side0), scale, (out, out))
            hits = sindex.query(_box(x, y, side0), predicate="intersects")
            mask = np.zeros((out, out), np.uint8)
            for geom in nuclei.geometry.values[hits]:
                pts = (np.asarray(geom.exterior.coords) - (x, y)) * scale * 16
                cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, shift=4)
            rows.append({"x": int(x), "y": int(y), "size": int(side0), "n_nuclei": len(hits),
                         **patch_verdict(image, mask.astype(bool), params)})
    return pd.DataFrame(rows)


def _box(x, y, side):
    from shapely.geometry import box

    return box(x, y, x + side, y + side)


def slide_qc(wsi_json, nuclei_path, tiles_path, slide_path, out_json, out_patches, *, cancer_type: str,
             source: str = "", config_hash: str = "", backend: str = "tiffslide",
             params: QCParams = QCParams()) -> dict:
    """Grade one slide; write its row (``qc.json``) and patch verdicts (``qc_patches.parquet``)."""
    import geopandas as gpd

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
    seconds = {"tissue": facts.get("seconds"), "segment": _float(nuc_meta.get("seconds"))}
    patches = pd.DataFrame(columns=PATCH_COLUMNS)
    if facts["status"] == "ok":
        nuclei = gpd.read_parquet(nuclei_path)
        tiles = pd.read_parquet(tiles_path)
        row["n_nuclei"] = len(nuclei)
        area = facts["tissue_area_mm2"] or np.nan
        row["nuclei_per_mm2"] = len(nuclei) / area if area else None
        try:
            patches = check_patches(slide_path, nuclei, tiles, facts["mpp"], slide_id, backend, params)
        except SlideError as exc:
            row.update(status="failed", failure_stage="qc", failure_reason=str(exc))
        row["n_patches_checked"] = len(patches)
        row["pct_bad_patches"] = float(100 * patches.bad.mean()) if len(patches) else None
    else:
        row.update(n_nuclei=0, n_patches_checked=0)
    row["grade"] = grade(row["pct_bad_patches"], failed=row["status"] != "ok")
    seconds["qc"] = round(time.monotonic() - started, 3)
    row["seconds_by_stage"] = json.dumps(seconds)
    io.write_table(out_patches, patches, io.provenance(slide_id=slide_id))
    io.write_json(out_json, row)
    log.info("slide %s: grade %s (%s%% bad of %s patches, %s nuclei)", slide_id, row["grade"],
             None if row["pct_bad_patches"] is None else round(row["pct_bad_patches"], 2),
             row["n_patches_checked"], row["n_nuclei"])
    return row


def _float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def aggregate(qc_jsons: list, out_path, metadata: dict | None = None) -> pd.DataFrame:
    """Concatenate per-slide QC rows (``qc.json`` files or other aggregates' Parquet) into one table."""
    frames = []
    rows = []
    for path in qc_jsons:
        path = Path(path)
        if path.suffix == ".parquet":
            frames.append(pd.read_parquet(path))
        else:
            rows.append(io.read_json(path))
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


def grade_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Slides per grade and cancer type (the release's Table 2 form)."""
    counts = pd.crosstab(table.cancer_type, pd.Categorical(table.grade, categories=GRADES))
    return counts.reindex(columns=list(GRADES), fill_value=0)
