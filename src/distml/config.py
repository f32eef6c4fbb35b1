"""The one validated config schema of distml, with YAML loading and overrides.

A config has the sections model, data, optimizer, schedule, parallel,
checkpoint and logging; every field has a default, so an empty
file is a valid config (the embedded digits-CNN demo). Unknown keys and wrong
types are rejected with the offending dotted key named. ``key=value``
overrides (values parsed as YAML) apply to any field before validation.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from distml.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name: str = "cnn"
    #: Keyword arguments of the model's config dataclass (validated by the model registry).
    args: dict[str, Any] = Field(default_factory=dict)


class DataSection(_Section):
    name: str = "digits"
    #: File or directory for datasets read from disk (text, mnist, cifar10).
    path: str | None = None
    #: The user-facing batch knob: samples per optimizer step across all workers.
    global_batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(256, gt=0)
    #: Fraction held out as the test split for datasets without one (digits, synthetic, text).
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    shuffle: bool = True
    #: Synthetic datasets: number of samples, features, classes, image size and channels.
    num_samples: int = Field(4096, gt=0)
    num_features: int = Field(64, gt=0)
    num_classes: int = Field(10, gt=1)
    image_size: int = Field(32, gt=0)
    channels: int = Field(3, gt=0)
    #: Text datasets: tokens per sample, tokenizer and objective (auto follows the model).
    seq_len: int = Field(128, gt=1)
    tokenizer: Literal["char", "byte"] = "char"
    objective: Literal["auto", "causal", "masked"] = "auto"
    mask_prob: float = Field(0.15, gt=0.0, lt=1.0)
    #: squad (extractive QA; seq_len is the window length): a dev file for the test split
    #: (unset: test_fraction of the questions in path), a local Hugging Face tokenizer folder
    #: (unset: built-in word tokenizer), tokens between window starts, the longest answer in
    #: tokens, and how much the null score may exceed the best span before "no answer".
    eval_path: str | None = None
    tokenizer_path: str | None = None
    doc_stride: int = Field(64, gt=0)
    max_answer_tokens: int = Field(30, gt=0)
    null_threshold: float = 0.0
    #: Load the next batch in a background thread while the current step runs.
    prefetch: bool = False


class OptimizerSection(_Section):
    name: Literal["sgd", "adamw", "adamw8bit", "lars", "lamb"] = "sgd"
    lr: float = Field(0.05, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0.0)
    #: LARS trust coefficient (eta in You et al. 2017).
    trust_coefficient: float = Field(0.001, gt=0.0)
    #: LARS/LAMB: leave 1-D parameters (biases, norms) out of adaptation and weight decay.
    exclude_1d: bool = True


class ScheduleSection(_Section):
    epochs: int = Field(10, gt=0)
    #: Stop after this many optimizer steps (across epochs); null runs all epochs.
    max_steps: int | None = Field(None, gt=0)
    #: Micro-batches per optimizer step; gradients sync only on the last one.
    accumulation_steps: int = Field(1, gt=0)
    warmup_steps: int = Field(0, ge=0)
    #: Scale the LR with the global batch relative to reference_batch_size (Goyal et al. 2017).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: int | None = Field(None, gt=0)
    decay: Literal["constant", "cosine", "linear"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    #: Autocast dtype; the weights stay fp32. fp16 adds dynamic loss scaling (not with ps).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    #: fp16: initial dynamic loss scale (halved on overflow, doubled after 2000 clean steps).
    loss_scale_init: float = Field(65536.0, gt=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    eval_every_epochs: int = Field(1, ge=0)


class ParallelSection(_Section):
    strategy: Literal["ddp", "ps"] = "ddp"
    nproc: int = Field(2, gt=0)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bucket_cap_mb: float = Field(25.0, gt=0.0)
    find_unused_parameters: bool = False
    gradient_as_bucket_view: bool = True
    #: Per-worker intra-op threads; 0 leaves torch's default (cores / workers).
    threads_per_worker: int = Field(0, ge=0)
    #: Gradient compression DDP hook: none | fp16 | bf16 | int8 | topk | powersgd.
    compression: str = "none"
    #: Options of the compression hook (e.g. {fraction: 0.01} for topk, {rank: 4} for powersgd).
    compression_options: dict[str, Any] = Field(default_factory=dict)
    #: All-reduce used by DDP: the backend's builtin, or distml's ring |
    #: halving_doubling | tree | hierarchical over point-to-point.
    allreduce_algorithm: str = "builtin"
    #: Parameter server (strategy ps): ranks 0..workers-1 train, the last `servers` ranks
    #: hold the parameter shards; world size must be servers + workers.
    servers: int = 1
    workers: int = 1
    #: ps: sync (bulk-synchronous, equals DDP) | async | ssp (bounded by `staleness` steps).
    consistency: Literal["sync", "async", "ssp"] = "sync"
    staleness: int = 1
    #: ps: codec of pushes and pulls: none | fp16 | bf16 | int8 | topk.
    ps_codec: str = "none"
    #: Model parallelism (docs/model_parallel.md): world = dp x pp x tp. pp > 1 or tp > 1
    #: trains with the mesh strategy; dp defaults to world / (pp x tp).
    dp: int | None = Field(None, gt=0)
    pp: int = Field(1, gt=0)
    tp: int = Field(1, gt=0)
    #: Megatron sequence parallelism with tp > 1 (gpt/bert, pp=1; seq_len divisible by tp).
    sequence_parallel: bool = False
    #: Pipeline schedule: gpipe | 1f1b | interleaved-1f1b (checked with one-line errors).
    pp_schedule: str = "1f1b"
    #: Micro-batches per step and replica (default: pp).
    pp_microbatches: int | None = Field(None, gt=0)
    #: Stages per pipeline rank (interleaved-1f1b needs >= 2).
    pp_virtual_stages: int = Field(1, gt=0)
    #: Stage balance: params (parameter count) | time (measured block time).
    pp_balance: str = "params"
    #: First block of every stage but the first, e.g. [2] or ["blocks.2"]; overrides pp_balance.
    pp_split_points: list[int | str] | None = None


class CheckpointSection(_Section):
    #: Directory for checkpoints; default RUN_DIR/checkpoints.
    dir: str | None = None
    #: Save every N optimizer steps (0: only at epoch end).
    every_steps: int = Field(0, ge=0)
    keep_last: int = Field(3, gt=0)
    #: Resume from the latest checkpoint in dir (or this file path).
    resume: bool | str = False


class LoggingSection(_Section):
    run_dir: str = "runs/default"
    progress: bool = True
    metrics_file: str = "metrics.jsonl"
    profile: bool = False
    profile_steps: int = Field(3, gt=0)


class MemorySection(_Section):
    """Recomputation (activation checkpointing) of the model's blocks; optimizer offload."""

    recompute: Literal["none", "full", "every_k", "selective", "auto"] = "none"
    #: every_k: checkpoint blocks 0, k, 2k, ...
    every_k: int = Field(2, gt=0)
    #: selective: submodule names inside each block to checkpoint (e.g. attn, mlp).
    recompute_modules: list[str] = Field(default_factory=lambda: ["attn", "mlp"])
    #: auto: activation-memory budget (MB of tensors saved for backward).
    budget_mb: float | None = Field(None, gt=0.0)
    #: Keep fp32 master weights and optimizer state in CPU memory and step there.
    offload_optimizer: bool = False


