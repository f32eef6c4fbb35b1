"""Datasets (registry of offline datasets) and deterministic distributed sampling."""

from distml.data.base import ArrayDataset, DataBundle, DataInfo
from distml.data.registry import build_datasets, dataset_names, register_dataset
from distml.data.sampler import GlobalBatchSampler, per_worker_batch, shard_range

__all__ = [
    "ArrayDataset",
    "DataBundle",
    "DataInfo",
    "GlobalBatchSampler",
    "build_datasets",
    "dataset_names",
    "per_worker_batch",
    "register_dataset",
    "shard_range",
]

# Registers the "squad" dataset (its module imports the registry, so it comes last).
from distml.data import squad  # noqa: F401
