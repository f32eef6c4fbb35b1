"""Model-parallel forward passes: full logits of a pipelined and/or tensor-parallel model.

:class:`MeshForward` is an ``nn.Module`` whose ``forward(tokens)`` returns the
logits the unsharded model would return, on every rank of the mesh: the
batch is cut into micro-batches that flow through the stages as a pipeline
(each stage sends a micro-batch's activations point-to-point along the ``pp``
axis without waiting, and starts the next one while the following stage works
on it), vocabulary-sharded logits are all-gathered along ``tp``, and the last
stage broadcasts them along ``pp``. Evaluation, ``distml predict`` and
text generation call it in place of the plain model, so their batching and
decoding code stays the single-process one. :func:`mesh_generate` is greedy
decoding on top of it. Under an autocast (the trainer evaluates bf16 runs
under bf16 autocast) every activation and the logits still travel in the
parameters' dtype: pipeline stages cast their outputs back at the boundary,
so the receive and broadcast buffers here are sized and typed from the
parameters alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from distml.parallel.mesh import axis_group, axis_rank, axis_size, require_axes
from distml.parallel.pipeline.runner import plan_stage_bounds
from distml.parallel.pipeline.stage import StageModule, model_parts
from distml.parallel.tensor.comm import gather_from_region


class MeshForward(nn.Module):
    """The whole model's forward over a (dp, pp, tp) mesh; every rank gets the full logits.

    ``stages`` maps stage index -> this rank's :class:`StageModule` for those
    indices (empty with pp=1: the model runs whole); ``num_stages`` is the total.
    """

    def __init__(
        self,
        model: nn.Module,
        mesh: DeviceMesh,
        stages: dict[int, StageModule],
        num_stages: int,
        microbatches: int = 1,
    ) -> None:
        super().__init__()
        require_axes(mesh, "pp", "tp")
        self.model = model
        self.mesh = mesh
        self.stage_of = stages
        self.num_stages = num_stages
        self.microbatches = max(1, microbatches)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._forward(tokens)

    def _full_logits(self, out: torch.Tensor) -> torch.Tensor:
        info = getattr(self.model, "tensor_parallel", None)
        if info is not None and info.loss_parallel:
            return gather_from_region(out, info.group)
        return out

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pp = axis_size(self.mesh, "pp")
        param = next(p for p in self.model.parameters() if not p.is_meta)
        if pp == 1:
            # Same logits dtype as the pipelined path (bf16 under autocast otherwise).
            return self._full_logits(self.model(tokens).to(param.dtype))
        group, me = axis_group(self.mesh, "pp"), axis_rank(self.mesh, "pp")
        cfg: Any = getattr(self.model, "config", None)
        chunks = list(tokens.chunk(min(self.microbatches, tokens.shape[0])))
        seq = tokens.shape[1]
        last = self.num_stages - 1
        # Stage i's micro-batch outputs; sends are asynchronous so this stage moves on to
        # the next micro-batch while stage i + 1 is still busy with the previous one.
        pending: list[dist.Work] = []
        outputs: list[torch.Tensor] = []
        for index in range(me, self.num_stages, pp):
            outputs = []
            for chunk in chunks:
                if index > 0:
                    # StageModule hands on its output in the parameters' dtype, even under
                    # autocast, so this buffer matches what the previous stage sends.
                    hidden = torch.empty(
                        chunk.shape[0], seq, cfg.n_embd, dtype=param.dtype, device=param.device
                    )
                    dist.recv(hidden, group=group, group_src=(index - 1) % pp)
                    out = self.stage_of[index](hidden)
                else:
                    out = self.stage_of[index](chunk)
                if index < last:
                    out = out.contiguous()
                    work = dist.isend(out, group=group, group_dst=(index + 1) % pp)
                    assert work is not None
                    pending.append(work)
                outputs.append(out)
        for work in pending:
            work.wait()
        if me == last % pp:
            logits = self._full_logits(torch.cat(outputs)).contiguous()
        else:
            logits = torch.empty(
                tokens.shape[0], seq, cfg.vocab_size, dtype=param.dtype, device=param.device
            )
        dist.broadcast(logits, group=group, group_src=last % pp)
        return logits


def build_inference_forward(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    virtual_stages: int = 1,
    balance: str = "params",
    split_points: list[int | str] | None = None,
    microbatches: int = 1,
) -> MeshForward:
    """Apply tp (if the mesh has tp > 1) and cut pp stages of a full ``model`` for inference.

    Every rank must hold the same full model (e.g. loaded from one checkpoint).
    A batch runs through the stages as up to ``microbatches`` pipelined micro-batches.
    """
    from distml.parallel.pipeline.split import check_pipeline_plan
    from distml.parallel.tensor.plan import apply_tensor_parallel

    apply_tensor_parallel(model, mesh)
    model.eval()
    pp = axis_size(mesh, "pp")
    if pp == 1:
        return MeshForward(model, mesh, {}, 1)
    parts = model_parts(model)
    n_blocks = len(model.blocks)  # type: ignore[arg-type]
    check_pipeline_plan(n_blocks, pp, "gpipe", 1, 1)
    total = pp * virtual_stages
    if balance == "time":
        balance = "params"  # nothing to time without a training batch; the cut is only a layout
    bounds = plan_stage_bounds(model, total, balance=balance, split_points=split_points)
    me = axis_rank(mesh, "pp")
    stages = {
        i: StageModule(model, parts, bounds[i], i == 0, i == total - 1)
        for i in range(me, total, pp)
    }
    return MeshForward(model, mesh, stages, total, microbatches)


@torch.no_grad()
def mesh_generate(forward: nn.Module, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with any logits module (a :class:`MeshForward` or a plain GPT).

    Every rank computes the same argmax from the same full logits, so all ranks
    return the same tokens without further communication.
    """
    cfg: Any = getattr(forward, "config", None)
    block = int(cfg.block_size)
    idx = tokens
    for _ in range(max_new_tokens):
        logits = forward(idx[:, -block:])[:, -1, :]
        idx = torch.cat([idx, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return idx
