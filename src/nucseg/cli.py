"""``nucseg <stage> ...``: one subcommand per pipeline stage; Snakemake rules call these."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__, io, report
from .demo import make_demo_slide
from .download import (FAILURE_RECORD_NAME, GDC_API_URL, SEED_PROJECTS, DownloadError, build_cohort,
                       cohort_from_manifest, fetch_into, parse_barcode, write_failure_record, write_sheet)
from .download.gdc import query_note
from .evaluate import evaluate, images_mpp, load_dataset
from .export import to_qupath, to_tcia
from .grading import LEVELS, QCParams, grade_summary
from .instances import SLIDE_TYPES, InstanceParams
from .qc import aggregate, slide_qc
from .refiner import RefinerParams, refine_dataset
from .segment import SegmentParams, segment_slide
from .slides import BACKENDS
from .synth import SynthParams, contact_sheet, generate_dataset, load_textures
from .tissue import TissueParams, detect_tissue

# The wrapper imports Lightning only when a model is trained (slow to import).
from .train import ADAPT_STEPS, TrainParams, adapt_model, adapt_to_images, train_model


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Expose each field of a parameter dataclass as ``--field-name`` (defaults from the dataclass)."""
    group = parser.add_argument_group(f"{cls.__name__} (defaults shown)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"(default: {default})")
        elif isinstance(default, tuple):
            group.add_argument(flag, dest=f.name, nargs=len(default), type=type(default[0]), default=default,
                               metavar=("LO", "HI") if len(default) == 2 else None,
                               help=f"(default: {' '.join(map(str, default))})")
        else:
            group.add_argument(flag, dest=f.name, type=type(default), default=default,
                               help=f"(default: {default})")


def _dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **overrides})


def build_parser() -> argparse.ArgumentParser:
    """The ``nucseg`` argument parser: global options and one subcommand per stage (:data:`_COMMANDS`)."""
    parser = argparse.ArgumentParser(
        prog="nucseg", description="Label-free nucleus segmentation for H&E whole-slide images. "
        "Each subcommand is one pipeline stage; `snakemake` chains them over cohorts of slides.")
    parser.add_argument("--version", action="version", version=f"nucseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for add_parser, _ in _COMMANDS.values():
        add_parser(sub)
    return parser


def _parser_download(sub) -> argparse.ArgumentParser:
    """The ``download`` subcommand and its arguments."""
    p = sub.add_parser("download", help="fetch one slide (GDC UUID, http(s) URL or local path), verified")
    p.add_argument("--source", required=True, help="GDC file UUID, http(s) URL or local path")
    p.add_argument("--out-dir", required=True, type=Path,
                   help="the slide's folder: the slide keeps its own name in it (with a MIRAX companion folder)")
    p.add_argument("--slide-id", required=True)
    p.add_argument("--file-name", default=None, help="the slide's file name (GDC sheets; default: the source's)")
    p.add_argument("--md5", default=None, help="expected md5 (verified when given)")
    p.add_argument("--size", type=int, default=None, help="expected size in bytes (verified when given)")
    p.add_argument("--api-url", default=None, help="GDC API base URL (default: the public GDC)")
    p.add_argument("--copy", action="store_true", help="copy local sources instead of symlinking")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--on-failure", choices=("record", "fail"), default="fail",
                   help="record: a permanent failure (wrong md5/size, HTTP 4xx, missing file) leaves a failure "
                        "record in --out-dir, so QC grades the slide 'failed WSI QC', and exits 0; transient "
                        "failures always exit 1 (default: fail)")
    return p


