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
    from nucseg.download import fetch_into

    out = fetch_into(str(demo_slide), tmp_path / "s", "s1", md5=md5(demo_slide), size=demo_slide.stat().st_size)
    assert out.is_symlink() and out.resolve() == demo_slide.resolve()
    copied = fetch_into(str(demo_slide), tmp_path / "c", "s1", link=False)
    assert not copied.is_symlink() and copied.read_bytes() == demo_slide.read_bytes()
    with pytest.raises(DownloadError, match="slide s2: md5 mismatch"):
        fetch_into(str(demo_slide), tmp_path / "bad", "s2", md5="0" * 32)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(DownloadError, match="does not exist"):
        fetch_into(str(tmp_path / "nope.svs"), tmp_path / "n", "s3")
    with pytest.raises(ValueError, match="fetch_into"):
        fetch_slide(str(demo_slide), tmp_path / "x.svs", "s4")


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
    assert list(tmp_path.iterdir()) == []   # no record of the failed download is left either


def test_gives_up_after_retries(tmp_path, demo_slide):
    with FileServer({UUID: demo_slide}) as server:
        server.fail_next = 10
        with pytest.raises(DownloadError, match="giving up"):
            fetch_slide(UUID, tmp_path / "x.svs", "x1", api_url=server.url, retries=2, backoff=0.01)
        assert len(server.requests) == 3


# Resuming a .part: only the start of the same file may be continued (tests with the real HTTP server).

@pytest.fixture
def changed_slide(tmp_path, demo_slide):
    """The demo slide with bytes 16-4095 changed: same size, another file."""
    data = bytearray(demo_slide.read_bytes())
    data[16:4096] = bytes(b ^ 0x5A for b in data[16:4096])
    path = tmp_path / "served" / "changed.tiff"
    path.parent.mkdir()
    path.write_bytes(bytes(data))
    return path


def interrupt(server, source, dest, **kw):
    """A download of ``source`` that drops after 200 kB and is not retried: leaves ``dest.part``."""
    server.drop_after = 200_000
    with pytest.raises(DownloadError, match="giving up") as err:
        fetch_slide(source, dest, "r1", retries=0, **kw)
    assert not err.value.permanent
    part = dest.with_name(dest.name + ".part")
    assert part.stat().st_size > 4096
    server.requests.clear()
    return part


def test_leftover_part_without_record_is_discarded(tmp_path, demo_slide, changed_slide):
    """A .part of unknown origin (here: the start of another file, no md5 on the sheet) is not resumed."""
    dest = tmp_path / "out" / "a.svs"
    dest.parent.mkdir()
    dest.with_name("a.svs.part").write_bytes(changed_slide.read_bytes()[:200_000])
    with FileServer({UUID: demo_slide}) as server:
        fetch_slide(UUID, dest, "a1", api_url=server.url)
    assert [r["range"] for r in server.requests] == [None]
    assert dest.read_bytes() == demo_slide.read_bytes()
    assert list(dest.parent.iterdir()) == [dest]


def test_part_of_another_source_is_discarded(tmp_path, demo_slide, changed_slide):
    dest = tmp_path / "b.svs"
    with FileServer({"old": changed_slide, "new": demo_slide}) as server:
        interrupt(server, f"{server.url}/data/old", dest)
        fetch_slide(f"{server.url}/data/new", dest, "b1")
    assert [r["range"] for r in server.requests] == [None]
    assert dest.read_bytes() == demo_slide.read_bytes()
    assert set(tmp_path.iterdir()) == {changed_slide.parent, dest}


def test_interrupted_download_of_the_same_source_resumes(tmp_path, demo_slide):
    dest = tmp_path / "c.svs"
    with FileServer({UUID: demo_slide}) as server:
        part = interrupt(server, UUID, dest, api_url=server.url)
        have = part.stat().st_size
        fetch_slide(UUID, dest, "c1", api_url=server.url)
    etag = f'"{md5(demo_slide)}"'
    assert [(r["range"], r["if_range"]) for r in server.requests] == [(f"bytes={have}-", etag)]
    assert dest.read_bytes() == demo_slide.read_bytes()
    assert list(tmp_path.iterdir()) == [dest]


@pytest.mark.parametrize("honour_if_range", [True, False], ids=["if-range", "server-ignores-if-range"])
def test_changed_file_restarts_from_zero(tmp_path, demo_slide, changed_slide, honour_if_range):
    """The file behind the URL changed since the interruption (same size, new ETag): a whole new download.

    A server honouring If-Range answers the resume request with the whole file; one that ignores it sends
    the new file's tail, which the client must recognise by its ETag and throw away."""
    dest = tmp_path / "d.svs"
    with FileServer({UUID: changed_slide}) as server:
        server.honour_if_range = honour_if_range
        interrupt(server, UUID, dest, api_url=server.url)
        server.files[UUID] = demo_slide
        fetch_slide(UUID, dest, "d1", api_url=server.url)
    ranges = [r["range"] for r in server.requests]
    assert ranges[0] is not None and server.requests[0]["if_range"] == f'"{md5(changed_slide)}"'
    assert len(ranges) == (1 if honour_if_range else 2) and ranges[1:] in ([], [None])
    assert dest.read_bytes() == demo_slide.read_bytes()


