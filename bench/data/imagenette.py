"""Imagenette (fast.ai): 10 easy ImageNet classes, the ImageNet subset of NONE's experiments.

Two registered sizes: ``imagenette`` (64x64 from the 160px release: CPU-friendly default)
and ``imagenette-224`` (224x224 from the 320px release: the paper's resolution). Another
size is a subclass setting ``info = _info(name, side)`` and the smallest ``release`` whose
short side is at least ``side``.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.data.images import fetch, load_image_files
from bench.errors import BenchError
from bench.registry import register_dataset

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The fast.ai archives torchvision's Imagenette downloads, by its ``size`` argument.
_RELEASES = {
    "160px": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz",
    "320px": "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz",
}


def _info(name: str, side: int) -> DatasetInfo:
    return DatasetInfo(name, 10, (3, side, side), mean=_IMAGENET_MEAN, std=_IMAGENET_STD, hflip=True)


class _Imagenette(Dataset):
    release: ClassVar[str]  # torchvision's size argument: the smallest release at least as large as the target

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        from torchvision.datasets import Imagenette as TorchvisionImagenette

        own = root / "imagenette"
        url = _RELEASES[self.release]
        base = own / Path(url).name.removesuffix(".tgz")
        if not ((base / "train").is_dir() and (base / "val").is_dir()):
            fetch(f"Imagenette ({self.release})", own, url,
                  lambda: TorchvisionImagenette(str(own), split="train", size=self.release, download=True),
                  f"the extracted {Path(url).name} ({base}/{{train,val}}/<wnid>/*.JPEG)")
        wnids = sorted(path.name for path in (base / "train").iterdir() if path.is_dir())
        if len(wnids) != self.info.num_classes:
            raise BenchError(f"{base / 'train'} has {len(wnids)} class folders, expected {self.info.num_classes}")
        # The official validation split is the test set; square centre crop keeps the aspect ratio.
        return self._split(base / "train", wnids), self._split(base / "val", wnids)

    def _split(self, directory: Path, wnids: list[str]) -> ImageSet:
        paths, labels = [], []
        for label, wnid in enumerate(wnids):
            files = sorted(path for path in (directory / wnid).glob("*") if path.suffix.lower() in (".jpeg", ".jpg"))
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise BenchError(f"no Imagenette images under {directory}")
        return ImageSet(load_image_files(paths, self.info.side, crop_square=True), torch.tensor(labels))


@register_dataset("imagenette")
class Imagenette(_Imagenette):
    """Imagenette, 10 ImageNet classes, centre-cropped to 64 px (9469 train / 3925 val as test); torchvision download."""

    info = _info("imagenette", 64)
    release = "160px"


@register_dataset("imagenette-224")
class Imagenette224(_Imagenette):
    """Imagenette centre-cropped to 224 px, the paper's ImageNet resolution (from the 320px release; ~2 GB as uint8)."""

    info = _info("imagenette-224", 224)
    release = "320px"
