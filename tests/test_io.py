"""Atomic outputs: written through a temporary file, yet with the permissions of an ordinary file."""

import os
import stat

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely

from nucseg import io


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask-{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def write_all(folder):
    """One file through each atomic writer of :mod:`nucseg.io`; returns their paths."""
    from nucseg.segment import NUCLEI_SCHEMA

    frame = pd.DataFrame({"a": [1, 2]})
    polys = [shapely.box(0, 0, 2, 2), shapely.box(3, 3, 5, 6)]
    io.write_json(folder / "x.json", {"a": np.int64(1)})
    io.write_npz(folder / "x.npz", a=np.zeros(3))
    io.write_png(folder / "x.png", np.zeros((4, 4, 3), np.uint8))
    io.write_table(folder / "t.parquet", frame, io.provenance(stage="test"))
    io.write_geoparquet(folder / "g.parquet", gpd.GeoDataFrame(frame, geometry=polys), io.provenance())
    nuclei = pd.DataFrame({c: np.arange(2, dtype="int64" if c.startswith("tile") else "float64")
                           for c in NUCLEI_SCHEMA})
    with io.GeoParquetWriter(folder / "n.parquet", NUCLEI_SCHEMA) as writer:
        writer.write(nuclei, polys)
    with io.atomic_path(folder / "plain.txt") as tmp:
        tmp.write_text("hello\n")
    io.link_or_copy(folder / "plain.txt", folder / "linked.txt")
    return sorted(folder.iterdir())


def test_atomic_outputs_honour_the_umask(tmp_path, umask):
    written = write_all(tmp_path)
    assert [p.name for p in written] == ["g.parquet", "linked.txt", "n.parquet", "plain.txt", "t.parquet",
                                         "x.json", "x.npz", "x.png"]   # and no temporary file left
    assert {p.name: oct(mode(p)) for p in written} == {p.name: oct(0o666 & ~umask) for p in written}


def test_temporary_files_are_new_and_hidden_beside_the_output(tmp_path, umask):
    first, second = io.temp_beside(tmp_path / "a.parquet"), io.temp_beside(tmp_path / "b.parquet")
    assert first.parent == tmp_path and first.name.startswith(".a.parquet.") and first.name.endswith(".tmp.parquet")
    assert first.stat().st_size == 0 and mode(first) == 0o666 & ~umask
    assert io.temp_beside(tmp_path / "a.parquet") != first and not first.exists()   # stale leftover removed
    assert second.exists()
