"""Process-group set-up and the per-process view of a distributed job.

Workers are started by torch.distributed's elastic launcher, which exports
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. :func:`init_distributed`
reads them, picks the backend and device at run time (nccl and one CUDA device
per process when CUDA is present, else gloo on CPU) and returns a
:class:`DistContext` that the rest of distml passes around explicitly instead
of consulting globals.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job and which device and backend it uses."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def node_rank(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def pick_backend(requested: str = "auto") -> str:
    """nccl when CUDA is usable, else gloo; an explicit request is honoured."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """One device per process: ``cuda:LOCAL_RANK`` when CUDA is present, else CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "cuda":
        raise RuntimeError("parallel.device=cuda but no CUDA device is visible")
    return torch.device("cpu")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(
    backend: str = "auto", device: str = "auto", timeout_s: float = 300.0
) -> DistContext:
    """Join the job described by the launcher's environment, or run single-process.

    With WORLD_SIZE unset or 1 no process group is created unless
    DISTML_FORCE_PG=1, so plain scripts and notebooks work without a launcher.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    chosen_device = pick_device(device, local_rank)
    chosen_backend = pick_backend(backend)
    if chosen_backend == "nccl" and chosen_device.type != "cuda":
        chosen_backend = "gloo"
    if chosen_device.type == "cuda":
        torch.cuda.set_device(chosen_device)
    wants_group = world_size > 1 or os.environ.get("DISTML_FORCE_PG") == "1"
    if wants_group and not dist.is_initialized():
        dist.init_process_group(
            backend=chosen_backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=chosen_device,
        backend=chosen_backend,
    )


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for rendezvous and local services)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
