"""Collective algorithms written over torch.distributed point-to-point messages.

Each collective here (ring, recursive halving-doubling and binomial-tree
all-reduce; binomial broadcast, reduce and gather; ring all-gather) is built
only from ``dist.batch_isend_irecv`` on a process group's ranks, so it runs on
gloo and nccl, on the world or on any subgroup, and its cost follows the
alpha-beta formulas in :mod:`distml.comm.cost`. The algorithms work in group
rank space ("index") and translate to global ranks only when posting a message.
All-reduce variants operate in place on the caller's tensor and return it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
import torch.distributed as dist

from distml.errors import ConfigError, UserError

ReduceOpLike = Union[str, "dist.ReduceOp"]
"""A reduction: ``"sum" | "avg" | "max" | "min" | "product"`` or the matching ``dist.ReduceOp``."""

ProcessGroupLike = Union["dist.ProcessGroup", None]

_OP_NAMES = ("sum", "avg", "max", "min", "product")


@dataclass(frozen=True)
class GroupView:
    """The ranks of a process group as seen from this process."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]  # global ranks ordered by group rank
    index: int  # this process's rank inside the group

    @property
    def size(self) -> int:
        return len(self.ranks)

    def global_rank(self, index: int) -> int:
        """Global rank of group index ``index`` (taken modulo the group size, for rings)."""
        return self.ranks[index % self.size]

    def index_of(self, global_rank: int, what: str) -> int:
        if global_rank not in self.ranks:
            raise UserError(
                f"{what}={global_rank} is not in the process group (ranks {list(self.ranks)}); "
                "pass a global rank that belongs to the group"
            )
        return self.ranks.index(global_rank)


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise UserError(
            "torch.distributed is not initialized; call distml.runtime.init_distributed() "
            "or dist.init_process_group() before running a collective"
        )


def group_view(group: ProcessGroupLike = None, device: torch.device | None = None) -> GroupView:
    """Resolve ``group`` (None is the default group) to its ranks and this process's index.

    With a CUDA ``device`` it also readies the NCCL communicator (see
    :func:`ensure_communicator`), so every rank of the group must call it.
    """
    _require_initialized()
    me = dist.get_rank()
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise UserError(
            f"rank {me} is not in this process group; call the collective only on the group's ranks"
        )
    ranks = tuple(dist.get_process_group_ranks(group))
    view = GroupView(group, ranks, ranks.index(me))
    ensure_communicator(view, device)
    return view


def backend_device(group: ProcessGroupLike = None) -> torch.device:
    """Where ``group``'s messages must live: the current CUDA device for nccl, else the CPU."""
    _require_initialized()
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def normalize_op(op: ReduceOpLike, dtype: torch.dtype | None = None) -> str:
    """Canonical lower-case name of a reduction; rejects averaging integer tensors."""
    name: str | None = None
    if isinstance(op, str):
        name = op.lower() if op.lower() in _OP_NAMES else None
    else:
        for candidate in _OP_NAMES:
            if op == getattr(dist.ReduceOp, candidate.upper()):
                name = candidate
    if name is None:
        raise ConfigError(f"unsupported reduce op {op!r}; use one of {', '.join(_OP_NAMES)}")
    if name == "avg" and dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise UserError(f"op=avg needs a floating-point tensor, got {dtype}; cast it or use op=sum")
    return name


def _combiner(op: str) -> Callable[[torch.Tensor, torch.Tensor], object]:
    """In-place ``acc = acc (op) incoming``; avg sums here and divides once at the end."""
    if op in ("sum", "avg"):
        return torch.Tensor.add_
    if op == "product":
        return torch.Tensor.mul_
    if op == "max":
        return lambda acc, inc: torch.maximum(acc, inc, out=acc)
    return lambda acc, inc: torch.minimum(acc, inc, out=acc)


_warm_nccl_groups: weakref.WeakSet[dist.ProcessGroup] = weakref.WeakSet()


def ensure_communicator(view: GroupView, device: torch.device | None) -> None:
    """Create the NCCL communicator with all ranks before the first batched p2p call.

    NCCL requires every rank of a group to join the group's first batched p2p
    call; tree algorithms start with only some ranks talking, so one tiny
    built-in collective on first use gives them a communicator to share. Every
    rank of the group must reach this call, so the public collectives make it
    on entry, before any rank can block on a message.
    """
    if device is None or device.type != "cuda" or view.size == 1:
        return
    pg = view.group if view.group is not None else dist.group.WORLD
    if pg is None or pg in _warm_nccl_groups or dist.get_backend(view.group) != "nccl":
        return
    dist.all_reduce(torch.zeros(1, device=device), group=view.group)
    _warm_nccl_groups.add(pg)


