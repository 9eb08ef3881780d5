"""Shared helpers of the file-based datasets: decode image files, resize them in batches,
and turn a failed download into one actionable error.

Decoding is per file by nature; it runs on a thread pool (torchvision's decoders release
the GIL). Resizing groups images of equal size and resizes each group in one batched call.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bench.errors import BenchError

# torchvision.io decodes these; anything else (GTSRB's PPM) goes through PIL.
_TORCHVISION_FORMATS = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
_RESIZE_CHUNK = 1024


def _decode_pil(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def decode_rgb(path: Path) -> torch.Tensor:
    """One image file as uint8 (3, H, W); greyscale and CMYK files are converted to RGB."""
    path = Path(path)
    try:  # imported here: torchvision costs seconds of start-up that listing or a typo should not pay
        from torchvision.io import ImageReadMode, decode_image, read_file
    except ImportError:  # torchvision 0.29 deprecates its decoders (TorchCodec replaces them); PIL then decodes all
        decode_image = None
    if decode_image is not None and path.suffix.lower() in _TORCHVISION_FORMATS:
        try:
            return decode_image(read_file(str(path)), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # a variant libjpeg rejects (rare); PIL reads it
    try:
        return _decode_pil(path)
    except Exception as exc:
        raise BenchError(f"cannot decode image {path}: {exc}") from None


def decode_files(paths: Sequence[Path], workers: int | None = None) -> list[torch.Tensor]:
    """Decode many files in order, on a thread pool."""
    workers = workers or min(16, os.cpu_count() or 1)
    if workers <= 1 or len(paths) < 64:
        return [decode_rgb(path) for path in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(decode_rgb, paths, chunksize=64))


def center_square(image: torch.Tensor) -> torch.Tensor:
    """The largest centred square of a (C, H, W) image (a view, no copy)."""
    h, w = image.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[..., top:top + side, left:left + side]


def resize_batched(images: Sequence[torch.Tensor], side: int, *, crop_square: bool) -> torch.Tensor:
    """Resize (C, H, W) uint8 images to (N, C, side, side).

    ``crop_square`` first takes the centred square (photos: keeps the aspect ratio);
    without it the whole image is stretched (GTSRB's near-square sign crops, as is usual).
    Images of equal size are resized together, with antialiasing.
    """
    if crop_square:
        images = [center_square(image) for image in images]
    if not images:
        return torch.empty(0, 3, side, side, dtype=torch.uint8)
    out = torch.empty(len(images), images[0].shape[0], side, side, dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    for shape, members in groups.items():
        for start in range(0, len(members), _RESIZE_CHUNK):
            chunk = members[start:start + _RESIZE_CHUNK]
            batch = torch.stack([images[i] for i in chunk])
            if shape[-2:] != (side, side):
                from torchvision.transforms.v2 import functional as TF

                batch = TF.resize(batch, [side, side], antialias=True)
            out[torch.tensor(chunk)] = batch
    return out


def load_image_files(paths: Sequence[Path], side: int, *, crop_square: bool, chunk: int = 4096) -> torch.Tensor:
    """Decode and resize in chunks, so only one chunk of full-size images is in memory."""
    parts = [resize_batched(decode_files(paths[start:start + chunk]), side, crop_square=crop_square)
             for start in range(0, len(paths), chunk)]
    return torch.cat(parts) if parts else torch.empty(0, 3, side, side, dtype=torch.uint8)


def fetch(name: str, where: Path, url: str, download: Callable[[], object], layout: str) -> None:
    """Run a download; if it fails, raise one line saying where the files go and where they come from."""
    try:
        download()
    except BenchError:
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        reason = f"{exc.__class__.__name__}: {lines[0]}" if lines else exc.__class__.__name__
        raise BenchError(f"{name} not found under {where} and the download from {url} failed ({reason}); "
                         f"download it yourself and place it as {layout} (set BENCH_DATA to move the data root)") from None
