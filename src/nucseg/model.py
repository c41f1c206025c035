"""The segmentation network (a small U-Net written here, no torchvision) and its weights file.

The network maps an RGB patch at the working resolution to two or three logits per pixel: nucleus
foreground, nucleus boundary and, optionally (earlier experimental models), nucleus centre
(:func:`nucseg.instances.center_map`). Weights are shipped as a plain ``torch.save`` dict of tensors plus
a JSON string of the architecture, loadable with ``weights_only=True``; the model id is the file's sha256.
"""

from __future__ import annotations

import inspect
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import atomic_path, file_sha256

OUTPUTS = ("foreground", "boundary", "center")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015) with batch norm and bilinear upsampling.

    Parameters
    ----------
    base : int
        Channels of the first level; doubled at each of ``depth`` downsamplings.
    depth : int
        Number of downsamplings; input sides must be multiples of ``2**depth``.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = len(OUTPUTS), base: int = 16,
                 depth: int = 3):
        super().__init__()
        self.depth = depth
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, chans[0])] +
                                  [_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([_block(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], out_channels, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)

    @property
    def multiple(self) -> int:
        return 2**self.depth


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (or float 0-255 NCHW) RGB to the network's float NCHW input in [-1, 1]."""
    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float()
    return images / 127.5 - 1.0


def save_weights(model: UNet, path, meta: dict) -> str:
    """Save weights-only (tensors + JSON architecture/metadata); return the model id (sha256)."""
    arch = {"base": model.down[0][0].out_channels, "depth": model.depth,
            "in_channels": model.down[0][0].in_channels, "out_channels": model.head.out_channels}
    # Floating-point tensors are stored as float16: half the size (the shipped model stays under 5 MB);
    # load_state_dict casts them back to the model's float32 parameters.
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {"state_dict": state,
               "arch": json.dumps(arch), "meta": json.dumps(meta, default=str)}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return file_sha256(path)


class UnsafeCheckpointError(ValueError):
    """A weights file holds more than tensors and plain data (pickled code or objects) and was not loaded."""


# Architecture entries a weights file may set, with the ranges accepted: a crafted "arch" must not be able
# to ask for a network that exhausts memory before anything checks it. The shipped model is base 16, depth 4.
ARCH_LIMITS = {"base": (1, 256), "depth": (1, 8), "in_channels": (1, 4), "out_channels": (1, len(OUTPUTS))}
MAX_WIDTH = 1024  # channels of the deepest level (base * 2**depth): about 30 M parameters at most
CHECKPOINT_KEYS = ("arch", "state_dict", "meta")


def load_weights(path, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Load a weights file written by :func:`save_weights` (``weights_only=True``, no pickled code).

    Parameters
    ----------
    path : path-like
        The weights file.
    device : str or torch.device
        Where the tensors are loaded.

    Returns
    -------
    model, meta
        The model in eval mode and its metadata (with ``model_id`` set).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    UnsafeCheckpointError
        The file holds pickled code or objects (refused, never executed).
    ValueError
        The file is not a nucseg weights file, or its architecture is out of bounds; the message names
        the file (and the key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights {path} not found")
    payload = _read_checkpoint(path, device)
    model = UNet(**_checked_arch(path, payload["arch"]))
    try:
        model.load_state_dict(payload["state_dict"])
        meta = json.loads(payload["meta"])
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"model weights {path}: not a nucseg weights file: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"model weights {path}: not a nucseg weights file: 'meta' is not a JSON object")
    meta["model_id"] = file_sha256(path)
    return model.to(device).eval(), meta


def _read_checkpoint(path: Path, device) -> dict:
    """The checkpoint dict at ``path``, loaded with ``weights_only=True`` and checked for its keys."""
    # torch.save writes a zip archive; anything else would reach the unpickler as raw bytes and be
    # misreported as unsafe content.
    if not zipfile.is_zipfile(path):
        raise ValueError(f"model weights {path}: not a torch weights file (not the zip archive torch.save writes)")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        # from None: torch's own message advises weights_only=False, i.e. running the code it refused.
        raise UnsafeCheckpointError(f"model weights {path} refused as unsafe: torch's safe loader found more "
                                    f"than tensors and plain data in it ({_refusal_reason(exc)}); nucseg "
                                    "never runs code from a weights file") from None
    except Exception as exc:  # torch raises KeyError, EOFError, RuntimeError ... on files it cannot parse
        raise ValueError(f"model weights {path}: not a torch weights file "
                         f"({type(exc).__name__}: {exc})") from exc
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"model weights {path}: not a nucseg weights file (no {', '.join(map(repr, missing))})")
    return payload


def _refusal_reason(exc: Exception) -> str:
    """What torch's weights-only unpickler refused, without its advice to turn the check off."""
    lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in str(exc).splitlines()]
    kept = [line for line in lines
            if line and not any(w in line.lower() for w in ("weights_only", "weights only", "documentation"))]
    return " ".join(kept) or "unsupported content"


def _checked_arch(path: Path, arch_json) -> dict:
    """The UNet arguments of a checkpoint's ``arch`` JSON: known keys, integers within :data:`ARCH_LIMITS`."""
    try:
        arch = json.loads(arch_json)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model weights {path}: 'arch' is not JSON: {exc}") from exc
    if not isinstance(arch, dict):
        raise ValueError(f"model weights {path}: 'arch' is not a JSON object")
    for key, value in arch.items():
        if key not in ARCH_LIMITS:
            raise ValueError(f"model weights {path}: unknown architecture key {key!r} "
                             f"(known: {', '.join(ARCH_LIMITS)})")
        low, high = ARCH_LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"model weights {path}: architecture key {key!r} = {value!r} "
                             f"is not an integer in [{low}, {high}]")
    signature = inspect.signature(UNet)
    base, depth = (arch.get(k, signature.parameters[k].default) for k in ("base", "depth"))
    if base * 2**depth > MAX_WIDTH:
        raise ValueError(f"model weights {path}: architecture keys 'base' = {base} and 'depth' = {depth} give "
                         f"{base * 2**depth} channels at the deepest level (at most {MAX_WIDTH})")
    return arch


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


# The eight symmetries of the square as (quarter turns, mirrored), identity first: the first n are the
# test-time augmentations of ``predict(..., tta=n)`` and of QC's agreement check.
DIHEDRAL = ((0, False), (0, True), (2, True), (1, False), (2, False), (3, False), (1, True), (3, True))


def dihedral(images: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Mirror (optionally) then turn NHWC images by ``k`` quarter turns."""
    if flip:
        images = images[:, :, ::-1]
    return np.rot90(images, k, axes=(1, 2))


def undo_dihedral(probs: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Undo :func:`dihedral` on NCHW maps."""
    probs = np.rot90(probs, -k, axes=(2, 3))
    return probs[:, :, :, ::-1] if flip else probs


def predict_views(model: UNet, images: np.ndarray, device: torch.device, n: int):
    """Yield the probabilities ``(N, C, H, W)`` under each of the first ``n`` (1-8) transforms of
    :data:`DIHEDRAL`, each mapped back onto the images."""
    for k, flip in DIHEDRAL[:n]:
        yield undo_dihedral(_predict_once(model, np.ascontiguousarray(dihedral(images, k, flip)), device), k, flip)


def predict(model: UNet, images: np.ndarray, device: torch.device, tta: int = 1) -> np.ndarray:
    """Probabilities ``(N, C, H, W)`` float32 (C outputs) for uint8 NHWC images; sides padded to the net's multiple.

    ``tta`` > 1 averages the probabilities over the first ``tta`` transforms of :data:`DIHEDRAL`, each mapped
    back (test-time augmentation; ``tta`` times the network's work).
    """
    tta = int(np.clip(tta, 1, len(DIHEDRAL)))
    views = predict_views(model, images, device, tta)
    total = next(views)
    for probs in views:
        total = total + probs   # a running sum: one map per image in memory
    return total / tta if tta > 1 else total


@torch.inference_mode()
def _predict_once(model: UNet, images: np.ndarray, device: torch.device) -> np.ndarray:
    n, h, w, _ = images.shape
    m = model.multiple
    ph, pw = (-h) % m, (-w) % m
    if ph or pw:
        images = np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)).to(device))
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
        logits = model(x)
    else:
        with torch.autocast(device.type, dtype=torch.float16):
            logits = model(x)
    return torch.sigmoid(logits.float())[:, :, :h, :w].cpu().numpy()
