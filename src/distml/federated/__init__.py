"""Federated learning core: parameters, strategies, secure aggregation, privacy, partitioning,
simulation.

Everything here is transport-independent: a gRPC server and client carry the
same :class:`~distml.federated.strategies.FitResult` and secure-aggregation
messages that the single-process simulation passes around in memory.
"""

from distml.federated.parameters import (
    Parameters,
    get_parameters,
    parameter_names,
    parameters_from_bytes,
    parameters_to_bytes,
    set_parameters,
)
from distml.federated.partition import label_histograms, partition
from distml.federated.privacy import DifferentialPrivacy, RDPAccountant
from distml.federated.secagg import SecAggClient, SecAggServer, secure_sum
from distml.federated.simulation import History, RoundRecord, simulate
from distml.federated.strategies import (
    EvaluateResult,
    FitResult,
    Strategy,
    build_strategy,
    strategy_names,
)

__all__ = [
    "DifferentialPrivacy",
    "EvaluateResult",
    "FitResult",
    "History",
    "Parameters",
    "RDPAccountant",
    "RoundRecord",
    "SecAggClient",
    "SecAggServer",
    "Strategy",
    "build_strategy",
    "get_parameters",
    "label_histograms",
    "parameter_names",
    "parameters_from_bytes",
    "parameters_to_bytes",
    "partition",
    "secure_sum",
    "set_parameters",
    "simulate",
    "strategy_names",
]