def _parser_cohort(sub) -> argparse.ArgumentParser:
    """The ``cohort`` subcommand and its arguments."""
    p = sub.add_parser("cohort", help="build sample sheets from the GDC (files endpoint or a manifest)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--project", help="GDC project, e.g. TCGA-BRCA")
    src.add_argument("--from-manifest", type=Path, help="GDC Data Transfer Tool manifest (id filename md5 size state)")
    src.add_argument("--all-seed-types", action="store_true",
                     help="every cancer type of the TCIA release (BLCA ... UCEC, COAD, READ, STAD, UVM)")
    p.add_argument("--cancer-type", help="cohort key (default: the project without 'TCGA-')")
    p.add_argument("--slide-type", choices=("diagnostic", "tissue", "all"), default="diagnostic")
    p.add_argument("--out", type=Path, help="sample sheet to write (TSV)")
    p.add_argument("--out-dir", type=Path, default=Path("config/cohorts"), help="with --all-seed-types")
    p.add_argument("--api-url", default=None, help="GDC API base URL (default: the public GDC)")
    return p


def _parser_tissue(sub) -> argparse.ArgumentParser:
    """The ``tissue`` subcommand and its arguments."""
    p = sub.add_parser("tissue", help="tissue detection + WSI QC facts for one slide")
    p.add_argument("slide", type=Path)
    p.add_argument("--out-dir", required=True, type=Path,
                   help="writes tissue.parquet, tissue.png, tiles.parquet, patches.npz, wsi.json")
    p.add_argument("--slide-id", default=None, help="default: the file name stem")
    _add_backend_mpp(p)
    p.add_argument("--mpp-work", type=float, default=0.25, help="working resolution, µm/px (default 0.25)")
    _add_dataclass_flags(p, TissueParams)
    return p


def _parser_synth(sub) -> argparse.ArgumentParser:
    """The ``synth`` subcommand and its arguments."""
    p = sub.add_parser("synth", help="synthetic training patches from real tissue textures")
    p.add_argument("--patches", nargs="*", default=[], type=Path, help="patches.npz files of the tissue stage")
    _add_sheet_inputs(p, "results/{cancer_type}/{slide_id}/patches.npz")
    p.add_argument("--texture-dir", nargs="*", default=[], metavar="DIR:MPP",
                   help="folders of unlabelled H&E images with their µm/px, e.g. data/tissue:0.25")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--contact-sheet", type=Path, default=None, help="PNG: synthetic above real patches")
    _add_dataclass_flags(p, SynthParams)
    return p


def _parser_refine(sub) -> argparse.ArgumentParser:
    """The ``refine`` subcommand and its arguments."""
    p = sub.add_parser("refine", help="GAN refiner (SimGAN): make synthetic patches look like real tissue")
    p.add_argument("--synth", required=True, type=Path, help="synth output folder (shards, params.json)")
    p.add_argument("--patches", nargs="*", default=[], type=Path,
                   help="patches.npz files of the tissue stage (real tissue for the discriminator)")
    _add_sheet_inputs(p, "results/{cancer_type}/{slide_id}/patches.npz")
    p.add_argument("--texture-dir", nargs="*", default=[], metavar="DIR:MPP",
                   help="folders of unlabelled H&E images with their µm/px, e.g. data/tissue:0.25")
    p.add_argument("--out-dir", required=True, type=Path, help="refined shards (same format as --synth)")
    p.add_argument("--weights", type=Path, default=None, help="refiner weights (default: OUT_DIR/refiner.pt)")
    p.add_argument("--contact-sheet", type=Path, default=None, help="PNG: synthetic, refined and real patches")
    _add_dataclass_flags(p, RefinerParams)
    return p


def _parser_train(sub) -> argparse.ArgumentParser:
    """The ``train`` subcommand and its arguments."""
    p = sub.add_parser("train", help="train the segmentation network (importance-weighted)")
    p.add_argument("--synth", nargs="+", required=True, type=Path, help="synth output folder(s)")
    p.add_argument("--out-dir", required=True, type=Path, help="model folder (model.pt, model_card.json)")
    _add_dataclass_flags(p, TrainParams)
    return p


