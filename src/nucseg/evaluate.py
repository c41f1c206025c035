"""Evaluation on annotated tiles: datasets, a classical baseline, and instance-segmentation metrics.

Datasets (DESIGN.md): MoNuSeg layout (``images/<id>.tif`` + ``annotations/<id>.xml``, Aperio XML
polygons) or label-map layout (``images/<id>.{png,tif,jpg,bmp}`` + ``labels/<id>.{png,tif,npy,mat}``,
instance ids, 0 = background; colour-coded label images and HoVer-Net ``inst_map`` files are read too).
Pixel size per image: ``manifest.csv`` (``id,mpp``), else the XML's ``MicronsPerPixel``, else the
caller's default. Slide type (DX, TS, BS, MS; it sets the hematoxylin
gate's unit, :func:`nucseg.instances.gate_unit_for`): the manifest's ``slide_type`` column, else the
TCGA barcode in the id (``TCGA-50-5931-01Z-00-DX1`` → DX), else unknown.

**Rasterisation of polygon ground truth.** Vertex ``(x, y)`` is in the image's pixel units with pixel
``(row r, column c)`` centred at ``(c, r)`` (the convention of ``skimage.draw.polygon`` and MATLAB's
``poly2mask`` used by the MoNuSeg organisers): a pixel belongs to a nucleus when its centre lies inside the
polygon. Polygons are drawn in file order, so where two overlap by a pixel the later one wins.

Predictions are scored as the pipeline writes them: the outlines of the instances found at the model's
working resolution (:func:`nucseg.instances.instance_outlines`), drawn on the image's grid with the same
rasterisation (:func:`instances_on_image`).

Metrics per image: AJI (Kumar et al. 2017), pixel Dice of the foreground, PQ (one-to-one matching at
IoU > 0.5; Kirillov et al. 2019), detection F1 at the same matching, and object counts
(:func:`nucseg.metrics.instance_metrics`).
"""

from __future__ import annotations

import csv
import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi
from scipy.io import loadmat
from skimage.draw import polygon as draw_polygon
from skimage.feature import peak_local_max
from skimage.segmentation import watershed
from tqdm import tqdm

from .download import parse_barcode
from .inference import segment_images
from .instances import (SLIDE_TYPES, InstanceParams, gate_unit_for, hematoxylin_gate, hematoxylin_level,
                        instance_outlines, relabel)
from .io import as_rgb8, read_pixels, write_png
from .metrics import instance_metrics
from .model import load_weights, resolve_device
from .resample import resample_to
from .stain import hematoxylin_od

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".mat")


@dataclass
class Sample:
    id: str
    image: np.ndarray       # RGB uint8
    labels: np.ndarray      # int32 instance map
    mpp: float
    slide_type: str = ""    # TCGA slide type (DX: FFPE; TS, BS, MS: frozen), "" unknown


# ---------------------------------------------------------------- datasets

def read_aperio_xml(path) -> tuple[list[np.ndarray], float | None]:
    """Polygons (``(k, 2)`` arrays of x, y) and ``MicronsPerPixel`` of an Aperio ImageScope XML file."""
    root = ET.parse(path).getroot()
    mpp = root.get("MicronsPerPixel")
    polygons = []
    for region in root.iter("Region"):
        pts = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
        if len(pts) >= 3:
            polygons.append(np.asarray(pts))
    return polygons, float(mpp) if mpp else None


