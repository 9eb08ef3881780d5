from __future__ import annotations

from pathlib import Path

import torch

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.data.images import fetch, load_image_files
from bench.errors import BenchError
from bench.registry import register_dataset

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


@register_dataset("tiny-imagenet")
class TinyImageNet(Dataset):
    """Tiny-ImageNet-200 (100000 train / 10000 val as test); the official zip, md5-checked."""

    info = DatasetInfo("tiny-imagenet", 200, (3, 64, 64), mean=(0.4802, 0.4481, 0.3975), std=(0.2770, 0.2691, 0.2821), hflip=True)

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        own = root / "tiny-imagenet"
        base = own / "tiny-imagenet-200"
        annotations = base / "val" / "val_annotations.txt"
        if not ((base / "wnids.txt").is_file() and (base / "train").is_dir() and annotations.is_file()):
            def download() -> None:
                from torchvision.datasets.utils import download_and_extract_archive

                # Skips the download when a zip with the right md5 is already in place.
                download_and_extract_archive(TINY_IMAGENET_URL, str(own), md5=TINY_IMAGENET_MD5)

            fetch("Tiny-ImageNet", own, TINY_IMAGENET_URL, download,
                  f"{own / 'tiny-imagenet-200.zip'} (md5 {TINY_IMAGENET_MD5}) or its extracted folder {base}")

        wnids = sorted(line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip())
        if len(wnids) != self.info.num_classes:
            raise BenchError(f"{base / 'wnids.txt'} lists {len(wnids)} classes, expected {self.info.num_classes}")
        index = {wnid: i for i, wnid in enumerate(wnids)}

        train_paths, train_labels = [], []
        for wnid in wnids:
            files = sorted((base / "train" / wnid / "images").glob("*.JPEG"))
            if not files:
                raise BenchError(f"Tiny-ImageNet class {wnid} has no images in {base / 'train' / wnid / 'images'}")
            train_paths += files
            train_labels += [index[wnid]] * len(files)

        test_paths, test_labels = [], []
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) < 2:
                continue
            if fields[1] not in index:
                raise BenchError(f"{annotations} names class {fields[1]!r}, which is not in wnids.txt")
            test_paths.append(base / "val" / "images" / fields[0])
            test_labels.append(index[fields[1]])

        side = self.info.side
        return (ImageSet(load_image_files(train_paths, side, crop_square=True), torch.tensor(train_labels)),
                ImageSet(load_image_files(test_paths, side, crop_square=True), torch.tensor(test_labels)))
