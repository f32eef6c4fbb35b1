"""The public Python API: what each ``distml`` CLI command calls.

``train``, ``predict`` and ``evaluate`` validate their input in the calling
process (so bad input fails at once with one line, before any worker
starts), then run module-level worker functions through the elastic
launcher. Worker functions rebuild the config from a plain dict, because
only plain data crosses the process boundary.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from distml.config import Config, build_config
from distml.data import GlobalBatchSampler, build_datasets
from distml.errors import UserError
from distml.launch import LaunchSpec, launch
from distml.models import get_model_spec
from distml.runtime.dist import destroy_distributed, init_distributed


def world_size_of(spec: LaunchSpec) -> int:
    return spec.nproc * spec.node_range[0]


def preflight(cfg: Config, world_size: int) -> None:
    """Check everything that can be checked before workers start (raises UserError)."""
    from distml.parallel.ddp import check_comm_settings
    from distml.train.trainer import build_model_for

    check_comm_settings(cfg.parallel)
    data_world = world_size
    if cfg.parallel.strategy == "ps":
        from distml.parallel.ps import check_ps_settings

        check_ps_settings(cfg.parallel, world_size)
        data_world = cfg.parallel.workers  # servers hold parameters, workers read data
    spec = get_model_spec(cfg.model.name)
    bundle = build_datasets(cfg.data, cfg.seed, spec.task)
    GlobalBatchSampler(
        len(bundle.train),
        cfg.data.global_batch_size,
        world_size=data_world,
        accumulation_steps=cfg.schedule.accumulation_steps,
    )
    with torch.device("meta"):
        build_model_for(cfg, bundle)
    resume = cfg.checkpoint.resume
    named_file = isinstance(resume, str) and resume not in ("auto", "latest", "true")
    if named_file and not Path(str(resume)).is_file():
        raise UserError(f"checkpoint.resume={resume!r}: no such file; pass an existing checkpoint")


def _train_worker(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    from distml.train.trainer import Trainer

    cfg = build_config(cfg_dict)
    ctx = init_distributed(cfg.parallel.backend, cfg.parallel.device)
    try:
        summary = Trainer(cfg, ctx).fit()
    finally:
        destroy_distributed()
    if summary.get("stopped_by_signal") and os.environ.get("TORCHELASTIC_RUN_ID"):
        # The agent is shutting the job down and will not collect return values; a
        # normal return would block in the launcher's result hand-off until its
        # shutdown timeout kills us. The checkpoint is on disk, so leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return summary


def train(cfg: Config, spec: LaunchSpec | None = None) -> dict[str, Any]:
    """Train ``cfg`` on ``spec.nproc`` local workers (default: ``cfg.parallel.nproc``)."""
    spec = spec or LaunchSpec(nproc=cfg.parallel.nproc)
    preflight(cfg, world_size_of(spec))
    results = launch(_train_worker, (cfg.to_dict(),), spec)
    return results[min(results)] if results else {}


def _predict_worker(
    cfg_dict: dict[str, Any], checkpoint: str, input_spec: str, output: str
) -> dict[str, Any]:
    from distml.inference.predict import (
        gather_in_order,
        load_for_inference,
        read_inputs,
        run_shard,
        write_outputs,
    )

    cfg = build_config(cfg_dict)
    ctx = init_distributed(cfg.parallel.backend, cfg.parallel.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))
    try:
        state, model = load_for_inference(checkpoint, ctx.device)
        task = state["task"]
        inputs = read_inputs(input_spec, state, lambda: build_datasets(cfg.data, cfg.seed, task))
        local = run_shard(model, inputs, ctx, cfg.data.eval_batch_size)
        full = gather_in_order(local, len(inputs), ctx)
        if full is not None:
            write_outputs(full, Path(output))
        return {"rank": ctx.rank, "count": len(inputs), "output": output}
    finally:
        destroy_distributed()


def predict(
    cfg: Config, checkpoint: str, input_spec: str, output: str, spec: LaunchSpec | None = None
) -> Path:
    """Data-parallel inference of ``input_spec`` with the model in ``checkpoint``."""
    from distml.inference.predict import check_output_path

    check_output_path(output)
    check_model_file(checkpoint)  # fail fast, in this process, on a bad checkpoint
    if not input_spec.startswith("split:") and not Path(input_spec).is_file():
        raise UserError(
            f"input file not found: {input_spec}; pass a .npy or .csv file or split:test"
        )
    launch(
        _predict_worker,
        (cfg.to_dict(), checkpoint, input_spec, output),
        spec or LaunchSpec(nproc=1),
    )
    return Path(output)


def _eval_worker(cfg_dict: dict[str, Any], checkpoint: str, split: str) -> dict[str, float]:
    from distml.inference.predict import load_for_inference
    from distml.train.trainer import evaluate_model

    cfg = build_config(cfg_dict)
    ctx = init_distributed(cfg.parallel.backend, cfg.parallel.device)
    try:
        state, model = load_for_inference(checkpoint, ctx.device)
        bundle = build_datasets(cfg.data, cfg.seed, state["task"])
        dataset = bundle.test if split == "test" else bundle.train
        return evaluate_model(model, dataset, state["task"], ctx, cfg.data.eval_batch_size)
    finally:
        destroy_distributed()


def evaluate(
    cfg: Config, checkpoint: str, split: str = "test", spec: LaunchSpec | None = None
) -> dict[str, float]:
    """Loss and accuracy of ``checkpoint`` on a split of the config's dataset."""
    if split not in ("train", "test"):
        raise UserError(f"--split {split!r} must be train or test")
    check_model_file(checkpoint)
    results = launch(_eval_worker, (cfg.to_dict(), checkpoint, split), spec or LaunchSpec(nproc=1))
    return results[min(results)]