def _parser_segment(sub) -> argparse.ArgumentParser:
    """The ``segment`` subcommand and its arguments."""
    p = sub.add_parser("segment", help="segment all nuclei of one slide into GeoParquet")
    p.add_argument("slide", type=Path)
    p.add_argument("--out", required=True, type=Path, help="nuclei.parquet")
    p.add_argument("--checkpoint", type=Path, default=None, help="model.pt (default: the shipped model)")
    p.add_argument("--tissue-mask", type=Path, default=None, help="tissue.parquet of the tissue stage")
    p.add_argument("--slide-id", default=None)
    p.add_argument("--slide-type", default="", choices=(*SLIDE_TYPES, ""),
                   help="TCGA slide type (DX: FFPE; TS/BS/MS: frozen), for --gate-unit auto (default: unknown)")
    p.add_argument("--config-hash", default=None, help="recorded in the output metadata")
    _add_backend_mpp(p)
    _add_dataclass_flags(p, SegmentParams)
    return p


def _parser_qc(sub) -> argparse.ArgumentParser:
    """The ``qc`` subcommand and its arguments."""
    p = sub.add_parser("qc", help="segmentation QC and grade of one slide")
    for name, help_ in (("--wsi", "wsi.json"), ("--nuclei", "nuclei.parquet"), ("--tiles", "tiles.parquet"),
                        ("--slide", "slide file"), ("--out-json", "qc.json"),
                        ("--out-patches", "qc_patches.parquet")):
        p.add_argument(name, required=True, type=Path, help=help_)
    p.add_argument("--cancer-type", required=True)
    p.add_argument("--source", default="")
    p.add_argument("--config-hash", default="")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="slide reader (auto: by content)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model.pt for the model-based signals (default: the shipped model)")
    p.add_argument("--tissue", type=Path, default=None, help="tissue.parquet (outline in the overlay)")
    p.add_argument("--out-overlay", type=Path, default=None,
                   help="PNG: thumbnail with tissue, nuclei and checked patches (for the report)")
    _add_dataclass_flags(p, QCParams)
    return p


def _parser_report_figures(sub) -> argparse.ArgumentParser:
    """The ``report-figures`` subcommand and its arguments."""
    p = sub.add_parser("report-figures", help="figures for `snakemake --report` from the QC tables")
    p.add_argument("kind", choices=("histograms", "grades", "thumbnails"),
                   help="histograms: %% bad patches and nucleus density (PNG, in --out folder); grades: the grade "
                        "table per cancer type (HTML file --out); thumbnails: QC overlays of every Unacceptable "
                        "slide and a sample of the others (--out folder)")
    p.add_argument("--slides", required=True, type=Path, help="results/qc/slides.parquet")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--overlay-pattern", default="results/{cancer_type}/{slide_id}/qc_overlay.png",
                   help="where the qc stage's overlays are (thumbnails; default: %(default)s)")
    p.add_argument("--n-thumbnails", type=int, default=12, help="slides shown besides the Unacceptable ones")
    _add_dataclass_flags(p, QCParams, skip=_not_levels(QCParams, LEVELS))
    return p


def _parser_aggregate(sub) -> argparse.ArgumentParser:
    """The ``aggregate`` subcommand and its arguments."""
    p = sub.add_parser("aggregate", help="combine per-slide QC rows into a Parquet table (re-graded)")
    p.add_argument("inputs", nargs="*", type=Path, help="qc.json files or aggregate .parquet files")
    _add_sheet_inputs(p, "results/{cancer_type}/{slide_id}/qc.json")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--summary", type=Path, default=None, help="also write grades per cancer type (TSV)")
    p.add_argument("--config-hash", default=None)
    p.add_argument("--regrade", action="store_true",
                   help="grade each qc.json row anew from the qc_patches.parquet beside it, with the levels below")
    _add_dataclass_flags(p, QCParams, skip=_not_levels(QCParams, LEVELS))
    return p


def _parser_adapt(sub) -> argparse.ArgumentParser:
    """The ``adapt`` subcommand and its arguments."""
    p = sub.add_parser("adapt", help="adapt a model to one cohort's own tissue, label-free (self-training, "
                                     "importance-weighted synthetic patches)")
    p.add_argument("--init", required=True, type=Path, help="the model to adapt (model.pt)")
    p.add_argument("--synth", nargs="+", required=True, type=Path,
                   help="synth output folder(s) drawn on the cohort's textures (their real.npz: its real patches)")
    p.add_argument("--out-dir", required=True, type=Path, help="model folder (model.pt, model_card.json)")
    _add_dataclass_flags(p, TrainParams, skip=("base", "depth", "mpp", "max_steps"))
    return p


