"""Readers for MNIST (IDX files) and CIFAR-10 (binary version) from a local directory.

distml never downloads at run time. These read the standard distribution
formats byte for byte (the same files torchvision reads); torchvision is not
required, because its wheels are tied to one torch build and would pin the
user's torch. Missing files give one line saying which files to put where.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from distml.errors import UserError

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


def _find(root: Path, name: str) -> Path | None:
    for candidate in (
        root / name,
        root / f"{name}.gz",
        root / "raw" / name,
        root / "raw" / f"{name}.gz",
        root / "MNIST" / "raw" / name,
        root / "MNIST" / "raw" / f"{name}.gz",
        root / "cifar-10-batches-bin" / name,
    ):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into an array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); re-download it")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise UserError(
            f"{path} is truncated ({len(raw) - offset} of {expected} bytes); re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def load_mnist(root: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images as float (N, 1, 28, 28) in [0, 1] and int64 labels."""
    base = _require_dir(root, "mnist")
    image_name, label_name = MNIST_FILES[split]
    image_path, label_path = _find(base, image_name), _find(base, label_name)
    if image_path is None or label_path is None:
        raise UserError(
            f"MNIST files not found in {base}: put {image_name}[.gz] and {label_name}[.gz] "
            "(and the t10k-* test files) there; distml never downloads at run time"
        )
    images = read_idx(image_path)
    labels = read_idx(label_path)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_cifar10(root: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 binary batches as float (N, 3, 32, 32) in [0, 1] and int64 labels."""
    base = _require_dir(root, "cifar10")
    record = 1 + 3 * 32 * 32
    xs, ys = [], []
    for name in CIFAR10_FILES[split]:
        path = _find(base, name)
        if path is None:
            raise UserError(
                f"CIFAR-10 file {name} not found in {base}: extract cifar-10-binary.tar.gz "
                "there (cifar-10-batches-bin/*.bin); distml never downloads at run time"
            )
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % record:
            raise UserError(f"{path} is truncated (not a whole number of records); re-download it")
        rows = raw.reshape(-1, record)
        ys.append(rows[:, 0].astype(np.int64))
        xs.append(rows[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _require_dir(root: str | None, dataset: str) -> Path:
    if root is None:
        raise UserError(f"dataset '{dataset}' reads local files: set data.path=/dir/with/{dataset}")
    base = Path(root)
    if not base.is_dir():
        raise UserError(
            f"{dataset} directory not found: {base}; set data.path to the folder holding the files"
        )
    return base