def check_model_file(path: str) -> None:
    """Open a training checkpoint or a quantized model once, to fail before launching."""
    from distml.inference.quantize import is_quantized_file, load_quantized_for_inference
    from distml.train.checkpoint import load_checkpoint

    if is_quantized_file(path):
        load_quantized_for_inference(path)
    else:
        load_checkpoint(path)


def quantize(
    checkpoint: str, bits: int, out: str, group_size: int = 128, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Quantize a checkpoint's weights to int8 or int4 into a safetensors file."""
    from distml.inference.quantize import quantize_checkpoint

    return quantize_checkpoint(checkpoint, bits, out, group_size, skip)


def memory_report(cfg: Config, budget_mb: float | None = None) -> Any:
    """Per-layer memory of one training step of ``cfg`` on one worker, with advice."""
    from distml.memory.profiler import profile_memory
    from distml.train.metrics import task_loss
    from distml.train.optim import build_optimizer
    from distml.train.trainer import build_model_for

    spec = get_model_spec(cfg.model.name)
    bundle = build_datasets(cfg.data, cfg.seed, spec.task)
    sampler = GlobalBatchSampler(
        len(bundle.train),
        cfg.data.global_batch_size,
        world_size=cfg.parallel.nproc,
        accumulation_steps=cfg.schedule.accumulation_steps,
        seed=cfg.seed,
    )
    x, y = bundle.train.get_batch(next(sampler.epoch_batches(0))[0], 0)
    torch.manual_seed(cfg.seed)
    model, _ = build_model_for(cfg, bundle)

    def make_optimizer(params: Any) -> torch.optim.Optimizer:
        holder = torch.nn.Module()
        holder.params = torch.nn.ParameterList(list(params))
        return build_optimizer(holder, cfg.optimizer, cfg.optimizer.lr)

    return profile_memory(
        model,
        x,
        y,
        lambda out, t: task_loss(out, t, spec.task),
        cfg.optimizer.name,
        momentum=cfg.optimizer.momentum,
        weight_decay=cfg.optimizer.weight_decay,
        precision=cfg.schedule.precision,
        budget_mb=budget_mb,
        make_optimizer_fn=make_optimizer if cfg.optimizer.name in ("lars", "lamb") else None,
        module_types=tuple(cfg.memory.recompute_modules),
    )


def info() -> dict[str, Any]:
    """Versions, backends, devices and cores of this machine."""
    cuda = torch.cuda.is_available()
    return {
        "distml": __import__("distml").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda
        else [],
        "backends": {
            "gloo": dist.is_available() and dist.is_gloo_available(),
            "nccl": dist.is_available() and dist.is_nccl_available(),
            "mpi": dist.is_available() and dist.is_mpi_available(),
        },
        "default_backend": "nccl" if cuda and dist.is_nccl_available() else "gloo",
        "bf16_supported_cpu": True,
    }
