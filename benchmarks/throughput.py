"""Whole-slide inference throughput and peak memory (a benchmark, not a test; prints JSON).

Builds large pyramidal TIFF slides at 0.25 µm/px (40x) from real tissue (a mosaic of the MoNuSeg tiles in
../shared/data/nuclei/monuseg, randomly flipped/rotated; only the images, never the annotations), then
measures, every rate with its pixels named (``level0``: slide pixels at 0.25 µm/px; ``working``: pixels at the
model's resolution, 0.5 µm/px for the shipped model, a quarter as many):
  * read-only: reading every block through the DataLoader, no network;
  * network-only: the U-Net on in-memory batches of the blocks' read size, in a fresh process just before and
    just after each slide's end-to-end run (their mean is that slide's network-only rate);
  * post-processing per core (``postprocess_working_mpx_per_s_per_core``): ``nucseg.segment.postprocess_blocks``
    (gate, instance extraction, ownership, outlines, features, polygons) on real network outputs of 24 blocks of the
    largest slide, one thread in a fresh process, after one warm-up block; the CPU time of the median of 3 runs,
    each after a garbage collection (``..._wall``: wall-clock time); ``--baseline-src`` times another checkout's
    code on the same blocks, alternating with this one (``--rounds``), and reports the speed-up; with it, the
    hand-over that post-processing processes add (``handover_pickle_ms_per_block``, in the worker) and the main
    process's serial share (``main_process_ms_per_block``: unpickle, seam filter, GeoParquet rows), which bounds a
    many-core node, and the main process's CPU to send a batch's inputs to the processes
    (``input_handover_*_main_cpu_ms_per_block``: pickled through a pipe, in fresh shared memory, or through the ring
    of shared buffers ``nucseg segment`` uses);
  * end-to-end: ``nucseg segment`` (read + network + post-processing + GeoParquet), per slide size, with its
    peak RSS in a fresh process (memory must not grow with the slide), and its ratio to the network-only rate
    around it, in working pixels (the top-level ratio: the largest slide's);
  * the fixed per-slide cost (model load, gate level, worker start): the intercept of end-to-end seconds
    against pixels over the sizes (needs two sizes or more);
  * slides per hour for a TCGA 40x slide with 2.4 gigapixels of tissue, from that fit.

    python benchmarks/throughput.py --sizes 4000 8000 [--checkpoint model.pt] [--tta 8] [--out t.json]
    git worktree add /tmp/base HEAD~1 && python benchmarks/throughput.py --postprocess-only --sizes 8000 \
        --baseline-src /tmp/base/src --rounds 3       # before/after of a post-processing change
    python benchmarks/throughput.py --device cuda --sizes 8000 40000 --workers 4 --postprocess-workers 12 \
        --batch-size 16        # the GPU recipe (docs/cluster.md): one H100/H200 node with 16 cores

Generated slides go to a temporary folder and are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MONUSEG = REPO.parent / "shared" / "data" / "nuclei" / "monuseg" / "images"


def build_slide(path: Path, size: int, seed: int = 0, tile: int = 512) -> None:
    """A size×size pyramidal JPEG TIFF mosaic of real H&E tiles, written tile by tile (bounded memory)."""
    import cv2
    import tifffile

    sources = [tifffile.imread(p)[..., :3] for p in sorted(MONUSEG.glob("*.tif"))]
    if not sources:
        raise SystemExit(f"no MoNuSeg images under {MONUSEG}")
    rng = np.random.default_rng(seed)
    n = -(-size // tile)
    choice = rng.integers(len(sources), size=(n, n))
    k = rng.integers(4, size=(n, n))
    offsets = rng.integers(0, 1000 - tile, size=(n, n, 2))

    def block(j, i):
        src = sources[choice[j, i]]
        y, x = offsets[j, i]
        return np.ascontiguousarray(np.rot90(src[y:y + tile, x:x + tile], k[j, i]))

    def tiles(ds):
        step = tile // ds
        for j in range(n):
            for i in range(n):
                b = block(j, i)
                yield cv2.resize(b, (step, step), interpolation=cv2.INTER_AREA) if ds > 1 else b

    res = 1e4 / 0.25
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level, ds in enumerate((1, 4, 16)):
            side = n * tile // ds
            t = tile // ds if ds > 1 else tile
            tif.write(tiles(ds), shape=(side, side, 3), dtype=np.uint8, tile=(t, t), compression="jpeg",
                      photometric="rgb", resolution=(res / ds, res / ds), resolutionunit="CENTIMETER",
                      subfiletype=1 if level else 0)


def default_checkpoint() -> Path:
    from nucseg.cli import default_weights

    try:
        return default_weights()
    except FileNotFoundError:
        demo = REPO / "results" / "models" / "demo" / "model.pt"
        if demo.is_file():
            return demo
        raise SystemExit("no model: pass --checkpoint (or run `make demo` first)") from None


def read_only(slide: Path, tile: int, workers: int) -> float:
    """Level-0 Mpx/s of reading every block of ``slide`` through the DataLoader."""
    from torch.utils.data import DataLoader

    from nucseg.segment import BlockReader, plan_blocks
    from nucseg.slides import open_slide

    with open_slide(slide) as s:
        dims = s.dimensions
    blocks = plan_blocks(dims, 1.0, tile, 64, None)
    loader = DataLoader(BlockReader(slide, "tiffslide", blocks, 1.0), batch_size=4, num_workers=workers,
                        collate_fn=lambda x: x)
    started = time.perf_counter()
    for _ in loader:
        pass
    return dims[0] * dims[1] / 1e6 / (time.perf_counter() - started)


def _model(checkpoint: Path, device: str):
    import torch

    from nucseg.model import load_weights, resolve_device

    dev = resolve_device(device)
    model, meta = load_weights(checkpoint, dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    return model, dev, float(meta.get("mpp", 0.25))


def network_only(checkpoint: Path, tile: int, device: str, tta: int = 1, batch: int = 4, batches: int = 6) -> float:
    """Working-resolution Mpx/s (core pixels, as end-to-end counts them) of the network on in-memory batches."""
    from nucseg.model import predict
    from nucseg.segment import Block, SegmentParams, blocks_per_batch

    model, dev, mpp_work = _model(checkpoint, device)
    # The same read size and blocks per batch as `nucseg segment`: core plus the margin on both sides.
    margin = SegmentParams().margin_px(mpp_work)
    batch = blocks_per_batch(batch, [Block(0, 0, tile, margin)])
    images = np.random.default_rng(0).integers(0, 255, (batch, tile + 2 * margin, tile + 2 * margin, 3),
                                               dtype=np.uint8)
    predict(model, images, dev)  # warm-up
    _sync(dev)
    started = time.perf_counter()
    for _ in range(batches):
        predict(model, images, dev, tta)
    _sync(dev)
    return batches * batch * tile * tile / 1e6 / (time.perf_counter() - started)


def network_only_fresh(checkpoint: Path, args) -> float:
    """:func:`network_only` in a fresh process, as end-to-end runs (the parent's heap and threads stay out)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import throughput; "
            "a = sys.argv; print(throughput.network_only(a[1], int(a[2]), a[3], int(a[4]), int(a[5])))")
    proc = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(args.tile_size), args.device,
                           str(args.tta), str(args.batch_size)], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