class FederatedSection(_Section):
    """Federated learning: strategy, simulation, deployment, round protocol, edge settings.

    ``distml fl simulate`` uses the strategy, clients, partition, local training
    and privacy fields; ``distml fl server`` / ``client`` the deployment ones.
    """

    #: Aggregation strategy by registry name and its options (see ``distml.federated``).
    strategy: str = "fedavg"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    rounds: int = Field(10, ge=1)
    #: Simulation: number of virtual clients and clients sampled per round.
    clients: int = Field(10, gt=0)
    clients_per_round: int = Field(5, gt=0)
    #: Simulation: how the training split is divided among clients.
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    #: Dirichlet concentration (smaller: more skewed label mixes per client).
    alpha: float = Field(0.5, gt=0.0)
    classes_per_client: int = Field(2, gt=0)
    #: Simulation engine: vmap trains the sampled clients together; sequential is the reference.
    simulation: Literal["vmap", "sequential"] = "vmap"
    #: Simulation and server: client-level DP-FedAvg clip norm and noise multiplier (0
    #: disables); the server reports (epsilon, delta) in every round's metrics.
    dp_clip: float = Field(0.0, ge=0.0)
    dp_noise: float = Field(0.0, ge=0.0)
    dp_mode: Literal["central", "local"] = "central"
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)
    #: Simulation and server: secure aggregation with this Shamir threshold (0 disables).
    secagg_threshold: int = Field(0, ge=0)
    #: Server: deadline of each secure-aggregation step after the key advertisement
    #: (which shares the round deadline with local training).
    secagg_timeout_s: float = Field(10.0, gt=0.0)
    #: host:port the gRPC server binds; loopback unless deliberately opened.
    address: str = "127.0.0.1:8080"
    #: SQLite state, checkpoints and metrics.jsonl; default RUN_DIR/federated.
    state_dir: str | None = None
    #: PEM certificate chain and private key: both for TLS, neither for plaintext.
    tls_cert: str | None = None
    tls_key: str | None = Field(None, validate_default=True)
    #: Client name -> bearer token. With any token set, every call must carry one.
    tokens: dict[str, str] = Field(default_factory=dict, repr=False)
    #: YAML/JSON file holding the same mapping, to keep secrets out of the config.
    tokens_file: str | None = None
    #: Local training sent to clients each round. ``lr`` yields to a strategy's own
    #: client learning rate (FedOpt's ``eta_l``).
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0.0)
    #: Per-client compute budget: at most this many local SGD steps per round.
    max_local_steps: int | None = Field(None, ge=1)
    #: A round's fit (and evaluate) phase ends at this deadline with whoever answered.
    round_timeout_s: float = Field(60.0, gt=0.0)
    #: A fit phase with fewer answers than the strategy's min_fit_clients is retried.
    max_round_retries: int = Field(3, ge=0)
    #: Give up when the strategy's minimum of clients is not connected within this time.
    client_wait_timeout_s: float = Field(600.0, gt=0.0)
    #: Client-side evaluation every N rounds (0: never); centralised evaluation on the
    #: server's test split after every round when server_evaluate is on.
    evaluate_every: int = Field(1, ge=0)
    server_evaluate: bool = True
    #: Update compression before upload, with error feedback kept on each client.
    upload_codec: Literal["none", "fp16", "int8", "topk"] = "none"
    topk_fraction: float = Field(0.01, gt=0.0, le=1.0)
    error_feedback: bool = True
    #: Quantization of the global model sent to clients.
    download_codec: Literal["none", "fp16", "int8"] = "none"
    #: Payloads travel in chunks of this size; no gRPC message may exceed max_message_mb.
    chunk_size_kb: int = Field(1024, ge=1)
    max_message_mb: float = Field(16.0, gt=0.0, validate_default=True)
    #: Largest accepted update upload; default twice the float32 model plus 1 MiB.
    max_upload_mb: float | None = Field(None, gt=0.0)
    #: Long-poll length of GetTask; a client silent for client_timeout_s is not sampled.
    poll_timeout_s: float = Field(10.0, gt=0.0)
    client_timeout_s: float = Field(30.0, gt=0.0, validate_default=True)
    #: gRPC handler threads: every connected client holds one while it long-polls.
    max_workers: int = Field(64, ge=2)
    #: Checkpoints of completed rounds to keep (None: every round).
    keep_checkpoints: int | None = Field(None, ge=1)

    # Field-level checks: a failing value is echoed alone, never the section with its tokens.
    @field_validator("address")
    @classmethod
    def _check_address(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("federated.address must be HOST:PORT")
        return value

    @field_validator("tls_key")
    @classmethod
    def _check_tls_pair(cls, value: str | None, info: ValidationInfo) -> str | None:
        if (info.data.get("tls_cert") is None) != (value is None):
            raise ValueError("set both federated.tls_cert and federated.tls_key, or neither")
        return value

    @field_validator("max_message_mb")
    @classmethod
    def _check_message_size(cls, value: float, info: ValidationInfo) -> float:
        chunk = info.data.get("chunk_size_kb")
        if chunk is not None and chunk * 1024 + 4096 > value * 2**20:
            raise ValueError("federated.chunk_size_kb must leave room under max_message_mb")
        return value

    @field_validator("client_timeout_s")
    @classmethod
    def _check_timeouts(cls, value: float, info: ValidationInfo) -> float:
        poll = info.data.get("poll_timeout_s")
        if poll is not None and poll >= value:
            raise ValueError("federated.poll_timeout_s must be below client_timeout_s")
        return value

    @property
    def chunk_size(self) -> int:
        return self.chunk_size_kb * 1024

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 2**20)


