"""The segmentation network (a small U-Net written here, no torchvision) and its weights file.

The network maps an RGB patch at the working resolution to two or three logits per pixel: nucleus
foreground, nucleus boundary and, optionally (``TrainParams.center_head``), nucleus centre
(:func:`nucseg.instances.center_map`). Weights are shipped as a plain ``torch.save`` dict of tensors plus
a JSON string of the architecture, loadable with ``weights_only=True``; the model id is the file's sha256.
"""

from __future__ import annotations

import json
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
        for block, skip in zip(self.up, reversed(skips[:-1])):
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


def load_weights(path, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Load a weights file written by :func:`save_weights` (``weights_only=True``, no pickled code).

    Returns the model in eval mode and its metadata (with ``model_id`` and ``mpp`` set).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights {path} not found")
    payload = torch.load(path, map_location=device, weights_only=True)
    model = UNet(**json.loads(payload["arch"]))
    model.load_state_dict(payload["state_dict"])
    meta = json.loads(payload["meta"])
    meta["model_id"] = file_sha256(path)
    return model.to(device).eval(), meta


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