@pytest.mark.parametrize("with_md5", [False, True])
def test_without_validators_resumes_only_when_md5_checks(tmp_path, demo_slide, with_md5):
    """A server sending neither ETag nor Last-Modified cannot say whether the file changed: the .part is
    resumed only if the sheet's md5 will check the result."""
    dest = tmp_path / "e.svs"
    kw = {"md5": md5(demo_slide)} if with_md5 else {}
    with FileServer({UUID: demo_slide}) as server:
        server.validators = False
        have = interrupt(server, UUID, dest, api_url=server.url, **kw).stat().st_size
        fetch_slide(UUID, dest, "e1", api_url=server.url, **kw)
    assert [r["range"] for r in server.requests] == [f"bytes={have}-" if with_md5 else None]
    assert server.requests[0]["if_range"] is None
    assert dest.read_bytes() == demo_slide.read_bytes()


def test_cache_folder_keeps_the_sources_own_name(tmp_path, demo_slide):
    """nucseg download --out-dir: the slide keeps its name and extension, hostile characters dropped."""
    from nucseg.download import cache_name, fetch_into

    assert cache_name(UUID, "S1") == "S1.svs"
    assert cache_name(UUID, "S1", "TCGA-XX.uuid.svs") == "TCGA-XX.uuid.svs"
    assert cache_name("https://h/a/slide%201.ndpi?sig=x", "S1") == "slide_1.ndpi"
    assert cache_name("/data/it's $(id) `x`.mrxs", "S1") == "it_s_id_x_.mrxs"
    assert cache_name("https://h/", "S1") == "S1.svs"
    weird = tmp_path / "src" / "it's $(touch INJECTED).tiff"
    weird.parent.mkdir()
    weird.symlink_to(demo_slide)
    out = fetch_into(str(weird), tmp_path / "cache" / "S1", "S1", md5=md5(demo_slide))
    assert out.parent == tmp_path / "cache" / "S1" and out.suffix == ".tiff" and out.resolve() == demo_slide
    with open_slide(out.parent) as slide:       # the folder opens as its slide
        assert slide.dimensions == (1536, 1280)
    assert not list(tmp_path.rglob("INJECTED*")) and [p.name for p in (tmp_path / "cache").iterdir()] == ["S1"]


def test_multi_file_slides_bring_their_folders_and_removal_never_follows_links(tmp_path, demo_slide):
    """A MIRAX-like file keeps its companion folder; a folder source (e.g. DICOM) is linked whole; a
    rerun replaces the cache folder without touching the sources it links to."""
    from nucseg.download import fetch_into

    src = tmp_path / "src"
    (src / "slide").mkdir(parents=True)
    (src / "slide.mrxs").write_bytes(demo_slide.read_bytes())
    (src / "slide" / "Data0000.dat").write_bytes(b"data")
    out = fetch_into(str(src / "slide.mrxs"), tmp_path / "cache" / "M1", "M1")
    assert out.name == "slide.mrxs" and (out.parent / "slide" / "Data0000.dat").read_bytes() == b"data"
    series = tmp_path / "series"
    series.mkdir()
    (series / "level0.dcm").write_bytes(demo_slide.read_bytes())
    linked = fetch_into(str(series), tmp_path / "cache" / "D1", "D1")
    with open_slide(linked.parent) as slide:   # the folder's only entry is the series: its slide file
        assert slide.path.name == "level0.dcm"
    copied = fetch_into(str(series), tmp_path / "cache" / "D1", "D1", link=False)  # a rerun replaces it
    assert not copied.is_symlink() and (copied / "level0.dcm").is_file()
    assert (series / "level0.dcm").is_file() and (src / "slide" / "Data0000.dat").is_file()
    with pytest.raises(DownloadError, match="cannot verify the folder"):
        fetch_into(str(series), tmp_path / "cache" / "D2", "D2", md5="0" * 32)
    assert not (tmp_path / "cache" / "D2").exists() and not (tmp_path / "cache" / ".D2.tmp").exists()


def test_remote_slide_named_after_the_url_and_resumed_beside_its_folder(tmp_path, demo_slide):
    from nucseg.download import fetch_into

    with FileServer({"slide.tiff": demo_slide}) as server:
        server.drop_after = 200_000
        out = fetch_into(f"{server.url}/files/slide.tiff", tmp_path / "S1", "S1", md5=md5(demo_slide), backoff=0.01)
        ranges = [r["range"] for r in server.requests]
    assert out == tmp_path / "S1" / "slide.tiff" and out.read_bytes() == demo_slide.read_bytes()
    assert ranges[0] is None and ranges[1].startswith("bytes=")   # resumed from the .part beside the folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S1"]
