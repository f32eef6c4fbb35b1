"""Data-parallel inference: split inputs across workers, gather outputs in input order.

No gradients and no gradient synchronisation: each worker takes a contiguous
shard of the inputs (:func:`~distml.data.shard_range`), runs the model in eval
mode, and rank 0 gathers the shards back in order. Because the shards are
contiguous and processed in the same batch boundaries as a single-process run
would use (batches are aligned to global multiples of the batch size), the
gathered output equals single-process inference.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from distml.data import shard_range
from distml.errors import UserError
from distml.models import get_model_spec, make_model_config
from distml.runtime.dist import DistContext
from distml.train.checkpoint import load_checkpoint

INPUT_KINDS = ".npy (array of inputs), .csv (one numeric row per input), split:test or split:train"
OUTPUT_KINDS = ".npy (logits), .csv (index,prediction,confidence) or .jsonl"


def model_from_checkpoint(state: dict[str, Any]) -> nn.Module:
    """Rebuild the float model a checkpoint was written from and load its weights."""
    name = state["model_name"]
    model_cfg = make_model_config(name, state["model_args"])
    model = get_model_spec(name).build(model_cfg)
    model.load_state_dict(state["model"])
    model.eval()
    return model


def read_inputs(spec: str, state: dict[str, Any], bundle_loader: Any = None) -> torch.Tensor:
    """Load the inputs named by ``spec`` as a tensor shaped for the model."""
    if spec.startswith("split:"):
        if bundle_loader is None:
            raise UserError("--input split:NAME needs the config's dataset")
        split = spec.split(":", 1)[1]
        if split not in ("train", "test"):
            raise UserError(f"--input {spec!r}: split must be train or test")
        bundle = bundle_loader()
        dataset = bundle.test if split == "test" else bundle.train
        x, _ = dataset.get_batch(torch.arange(len(dataset)), 0)
        return x
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"input file not found: {path}; pass {INPUT_KINDS}")
    shape = tuple(state.get("input_shape") or ())
    if path.suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise UserError(
                f"{path} is not a plain .npy array ({exc}); save it with numpy.save"
            ) from None
    elif path.suffix == ".csv":
        array = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    else:
        raise UserError(f"unsupported input {path.suffix or path.name!r}; pass {INPUT_KINDS}")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if state.get("task") == "classification":
        tensor = tensor.float()
        if shape and tuple(tensor.shape[1:]) != shape:
            numel = int(np.prod(shape))
            if tensor[0].numel() != numel:
                raise UserError(
                    f"inputs in {path} have {tensor[0].numel()} values per row but the model "
                    f"expects shape {shape} ({numel} values)"
                )
            tensor = tensor.reshape(len(tensor), *shape)
    else:
        tensor = tensor.long()
    return tensor


@torch.no_grad()
def run_shard(
    model: nn.Module, inputs: torch.Tensor, ctx: DistContext, batch_size: int
) -> torch.Tensor:
    """This rank's outputs for its contiguous shard, batched on global boundaries."""
    start, stop = shard_range(len(inputs), ctx.rank, ctx.world_size)
    outputs = []
    lo = start
    while lo < stop:
        # Align batch ends to global multiples of batch_size so that every sample is
        # computed in the same batch composition as in a single-process run.
        hi = min(stop, (lo // batch_size + 1) * batch_size)
        outputs.append(model(inputs[lo:hi].to(ctx.device)).float().cpu())
        lo = hi
    if outputs:
        return torch.cat(outputs)
    probe = model(inputs[:1].to(ctx.device)).float().cpu()
    return probe[:0]


def gather_in_order(
    local: torch.Tensor, total: int, ctx: DistContext, group: Any = None
) -> torch.Tensor | None:
    """Concatenate every rank's shard on rank 0 (others get None).

    ``ctx.rank``/``ctx.world_size`` are positions in ``group`` (default: the world).
    """
    if not ctx.distributed:
        return local
    sizes = [shard_range(total, r, ctx.world_size) for r in range(ctx.world_size)]
    longest = max(stop - start for start, stop in sizes)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: len(local)] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded, group=group)
    if ctx.rank != 0:
        return None
    parts = [g[: stop - start].cpu() for g, (start, stop) in zip(gathered, sizes, strict=True)]
    return torch.cat(parts)


def predict_on_mesh(
    forward: Any, inputs: torch.Tensor, ctx: DistContext, batch_size: int
) -> torch.Tensor | None:
    """Model-parallel inference with ``forward`` (a MeshForward): every dp replica takes a
    contiguous shard of the inputs through its pp x tp ranks; global rank 0 gets them all.
    """
    import dataclasses

    from distml.parallel.mesh import axis_rank, axis_size

    mesh = forward.mesh
    replica = dataclasses.replace(ctx, rank=axis_rank(mesh, "dp"), world_size=axis_size(mesh, "dp"))
    local = run_shard(forward, inputs, replica, batch_size)
    full = gather_in_order(local, len(inputs), replica, group=mesh.get_group("dp"))
    # dp rank 0 exists once per (pp, tp) position; only the world's rank 0 writes.
    return full if ctx.rank == 0 else None


def write_outputs(logits: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npy":
        np.save(path, logits.numpy())
        return
    probs = torch.softmax(logits, dim=-1)
    conf, pred = probs.max(dim=-1)
    if path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "prediction", "confidence"])
            for i, (p, c) in enumerate(zip(pred.tolist(), conf.tolist(), strict=True)):
                writer.writerow(
                    [
                        i,
                        p if isinstance(p, int) else json.dumps(p),
                        f"{c:.6f}" if isinstance(c, float) else c,
                    ]
                )
        return
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for i, (p, c) in enumerate(zip(pred.tolist(), conf.tolist(), strict=True)):
                fh.write(json.dumps({"index": i, "prediction": p, "confidence": c}) + "\n")
        return
    raise UserError(f"unsupported output {path.suffix or path.name!r}; write {OUTPUT_KINDS}")


def check_output_path(path: str) -> None:
    if Path(path).suffix not in (".npy", ".csv", ".jsonl"):
        raise UserError(f"unsupported output {path!r}; write {OUTPUT_KINDS}")


def load_for_inference(checkpoint: str, device: torch.device) -> tuple[dict[str, Any], nn.Module]:
    """A training checkpoint (.pt) or a ``distml quantize`` file (.safetensors), ready to run."""
    from distml.inference.quantize import is_quantized_file, load_quantized_for_inference

    if is_quantized_file(checkpoint):
        meta, quantized = load_quantized_for_inference(checkpoint)
        return meta, quantized.to(device)
    state = load_checkpoint(checkpoint, map_location="cpu")
    model = model_from_checkpoint(state).to(device)
    return state, model
