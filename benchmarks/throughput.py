"""Whole-slide inference throughput and peak memory (a benchmark, not a test; prints JSON).

Builds large pyramidal TIFF slides at 0.25 µm/px from real tissue (a mosaic of the MoNuSeg tiles in
../shared/data/nuclei/monuseg, randomly flipped/rotated; only the images, never the annotations), then
measures on the largest:
  * read-only Mpx/s: reading every block through the DataLoader, no network;
  * network-only Mpx/s: the U-Net on in-memory batches;
  * end-to-end Mpx/s: ``nucseg segment`` (read + network + instances + features + GeoParquet);
and the peak RSS of an end-to-end run (in a fresh process) for each slide size, to show that memory
does not grow with the slide.

    python benchmarks/throughput.py --sizes 4000 8000 [--checkpoint model.pt] [--workers 2] [--tta 8]
    python benchmarks/throughput.py --sizes 20000        # the issue's 20,000² slide (slow on 2 CPUs)

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


def network_only(checkpoint: Path, tile: int, tta: int = 1, batches: int = 6) -> float:
    import math

    import torch

    from nucseg.model import load_weights, predict
    from nucseg.segment import SegmentParams

    model, meta = load_weights(checkpoint)
    model = model.to(memory_format=torch.channels_last)
    # The same read size as `nucseg segment`: core plus the margin on both sides.
    margin = math.ceil(SegmentParams().margin_um / float(meta.get("mpp", 0.25)) / 8) * 8
    images = np.random.default_rng(0).integers(0, 255, (4, tile + 2 * margin, tile + 2 * margin, 3), dtype=np.uint8)
    predict(model, images, torch.device("cpu"))  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        predict(model, images, torch.device("cpu"), tta)
    # Count core pixels only, as the end-to-end figure does.
    return batches * 4 * tile * tile / 1e6 / (time.perf_counter() - started)


END_TO_END = """
import json, resource, sys, time
from nucseg.segment import SegmentParams, segment_slide
t = time.perf_counter()
s = segment_slide(sys.argv[1], sys.argv[2], sys.argv[3], params=SegmentParams(tile_size=int(sys.argv[4]),
                  workers=int(sys.argv[5]), tta=int(sys.argv[6])), progress=False)
wall = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": wall, "n_nuclei": s["n_nuclei"], "n_blocks": s["n_blocks"], "peak_rss_mb": rss / 1024}))
"""


def end_to_end(slide: Path, checkpoint: Path, tile: int, workers: int, tta: int, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", END_TO_END, str(slide), str(out), str(checkpoint), str(tile),
                           str(workers), str(tta)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4000, 8000], help="slide sides (px at 0.25 µm/px)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--tta", type=int, default=1, help="test-time augmentations (SegmentParams.tta)")
    args = parser.parse_args()
    checkpoint = args.checkpoint or default_checkpoint()
    result = {"checkpoint": str(checkpoint), "tile_size": args.tile_size, "workers": args.workers, "tta": args.tta,
              "cpus": os.cpu_count(), "slides": []}
    with tempfile.TemporaryDirectory(dir=REPO.parent if os.access(REPO.parent, os.W_OK) else None) as tmp:
        for size in sorted(args.sizes):
            slide = Path(tmp) / f"mosaic_{size}.tiff"
            started = time.perf_counter()
            build_slide(slide, size)
            side = -(-size // 512) * 512  # the mosaic is made of whole 512-px tiles
            entry = {"size": side, "mpx": side * side / 1e6, "build_seconds": round(time.perf_counter() - started, 1)}
            e2e = end_to_end(slide, checkpoint, args.tile_size, args.workers, args.tta, Path(tmp) / f"n_{size}.parquet")
            entry.update(end_to_end_mpx_s=round(entry["mpx"] / e2e["seconds"], 3),
                         nuclei_per_s=round(e2e["n_nuclei"] / e2e["seconds"], 1), **e2e)
            result["slides"].append(entry)
        largest = Path(tmp) / f"mosaic_{max(args.sizes)}.tiff"
        result["read_only_mpx_s"] = round(read_only(largest, args.tile_size, args.workers), 3)
        result["network_only_mpx_s"] = round(network_only(checkpoint, args.tile_size, args.tta), 3)
    rss = [s["peak_rss_mb"] for s in result["slides"]]
    result["peak_rss_ratio_largest_to_smallest"] = round(rss[-1] / rss[0], 3)
    result["end_to_end_over_network_only"] = round(result["slides"][-1]["end_to_end_mpx_s"]
                                                   / result["network_only_mpx_s"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
