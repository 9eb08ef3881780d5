from __future__ import annotations

import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.data.images import fetch
from bench.errors import BenchError
from bench.registry import register_dataset


def _check_md5(directory: Path, files: dict[str, str]) -> None:
    """The release's published md5 of every batch, checked before any is unpickled: unpickling
    runs code, so a planted or damaged file must never reach ``pickle.load``."""
    from torchvision.datasets.utils import calculate_md5

    for name, md5 in files.items():
        path = directory / name
        if calculate_md5(str(path)) != md5:
            raise BenchError(f"{path} does not match the published md5 of the CIFAR release ({md5}); "
                             f"delete {directory} to download it again")


def _read_batches(directory: Path, names: list[str], label_key: str) -> ImageSet:
    images, labels = [], []
    for name in names:
        path = directory / name
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="latin1")
            data = np.asarray(entry["data"], dtype=np.uint8)
            images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise BenchError(f"{path} is not a CIFAR python batch ({exc.__class__.__name__}: {exc}); "
                             f"delete {directory} to download it again") from None
    return ImageSet(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


class _CIFAR(Dataset):
    """The python-pickle release of CIFAR, as torchvision downloads and extracts it."""

    torchvision_name: ClassVar[str]   # the torchvision dataset class that downloads this release
    label_key: ClassVar[str]

    @classmethod
    def torchvision_class(cls) -> type:
        import torchvision.datasets  # here, not at import: torchvision costs seconds of start-up

        return getattr(torchvision.datasets, cls.torchvision_name)

    @classmethod
    def published_md5(cls) -> dict[str, str]:
        """File name -> md5 of the official release's batches (as torchvision lists them)."""
        tv = cls.torchvision_class()
        return {name: md5 for name, md5 in tv.train_list + tv.test_list}

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        own = root / self.info.name
        tv = self.torchvision_class()
        directory = own / tv.base_folder
        train_names = [name for name, _ in tv.train_list]
        test_names = [name for name, _ in tv.test_list]
        # Read the extracted batches directly, once (the decoded set is cached by load_dataset).
        if not all((directory / name).is_file() for name in train_names + test_names):
            fetch(self.info.name.upper(), own, tv.url, lambda: tv(str(own), train=True, download=True),
                  f"the extracted {tv.filename} ({directory}/{{{','.join(train_names + test_names)}}})")
        _check_md5(directory, self.published_md5())
        return (_read_batches(directory, train_names, self.label_key),
                _read_batches(directory, test_names, self.label_key))


@register_dataset("cifar10")
class CIFAR10(_CIFAR):
    """CIFAR-10 (50000 train / 10000 test); torchvision download."""

    info = DatasetInfo("cifar10", 10, (3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), hflip=True)
    torchvision_name = "CIFAR10"
    label_key = "labels"


@register_dataset("cifar100")
class CIFAR100(_CIFAR):
    """CIFAR-100, fine labels (50000 train / 10000 test); torchvision download."""

    info = DatasetInfo("cifar100", 100, (3, 32, 32), mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), hflip=True)
    torchvision_name = "CIFAR100"
    label_key = "fine_labels"
