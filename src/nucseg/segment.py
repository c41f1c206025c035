"""Whole-slide nucleus segmentation: tiled inference over tissue, seam-free instance ownership.

The slide is cut into blocks on a grid at the working resolution. Each block has a *core* (its grid
cell) and a *read region* (the core grown by a margin wider than the largest nucleus). The network and
instance extraction run on the read region; a nucleus is kept only by the block whose core contains
its centroid, so every nucleus belongs to exactly one block and none is cut at a block border
(the scheme of stardist's ``big.py``).

Centroid ownership alone can still keep a nucleus twice: two neighbouring blocks may outline a nucleus
on their shared border slightly differently, with the two versions' centroids on either side of it.
:class:`SeamFilter` drops a nucleus that overlaps one already kept by an earlier neighbouring block.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import math
import multiprocessing
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import shapely
import torch
from shapely.geometry import Polygon, box
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import io
from .inference import image_instances
from .instances import InstanceParams, gate_unit_for, hematoxylin_level, instance_table
from .model import load_weights, predict, resolve_device
from .slides import open_slide, resolve_mpp
from .stain import hematoxylin_od, tissue_pixels
from .tissue import mask_to_polygons, seed_from, slide_tissue

log = logging.getLogger(__name__)

def _nuclei_schema() -> dict:
    f64 = pa.float64()
    return {"centroid_x": f64, "centroid_y": f64, "area_um2": f64, "perimeter_um": f64, "eccentricity": f64,
            "solidity": f64, "mean_hematoxylin_od": f64, "tile_x": pa.int64(), "tile_y": pa.int64(), "score": f64}


NUCLEI_SCHEMA = _nuclei_schema()


@dataclass(frozen=True)
class SegmentParams:
    tile_size: int = 512          # block core edge at the working resolution (px)
    # Read margin: wider than the largest nucleus and than the reach of the network's border effects
    # (16 µm gave duplicated/missed nuclei at block seams with the depth-4 model).
    margin_um: float = 32.0
    batch_size: int = 4           # 512-px blocks per network batch; larger blocks go fewer at a time
    workers: int = 0              # DataLoader processes reading tiles
    # Processes extracting instances and features (1: one thread beside the network). Raise on GPU nodes,
    # where this CPU work, not the network, sets the pace (README "Whole-slide inference").
    postprocess_workers: int = 1
    device: str = "auto"
    row_group_size: int = 50_000  # nuclei per Parquet row group (bounds the writer's memory)
    foreground_threshold: float = 0.5
    marker_threshold: float = 0.5     # two-output models: foreground minus boundary
    center_threshold: float = 0.5     # three-output models: the centre map
    min_area_um2: float = 6.0
    max_area_um2: float = 400.0
    # Foreground only above the slide's hematoxylin Otsu level. Off by default: over the four annotated
    # sources it cost 0.004 AJI on average and up to 0.018 on one (docs/model.md, "The hematoxylin gate").
    hematoxylin_gate: bool = False
    # With the gate on, what it removes: "pixel"s below the level or whole "nucleus"es mostly below it; "auto":
    # by the slide type, nucleus for FFPE (DX), pixel for frozen sections and unknown (instances.gate_unit_for).
    gate_unit: str = "auto"
    # Test-time augmentation: the network's outputs averaged over this many flips / quarter turns (1-8).
    # Costs tta x the network's time; at 8, AJI +0.009 on MoNuSeg, -0.010 on CryoNuSeg (docs/experiments.md).
    tta: int = 1

    def margin_px(self, mpp_work: float) -> int:
        """The read margin in working px, rounded up to a multiple of 8."""
        return math.ceil(self.margin_um / mpp_work / 8) * 8

    def instance_params(self, slide_type: str = "") -> InstanceParams:
        """Instance extraction parameters for a slide of ``slide_type`` (DX, TS, BS, MS or "")."""
        unit = gate_unit_for(slide_type, self.gate_unit)
        return InstanceParams(foreground_threshold=self.foreground_threshold,
                              marker_threshold=self.marker_threshold, center_threshold=self.center_threshold,
                              min_area_um2=self.min_area_um2, max_area_um2=self.max_area_um2,
                              hematoxylin_gate=self.hematoxylin_gate, gate_unit=unit)


@dataclass(frozen=True)
class Block:
    """A block in working-resolution pixels: core ``[cx, cx+core) × [cy, cy+core)`` and its read origin."""

    cx: int
    cy: int
    core: int
    margin: int

    @property
    def read_origin(self) -> tuple[int, int]:
        return self.cx - self.margin, self.cy - self.margin

    @property
    def read_size(self) -> int:
        return self.core + 2 * self.margin


def plan_blocks(slide_size: tuple[int, int], scale: float, core: int, margin: int,
                tissue: shapely.Geometry | None) -> list[Block]:
    """Blocks whose core intersects ``tissue`` (level-0 geometry; None = whole slide).

    ``scale`` is working px per level-0 px.
    """
    work_w, work_h = math.ceil(slide_size[0] * scale), math.ceil(slide_size[1] * scale)
    if tissue is not None:
        shapely.prepare(tissue)
    blocks = []
    for cy in range(0, work_h, core):
        for cx in range(0, work_w, core):
            if tissue is not None:
                cell = box(cx / scale, cy / scale, (cx + core) / scale, (cy + core) / scale)
                if not tissue.intersects(cell):
                    continue
            blocks.append(Block(cx, cy, core, margin))
    return blocks


class BlockReader(Dataset):
    """Reads each block's read region at the working resolution (white outside the slide).

    The slide is opened lazily in each DataLoader worker (slide handles cannot be pickled).
    """

    def __init__(self, path, backend: str, blocks: list[Block], scale: float):
        self.path, self.backend, self.blocks, self.scale = path, backend, blocks, scale
        self._slide = None

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int):
        if self._slide is None:
            self._slide = open_slide(self.path, self.backend)
        b = self.blocks[i]
        return i, self._slide.read_grid(b.read_origin, (b.read_size, b.read_size), self.scale)


def load_tissue(path) -> tuple[shapely.Geometry | None, dict]:
    """Union of the tissue polygons of a ``tissue.parquet`` and its provenance (mpp, status)."""
    gdf = gpd.read_parquet(path)
    meta = io.read_provenance(path)
    geom = shapely.union_all(gdf.geometry.values) if len(gdf) else shapely.Polygon()
    return geom, meta


def segment_slide(slide_path, out_path, weights, *, tissue_path=None, slide_id: str | None = None,
                  mpp_override: float | None = None, mpp_fallback: float | None = None,
                  backend: str = "auto", params: SegmentParams = SegmentParams(), slide_type: str = "",
                  extra_metadata: dict | None = None, progress: bool = True) -> dict:
    """Segment every nucleus of a slide's tissue and write a GeoParquet 1.1 file.

    Parameters
    ----------
    weights : path
        Model weights (``model.pt``).
    tissue_path : path, optional
        ``tissue.parquet`` of the tissue stage: its polygons restrict inference and its metadata gives
        the slide mpp. If its status is ``failed`` an empty nuclei file is written (graded by QC).
        Without it, the tissue is detected here with :func:`nucseg.tissue.tissue_mask`.
    slide_type : str
        TCGA slide type (DX: FFPE; TS, BS, MS: frozen; "" unknown): sets the hematoxylin gate's unit
        when ``params.gate_unit`` is ``auto``. Recorded as ``gate_unit`` in the file's metadata.

    Returns
    -------
    dict
        Summary: number of nuclei, blocks, seconds, mpp.
    """
    started = time.monotonic()
    slide_id = slide_id or Path(slide_path).stem
    net = _Network.load(weights, params, slide_type)  # the run's, not the slide's: an error fails the job
    tissue, tissue_meta = (load_tissue(tissue_path) if tissue_path else (None, {}))
    meta = {"slide_id": slide_id, "model_id": net.model_id, "mpp_work": net.mpp,
            "status": tissue_meta.get("status", "ok"),
            "gate_unit": net.instances.gate_unit if params.hematoxylin_gate else "off", **(extra_metadata or {})}
    counts = {"n_blocks": 0, "n_seam_duplicates": 0}
    writer = io.GeoParquetWriter(out_path, NUCLEI_SCHEMA, row_group_size=params.row_group_size)
    try:
        if meta["status"] == "ok":
            with open_slide(slide_path, backend) as slide:
                facts = _slide_facts(slide, net.mpp, tissue, tissue_meta, slide_id, mpp_override, mpp_fallback)
            meta.update(mpp=facts["mpp"], mpp_source=facts["mpp_source"], hematoxylin_level=facts["level"])
            counts = _segment_into(writer, slide_path, backend, net, facts, progress)
    except Exception as exc:  # this slide's problem: recorded in an empty file's metadata, graded by QC
        writer.abort()
        reason = f"{type(exc).__name__}: {exc}"
        log.error("slide %s: segmentation failed: %s", slide_id, reason)
        meta.update(status="failed", failure_stage="segment", failure_reason=reason)
        writer = io.GeoParquetWriter(out_path, NUCLEI_SCHEMA, row_group_size=params.row_group_size)
    except BaseException:
        writer.abort()
        raise
    meta["seconds"] = round(time.monotonic() - started, 2)
    writer.close(io.provenance(**meta))
    summary = {"n_nuclei": writer.n_rows, **counts, "device": net.device.type, **meta}
    log.info("slide %s: %d nuclei in %d blocks (%d seam duplicates dropped), %.1f s on %s", slide_id,
             writer.n_rows, counts["n_blocks"], counts["n_seam_duplicates"], meta["seconds"], net.device.type)
    return summary


@dataclass(frozen=True)
class _Network:
    """The run's model, where it runs, its working resolution (µm/px) and how its output becomes nuclei."""

    model: torch.nn.Module
    device: torch.device
    mpp: float
    model_id: str
    params: SegmentParams
    instances: InstanceParams

    @classmethod
    def load(cls, weights, params: SegmentParams, slide_type: str = "") -> _Network:
        device = resolve_device(params.device)
        model, meta = load_weights(weights, device)
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
        return cls(model, device, float(meta.get("mpp", 0.25)), meta["model_id"], params,
                   params.instance_params(slide_type))


