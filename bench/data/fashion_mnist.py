from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.errors import BenchError
from bench.registry import register_dataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST family), gzip-compressed or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise BenchError(f"{path} is unreadable ({exc.__class__.__name__}: {exc or 'truncated'}); "
                         f"replace it with an intact copy") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise BenchError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise BenchError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FILES.items():
        for candidate in (directory / stem, directory / f"{stem}.gz", directory / "raw" / stem, directory / "raw" / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def read_idx_set(files: dict[str, Path]) -> tuple[ImageSet, ImageSet]:
    arrays = {key: torch.from_numpy(read_idx(path).copy()) for key, path in files.items()}
    return (ImageSet(arrays["train_x"][:, None], arrays["train_y"].long()),
            ImageSet(arrays["test_x"][:, None], arrays["test_y"].long()))


@register_dataset("fashion-mnist")
class FashionMNIST(Dataset):
    """Fashion-MNIST (Zalando), 10 classes, 28x28 grey; read from $BENCH_DATA, Debian's package, or downloaded."""

    info = DatasetInfo("fashion-mnist", 10, (1, 28, 28), mean=(0.2860,), std=(0.3530,), hflip=True)

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        own = root / "fashion-mnist"
        for directory in (own, DEBIAN_DIR):
            files = find_idx_files(directory)
            if files is not None:
                return read_idx_set(files)
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST

            TorchvisionFashionMNIST(str(own), train=True, download=True)
            TorchvisionFashionMNIST(str(own), train=False, download=True)
        except Exception as exc:
            raise BenchError(
                f"Fashion-MNIST not found: looked in {own} (set BENCH_DATA to move it), in {DEBIAN_DIR} "
                f"(apt-get install dataset-fashion-mnist), and the torchvision download failed ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        files = find_idx_files(own / "FashionMNIST")
        if files is None:
            raise BenchError(f"torchvision downloaded Fashion-MNIST but its IDX files are not under {own / 'FashionMNIST' / 'raw'}")
        return read_idx_set(files)
