"""Figures for the Snakemake report: per-slide QC overlays, cohort histograms, the grade table.

Drawn with OpenCV (no plotting library needed): every figure is a PNG, the grade table an HTML page.
``nucseg report-figures {histograms,thumbnails,grades}`` writes them; the ``report_*`` rules of
``workflow/rules/qc.smk`` call it and hand the outputs to ``snakemake --report``.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from . import io
from .grading import GRADES, QCParams, grade_patches, grade_summary
from .slides import SlideError, open_slide

FONT = cv2.FONT_HERSHEY_SIMPLEX
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
GRADE_COLOURS = {"Best": (26, 152, 80), "Good": (145, 207, 96), "Adequate": (254, 224, 139),
                 "Problematic": (252, 141, 89), "Unacceptable": (215, 48, 39)}


def ascii_text(text) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return (str(text).replace("µ", "u").replace("²", "2").replace("–", "-").replace("≤", "<=")
            .encode("ascii", "replace").decode())


def _put(img, text, org, scale=0.5, colour=(0, 0, 0), thickness=1):
    cv2.putText(img, ascii_text(text), (int(org[0]), int(org[1])), FONT, scale, colour, thickness, cv2.LINE_AA)


# ---------------------------------------------------------------- per-slide overlay (written by the qc stage)

def slide_overlay(slide_path, nuclei=None, patches: pd.DataFrame | None = None, tissue_path=None,
                  backend: str = "auto", max_side: int = 1024) -> np.ndarray:
    """Thumbnail of a slide with its tissue outline (green), nuclei (yellow) and checked patches (cyan).

    Verdicts are not drawn here: they depend on the grading levels applied at aggregation, so
    :func:`annotate_overlay` adds them (and the header) when the report is made. Nuclei are drawn as
    outlines when they are at least a few thumbnail pixels wide, else as a density wash. A slide that
    cannot be read gives a grey card.
    """
    try:
        with open_slide(slide_path, backend) as slide:
            w, h = slide.dimensions
            scale = min(1.0, max_side / max(w, h))
            image = slide.read_scaled((0, 0, w, h), scale, (max(1, round(w * scale)), max(1, round(h * scale))))
            scale = image.shape[1] / w
    except (SlideError, OSError, ValueError):
        body = np.full((360, 640, 3), 200, np.uint8)
        _put(body, "slide not readable", (20, 60), 0.8, (60, 60, 60), 2)
        return body
    body = image.copy()
    if tissue_path is not None and Path(tissue_path).is_file():
        _draw_tissue(body, tissue_path, scale)
    if nuclei is not None and len(nuclei):
        _draw_nuclei(body, nuclei, scale)
    _draw_patches(body, patches, scale, (0, 200, 230), 1)
    if body.shape[1] < 512:  # tiny slides: enlarge so the overlay is readable
        f = 512 / body.shape[1]
        body = cv2.resize(body, (512, max(1, round(body.shape[0] * f))), interpolation=cv2.INTER_NEAREST)
    return body


def annotate_overlay(body: np.ndarray, row: dict, patches: pd.DataFrame | None = None) -> np.ndarray:
    """A :func:`slide_overlay` with the bad patches outlined red and a header: slide, grade, % bad, failure.

    ``patches`` carry their verdicts (``bad``); ``row`` is the slide's QC row (``width`` in level-0 px
    places the patches on the thumbnail).
    """
    body = body.copy()
    width = row.get("width")
    if patches is not None and len(patches) and pd.notna(width) and width:
        _draw_patches(body, patches[patches.bad.astype(bool)], body.shape[1] / float(width), (230, 0, 0), 2)
    return np.vstack([_header(row, body.shape[1]), body])


def _draw_patches(img, patches, scale, colour, thickness):
    for p in (patches.itertuples() if patches is not None else ()):
        x0, y0 = round(p.x * scale), round(p.y * scale)
        x1, y1 = round((p.x + p.size) * scale), round((p.y + p.size) * scale)
        cv2.rectangle(img, (x0, y0), (max(x0 + 2, x1), max(y0 + 2, y1)), colour, thickness)


def _draw_tissue(img, tissue_path, scale):
    for poly in gpd.read_parquet(tissue_path).geometry.values:
        for ring in [poly.exterior, *poly.interiors]:
            pts = np.round(np.asarray(ring.coords) * scale * 16).astype(np.int32)
            cv2.polylines(img, [pts], True, (0, 200, 0), 2, cv2.LINE_AA, shift=4)


def _draw_nuclei(img, nuclei, scale, limit: int = 200_000):
    h, w = img.shape[:2]
    sample = np.asarray(nuclei.geometry.values[:1000])
    bounds = shapely.bounds(sample)
    size_px = float(np.median(bounds[:, 2] - bounds[:, 0])) * scale
    if size_px >= 4 and len(nuclei) <= limit:  # nuclei a few px wide: their outlines are readable
        rings = [np.round(np.asarray(g.exterior.coords) * scale * 16).astype(np.int32) for g in nuclei.geometry.values]
        cv2.polylines(img, rings, True, (255, 220, 0), 1, cv2.LINE_AA, shift=4)
        return
    # Else a density wash: many nuclei per thumbnail pixel.
    x = np.clip((nuclei.centroid_x.to_numpy() * scale).astype(int), 0, w - 1)
    y = np.clip((nuclei.centroid_y.to_numpy() * scale).astype(int), 0, h - 1)
    density = np.zeros((h, w), np.float32)
    np.add.at(density, (y, x), 1.0)
    density = cv2.GaussianBlur(density, (0, 0), 1.5)
    top = np.percentile(density[density > 0], 95) if (density > 0).any() else 1.0
    alpha = np.clip(density / top, 0, 1)[..., None] * 0.6
    img[:] = (img * (1 - alpha) + np.array([255, 220, 0]) * alpha).astype(np.uint8)


def _header(row: dict, width: int) -> np.ndarray:
    grade = row.get("grade") or "?"
    pct = row.get("pct_bad_patches")
    lines = [f"{row.get('cancer_type')} / {row.get('slide_id')}   grade: {grade}",
             "bad patches: " + ("-" if pct is None or pct != pct else f"{pct:.1f} % of {row.get('n_patches_checked')}")
             + f"   nuclei: {row.get('n_nuclei')}   mpp: {row.get('mpp')} ({row.get('mpp_source')})"]
    if row.get("status") == "failed":
        reason = f"FAILED {row.get('failure_stage')}: {row.get('failure_reason')}"
        lines += textwrap.wrap(ascii_text(reason), max(20, width // 9))[:4]
    header = np.full((14 + 20 * len(lines), width, 3), 255, np.uint8)
    cv2.rectangle(header, (0, 0), (8, header.shape[0]), GRADE_COLOURS.get(grade, (128, 128, 128)), -1)
    for i, line in enumerate(lines):
        _put(header, line, (14, 20 + 20 * i), 0.5, (0, 0, 0))
    return header


# ---------------------------------------------------------------- cohort figures

def histogram(values_by_group: dict, bins: np.ndarray, title: str, xlabel: str, marks=(),
              size=(900, 480)) -> np.ndarray:
    """A stacked histogram (one colour per group) with vertical marks, as an RGB image."""
    w, h = size
    img = np.full((h, w, 3), 255, np.uint8)
    left, right, top, bottom = 70, 170, 50, 60
    pw, ph = w - left - right, h - top - bottom
    counts = {g: np.histogram(np.clip(np.asarray(v, float), bins[0], bins[-1]), bins)[0]
              for g, v in values_by_group.items()}
    total = np.sum(list(counts.values()), axis=0) if counts else np.zeros(len(bins) - 1)
    ymax = max(1, int(total.max()))
    x_of = lambda v: left + (v - bins[0]) / (bins[-1] - bins[0]) * pw  # noqa: E731
    y_of = lambda c: top + ph - c / ymax * ph  # noqa: E731
    base = np.zeros(len(bins) - 1)
    for i, (group, c) in enumerate(counts.items()):
        colour = PALETTE[i % len(PALETTE)]
        for b in range(len(c)):
            if c[b]:
                cv2.rectangle(img, (round(x_of(bins[b])) + 1, round(y_of(base[b] + c[b]))),
                              (round(x_of(bins[b + 1])) - 1, round(y_of(base[b]))), colour, -1)
        base = base + c
        cv2.rectangle(img, (w - right + 15, top + 22 * i), (w - right + 30, top + 22 * i + 14), colour, -1)
        _put(img, group, (w - right + 36, top + 22 * i + 12), 0.45)
    for k, (value, label) in enumerate(marks):
        x = round(x_of(value))
        for y in range(top, top + ph, 8):
            cv2.line(img, (x, y), (x, min(y + 4, top + ph)), (90, 90, 90), 1)
        _put(img, label, (x + 3, top + 12 + 14 * k), 0.4, (90, 90, 90))  # staggered: marks can be close
    cv2.line(img, (left, top + ph), (left + pw, top + ph), (0, 0, 0), 1)
    cv2.line(img, (left, top), (left, top + ph), (0, 0, 0), 1)
    for t in np.linspace(bins[0], bins[-1], 6):
        _put(img, f"{t:g}", (x_of(t) - 12, top + ph + 20), 0.45)
    for t in np.unique(np.linspace(0, ymax, min(ymax, 5) + 1).round()):
        _put(img, f"{int(t)}", (left - 40, y_of(t) + 5), 0.45)
    _put(img, title, (left, 30), 0.65, thickness=2)
    _put(img, xlabel, (left + pw // 2 - 60, h - 15), 0.5)
    _put(img, "slides", (8, top - 10), 0.45)
    return img


def histograms(slides: pd.DataFrame, out_dir) -> list[Path]:
    """``pct_bad_patches.png`` and ``nuclei_density.png``: slides per bin, stacked by cancer type."""
    out_dir = Path(out_dir)
    ok = slides[slides.status == "ok"]
    failed = int((slides.status != "ok").sum())
    note = f"{len(ok)} graded slides" + (f"; {failed} failed, not shown" if failed else "")
    pct = {t: g.pct_bad_patches.dropna().to_numpy() for t, g in ok.groupby("cancer_type")}
    marks = [(6.67, "Good"), (13.3, "Adequate"), (20.0, "Problematic")]
    written = [out_dir / "pct_bad_patches.png", out_dir / "nuclei_density.png"]
    io.write_png(written[0], histogram(pct, np.linspace(0, 100, 31), f"Bad patches per slide ({note})",
                                       "% bad patches (> 20: Unacceptable)", marks))
    dens = {t: g.nuclei_per_mm2.dropna().to_numpy() for t, g in ok.groupby("cancer_type")}
    top = max([float(np.nanmax(v)) for v in dens.values() if len(v)] + [1.0])
    top = float(10 ** np.ceil(np.log10(top)) / (2 if top < 10 ** np.ceil(np.log10(top)) / 2 else 1))
    io.write_png(written[1], histogram(dens, np.linspace(0, top, 26), f"Nucleus density ({note})",
                                       "nuclei per mm2 of tissue"))
    return written


def grade_table_html(slides: pd.DataFrame) -> str:
    """Slides per grade and cancer type (counts and row %), with failures per stage, as HTML."""
    counts = grade_summary(slides) if len(slides) else pd.DataFrame(columns=list(GRADES))
    counts.loc["all types"] = counts.sum()
    failed = slides[slides.status != "ok"].groupby("cancer_type").size()
    rows = []
    for ctype, row in counts.iterrows():
        n = int(row.sum())
        cells = "".join(f"<td>{int(row[g])} <small>({100 * row[g] / n:.0f} %)</small></td>" if n else "<td>0</td>"
                        for g in GRADES)
        nf = int(failed.sum()) if ctype == "all types" else int(failed.get(ctype, 0))
        rows.append(f"<tr><th>{html.escape(str(ctype))}</th><td>{n}</td>{cells}<td>{nf}</td></tr>")
    head = "".join(f'<th style="background:rgb{GRADE_COLOURS[g]}">{g}</th>' for g in GRADES)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Slide grades</title><style>"
            "body{font-family:sans-serif} table{border-collapse:collapse} td,th{border:1px solid #999;"
            "padding:4px 10px;text-align:right}</style></head><body>"
            "<h2>Segmentation-QC grades per cancer type</h2>"
            f"<table id='grade-table'><tr><th>cancer type</th><th>slides</th>{head}<th>failed (any stage)</th></tr>"
            + "".join(rows) + "</table><p>Best: 0 % bad patches; Good: &le; 6.67 %; Adequate: &le; 13.3 %; "
            "Problematic: &le; 20 %; Unacceptable: &gt; 20 % or a failed stage (WSI QC, download, QC).</p>"
            "</body></html>\n")


def select_thumbnails(slides: pd.DataFrame, n: int, seed: int = 0) -> pd.DataFrame:
    """Every Unacceptable slide plus up to ``n`` others, drawn evenly across grades (deterministic)."""
    bad = slides[slides.grade == "Unacceptable"]
    others = slides[slides.grade != "Unacceptable"].sample(frac=1.0, random_state=seed)
    # Round-robin over grades so a sample of a large cohort shows every grade there is.
    order = others.assign(_rank=others.groupby("grade").cumcount()).sort_values(["_rank", "grade"])
    return pd.concat([bad, order.head(n).drop(columns="_rank")]).sort_values(["grade", "cancer_type", "slide_id"])


def thumbnails(slides: pd.DataFrame, overlay_pattern: str, out_dir, n: int, levels=None) -> list[Path]:
    """Annotated overlays of the selected slides, as ``out_dir/{grade}/{cancer_type}/{slide_id}.png``.

    ``overlay_pattern`` names the per-slide overlays, e.g. ``results/{cancer_type}/{slide_id}/qc_overlay.png``
    (a pattern, not a list: thousands of paths would overflow a shell command line); each slide's
    ``qc_patches.parquet`` beside it gives the checked patches, graded with ``levels`` (a
    :class:`nucseg.grading.QCParams`) so the red boxes agree with the table's grades.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for r in select_thumbnails(slides, n).to_dict("records"):
        src = Path(overlay_pattern.format(cancer_type=r["cancer_type"], slide_id=r["slide_id"]))
        body = cv2.imread(str(src), cv2.IMREAD_COLOR) if src.is_file() else None
        if body is None:
            continue
        beside = src.with_name("qc_patches.parquet")
        patches = grade_patches(pd.read_parquet(beside), levels or QCParams()) if beside.is_file() else None
        dest = out_dir / str(r["grade"]) / str(r["cancer_type"]) / f"{r['slide_id']}.png"
        io.write_png(dest, annotate_overlay(body[..., ::-1], r, patches))
        written.append(dest)
    return written
