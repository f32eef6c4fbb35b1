"""Federated aggregation strategies, one file each, behind the :class:`Strategy` interface.

Use :func:`build_strategy` with a registry name (``fedavg``, ``fedprox``,
``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``, ``fedmedian``,
``trimmed_mean``, ``krum``, ``multikrum``, ``scaffold``) and options from a config.
"""

from distml.federated.strategies.base import (
    EvaluateResult,
    FitResult,
    Strategy,
    sample_clients,
    weighted_mean,
    weighted_metrics,
)
from distml.federated.strategies.fedadagrad import FedAdagrad
from distml.federated.strategies.fedadam import FedAdam
from distml.federated.strategies.fedavg import FedAvg
from distml.federated.strategies.fedavgm import FedAvgM
from distml.federated.strategies.fedmedian import FedMedian
from distml.federated.strategies.fedopt import FedOpt
from distml.federated.strategies.fedprox import FedProx, proximal_term
from distml.federated.strategies.fedyogi import FedYogi
from distml.federated.strategies.krum import Krum, MultiKrum, krum_scores
from distml.federated.strategies.registry import (
    STRATEGIES,
    build_strategy,
    strategy_names,
    strategy_options,
)
from distml.federated.strategies.scaffold import Scaffold
from distml.federated.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "STRATEGIES",
    "EvaluateResult",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "FitResult",
    "Krum",
    "MultiKrum",
    "Scaffold",
    "Strategy",
    "TrimmedMean",
    "build_strategy",
    "krum_scores",
    "proximal_term",
    "sample_clients",
    "strategy_names",
    "strategy_options",
    "weighted_mean",
    "weighted_metrics",
]
