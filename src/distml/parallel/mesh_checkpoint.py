"""Sharded, plan-independent checkpoints of model-parallel training (torch.distributed.checkpoint).

A checkpoint is a directory ``step_XXXXXXXX.dcp`` written by every rank with
``torch.distributed.checkpoint``: model tensors under ``model.<name>`` and
optimizer state under ``optim.<parameter name>.<state key>``, always with the
unsharded model's names and full shapes (tensor-parallel shards are
all-gathered per key; pipeline stages each write their own keys; replicas are
deduplicated by DCP's planner). A ``meta.pt`` of plain values (step, data
position, LR schedule, model description) sits beside DCP's files. Because
nothing in the layout depends on the plan, a checkpoint written at tp=2 loads
single-process or at pp=2: each rank reads the full tensors of the keys it
holds and keeps its slice. The directory is written under a temporary name
and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from distml.errors import CheckpointError

# torch.distributed.checkpoint pulls in DTensor and sympy (seconds): imported where used,
# so that importing the trainer (which resolves resume paths here) stays cheap.

FORMAT = "distml-sharded-checkpoint/1"
_STEP = re.compile(r"^step_(\d{8})\.(pt|dcp)$")


def checkpoint_path(directory: str | os.PathLike[str], step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.dcp"


def is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    return Path(path).is_dir()


def resolve_resume(directory: str | os.PathLike[str], resume: bool | str) -> Path | None:
    """The checkpoint to resume from: a named file or directory, the newest one, or None.

    Like the trainer's manager, but the newest of both ``step_*.pt`` files and
    sharded ``step_*.dcp`` directories.
    """
    if resume is False or resume in ("", "false", "no"):
        return None
    if isinstance(resume, str) and resume not in ("true", "auto", "latest"):
        return Path(resume)
    root = Path(directory)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name))]
    return max(found)[1] if found else None


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The plain-value part of a sharded checkpoint (safe: ``weights_only=True``)."""
    meta_file = Path(path) / "meta.pt"
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a distml sharded checkpoint (no meta.pt); pass a step_*.dcp "
            "directory or a step_*.pt file"
        )
    meta = torch.load(meta_file, map_location="cpu", weights_only=True)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file} is not a distml sharded checkpoint ({FORMAT!r})")
    return meta


def _tp_layers(model: nn.Module) -> dict[str, tuple[Any, str]]:
    from distml.parallel.tensor.state import sharded_entries

    return sharded_entries(model)


def _full(value: torch.Tensor, entry: tuple[Any, str] | None) -> torch.Tensor:
    """The full tensor of a (possibly tensor-parallel) local value: a tp collective."""
    if entry is None:
        return value.detach()
    layer, name = entry
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(layer.group))]
    dist.all_gather(parts, value.detach().contiguous(), group=layer.group)
    full: torch.Tensor = layer.full_from_shards(name, parts)
    return full


def param_names(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its first name in ``model`` (a tied weight keeps one name)."""
    return {id(p): name for name, p in model.named_parameters() if not p.is_meta}


def _local_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's entries of the plan-independent layout (full tensors)."""
    entries = _tp_layers(model)
    state: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if not value.is_meta:
            state[f"model.{key}"] = _full(value, entries.get(key))
    if optimizer is None:
        return state
    names = param_names(model)
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for k, v in sorted(optimizer.state.get(p, {}).items()):
                if not isinstance(v, torch.Tensor):
                    continue
                like_param = v.shape == p.shape and name in entries
                state[f"optim.{name}.{k}"] = _full(v, entries[name] if like_param else None)
    return state


def save_sharded_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    keep_last: int = 3,
) -> Path | None:
    """Write ``step_XXXXXXXX.dcp`` atomically (a collective); the path on rank 0, else None."""
    import torch.distributed.checkpoint as dcp

    final = checkpoint_path(directory, step)
    tmp = final.with_name(f".{final.name}.tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    state = _local_state(model, optimizer)
    if dist.is_initialized():
        dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    if rank == 0:
        groups = [] if optimizer is None else optimizer.param_groups
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        torch.save({**meta, "format": FORMAT, "step": step, "optim_groups": hyper}, tmp / "meta.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _rotate(Path(directory), keep_last)
    if dist.is_initialized():
        dist.barrier()
    return final if rank == 0 else None


def _rotate(directory: Path, keep_last: int) -> None:
    found = sorted(
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _STEP.match(p.name)) and p.suffix == ".dcp"
    )
    for _, old in found[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_sharded_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Load this rank's share of a sharded checkpoint into ``model`` (and ``optimizer``).

    ``model`` may be whole or already tensor-parallel and/or pipelined (tensors
    on the meta device are other stages' and are skipped). A collective when a
    process group is initialised. Returns the checkpoint's plain values.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_meta(path)
    if model_name is not None and meta["model_name"] != model_name:
        raise CheckpointError(
            f"checkpoint {path} holds model {meta['model_name']!r} but the config says "
            f"{model_name!r}; resume with the config that wrote it"
        )
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    entries = _tp_layers(model)
    targets = {k: v for k, v in model.state_dict().items() if not v.is_meta}
    request: dict[str, Any] = {}
    for key, value in targets.items():
        found = stored.get(f"model.{key}")
        if found is None or not hasattr(found, "size"):
            raise CheckpointError(
                f"checkpoint {path} has no tensor for model parameter {key!r}; "
                "it was written for another model"
            )
        request[f"model.{key}"] = torch.empty(tuple(found.size), dtype=value.dtype)
    names = param_names(model)
    wanted_optim: list[tuple[nn.Parameter, str, str]] = []
    for group in [] if optimizer is None else optimizer.param_groups:
        for p in group["params"]:
            prefix = f"optim.{names[id(p)]}."
            for key, found in stored.items():
                if key.startswith(prefix) and isinstance(found, TensorStorageMetadata):
                    dtype = found.properties.dtype
                    request[key] = torch.empty(tuple(found.size), dtype=dtype)
                    wanted_optim.append((p, names[id(p)], key))
    dcp.load(request, checkpoint_id=str(path))
    with torch.no_grad():
        for key, value in targets.items():
            full = request[f"model.{key}"]
            entry = entries.get(key)
            local = entry[0].shard_of_full(entry[1], full) if entry else full
            value.copy_(local)
    if optimizer is not None:
        for p, name, key in wanted_optim:
            full = request[key]
            entry = entries.get(name)
            if entry is not None and full.dim() == p.dim() and full.shape != p.shape:
                full = entry[0].shard_of_full(entry[1], full)
            optimizer.state.setdefault(p, {})[key[len(f"optim.{name}.") :]] = full.to(
                p.device if full.dim() else "cpu"
            )
        saved = meta.get("optim_groups") or []
        if len(saved) == len(optimizer.param_groups):
            for group, hyper in zip(optimizer.param_groups, saved, strict=True):
                group.update(hyper)
    return meta


def load_full_model(path: str | os.PathLike[str]) -> tuple[dict[str, Any], nn.Module]:
    """Rebuild the unsharded model of a sharded checkpoint (eval mode, on CPU)."""
    from distml.models import get_model_spec, make_model_config

    meta = read_meta(path)
    name = meta["model_name"]
    model = get_model_spec(name).build(make_model_config(name, meta["model_args"]))
    load_sharded_checkpoint(path, model)
    model.eval()
    return meta, model
