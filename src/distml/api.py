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
    from distml.parallel.mesh_strategy import check_mesh_plan, mesh_dims, uses_mesh

    if uses_mesh(cfg.parallel):
        data_world = mesh_dims(cfg.parallel, world_size)[0]  # pp and tp ranks share batches
    spec = get_model_spec(cfg.model.name)
    bundle = build_datasets(cfg.data, cfg.seed, spec.task)
    GlobalBatchSampler(
        len(bundle.train),
        cfg.data.global_batch_size,
        world_size=data_world,
        accumulation_steps=cfg.schedule.accumulation_steps,
    )
    with torch.device("meta"):
        model, _ = build_model_for(cfg, bundle)
    if uses_mesh(cfg.parallel):
        check_mesh_plan(
            cfg.parallel,
            world_size,
            model,
            global_batch=cfg.data.global_batch_size,
            precision=cfg.schedule.precision,
            recompute=cfg.memory.recompute,
            seq_len=cfg.data.seq_len,
        )
    resume = cfg.checkpoint.resume
    named_file = isinstance(resume, str) and resume not in ("auto", "latest", "true")
    # A sharded (model-parallel) checkpoint is a step_*.dcp directory.
    if named_file and not Path(str(resume)).exists():
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
        predict_on_mesh,
        read_inputs,
        run_shard,
        write_outputs,
    )

    cfg = build_config(cfg_dict)
    ctx = init_distributed(cfg.parallel.backend, cfg.parallel.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))
    try:
        from distml.parallel.mesh_strategy import inference_model, uses_mesh

        if Path(checkpoint).is_dir():
            from distml.parallel.mesh_checkpoint import load_full_model

            state, model = load_full_model(checkpoint)
            model = model.to(ctx.device)
        else:
            state, model = load_for_inference(checkpoint, ctx.device)
        task = state["task"]
        inputs = read_inputs(input_spec, state, lambda: build_datasets(cfg.data, cfg.seed, task))
        if uses_mesh(cfg.parallel):
            # Model-parallel: each dp replica runs its shard of the inputs through its
            # pp x tp ranks.
            forward = inference_model(model, cfg.parallel, ctx)
            full = predict_on_mesh(forward, inputs, ctx, cfg.data.eval_batch_size)
        else:
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
    spec = spec or LaunchSpec(nproc=1)
    from distml.parallel.mesh_strategy import check_inference_plan, uses_mesh

    if uses_mesh(cfg.parallel):
        check_inference_plan(cfg.parallel, world_size_of(spec), checkpoint)
    if not input_spec.startswith("split:") and not Path(input_spec).is_file():
        raise UserError(
            f"input file not found: {input_spec}; pass a .npy or .csv file or split:test"
        )
    launch(
        _predict_worker,
        (cfg.to_dict(), checkpoint, input_spec, output),
        spec,
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
        metrics = evaluate_model(model, dataset, state["task"], ctx, cfg.data.eval_batch_size)
        if state["task"] == "extractive_qa":
            from distml.inference.qa import evaluate_squad

            # Answer selection needs every window of a question: each rank scores the whole split.
            scores, _ = evaluate_squad(
                model,
                dataset,
                cfg.data.eval_batch_size,
                ctx.device,
                cfg.data.max_answer_tokens,
                cfg.data.null_threshold,
            )
            metrics.update(scores)
        return metrics
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


def _generate_worker(
    cfg_dict: dict[str, Any], checkpoint: str, prompt: str, sampling: dict[str, Any]
) -> str:
    from distml.inference.generate import generate_text, model_logits_fn
    from distml.parallel.mesh_strategy import inference_model, uses_mesh

    cfg = build_config(cfg_dict)
    ctx = init_distributed(cfg.parallel.backend, cfg.parallel.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size)))
    try:

        def sharded(model: torch.nn.Module) -> Any:
            # Every rank runs the same decoding loop on the same full logits with the
            # same seeded generator, so all ranks pick the same tokens.
            if not uses_mesh(cfg.parallel):
                return model_logits_fn(model)
            return model_logits_fn(inference_model(model, cfg.parallel, ctx))

        texts = generate_text(
            checkpoint, [prompt], device=str(ctx.device), logits_fn_for=sharded, **sampling
        )
        return texts[0]
    finally:
        destroy_distributed()


def generate(
    checkpoint: str,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    device: str = "cpu",
    *,
    cfg: Config | None = None,
    spec: LaunchSpec | None = None,
) -> str:
    """Continue ``prompt`` with a causal-LM checkpoint (greedy when ``temperature=0``).

    With ``cfg.parallel.tp``/``pp`` > 1 (and a launch ``spec`` for that world) the
    model runs tensor- and/or pipeline-parallel on workers; the text equals the
    single-process one for the same seed.
    """
    from distml.inference.generate import check_sampling_args, generate_text
    from distml.parallel.mesh_strategy import check_inference_plan, uses_mesh

    check_sampling_args(max_new_tokens, temperature, top_k, top_p)
    parallel = (
        cfg is not None
        and spec is not None
        and (world_size_of(spec) > 1 or uses_mesh(cfg.parallel))
    )
    if not parallel:
        texts = generate_text(
            checkpoint, [prompt], max_new_tokens, temperature, top_k, top_p, seed, device
        )
        return texts[0]
    assert cfg is not None and spec is not None
    check_model_file(checkpoint)
    if uses_mesh(cfg.parallel):
        check_inference_plan(cfg.parallel, world_size_of(spec), checkpoint)
    if not prompt:
        raise UserError("--prompt is empty; give at least one character of text to continue")
    if seed is None:
        # Workers must share one generator state to agree on sampled tokens.
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    sampling = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
    }
    results = launch(_generate_worker, (cfg.to_dict(), checkpoint, prompt, sampling), spec)
    return str(results[min(results)])


def check_model_file(path: str) -> None:
    """Open a training checkpoint or a quantized model once, to fail before launching."""
    from distml.inference.quantize import is_quantized_file, load_quantized_for_inference
    from distml.train.checkpoint import load_checkpoint

    if Path(path).is_dir():
        from distml.parallel.mesh_checkpoint import read_meta

        read_meta(path)
    elif is_quantized_file(path):
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