def _parser_evaluate(sub) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand and its arguments."""
    p = sub.add_parser("evaluate", help="metrics (AJI, Dice, PQ, F1) on annotated tiles")
    p.add_argument("--dataset", required=True, type=Path,
                   help="images/ + annotations/*.xml (MoNuSeg) or images/ + labels/ (instance maps)")
    p.add_argument("--checkpoint", type=Path, default=None, help="model.pt (default: the shipped model)")
    p.add_argument("--method", choices=("model", "classical"), default="model",
                   help="classical: hematoxylin + Otsu + distance-transform watershed baseline")
    p.add_argument("--mpp", type=float, default=None, help="µm/px of images without manifest/XML value")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=None, help="metrics JSON (default: print)")
    p.add_argument("--save-predictions", type=Path, default=None, help="folder for <id>.png uint16 instance maps")
    p.add_argument("--hematoxylin-gate", action=argparse.BooleanOptionalAction, default=False,
                   help="foreground only above each image's hematoxylin Otsu level (default: off, the network "
                        "alone, as segment's default)")
    p.add_argument("--gate-unit", choices=("auto", "pixel", "nucleus"), default="auto",
                   help="what the gate removes: pixels below the level, or whole nuclei mostly below it; "
                        "auto: nucleus for FFPE (slide type DX), pixel otherwise")
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="average the network's outputs over N of the 8 flips/quarter turns (as segment's tta)")
    p.add_argument("--adapt", type=Path, default=None, metavar="DIR",
                   help="first adapt the model to the dataset's images, label-free (annotations are opened only "
                        "once the adapted model exists), into DIR; then score the adapted model")
    p.add_argument("--adapt-steps", type=int, default=ADAPT_STEPS,
                   help=f"self-training steps of --adapt (default {ADAPT_STEPS})")
    return p


def _parser_export(sub) -> argparse.ArgumentParser:
    """The ``export`` subcommand and its arguments."""
    p = sub.add_parser("export", help="export a nuclei.parquet for QuPath (GeoJSON) or as TCIA per-tile CSVs")
    p.add_argument("nuclei", type=Path, help="nuclei.parquet of the segment stage")
    p.add_argument("--format", required=True, choices=("qupath", "tcia"))
    p.add_argument("--out", required=True, type=Path, help="qupath: .geojson file; tcia: output folder")
    p.add_argument("--slide-id", default=None, help="tcia file-name prefix (default: from the file's metadata)")
    return p


def _parser_publish(sub) -> argparse.ArgumentParser:
    """The ``publish`` subcommand and its arguments."""
    p = sub.add_parser("publish", help="add slides' nuclei.parquet files to the hive-partitioned nuclei dataset")
    p.add_argument("nuclei", type=Path, nargs="*", help="results/{TYPE}/{slide_id}/nuclei.parquet files")
    _add_sheet_inputs(p, "results/{cancer_type}/{slide_id}/nuclei.parquet")
    p.add_argument("--dataset", required=True, type=Path, help="dataset root, e.g. results/nuclei")
    p.add_argument("--cancer-type", required=True)
    return p


def _parser_demo_slide(sub) -> argparse.ArgumentParser:
    """The ``demo-slide`` subcommand and its arguments."""
    p = sub.add_parser("demo-slide", help="generate one demo slide (pyramidal TIFF with mpp)")
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=2560)
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--mpp", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    return p


def _not_levels(cls, levels) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in levels)


def _add_sheet_inputs(p: argparse.ArgumentParser, pattern: str) -> None:
    """Inputs named by a sample sheet and a path pattern (a cohort's thousands of paths overflow a command line)."""
    p.add_argument("--sheet", type=Path, default=None, help="sample sheet (TSV): take the files of its slides")
    p.add_argument("--pattern", default=pattern, help="with --sheet: each slide's file (default: %(default)s)")


def _inputs(args, given: list[Path], required: bool = True) -> list[Path]:
    """The files given on the command line, then those of the --sheet's slides."""
    paths = list(given)
    if args.sheet is not None:
        sheet = pd.read_csv(args.sheet, sep="\t", dtype=str, comment="#")
        paths += [Path(args.pattern.format(cancer_type=t, slide_id=s))
                  for t, s in zip(sheet.cancer_type, sheet.slide_id, strict=True)]
    if required and not paths:
        raise SystemExit(f"nucseg {args.command}: no input files (give paths or --sheet)")
    return paths


def _add_backend_mpp(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="slide reader (auto: by content)")
    p.add_argument("--mpp", type=float, default=None, help="override the slide's µm/px")
    p.add_argument("--mpp-fallback", type=float, default=None,
                   help="µm/px used (and recorded as fallback) when the slide has none")


def _parse_texture_dirs(values: list[str]) -> list[dict]:
    out = []
    for v in values:
        path, sep, mpp = v.rpartition(":")
        if not sep:
            raise SystemExit(f"--texture-dir {v!r}: expected DIR:MPP")
        out.append({"path": path, "mpp": float(mpp)})
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format=f"%(asctime)s nucseg {args.command} %(levelname)s %(message)s",
                        stream=sys.stderr)
    progress = not (args.quiet or args.no_progress)
    try:
        return _COMMANDS[args.command][1](args, progress) or 0
    except Exception as exc:
        logging.getLogger("nucseg").error("%s failed: %s: %s", args.command, type(exc).__name__, exc)
        if os.environ.get("NUCSEG_DEBUG"):
            raise
        return 1


