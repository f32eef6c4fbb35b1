"""Point-to-point collectives against torch.distributed's built-ins, the hierarchical
all-reduce, and the DDP algorithm hook against default DDP.

Each world size runs one multi-process battery (all sizes, dtypes and
collectives in one spawn) whose per-check verdicts the tests below inspect.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist

from distml.comm.collectives import (
    all_gather,
    all_reduce,
    broadcast,
    chunk_bounds,
    gather,
    halving_doubling_all_reduce,
    normalize_op,
    reduce,
    ring_all_reduce,
    tree_all_reduce,
)
from distml.comm.ddp_hooks import allreduce_algorithm_hook
from distml.comm.hierarchical import (
    HierarchicalAllReduce,
    discover_host_groups,
    hierarchical_all_reduce,
    host_groups_from_env,
)
from distml.errors import ConfigError, UserError
from distml.testing import run_ranks

ALGORITHMS: dict[str, Callable[..., torch.Tensor]] = {
    "ring": ring_all_reduce,
    "halving_doubling": halving_doubling_all_reduce,
    "tree": tree_all_reduce,
}
# (shape, dtype, transposed): the sizes of the brief, a 2-D tensor and a non-contiguous one.
CASES: list[tuple[tuple[int, ...], torch.dtype, bool]] = [
    *[((n,), dt, False) for n in (1, 7, 1000, 4097) for dt in (torch.float32, torch.float64)],
    ((33, 5), torch.float32, False),
    ((5, 33), torch.float64, True),
]
HOSTS = {2: [[0], [1]], 3: [[0, 1], [2]], 4: [[0, 1], [2, 3]]}


def _data(rank: int, case: int) -> torch.Tensor:
    shape, dtype, transposed = CASES[case]
    gen = torch.Generator().manual_seed(1000 * case + rank)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    return x.t() if transposed else x


def _name(case: int) -> str:
    shape, dtype, transposed = CASES[case]
    return f"{'x'.join(map(str, shape))}{'T' if transposed else ''}/{str(dtype)[6:]}"


class _Checks:
    """Records one verdict (None = pass, else the failure text) per named check."""

    def __init__(self) -> None:
        self.results: dict[str, str | None] = {}

    def close(self, key: str, actual: torch.Tensor, expected: torch.Tensor, exact: bool) -> None:
        try:
            if exact:
                torch.testing.assert_close(actual, expected, rtol=0, atol=0)
            else:
                torch.testing.assert_close(actual, expected)
            self.results[key] = None
        except AssertionError as err:
            self.results[key] = str(err)

    def true(self, key: str, ok: bool, why: str) -> None:
        self.results[key] = None if ok else why


def _all_reduce_checks(checks: _Checks, rank: int, world: int) -> None:
    for case in range(len(CASES)):
        x = _data(rank, case)
        total = x.clone()
        dist.all_reduce(total)
        results = []
        for algo, fn in ALGORITHMS.items():
            for op in ("sum", "avg"):
                mine = x.clone()
                returned = fn(mine, op)
                ref = total / world if op == "avg" else total
                key = f"all_reduce/{algo}/{op}/{_name(case)}"
                checks.close(key, mine, ref, exact=False)
                checks.true(f"{key}/in_place", returned is mine, "returned another tensor")
                results.append(mine.reshape(-1))
        # Replicas must agree bit for bit or DDP models drift apart.
        stacked = torch.cat(results)
        everyone = [torch.empty_like(stacked) for _ in range(world)]
        dist.all_gather(everyone, stacked)
        same = all(torch.equal(everyone[0], t) for t in everyone)
        checks.true(f"all_reduce/replicas_identical/{_name(case)}", same, "replicas differ")
    ints = torch.randint(-9, 9, (13,), generator=torch.Generator().manual_seed(rank))
    for algo in ALGORITHMS:
        for op, ref_op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
            mine, ref = ints.clone(), ints.clone()
            all_reduce(mine, op, algorithm=algo)
            dist.all_reduce(ref, ref_op)
            checks.close(f"all_reduce/{algo}/{op}/13/int64", mine, ref, exact=True)


def _rooted_checks(checks: _Checks, rank: int, world: int) -> None:
    for case in range(len(CASES)):
        x, name = _data(rank, case), _name(case)
        src, dst = world - 1, world // 2

        mine, ref = x.clone(), x.clone()
        broadcast(mine, src)
        dist.broadcast(ref, src)
        checks.close(f"broadcast/{name}", mine, ref, exact=True)

        mine, ref = x.clone(), x.clone().contiguous()
        reduce(mine, dst, "sum")
        dist.reduce(ref, dst)
        expected = ref if rank == dst else x
        checks.close(f"reduce/{name}", mine, expected, exact=rank != dst)

        gathered = gather(x, dst)
        ref_list = [torch.empty_like(x).contiguous() for _ in range(world)]
        dist.gather(x.contiguous(), ref_list if rank == dst else None, dst=dst)
        if rank == dst:
            assert gathered is not None
            checks.close(f"gather/{name}", torch.stack(gathered), torch.stack(ref_list), True)
        else:
            checks.true(f"gather/{name}", gathered is None, "non-root got a list")

        gathered_all = all_gather(x)
        dist.all_gather(ref_list, x.contiguous())
        checks.close(f"all_gather/{name}", torch.stack(gathered_all), torch.stack(ref_list), True)

    # Caller-provided output lists are filled in place and returned.
    x = _data(rank, 2)
    out = [torch.zeros_like(x) for _ in range(world)]
    filled = all_gather(x, tensor_list=out)
    ref_list = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(ref_list, x)
    checks.close("out_list/all_gather", torch.stack(out), torch.stack(ref_list), exact=True)
    checks.true("out_list/all_gather_same", filled is out, "returned a new list")
    out = [torch.zeros_like(x) for _ in range(world)]
    root_list = gather(x, 0, gather_list=out if rank == 0 else None)
    if rank == 0:
        checks.close("out_list/gather", torch.stack(out), torch.stack(ref_list), exact=True)
        checks.true("out_list/gather_same", root_list is out, "returned a new list")


def _subgroup_checks(checks: _Checks, rank: int, world: int) -> None:
    members = list(range(1, world))  # omits rank 0, so group ranks differ from global ranks
    sub = dist.new_group(members)
    if rank not in members:
        return
    x = _data(rank, 5)
    for algo in ALGORITHMS:
        mine, ref = x.clone(), x.clone()
        all_reduce(mine, "sum", sub, algorithm=algo)
        dist.all_reduce(ref, group=sub)
        checks.close(f"subgroup/{algo}/{len(members)}", mine, ref, exact=False)
    mine, ref = x.clone(), x.clone()
    broadcast(mine, world - 1, sub)
    dist.broadcast(ref, world - 1, group=sub)
    checks.close("subgroup/broadcast", mine, ref, exact=True)
    gathered = all_gather(x, sub)
    ref_list = [torch.empty_like(x) for _ in members]
    dist.all_gather(ref_list, x, group=sub)
    checks.close("subgroup/all_gather", torch.stack(gathered), torch.stack(ref_list), True)


def _hierarchical_checks(checks: _Checks, rank: int, world: int) -> None:
    hosts = HOSTS[world]
    algorithm = HierarchicalAllReduce(hosts)
    for case in (0, 3, 6, 9):
        x = _data(rank, case)
        for op in ("sum", "avg"):
            mine, ref = x.clone(), x.clone()
            algorithm(mine, op)
            dist.all_reduce(ref)
            if op == "avg":
                ref /= world
            checks.close(f"hierarchical/{op}/{_name(case)}", mine, ref, exact=False)
    algorithm.close()
    x = _data(rank, 7)
    mine, ref = x.clone(), x.clone()
    hierarchical_all_reduce(mine, hosts, "avg")
    dist.all_reduce(ref)
    checks.close("hierarchical/one_shot", mine, ref / world, exact=False)

    # Emulate torchrun on len(hosts) nodes: the env helpers must find the same layout.
    if all(len(h) == len(hosts[0]) for h in hosts):
        os.environ["LOCAL_WORLD_SIZE"] = str(len(hosts[0]))
        found = host_groups_from_env()
        checks.true("hierarchical/from_env", found == hosts, f"got {found}")
    os.environ["GROUP_RANK"] = str(next(i for i, h in enumerate(hosts) if rank in h))
    found = discover_host_groups()
    checks.true("hierarchical/discover", found == hosts, f"got {found}")


def _ddp_train(rank: int) -> dict[str, list[torch.Tensor]]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    params: dict[str, list[torch.Tensor]] = {}
    for algorithm in ("builtin", "ring", "halving_doubling", "tree", "hierarchical"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        params["init"] = [p.detach().clone() for p in model.parameters()]
        # A tiny bucket cap splits the gradients into several buckets, hence several hook calls.
        ddp = DDP(model, bucket_cap_mb=0.0002)
        if algorithm != "builtin":
            hosts = [[0], [1]] if algorithm == "hierarchical" else None
            ddp.register_comm_hook(*allreduce_algorithm_hook(algorithm, host_groups=hosts))
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(3):
            x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), y).backward()
            opt.step()
        params[algorithm] = [p.detach().clone() for p in model.parameters()]
    return params


def _battery(rank: int, world: int) -> dict[str, Any]:
    checks = _Checks()
    _all_reduce_checks(checks, rank, world)
    _rooted_checks(checks, rank, world)
    if world > 2:
        _subgroup_checks(checks, rank, world)
    _hierarchical_checks(checks, rank, world)
    # DDP rides along in the world-2 run to save a process spawn.
    return {"checks": checks.results, "ddp": _ddp_train(rank) if world == 2 else None}


@pytest.fixture(scope="module")
def battery() -> Callable[[int], list[dict[str, Any]]]:
    cache: dict[int, list[dict[str, Any]]] = {}

    def results(world: int) -> list[dict[str, Any]]:
        if world not in cache:
            cache[world] = run_ranks(_battery, world, timeout=120)
        return cache[world]

    return results


def _verdicts(per_rank: list[dict[str, Any]], prefix: str) -> dict[str, str | None]:
    picked = {}
    for rank, results in enumerate(per_rank):
        checks = results["checks"]
        picked.update({f"r{rank}:{k}": v for k, v in checks.items() if k.startswith(prefix)})
    return picked


WORLDS = [2, 3, 4]


@pytest.mark.parametrize("world", WORLDS)
def test_all_reduce_algorithms_match_builtin(battery: Any, world: int) -> None:
    verdicts = _verdicts(battery(world), "all_reduce/")
    # 3 algorithms x 2 ops x cases x (value + in place), one replica check per case,
    # plus the int64 sum/max cases.
    assert len(verdicts) == world * (3 * 2 * len(CASES) * 2 + len(CASES) + 3 * 2)
    assert {k: v for k, v in verdicts.items() if v} == {}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("collective", ["broadcast", "reduce", "gather", "all_gather"])
def test_rooted_collectives_match_builtin(battery: Any, world: int, collective: str) -> None:
    verdicts = _verdicts(battery(world), f"{collective}/")
    assert len(verdicts) == world * len(CASES)
    assert {k: v for k, v in verdicts.items() if v} == {}


def test_output_lists_are_filled(battery: Any) -> None:
    verdicts = _verdicts(battery(3), "out_list/")
    assert len(verdicts) == 3 * 2 + 2  # all_gather on every rank, gather on the root
    assert {k: v for k, v in verdicts.items() if v} == {}


@pytest.mark.parametrize("world", [3, 4])
def test_collectives_on_subgroup_match_builtin(battery: Any, world: int) -> None:
    verdicts = _verdicts(battery(world), "subgroup/")
    assert len(verdicts) == (world - 1) * 5
    assert {k: v for k, v in verdicts.items() if v} == {}


@pytest.mark.parametrize("world", WORLDS)
def test_hierarchical_matches_builtin(battery: Any, world: int) -> None:
    verdicts = _verdicts(battery(world), "hierarchical/")
    uniform = all(len(h) == len(HOSTS[world][0]) for h in HOSTS[world])
    assert len(verdicts) == world * (4 * 2 + 1 + 1 + int(uniform))
    assert {k: v for k, v in verdicts.items() if v} == {}


def test_ddp_hook_matches_default_ddp(battery: Any) -> None:
    per_rank = [results["ddp"] for results in battery(2)]
    for params in per_rank:
        moved = [
            not torch.equal(a, b) for a, b in zip(params["builtin"], params["init"], strict=True)
        ]
        assert all(moved)  # three steps changed every parameter, so the comparison has teeth
        for algorithm in ("ring", "halving_doubling", "tree", "hierarchical"):
            for got, want in zip(params[algorithm], params["builtin"], strict=True):
                torch.testing.assert_close(got, want)
    for got, want in zip(per_rank[0]["ring"], per_rank[1]["ring"], strict=True):
        assert torch.equal(got, want)


# --- single-process checks: argument handling -----------------------------------


def test_chunk_bounds_cover_every_element_once() -> None:
    assert chunk_bounds(10, 4) == [0, 3, 6, 8, 10]
    assert chunk_bounds(2, 4) == [0, 1, 2, 2, 2]
    assert chunk_bounds(0, 3) == [0, 0, 0, 0]


def test_normalize_op_accepts_names_and_reduce_ops() -> None:
    assert normalize_op("AVG") == "avg"
    assert normalize_op(dist.ReduceOp.SUM) == "sum"
    assert normalize_op(dist.ReduceOp.MAX) == "max"
    with pytest.raises(ConfigError, match="unsupported reduce op 'mean'"):
        normalize_op("mean")
    with pytest.raises(UserError, match="op=avg needs a floating-point tensor"):
        normalize_op("avg", torch.int64)


def test_errors_name_the_problem() -> None:
    with pytest.raises(UserError, match=r"torch\.distributed is not initialized"):
        ring_all_reduce(torch.ones(3))
    with pytest.raises(ConfigError, match="unknown all-reduce algorithm 'bogus'"):
        all_reduce(torch.ones(3), algorithm="bogus")
    with pytest.raises(ConfigError, match="unknown all-reduce algorithm 'bogus'"):
        allreduce_algorithm_hook("bogus")


def test_host_groups_from_env_splits_ranks_by_host() -> None:
    assert host_groups_from_env(4, 2) == [[0, 1], [2, 3]]
    assert host_groups_from_env(3, 1) == [[0], [1], [2]]
    with pytest.raises(ConfigError, match="WORLD_SIZE=6 is not a multiple of LOCAL_WORLD_SIZE=4"):
        host_groups_from_env(6, 4)
