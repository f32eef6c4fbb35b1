"""Partitioners: every index exactly once, seeded reproducibility, the skew each one promises."""

from __future__ import annotations

import numpy as np
import pytest

from distml.errors import ConfigError
from distml.federated.partition import (
    dirichlet_partition,
    iid_partition,
    label_histograms,
    natural_partition,
    partition,
    shard_partition,
)

LABELS = np.random.default_rng(0).integers(0, 10, size=2000)


def _assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize(
    ("method", "options"),
    [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"classes_per_client": 2})],
)
def test_cover_and_seeds(method: str, options: dict[str, float]) -> None:
    parts = partition(method, labels=LABELS, num_clients=17, seed=5, **options)
    assert len(parts) == 17
    _assert_exact_cover(parts, len(LABELS))
    again = partition(method, labels=LABELS, num_clients=17, seed=5, **options)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(method, labels=LABELS, num_clients=17, seed=6, **options)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_sizes_differ_by_at_most_one() -> None:
    sizes = [len(p) for p in iid_partition(1003, 10, seed=1)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


def test_dirichlet_alpha_controls_label_skew_and_min_size() -> None:
    def mean_classes(alpha: float) -> float:
        parts = dirichlet_partition(LABELS, 20, alpha, seed=2)
        return float((label_histograms(LABELS, parts) > 0).sum(axis=1).mean())

    assert mean_classes(0.05) < 4 < 9 < mean_classes(100.0)
    parts = dirichlet_partition(LABELS, 20, 0.1, seed=3, min_size=30)
    assert min(len(p) for p in parts) >= 30


def test_shards_give_each_client_exactly_k_classes() -> None:
    for k in (1, 2, 3):
        parts = shard_partition(LABELS, 12, classes_per_client=k, seed=4)
        _assert_exact_cover(parts, len(LABELS))
        classes = (label_histograms(LABELS, parts) > 0).sum(axis=1)
        assert classes.tolist() == [k] * 12
    with pytest.raises(ConfigError, match="cannot cover 10 classes"):
        shard_partition(LABELS, 4, classes_per_client=2)


def test_natural_partition_groups_by_id() -> None:
    groups = np.array(["b", "a", "b", "c", "a", "b"])
    parts = natural_partition(groups)
    assert [p.tolist() for p in parts] == [[1, 4], [0, 2, 5], [3]]
    parts = partition("natural", num_clients=3, group_ids=groups)
    _assert_exact_cover(parts, 6)
    with pytest.raises(ConfigError, match="natural partition has 3 groups but num_clients=4"):
        partition("natural", num_clients=4, group_ids=groups)


def test_label_histograms_count_labels_per_client() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    hist = label_histograms(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], num_classes=4)
    assert hist.tolist() == [[1, 1, 0, 0], [0, 1, 3, 0]]


def test_partition_errors_are_one_line_config_errors() -> None:
    with pytest.raises(
        ConfigError, match=r"^unknown partition method 'pathological'; choose one of"
    ):
        partition("pathological", labels=LABELS, num_clients=3)
    with pytest.raises(ConfigError, match=r"^unknown option 'alpha' for partition 'iid'"):
        partition("iid", labels=LABELS, num_clients=3, alpha=0.1)
    with pytest.raises(ConfigError, match=r"^dirichlet alpha must be > 0, got 0.0$"):
        partition("dirichlet", labels=LABELS, num_clients=3, alpha=0.0)
    with pytest.raises(ConfigError, match=r"^num_clients must be between 1 and the 2000 samples"):
        partition("iid", num_samples=2000, num_clients=0)
    with pytest.raises(ConfigError, match="needs a group id per sample"):
        partition("natural", num_clients=3)