def _cmd_download(args, progress):
    try:
        path = fetch_into(args.source, args.out_dir, args.slide_id, file_name=args.file_name, md5=args.md5,
                          size=args.size, link=not args.copy, api_url=args.api_url or GDC_API_URL,
                          retries=args.retries)
    except DownloadError as exc:
        if args.on_failure != "record" or not exc.permanent:
            raise
        record = args.out_dir / FAILURE_RECORD_NAME
        logging.getLogger("nucseg").error("%s; recorded for QC (failure record %s)", exc, record)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_failure_record(record, args.slide_id, args.source, str(exc))
        print(json.dumps({"slide_id": args.slide_id, "status": "failed", "reason": str(exc)}))
        return 0
    print(json.dumps({"slide_id": args.slide_id, "status": "ok", "path": str(path)}))


def _cmd_cohort(args, progress):
    api = args.api_url or GDC_API_URL
    if args.all_seed_types:
        jobs = [(f"TCGA-{t}", t, args.out_dir / f"{t}.tsv") for t in SEED_PROJECTS]
    elif args.project:
        cancer_type = args.cancer_type or args.project.removeprefix("TCGA-")
        jobs = [(args.project, cancer_type, args.out or args.out_dir / f"{cancer_type}.tsv")]
    else:
        if not (args.cancer_type and args.out):
            raise SystemExit("--from-manifest needs --cancer-type and --out")
        sheet = cohort_from_manifest(args.from_manifest, args.cancer_type)
        write_sheet(sheet, args.out, f"from GDC manifest {args.from_manifest.name}")
        print(json.dumps({"cancer_type": args.cancer_type, "slides": len(sheet), "out": str(args.out)}))
        return
    for project, cancer_type, out in jobs:
        sheet = build_cohort(project, args.slide_type, api)
        write_sheet(sheet, out, query_note(project, args.slide_type, api))
        print(json.dumps({"cancer_type": cancer_type, "slides": len(sheet), "out": str(out)}))


