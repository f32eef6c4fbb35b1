"""The dataset registry: names to builders returning train/test splits and DataInfo.

Built-ins: ``digits`` (scikit-learn's bundled 8x8 digits), ``synthetic-classification``
and ``synthetic-images`` (seeded, any size), ``text`` (character/byte LM from a
file), ``mnist`` and ``cifar10`` (local files). Splits are deterministic in the
config seed, so every rank and every resumed run sees the same data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from distml.config import DataSection
from distml.data.base import ArrayDataset, DataBundle, DataInfo
from distml.data.text import TokenWindows, make_tokenizer, read_text
from distml.data.vision_files import load_cifar10, load_mnist
from distml.errors import ConfigError

DatasetBuilder = Callable[[DataSection, int, str], DataBundle]
_DATASETS: dict[str, DatasetBuilder] = {}


def register_dataset(name: str) -> Callable[[DatasetBuilder], DatasetBuilder]:
    def decorate(fn: DatasetBuilder) -> DatasetBuilder:
        _DATASETS[name] = fn
        return fn

    return decorate


def dataset_names() -> list[str]:
    return sorted(_DATASETS)


def build_datasets(
    cfg: DataSection, seed: int = 0, model_task: str = "classification"
) -> DataBundle:
    """Build the train and test splits named by ``cfg.name``."""
    try:
        builder = _DATASETS[cfg.name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {cfg.name!r} (data.name); choose one of: {', '.join(dataset_names())}"
        ) from None
    return builder(cfg, seed, model_task)


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7)
    perm = torch.randperm(n, generator=gen)
    n_test = max(1, round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


def _classification_bundle(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: DataSection, seed: int
) -> DataBundle:
    train_idx, test_idx = _split(len(x), cfg.test_fraction, seed)
    info = DataInfo("classification", num_classes=num_classes, input_shape=tuple(x.shape[1:]))
    return DataBundle(
        ArrayDataset(x[train_idx], y[train_idx]), ArrayDataset(x[test_idx], y[test_idx]), info
    )


@register_dataset("digits")
def _digits(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to [0, 1] and keep the 8x8 image layout.
    x = torch.from_numpy((bunch.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(bunch.target.astype(np.int64))
    return _classification_bundle(x, y, 10, cfg, seed)


@register_dataset("synthetic-classification")
def _synthetic_classification(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    # Gaussian class clusters: learnable, so accuracy is a meaningful check.
    gen = torch.Generator().manual_seed(seed + 11)
    centers = torch.randn(cfg.num_classes, cfg.num_features, generator=gen) * 2.0
    y = torch.randint(0, cfg.num_classes, (cfg.num_samples,), generator=gen)
    x = centers[y] + torch.randn(cfg.num_samples, cfg.num_features, generator=gen)
    return _classification_bundle(x, y, cfg.num_classes, cfg, seed)


@register_dataset("synthetic-images")
def _synthetic_images(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    gen = torch.Generator().manual_seed(seed + 13)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    templates = torch.rand(cfg.num_classes, *shape, generator=gen)
    y = torch.randint(0, cfg.num_classes, (cfg.num_samples,), generator=gen)
    x = templates[y] + 0.5 * torch.randn(cfg.num_samples, *shape, generator=gen)
    return _classification_bundle(x, y, cfg.num_classes, cfg, seed)


@register_dataset("mnist")
def _mnist(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    x_train, y_train = load_mnist(cfg.path, "train")
    x_test, y_test = load_mnist(cfg.path, "test")
    info = DataInfo("classification", num_classes=10, input_shape=tuple(x_train.shape[1:]))
    return DataBundle(ArrayDataset(x_train, y_train), ArrayDataset(x_test, y_test), info)


@register_dataset("cifar10")
def _cifar10(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    x_train, y_train = load_cifar10(cfg.path, "train")
    x_test, y_test = load_cifar10(cfg.path, "test")
    info = DataInfo("classification", num_classes=10, input_shape=tuple(x_train.shape[1:]))
    return DataBundle(ArrayDataset(x_train, y_train), ArrayDataset(x_test, y_test), info)


@register_dataset("text")
def _text(cfg: DataSection, seed: int, model_task: str) -> DataBundle:
    text = read_text(cfg.path)
    tokenizer = make_tokenizer(cfg.tokenizer, text)
    tokens = tokenizer.encode(text)
    objective = cfg.objective
    if objective == "auto":
        objective = "masked" if model_task == "masked_lm" else "causal"
    # Contiguous split: the last test_fraction of the text is held out (no leakage
    # between overlapping contexts, unlike a random split of windows).
    cut = int(len(tokens) * (1.0 - cfg.test_fraction))
    common = dict(
        seq_len=cfg.seq_len,
        objective=objective,
        mask_id=tokenizer.mask_id,
        mask_prob=cfg.mask_prob,
        seed=seed,
    )
    train = TokenWindows(tokens[:cut], **common)  # type: ignore[arg-type]
    test = TokenWindows(tokens[cut:], **common)  # type: ignore[arg-type]
    task = "masked_lm" if objective == "masked" else "causal_lm"
    info = DataInfo(
        task,
        vocab_size=tokenizer.vocab_size,
        seq_len=cfg.seq_len,
        extra={"tokenizer": tokenizer},
    )
    return DataBundle(train, test, info)
