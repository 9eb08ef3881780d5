"""Datasets: the API (``base``), splits, batched augmentation, and one module per dataset."""
from bench.data.base import Dataset, DatasetInfo, ImageSet, load_dataset

__all__ = ["Dataset", "DatasetInfo", "ImageSet", "load_dataset"]