def _cmd_tissue(args, progress):
    facts = detect_tissue(args.slide, args.out_dir, args.slide_id or args.slide.stem, mpp_work=args.mpp_work,
                          mpp_override=args.mpp, mpp_fallback=args.mpp_fallback, backend=args.backend,
                          params=_dataclass_from_args(TissueParams, args))
    print(json.dumps({k: facts[k] for k in ("slide_id", "status", "failure_reason", "mpp", "mpp_source",
                                            "tissue_area_mm2", "n_tissue_tiles")}))


def _cmd_synth(args, progress):
    params = _dataclass_from_args(SynthParams, args)
    textures = load_textures(_inputs(args, args.patches, required=False), _parse_texture_dirs(args.texture_dir),
                             params.mpp)
    meta = generate_dataset(textures, args.out_dir, params, progress=progress)
    if args.contact_sheet:
        with np.load(args.out_dir / meta["shards"][0]["file"]) as shard, np.load(args.out_dir / "real.npz") as real:
            io.write_png(args.contact_sheet, contact_sheet(shard["image"], real["patches"]))
    print(json.dumps({k: meta[k] for k in ("n_patches", "n_textures", "n_real")}))


def _cmd_refine(args, progress):
    params = _dataclass_from_args(RefinerParams, args)
    real = load_textures(_inputs(args, args.patches, required=False), _parse_texture_dirs(args.texture_dir), params.mpp)
    result = refine_dataset(args.synth, args.out_dir, real, params, weights_path=args.weights,
                            contact_sheet_path=args.contact_sheet, progress=progress)
    print(json.dumps({"refiner_id": result["refiner_id"], "n_patches": result["n_patches"],
                      "n_real": result["n_real"], "metrics": result["metrics"]}))


def _cmd_train(args, progress):
    card = train_model(args.synth, args.out_dir, _dataclass_from_args(TrainParams, args), progress=progress,
                       command=shlex.join(["nucseg", *sys.argv[1:]]))
    print(json.dumps({k: card[k] for k in ("model_id", "global_step", "wall_time_s", "this_run_s", "metrics")}))


def _cmd_segment(args, progress):
    weights = args.checkpoint or default_weights()
    # Slides named by their TCGA barcode say their type themselves.
    slide_type = args.slide_type or parse_barcode(args.slide_id or args.slide.name)["slide_type"]
    summary = segment_slide(args.slide, args.out, weights, tissue_path=args.tissue_mask, slide_id=args.slide_id,
                            mpp_override=args.mpp, mpp_fallback=args.mpp_fallback, backend=args.backend,
                            params=_dataclass_from_args(SegmentParams, args), slide_type=slide_type,
                            extra_metadata={"config_hash": args.config_hash} if args.config_hash else None,
                            progress=progress)
    print(json.dumps({k: summary[k] for k in ("slide_id", "status", "n_nuclei", "n_blocks", "seconds")}))


def default_weights() -> Path:
    """The model shipped inside the package."""
    path = Path(__file__).parent / "weights" / "default.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no shipped default model at {path}; pass --checkpoint")
    return path


def _cmd_qc(args, progress):
    row = slide_qc(args.wsi, args.nuclei, args.tiles, args.slide, args.out_json, args.out_patches,
                   cancer_type=args.cancer_type, source=args.source, config_hash=args.config_hash,
                   backend=args.backend, params=_dataclass_from_args(QCParams, args),
                   weights=args.checkpoint or default_weights(), tissue_path=args.tissue,
                   out_overlay=args.out_overlay)
    print(json.dumps({k: row[k] for k in ("slide_id", "status", "grade", "pct_bad_patches", "n_nuclei",
                                          "seconds_by_stage")}))


def _cmd_report_figures(args, progress):
    slides = pd.read_parquet(args.slides)
    if args.kind == "histograms":
        written = report.histograms(slides, args.out)
    elif args.kind == "grades":
        with io.atomic_path(args.out) as tmp:
            tmp.write_text(report.grade_table_html(slides))
        written = [args.out]
    else:
        written = report.thumbnails(slides, args.overlay_pattern, args.out, args.n_thumbnails,
                                    _dataclass_from_args(QCParams, args))
    print(json.dumps({"kind": args.kind, "files": [str(p) for p in written]}))


