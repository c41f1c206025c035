"""Does what ``nucseg segment`` writes score what ``nucseg evaluate`` reports? (a benchmark; prints JSON)

Each annotated MoNuSeg tile (../shared/data/nuclei/monuseg) is written as a slide (a tiled, losslessly
compressed TIFF with its µm/px in the resolution tags) and segmented by the whole-slide stage
(:func:`nucseg.segment.segment_slide`: tissue detection, blocks with margins, the slide's hematoxylin level
from random windows, seams, GeoParquet). The polygons of ``nuclei.parquet`` are drawn on the tile's grid
with the ground truth's rasterisation and scored against the annotation, next to ``nucseg evaluate``'s
prediction of the same tile (:func:`nucseg.evaluate.predict_model`). Both use the tile's slide type from its
TCGA barcode.

The two differ where the whole-slide stage differs from evaluation by design: its gate level comes from 16
windows of the slide (their stained pixels) rather than the whole image, nuclei outside the detected tissue
are dropped, and blocks are stitched. A large gap would mean the pipeline's output is not what the quality
figures describe.

    python benchmarks/pipeline_fidelity.py [--checkpoint model.pt] [--max-tiles N] [--out fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MONUSEG = REPO.parent / "shared" / "data" / "nuclei" / "monuseg"
METRICS = ("aji", "dice", "pq", "f1")


def write_tile_slide(path: Path, image: np.ndarray, mpp: float) -> None:
    """One-level tiled TIFF, zlib (lossless), µm/px in the resolution tags (tiffslide reads them)."""
    import tifffile

    tifffile.imwrite(path, image, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)


def pipeline_labels(nuclei_path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The polygons of a ``nuclei.parquet`` (level-0 px, pixel-edge convention) drawn on the tile's grid."""
    import geopandas as gpd

    from nucseg.evaluate import rasterize

    gdf = gpd.read_parquet(nuclei_path)
    return rasterize([np.asarray(g.exterior.coords)[:-1] - 0.5 for g in gdf.geometry], shape)


def scores(truth: np.ndarray, pred: np.ndarray) -> dict:
    """The reported metrics and the number of predicted nuclei."""
    from nucseg.metrics import instance_metrics

    return {k: v for k, v in instance_metrics(truth, pred).items() if k in METRICS + ("n_pred",)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="model weights (default: the shipped model)")
    ap.add_argument("--max-tiles", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not MONUSEG.is_dir():
        sys.exit(f"{MONUSEG} not found: this benchmark needs ../shared/data")

    from dataclasses import replace

    import torch

    from nucseg.cli import default_weights
    from nucseg.evaluate import load_dataset, predict_model
    from nucseg.instances import InstanceParams, gate_unit_for
    from nucseg.model import load_weights
    from nucseg.segment import SegmentParams, segment_slide

    weights = args.checkpoint or str(default_weights())
    device = torch.device("cpu")
    model, meta = load_weights(weights, device)
    samples = load_dataset(MONUSEG, default_mpp=0.25)[: args.max_tiles]
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in samples:
            slide = Path(tmp) / f"{s.id}.tif"
            write_tile_slide(slide, s.image, s.mpp)
            out = Path(tmp) / f"{s.id}.parquet"
            segment_slide(slide, out, weights, slide_id=s.id, slide_type=s.slide_type,
                          params=SegmentParams(device="cpu"), progress=False)
            params = replace(InstanceParams(), gate_unit=gate_unit_for(s.slide_type, "auto"))
            evaluated = predict_model(s.image, s.mpp, model, device, float(meta["mpp"]), params)
            rows.append({"id": s.id, "slide_type": s.slide_type,
                         "segment": scores(s.labels, pipeline_labels(out, s.labels.shape)),
                         "evaluate": scores(s.labels, evaluated)})
    mean = {way: {k: round(float(np.mean([r[way][k] for r in rows])), 4) for k in METRICS}
            for way in ("segment", "evaluate")}
    diff = np.array([r["segment"]["aji"] - r["evaluate"]["aji"] for r in rows])
    result = {"model_id": meta["model_id"], "n_tiles": len(rows), "mean": mean,
              "aji_segment_minus_evaluate": {"mean": round(float(diff.mean()), 4),
                                             "min": round(float(diff.min()), 4),
                                             "max": round(float(diff.max()), 4)},
              "n_pred": {way: int(sum(r[way]["n_pred"] for r in rows)) for way in ("segment", "evaluate")},
              "seconds": round(time.monotonic() - started, 1), "tiles": rows}
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
