"""Datasets, seeded augmented views and the on-device loader."""

from __future__ import annotations

from .datasets import (
    DatasetSplits,
    ImageDataset,
    channel_stats,
    list_datasets,
    load_dataset,
    register_dataset,
    stratified_split,
)
from .loader import Batch, DeviceLoader
from .record import dataset_record
from .views import AugmentSpec, hash_ints, make_view, normalize, view_params

__all__ = [
    "AugmentSpec",
    "Batch",
    "DatasetSplits",
    "DeviceLoader",
    "ImageDataset",
    "channel_stats",
    "dataset_record",
    "hash_ints",
    "list_datasets",
    "load_dataset",
    "make_view",
    "normalize",
    "register_dataset",
    "stratified_split",
    "view_params",
]
