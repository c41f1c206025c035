# Sample sheets, wildcard constraints and input functions shared by all rules.
# Everything here runs once at parse time or per job in O(1): no file system scans per job.
import gc
import hashlib
import json
import re
from pathlib import Path

import pandas as pd

# Planning 10,000 jobs creates millions of long-lived objects, and Python's cyclic GC would rescan them
# over and over (a quarter of `snakemake -n` time on 5,060 slides). Off while the DAG is built, back on
# before any job runs (onstart; a dry run ends before it), so a days-long run collects as usual; what
# parsing made is frozen (never rescanned), which measured another ~1 s off the 5,060-slide plan.
gc.freeze()
gc.disable()


onstart:
    gc.enable()


SLIDE_ID_PATTERN = r"[A-Za-z0-9._-]+"
CANCER_TYPE_PATTERN = r"[A-Za-z0-9_-]+"


wildcard_constraints:
    slide_id=SLIDE_ID_PATTERN,
    cancer_type=CANCER_TYPE_PATTERN,
    model_name=r"[A-Za-z0-9._-]+",


def load_sheets(cohorts):
    """Read and validate every sample sheet; return one frame indexed by slide_id."""
    frames = []
    for cancer_type, path in cohorts.items():
        if not Path(path).is_file():
            raise ValueError(f"cohort {cancer_type}: sample sheet {path} not found")
        sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#").fillna("")
        validate(sheet, "../schemas/samples.schema.yaml")
        wrong = sheet.loc[sheet.cancer_type != cancer_type, "slide_id"].tolist()
        if wrong:
            raise ValueError(f"{path}: rows {wrong[:5]} have a cancer_type other than {cancer_type}")
        frames.append(sheet)
    sheets = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["slide_id"])
    dup = sheets.slide_id[sheets.slide_id.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"slide ids appear more than once across the sample sheets: {dup[:10]}")
    return sheets.set_index("slide_id", drop=False)


SHEETS = load_sheets(config["cohorts"])
SELECTED = config.get("build") or list(config["cohorts"])
for _t in SELECTED:
    if _t not in config["cohorts"]:
        raise ValueError(f"build: cancer type {_t!r} has no sample sheet under cohorts")
SLIDES_BY_TYPE = {t: SHEETS.index[SHEETS.cancer_type == t].tolist() for t in config["cohorts"]}
SLIDE_ROWS = SHEETS.to_dict("index")


def cfg_flags(params):
    """CLI flags from a config mapping: {tile_size: 512, weighted: false} -> '--tile-size 512 --no-weighted'."""
    out = []
    for key, value in (params or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out.append(flag + " " + " ".join(str(v) for v in value))
        elif value is not None:
            out.append(f"{flag} {value}")
    return " ".join(out)


# How a segment job runs, not what it computes. These travel to the job as resources, which are no rerun
# trigger, and stay out of the config hashes: changing them (in the config, or with --set-resources)
# segments nothing again.
SEGMENT_RUNTIME = {k: config["segment"].get(k, default)
                   for k, default in (("workers", 0), ("postprocess_workers", 1), ("batch_size", 4))}
SEGMENT_SETTINGS = {k: v for k, v in config["segment"].items() if k not in SEGMENT_RUNTIME}


def config_hash(*sections, **values):
    """Hash of the config sections (and other named values) that determine an output (recorded as provenance)."""
    blob = json.dumps({**{s: config.get(s) for s in sections}, **values}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def slide_path(cancer_type, slide_id):
    return f"resources/slides/{cancer_type}/{slide_id}.svs"


QC_LEVELS = ("max_disagreement", "max_entropy", "min_recall", "min_precision", "max_shape_outliers", "bad_score")


def qc_flags(measure):
    """QC flags: what the per-slide job measures (measure=True) or the grading levels applied at aggregation."""
    return cfg_flags({k: v for k, v in config["qc"].items() if (k in QC_LEVELS) != measure})


def mpp_flags(slide_id):
    """Per-slide mpp override from the sheet, else the configured fallback for slides without mpp."""
    override = SLIDE_ROWS[slide_id].get("mpp", "")
    flags = [f"--backend {config['slide_backend']}"]
    if override:
        flags.append(f"--mpp {float(override)}")
    if config.get("mpp_fallback") is not None:
        flags.append(f"--mpp-fallback {config['mpp_fallback']}")
    return " ".join(flags)


def slide_dir(cancer_type, slide_id):
    return f"results/{cancer_type}/{slide_id}"


def model_weights():
    """A configured checkpoint, or the model this workflow trains."""
    if config["model"].get("checkpoint"):
        return config["model"]["checkpoint"]
    return f"results/models/{config['model']['name']}/model.pt"


def train_types():
    return config["model"].get("train_cohorts") or SELECTED


def per_slide(pattern, cancer_type):
    return [pattern.format(cancer_type=cancer_type, slide_id=s) for s in SLIDES_BY_TYPE[cancer_type]]


def all_targets():
    targets = ["results/qc/slides.parquet", "results/qc/grades.tsv"]
    targets += [f"results/qc/{t}.parquet" for t in SELECTED]
    # The report's figures (qc.smk report_* rules).
    targets += ["results/report/grades.html", "results/report/pct_bad_patches.png",
                "results/report/nuclei_density.png", "results/report/thumbnails"]
    return targets
