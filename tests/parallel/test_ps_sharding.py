"""Shard plans balance bytes and cover every element once; shard state round-trips."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from distml.config import ParallelSection
from distml.errors import ConfigError
from distml.models import build_model
from distml.parallel.ps import Shard, ShardPlan, assemble_full, check_ps_settings, plan_shards
from distml.train.optim import LARS


def _named(name: str, args: dict) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in build_model(name, args).named_parameters() if p.requires_grad]


@pytest.mark.parametrize(
    ("model", "args"), [("gpt", {"n_layer": 4, "n_embd": 128}), ("resnet", {})]
)
@pytest.mark.parametrize("servers", [2, 3, 4])
def test_plan_balances_bytes_within_10_percent_and_covers_each_element_once(
    model: str, args: dict, servers: int
) -> None:
    named = _named(model, args)
    plan = plan_shards(named, servers)
    loads = plan.server_bytes()
    assert max(loads) <= 1.10 * min(loads), loads
    assert sum(loads) == sum(p.numel() * p.element_size() for _, p in named)
    for index, (name, p) in enumerate(named):
        ranges = sorted((c.start, c.stop) for c in plan.chunks if c.index == index)
        assert all(c.name == name for c in plan.chunks if c.index == index)
        assert ranges[0][0] == 0 and ranges[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    # Large tensors were cut, and every rank builds the identical plan.
    assert any(not c.whole for c in plan.chunks)
    assert plan_shards(_named(model, args), servers) == plan
    table = plan.table()
    assert table.splitlines()[0].split()[:4] == ["server", "bytes", "share", "chunks"]
    assert len(table.splitlines()) == servers + 2
    assert f"{loads[0]:,}" in table.splitlines()[1]


def test_layerwise_optimizers_get_whole_tensors() -> None:
    named = _named("gpt", {"n_layer": 2, "n_embd": 64})
    plan = plan_shards(named, 3, split_tensors=False)
    assert all(c.whole for c in plan.chunks)
    assert len(plan.chunks) == len(named)
    with pytest.raises(ConfigError, match=r"parallel.servers=9 but the model has only 6 parameter"):
        plan_shards(_named("mlp", {"hidden": [8, 8]}), 9, split_tensors=False)


def _ps(**fields: object) -> ParallelSection:
    return ParallelSection(strategy="ps", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "world", "message"),
    [
        (
            {"servers": 2, "workers": 2},
            3,
            "strategy ps needs parallel.servers + parallel.workers = 2 + 2 = 4 processes but "
            "the job has 3; set parallel.nproc=4 or change servers/workers",
        ),
        (
            {"servers": 0},
            None,
            "parallel.servers must be at least 1 for strategy ps, got 0; "
            "set parallel.servers=1 or more",
        ),
        (
            {"workers": 0},
            None,
            "parallel.workers must be at least 1 for strategy ps, got 0; "
            "set parallel.workers=1 or more",
        ),
        (
            {"staleness": -1},
            None,
            "parallel.staleness must be >= 0, got -1; use 0 for lockstep or a positive bound "
            "for ssp",
        ),
        (
            {"ps_codec": "zip"},
            None,
            "unknown parallel.ps_codec 'zip'; choose one of: none, fp16, bf16, int8, topk",
        ),
    ],
)
def test_check_ps_settings_one_line_errors(fields: dict, world: int | None, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_ps_settings(_ps(**fields), world)
    assert str(info.value) == message
    check_ps_settings(ParallelSection(**fields), world)  # ignored unless strategy is ps


def _shards(servers: int, params: list[nn.Parameter]) -> tuple[list[Shard], ShardPlan]:
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    plan = plan_shards(named, servers, min_chunk_bytes=64)
    template = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    return [Shard(plan, s, params, template, torch.device("cpu")) for s in range(servers)], plan


def _step(shards: list[Shard], plan: ShardPlan, grads: dict[str, torch.Tensor]) -> None:
    for s, shard in enumerate(shards):
        pieces = [grads[c.name].reshape(-1)[c.start : c.stop] for c in plan.server_chunks(s)]
        shard.apply(torch.cat(pieces), [0.01])


def _state(shards: list[Shard], plan: ShardPlan, params: list[nn.Parameter]) -> dict:
    shapes = {f"p{i}": tuple(p.shape) for i, p in enumerate(params)}
    dtypes = {f"p{i}": p.dtype for i, p in enumerate(params)}
    return assemble_full(plan, [s.export_state() for s in shards], shapes, dtypes)


def test_shard_state_round_trips_through_whole_model_form_across_server_counts() -> None:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(40, 30)), nn.Parameter(torch.randn(30))]
    params.append(nn.Parameter(torch.randn(7, 3)))
    gen = torch.Generator().manual_seed(1)
    grads = [{f"p{i}": torch.randn(p.shape, generator=gen) for i, p in enumerate(params)}]
    grads += [{k: v.flip(0) for k, v in grads[0].items()} for _ in range(3)]
    three, plan3 = _shards(3, params)
    ref, plan1 = _shards(1, params)  # the reference: whole tensors on one server
    assert any(not c.whole for c in plan3.chunks)
    for g in grads[:3]:
        _step(three, plan3, g)
        _step(ref, plan1, g)
    full, want = _state(three, plan3, params), _state(ref, plan1, params)
    for name in full["params"]:
        assert torch.equal(full["params"][name], want["params"][name])
        for key in ("exp_avg", "exp_avg_sq", "step"):
            got, expected = full["optimizer_state"][name][key], want["optimizer_state"][name][key]
            assert got.shape == expected.shape and torch.equal(got, expected), (name, key)
    # Reloaded onto 2 servers, the next step equals the reference's next step.
    two, plan2 = _shards(2, params)
    for shard in two:
        shard.load_full(full)
    _step(two, plan2, grads[3])
    _step(ref, plan1, grads[3])
    after, expected_after = _state(two, plan2, params), _state(ref, plan1, params)
    for name in after["params"]:
        assert torch.equal(after["params"][name], expected_after["params"][name]), name
    assert not torch.equal(after["params"]["p0"], full["params"]["p0"])


def test_shard_optimizer_clones_class_groups_and_hyperparameters() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    matrices = [p for p in model.parameters() if p.ndim > 1]
    vectors = [p for p in model.parameters() if p.ndim == 1]
    template = LARS(
        [{"params": matrices}, {"params": vectors, "weight_decay": 0.0, "adapt": False}],
        lr=0.3,
        momentum=0.8,
        weight_decay=0.01,
    )
    named = list(model.named_parameters())
    plan = plan_shards(named, 2, split_tensors=False)
    params = [p for _, p in named]
    for s in range(2):
        shard = Shard(plan, s, params, template, torch.device("cpu"))
        assert type(shard.optimizer) is LARS
        for group, g in zip(shard.optimizer.param_groups, shard.group_index, strict=True):
            want = template.param_groups[g]
            assert {k: v for k, v in group.items() if k != "params"} == {
                k: v for k, v in want.items() if k != "params"
            }
            assert all((p.ndim > 1) == (g == 0) for p in group["params"])
