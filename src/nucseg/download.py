"""Slide acquisition: GDC file UUIDs, http(s) URLs and local paths, verified and written atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

GDC_API_URL = "https://api.gdc.cancer.gov"
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
CHUNK = 1 << 20
STREAM_CHUNK = 1 << 16  # small: a dropped connection loses at most this much of what was received


class DownloadError(RuntimeError):
    """A slide could not be fetched or failed verification; the message names the slide."""


def source_kind(source: str) -> str:
    """Classify a sheet ``source``: ``"gdc"``, ``"http"`` or ``"local"``."""
    source = source.strip()
    if UUID_RE.match(source):
        return "gdc"
    if source.startswith(("http://", "https://")):
        return "http"
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
                size: int | None = None, api_url: str = GDC_API_URL, link: bool = True,
                retries: int = 5, timeout: float = 60.0, backoff: float = 1.0) -> Path:
    """Materialise a slide at ``dest`` from a GDC UUID, http(s) URL or local path.

    Remote files stream to ``dest + ".part"``, resume with HTTP Range after a dropped connection,
    retry with exponential backoff (``backoff * 2**k`` seconds) on 5xx and network errors, are verified against ``md5``/``size``
    and renamed into place. A local file is symlinked (``link=True``) or copied, and verified too.
    A file failing verification is removed and :class:`DownloadError` raised.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    kind = source_kind(source)
    if kind == "local":
        src = Path(source).expanduser().resolve()
        if not src.is_file():
            raise DownloadError(f"slide {slide_id}: local source {src} does not exist")
        verify(src, slide_id, md5, size)
        tmp = dest.with_name(dest.name + ".part")
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        if link:
            tmp.symlink_to(src)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        log.info("slide %s: %s %s -> %s", slide_id, "linked" if link else "copied", src, dest)
        return dest

    url = source_url(source, api_url)
    part = dest.with_name(dest.name + ".part")
    _stream_with_resume(url, part, slide_id, retries=retries, timeout=timeout, backoff=backoff)
    try:
        verify(part, slide_id, md5, size)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def _stream_with_resume(url: str, part: Path, slide_id: str, *, retries: int, timeout: float,
                        backoff: float) -> None:
    import requests

    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        try:
            with requests.get(url, stream=True, timeout=timeout, headers=headers) as resp:
                if resp.status_code == 416 and have:
                    return  # server says nothing left past what we have
                if resp.status_code >= 500:
                    raise _Retryable(f"HTTP {resp.status_code}")
                if resp.status_code >= 400:
                    raise DownloadError(f"slide {slide_id}: HTTP {resp.status_code} from {url}")
                if have and resp.status_code != 206:
                    have = 0  # server ignored Range: start over
                total = _expected_total(resp, have)
                mode = "ab" if have else "wb"
                started, received = time.monotonic(), 0
                with open(part, mode) as fh:
                    for block in resp.iter_content(STREAM_CHUNK):
                        fh.write(block)
                        received += len(block)
                rate = received / max(time.monotonic() - started, 1e-6) / 1e6
                log.info("slide %s: %d bytes received (%.1f MB/s), %d in file", slide_id, received,
                         rate, have + received)
                if total is not None and part.stat().st_size < total:
                    raise _Retryable(f"connection closed at {part.stat().st_size}/{total} bytes")
                return
        except (_Retryable, requests.ConnectionError, requests.Timeout,
                requests.exceptions.ChunkedEncodingError) as exc:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"slide {slide_id}: giving up on {url} after {retries} retries: {exc}")
            wait = backoff * 2 ** (attempt - 1)
            log.warning("slide %s: %s; retry %d/%d in %.1fs", slide_id, exc, attempt, retries, wait)
            time.sleep(wait)


def _expected_total(resp, have: int) -> int | None:
    length = resp.headers.get("Content-Length")
    return have + int(length) if length is not None else None


class _Retryable(Exception):
    pass
