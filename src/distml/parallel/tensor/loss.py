"""Cross-entropy over vocabulary-sharded logits, without gathering them.

Each rank holds logits for a contiguous slice of the vocabulary. The loss
needs only three numbers per token from the whole row: the maximum (for a
stable softmax), the sum of exponentials and the target's logit. Each rank
computes its share of these and they are all-reduced (one MAX, one SUM of
two stacked values), so communication is O(tokens), not O(tokens x vocab).
The gradient, softmax minus the one-hot target, is local to each shard.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        group: dist.ProcessGroup,
        ignore_index: int,
    ) -> torch.Tensor:
        width = logits.shape[-1]
        start = dist.get_rank(group) * width
        # bf16/fp16 exponentials lose too much; fp64 inputs stay fp64 (exact tests).
        work = logits if logits.dtype == torch.float64 else logits.float()
        row_max = work.detach().max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = work - row_max.unsqueeze(-1)
        local = targets - start
        mine = (local >= 0) & (local < width)
        local = local.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1)
        target_logit = target_logit.masked_fill(~mine, 0.0)
        exp = shifted.exp()
        stats = torch.stack([exp.sum(dim=-1), target_logit])
        dist.all_reduce(stats, group=group)
        sum_exp, target_logit = stats[0], stats[1]
        valid = targets != ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(~valid, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, mine & valid, valid)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        softmax, local, hit, valid = ctx.saved_tensors
        grad = softmax.clone()
        one_hot = hit.to(grad.dtype).unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), -one_hot)
        scale = (grad_loss * valid.to(grad_loss.dtype)).to(grad.dtype)
        grad.mul_(scale.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy of the full logits, given this rank's vocabulary shard.

    ``logits`` (..., V / tp) is this rank's contiguous slice (rank r holds
    classes [r V/tp, (r+1) V/tp)); ``targets`` (...) are global class ids.
    ``reduction`` is "mean" (over non-ignored targets), "sum" or "none".
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    losses: torch.Tensor = _VocabParallelCrossEntropy.apply(
        flat_logits, flat_targets, group, ignore_index
    )
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    count = (flat_targets != ignore_index).sum().clamp(min=1)
    return losses.sum() / count.to(losses.dtype)