def exchange(
    view: GroupView,
    sends: Sequence[tuple[torch.Tensor, int]] = (),
    recvs: Sequence[tuple[torch.Tensor, int]] = (),
) -> None:
    """Post sends and receives (peers as group indices) as one batch and wait for all.

    Empty tensors are skipped on both sides; every algorithm here derives the
    same chunk sizes on sender and receiver, so the skips always match.
    Receives are posted before sends: gloo runs a batch's ops one by one, and
    a send whose peer has not yet posted its receive waits for the peer's
    "ready" notice, which serialised the two directions of a link (measured:
    half the built-in's bandwidth on a 100 Mbit/s link; recvs first: equal).
    NCCL coalesces the batch, so the order does not matter there.
    """
    ops = [
        dist.P2POp(dist.irecv, t, view.global_rank(peer), view.group)
        for t, peer in recvs
        if t.numel() > 0
    ]
    ops += [
        dist.P2POp(dist.isend, t, view.global_rank(peer), view.group)
        for t, peer in sends
        if t.numel() > 0
    ]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


@contextmanager
def flattened(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """A 1-D view of ``tensor`` (or a contiguous copy written back on exit) for in-place work."""
    if tensor.is_contiguous():
        yield tensor.view(-1)
        return
    flat = tensor.reshape(-1).clone()
    yield flat
    tensor.copy_(flat.view(tensor.shape))


def chunk_bounds(numel: int, parts: int) -> list[int]:
    """Offsets of ``parts`` near-equal chunks (the first ``numel % parts`` one element longer)."""
    base, extra = divmod(numel, parts)
    offsets = [0]
    for i in range(parts):
        offsets.append(offsets[-1] + base + (1 if i < extra else 0))
    return offsets


# --- all-reduce kernels on a flat buffer (shared with hierarchical.py) -------


def ring_all_reduce_flat(flat: torch.Tensor, op: str, view: GroupView) -> None:
    """Ring reduce-scatter then ring all-gather of ``view.size`` chunks, in place."""
    p, me = view.size, view.index
    if p == 1:
        return
    offsets = chunk_bounds(flat.numel(), p)

    def chunk(c: int) -> torch.Tensor:
        c %= p
        return flat[offsets[c] : offsets[c + 1]]

    combine = _combiner(op)
    scratch = torch.empty(offsets[1] - offsets[0], dtype=flat.dtype, device=flat.device)
    for step in range(p - 1):
        incoming = chunk(me - step - 1)
        received = scratch[: incoming.numel()]
        exchange(view, [(chunk(me - step), me + 1)], [(received, me - 1)])
        combine(incoming, received)
    # After p-1 steps this rank holds the full reduction of chunk me+1.
    if op == "avg":
        chunk(me + 1).div_(p)
    for step in range(p - 1):
        exchange(view, [(chunk(me + 1 - step), me + 1)], [(chunk(me - step), me - 1)])


def halving_doubling_all_reduce_flat(flat: torch.Tensor, op: str, view: GroupView) -> None:
    """Rabenseifner all-reduce; a non-power-of-two group folds its extra ranks in first.

    With ``p = 2^k + r``, the first ``2r`` ranks pair up (even sends its whole
    vector to odd), leaving ``2^k`` participants that reduce-scatter by
    recursive halving and all-gather by recursive doubling; the odd ranks then
    hand the result back to their even partners.
    """
    p, me = view.size, view.index
    if p == 1:
        return
    combine = _combiner(op)
    p2 = 1 << (p.bit_length() - 1)
    extra = p - p2
    virtual = me - extra  # index among the 2^k participants, -1 if folded away
    if me < 2 * extra:
        if me % 2 == 0:
            exchange(view, sends=[(flat, me + 1)])
            virtual = -1
        else:
            received = torch.empty_like(flat)
            exchange(view, recvs=[(received, me - 1)])
            combine(flat, received)
            virtual = me // 2

    def real(v: int) -> int:
        return 2 * v + 1 if v < extra else v + extra

    if virtual >= 0:
        offsets = chunk_bounds(flat.numel(), p2)
        scratch = torch.empty(offsets[p2 // 2], dtype=flat.dtype, device=flat.device)
        lo, hi, distance = 0, p2, p2 // 2
        while distance >= 1:
            partner, mid = virtual ^ distance, (lo + hi) // 2
            keep, give = ((mid, hi), (lo, mid)) if virtual & distance else ((lo, mid), (mid, hi))
            kept = flat[offsets[keep[0]] : offsets[keep[1]]]
            received = scratch[: kept.numel()]
            exchange(
                view,
                [(flat[offsets[give[0]] : offsets[give[1]]], real(partner))],
                [(received, real(partner))],
            )
            combine(kept, received)
            lo, hi = keep
            distance //= 2
        # lo == virtual: this participant owns the reduced chunk with its own index.
        if op == "avg":
            flat[offsets[lo] : offsets[hi]].div_(p)
        distance = 1
        while distance < p2:
            partner = virtual ^ distance
            plo = lo ^ distance  # windows are aligned to their size, so the partner's is adjacent
            exchange(
                view,
                [(flat[offsets[lo] : offsets[hi]], real(partner))],
                [(flat[offsets[plo] : offsets[plo + distance]], real(partner))],
            )
            lo, hi = min(lo, plo), max(hi, plo + distance)
            distance *= 2
    if me < 2 * extra:
        if me % 2 == 0:
            exchange(view, recvs=[(flat, me + 1)])
        else:
            exchange(view, sends=[(flat, me - 1)])


def tree_reduce_flat(flat: torch.Tensor, op: str, root: int, view: GroupView) -> None:
    """Binomial-tree reduce to group index ``root``; non-roots' buffers end as partial results."""
    p = view.size
    relative = (view.index - root) % p
    combine = _combiner(op)
    scratch: torch.Tensor | None = None
    mask = 1
    while mask < p:
        if relative & mask:
            exchange(view, sends=[(flat, relative - mask + root)])
            return
        child = relative | mask
        if child < p:
            scratch = torch.empty_like(flat) if scratch is None else scratch
            exchange(view, recvs=[(scratch, child + root)])
            combine(flat, scratch)
        mask <<= 1
    if op == "avg":
        flat.div_(p)


def tree_broadcast_flat(flat: torch.Tensor, root: int, view: GroupView) -> None:
    """Binomial-tree broadcast from group index ``root``, in place."""
    p = view.size
    relative = (view.index - root) % p
    mask = 1
    while mask < p:
        if relative & mask:
            exchange(view, recvs=[(flat, relative - mask + root)])
            break
        mask <<= 1
    mask >>= 1
    while mask > 0:
        if relative + mask < p:
            exchange(view, sends=[(flat, relative + mask + root)])
        mask >>= 1


# --- public collectives -------------------------------------------------------


def ring_all_reduce(
    tensor: torch.Tensor, op: ReduceOpLike = "sum", group: ProcessGroupLike = None
) -> torch.Tensor:
    """Bandwidth-optimal ring all-reduce in place: ``2(p-1)`` steps of ``n/p`` elements."""
    name, view = normalize_op(op, tensor.dtype), group_view(group, tensor.device)
    with flattened(tensor) as flat:
        ring_all_reduce_flat(flat, name, view)
    return tensor


def halving_doubling_all_reduce(
    tensor: torch.Tensor, op: ReduceOpLike = "sum", group: ProcessGroupLike = None
) -> torch.Tensor:
    """Recursive halving-doubling (Rabenseifner) all-reduce in place: ``2 log2 p`` steps."""
    name, view = normalize_op(op, tensor.dtype), group_view(group, tensor.device)
    with flattened(tensor) as flat:
        halving_doubling_all_reduce_flat(flat, name, view)
    return tensor


def tree_all_reduce(
    tensor: torch.Tensor, op: ReduceOpLike = "sum", group: ProcessGroupLike = None
) -> torch.Tensor:
    """Binomial-tree reduce to the group's first rank then binomial broadcast, in place."""
    name, view = normalize_op(op, tensor.dtype), group_view(group, tensor.device)
    with flattened(tensor) as flat:
        tree_reduce_flat(flat, name, 0, view)
        tree_broadcast_flat(flat, 0, view)
    return tensor


def broadcast(tensor: torch.Tensor, src: int, group: ProcessGroupLike = None) -> torch.Tensor:
    """Binomial-tree broadcast of ``tensor`` from global rank ``src``, in place on every rank."""
    view = group_view(group, tensor.device)
    with flattened(tensor) as flat:
        tree_broadcast_flat(flat, view.index_of(src, "src"), view)
    return tensor


def reduce(
    tensor: torch.Tensor, dst: int, op: ReduceOpLike = "sum", group: ProcessGroupLike = None
) -> torch.Tensor:
    """Binomial-tree reduce to global rank ``dst``, in place there; other ranks keep their input."""
    name, view = normalize_op(op, tensor.dtype), group_view(group, tensor.device)
    root = view.index_of(dst, "dst")
    if view.index == root:
        with flattened(tensor) as flat:
            tree_reduce_flat(flat, name, root, view)
    else:
        tree_reduce_flat(tensor.reshape(-1).clone(), name, root, view)
    return tensor


def gather(
    tensor: torch.Tensor,
    dst: int = 0,
    group: ProcessGroupLike = None,
    gather_list: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | None:
    """Binomial-tree gather to global rank ``dst``: its result lists every rank's tensor.

    Each subtree forwards its members' tensors as one message, so the root
    receives ``log2 p`` messages. Ranks must pass tensors of equal shape and
    dtype. The root returns the list ordered by group rank (and fills
    ``gather_list`` when given); other ranks return None.
    """
    view = group_view(group, tensor.device)
    p, root = view.size, view.index_of(dst, "dst")
    relative = (view.index - root) % p
    n = tensor.numel()
    span = p - relative if relative == 0 else min(relative & -relative, p - relative)
    own = tensor.reshape(-1)
    buffer = torch.empty(span * n, dtype=tensor.dtype, device=tensor.device)
    buffer[:n].copy_(own)
    mask = 1
    while mask < p:
        if relative & mask:
            exchange(view, sends=[(buffer, relative - mask + root)])
            return None
        child = relative | mask
        if child < p:
            count = min(mask, p - child)
            exchange(view, recvs=[(buffer[mask * n : (mask + count) * n], child + root)])
        mask <<= 1
    by_index = [
        buffer[((i - root) % p) * n : ((i - root) % p + 1) * n].view(tensor.shape) for i in range(p)
    ]
    return _fill(by_index, gather_list, "gather_list")


def all_gather(
    tensor: torch.Tensor,
    group: ProcessGroupLike = None,
    tensor_list: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Ring all-gather: every rank returns all ranks' tensors ordered by group rank."""
    view = group_view(group, tensor.device)
    p, me, n = view.size, view.index, tensor.numel()
    buffer = torch.empty(p * n, dtype=tensor.dtype, device=tensor.device)

    def slot(i: int) -> torch.Tensor:
        i %= p
        return buffer[i * n : (i + 1) * n]

    slot(me).copy_(tensor.reshape(-1))
    for step in range(p - 1):
        exchange(view, [(slot(me - step), me + 1)], [(slot(me - step - 1), me - 1)])
    return _fill([slot(i).view(tensor.shape) for i in range(p)], tensor_list, "tensor_list")


def _fill(
    parts: list[torch.Tensor], out: list[torch.Tensor] | None, name: str
) -> list[torch.Tensor]:
    if out is None:
        return parts
    if len(out) != len(parts):
        raise UserError(f"{name} has {len(out)} tensors but the group has {len(parts)} ranks")
    for target, part in zip(out, parts, strict=True):
        target.copy_(part)
    return out


AllReduceFn = Callable[[torch.Tensor, ReduceOpLike, ProcessGroupLike], torch.Tensor]

ALL_REDUCE_ALGORITHMS: dict[str, AllReduceFn] = {
    "ring": ring_all_reduce,
    "halving_doubling": halving_doubling_all_reduce,
    "tree": tree_all_reduce,
}
"""Flat (single-group) all-reduce algorithms by name; hierarchical needs host groups."""


def all_reduce(
    tensor: torch.Tensor,
    op: ReduceOpLike = "sum",
    group: ProcessGroupLike = None,
    algorithm: str = "ring",
) -> torch.Tensor:
    """All-reduce in place with the named algorithm from :data:`ALL_REDUCE_ALGORITHMS`."""
    if algorithm not in ALL_REDUCE_ALGORITHMS:
        raise ConfigError(
            f"unknown all-reduce algorithm {algorithm!r}; use one of "
            f"{', '.join(ALL_REDUCE_ALGORITHMS)}"
        )
    return ALL_REDUCE_ALGORITHMS[algorithm](tensor, op, group)
