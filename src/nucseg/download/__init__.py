"""Acquisition stage: GDC cohort sheets and verified, resumable slide downloads."""

from .fetch import (FAILURE_RECORD_NAME, GDC_API_URL, DownloadError, cache_name, fetch_into, fetch_slide,
                    read_failure_record, source_kind, source_url, write_failure_record)
from .gdc import SEED_PROJECTS, build_cohort, cohort_from_manifest, parse_barcode, safe_slide_id, write_sheet

__all__ = ["FAILURE_RECORD_NAME", "GDC_API_URL", "DownloadError", "SEED_PROJECTS", "build_cohort", "cache_name",
           "cohort_from_manifest", "fetch_into", "fetch_slide", "parse_barcode", "read_failure_record",
           "safe_slide_id", "source_kind", "source_url", "write_failure_record", "write_sheet"]
