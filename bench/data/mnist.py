from __future__ import annotations

from pathlib import Path

from bench.data.base import Dataset, DatasetInfo, ImageSet
from bench.data.fashion_mnist import find_idx_files, read_idx_set
from bench.data.images import fetch
from bench.errors import BenchError
from bench.registry import register_dataset

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"


@register_dataset("mnist")
class MNIST(Dataset):
    """MNIST handwritten digits (60000 train / 10000 test); torchvision download."""

    # Digits are not mirror-symmetric (a flipped 2 is no 2): no horizontal flip.
    info = DatasetInfo("mnist", 10, (1, 28, 28), mean=(0.1307,), std=(0.3081,), hflip=False)

    def load(self, root: Path) -> tuple[ImageSet, ImageSet]:
        own = root / "mnist"
        # torchvision keeps the IDX files in <root>/MNIST/raw; plain files in <own> work too.
        for directory in (own / "MNIST", own):
            files = find_idx_files(directory)
            if files is not None:
                return read_idx_set(files)

        def download() -> None:
            from torchvision.datasets import MNIST as TorchvisionMNIST

            TorchvisionMNIST(str(own), train=True, download=True)

        fetch("MNIST", own, MNIST_URL, download,
              f"{own / 'MNIST' / 'raw'}/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]")
        files = find_idx_files(own / "MNIST")
        if files is None:
            raise BenchError(f"torchvision downloaded MNIST but its IDX files are not under {own / 'MNIST' / 'raw'}")
        return read_idx_set(files)
