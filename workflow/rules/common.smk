# Planning-time checks, sample sheets, wildcard constraints and input functions shared by all rules.
# Everything here runs once at parse time or per job in O(1): no file system scans per job.
# Sheet and config values reach commands only as quoted arguments ({params.x:q}): they are data, never shell text.
import gc
import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

# Planning 10,000 jobs creates millions of long-lived objects, and Python's cyclic GC would rescan them
# over and over (a quarter of `snakemake -n` time on 5,060 slides). Off while the DAG is built, back on
# before any job runs (onstart; a dry run ends before it), so a days-long run collects as usual; what
# parsing made is frozen (never rescanned), which measured another ~1 s off the 5,060-slide plan.
gc.freeze()
gc.disable()


onstart:
    gc.enable()


SLIDE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
CANCER_TYPE_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]*"
SCHEMAS = Path(workflow.basedir) / "workflow" / "schemas"
# Sheet mpp values are refused outside the configured WSI-QC range unless the row's mpp_force is true,
# and outside these bounds always (a 1e-7 µm/px slide would ask for terabytes).
MPP_BOUNDS = (0.01, 20.0)


wildcard_constraints:
    slide_id=SLIDE_ID_PATTERN,
    cancer_type=CANCER_TYPE_PATTERN,
    model_name=r"[A-Za-z0-9][A-Za-z0-9._-]*",


class PlanningError(ValueError):
    """Bad configuration or sample sheet, refused before any job runs."""


def _schema_validator(name):
    schema = yaml.safe_load((SCHEMAS / name).read_text())
    return jsonschema.Draft202012Validator(schema)


def _has_key(mapping, path):
    for key in path:
        if not isinstance(mapping, dict) or key not in mapping:
            return False
        mapping = mapping[key]
    return True


def _config_origin(path):
    """The config file that sets the key at ``path`` (the last one wins, as Snakemake merges them)."""
    origin = "--config on the command line"
    # Files given with --configfile override the Snakefile's own `configfile:` (loaded after them).
    given = [str(f) for f in workflow.overwrite_configfiles or []]
    for file in [f for f in map(str, workflow.configfiles) if f not in given] + given:
        try:
            if _has_key(yaml.safe_load(Path(file).read_text()) or {}, path):
                origin = str(file)
        except (OSError, yaml.YAMLError):
            continue
    return origin


def _config_problem(error):
    path = [str(p) for p in error.absolute_path]
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        allowed = ", ".join(sorted(error.schema.get("properties", {})))
        path = path + [extra[0]]
        what = f"unknown key (allowed here: {allowed})"
    else:
        what = error.message
    return f"{_config_origin(path)}: {'.'.join(path) or '(top level)'}: {what}"


def _typed(value):
    """Numbers and booleans given as text (``--config qc="{'n_patches': 10}"`` passes nested values as strings)."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    if isinstance(value, str):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        if isinstance(parsed, (bool, int, float)):
            return parsed
    return value


def check_config(config):
    """Refuse a config whose keys, types or ranges the schema does not allow; every problem named."""
    config.update(_typed(dict(config)))
    errors = sorted(_schema_validator("config.schema.yaml").iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise PlanningError("invalid configuration:\n  " + "\n  ".join(_config_problem(e) for e in errors))


check_config(config)
validate(config, "../schemas/config.schema.yaml")  # fills in the schema's defaults


def _row_problems(row, validator, mpp_range):
    problems = [f"{'.'.join(map(str, e.absolute_path)) or 'row'}: {e.message}" for e in validator.iter_errors(row)]
    if row.get("mpp") and not problems:
        mpp = float(row["mpp"])
        force = row.get("mpp_force", "").lower() == "true"
        lo, hi = MPP_BOUNDS if force else mpp_range
        if not lo <= mpp <= hi:
            hint = "" if force else " (set the row's mpp_force to true if the scan really is that)"
            problems.append(f"mpp: {mpp} µm/px is outside [{lo}, {hi}]{hint}")
    return problems


def load_sheet(cancer_type, path, mpp_range):
    """Read one sample sheet; refuse it with every bad row named (file, line, slide id, column)."""
    if not Path(path).is_file():
        raise PlanningError(f"cohort {cancer_type}: sample sheet {path} not found")
    sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#", keep_default_na=False)
    validator = _schema_validator("samples.schema.yaml")
    problems = []
    for i, row in enumerate(sheet.to_dict("records")):
        found = _row_problems(row, validator, mpp_range)
        if not found and row["cancer_type"] != cancer_type:
            found = [f"cancer_type: {row['cancer_type']!r} in the sheet of cohort {cancer_type!r}"]
        problems += [f"{path}: data row {i + 1} (slide_id {row.get('slide_id')!r}): {p}" for p in found]
    if problems:
        raise PlanningError("invalid sample sheet:\n  " + "\n  ".join(problems[:50]))
    return sheet


def load_sheets(cohorts):
    """Read and check every sample sheet; return one frame indexed by slide_id."""
    mpp_range = (config["tissue"].get("min_mpp", 0.1), config["tissue"].get("max_mpp", 2.0))
    frames = [load_sheet(t, path, mpp_range) for t, path in cohorts.items()]
    sheets = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["slide_id"])
    dup = sheets.slide_id[sheets.slide_id.duplicated()].unique().tolist()
    if dup:
        raise PlanningError(f"slide ids appear more than once across the sample sheets: {dup[:10]}")
    return sheets.set_index("slide_id", drop=False)


SHEETS = load_sheets(config["cohorts"])
SELECTED = config.get("build") or list(config["cohorts"])
for _t in SELECTED:
    if _t not in config["cohorts"]:
        raise PlanningError(f"build: cancer type {_t!r} has no sample sheet under cohorts")
SLIDES_BY_TYPE = {t: SHEETS.index[SHEETS.cancer_type == t].tolist() for t in config["cohorts"]}
SLIDE_ROWS = SHEETS.to_dict("index")


def cfg_args(params):
    """CLI arguments from a config mapping: {tile_size: 512, weighted: false} -> ['--tile-size=512', '--no-weighted'].

    A list, each value one argument; rules pass it as ``{params.x:q}`` so every value stays one shell word.
    """
    out = []
    for key, value in (params or {}).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif value is not None:
            out.append(f"{flag}={value}")
    return out


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
    """The slide's cache folder: the slide in it keeps its own name (nucseg download --out-dir)."""
    return f"resources/slides/{cancer_type}/{slide_id}"


