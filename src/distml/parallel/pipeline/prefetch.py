"""GPipe and 1F1B on gloo with receives posted ahead, so transfers overlap compute.

torch's schedules post the receive of a micro-batch only when they are about
to compute it and then wait for it (1F1B also waits for its fused sends), so
every transfer sits on the critical path. On gloo over loopback, with the
stages and gloo's I/O threads sharing the cores, that waiting grew with the
number of micro-batches: at batch 32 and M = 16 torch's GPipe measured a
bubble 0.20 above (P - 1) / (M + P - 1) (see docs/benchmarks.md). Here each
stage runs the same operations in the same order as torch's schedule, but
the receive of the next forward and of the next backward micro-batch is
posted before the current one is computed (each micro-batch has its own
receive buffer in the stage, so outstanding receives never share memory),
and sends are waited for only at the end of the step.

Only for gloo: gloo's point-to-point operations progress on their own
threads in any posting order, while NCCL runs a peer's sends and receives in
order on one stream, where an early receive can wait forever behind the send
it depends on. Other backends get torch's schedules. The private torch
helpers used are the ones torch's own schedules use; without them
:func:`make_schedule` also falls back to torch's.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

try:
    from torch.distributed.pipelining.schedules import _sorted_batch_p2p, _wait_batch_p2p

    HAVE_TORCH_HELPERS = True
except ImportError:  # pragma: no cover - another torch layout: stock schedules
    HAVE_TORCH_HELPERS = False

#: ("F" | "B") per operation of one stage in one step, in execution order.
Order = list[str]


def gpipe_order(n: int) -> Order:
    return ["F"] * n + ["B"] * n


def one_f_one_b_order(n: int, stages: int, stage: int) -> Order:
    """torch's 1F1B order: min(n, P - s) warm-up forwards, then B/F pairs, then the rest of B."""
    warmup = min(n, stages - stage)
    order = ["F"] * warmup
    forwards, backwards = warmup, 0
    while backwards < n:
        order.append("B")
        backwards += 1
        if forwards < n:
            order.append("F")
            forwards += 1
    return order


def _post(ops: list[dist.P2POp], desc: str) -> list[dist.Work]:
    works = _sorted_batch_p2p(ops, desc=desc)
    return [w for peer in works.values() for w in peer]


class _Prefetching:
    """``_step_microbatches`` for a single-stage schedule, given its operation order."""

    def _order(self) -> Order:
        raise NotImplementedError

    def _step_microbatches(
        self,
        arg_mbs: list[Any] | None = None,
        kwarg_mbs: list[Any] | None = None,
        target_mbs: list[Any] | None = None,
        losses: list[Any] | None = None,
        return_outputs: bool = True,
        loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        this: Any = self  # a torch PipelineScheduleSingle (the other base class)
        arg_mbs, kwarg_mbs = this._check_inputs(arg_mbs, kwarg_mbs, target_mbs, losses)
        first_target = target_mbs[0] if target_mbs is not None else None
        this._initialize_stage(arg_mbs[0], kwarg_mbs[0], first_target, loss_kwargs)
        stage, n = this._stage, this._n_microbatches

        ahead = {
            "F": _post(stage.get_fwd_recv_ops(0), "fwd_recv"),
            "B": _post(stage.get_bwd_recv_ops(0), "bwd_recv"),
        }
        done = {"F": 0, "B": 0}
        sends: list[dist.Work] = []
        for kind in self._order():
            i = done[kind]
            current = ahead[kind]
            if i + 1 < n:  # the next receive of this kind runs while we compute
                ahead[kind] = _post(
                    stage.get_fwd_recv_ops(i + 1)
                    if kind == "F"
                    else stage.get_bwd_recv_ops(i + 1),
                    f"{kind.lower()}wd_recv",
                )
            _wait_batch_p2p(current)
            if kind == "F":
                output = stage.forward_one_chunk(
                    i, arg_mbs[i], kwarg_mbs[i], save_forward_output=return_outputs
                )
                sends += _post(stage.get_fwd_send_ops(i), "fwd_send")
                this._maybe_compute_loss(stage, output, target_mbs, i, loss_kwargs)
            else:
                loss = this._maybe_get_loss(stage, i)
                stage.backward_one_chunk(i, loss=loss, last_backward=i == n - 1)
                sends += _post(stage.get_bwd_send_ops(i), "bwd_send")
            done[kind] = i + 1
        _wait_batch_p2p(sends)

        this._update_losses(stage, losses)
        stage.perform_reduce_grad(n if this.scale_grads else 1)


class PrefetchGPipe(_Prefetching, ScheduleGPipe):
    """Fill-drain GPipe whose receives run one micro-batch ahead of the compute (gloo)."""

    def _order(self) -> Order:
        return gpipe_order(self._n_microbatches)


class Prefetch1F1B(_Prefetching, Schedule1F1B):
    """1F1B whose receives run one micro-batch ahead and whose sends never block (gloo)."""

    def _order(self) -> Order:
        return one_f_one_b_order(self._n_microbatches, self._num_stages, self._stage.stage_index)


def make_schedule(name: str, stage: Any, microbatches: int, loss_fn: Any) -> Any:
    """distml's GPipe or 1F1B on gloo (receives ahead); torch's elsewhere."""
    backend = dist.get_backend(stage.group)
    prefetch = HAVE_TORCH_HELPERS and backend == "gloo"
    if name == "gpipe":
        return (PrefetchGPipe if prefetch else ScheduleGPipe)(stage, microbatches, loss_fn=loss_fn)
    return (Prefetch1F1B if prefetch else Schedule1F1B)(stage, microbatches, loss_fn=loss_fn)
