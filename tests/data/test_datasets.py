"""Dataset registry: offline datasets, deterministic splits, local-file readers and their errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from distml.config import DataSection
from distml.data import build_datasets
from distml.errors import ConfigError, UserError


def test_digits_shapes_and_split() -> None:
    bundle = build_datasets(DataSection(name="digits"), seed=0)
    assert len(bundle.train) + len(bundle.test) == 1797
    assert len(bundle.test) == round(1797 * 0.2)
    x, y = bundle.train.get_batch(torch.arange(4))
    assert x.shape == (4, 1, 8, 8) and y.dtype == torch.long
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert bundle.info.model_defaults()["in_channels"] == 1
    again = build_datasets(DataSection(name="digits"), seed=0)
    assert torch.equal(again.test.targets, bundle.test.targets)


@pytest.mark.parametrize("name", ["synthetic-classification", "synthetic-images"])
def test_synthetic_is_seeded_and_sized(name: str) -> None:
    cfg = DataSection(name=name, num_samples=500, num_classes=4, image_size=8, channels=1)
    a, b = build_datasets(cfg, seed=1), build_datasets(cfg, seed=1)
    c = build_datasets(cfg, seed=2)
    assert len(a.train) + len(a.test) == 500
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert int(a.train.targets.max()) < 4


def test_text_char_windows_shift_by_one(shakespeare) -> None:
    bundle = build_datasets(
        DataSection(name="text", path=str(shakespeare), seq_len=32), 0, "causal_lm"
    )
    x, y = bundle.train.get_batch(torch.tensor([0, 5]))
    assert x.shape == y.shape == (2, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    tok = bundle.info.extra["tokenizer"]
    assert tok.decode(x[0]) == shakespeare.read_text()[:32]
    assert bundle.info.vocab_size == 65 + 1  # 65 characters plus [MASK]


def test_text_byte_masked_objective_is_deterministic(shakespeare) -> None:
    cfg = DataSection(name="text", path=str(shakespeare), seq_len=64, tokenizer="byte")
    bundle = build_datasets(cfg, 0, "masked_lm")
    idx = torch.arange(50)
    x1, y1 = bundle.train.get_batch(idx, epoch=0)
    x2, y2 = bundle.train.get_batch(idx, epoch=0)
    x3, _ = bundle.train.get_batch(idx, epoch=1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)  # a new mask each epoch
    masked = y1 != -100
    assert 0.12 < masked.float().mean() < 0.18
    assert bool((x1[masked] == 256).all())


def test_text_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="needs a file: set data.path"):
        build_datasets(DataSection(name="text"), 0, "causal_lm")
    short = tmp_path / "short.txt"
    short.write_text("hello")
    with pytest.raises(UserError, match="lower data.seq_len"):
        build_datasets(DataSection(name="text", path=str(short), seq_len=16), 0, "causal_lm")


def test_unknown_dataset() -> None:
    with pytest.raises(ConfigError) as err:
        build_datasets(DataSection(name="imagenet"))
    assert str(err.value).startswith(
        "unknown dataset 'imagenet' (data.name); choose one of: cifar10, digits"
    )


def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def test_mnist_reader_on_local_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 20, True), ("t10k", 6, False)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz)
    bundle = build_datasets(DataSection(name="mnist", path=str(tmp_path)))
    assert bundle.train.inputs.shape == (20, 1, 28, 28) and len(bundle.test) == 6
    assert bundle.info.model_defaults()["image_size"] == 28


def test_mnist_missing_and_truncated(tmp_path) -> None:
    with pytest.raises(UserError, match="MNIST files not found in .*distml never downloads"):
        build_datasets(DataSection(name="mnist", path=str(tmp_path)))
    with pytest.raises(UserError, match="set data.path=/dir/with/mnist"):
        build_datasets(DataSection(name="mnist"))
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)), False)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((4,)), False)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(UserError, match="is truncated"):
        build_datasets(DataSection(name="mnist", path=str(tmp_path)))


def test_cifar10_reader_on_local_files(tmp_path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:
        labels = rng.integers(0, 10, (3, 1))
        pixels = rng.integers(0, 256, (3, 3072))
        (folder / name).write_bytes(
            np.concatenate([labels, pixels], axis=1).astype(np.uint8).tobytes()
        )
    bundle = build_datasets(DataSection(name="cifar10", path=str(tmp_path)))
    assert bundle.train.inputs.shape == (15, 3, 32, 32) and len(bundle.test) == 3
    (folder / "test_batch.bin").unlink()
    with pytest.raises(UserError, match="CIFAR-10 file test_batch.bin not found"):
        build_datasets(DataSection(name="cifar10", path=str(tmp_path)))