POSTPROCESS_TIMER = """
import gc, json, pickle, sys, tempfile, time
from pathlib import Path
import cv2, numpy as np, torch
torch.set_num_threads(1)
cv2.setNumThreads(1)
from nucseg import io, segment
data = np.load(sys.argv[1])
blocks = [segment.Block(*map(int, b)) for b in data["blocks"]]
batch, probs = list(enumerate(data["images"])), data["probs"]
scale, mpp_work, level = float(data["scale"]), float(data["mpp_work"]), float(data["level"])
level = None if np.isnan(level) else level
# The public entry point; checkouts from before it was public (a --baseline-src) had it private.
postprocess = getattr(segment, "postprocess_blocks", None) or segment._postprocess_batch
REPEATS = 3


# Seconds to pickle a result in the worker, and for the main process to unpickle it, drop seam duplicates
# and add its rows to the open file (the serial part on a many-core node); the fastest of 3 (the first uses of
# the writer and the tree, and garbage collections, come in bursts).
def handover(result, writer):
    times = []
    for _ in range(3):
        started = time.perf_counter()
        blob = pickle.dumps(result)
        pickled = time.perf_counter()
        frame, outlines, owners = pickle.loads(blob)
        keep = segment.SeamFilter(scale, blocks[0].margin).filter(outlines, [blocks[i] for i in owners])
        writer.write(frame.iloc[keep].reset_index(drop=True),
                     outlines.take(keep) if hasattr(outlines, "take") else [outlines[k] for k in keep])
        times.append((pickled - started, time.perf_counter() - pickled))
    return np.min(times, axis=0)


out = {}
for name, gated in (("no_gate", False), ("gate", True)):
    params = segment.SegmentParams(hematoxylin_gate=gated).instance_params("DX")
    args = (scale, mpp_work, params, None, level if gated else None)
    # Once before timing: one-off costs (lazy imports, loading compiled code) belong to the per-slide cost.
    postprocess(batch[:1], probs[:1], blocks[:1], *args)
    cpu, wall = [], []
    for _ in range(REPEATS):  # the median of a few, each from a clean heap (a full collection lands at random)
        gc.collect()
        started, started_cpu = time.perf_counter(), time.process_time()
        result = postprocess(batch, probs, blocks, *args)
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    with tempfile.TemporaryDirectory() as tmp:
        with io.GeoParquetWriter(Path(tmp) / "n.parquet", segment.NUCLEI_SCHEMA) as writer:
            pickled, main = handover(result, writer)
    mpx = len(blocks) * int(data["tile"]) ** 2 / 1e6
    out[name] = {"postprocess_working_mpx_per_s_per_core": mpx / float(np.median(cpu)),
                 "postprocess_working_mpx_per_s_wall": mpx / float(np.median(wall)),
                 "handover_pickle_ms_per_block": 1e3 * pickled / len(blocks),
                 "main_process_ms_per_block": 1e3 * main / len(blocks), "n_nuclei": len(result[0])}
print(json.dumps(out))
"""


