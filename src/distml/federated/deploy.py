"""A deployed client's own data: a local ``.npz`` file or one shard of a seeded partition.

Real clients train on data that never leaves them. :func:`load_client_data`
reads it from a ``.npz`` file (arrays ``x`` and ``y``, optionally ``x_test``
and ``y_test``; loaded with ``allow_pickle=False``, so a file cannot run code)
or, for demos and tests, takes shard ``INDEX`` of an ``N``-way partition of a
registered dataset (``digits:0/2``, ``digits:3/10:dirichlet``), which every
client computes identically from the seed. :func:`write_client_shards` writes
such a partition to one ``.npz`` per client for shipping to devices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distml.config import DataSection
from distml.errors import ConfigError, UserError
from distml.federated.partition import partition

_SHARD_SPEC = re.compile(r"^(?P<name>[\w.-]+):(?P<index>\d+)/(?P<count>\d+)(?::(?P<method>\w+))?$")


@dataclass(frozen=True)
class ClientData:
    """Training inputs and labels of one client, plus its local evaluation split if any."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.x)

    def eval_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The local test split, or the training data when the client has none."""
        if self.x_test is not None and self.y_test is not None:
            return self.x_test, self.y_test
        return self.x, self.y


def load_client_data(
    spec: str, *, data: Mapping[str, Any] | None = None, seed: int = 0
) -> ClientData:
    """Data for ``spec``: ``PATH.npz`` or ``NAME:INDEX/COUNT[:METHOD]`` (iid by default).

    ``data`` holds ``data:`` config fields (the server sends its own) and
    ``seed`` the split seed, so a shard is drawn from the same train split
    whose test part the server evaluates on.
    """
    match = _SHARD_SPEC.match(spec)
    if match is None or spec.endswith(".npz") or os.path.exists(spec):
        return _load_npz(Path(spec))
    index, count = int(match["index"]), int(match["count"])
    if not 0 <= index < count:
        raise ConfigError(f"client data shard {index}/{count} is out of range; use 0..{count - 1}")
    return dataset_shard(
        match["name"], index, count, method=match["method"] or "iid", data=data, seed=seed
    )


def dataset_shard(
    name: str,
    index: int,
    count: int,
    *,
    method: str = "iid",
    data: Mapping[str, Any] | None = None,
    seed: int = 0,
    **options: Any,
) -> ClientData:
    """Shard ``index`` of a ``count``-way ``method`` partition of dataset ``name`` (both splits)."""
    x, y, x_test, y_test = _dataset_arrays(name, data, seed)
    parts = partition(method, num_clients=count, labels=y.numpy(), seed=seed, **options)
    test_parts = partition("iid", num_clients=count, num_samples=len(x_test), seed=seed)
    train_idx = torch.from_numpy(parts[index])
    test_idx = torch.from_numpy(test_parts[index])
    return ClientData(
        x[train_idx], y[train_idx], x_test[test_idx], y_test[test_idx], f"{name}:{index}/{count}"
    )


def write_client_shards(
    name: str,
    count: int,
    out_dir: str | os.PathLike[str],
    *,
    method: str = "iid",
    data: Mapping[str, Any] | None = None,
    seed: int = 0,
    **options: Any,
) -> list[Path]:
    """Write ``client_<i>.npz`` (``x``, ``y``, ``x_test``, ``y_test``) for every shard."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        shard = dataset_shard(name, i, count, method=method, data=data, seed=seed, **options)
        path = out / f"client_{i}.npz"
        assert shard.x_test is not None and shard.y_test is not None
        np.savez(
            path,
            x=shard.x.numpy(),
            y=shard.y.numpy(),
            x_test=shard.x_test.numpy(),
            y_test=shard.y_test.numpy(),
        )
        paths.append(path)
    return paths


def _dataset_arrays(
    name: str, data: Mapping[str, Any] | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from distml.data import ArrayDataset, build_datasets

    fields = {k: v for k, v in (data or {}).items() if k in DataSection.model_fields}
    fields["name"] = name
    bundle = build_datasets(DataSection(**fields), seed)
    if not isinstance(bundle.train, ArrayDataset) or not isinstance(bundle.test, ArrayDataset):
        raise ConfigError(
            f"dataset {name!r} is not an in-memory classification dataset; give the client "
            "a .npz file with x and y instead"
        )
    return bundle.train.inputs, bundle.train.targets, bundle.test.inputs, bundle.test.targets


def _load_npz(path: Path) -> ClientData:
    if not path.is_file():
        raise UserError(
            f"client data {str(path)!r} is neither an existing .npz file nor a shard spec like "
            "digits:0/2; pass one of those with --data"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise UserError(
            f"cannot read client data {path}: {exc}; save it with numpy.savez(x=..., y=...)"
        ) from None
    for key in ("x", "y"):
        if key not in arrays:
            raise UserError(f"client data {path} has no array {key!r}; save it with x= and y=")
    x, y = _as_tensors(arrays["x"], arrays["y"], path, "x/y")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UserError(f"client data {path} must hold both x_test and y_test, or neither")
    if "x_test" in arrays:
        xt, yt = _as_tensors(arrays["x_test"], arrays["y_test"], path, "x_test/y_test")
        return ClientData(x, y, xt, yt, str(path))
    return ClientData(x, y, source=str(path))


def _as_tensors(
    x: np.ndarray, y: np.ndarray, path: Path, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if len(x) == 0 or len(x) != len(y):
        raise UserError(
            f"client data {path}: {what} must be non-empty with one label per sample, got "
            f"{len(x)} inputs and {len(y)} labels"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"client data {path}: labels must be a 1-D integer array")
    if not np.issubdtype(x.dtype, np.number):
        raise UserError(f"client data {path}: inputs must be numeric, got dtype {x.dtype}")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
