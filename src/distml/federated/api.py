"""Config-driven entry points of federated learning: partition and simulate.

These connect the transport-independent core (strategies, partitioners,
privacy, simulation) to distml's config, datasets and models, so that
``distml fl partition`` and ``distml fl simulate`` are a few lines each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distml.config import Config, FederatedSection
from distml.data import build_datasets
from distml.errors import ConfigError
from distml.federated.partition import label_histograms, partition
from distml.federated.privacy import DifferentialPrivacy
from distml.federated.simulation import History, RoundRecord, simulate
from distml.federated.strategies import Strategy, build_strategy
from distml.models import get_model_spec, make_model_config


def _train_tensors(cfg: Config) -> tuple[Any, Any, Any]:
    spec = get_model_spec(cfg.model.name)
    if spec.task != "classification":
        raise ConfigError(
            f"federated simulation supports classification models; model {cfg.model.name!r} "
            f"is {spec.task}"
        )
    bundle = build_datasets(cfg.data, cfg.seed, spec.task)
    train = (bundle.train.inputs, bundle.train.targets)
    test = (bundle.test.inputs, bundle.test.targets)
    return bundle, train, test


def client_partitions(cfg: Config, labels: torch.Tensor) -> list[np.ndarray]:
    fed = cfg.federated
    options: dict[str, Any] = {}
    if fed.partition == "dirichlet":
        options["alpha"] = fed.alpha
    if fed.partition == "shards":
        options["classes_per_client"] = fed.classes_per_client
    return list(
        partition(
            fed.partition,
            num_clients=fed.clients,
            labels=labels.numpy(),
            num_samples=len(labels),
            seed=cfg.seed,
            **options,
        )
    )


def partition_report(cfg: Config) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-client index arrays and their (clients x classes) label histograms."""
    _, train, _ = _train_tensors(cfg)
    parts = client_partitions(cfg, train[1])
    return parts, label_histograms(train[1].numpy(), parts)


def build_fl_strategy(cfg: Config) -> Any:
    return strategy_from_settings(cfg.federated)


def strategy_from_settings(fed: FederatedSection, seed: int = 0) -> Strategy:
    """The configured strategy, wrapped in DP-FedAvg when ``dp_clip``/``dp_noise`` are set.

    ``seed`` seeds the server's DP noise; a deployment passes a random one.
    """
    strategy = build_strategy(fed.strategy, **fed.strategy_options)
    if fed.dp_noise > 0 or fed.dp_clip > 0:
        if fed.dp_clip <= 0:
            raise ConfigError("federated.dp_noise needs federated.dp_clip > 0 (the clipping norm)")
        strategy = DifferentialPrivacy(
            strategy,
            clip_norm=fed.dp_clip,
            noise_multiplier=fed.dp_noise,
            mode=fed.dp_mode,
            delta=fed.dp_delta,
            seed=seed,
        )
    return strategy


def run_simulation(
    cfg: Config, clients: int | None = None, on_round: Any = None, out: str | None = None
) -> History:
    """Simulate ``federated.clients`` (or ``clients``) virtual clients on this machine."""
    if clients is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.federated.clients = clients
    fed = cfg.federated
    if fed.clients_per_round > fed.clients:
        raise ConfigError(
            f"federated.clients_per_round={fed.clients_per_round} exceeds federated.clients="
            f"{fed.clients}; lower it"
        )
    bundle, train, test = _train_tensors(cfg)
    parts = client_partitions(cfg, train[1])
    model_cfg = make_model_config(cfg.model.name, cfg.model.args, bundle.info.model_defaults())
    build = get_model_spec(cfg.model.name).build

    def model_fn() -> nn.Module:
        torch.manual_seed(cfg.seed)
        return build(model_cfg)

    history = simulate(
        model_fn,
        train,
        parts,
        build_fl_strategy(cfg),
        rounds=fed.rounds,
        clients_per_round=fed.clients_per_round,
        local_epochs=fed.local_epochs,
        batch_size=fed.batch_size,
        lr=fed.lr,
        seed=cfg.seed,
        mode=fed.simulation,
        test=test,
        on_round=on_round,
        secure_aggregation=fed.secagg_threshold or None,
    )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(history.to_dict(), indent=1))
    return history


__all__ = [
    "RoundRecord",
    "build_fl_strategy",
    "partition_report",
    "run_simulation",
    "strategy_from_settings",
]