def postprocess_inputs(slide: Path, checkpoint: Path, tile: int, device: str, out: Path, n_blocks: int = 24) -> None:
    """Save to ``out`` (npz) ``n_blocks`` blocks from the middle of ``slide``, read as ``nucseg segment`` reads
    them, the network's probabilities on them and the slide's hematoxylin level."""
    from nucseg.model import predict
    from nucseg.segment import BlockReader, SegmentParams, plan_blocks, slide_hematoxylin_level
    from nucseg.slides import open_slide

    model, dev, mpp_work = _model(checkpoint, device)
    with open_slide(slide) as s:
        dims, mpp = s.dimensions, s.mpp
        scale = mpp / mpp_work
        level = slide_hematoxylin_level(s, None, scale, mpp_work, seed=0)
    margin = SegmentParams().margin_px(mpp_work)
    blocks = plan_blocks(dims, scale, tile, margin, None)
    mid = max(0, len(blocks) // 2 - n_blocks // 2)
    blocks = blocks[mid:mid + n_blocks]
    reader = BlockReader(slide, "tiffslide", blocks, scale)
    images = np.stack([reader[i][1] for i in range(len(blocks))])
    probs = np.concatenate([predict(model, images[k:k + 4], dev) for k in range(0, len(images), 4)])
    np.savez(out, images=images, probs=probs, blocks=np.array([(b.cx, b.cy, b.core, b.margin) for b in blocks]),
             scale=scale, mpp_work=mpp_work, level=np.nan if level is None else level, tile=tile)


def _time_postprocess(inputs: Path, src: Path | None) -> dict:
    """One fresh single-threaded process's post-processing rates on ``inputs`` (``nucseg`` from ``src``, a
    checkout's ``src`` folder, when given)."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", POSTPROCESS_TIMER, str(inputs)], capture_output=True, text=True,
                          check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def postprocess_per_core(slide: Path, checkpoint: Path, tile: int, device: str, work: Path, n_blocks: int = 24,
                         baseline_src: Path | None = None, rounds: int = 1) -> dict:
    """Working-resolution Mpx/s (core pixels) of one core's post-processing (``nucseg.segment.postprocess_blocks``:
    gate, extraction, ownership, outlines, features, polygons) on the network's real outputs for ``n_blocks``
    blocks from the middle of ``slide``; with and without the gate; the median of ``rounds`` fresh processes.

    With ``baseline_src`` (another checkout's ``src``) the same blocks go through that code too, the two
    alternating round by round (the machine's load drifts), and the ratio of the medians is reported.
    """
    inputs = work / "postprocess_inputs.npz"
    postprocess_inputs(slide, checkpoint, tile, device, inputs, n_blocks)
    runs = {"current": [], "baseline": []}
    for _ in range(rounds):
        runs["current"].append(_time_postprocess(inputs, None))
        if baseline_src is not None:
            runs["baseline"].append(_time_postprocess(inputs, baseline_src))
    key = "postprocess_working_mpx_per_s_per_core"

    def summary(results: list[dict]) -> dict:
        return {name: {**{k: round(float(np.median([r[name][k] for r in results])), 3)
                          for k in results[0][name] if k != "n_nuclei"},
                       "n_nuclei": results[0][name]["n_nuclei"]} for name in results[0]}

    out = {"n_blocks": n_blocks, "rounds": rounds, **summary(runs["current"]), **input_handover(inputs)}
    if baseline_src is not None:
        out["baseline"] = {"src": str(baseline_src), **summary(runs["baseline"])}
        out["speedup_over_baseline"] = {name: round(out[name][key] / out["baseline"][name][key], 2)
                                        for name in ("no_gate", "gate")}
    return out


def input_handover(inputs: Path, workers: int = 2, repeats: int = 4, batch: int = 4) -> dict:
    """The main process's CPU (all its threads) per block to send batches of read regions and probabilities
    (``inputs``) to ``workers`` post-processing processes: pickled through a pipe, as fresh torch tensors (which
    multiprocessing moves through shared memory), or copied into ``nucseg segment``'s ring of reused shared
    buffers (``nucseg.segment._SharedRing``). On a many-core GPU node the main process does this for every block,
    serially."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from nucseg.segment import _release_freed_memory, _SharedRing

    data = np.load(inputs)
    images, probs = data["images"], data["probs"]
    out = {}
    for name, send in (("pipe", lambda *a: a), ("fresh_shared_memory", lambda *a: map(torch.from_numpy, a)),
                       ("shared_ring", _SharedRing(workers + 2))):
        batches = [(images[k:k + batch].copy(), probs[k:k + batch].copy())  # fresh arrays: each goes once
                   for _ in range(repeats) for k in range(0, len(images), batch)]
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            pool.submit(len, ()).result()  # the workers are up
            cpu, pending = time.process_time(), []
            for arrays in batches:  # at most workers + 1 in flight, freed memory handed back, as in nucseg segment
                pending.append(pool.submit(len, tuple(send(*arrays))))
                while len(pending) > workers:
                    pending.pop(0).result()
                    _release_freed_memory()
            for future in pending:
                future.result()
            seconds = time.process_time() - cpu
        out[f"input_handover_{name}_main_cpu_ms_per_block"] = round(1e3 * seconds / (repeats * len(images)), 2)
    return out


END_TO_END = """
import json, resource, sys, time
from nucseg.segment import SegmentParams, segment_slide
t = time.perf_counter()
a = sys.argv
s = segment_slide(a[1], a[2], a[3], params=SegmentParams(tile_size=int(a[4]), workers=int(a[5]), tta=int(a[6]),
                  device=a[7], postprocess_workers=int(a[8]), batch_size=int(a[9])), progress=False)
wall = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": wall, "n_nuclei": s["n_nuclei"], "n_blocks": s["n_blocks"], "peak_rss_mb": rss / 1024}))
"""


def end_to_end(slide: Path, checkpoint: Path, args, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", END_TO_END, str(slide), str(out), str(checkpoint),
                           *map(str, (args.tile_size, args.workers, args.tta, args.device, args.postprocess_workers,
                                      args.batch_size))], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fixed_cost(slides: list[dict]) -> dict:
    """Seconds = fixed + level-0 Mpx / rate, fitted over the slide sizes; and slides/hour for 2.4 Gpx of tissue."""
    if len(slides) < 2:
        return {}
    mpx = np.array([s["level0_mpx"] for s in slides])
    seconds = np.array([s["seconds"] for s in slides])
    slope, intercept = np.polyfit(mpx, seconds, 1)
    per_slide_s = intercept + 2400 * slope
    return {"fixed_per_slide_s": round(float(intercept), 2),
            "marginal_level0_mpx_per_s": round(float(1 / slope), 3),
            "tcga_2p4_gpx_tissue_slide_s": round(float(per_slide_s), 1),
            "tcga_2p4_gpx_tissue_slides_per_hour": round(3600 / float(per_slide_s), 2)}


def slide_entry(size: int, tmp: Path, checkpoint: Path, args, working_per_level0: float) -> dict:
    """Build a ``size``-px mosaic slide in ``tmp`` and segment it end to end: seconds, rates and peak RSS."""
    slide = tmp / f"mosaic_{size}.tiff"
    started = time.perf_counter()
    build_slide(slide, size)
    side = -(-size // 512) * 512  # the mosaic is made of whole 512-px tiles
    entry = {"side_level0_px": side, "level0_mpx": side * side / 1e6,
             "build_s": round(time.perf_counter() - started, 1)}
    # The network alone just before and just after, in fresh processes: the machine's speed drifts, and the
    # ratio compares the slide's run with the network's around it.
    network = [network_only_fresh(checkpoint, args)]
    e2e = end_to_end(slide, checkpoint, args, tmp / f"n_{size}.parquet")
    network.append(network_only_fresh(checkpoint, args))
    entry.update(seconds=round(e2e["seconds"], 2), n_nuclei=e2e["n_nuclei"], n_blocks=e2e["n_blocks"],
                 peak_rss_mb=round(e2e["peak_rss_mb"], 1),
                 end_to_end_level0_mpx_per_s=round(entry["level0_mpx"] / e2e["seconds"], 3),
                 end_to_end_working_mpx_per_s=round(entry["level0_mpx"] * working_per_level0 / e2e["seconds"], 3),
                 nuclei_per_s=round(e2e["n_nuclei"] / e2e["seconds"], 1),
                 network_only_working_mpx_per_s_before_after=[round(r, 3) for r in network])
    entry["end_to_end_over_network_only_working"] = round(entry["end_to_end_working_mpx_per_s"] / np.mean(network), 3)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000], help="slide sides (px at 0.25 µm/px)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="tile readers")
    parser.add_argument("--postprocess-workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--tta", type=int, default=1, help="test-time augmentations (SegmentParams.tta)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--baseline-src", type=Path, default=None,
                        help="another checkout's src folder: its post-processing is timed on the same blocks too")
    parser.add_argument("--rounds", type=int, default=1, help="post-processing timings (alternating with the "
                        "baseline's), the median reported")
    parser.add_argument("--postprocess-only", action="store_true",
                        help="only the per-core post-processing (one slide of the largest size, no end-to-end)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()
    _, dev, mpp_work = _model(checkpoint, args.device)
    working_per_level0 = (0.25 / mpp_work) ** 2
    result = {"checkpoint": str(checkpoint), "device": dev.type, "mpp_work": mpp_work, "cpus": os.cpu_count(),
              **{k: getattr(args, k) for k in ("tile_size", "workers", "postprocess_workers", "batch_size", "tta")},
              "slides": []}
    with tempfile.TemporaryDirectory(dir=REPO.parent if os.access(REPO.parent, os.W_OK) else None) as tmp:
        largest = Path(tmp) / f"mosaic_{max(args.sizes)}.tiff"
        if args.postprocess_only:
            build_slide(largest, max(args.sizes))
        else:
            result["slides"] = [slide_entry(size, Path(tmp), checkpoint, args, working_per_level0)
                                for size in sorted(args.sizes)]
            result["read_only_level0_mpx_per_s"] = round(read_only(largest, args.tile_size, args.workers), 3)
            result["network_only_working_mpx_per_s"] = round(float(np.mean(
                result["slides"][-1]["network_only_working_mpx_per_s_before_after"])), 3)
        result["postprocess"] = postprocess_per_core(largest, checkpoint, args.tile_size, args.device, Path(tmp),
                                                     baseline_src=args.baseline_src, rounds=args.rounds)
        result["postprocess_working_mpx_per_s_per_core"] = \
            result["postprocess"]["no_gate"]["postprocess_working_mpx_per_s_per_core"]
    if result["slides"]:
        rss = [s["peak_rss_mb"] for s in result["slides"]]
        result["peak_rss_ratio_largest_to_smallest"] = round(rss[-1] / rss[0], 3)
        result["end_to_end_over_network_only_working"] = result["slides"][-1]["end_to_end_over_network_only_working"]
        result.update(fixed_cost(result["slides"]))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