def _grading_module():
    """src/nucseg/grading.py, where each QC signal and its level are declared, loaded by path: planning
    needs no installed nucseg (with conda, only the jobs' environments have it)."""
    spec = importlib.util.spec_from_file_location("_nucseg_grading", Path(workflow.basedir) / "src/nucseg/grading.py")
    grading = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = grading  # dataclasses look their module up
    spec.loader.exec_module(grading)
    return grading


# Grading levels re-grade at aggregation; every other qc key is measured by the per-slide job.
QC_LEVELS = _grading_module().LEVELS


def qc_args(measure):
    """QC arguments: what the per-slide job measures (measure=True) or the grading levels applied at aggregation."""
    return cfg_args({k: v for k, v in config["qc"].items() if (k in QC_LEVELS) != measure})


def mpp_args(slide_id):
    """Per-slide mpp override from the sheet, else the configured fallback for slides without mpp."""
    override = SLIDE_ROWS[slide_id].get("mpp", "")
    args = [f"--backend={config['slide_backend']}"]
    if override:
        args.append(f"--mpp={float(override)}")
    if config.get("mpp_fallback") is not None:
        args.append(f"--mpp-fallback={config['mpp_fallback']}")
    return args


def slide_dir(cancer_type, slide_id):
    return f"results/{cancer_type}/{slide_id}"


SHIPPED_WEIGHTS = str(Path(workflow.basedir) / "src" / "nucseg" / "weights" / "default.pt")


def model_weights(cancer_type=None):
    """The weights a cancer type's segment jobs use: its adapted model (model.adapt), else the base model."""
    if config["model"]["adapt"]:
        return f"results/models/adapted/{cancer_type}/model.pt"
    return base_weights()


def base_weights():
    """The shipped model, a configured checkpoint, or the model this workflow trains."""
    choice = config["model"]["checkpoint"]
    if choice == "shipped":
        return SHIPPED_WEIGHTS
    if choice == "train":
        return f"results/models/{config['model']['name']}/model.pt"
    return choice


def train_types():
    return config["model"].get("train_cohorts") or SELECTED


def per_slide(pattern, cancer_type):
    return [pattern.format(cancer_type=cancer_type, slide_id=s) for s in SLIDES_BY_TYPE[cancer_type]]


EXPORT_PATTERNS = {"qupath": "results/export/qupath/{t}/{s}.geojson", "tcia": "results/export/tcia/{t}/{s}"}


def export_targets(kind):
    """The per-slide files of one export (qupath, tcia) for every slide of the built cancer types."""
    return [EXPORT_PATTERNS[kind].format(t=t, s=s) for t in SELECTED for s in SLIDES_BY_TYPE[t]]


def all_targets():
    targets = ["results/qc/slides.parquet", "results/qc/grades.tsv"]
    targets += [f"results/qc/{t}.parquet" for t in SELECTED]
    # The report's figures (qc.smk report_* rules).
    targets += ["results/report/grades.html", "results/report/pct_bad_patches.png",
                "results/report/nuclei_density.png", "results/report/thumbnails"]
    for kind in EXPORT_PATTERNS:
        if config["export"].get(kind):
            targets += export_targets(kind)
    return targets