def rasterize(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance map of polygons, pixel centres at integer coordinates (see module docstring)."""
    labels = np.zeros(shape, np.int32)
    for i, poly in enumerate(polygons, start=1):
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape)
        labels[rr, cc] = i
    return labels


def as_instance_ids(labels: np.ndarray) -> np.ndarray:
    """A label image as an int32 instance map: grey as is; colour-coded (one colour per nucleus, black =
    background, as many tools save them) turned into ids by colour."""
    lab = np.asarray(labels)
    if lab.ndim == 3 and lab.shape[-1] == 1:
        lab = lab[..., 0]
    if lab.ndim == 3 and lab.shape[-1] in (3, 4):
        rgb = lab[..., :3]
        if (rgb == rgb[..., :1]).all():
            lab = rgb[..., 0]
        else:
            colours, ids = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
            has_black = not colours[0].any()  # sorted: black comes first
            lab = ids.reshape(rgb.shape[:2]) + (0 if has_black else 1)
    if lab.ndim != 2:
        raise ValueError(f"not a 2-D instance map (shape {lab.shape})")
    if lab.dtype.kind == "f" and not np.array_equal(lab, np.round(lab)):
        raise ValueError("instance ids are not whole numbers (a probability or semantic map?)")
    return lab.astype(np.int32)


def _read_image(path: Path) -> np.ndarray:
    """RGB uint8 pixels of an image file; any failure as ``ValueError`` naming the file."""
    try:
        return as_rgb8(read_pixels(path))
    except Exception as e:
        raise ValueError(f"{path}: {e}") from None


def _read_labels(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return as_instance_ids(np.load(path))
    if path.suffix.lower() == ".mat":  # HoVer-Net's CoNSeP / Lizard layout
        mat = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
        maps = [v for v in mat.values() if isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind in "uif"]
        if "inst_map" not in mat and len(maps) != 1:
            raise ValueError(f"no inst_map and {len(maps)} 2-D arrays ({', '.join(mat)})")
        return as_instance_ids(mat.get("inst_map", maps[0] if maps else None))
    return as_instance_ids(read_pixels(path))


def images_mpp(root, default_mpp: float | None = None) -> float:
    """The µm/px of a dataset's images from its ``manifest.csv`` (median), else ``default_mpp``; never from its
    annotations, so a label-free step (``nucseg evaluate --adapt``) can run before any label is opened."""
    manifest, _ = _read_manifest(Path(root))
    if manifest:
        return float(np.median(list(manifest.values())))
    if default_mpp is None:
        raise ValueError(f"{root}: no manifest.csv with µm/px: pass --mpp")
    return default_mpp


def _read_manifest(root: Path) -> tuple[dict, dict]:
    """Pixel sizes and slide types by id from ``manifest.csv`` (both empty without one)."""
    manifest, slide_types = {}, {}
    if not (root / "manifest.csv").is_file():
        return manifest, slide_types
    with open(root / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row.get("slide_type"):
                slide_types[row["id"]] = row["slide_type"].strip().upper()
                if slide_types[row["id"]] not in SLIDE_TYPES:
                    log.warning("%s: slide_type %r of %s is not one of %s; treated as unknown",
                                root / "manifest.csv", row["slide_type"], row["id"], ", ".join(SLIDE_TYPES))
            mpp = row.get("mpp") or row.get("um_per_px")
            if mpp:
                try:
                    manifest[row["id"]] = float(mpp)
                except ValueError:
                    log.warning("%s: mpp %r of %s is not a number; ignored", root / "manifest.csv", mpp, row["id"])
    return manifest, slide_types


def _annotations(root: Path, img_path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """Instance map of the image at ``img_path`` (``shape``) and the XML's µm/px if any."""
    sid = img_path.stem
    xml = root / "annotations" / f"{sid}.xml"
    if xml.is_file():
        try:
            polygons, xml_mpp = read_aperio_xml(xml)
        except ET.ParseError as e:
            raise ValueError(f"{xml}: not a readable Aperio XML ({e})") from None
        return rasterize(polygons, shape), xml_mpp
    label_path = next((root / "labels" / f"{sid}{s}" for s in LABEL_SUFFIXES
                       if (root / "labels" / f"{sid}{s}").is_file()), None)
    if label_path is None:
        suffixes = ",".join(s[1:] for s in LABEL_SUFFIXES)
        raise FileNotFoundError(f"{img_path}: no annotations/{sid}.xml or labels/{sid}.{{{suffixes}}}")
    try:
        labels = _read_labels(label_path)
    except Exception as e:
        raise ValueError(f"{label_path}: {e}") from None
    if labels.shape != shape:
        raise ValueError(f"{label_path}: label map is {labels.shape[1]}x{labels.shape[0]} px, "
                         f"its image {shape[1]}x{shape[0]}")
    return labels, None


def load_dataset(root, default_mpp: float | None = None, skipped: list | None = None) -> list[Sample]:
    """All annotated images of a dataset folder (MoNuSeg or label-map layout).

    An image that cannot be read or whose annotation is missing, unreadable or of another size raises
    ``ValueError`` naming the file and the reason; with a ``skipped`` list it is left out and recorded
    there instead (``{"id", "path", "reason"}``), so one bad file does not stop the others. An unknown pixel
    size always raises: it is a setting (``--mpp``), not a bad file.
    """
    root = Path(root)
    if not (root / "images").is_dir():
        raise FileNotFoundError(f"{root}: no images/ folder (expected images/ + annotations/ or labels/)")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{root}/images holds no images ({', '.join(IMAGE_SUFFIXES)})")
    manifest, slide_types = _read_manifest(root)
    samples = []
    for img_path in images:
        sid = img_path.stem
        try:
            image = _read_image(img_path)
            labels, xml_mpp = _annotations(root, img_path, image.shape[:2])
        except (ValueError, FileNotFoundError) as e:
            if skipped is None:
                raise
            log.error("skipped %s", e)
            skipped.append({"id": sid, "path": str(img_path), "reason": str(e)})
            continue
        mpp = manifest.get(sid) or xml_mpp or default_mpp
        if mpp is None:
            raise ValueError(f"{img_path}: pixel size unknown (no manifest.csv entry, no XML MicronsPerPixel); "
                             "pass --mpp")
        slide_type = slide_types.get(sid) or parse_barcode(sid)["slide_type"]
        samples.append(Sample(sid, image, labels, float(mpp), slide_type))
    return samples


# ---------------------------------------------------------------- methods

def instances_on_image(labels: np.ndarray, foreground: np.ndarray, level: float,
                       shape: tuple[int, int]) -> np.ndarray:
    """Instance map on an image's grid of the instances found at the working resolution.

    Their outlines, as ``nucseg segment`` writes them (:func:`nucseg.instances.instance_outlines`:
    sub-pixel where the ``foreground`` probability crosses ``level``), drawn with the ground truth's
    rasterisation, so evaluation scores the polygons the pipeline writes.
    """
    polygons = [points for _, points in instance_outlines(labels, foreground, level)]
    scale = np.array([shape[1] / labels.shape[1], shape[0] / labels.shape[0]])
    return rasterize([p * scale - 0.5 for p in polygons], shape)


def predict_model(image: np.ndarray, mpp: float, model, device, mpp_work: float, params=None,
                  tta: int = 1) -> np.ndarray:
    """Instance map of an image with the network, at the model's working resolution: the nuclei's
    outlines, as whole-slide inference writes them, drawn on the image's grid.

    ``tta``: test-time augmentations averaged (:func:`nucseg.model.predict`).
    """
    params = params or InstanceParams()
    work = resample_to(image, mpp, mpp_work)
    probs, labels = segment_images(model, work[None], device, mpp_work, params, tta)
    return instances_on_image(labels[0], probs[0, 0], params.foreground_threshold, image.shape[:2])


def predict_classical(image: np.ndarray, mpp: float, min_area_um2: float = 6.0,
                      min_distance_um: float = 2.5) -> np.ndarray:
    """Classical baseline: hematoxylin channel, Otsu threshold, distance-transform watershed."""
    # The same smoothed hematoxylin and Otsu level as the network's gate.
    hema = hematoxylin_od(image)
    level = hematoxylin_level([hema], mpp)
    mask = hematoxylin_gate(hema, mpp, level) if level is not None else np.zeros(hema.shape, bool)
    r = max(1, round(0.5 / mpp))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, disk) > 0
    mask = ndi.binary_fill_holes(mask)
    dist = ndi.distance_transform_edt(mask)
    dist = cv2.GaussianBlur(dist.astype(np.float32), (0, 0), 1.0)
    peaks = peak_local_max(dist, min_distance=max(1, round(min_distance_um / mpp)), labels=ndi.label(mask)[0],
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=mask)
    areas = np.bincount(labels.ravel())
    small = areas < min_area_um2 / mpp**2
    small[0] = False
    labels[small[labels]] = 0
    return relabel(labels)


