"""Alpha-beta cost model of the collectives, and a ping-pong probe that measures a link.

Sending ``n`` bytes over a link costs ``alpha + n * beta`` seconds: ``alpha`` is
the per-message latency, ``beta`` the inverse bandwidth. The functions below
predict each all-reduce algorithm of :mod:`distml.comm.collectives` and
:mod:`distml.comm.hierarchical` from that model (reduction arithmetic ignored),
so a user can pick an algorithm for a message size and world size before
running it; :func:`measure_alpha_beta` fits ``alpha`` and ``beta`` for a real
link. ``ceil(log2 p)`` is written ``lg p`` in the formulas.
"""

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distml.comm.collectives import (
    ProcessGroupLike,
    backend_device,
    broadcast,
    exchange,
    group_view,
)
from distml.errors import ConfigError, UserError


@dataclass(frozen=True)
class LinkModel:
    """One link: ``alpha`` seconds per message plus ``beta`` seconds per byte."""

    alpha: float
    beta: float

    def time(self, nbytes: float) -> float:
        """Seconds to send one message of ``nbytes`` bytes."""
        return self.alpha + nbytes * self.beta

    @property
    def bandwidth(self) -> float:
        """Bytes per second (``1 / beta``)."""
        return math.inf if self.beta == 0 else 1.0 / self.beta


def _check(nbytes: float, p: int) -> None:
    if p < 1 or nbytes < 0:
        raise UserError(f"need world size >= 1 and bytes >= 0, got p={p}, n={nbytes}")


def _lg(p: int) -> int:
    return (p - 1).bit_length()  # ceil(log2 p) for p >= 1


def ring_all_reduce_time(nbytes: float, p: int, link: LinkModel) -> float:
    """Ring: ``2(p-1) alpha + 2(p-1)/p * n * beta``.

    Reduce-scatter and all-gather each take ``p-1`` steps of one ``n/p`` chunk.
    """
    _check(nbytes, p)
    return 2 * (p - 1) * link.alpha + 2 * (p - 1) / p * nbytes * link.beta


def halving_doubling_all_reduce_time(nbytes: float, p: int, link: LinkModel) -> float:
    """Rabenseifner: ``2 log2(q) alpha + 2(q-1)/q * n * beta`` with ``q = 2^floor(log2 p)``.

    When ``p`` is not a power of two, folding the extra ranks in and handing
    the result back adds ``2(alpha + n * beta)``.
    """
    _check(nbytes, p)
    q = 1 << (p.bit_length() - 1)
    fold = 0.0 if q == p else 2 * link.time(nbytes)
    return fold + 2 * _lg(q) * link.alpha + 2 * (q - 1) / q * nbytes * link.beta


def tree_reduce_time(nbytes: float, p: int, link: LinkModel) -> float:
    """Binomial reduce or broadcast: ``lg p * (alpha + n * beta)`` (whole message per level)."""
    _check(nbytes, p)
    return _lg(p) * link.time(nbytes)


tree_broadcast_time = tree_reduce_time


def tree_all_reduce_time(nbytes: float, p: int, link: LinkModel) -> float:
    """Binomial reduce then broadcast: ``2 lg p * (alpha + n * beta)``."""
    return 2 * tree_reduce_time(nbytes, p, link)


def naive_all_reduce_time(nbytes: float, p: int, link: LinkModel) -> float:
    """Reference: a root receives then sends ``p-1`` whole messages: ``2(p-1)(alpha + n beta)``."""
    _check(nbytes, p)
    return 2 * (p - 1) * link.time(nbytes)


def hierarchical_all_reduce_time(
    nbytes: float, hosts: int, per_host: int, intra: LinkModel, inter: LinkModel
) -> float:
    """Tree reduce in each host, ring across host leaders, tree broadcast in each host.

    ``2 lg(per_host) (alpha_intra + n beta_intra)
    + 2(H-1) alpha_inter + 2(H-1)/H * n * beta_inter`` for ``H = hosts``.
    """
    return tree_all_reduce_time(nbytes, per_host, intra) + ring_all_reduce_time(
        nbytes, hosts, inter
    )


_FLAT: dict[str, Callable[[float, int, LinkModel], float]] = {
    "ring": ring_all_reduce_time,
    "halving_doubling": halving_doubling_all_reduce_time,
    "tree": tree_all_reduce_time,
    "naive": naive_all_reduce_time,
}


