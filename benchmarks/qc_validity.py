"""Validity of the label-free segmentation-QC detector against manual annotations (prints JSON).

The annotated tiles are cut into patches of the size the ``qc`` stage checks (``QCParams.patch_um``,
64 µm at the model's working resolution, 128 px at 0.5 µm/px). For each patch the QC signals are computed exactly as in
the pipeline (:func:`nucseg.qc.patch_signals` on the network's test-time-augmented probabilities, the
segmented nuclei and their features), and the segmentation is compared with the manual annotation:

    a patch is **truly bad** when its AJI against the annotation is below ``--aji`` (default 0.3).

AJI, not Dice, because the TCIA grade judges instance segmentation (split/merged nuclei count), and 0.3
is well below what a usable segmentation reaches on these tiles (published methods: 0.5-0.7). Patches
with fewer than ``--min-nuclei`` annotated nuclei are skipped (AJI of one or two objects is noise).

To have enough truly bad patches, degraded variants of the same tiles are evaluated too (blur, faded
hematoxylin, strong JPEG, and a slide read at a wrong µm/px, both ways). Every patch, degraded or not,
is labelled by the same AJI rule, never by the degradation it got.

The annotations are used only here, to *measure* the detector: its levels and threshold are QCParams
defaults chosen without them (nothing is fitted). The 9 MoNuSeg *training* tiles were looked at while the
signals were designed (split ``dev``: e.g. foreground-mask Dice between augmentations was replaced by the
instance-level AJI after it proved uninformative there); all other tiles were not (split ``held_out``).
Reported, overall, per split, per source, for clean patches only and per variant: ROC AUC of each signal and of
the combined score, the confusion matrix at the shipped threshold, counts, and seconds.

Sources: those of ``quality.py`` (MoNuSeg at 40x and 20x, CryoNuSeg, glioma_tcga36; absent ones skipped) and
any ``--dataset NAME=DIR``; ``--sources`` picks some. Patches are segmented as the segment stage does by
default. MoNuSeg with all variants takes ~25 min on 2 CPU cores; runs can be split and summarised:

    python benchmarks/qc_validity.py [--checkpoint model.pt] [--variants clean blur ...] [--out qc.json]
    python benchmarks/qc_validity.py --split held_out --variants clean blur --patches-out part1.csv
    python benchmarks/qc_validity.py --sources glioma_tcga36 --dataset mine=DIR --variants clean --out q.json
    python benchmarks/qc_validity.py --summarize part1.csv part2.csv ... --out qc.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nucseg.metrics import roc_auc  # noqa: E402
from quality import DATA, load_datasets, print_json  # noqa: E402

# ---------------------------------------------------------------- degradations (image, claimed mpp)

def _blur(image, mpp):
    # 1 µm Gaussian: nuclear chromatin and edges are gone, as in an out-of-focus scan.
    return cv2.GaussianBlur(image, (0, 0), 1.0 / mpp), mpp


def _faded(image, mpp):
    # Hematoxylin at 35 %, eosin at 130 %: a faded / badly stained slide.
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    hed[..., 0] *= 0.35
    hed[..., 1] *= 1.3
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8), mpp


def _jpeg(image, mpp):
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 8])
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB), mpp


VARIANTS = {
    "clean": lambda image, mpp: (image, mpp),
    "blur": _blur,
    "faded_stain": _faded,
    "jpeg_q8": _jpeg,
    # The file claims a pixel size twice too coarse / too fine: the slide is resampled wrongly.
    "mpp_claimed_x2": lambda image, mpp: (image, 2 * mpp),
    "mpp_claimed_half": lambda image, mpp: (image, mpp / 2),
}


# ---------------------------------------------------------------- patches of one tile

def tile_patches(sample, variant: str, model, device, mpp_work: float, params, min_nuclei: int,
                 max_side: int = 3) -> list[dict]:
    """QC signals and true AJI/Dice of each patch of one (degraded) annotated tile."""
    from nucseg.inference import segment_images, view_probabilities
    from nucseg.instances import describe_instances, hematoxylin_level
    from nucseg.metrics import instance_metrics
    from nucseg.qc import patch_signals
    from nucseg.resample import resample_to
    from nucseg.segment import SegmentParams
    from nucseg.stain import hematoxylin_od

    image, claimed = VARIANTS[variant](sample.image, sample.mpp)
    # As the pipeline would: resample by the *claimed* µm/px to the working resolution.
    work = resample_to(image, claimed, mpp_work)
    truth = cv2.resize(sample.labels.astype(np.float32), (work.shape[1], work.shape[0]),
                       interpolation=cv2.INTER_NEAREST).astype(np.int32)
    # Segment the whole tile (the segment stage sees context around every patch too) with the segment
    # stage's defaults; the tile's hematoxylin level stands for its slide's (the gate's, and QC's stain floor).
    level = hematoxylin_level([hematoxylin_od(work)], mpp_work)
    segment = SegmentParams()
    inst_params = segment.instance_params(sample.slide_type)
    unit = inst_params.gate_unit if segment.hematoxylin_gate else "off"
    probs, maps = segment_images(model, work[None], device, mpp_work, inst_params, level=level)
    prob, labels = probs[0], maps[0]
    _, feats = describe_instances(labels, score=prob[0], level=inst_params.foreground_threshold)
    areas = feats.area_px.to_numpy() * mpp_work**2
    size = max(8, round(params.patch_um / mpp_work))
    margin = round(params.context_um / mpp_work)
    padded = np.pad(work, ((margin, margin), (margin, margin), (0, 0)), mode="reflect")
    h, w = work.shape[:2]
    # At most 3 x 3 non-overlapping patches per tile, spread over it (upsampled variants have more room).
    ys = np.linspace(0, h - size, min(max_side, h // size)).round().astype(int) if h >= size else []
    xs = np.linspace(0, w - size, min(max_side, w // size)).round().astype(int) if w >= size else []
    boxes = [(y, x) for y in ys for x in xs]
    if not boxes:
        return []
    crops = np.stack([padded[y:y + size + 2 * margin, x:x + size + 2 * margin] for y, x in boxes])
    probs = view_probabilities(model, crops, device, params.tta, params.batch_size)
    probs = probs[..., margin:margin + size, margin:margin + size]
    rows = []
    for (y, x), p in zip(boxes, probs, strict=True):
        true = truth[y:y + size, x:x + size]
        n_true = len(np.unique(true)) - (1 if (true == 0).any() else 0)
        if n_true < min_nuclei:
            continue
        pred = labels[y:y + size, x:x + size]
        inside = ((feats.centroid_x >= x) & (feats.centroid_x < x + size) &
                  (feats.centroid_y >= y) & (feats.centroid_y < y + size)).to_numpy()
        signals = patch_signals(work[y:y + size, x:x + size], p, pred > 0, areas[inside],
                                feats.solidity.to_numpy()[inside], params, mpp_work, level, unit)
        m = instance_metrics(true, pred)
        rows.append({"tile": sample.id, "variant": variant, "y": int(y), "x": int(x), "n_true": n_true,
                     "aji": m["aji"], "dice": m["dice"], **signals})
    return rows


def summarize(rows: list[dict], params, aji_threshold: float) -> dict:
    """Counts, ROC AUC per signal and of the combined score, confusion matrix at the shipped threshold."""
    from nucseg.grading import SIGNALS

    truly_bad = np.array([r["aji"] < aji_threshold for r in rows], bool)
    flagged = np.array([bool(r["bad"]) for r in rows], bool)
    out = {"n_patches": len(rows), "n_truly_bad": int(truly_bad.sum()), "n_flagged": int(flagged.sum()),
           "auc": {s: _round(roc_auc([r[s] for r in rows], truly_bad)) for s in SIGNALS}}
    out["auc"]["combined_score"] = _round(roc_auc([r["score"] for r in rows], truly_bad))
    c = {"threshold": params.bad_score,
         "true_positive": int((flagged & truly_bad).sum()), "false_positive": int((flagged & ~truly_bad).sum()),
         "false_negative": int((~flagged & truly_bad).sum()), "true_negative": int((~flagged & ~truly_bad).sum())}
    c["sensitivity"] = _round(c["true_positive"] / max(1, c["true_positive"] + c["false_negative"]))
    c["specificity"] = _round(c["true_negative"] / max(1, c["true_negative"] + c["false_positive"]))
    out["confusion_at_shipped_threshold"] = c
    return out


def _round(v):
    return None if v is None else round(float(v), 4)


def split_of(dataset: str, tile: str, dev_ids: set) -> str:
    """``dev``: MoNuSeg training tiles, looked at while the signals were designed; ``held_out``: the rest."""
    return "dev" if dataset in ("monuseg", "monuseg_20x") and tile in dev_ids else "held_out"


def monuseg_dev_ids() -> set:
    import csv

    with open(DATA / "monuseg" / "manifest.csv", newline="") as fh:
        return {r["id"] for r in csv.DictReader(fh) if "training" in r["original_set"]}


def report(rows: list[dict], params, aji_threshold: float, meta: dict) -> dict:
    """The benchmark's JSON: overall, per split, clean patches only, per variant."""
    result = {**meta, "truth": f"AJI < {aji_threshold} against the manual annotation",
              "all": summarize(rows, params, aji_threshold)}
    for split in ("dev", "held_out"):
        sub = [r for r in rows if r["split"] == split]
        if sub:
            result[split] = summarize(sub, params, aji_threshold)
    result["clean_only"] = summarize([r for r in rows if r["variant"] == "clean"], params, aji_threshold)
    result["per_source"] = {}
    for source in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == source]
        result["per_source"][source] = {
            "all": summarize(sub, params, aji_threshold),
            "clean_only": summarize([r for r in sub if r["variant"] == "clean"], params, aji_threshold)}
    result["per_variant"] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sub = [r for r in rows if r["variant"] == variant]
        result["per_variant"][variant] = {
            "n_patches": len(sub), "n_truly_bad": int(sum(r["aji"] < aji_threshold for r in sub)),
            "n_flagged": int(sum(bool(r["bad"]) for r in sub)), "mean_aji": _round(np.mean([r["aji"] for r in sub])),
            "auc_combined": _round(roc_auc([r["score"] for r in sub], [r["aji"] < aji_threshold for r in sub]))}
    return result


