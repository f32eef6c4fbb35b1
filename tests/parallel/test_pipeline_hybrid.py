"""Hybrid meshes: dp x tp, dp x pp and pp x tp at world 4 (dp x pp x tp at world 8) equal one process.

Gradients are averaged over the dp axis only and clipped by the norm of the
whole distributed gradient; tensor-parallel shards are gathered back to full
tensors before comparing with the single-process run (SGD, float64).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distml.testing import run_ranks

LR = 0.5
BATCH = 8
MAX_NORM = 0.5  # below the gradient norms of these steps: clipping is active


def _gpt() -> torch.nn.Module:
    from distml.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(cfg).double()


def _batches(n: int) -> list:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randint(32, (BATCH, 8), generator=gen), torch.randint(32, (BATCH, 8), generator=gen))
        for _ in range(n)
    ]


def _reference(batches: list) -> tuple[list[float], dict, list[float]]:
    model = _gpt()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms = [], []
    for x, y in batches:
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model.state_dict(), norms


def _replica_mean(value: float, mesh) -> float:
    """The global-batch loss: the mean of the dp replicas' losses (equal shards)."""
    t = torch.tensor(value, dtype=torch.float64)
    dist.all_reduce(t, group=mesh.get_group("dp"))
    return float(t) / mesh["dp"].size()


def _shard(batch: tuple, mesh) -> tuple:
    dp, index = mesh["dp"].size(), mesh.get_local_rank("dp")
    return tuple(t.chunk(dp)[index] for t in batch)


def _train(mesh, batches: list, *, tp: bool, pp: bool) -> tuple[list[float], dict, list[float]]:
    from distml.parallel.mesh import all_reduce_gradients, clip_grad_norm_
    from distml.parallel.pipeline import build_pipeline
    from distml.parallel.tensor import apply_tensor_parallel, full_state_dict, tensor_parallel_loss

    model = _gpt()
    if tp:
        apply_tensor_parallel(model, mesh)
    pipe = build_pipeline(model, mesh, schedule="1f1b", microbatches=2) if pp else None
    loss_fn = tensor_parallel_loss(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, norms = [], []
    skip = pipe.duplicate_parameters() if pipe is not None else []
    for batch in batches:
        x, y = _shard(batch, mesh)
        if pipe is not None:
            loss = pipe.step(x, y, broadcast_loss=True)
            assert loss is not None
        else:
            step_loss = loss_fn(model(x), y)
            step_loss.backward()
            loss = step_loss.item()
        all_reduce_gradients(model, mesh, "dp")
        norms.append(clip_grad_norm_(model, mesh, MAX_NORM, skip=skip))
        opt.step()
        opt.zero_grad()
        losses.append(_replica_mean(loss, mesh))
    if pipe is None:
        state = full_state_dict(model)
    else:
        state = {}
        for module in pipe.modules:
            state.update(full_state_dict(module) if tp else module.state_dict())
    return losses, state, norms


def _world4(rank: int, world: int, steps: int) -> dict:
    from distml.parallel.mesh import build_mesh

    batches = _batches(steps)
    out = {"ref": _reference(batches)}
    mesh = build_mesh(2, 1, 2)
    out["layout"] = {
        axis: (mesh.get_local_rank(axis), dist.get_process_group_ranks(mesh.get_group(axis)))
        for axis in ("dp", "pp", "tp")
    }
    out["dp_tp"] = _train(mesh, batches, tp=True, pp=False)
    out["dp_pp"] = _train(build_mesh(2, 2, 1), batches, tp=False, pp=True)
    out["pp_tp"] = _train(build_mesh(1, 2, 2), batches, tp=True, pp=True)
    return out


def _world8(rank: int, world: int, steps: int) -> dict:
    from distml.parallel.mesh import build_mesh

    batches = _batches(steps)
    return {
        "ref": _reference(batches),
        "dp_pp_tp": _train(build_mesh(2, 2, 2), batches, tp=True, pp=True),
    }


def _check(results: list[dict], case: str) -> None:
    ref_losses, ref_state, ref_norms = results[0]["ref"]
    assert min(ref_norms) > MAX_NORM
    merged: dict = {}
    for result in results:
        losses, state, norms = result[case]
        torch.testing.assert_close(
            torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0
        )
        torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-6, atol=0)
        merged.update(state)
    assert merged.keys() == ref_state.keys()  # every parameter is held by some rank
    for key, value in merged.items():
        torch.testing.assert_close(
            value, ref_state[key], rtol=1e-4, atol=1e-10, msg=f"{case} {key}"
        )


@pytest.fixture(scope="module")
def world4() -> list[dict]:
    return run_ranks(_world4, 4, args=(3,), timeout=240)


@pytest.mark.parametrize("case", ["dp_tp", "dp_pp", "pp_tp"])
def test_world4_hybrid_trains_like_single_process(world4, case: str) -> None:
    _check(world4, case)


def test_world4_mesh_layout_puts_tp_ranks_adjacent(world4) -> None:
    # dp=2 x pp=1 x tp=2: rank = 2 * dp + tp.
    for rank, result in enumerate(world4):
        dp, tp = divmod(rank, 2)
        assert result["layout"] == {
            "dp": (dp, [tp, 2 + tp]),
            "pp": (0, [rank]),
            "tp": (tp, [2 * dp, 2 * dp + 1]),
        }


@pytest.mark.slow
@pytest.mark.skipif(
    (os.cpu_count() or 1) < 8 and os.environ.get("DISTML_WORLD8") != "1",
    reason="world 8 on fewer than 8 cores takes minutes; set DISTML_WORLD8=1 to run it",
)
def test_world8_dp_pp_tp_trains_like_single_process() -> None:
    _check(run_ranks(_world8, 8, args=(2,), timeout=300), "dp_pp_tp")
