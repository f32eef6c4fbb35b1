"""The launcher reports a failing worker by rank and stops the others."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from distml.errors import UserError, WorkerFailure
from distml.launch import LaunchSpec, launch
from distml.runtime.dist import init_distributed


def raise_on_rank_1() -> int:
    ctx = init_distributed()
    if ctx.rank == 1:
        raise RuntimeError("boom on purpose")
    dist.barrier()  # rank 0 would wait here forever if the launcher didn't stop it
    return ctx.rank


def user_error_on_rank_0() -> None:
    ctx = init_distributed()
    if ctx.rank == 0:
        raise UserError("bad thing; fix it")
    dist.barrier()


def return_rank() -> int:
    return init_distributed().rank


def test_results_by_rank() -> None:
    assert launch(return_rank, (), LaunchSpec(nproc=2)) == {0: 0, 1: 1}


def test_raising_worker_stops_the_job_and_is_named() -> None:
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as err:
        launch(raise_on_rank_1, (), LaunchSpec(nproc=2))
    assert time.monotonic() - start < 30
    assert str(err.value).startswith("worker rank 1 failed: RuntimeError: boom on purpose")


def test_user_error_in_a_worker_stays_a_user_error() -> None:
    with pytest.raises(UserError, match="^bad thing; fix it$"):
        launch(user_error_on_rank_0, (), LaunchSpec(nproc=2))


def test_bad_launch_arguments() -> None:
    with pytest.raises(UserError, match="--nnodes 'x' must be N or MIN:MAX"):
        launch(return_rank, (), LaunchSpec(nproc=2, nnodes="x"))
    with pytest.raises(UserError, match="--master 'nope' must be ADDR:PORT"):
        launch(return_rank, (), LaunchSpec(nproc=1, nnodes="2", node_rank=1, master="nope"))
