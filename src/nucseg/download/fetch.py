"""Slide acquisition: GDC file UUIDs, http(s) URLs and local paths, verified and written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests

from ..io import atomic_path

log = logging.getLogger(__name__)

GDC_API_URL = "https://api.gdc.cancer.gov"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16  # small: a dropped connection loses at most this much of what was received


FAILURE_MAGIC = b'{"nucseg_download_failure"'
FAILURE_RECORD_NAME = "download_failure.json"  # in a slide's cache folder (:func:`fetch_into`)
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class DownloadError(RuntimeError):
    """A slide could not be fetched or failed verification; the message names the slide.

    ``permanent`` is true when retrying cannot help (wrong md5/size, HTTP 4xx, missing local file).
    """

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent


def write_failure_record(path: str | os.PathLike, slide_id: str, source: str, reason: str) -> None:
    """Put a small JSON failure record where the slide would be.

    Downstream stages recognise it (:func:`read_failure_record`) and grade the slide "failed WSI QC"
    with this reason, so one bad download does not leave a hole in the cohort's tables. It is not a
    slide: every slide reader rejects it.
    """
    record = {"nucseg_download_failure": {"slide_id": slide_id, "source": source, "reason": reason,
                                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record) + "\n")


def read_failure_record(path: str | os.PathLike) -> dict | None:
    """The failure record written in place of a slide (or in its cache folder), or None if there is none."""
    if Path(path).is_dir():
        path = Path(path) / FAILURE_RECORD_NAME
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(FAILURE_MAGIC))
            if head != FAILURE_MAGIC:
                return None
            fh.seek(0)
            return json.loads(fh.read(1 << 16))["nucseg_download_failure"]
    except (OSError, ValueError, KeyError):
        return None


def source_kind(source: str) -> str:
    """Classify a sheet ``source``: ``"gdc"``, ``"http"``, ``"s3"`` or ``"local"``."""
    source = source.strip()
    if UUID_RE.match(source):
        return "gdc"
    if source.startswith(("http://", "https://")):
        return "http"
    if source.startswith("s3://"):
        return "s3"
    if "://" in source:
        raise ValueError(f"unsupported source scheme: {source!r}")
    return "local"


def source_url(source: str, api_url: str = GDC_API_URL) -> str:
    """The URL a remote source is fetched from."""
    kind = source_kind(source)
    if kind == "gdc":
        return f"{api_url.rstrip('/')}/data/{source.strip()}"
    if kind == "http":
        return source.strip()
    raise ValueError(f"not a remote source: {source!r}")


def md5sum(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, slide_id: str, md5: str | None = None, size: int | None = None) -> None:
    """Check size and md5 of ``path``; raise :class:`DownloadError` naming ``slide_id`` on mismatch."""
    if size is not None:
        actual = path.stat().st_size
        if actual != int(size):
            raise DownloadError(f"slide {slide_id}: size mismatch: expected {int(size)} bytes, got {actual}")
    if md5:
        actual_md5 = md5sum(path)
        if actual_md5.lower() != md5.lower():
            raise DownloadError(f"slide {slide_id}: md5 mismatch: expected {md5}, got {actual_md5}")


def fetch_slide(source: str, dest: str | os.PathLike, slide_id: str, *, md5: str | None = None,
                size: int | None = None, api_url: str = GDC_API_URL, retries: int = 5, timeout: float = 60.0,
                backoff: float = 1.0) -> Path:
    """Download a remote slide (GDC UUID, http(s) or s3 URL) to the file ``dest`` (:func:`fetch_into` places
    any source in a slide's cache folder).

    The file streams to ``dest + ".part"``, retries with exponential backoff (``backoff * 2**k`` seconds)
    on 5xx and network errors, is verified against ``md5``/``size`` and renamed into place. A dropped
    transfer resumes with an HTTP Range request, but only from a ``.part`` known to hold the start of the
    same file: see :func:`_resume_offset`. A file failing verification is removed and :class:`DownloadError`
    raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind = source_kind(source)
    if kind == "local":
        raise ValueError(f"{source}: a local path; place it with fetch_into")
    part = dest.with_name(dest.name + ".part")
    try:
        if kind == "s3":
            _fetch_s3(source, part, slide_id)
        else:
            _stream_with_resume(source_url(source, api_url), part, slide_id, md5=md5, size=size,
                                retries=retries, timeout=timeout, backoff=backoff)
        verify(part, slide_id, md5, size)
    except DownloadError as exc:
        if exc.permanent:
            _discard(part)  # nothing worth resuming; a transient failure keeps the .part for the next run
        raise
    os.replace(part, dest)
    _sidecar(part).unlink(missing_ok=True)
    return dest


def cache_name(source: str, slide_id: str, file_name: str | None = None) -> str:
    """The slide's file name in its cache folder: the source's own name (``file_name`` of a GDC sheet, else
    the last part of the URL or local path), so its extension and, for multi-file formats, its companion
    files keep working; only letters, digits, ``.``, ``_`` and ``-`` are kept. ``{slide_id}.svs`` for a GDC
    UUID without a file name."""
    if file_name:
        name = file_name
    elif source_kind(source) == "gdc":
        name = f"{slide_id}.svs"
    elif source_kind(source) == "local":
        name = Path(source.strip()).expanduser().name
    else:
        name = unquote(urlparse(source.strip()).path).rsplit("/", 1)[-1]
    name = _UNSAFE_NAME_CHARS.sub("_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    return name if name and name != FAILURE_RECORD_NAME else f"{slide_id}.svs"


def fetch_into(source: str, out_dir: str | os.PathLike, slide_id: str, *, file_name: str | None = None,
               md5: str | None = None, size: int | None = None, link: bool = True, **remote) -> Path:
    """Materialise a slide in the folder ``out_dir`` under its own name (:func:`cache_name`).

    A local file is linked (``link``) or copied with its companion folder when it has one (MIRAX:
    ``x.mrxs`` beside ``x/``); a local folder (e.g. a DICOM series) is linked or copied whole. Remote
    files are fetched with :func:`fetch_slide` (``remote``: ``api_url``, ``retries``, ``timeout``,
    ``backoff``) to a hidden file beside ``out_dir``, so a partial transfer outlives a rerun that empties
    the folder. ``out_dir`` appears only once complete.

    Returns
    -------
    Path
        The slide inside ``out_dir``.
    """
    out_dir = Path(out_dir)
    name = cache_name(source, slide_id, file_name)
    staging = out_dir.with_name(f".{out_dir.name}.tmp")
    _remove(staging)
    staging.mkdir(parents=True)
    try:
        if source_kind(source) == "local":
            _place_local_into(source, staging, name, slide_id, md5=md5, size=size, link=link)
        else:
            fetched = fetch_slide(source, out_dir.with_name(f".{out_dir.name}.{name}"), slide_id, md5=md5,
                                  size=size, **remote)
            os.replace(fetched, staging / name)
        _remove(out_dir)
        os.replace(staging, out_dir)
    finally:
        _remove(staging)
    return out_dir / name


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder (links inside are removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _place_local_into(source: str, folder: Path, name: str, slide_id: str, *, md5: str | None,
                      size: int | None, link: bool) -> None:
    """Link or copy a verified local slide (file, with its companion folder, or folder) into ``folder``."""
    src = Path(source).expanduser().resolve()
    if src.is_dir():
        if md5 or size:
            raise DownloadError(f"slide {slide_id}: md5/size cannot verify the folder {src}")
        _link_or_copy(src, folder / name, link)
        return
    if not src.is_file():
        raise DownloadError(f"slide {slide_id}: local source {src} does not exist")
    verify(src, slide_id, md5, size)
    _link_or_copy(src, folder / name, link)
    companion = src.with_suffix("")
    if companion.is_dir():
        _link_or_copy(companion, folder / Path(name).stem, link)
    log.info("slide %s: %s %s -> %s", slide_id, "linked" if link else "copied", src, folder / name)


def _link_or_copy(src: Path, dest: Path, link: bool) -> None:
    if link:
        dest.symlink_to(src, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dest)
    else:
        shutil.copyfile(src, dest)


def _stream_with_resume(url: str, part: Path, slide_id: str, *, md5: str | None = None,
                        size: int | None = None, retries: int, timeout: float, backoff: float) -> None:
    """Download ``url`` to ``part``, resuming what a sidecar vouches for; retry transient failures."""
    attempt = 0
    while True:
        have, record = _resume_offset(part, url, slide_id, md5=md5, size=size)
        try:
            with requests.get(url, stream=True, timeout=timeout, headers=_request_headers(have, record)) as resp:
                if resp.status_code == 416 and have:
                    if have == record.get("total"):
                        return  # all of it was already here, and If-Range says it is still current
                    raise _Restart("server refused the resume range")
                if resp.status_code >= 500:
                    raise _Retryable(f"HTTP {resp.status_code}")
                if resp.status_code >= 400:
                    raise DownloadError(f"slide {slide_id}: HTTP {resp.status_code} from {url}", permanent=True)
                if have and resp.status_code == 206:
                    _check_partial(resp, have, record)
                else:
                    have = 0  # a fresh start, or the server ignored Range / If-Range said the file changed
                    _write_sidecar(part, _new_record(url, resp, md5))
                _receive(resp, part, have, slide_id)
                return
        except _Restart as exc:
            log.warning("slide %s: %s; restarting from byte 0", slide_id, exc)
            _discard(part)
        except (_Retryable, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"slide {slide_id}: giving up on {url} after {retries} retries: {exc}",
                                    permanent=False) from exc
            wait = backoff * 2 ** (attempt - 1)
            log.warning("slide %s: %s; retry %d/%d in %.1fs", slide_id, exc, attempt, retries, wait)
            time.sleep(wait)


def _receive(resp, part: Path, have: int, slide_id: str) -> None:
    """Write the response body after the first ``have`` bytes of ``part``; raise if it ends early."""
    total = _expected_total(resp, have)
    if have:
        log.info("slide %s: resuming at byte %d", slide_id, have)
    started = last_report = time.monotonic()
    received = 0
    with open(part, "ab" if have else "wb") as fh:
        for block in resp.iter_content(STREAM_CHUNK):
            fh.write(block)
            received += len(block)
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                _report(slide_id, have + received, total, received, started)
    _report(slide_id, have + received, total, received, started)
    if total is not None and part.stat().st_size < total:
        raise _Retryable(f"connection closed at {part.stat().st_size}/{total} bytes")


def _sidecar(part: Path) -> Path:
    """Where the record of what ``part`` holds is kept: ``X.svs.part.json``."""
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _sidecar(part).unlink(missing_ok=True)


def _new_record(url: str, resp, md5: str | None) -> dict:
    """What a fresh download of ``url`` holds: source, size, server validators and the sheet's md5."""
    return {"url": url, "total": _expected_total(resp, 0), "etag": resp.headers.get("ETag"),
            "last_modified": resp.headers.get("Last-Modified"), "md5": md5.lower() if md5 else None}


def _write_sidecar(part: Path, record: dict) -> None:
    # Atomic: a torn sidecar must read as "unknown", never as another file's record.
    with atomic_path(_sidecar(part)) as tmp:
        tmp.write_text(json.dumps(record) + "\n")


def _read_sidecar(part: Path) -> dict | None:
    try:
        record = json.loads(_sidecar(part).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _resume_offset(part: Path, url: str, slide_id: str, *, md5: str | None,
                   size: int | None) -> tuple[int, dict]:
    """The bytes of ``part`` that may be kept, and its sidecar record; anything else is discarded.

    A leftover ``.part`` is resumed only when its sidecar names this URL, the sheet's md5 and size, holds
    no more than the recorded total, and the file can be checked for change: a server validator (sent as
    If-Range) or the sheet's md5 (checked after download). Otherwise another source's bytes could be
    spliced in front of this one's.
    """
    if not part.exists():
        _sidecar(part).unlink(missing_ok=True)
        return 0, {}
    have, record = part.stat().st_size, _read_sidecar(part)
    why = _unresumable(record, have, url, md5, size)
    if why is None:
        return have, record
    log.warning("slide %s: discarding leftover %s (%s)", slide_id, part.name, why)
    _discard(part)
    return 0, {}


def _unresumable(record: dict | None, have: int, url: str, md5: str | None, size: int | None) -> str | None:
    """Why a ``.part`` of ``have`` bytes with sidecar ``record`` cannot be resumed, or None if it can."""
    if record is None:
        return "no readable record of its source"
    total = record.get("total")
    if record.get("url") != url:
        return f"it is from {record.get('url')!r}"
    if record.get("md5") != (md5.lower() if md5 else None):
        return "the expected md5 changed"
    if total is not None and (have > total or (size is not None and int(size) != total)):
        return f"it does not fit the expected size {total if size is None else size}"
    if not (_if_range(record) or md5):
        return "the server gave no validator and there is no md5 to check a resumed file by"
    return None


def _if_range(record: dict) -> str | None:
    """The If-Range value for ``record``: a strong ETag, else Last-Modified (weak ETags may not be used)."""
    etag = record.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return record.get("last_modified")


def _request_headers(have: int, record: dict) -> dict:
    if not have:
        return {}
    headers = {"Range": f"bytes={have}-"}
    if validator := _if_range(record):
        headers["If-Range"] = validator  # a changed file comes back whole (200), not as a mismatched tail
    return headers


def _check_partial(resp, have: int, record: dict) -> None:
    """Raise :class:`_Restart` unless a 206 answer continues the recorded file at byte ``have``.

    Guards against servers that ignore If-Range: the range start, total and validators must agree.
    """
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
    if m is None or int(m.group(1)) != have:
        raise _Restart(f"partial answer does not start at byte {have}")
    total = record.get("total")
    if m.group(2) != "*" and total is not None and int(m.group(2)) != total:
        raise _Restart(f"the file's size changed from {total} to {m.group(2)} bytes")
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        now = resp.headers.get(header)
        if record.get(key) and now and now != record[key]:
            raise _Restart(f"the file changed ({header} {record[key]} -> {now})")


def _report(slide_id: str, have: int, total: int | None, received: int, started: float) -> None:
    rate = received / max(time.monotonic() - started, 1e-6) / 1e6
    of = f" of {total}" if total else ""
    log.info("slide %s: %d%s bytes (%.1f MB/s)", slide_id, have, of, rate)


def _fetch_s3(source: str, part: Path, slide_id: str) -> None:
    """Anonymous S3 download through fsspec/s3fs (optional extra: ``pip install nucseg[s3]``)."""
    try:
        import fsspec  # optional extra (nucseg[s3]): only s3:// sources need it
    except ImportError as exc:
        raise DownloadError(f"slide {slide_id}: s3:// sources need fsspec and s3fs installed") from exc
    try:
        with fsspec.open(source, "rb", anon=True) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, CHUNK)
    except (ImportError, ValueError) as exc:
        raise DownloadError(f"slide {slide_id}: cannot read {source}: {exc}") from exc
    except OSError as exc:
        raise DownloadError(f"slide {slide_id}: cannot read {source}: {exc}", permanent=False) from exc


def _expected_total(resp, have: int) -> int | None:
    length = resp.headers.get("Content-Length")
    return have + int(length) if length is not None else None


class _Retryable(Exception):
    pass


class _Restart(Exception):
    """The ``.part`` cannot be continued: discard it and download from byte 0 (not a retry)."""
