from __future__ import annotations

import csv
from pathlib import Path

import torch

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.data.images import fetch, load_image_files
from bench.errors import BenchError
from bench.registry import register_dataset

GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"


@register_dataset("gtsrb")
class GTSRB(Dataset):
    """German Traffic Sign Recognition Benchmark, resized to 32 px (published split: 39209 train / 12630 test); torchvision download."""

    # A mirrored sign can be another sign (keep left / keep right): no horizontal flip.
    # Statistics: those commonly quoted for GTSRB resized to 32x32.
    info = DatasetInfo("gtsrb", 43, (3, 32, 32), mean=(0.3403, 0.3121, 0.3214), std=(0.2724, 0.2608, 0.2669), hflip=False)

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        own = root / "gtsrb"
        base = own / "gtsrb"  # torchvision's GTSRB adds this folder under its root
        train_dir = base / "GTSRB" / "Training"
        test_dir = base / "GTSRB" / "Final_Test" / "Images"
        test_csv = base / "GT-final_test.csv"
        if not (train_dir.is_dir() and test_dir.is_dir() and test_csv.is_file()):
            def download() -> None:
                from torchvision.datasets import GTSRB as TorchvisionGTSRB

                TorchvisionGTSRB(str(own), split="train", download=True)
                TorchvisionGTSRB(str(own), split="test", download=True)

            fetch("GTSRB", own, GTSRB_URL, download,
                  f"the extracted GTSRB-Training_fixed.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
                  f"({train_dir}/<class>/*.ppm, {test_dir}/*.ppm, {test_csv})")

        train_paths, train_labels = [], []
        for class_dir in sorted(path for path in train_dir.iterdir() if path.is_dir()):
            files = sorted(class_dir.glob("*.ppm"))
            train_paths += files
            train_labels += [int(class_dir.name)] * len(files)
        test_paths, test_labels = [], []
        with open(test_csv, newline="") as handle:
            for row in csv.DictReader(handle, delimiter=";", skipinitialspace=True):
                test_paths.append(test_dir / row["Filename"])
                test_labels.append(int(row["ClassId"]))
        if not train_paths or not test_paths:
            raise BenchError(f"GTSRB under {base} has {len(train_paths)} training and {len(test_paths)} test images; "
                             f"delete {own} to download it again")
        side = self.info.side
        # Signs are cropped near-square with a margin; stretch the whole crop, as is usual for GTSRB.
        return (ImageSet(load_image_files(train_paths, side, crop_square=False), torch.tensor(train_labels)),
                ImageSet(load_image_files(test_paths, side, crop_square=False), torch.tensor(test_labels)))
