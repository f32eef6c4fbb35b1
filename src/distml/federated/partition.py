"""Split a dataset's indices among federated clients: iid, dirichlet, shards, natural.

Every partitioner returns one sorted ``int64`` index array per client, assigns
each index to exactly one client, and is a pure function of its inputs and
``seed``. :func:`partition` is the config/CLI entry point (``distml fl
partition``), and :func:`label_histograms` counts each client's labels for
printing how skewed a split is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from distml.errors import ConfigError, UserError

IndexArrays = list[np.ndarray]


def iid_partition(num_samples: int, num_clients: int, seed: int = 0) -> IndexArrays:
    """A random permutation cut into ``num_clients`` near-equal parts (sizes differ by <= 1)."""
    _check_clients(num_clients, num_samples)
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> IndexArrays:
    """Label skew (Hsu et al. 2019): each class is split by proportions ~ Dir(alpha).

    Small ``alpha`` gives each client few classes; large ``alpha`` tends to iid.
    Draws are repeated (same seeded stream) until every client has at least
    ``min_size`` samples.
    """
    labels = _labels(labels)
    _check_clients(num_clients, len(labels))
    if alpha <= 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ConfigError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} "
            f"samples, have {len(labels)}; lower min_size or num_clients"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(r) for r in result) >= min_size:
            return result
    raise UserError(
        f"dirichlet partition with alpha={alpha} left a client below min_size={min_size} "
        f"after {max_tries} draws; raise alpha or lower min_size"
    )


def shard_partition(
    labels: np.ndarray, num_clients: int, classes_per_client: int = 2, seed: int = 0
) -> IndexArrays:
    """Pathological non-iid (after McMahan et al. 2017): each client holds exactly k classes.

    The ``num_clients * k`` shard slots are spread over the classes as evenly
    as possible (every class gets at least one), each class's samples are cut
    randomly into its shards, and the slots, laid out class by class, are dealt
    round-robin so that no client gets two shards of one class. Needs
    ``classes <= num_clients * k`` and ``k <= classes``.
    """
    y = _labels(labels)
    _check_clients(num_clients, len(y))
    classes = np.unique(y)
    slots = num_clients * classes_per_client
    if not 1 <= classes_per_client <= len(classes) or slots < len(classes):
        raise ConfigError(
            f"classes_per_client={classes_per_client} with {num_clients} clients cannot cover "
            f"{len(classes)} classes; use 1..{len(classes)} and num_clients * k >= {len(classes)}"
        )
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    per_class = np.full(len(classes), slots // len(classes))
    per_class[rng.permutation(len(classes))[: slots % len(classes)]] += 1
    shards: list[np.ndarray] = []
    for c, count in zip(order, per_class, strict=True):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), count))
    # Slot j goes to client j mod N: a class's <= N consecutive slots land on distinct clients.
    owner = rng.permutation(num_clients)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for j, shard in enumerate(shards):
        parts[owner[j % num_clients]].append(shard)
    result = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
    if min(len(r) for r in result) == 0:
        raise UserError(
            f"shards partition left a client with no samples ({len(y)} samples, "
            f"{slots} shards); use fewer clients or classes_per_client"
        )
    return result


def natural_partition(group_ids: np.ndarray) -> IndexArrays:
    """One client per distinct value of ``group_ids`` (writer, user, device), in sorted order."""
    groups = np.asarray(group_ids)
    if groups.ndim != 1 or len(groups) == 0:
        raise UserError("natural partition needs a non-empty 1-D array of group ids per sample")
    return [np.flatnonzero(groups == g).astype(np.int64) for g in np.unique(groups)]


PARTITIONERS = ("iid", "dirichlet", "shards", "natural")


def partition(
    method: str,
    *,
    num_clients: int | None = None,
    labels: np.ndarray | None = None,
    num_samples: int | None = None,
    group_ids: np.ndarray | None = None,
    seed: int = 0,
    **options: Any,
) -> IndexArrays:
    """Dispatch by name: ``partition("dirichlet", labels=y, num_clients=100, alpha=0.5)``.

    ``natural`` makes one client per group id, so ``num_clients`` is then only
    checked against the number of groups when given.
    """
    allowed = {"iid": set(), "dirichlet": {"alpha", "min_size"}, "shards": {"classes_per_client"}}
    if method not in PARTITIONERS:
        raise ConfigError(
            f"unknown partition method {method!r}; choose one of: {', '.join(PARTITIONERS)}"
        )
    extra = sorted(set(options) - allowed.get(method, set()))
    if extra:
        raise ConfigError(
            f"unknown option {extra[0]!r} for partition {method!r}; valid options: "
            f"{', '.join(sorted(allowed.get(method, set()))) or 'none'}"
        )
    if method == "natural":
        if group_ids is None:
            raise ConfigError("partition 'natural' needs a group id per sample (group_ids)")
        parts = natural_partition(group_ids)
        if num_clients is not None and num_clients != len(parts):
            raise ConfigError(
                f"natural partition has {len(parts)} groups but num_clients={num_clients}; "
                f"set num_clients to {len(parts)} or leave it out"
            )
        return parts
    if num_clients is None:
        raise ConfigError(f"partition {method!r} needs num_clients")
    if method == "iid":
        n = num_samples if num_samples is not None else len(_require_labels(labels, method))
        return iid_partition(n, num_clients, seed)
    y = _require_labels(labels, method)
    if method == "dirichlet":
        return dirichlet_partition(
            y, num_clients, float(options.get("alpha", 0.5)), seed, int(options.get("min_size", 1))
        )
    return shard_partition(y, num_clients, int(options.get("classes_per_client", 2)), seed)


def label_histograms(
    labels: np.ndarray, partitions: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """(clients, classes) counts of each label in each client's partition."""
    y = _labels(labels)
    k = num_classes if num_classes is not None else int(y.max()) + 1 if len(y) else 0
    return np.stack([np.bincount(y[idx], minlength=k)[:k] for idx in partitions])


def _labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError("labels must be a 1-D integer array (one class id per sample)")
    return y.astype(np.int64)


def _require_labels(labels: np.ndarray | None, method: str) -> np.ndarray:
    if labels is None:
        raise ConfigError(f"partition {method!r} needs the dataset labels")
    return _labels(labels)


def _check_clients(num_clients: int, num_samples: int) -> None:
    if not 1 <= num_clients <= num_samples:
        raise ConfigError(
            f"num_clients must be between 1 and the {num_samples} samples, got {num_clients}"
        )