def main() -> None:
    import pandas as pd
    import torch

    from nucseg.cli import default_weights
    from nucseg.grading import QCParams
    from nucseg.model import load_weights, resolve_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="model.pt (default: the shipped model)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--split", choices=("all", "dev", "held_out"), default="all",
                        help="dev: the 9 MoNuSeg training tiles (at 40x and 20x); held_out: all other tiles")
    parser.add_argument("--sources", nargs="+", default=None, metavar="NAME",
                        help="only these sources (default: all, see quality.py; plus every --dataset)")
    parser.add_argument("--dataset", action="append", default=[], metavar="NAME=DIR",
                        help="another annotated source (MoNuSeg or label-map layout)")
    parser.add_argument("--aji", type=float, default=0.3, help="a patch is truly bad below this AJI")
    parser.add_argument("--min-nuclei", type=int, default=3, help="skip patches with fewer annotated nuclei")
    parser.add_argument("--max-tiles", type=int, default=None, help="first N tiles per dataset (quick runs)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patches-out", type=Path, default=None, help="also write every patch's row (CSV)")
    parser.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="CSV",
                        help="no model runs: summarise the --patches-out CSVs of earlier (partial) runs")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    params = QCParams()
    if args.summarize:
        frame = pd.concat([pd.read_csv(p) for p in args.summarize], ignore_index=True)
        rows = frame.to_dict("records")
        meta = {"model_id": sorted(frame.model_id.unique().tolist()), "runs": [str(p) for p in args.summarize],
                "seconds": round(float(frame.groupby("run").seconds.first().sum()), 1)}
    else:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        weights = args.checkpoint or default_weights()
        device = resolve_device(args.device)
        model, model_meta = load_weights(weights, device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)  # as the segment and qc stages run it
        mpp_work = float(model_meta.get("mpp", 0.25))
        dev_ids = monuseg_dev_ids()
        started = time.monotonic()
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            extra = dict(d.split("=", 1) for d in args.dataset)
            datasets = load_datasets(Path(tmp), extra)
            unknown = set(args.sources or ()) - set(datasets)
            if unknown:
                parser.error(f"--sources {' '.join(sorted(unknown))}: not available (have {', '.join(datasets)})")
            for name, samples in datasets.items():
                if args.sources and name not in args.sources and name not in extra:
                    continue
                samples = [s for s in samples if args.split in ("all", split_of(name, s.id, dev_ids))]
                for sample in samples[:args.max_tiles]:
                    for variant in args.variants:
                        for r in tile_patches(sample, variant, model, device, mpp_work, params, args.min_nuclei):
                            rows.append({"dataset": name, "split": split_of(name, sample.id, dev_ids), **r})
        seconds = round(time.monotonic() - started, 1)
        meta = {"model_id": model_meta["model_id"], "patch_px": round(params.patch_um / mpp_work),
                "mpp_work": mpp_work, "tta": params.tta, "min_nuclei": args.min_nuclei, "seconds": seconds,
                "seconds_per_patch": round(seconds / max(1, len(rows)), 3)}
        if args.patches_out:
            run_id = f"{args.split}:{'+'.join(args.variants)}"
            pd.DataFrame(rows).assign(model_id=model_meta["model_id"], run=run_id, seconds=seconds).to_csv(
                args.patches_out, index=False)
    result = report(rows, params, args.aji, meta)
    print_json(result, args.out)


if __name__ == "__main__":
    main()
