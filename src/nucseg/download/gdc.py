"""Cohort sample sheets from the GDC: the files endpoint (paged) or a Data Transfer Tool manifest."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from pathlib import Path

import pandas as pd
import requests

from ..io import atomic_path
from .fetch import GDC_API_URL

log = logging.getLogger(__name__)

# The TCIA release's ten cancer types plus the four unofficial ones (COAD, READ, STAD, UVM).
SEED_PROJECTS = ("BLCA", "BRCA", "CESC", "GBM", "LUAD", "LUSC", "PAAD", "PRAD", "SKCM", "UCEC",
                 "COAD", "READ", "STAD", "UVM")
STRATEGIES = {"diagnostic": ["Diagnostic Slide"], "tissue": ["Tissue Slide"],
              "all": ["Diagnostic Slide", "Tissue Slide"]}
SHEET_COLUMNS = ["slide_id", "cancer_type", "source", "file_name", "md5", "size", "case_id",
                 "slide_barcode", "slide_type"]
SLIDE_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
BARCODE_RE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})-[0-9]{2}[A-Z]-[0-9]{2}-([A-Z]{2})[0-9A-Z]*$")
FIELDS = ["file_id", "file_name", "md5sum", "file_size", "cases.project.project_id", "cases.submitter_id",
          "experimental_strategy"]


class CohortError(ValueError):
    """A cohort cannot be built; the message names the file or row and the reason."""


def safe_slide_id(name: str) -> str:
    """A slide id from a file name, safe as a path component.

    ``TCGA-A1-A0SB-01Z-00-DX1.<uuid>.svs`` → ``TCGA-A1-A0SB-01Z-00-DX1``. Raises :class:`CohortError` for
    anything that could escape ``resources/`` or ``results/`` (separators, ``..``, absolute paths).
    """
    if not name or "/" in name or "\\" in name or name.startswith(("..", "~")) or os.path.isabs(name):
        raise CohortError(f"unsafe slide file name {name!r}: no paths, separators or '..' allowed")
    stem = name.split(".", 1)[0] if name.upper().startswith("TCGA-") else Path(name).stem
    if not SLIDE_ID_RE.match(stem) or stem in (".", ".."):
        raise CohortError(f"unsafe slide id {stem!r} from file name {name!r}: "
                          "only letters, digits, '.', '_' and '-' are allowed")
    return stem


def parse_barcode(name: str) -> dict:
    """Case barcode, slide barcode and slide type (DX/TS/BS/MS) of a TCGA slide file name."""
    barcode = name.split(".", 1)[0]
    m = BARCODE_RE.match(barcode)
    if not m:
        return {"case_id": "", "slide_barcode": barcode, "slide_type": ""}
    slide_type = m.group(2) if m.group(2) in ("DX", "TS", "BS", "MS") else ""
    return {"case_id": m.group(1), "slide_barcode": barcode, "slide_type": slide_type}


def files_query(project: str, slide_type: str = "diagnostic") -> dict:
    """The ``filters`` of a GDC files query for the open SVS slides of one project."""
    if slide_type not in STRATEGIES:
        raise CohortError(f"--slide-type must be one of {sorted(STRATEGIES)}, not {slide_type!r}")
    project_id = project if project.startswith("TCGA-") else f"TCGA-{project}"

    def eq(field, value):
        return {"op": "in", "content": {"field": field, "value": value if isinstance(value, list) else [value]}}

    return {"op": "and", "content": [
        eq("cases.project.project_id", project_id), eq("data_type", "Slide Image"), eq("data_format", "SVS"),
        eq("access", "open"), eq("experimental_strategy", STRATEGIES[slide_type])]}


def query_files(project: str, slide_type: str = "diagnostic", api_url: str = GDC_API_URL,
                page_size: int = 500, timeout: float = 60.0) -> list[dict]:
    """All hits of the files query, paging until the reported total is reached."""
    hits, start = [], 0
    while True:
        body = {"filters": files_query(project, slide_type), "fields": ",".join(FIELDS), "format": "JSON",
                "size": page_size, "from": start, "sort": "file_name:asc"}
        resp = requests.post(f"{api_url.rstrip('/')}/files", json=body, timeout=timeout)
        if resp.status_code != 200:
            raise CohortError(f"GDC files query for {project} failed: HTTP {resp.status_code}: {resp.text[:200]}")
        data = resp.json()["data"]
        page = data["hits"]
        hits.extend(page)
        total = int(data["pagination"]["total"])
        start += len(page)
        log.info("%s: %d of %d files", project, len(hits), total)
        if not page or start >= total:
            return hits


def sheet_from_hits(hits: list[dict], cancer_type: str) -> pd.DataFrame:
    """Sample sheet rows from GDC file hits (ids made unique where two files share a barcode)."""
    rows = []
    for hit in hits:
        name = hit["file_name"]
        projects = {c.get("project", {}).get("project_id", "") for c in hit.get("cases", [])}
        rows.append({"slide_id": safe_slide_id(name), "cancer_type": cancer_type, "source": hit["file_id"],
                     "file_name": name, "md5": hit.get("md5sum", ""), "size": str(hit.get("file_size", "")),
                     **parse_barcode(name), "_project": ",".join(sorted(projects))})
    return _dedupe(pd.DataFrame(rows, columns=SHEET_COLUMNS + ["_project"])).drop(columns="_project")


def _dedupe(sheet: pd.DataFrame) -> pd.DataFrame:
    dup = sheet.slide_id.duplicated(keep=False)
    sheet.loc[dup, "slide_id"] = sheet.loc[dup, "slide_id"] + "." + sheet.loc[dup, "source"].str[:8]
    return sheet.sort_values("slide_id", ignore_index=True)


def build_cohort(project: str, slide_type: str = "diagnostic", api_url: str = GDC_API_URL) -> pd.DataFrame:
    """The sample sheet of one TCGA project's open slides, from the GDC files endpoint."""
    cancer_type = project.removeprefix("TCGA-")
    hits = query_files(project, slide_type, api_url)
    if not hits:
        raise CohortError(f"the GDC returned no open SVS slides for {project} ({slide_type})")
    return sheet_from_hits(hits, cancer_type)


def cohort_from_manifest(path: str | os.PathLike, cancer_type: str) -> pd.DataFrame:
    """A sample sheet from a GDC Data Transfer Tool manifest (``id filename md5 size state``)."""
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t")
        missing = {"id", "filename"} - set(reader.fieldnames or [])
        if missing:
            raise CohortError(f"{path}: not a GDC manifest, missing column(s) {sorted(missing)}")
        hits = [{"file_id": r["id"], "file_name": r["filename"], "md5sum": r.get("md5", ""),
                 "file_size": r.get("size", "")} for r in reader]
    if not hits:
        raise CohortError(f"{path}: the manifest lists no files")
    return sheet_from_hits(hits, cancer_type)


def write_sheet(sheet: pd.DataFrame, out: str | os.PathLike, header_note: str = "") -> None:
    """Write a sample sheet (TSV) atomically, with an optional ``#`` comment line on top."""
    with atomic_path(out, suffix=".tsv") as tmp:
        with open(tmp, "w", newline="") as fh:
            if header_note:
                fh.write(f"# {header_note}\n")
            sheet.to_csv(fh, sep="\t", index=False)


def query_note(project: str, slide_type: str, api_url: str) -> str:
    return json.dumps({"gdc": api_url, "project": project, "slide_type": slide_type})
