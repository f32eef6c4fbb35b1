"""Entry point of the ``distml`` command.

Each subcommand parses its arguments and calls one function of
:mod:`distml.api`. Errors the user can fix print one line and exit 2; a
failed worker prints the failing rank and exits 1; ``--debug`` shows
tracebacks. Nothing here holds logic that a notebook user could not reach
through the library.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

EPILOG = """examples:
  distml train                                 # default demo: digits CNN on 2 workers
  distml train examples/gpt_shakespeare.yaml --nproc 2 optimizer.lr=0.001
  distml train cfg.yaml --nnodes 2 --node-rank 0 --master 10.0.0.1:29500
  distml predict cfg.yaml --checkpoint runs/x/checkpoints/step_00000220.pt \\
      --input split:test --output preds.csv --nproc 2
  distml eval cfg.yaml --checkpoint CKPT --split test
  distml info
"""


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    from distml.errors import UserError

    config: str | None = None
    overrides: list[str] = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise UserError(
                f"unexpected argument {item!r}: give one CONFIG.yaml and key=value overrides"
            )
    return config, overrides


def _load(items: Sequence[str], extra: list[str] | None = None) -> Any:
    from distml.config import load_config

    path, overrides = _split_config_and_overrides(items)
    return load_config(path, [*overrides, *(extra or [])])


def _launch_spec(args: argparse.Namespace, default_nproc: int) -> Any:
    from distml.launch import LaunchSpec

    return LaunchSpec(
        nproc=args.nproc or default_nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master=args.master,
    )


def cmd_train(args: argparse.Namespace) -> int:
    from distml import api

    extra = []
    if args.resume is not None:
        extra.append(f"checkpoint.resume={args.resume}")
    if args.profile:
        extra.append("logging.profile=true")
    if args.no_progress:
        extra.append("logging.progress=false")
    cfg = _load(args.items, extra)
    spec = _launch_spec(args, cfg.parallel.nproc)
    summary = api.train(cfg, spec)
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from distml import api

    cfg = _load(args.items)
    out = api.predict(cfg, args.checkpoint, args.input, args.output, _launch_spec(args, 1))
    print(f"wrote {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distml import api

    cfg = _load(args.items)
    metrics = api.evaluate(cfg, args.checkpoint, args.split, _launch_spec(args, 1))
    if args.json:
        print(json.dumps(metrics))
    else:
        print(
            f"{args.split}: loss {metrics['loss']:.4f}  accuracy {metrics['accuracy']:.4f}  "
            f"({int(metrics['samples'])} samples)"
        )
        if "exact" in metrics:  # extractive QA: official-style SQuAD metrics
            print(
                f"{args.split}: exact match {metrics['exact']:.2f}  F1 {metrics['f1']:.2f}  "
                f"({int(metrics['total'])} questions)"
            )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from distml import api
    from distml.runtime.dist import pick_device

    cfg = _load(args.items)
    text = api.generate(
        args.checkpoint,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=str(pick_device(cfg.parallel.device)),
        cfg=cfg,
        spec=_launch_spec(args, 1),
    )
    print(text)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from distml import api

    result = api.quantize(args.checkpoint, args.bits, args.out, args.group_size, tuple(args.skip))
    ratio = result["checkpoint_bytes"] / max(1, result["bytes"])
    print(
        f"wrote {result['out']}: int{result['bits']} weights, {result['bytes']:,} bytes "
        f"({ratio:.1f}x smaller than the checkpoint, which also holds optimizer state)"
    )
    return 0


def cmd_fl_partition(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from distml.federated.api import partition_report

    cfg = _load(args.items)
    parts, hist = partition_report(cfg)
    table = Table(
        title=f"{cfg.federated.partition} partition of {cfg.data.name} "
        f"over {len(parts)} clients (label histograms)"
    )
    table.add_column("client", justify="right")
    table.add_column("samples", justify="right")
    for label in range(hist.shape[1]):
        table.add_column(str(label), justify="right")
    for client, (idx, row) in enumerate(zip(parts, hist, strict=True)):
        table.add_row(str(client), str(len(idx)), *(str(int(v)) for v in row))
    Console().print(table)
    return 0


def cmd_fl_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from distml.federated.api import run_simulation

    cfg = _load(args.items)
    console = Console(highlight=False)

    def show(record: object) -> None:
        r = record  # RoundRecord
        console.print(
            f"round {r.round:>4}  clients {len(r.clients):>4}  test acc {r.test_accuracy:.4f}  "  # type: ignore[attr-defined]
            f"loss {r.test_loss:.4f}  up {r.bytes_up:,} B  {r.seconds:.2f} s"  # type: ignore[attr-defined]
        )

    history = run_simulation(cfg, clients=args.clients, on_round=show, out=args.out)
    final = history.final_accuracy
    console.print(f"final test accuracy {final:.4f}" if final is not None else "done")
    return 0


def cmd_fl_server(args: argparse.Namespace) -> int:
    import logging

    from distml.federated.transport import run_server

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = _load(args.items)
    records = run_server(cfg, state_dir=args.state_dir, address=args.address)
    print(f"finished {len(records)} round(s)")
    return 0


def cmd_fl_client(args: argparse.Namespace) -> int:
    import logging

    from distml.federated.transport import run_client

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = run_client(
        args.server,
        data=args.data,
        token=args.token,
        name=args.name,
        root_cert=args.root_cert,
        max_steps=args.max_steps,
    )
    print(summary)
    return 0


#: `distml serve` flags that override the config's serve section when given.
SERVE_FLAGS = (
    "host",
    "port",
    "access_log",
    "replicas",
    "min_replicas",
    "max_replicas",
    "max_batch_size",
    "max_delay_ms",
    "wait_when_idle",
    "adaptive_batching",
    "target_p99_ms",
    "request_timeout_s",
    "device",
    "tp",
    "pp",
    "microbatches",
)


def serve_target(model: str, items: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """(model path, serve section as a dict) from a model file or a CONFIG.yaml plus overrides."""
    from distml.errors import UserError
    from distml.train.checkpoint import CheckpointManager

    is_config = model.endswith((".yaml", ".yml"))
    if items and not is_config:
        raise UserError(
            f"key=value overrides ({items[0]}) need a CONFIG.yaml; "
            "pass flags such as --replicas, or serve a config"
        )
    cfg = _load([model, *items] if is_config else [])
    section = cfg.serve.model_dump()
    path = section.pop("checkpoint")
    if not is_config:
        return model, section
    if path is None:
        latest = CheckpointManager(cfg.checkpoint.dir).latest()
        if latest is None:
            raise UserError(
                f"no checkpoint in {cfg.checkpoint.dir} to serve; train first "
                "(distml train CONFIG) or set serve.checkpoint=PATH"
            )
        path = str(latest)
    return path, section


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from distml.serve import serve_main

    model, settings = serve_target(args.model, args.items)
    for flag in SERVE_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            settings[flag] = value
    host, port = settings.pop("host"), settings.pop("port")
    access_log = settings.pop("access_log")
    settings["token"] = os.environ.get("DISTML_SERVE_TOKEN") or None
    if settings["min_replicas"] is None:
        del settings["min_replicas"]
    if settings["max_replicas"] is None:
        del settings["max_replicas"]
    serve_main(model, host, port, access_log=access_log, **settings)
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from distml.cluster.service import cli_api

    if args.cluster_command == "up":
        options = {"address": args.ray_address} if args.ray_address else {}
        info = cli_api.cluster_up(
            args.slots,
            args.port,
            policy=args.policy,
            state_dir=args.state_dir,
            executor=args.executor,
            executor_options=options,
        )
        print(
            f"cluster up: {info.get('url')} with {info.get('slots')} slot(s), "
            f"state in {info.get('state_dir')}"
        )
    elif args.cluster_command == "down":
        result = cli_api.cluster_down(state_dir=args.state_dir, force=args.force)
        print(f"cluster down: {result}")
    else:
        print(json.dumps(cli_api.cluster_status(state_dir=args.state_dir), indent=2, default=str))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from distml.cluster.service import cli_api

    job = cli_api.submit(args.job, args.gpus, args.priority, state_dir=args.state_dir)
    print(f"submitted job {job.get('id')} ({job.get('name')})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from distml.cluster.service import cli_api

    print(cli_api.format_jobs(cli_api.list_jobs(state_dir=args.state_dir)))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from distml.cluster.service import cli_api

    print(cli_api.job_logs(args.job, args.tail, state_dir=args.state_dir), end="")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from distml.cluster.service import cli_api

    print(json.dumps(cli_api.cancel_job(args.job, state_dir=args.state_dir), default=str))
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from distml.cluster import compare_policies, format_table

    policies = [p.strip() for p in (args.compare or args.policy).split(",") if p.strip()]
    summaries = compare_policies(
        args.trace,
        policies,
        args.gpus,
        args.gpus_per_node,
        offset=args.offset,
        limit=args.limit,
        cluster=args.cluster,
        plot_path=args.plot,
        gpu_util=args.gpu_util,
    )
    print(format_table(summaries))
    if args.plot:
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(summaries, fh, indent=2)
    return 0


def cmd_memory(args: argparse.Namespace) -> int:
    from rich.console import Console

    from distml import api
    from distml.memory.profiler import format_advice, format_report

    cfg = _load(args.items)
    report = api.memory_report(cfg, args.budget_mb)
    console = Console()
    console.print(format_report(report))
    console.print(format_advice(report))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy
    from pathlib import Path

    from distml.errors import UserError

    scripts = {
        "comm": "comm_bench.py",
        "comm-train": "comm_training.py",
        "ddp": "ddp_overhead.py",
        "sim": "cluster_sim.py",
        "fl": "fl_simulation.py",
        "serve": "serve_load.py",
    }
    root = Path(__file__).resolve().parents[3] / "benchmarks"
    script = root / scripts[args.which]
    if not script.is_file():
        raise UserError(f"benchmark {script} not found; run distml bench from a source checkout")
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(root))  # the scripts import their shared helpers (_common.py)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from distml import api

    facts = api.info()
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="distml info", show_header=False)
    for key, value in facts.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _load(args.items)
    print(cfg.to_yaml(), end="")
    return 0


def _hidden_debug(p: argparse.ArgumentParser) -> None:
    # Accept --debug after the subcommand too; SUPPRESS keeps the top-level value.
    p.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )


def _add_launch_args(p: argparse.ArgumentParser, nproc_help: str) -> None:
    p.add_argument("--nproc", type=int, default=None, help=nproc_help)
    p.add_argument(
        "--nnodes", default="1", help="number of nodes N, or MIN:MAX for elastic jobs (default 1)"
    )
    p.add_argument(
        "--node-rank", type=int, default=None, help="this node's rank in a multi-node job"
    )
    p.add_argument(
        "--master", default=None, help="ADDR:PORT of node rank 0's rendezvous (multi-node)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distml",
        description="distml: distributed training and serving on PyTorch. "
        "Every command takes an optional CONFIG.yaml plus key=value overrides of any config field.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model data-parallel on N workers",
        description="Launch workers with torch.distributed's elastic launcher and "
        "train CONFIG (default: digits CNN on 2 workers). Backend nccl with one GPU per "
        "worker when CUDA is present, else gloo on CPU.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    _add_launch_args(p, "workers per node (default: parallel.nproc of the config)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from the latest checkpoint in checkpoint.dir, or from PATH",
    )
    p.add_argument(
        "--profile", action="store_true", help="write a torch.profiler trace to the run dir"
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (epoch lines and the summary table stay)",
    )
    p.add_argument("--summary-json", default=None, help="also write the run summary as JSON here")
    _hidden_debug(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "predict",
        help="data-parallel inference with a checkpoint",
        description="Split the inputs across workers (no gradient sync), gather the "
        "outputs in input order into one file.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--checkpoint", required=True, help="a step_*.pt checkpoint or a quantized .safetensors"
    )
    p.add_argument(
        "--input", required=True, help=".npy or .csv of inputs, or split:test / split:train"
    )
    p.add_argument("--output", required=True, help="output file: .npy (logits), .csv or .jsonl")
    _add_launch_args(p, "workers (default 1)")
    _hidden_debug(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("eval", help="metrics of a checkpoint on a dataset split")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--checkpoint", required=True, help="a step_*.pt checkpoint or a quantized .safetensors"
    )
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    _add_launch_args(p, "workers (default 1)")
    _hidden_debug(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="sample text from a causal language-model checkpoint",
        description="Continue --prompt with the checkpoint's model, decoding with the "
        "tokenizer saved in the checkpoint. --temperature 0 decodes greedily. With --nproc N "
        "and parallel.tp=T / parallel.pp=P overrides the model runs tensor- and pipeline-"
        "parallel (parallel.pp_microbatches micro-batches) and prints the same text.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument(
        "--checkpoint", required=True, help="a step_*.pt file or step_*.dcp dir of a causal LM"
    )
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add (default 200)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 = greedy; >1 flatter (default 1)"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    _add_launch_args(p, "workers (default 1); with parallel.tp/pp > 1 the model is split")
    _hidden_debug(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "quantize",
        help="int8/int4 weight quantization of a checkpoint",
        description="Post-training weight quantization of linear and embedding layers: int8 "
        "per-channel symmetric or int4 group-wise. `distml predict` and `distml eval` "
        "load the output directly.",
    )
    p.add_argument("checkpoint", help="a step_*.pt training checkpoint")
    p.add_argument("--bits", type=int, required=True, choices=(8, 4), help="8 or 4")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--skip", action="append", default=[], help="module name/glob to keep float")
    _hidden_debug(p)
    p.set_defaults(func=cmd_quantize)

    fl = sub.add_parser("fl", help="federated learning: partition, simulate, server, client")
    fl_sub = fl.add_subparsers(dest="fl_command", metavar="FL_COMMAND", required=True)
    p = fl_sub.add_parser(
        "partition",
        help="print per-client label histograms of a partition",
        description="Partition the config's dataset over federated.clients "
        "clients (iid, dirichlet, shards; seeded) and print label histograms.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    _hidden_debug(p)
    p.set_defaults(func=cmd_fl_partition)
    p = fl_sub.add_parser(
        "simulate",
        help="simulate many federated clients on this machine",
        description="Run federated.rounds rounds with virtual clients; the "
        "sampled clients of a round train together (torch.func vmap).",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--clients", type=int, default=None, help="number of clients (default: config)")
    p.add_argument("--out", default=None, help="write per-round metrics as JSON here")
    _hidden_debug(p)
    p.set_defaults(func=cmd_fl_simulate)
    p = fl_sub.add_parser(
        "server",
        help="run a federated gRPC server (127.0.0.1 by default)",
        description="Serve federated rounds over gRPC: TLS and per-client tokens when "
        "configured (federated.tls_cert/tls_key, federated.tokens), chunked model transfer, "
        "SQLite state so a restarted server resumes at the last completed round; "
        "secure aggregation with federated.secagg_threshold, DP-FedAvg with "
        "federated.dp_clip/dp_noise (epsilon and delta in every round's metrics).",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--address", default=None, help="HOST:PORT (default federated.address)")
    p.add_argument("--state-dir", default=None, help="state directory (default RUN_DIR/federated)")
    _hidden_debug(p)
    p.set_defaults(func=cmd_fl_server)
    p = fl_sub.add_parser(
        "client",
        help="join a federated server and train on local data",
        description="Train locally on --data and send only model updates (never raw data). "
        "The token can also come from DISTML_FL_TOKEN.",
    )
    p.add_argument("--server", required=True, help="HOST:PORT of the federated server")
    p.add_argument("--data", required=True, help="PATH.npz (x, y) or a shard spec like digits:0/2")
    p.add_argument("--token", default=None, help="bearer token (default: $DISTML_FL_TOKEN)")
    p.add_argument("--name", default=None, help="client name (default: host-pid)")
    p.add_argument("--root-cert", default=None, help="PEM root certificate for TLS")
    p.add_argument("--max-steps", type=int, default=None, help="local step budget per round")
    _hidden_debug(p)
    p.set_defaults(func=cmd_fl_client)

    p = sub.add_parser(
        "sim",
        help="replay a cluster job trace through scheduling policies",
        description="Trace-driven cluster simulation (Philly CSV format: "
        "timestamp,duration,num_gpus,...) with suspend/resume, migration, "
        "split-job slowdown and packing interference.",
    )
    p.add_argument("trace", help="CSV trace (e.g. ../shared/data/philly_jobs.csv)")
    p.add_argument("--policy", default="fifo", help="fifo, las or gandiva (default fifo)")
    p.add_argument("--compare", default=None, help="comma-separated policies to compare")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--offset", type=int, default=0, help="skip this many jobs of the trace")
    p.add_argument("--limit", type=int, default=None, help="replay at most this many jobs")
    p.add_argument("--cluster", default=None, help="only jobs of this virtual cluster")
    p.add_argument("--plot", default=None, help="write a JCT CDF plot (PNG) here")
    p.add_argument("--json", default=None, help="write the summaries as JSON here")
    p.add_argument(
        "--gpu-util", type=float, default=1.0, help="mean per-job GPU utilization (default 1.0)"
    )
    _hidden_debug(p)
    p.set_defaults(func=cmd_sim)

    p = sub.add_parser(
        "bench",
        help="run a benchmark from benchmarks/ (source checkout)",
        description="comm: all-reduce algorithms on an emulated slow network "
        "(root); comm-train: compression, hierarchical all-reduce and parameter servers "
        "training on an emulated network (root, --part); ddp: distml's step vs "
        "hand-written DDP; sim: scheduling policies "
        "on the Philly trace; fl: federated simulation vs a plain loop; serve: HTTP load "
        "test of batch-1 vs dynamic batching vs 2 replicas. Extra "
        "arguments go to the benchmark (e.g. --quick).",
    )
    p.add_argument("which", choices=("comm", "comm-train", "ddp", "sim", "fl", "serve"))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "serve",
        help="HTTP inference server with dynamic batching and replicas",
        description="Serve a checkpoint (.pt), a quantized model (.safetensors) or the model "
        "of a CONFIG.yaml (settings from its serve: section; flags override them): POST "
        "/v1/predict (JSON or application/x-distml-tensor), POST /v1/generate (gpt, streamed), "
        "GET /health, GET /metrics (Prometheus). Binds 127.0.0.1 by default; set "
        "DISTML_SERVE_TOKEN to require a bearer token.",
    )
    p.add_argument(
        "model",
        help="step_*.pt checkpoint, distml quantize .safetensors, or CONFIG.yaml (its serve: "
        "section; the model is serve.checkpoint or the latest checkpoint in checkpoint.dir)",
    )
    p.add_argument("items", nargs="*", metavar="key=value", help="config overrides (with a CONFIG)")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument(
        "--replicas", type=int, default=None, help="model replica processes (0: in-process)"
    )
    p.add_argument("--min-replicas", type=int, default=None, help="autoscaling lower bound")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscaling upper bound")
    p.add_argument("--max-batch-size", type=int, default=None, help="largest batch (default 32)")
    p.add_argument(
        "--access-log",
        action="store_const",
        const=True,
        default=None,
        help="log one line per request (default off: it costs throughput)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=None,
        help="how long a request waits for company while a batch runs (default 5)",
    )
    p.add_argument(
        "--wait-when-idle",
        action="store_const",
        const=True,
        default=None,
        help="also wait --max-delay-ms when no batch is running (default: run at once)",
    )
    p.add_argument(
        "--adaptive-batching",
        action="store_const",
        const=True,
        default=None,
        help="AIMD batch cap for p99",
    )
    p.add_argument("--target-p99-ms", type=float, default=None, help="adaptive p99 target (50)")
    p.add_argument("--request-timeout-s", type=float, default=None, help="per-request timeout")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="replica device")
    p.add_argument(
        "--tp", type=int, default=None, help="tensor-parallel processes per replica (gpt, bert)"
    )
    p.add_argument("--pp", type=int, default=None, help="pipeline stages per replica (gpt)")
    p.add_argument(
        "--microbatches", type=int, default=None, help="micro-batches per pipelined forward (2)"
    )
    _hidden_debug(p)
    p.set_defaults(func=cmd_serve)

    state_help = "cluster state directory (default $DISTML_CLUSTER_DIR or ~/.distml/cluster)"
    cl = sub.add_parser(
        "cluster",
        help="start/stop the job scheduler service (fifo, las, gandiva)",
        description="A scheduler on 127.0.0.1 with token auth and SQLite state that runs "
        "`distml train` jobs on slots, time-slices, packs, migrates and resizes them through "
        "checkpoint-and-resume.",
    )
    cl.add_argument("cluster_command", choices=("up", "down", "status"))
    cl.add_argument("--slots", type=int, default=None, help="slots (default: GPUs, else cores)")
    cl.add_argument("--port", type=int, default=8470, help="API port (default 8470)")
    cl.add_argument("--policy", default="gandiva", help="fifo, las or gandiva (default gandiva)")
    cl.add_argument("--executor", default="local", choices=("local", "ray"), help="up: executor")
    cl.add_argument("--ray-address", default=None, help="up: Ray cluster (default: a running one)")
    cl.add_argument("--force", action="store_true", help="down: kill an unresponsive service")
    cl.add_argument("--state-dir", default=None, help=state_help)
    cl.set_defaults(func=cmd_cluster)
    p = sub.add_parser("submit", help="submit a job spec (YAML) to the cluster")
    p.add_argument("job", help="job spec: name, config, overrides, slots, priority, elastic")
    p.add_argument("--gpus", type=int, default=None, help="slots for the job")
    p.add_argument("--priority", type=int, default=None, help="higher runs first")
    p.add_argument("--state-dir", default=None, help=state_help)
    p.set_defaults(func=cmd_submit)
    p = sub.add_parser("jobs", help="list cluster jobs")
    p.add_argument("--state-dir", default=None, help=state_help)
    p.set_defaults(func=cmd_jobs)
    p = sub.add_parser("logs", help="show a job's log")
    p.add_argument("job", help="job id or name")
    p.add_argument("--tail", type=int, default=200, help="last N lines (default 200)")
    p.add_argument("--state-dir", default=None, help=state_help)
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job", help="job id or name")
    p.add_argument("--state-dir", default=None, help=state_help)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser(
        "memory",
        help="per-layer memory of a training step, with advice",
        description="Parameter, gradient, optimizer-state and activation bytes per layer for "
        "one worker's micro-batch; predicted vs measured peak (CPU: allocator events from "
        "torch.profiler; CUDA: max_memory_allocated); which recompute, precision and "
        "quantization settings fit --budget-mb.",
    )
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--budget-mb", type=float, default=None, help="memory budget per worker (MB)")
    _hidden_debug(p)
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("info", help="torch version, backends, devices, cores")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="print the resolved config (default or CONFIG + overrides)")
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`train --nproc 2 optimizer.lr=0.1`): collect the
    # leftover key=value words into the command's items instead of rejecting them.
    args, leftover = parser.parse_known_args(argv)
    stray = [word for word in leftover if word.startswith("-") or not hasattr(args, "items")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if leftover:
        args.items = [*args.items, *leftover]
    if args.command is None:
        parser.print_help()
        return 2
    func: Callable[[argparse.Namespace], int] = args.func
    if args.debug:
        import os

        os.environ["DISTML_DEBUG"] = "1"
    from distml.errors import DistmlError, JobStopped, UserError, WorkerFailure

    try:
        return func(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"distml: error: {exc}", file=sys.stderr)
        return 2
    except JobStopped as exc:
        print(f"distml: {exc}", file=sys.stderr)
        return 0
    except WorkerFailure as exc:
        if args.debug:
            raise
        print(f"distml: {exc}", file=sys.stderr)
        return 1
    except DistmlError as exc:
        if args.debug:
            raise
        print(f"distml: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distml: interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