def _slide_facts(slide, mpp_work: float, tissue, tissue_meta: dict, slide_id: str, mpp_override: float | None,
                 mpp_fallback: float | None) -> dict:
    """The slide's µm/px and its source, size, ``scale`` (working px per level-0 px), tissue (detected here
    without a tissue file) and hematoxylin ``level``."""
    if "mpp" in tissue_meta and mpp_override is None:
        mpp, mpp_source = float(tissue_meta["mpp"]), tissue_meta.get("mpp_source", "slide")
    else:
        info = resolve_mpp(slide.mpp, mpp_override, mpp_fallback)
        mpp, mpp_source = info.mpp, info.source
    if tissue is None:
        tissue = _detect_tissue(slide, mpp)
    scale = mpp / mpp_work
    # Measured with or without the gate: QC lowers its stain floor to it on faded slides.
    level = slide_hematoxylin_level(slide, tissue, scale, mpp_work, seed_from(slide_id))
    return {"mpp": mpp, "mpp_source": mpp_source, "size": slide.dimensions, "scale": scale, "tissue": tissue,
            "level": level}


def _segment_into(writer, slide_path, backend: str, net: _Network, facts: dict, progress: bool) -> dict:
    """Segment the slide's tissue (:func:`_slide_facts`) block by block into ``writer``."""
    margin = net.params.margin_px(net.mpp)
    core = max(net.model.multiple, net.params.tile_size // net.model.multiple * net.model.multiple)
    blocks = plan_blocks(facts["size"], facts["scale"], core, margin, facts["tissue"])
    reader = BlockReader(slide_path, backend, blocks, facts["scale"])
    if facts["level"] is None:  # no contrast on the slide: nothing to gate at
        net = replace(net, instances=replace(net.instances, hematoxylin_gate=False))
    seams = SeamFilter(facts["scale"], margin)
    for frame, outlines, owners in _segment_blocks(reader, net, facts["tissue"], facts["level"], progress):
        keep = seams.filter(outlines, [blocks[i] for i in owners])
        writer.write(frame.iloc[keep].reset_index(drop=True), outlines.take(keep))
    return {"n_blocks": len(blocks), "n_seam_duplicates": seams.n_dropped}


def slide_hematoxylin_level(slide, tissue, scale: float, mpp_work: float, seed: int, n: int = 16,
                             size: int = 256) -> float | None:
    """The slide's hematoxylin level (:func:`nucseg.instances.hematoxylin_level`) from ``n`` windows of
    ``size`` working px centred at random tissue points (``tissue``: level-0 geometry, None = anywhere),
    over their stained pixels (:func:`nucseg.stain.tissue_pixels`).

    One level per slide, from windows placed independently of the blocks, so the gate and therefore the
    nuclei do not depend on the tiling. Glass and lumens are left out: the level splits nuclei from the
    rest of the tissue, and windows along a tissue border would otherwise pull it down (5-13 % for a
    MoNuSeg tile alone on glass, 16 % on the CMU slide). None when no window has any contrast.
    """
    rng = np.random.default_rng(seed)
    w, h = slide.dimensions
    x0, y0, x1, y1 = tissue.bounds if tissue is not None and not tissue.is_empty else (0, 0, w, h)
    centres = []
    for _ in range(50 * n):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        if tissue is None or tissue.is_empty or shapely.contains_xy(tissue, x, y):
            centres.append((x, y))
            if len(centres) == n:
                break
    windows = [slide.read_grid((round(x * scale) - size // 2, round(y * scale) - size // 2), (size, size), scale)
               for x, y in centres]
    if not windows:
        return None
    return hematoxylin_level([hematoxylin_od(win) for win in windows], mpp_work,
                             [tissue_pixels(win) for win in windows])


def _detect_tissue(slide, mpp: float):
    """Tissue as the tissue stage defines it (default parameters), for runs without ``--tissue-mask``."""
    _, scale, _, mask = slide_tissue(slide, mpp)
    return shapely.union_all(mask_to_polygons(mask, scale))


def _segment_blocks(reader: BlockReader, net: _Network, tissue, level: float | None, progress: bool):
    """Yield ``(features frame, outlines, block index of each nucleus)`` per batch of blocks, in block order.

    Tiles are read in DataLoader workers; instance extraction and features of a batch run in a thread (or
    ``params.postprocess_workers`` processes) while the network processes the next ones. At most
    ``postprocess_workers + 1`` batches are in flight, so memory stays bounded.
    """
    params = net.params
    loader = DataLoader(reader, batch_size=blocks_per_batch(params.batch_size, reader.blocks),
                        num_workers=params.workers, collate_fn=_collate, pin_memory=net.device.type == "cuda")
    if tissue is not None and tissue.is_empty:
        tissue = None
    context = {"scale": reader.scale, "mpp_work": net.mpp, "inst_params": net.instances,
               "tissue": tissue, "level": level}
    workers = max(1, params.postprocess_workers)
    pending = deque()
    with _postprocess_pool(workers, context) as (pool, postprocess, send):
        for batch in tqdm(loader, desc="segment", unit="batch", disable=not progress):
            ids, images = [i for i, _ in batch], np.stack([img for _, img in batch])
            probs = predict(net.model, images, net.device, params.tta)
            pending.append(pool.submit(postprocess, ids, *send(images, probs), [reader.blocks[i] for i in ids]))
            while len(pending) > workers:
                yield pending.popleft().result()
                _release_freed_memory()
        while pending:
            yield pending.popleft().result()


def blocks_per_batch(batch_size: int, blocks: list[Block]) -> int:
    """Blocks per network batch: ``batch_size`` counts 512-px blocks, so the pixels of a batch, and the
    network's activations that dominate a job's memory, stay the same whatever the tile size (1024-px tiles:
    one block at a time; peak RSS 1.4 GB instead of 3.5 GB with four, docs/cluster.md)."""
    core = blocks[0].core if blocks else 512
    return max(1, batch_size * 512**2 // core**2)


@contextlib.contextmanager
def _postprocess_pool(workers: int, context: dict):
    """An executor, the function it runs on ``(ids, images, probs, blocks)`` and how the arrays are sent to it:
    one thread, or ``workers`` processes that receive ``context`` (the tissue geometry above all) once instead of
    with every batch, and the arrays through shared memory (:class:`_SharedRing`; at most ``workers + 1``
    batches are in flight, :func:`_segment_blocks`)."""
    if workers == 1:
        if context["tissue"] is not None:
            shapely.prepare(context["tissue"])
        with ThreadPoolExecutor(max_workers=1) as pool:
            yield pool, functools.partial(_postprocess_arrays, **context), lambda *arrays: arrays
        return
    # spawn, not fork: forking a process that runs torch's thread pools can deadlock the children.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_postprocess_worker, initargs=(context,)) as pool:
        yield pool, _postprocess_in_worker, _SharedRing(workers + 2)


_WORKER_CONTEXT: dict = {}


def _init_postprocess_worker(context: dict) -> None:
    cv2.setNumThreads(1)  # one core per worker process
    torch.set_num_threads(1)
    if context["tissue"] is not None:
        shapely.prepare(context["tissue"])
    _WORKER_CONTEXT.update(context)


def _postprocess_in_worker(ids, images, probs, blocks):
    return _postprocess_arrays(ids, images, probs, blocks, **_WORKER_CONTEXT)


def _postprocess_arrays(ids, images, probs, blocks, **context):
    """:func:`postprocess_blocks` of blocks ``ids`` from their stacked read regions and probabilities (arrays, or
    torch tensors in shared memory)."""
    images, probs = np.asarray(images), np.asarray(probs)
    return postprocess_blocks(list(zip(ids, images, strict=True)), probs, blocks, **context)


def _holds(buffer: torch.Tensor, array: np.ndarray) -> bool:
    """Whether ``buffer``'s first rows can take ``array``."""
    return buffer.shape[1:] == array.shape[1:] and len(buffer) >= len(array) and buffer.numpy().dtype == array.dtype


class _SharedRing:
    """Sends a batch's arrays to post-processing processes through a ring of ``slots`` shared-memory buffers.

    Each array is copied into its slot's buffer (torch tensors in /dev/shm, allocated on first use and then
    reused), and multiprocessing sends the processes only a handle to it: the main process's CPU per 640² block
    and its probabilities is about 2 ms, against about 6 ms pickled through a pipe and 5 ms in fresh shared memory
    (``benchmarks/throughput.py``, freed memory handed back after each batch as here). A slot is written again
    ``slots`` batches later, when the batch that used it is done (fewer than ``slots`` are in flight). When
    /dev/shm cannot hold the ring twice over (a container's default is 64 MB) the arrays go by pipe instead.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self._buffers: list[list[torch.Tensor]] = [[] for _ in range(slots)]
        self._sent = 0
        self._shared: bool | None = None  # decided at the first batch

    def __call__(self, *arrays: np.ndarray) -> tuple:
        if self._shared is None:
            try:
                room = shutil.disk_usage("/dev/shm").free
            except OSError:
                room = 0
            self._shared = room > 2 * self.slots * sum(a.nbytes for a in arrays)
        if not self._shared:
            return arrays
        buffers = self._buffers[self._sent % self.slots]
        self._sent += 1
        if len(buffers) != len(arrays) or not all(map(_holds, buffers, arrays)):
            buffers[:] = [torch.empty(a.shape, dtype=torch.from_numpy(a).dtype).share_memory_() for a in arrays]
        for a, b in zip(arrays, buffers, strict=True):
            b.numpy()[:len(a)] = a
        return tuple(b[:len(a)] for a, b in zip(arrays, buffers, strict=True))


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc).

    The network's large, short-lived activation buffers and the postprocessing thread fragment glibc's
    heap: without this, peak RSS creeps up with the number of blocks (measured: 1.9 GB instead of 1.5 GB
    on a 6,144² slide), i.e. with slide size.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _load_libc()


def _collate(items):
    return items


def postprocess_blocks(batch, probs, blocks, scale: float, mpp_work: float, inst_params: InstanceParams,
                       tissue, level: float | None) -> tuple[pd.DataFrame, io.EncodedGeometries, list[int]]:
    """The nuclei a batch of blocks owns, from the network's outputs on their read regions: instances
    (:func:`nucseg.inference.image_instances`), ownership, then outlines and features of the owned ones only.

    A nucleus belongs to the block whose core holds its centroid (and, with ``tissue``, only when that
    centroid is on tissue); the others, most of them in the read margin, are neither outlined nor measured.

    Parameters
    ----------
    batch : list of (int, ndarray (H, W, 3) uint8)
        Each block's index and its read region at the working resolution.
    probs : ndarray (N, C, H, W) float32
        The network's probabilities on the read regions, in the batch's order.
    blocks : list of Block
        The batch's blocks, in its order.
    scale : float
        Working px per level-0 px.
    mpp_work : float
        The working resolution (µm/px).
    inst_params : InstanceParams
    tissue : shapely geometry or None
        Level-0 tissue (prepared, for speed); None: everywhere.
    level : float or None
        The slide's hematoxylin level for the gate (:func:`slide_hematoxylin_level`).

    Returns
    -------
    frame : DataFrame
        One row per nucleus, the columns of :data:`NUCLEI_SCHEMA` (level-0 px and µm).
    outlines : nucseg.io.EncodedGeometries
        The nuclei's valid outlines (polygons), level-0 px, encoded for the hand-over to the writer.
    owners : list of int
        The block index (from ``batch``) of each nucleus.
    """
    columns, vertices, lengths, owners = [], [], [], []
    for (i, image), prob, block in zip(batch, probs, blocks, strict=True):
        hema = hematoxylin_od(image)
        labels = image_instances(image, prob, mpp_work, inst_params, level, hematoxylin=hema)
        points, starts, feats = instance_table(labels, hema, prob[0], inst_params.foreground_threshold,
                                               select=functools.partial(_owned, block=block, scale=scale,
                                                                        tissue=tissue))
        if not len(feats):
            continue
        rx, ry = block.read_origin
        columns.append({
            "centroid_x": (feats.centroid_x.to_numpy() + rx) / scale,
            "centroid_y": (feats.centroid_y.to_numpy() + ry) / scale,
            "area_um2": feats.area_px.to_numpy() * mpp_work**2,
            "perimeter_um": feats.perimeter_px.to_numpy() * mpp_work, "eccentricity": feats.eccentricity.to_numpy(),
            "solidity": feats.solidity.to_numpy(), "mean_hematoxylin_od": feats.mean_hematoxylin_od.to_numpy(),
            "tile_x": np.full(len(feats), round(block.cx / scale), np.int64),
            "tile_y": np.full(len(feats), round(block.cy / scale), np.int64), "score": feats.score.to_numpy()})
        vertices.append((points + (rx, ry)) / scale)
        lengths.append(np.diff(np.r_[starts, len(points)]))
        owners.extend([i] * len(feats))
    if not columns:
        return pd.DataFrame(columns=list(NUCLEI_SCHEMA)), io.EncodedGeometries.of([]), []
    frame = pd.DataFrame({name: np.concatenate([c[name] for c in columns]) for name in NUCLEI_SCHEMA})
    # Marching-squares rings are simple: valid polygons, written as WKB without GEOS (tests/test_instances.py).
    return frame, io.EncodedGeometries.polygons(np.concatenate(vertices), np.concatenate(lengths)), owners


def _owned(ids: np.ndarray, cx: np.ndarray, cy: np.ndarray, block: Block, scale: float, tissue) -> np.ndarray:
    """Which instances of ``block``'s read region (labels ``ids``, centroids ``cx``, ``cy`` in its pixels) the
    block owns: those whose centroid lies in its core (and on ``tissue``, level-0, when given)."""
    rx, ry = block.read_origin
    lx, ly = cx + rx, cy + ry
    own = (lx >= block.cx) & (lx < block.cx + block.core) & (ly >= block.cy) & (ly < block.cy + block.core)
    if tissue is not None and own.any():
        own[own] = shapely.contains_xy(tissue, lx[own] / scale, ly[own] / scale)
    return own


class SeamFilter:
    """Drops nuclei already kept, in another outline, by an earlier neighbouring block.

    Blocks arrive in raster order, so a block's earlier neighbours are the one to its left and the three
    above it. Each kept nucleus whose bounding box comes within ``reach`` of its block's core border is
    remembered for the blocks after it (two rows of blocks at most); a later nucleus sharing at least
    ``min_overlap`` of the smaller of the two areas with one of them is the same nucleus and is dropped.
    Distinct neighbours share a few border pixels at most, so both stay.

    Parameters
    ----------
    scale : float
        Working px per level-0 px (blocks are in working px, polygons in level-0 px).
    reach : float
        Distance from the core border, in working px, within which a nucleus can have a twin in the
        neighbouring block (the read margin).
    """

    def __init__(self, scale: float, reach: float, min_overlap: float = 0.3):
        self.scale, self.reach, self.min_overlap = scale, reach, min_overlap
        self._border: dict[tuple[int, int], list[Polygon]] = {}
        self.n_dropped = 0

    def filter(self, outlines: io.EncodedGeometries, blocks: list[Block]) -> np.ndarray:
        """Indices of ``outlines`` (owned by ``blocks``, given in raster order) that are no duplicates.

        Only the outlines whose bounding box meets an earlier neighbour's border nucleus are decoded.
        """
        by_block: dict[Block, list[int]] = {}
        for k, block in enumerate(blocks):
            by_block.setdefault(block, []).append(k)
        keep = []
        for block, mine in by_block.items():
            mine = np.array(mine)
            earlier = [p for dx, dy in ((-1, 0), (-1, -1), (0, -1), (1, -1))
                       for p in self._border.get((block.cx + dx * block.core, block.cy + dy * block.core), [])]
            kept = mine[~self._duplicates(outlines.take(mine), earlier)]
            keep.extend(kept)
            self.n_dropped += len(mine) - len(kept)
            self._remember(block, outlines.take(kept))
        return np.array(sorted(keep), dtype=np.int64)

    def _duplicates(self, outlines: io.EncodedGeometries, earlier: list[Polygon]) -> np.ndarray:
        dup = np.zeros(len(outlines), bool)
        if not len(outlines) or not earlier:
            return dup
        earlier = np.array(earlier, dtype=object)
        mine, theirs = shapely.STRtree(earlier).query(shapely.box(*outlines.bounds.T))  # bounding boxes meet
        if len(mine):
            a, b = shapely.from_wkb(outlines.wkb[mine]), earlier[theirs]
            shared = shapely.area(shapely.intersection(a, b))
            same = shapely.intersects(a, b) & (shared >= self.min_overlap * np.minimum(shapely.area(a),
                                                                                        shapely.area(b)))
            dup[mine[same]] = True
        return dup

    def _remember(self, block: Block, outlines: io.EncodedGeometries) -> None:
        # Blocks above the previous row can neighbour no later block.
        for key in [k for k in self._border if k[1] < block.cy - block.core]:
            del self._border[key]
        if not len(outlines):
            return
        x0, y0, x1, y1 = outlines.bounds.T * self.scale
        near = ((x0 < block.cx + self.reach) | (y0 < block.cy + self.reach)
                | (x1 > block.cx + block.core - self.reach) | (y1 > block.cy + block.core - self.reach))
        self._border[(block.cx, block.cy)] = list(outlines.take(near).decode())
