import hashlib

import pytest

from nucseg.download import DownloadError, fetch_slide, source_kind, source_url
from nucseg.slides import open_slide

from .http_server import FileServer

UUID = "0b2e8c4a-1f7e-4f3a-9d55-3c2a1b0e9f10"


def md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_source_kinds():
    assert source_kind(UUID) == "gdc"
    assert source_url(UUID, "http://x/") == f"http://x/data/{UUID}"
    assert source_kind("https://host/a.svs") == "http"
    assert source_kind("slides/a.svs") == "local"
    with pytest.raises(ValueError, match="unsupported"):
        source_kind("ftp://host/a.svs")


def test_local_source_linked_and_verified(tmp_path, demo_slide):
    out = fetch_slide(str(demo_slide), tmp_path / "s.svs", "s1", md5=md5(demo_slide),
                      size=demo_slide.stat().st_size)
    assert out.is_symlink() and out.resolve() == demo_slide.resolve()
    copied = fetch_slide(str(demo_slide), tmp_path / "c.svs", "s1", link=False)
    assert not copied.is_symlink() and copied.read_bytes() == demo_slide.read_bytes()
    with pytest.raises(DownloadError, match="slide s2: md5 mismatch"):
        fetch_slide(str(demo_slide), tmp_path / "bad.svs", "s2", md5="0" * 32)
    assert not (tmp_path / "bad.svs").exists()
    with pytest.raises(DownloadError, match="does not exist"):
        fetch_slide(str(tmp_path / "nope.svs"), tmp_path / "n.svs", "s3")


def test_gdc_download_resumes_after_drop_and_retries_5xx(tmp_path, demo_slide):
    with FileServer({UUID: demo_slide}) as server:
        server.fail_next = 2
        server.drop_after = 200_000
        out = fetch_slide(UUID, tmp_path / "g.svs", "g1", md5=md5(demo_slide),
                          size=demo_slide.stat().st_size, api_url=server.url, backoff=0.01)
        ranges = [r["range"] for r in server.requests]
    assert out.read_bytes() == demo_slide.read_bytes()
    assert ranges[:3] == [None, None, None]        # two 500s, then the dropped transfer
    # Resumed from what had reached the disk when the connection dropped.
    resumed_at = int(ranges[3].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 200_000
    assert not (tmp_path / "g.svs.part").exists()
    with open_slide(out) as slide:
        assert slide.dimensions == (1536, 1280)


def test_http_md5_mismatch_removes_partial_file(tmp_path, demo_slide):
    with FileServer({"slide.tiff": demo_slide}) as server:
        with pytest.raises(DownloadError, match="slide h1: md5 mismatch"):
            fetch_slide(f"{server.url}/files/slide.tiff", tmp_path / "h.svs", "h1", md5="f" * 32)
        with pytest.raises(DownloadError, match="size mismatch"):
            fetch_slide(f"{server.url}/files/slide.tiff", tmp_path / "h.svs", "h1", size=5)
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch_slide(f"{server.url}/files/other.tiff", tmp_path / "h.svs", "h1")
    assert not (tmp_path / "h.svs").exists() and not (tmp_path / "h.svs.part").exists()


def test_gives_up_after_retries(tmp_path, demo_slide):
    with FileServer({UUID: demo_slide}) as server:
        server.fail_next = 10
        with pytest.raises(DownloadError, match="giving up"):
            fetch_slide(UUID, tmp_path / "x.svs", "x1", api_url=server.url, retries=2, backoff=0.01)
        assert len(server.requests) == 3