def predict_all_reduce_time(algorithm: str, nbytes: float, p: int, link: LinkModel) -> float:
    """Predicted seconds of a flat all-reduce algorithm (``ring``, ``halving_doubling``,
    ``tree`` or the ``naive`` reference)."""
    if algorithm not in _FLAT:
        raise ConfigError(f"no cost formula for {algorithm!r}; use one of {', '.join(_FLAT)}")
    return _FLAT[algorithm](nbytes, p, link)


def best_all_reduce_algorithm(nbytes: float, p: int, link: LinkModel) -> str:
    """The distml flat algorithm with the lowest predicted time (ties go to ring)."""
    choices = ("ring", "halving_doubling", "tree")
    return min(choices, key=lambda name: _FLAT[name](nbytes, p, link))


# --- measurement -------------------------------------------------------------

DEFAULT_SIZES = (8, 1 << 10, 1 << 14, 1 << 17, 1 << 20)


def ping_pong_times(
    group: ProcessGroupLike = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 20,
    peers: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> list[tuple[int, float]]:
    """One-way times ``(bytes, seconds)`` between two ranks by ping-pong, fastest of ``repeats``.

    ``peers`` are two global ranks of ``group`` (default: its first two). The
    first peer times round trips and returns the samples; every other rank
    returns ``[]`` (the second peer only echoes). A first untimed round warms
    up the connection. The fastest trip is kept because scheduler noise on a
    shared host only ever adds time. ``device`` defaults to the backend's
    (the current CUDA device under nccl, else the CPU).
    """
    device = device if device is not None else backend_device(group)
    view = group_view(group, device)  # joined by bystanders too: it may be a collective
    if view.size < 2:
        raise UserError("measuring a link needs a process group of at least 2 ranks")
    first, second = peers if peers is not None else view.ranks[:2]
    a, b = view.index_of(first, "peers[0]"), view.index_of(second, "peers[1]")
    if a == b:
        raise UserError(f"peers must be two different ranks, got {peers}")
    if view.index not in (a, b):
        return []
    payloads = [torch.zeros(max(int(n), 1), dtype=torch.uint8, device=device) for n in sizes]
    best = [math.inf] * len(payloads)
    # Each round visits every size, so a burst of load slows all sizes alike instead of one.
    for trial in range(repeats + 1):
        for i, payload in enumerate(payloads):
            start = time.perf_counter()
            if view.index == a:
                exchange(view, sends=[(payload, b)])
                exchange(view, recvs=[(payload, b)])
            else:
                exchange(view, recvs=[(payload, a)])
                exchange(view, sends=[(payload, a)])
            if payload.is_cuda:
                torch.cuda.synchronize(payload.device)
            if trial > 0:
                best[i] = min(best[i], (time.perf_counter() - start) / 2)
    if view.index != a:
        return []
    return [(payload.numel(), seconds) for payload, seconds in zip(payloads, best, strict=True)]


def fit_link_model(samples: Sequence[tuple[int, float]]) -> LinkModel:
    """Least-squares fit of ``t = alpha + beta * n`` weighted by ``1/t``.

    The weights minimise relative rather than absolute error, so the small
    messages that pin down ``alpha`` count as much as the large ones that pin
    down ``beta``. Both are floored at 1e-12 because noise can push an
    intercept or slope of a fast link slightly below zero.
    """
    if len({n for n, _ in samples}) < 2:
        raise UserError("fitting alpha and beta needs samples at two or more message sizes")
    rows = torch.tensor([[1.0 / t, n / t] for n, t in samples], dtype=torch.float64)
    ones = torch.ones(len(samples), 1, dtype=torch.float64)
    alpha, beta = torch.linalg.lstsq(rows, ones).solution.flatten().tolist()
    return LinkModel(alpha=max(alpha, 1e-12), beta=max(beta, 1e-12))


def measure_alpha_beta(
    group: ProcessGroupLike = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
    repeats: int = 20,
    peers: tuple[int, int] | None = None,
    device: torch.device | None = None,
) -> LinkModel:
    """Measure one link by ping-pong and fit it; every rank of ``group`` calls it and gets the fit.

    The first of ``peers`` fits the samples and broadcasts alpha and beta to
    the whole group, so all ranks can make the same algorithm choice.
    """
    device = device if device is not None else backend_device(group)
    samples = ping_pong_times(group, sizes, repeats, peers, device)
    view = group_view(group)
    root = peers[0] if peers is not None else view.ranks[0]
    fitted = torch.zeros(2, dtype=torch.float64, device=device)
    if dist.get_rank() == root:
        model = fit_link_model(samples)
        fitted[0], fitted[1] = model.alpha, model.beta
    broadcast(fitted, root, group)
    return LinkModel(alpha=float(fitted[0]), beta=float(fitted[1]))
