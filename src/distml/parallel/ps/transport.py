"""The parameter-server wire protocol over torch.distributed point-to-point.

Every exchange is a fixed-size int64 header followed by plain tensors, sent
with ``dist.send`` / ``dist.recv`` on the default group (gloo or nccl; no
sockets of our own). Each (worker, server) pair is a FIFO stream, so no tags
are needed. Workers send ``PUSH`` (gradient payload, answered by a parameter
payload), ``STATE`` (answered by the server's shard state for checkpoints)
and ``DONE``. Shard state crosses the wire as a *tensor dict*: a JSON
descriptor (names, dtypes, shapes) and one byte buffer, so checkpoints never
need pickle between processes.
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from distml.comm.codecs import Payload
from distml.errors import DistmlError

#: Headers are int64[4]. Worker -> server: [kind, step, 0, 0]. Server -> worker:
#: [status, updates applied, live workers, pull mode (OK) or lost worker rank (STOPPED)].
HEADER_LEN = 4
#: Worker -> server message kinds (header[0]).
PUSH, STATE, DONE = 1, 2, 3
#: Server -> worker reply status (header[0]).
OK, STOPPED = 0, 1
#: Pull modes (header[3] of an OK reply): whole parameters, or a codec-encoded change.
FULL, DELTA = 0, 1


class ParameterServerLost(DistmlError):
    """A parameter server stopped answering: its shard is lost and the job must stop."""

    exit_code = 1


class PSJobStopped(DistmlError):
    """A server stopped the job (a worker died in sync mode, or a server failed)."""

    exit_code = 1


def send_header(values: list[int], dst: int, device: torch.device) -> None:
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    dist.send(header, dst)


def recv_header(src: int, device: torch.device) -> list[int]:
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.recv(header, src)
    return [int(v) for v in header.tolist()]


def send_payload(payload: Payload, dst: int, device: torch.device) -> None:
    for tensor in payload.tensors:
        dist.send(tensor.contiguous().to(device), dst)


def recv_payload(template: Payload, src: int, device: torch.device) -> Payload:
    """Receive tensors shaped like ``template`` (codec payload shapes depend only on size)."""
    tensors = []
    for like in template.tensors:
        buf = torch.empty(like.shape, dtype=like.dtype, device=device)
        dist.recv(buf, src)
        tensors.append(buf)
    return Payload(tuple(tensors), template.shape, template.dtype)


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"not a torch dtype in a tensor dict: {name!r}")
    return value


def send_tensor_dict(tensors: dict[str, torch.Tensor], dst: int, device: torch.device) -> None:
    """Send named tensors as a JSON descriptor plus one byte buffer."""
    entries, blobs = [], []
    for name, tensor in tensors.items():
        flat = tensor.detach().contiguous().reshape(-1)
        entries.append([name, str(tensor.dtype), list(tensor.shape)])
        blobs.append(
            flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
        )
    meta = torch.tensor(list(json.dumps(entries).encode("utf-8")), dtype=torch.uint8)
    data = torch.cat([b.to(device) for b in blobs]) if blobs else torch.empty(0, dtype=torch.uint8)
    sizes = torch.tensor([meta.numel(), data.numel()], dtype=torch.int64, device=device)
    dist.send(sizes, dst)
    dist.send(meta.to(device), dst)
    if data.numel():
        dist.send(data.to(device), dst)


def recv_tensor_dict(src: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Receive what :func:`send_tensor_dict` sent (tensors land on CPU)."""
    sizes = torch.empty(2, dtype=torch.int64, device=device)
    dist.recv(sizes, src)
    meta_len, data_len = (int(v) for v in sizes.tolist())
    meta = torch.empty(meta_len, dtype=torch.uint8, device=device)
    dist.recv(meta, src)
    data = torch.empty(data_len, dtype=torch.uint8, device=device)
    if data_len:
        dist.recv(data, src)
    data = data.cpu()
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, dtype_name, shape in json.loads(bytes(meta.cpu().tolist()).decode("utf-8")):
        dtype = _dtype(dtype_name)
        numel = 1
        for dim in shape:
            numel *= int(dim)
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        chunk = data[offset : offset + nbytes].clone()
        out[name] = chunk.view(dtype).reshape(shape)
        offset += nbytes
    return out