class ServeSection(_Section):
    """`distml serve CONFIG.yaml`: what to serve and how (CLI flags override these)."""

    #: Checkpoint (.pt), sharded checkpoint dir or quantized .safetensors; default: the
    #: latest checkpoint in checkpoint.dir.
    checkpoint: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    #: uvicorn's one log line per request; off by default (it costs throughput).
    access_log: bool = False
    replicas: int = Field(1, ge=0)
    #: Autoscaling bounds (both unset: a fixed number of replicas).
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    max_batch_size: int = Field(32, ge=1)
    max_delay_ms: float = Field(5.0, ge=0.0)
    wait_when_idle: bool = False
    adaptive_batching: bool = False
    target_p99_ms: float = Field(50.0, gt=0.0)
    request_timeout_s: float = Field(30.0, gt=0.0)
    device: Literal["cpu", "cuda"] = "cpu"
    #: Model parallelism inside each replica.
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    microbatches: int = Field(2, ge=1)


class Config(_Section):
    name: str = "digits-cnn"
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optimizer: OptimizerSection = Field(default_factory=OptimizerSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    federated: FederatedSection = Field(default_factory=FederatedSection)
    memory: MemorySection = Field(default_factory=MemorySection)
    serve: ServeSection = Field(default_factory=ServeSection)

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.checkpoint.dir is None:
            self.checkpoint.dir = os.path.join(self.logging.run_dir, "checkpoints")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _format_validation_error(exc: pydantic.ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{loc}' in {source}; check the spelling (see `distml config`)"
    got = err.get("input")
    return f"invalid config value for '{loc}' in {source}: {err['msg']} (got {got!r})"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn ``["optimizer.lr=0.1", ...]`` into a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.strip() != key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. optimizer.lr=0.1)"
            )
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}; pass an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections, not {type(data).__name__}"
        )
    return data


def default_config_dict() -> dict[str, Any]:
    """The embedded default (digits CNN on 2 workers) as a plain dict."""
    text = resources.files("distml").joinpath("configs/default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def build_config(
    data: Mapping[str, Any] | None = None,
    overrides: Iterable[str] = (),
    source: str = "config",
) -> Config:
    """Validate a config dict (plus overrides) into a :class:`Config`."""
    merged = _deep_merge(dict(data or {}), parse_overrides(overrides))
    try:
        return Config.model_validate(merged)
    except pydantic.ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()
) -> Config:
    """Load a YAML config (or the embedded default when ``path`` is None) with overrides."""
    if path is None:
        return build_config(default_config_dict(), overrides, source="the default config")
    return build_config(read_yaml(path), overrides, source=str(path))