def evaluate(samples: list[Sample], method: str = "model", weights=None, device: str = "cpu",
             save_predictions=None, progress: bool = True, instance_params=None, tta: int = 1,
             gate_unit: str = "auto") -> dict:
    """Metrics per image and their mean; optionally write each prediction as ``<id>.png`` (uint16).

    ``gate_unit``: the hematoxylin gate's unit, ``auto`` (each image's by its slide type,
    :func:`nucseg.instances.gate_unit_for`), ``pixel`` or ``nucleus``.
    """
    model = meta = dev = None
    if method == "model":
        dev = resolve_device(device)
        model, meta = load_weights(weights, dev)
    elif method != "classical":
        raise ValueError(f"unknown method {method!r}: model or classical")
    rows = []
    for s in tqdm(samples, desc=f"evaluate ({method})", disable=not progress):
        row = {"id": s.id, "mpp": s.mpp, "slide_type": s.slide_type}
        if method == "model":
            unit = gate_unit_for(s.slide_type, gate_unit)
            params = replace(instance_params or InstanceParams(), gate_unit=unit)
            pred = predict_model(s.image, s.mpp, model, dev, float(meta.get("mpp", 0.25)), params, tta)
            row["gate_unit"] = unit if params.hematoxylin_gate else "off"
        else:
            pred = predict_classical(s.image, s.mpp)
        rows.append({**row, **instance_metrics(s.labels, pred)})
        if save_predictions:
            write_png(Path(save_predictions) / f"{s.id}.png", pred.astype(np.uint16))
    keys = ["aji", "dice", "pq", "sq", "dq", "f1"]
    mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    mean.update({k: int(sum(r[k] for r in rows)) for k in ("n_true", "n_pred")})
    out = {"method": method, "mean": mean, "images": rows}
    if method == "model":
        out["tta"] = tta
    if meta:
        out["model_id"] = meta["model_id"]
    return out