def _cmd_aggregate(args, progress):
    levels = _dataclass_from_args(QCParams, args) if args.regrade else None
    table = aggregate(_inputs(args, args.inputs), args.out, {"config_hash": args.config_hash}, levels)
    summary = grade_summary(table)
    if args.summary:
        with io.atomic_path(args.summary) as tmp:
            summary.to_csv(tmp, sep="\t")
    print(summary.to_string())


def _cmd_adapt(args, progress):
    card = adapt_model(args.init, args.synth, args.out_dir, _dataclass_from_args(TrainParams, args),
                       progress=progress, command=shlex.join(["nucseg", *sys.argv[1:]]))
    print(json.dumps({k: card[k] for k in ("model_id", "phase_time_s", "this_run_s", "metrics")}))


def _cmd_evaluate(args, progress):
    weights = None if args.method == "classical" else (args.checkpoint or default_weights())
    adapted = None
    if args.adapt is not None and weights is not None:
        adapted = adapt_to_images(args.dataset / "images", images_mpp(args.dataset, args.mpp), weights, args.adapt,
                                  params=TrainParams(self_training_steps=args.adapt_steps), progress=progress)
        weights = args.adapt / "model" / "model.pt"
    skipped = []  # unreadable images or annotations: named in the log and the JSON, the rest still scored
    samples = load_dataset(args.dataset, args.mpp, skipped)
    if not samples:
        raise ValueError(f"{args.dataset}: none of its {len(skipped)} images could be evaluated (see above)")
    result = evaluate(samples, args.method, weights, args.device,
                      args.save_predictions, progress, InstanceParams(hematoxylin_gate=args.hematoxylin_gate),
                      args.tta, args.gate_unit)
    result["skipped"] = skipped
    if adapted is not None:
        result["adapted"] = {k: adapted[k] for k in ("model_id", "adapted_from", "phase_time_s", "this_run_s")}
    if args.out:
        io.write_json(args.out, result)
    print(json.dumps(result["mean"] if args.out else result, indent=None if args.out else 2))


def _cmd_export(args, progress):
    if args.format == "qupath":
        print(json.dumps({"features": to_qupath(args.nuclei, args.out), "out": str(args.out)}))
    else:
        print(json.dumps({"files": len(to_tcia(args.nuclei, args.out, args.slide_id)), "out": str(args.out)}))


def _cmd_publish(args, progress):
    # Slide ids are the names of the files' folders (results/{TYPE}/{slide_id}/nuclei.parquet).
    part = args.dataset / f"cancer_type={args.cancer_type}"
    paths = _inputs(args, args.nuclei)
    for path in paths:
        io.link_or_copy(path, part / f"slide_id={path.parent.name}" / "nuclei.parquet")
    print(json.dumps({"partition": str(part), "slides": len(paths)}))


def _cmd_demo_slide(args, progress):
    make_demo_slide(args.out, args.width, args.height, args.mpp, args.seed)


# Subcommand: (its argument builder, its handler), in the order of `nucseg --help`.
_COMMANDS = {
    "download": (_parser_download, _cmd_download),
    "cohort": (_parser_cohort, _cmd_cohort),
    "tissue": (_parser_tissue, _cmd_tissue),
    "synth": (_parser_synth, _cmd_synth),
    "refine": (_parser_refine, _cmd_refine),
    "train": (_parser_train, _cmd_train),
    "segment": (_parser_segment, _cmd_segment),
    "qc": (_parser_qc, _cmd_qc),
    "report-figures": (_parser_report_figures, _cmd_report_figures),
    "aggregate": (_parser_aggregate, _cmd_aggregate),
    "adapt": (_parser_adapt, _cmd_adapt),
    "evaluate": (_parser_evaluate, _cmd_evaluate),
    "export": (_parser_export, _cmd_export),
    "publish": (_parser_publish, _cmd_publish),
    "demo-slide": (_parser_demo_slide, _cmd_demo_slide),
}


if __name__ == "__main__":
    sys.exit(main())
