"""Strategy names to classes, and :func:`build_strategy` that validates options.

Options are the keyword-only constructor arguments of a strategy and of its
bases (the ``**base`` chain), so the signature is the single source of truth:
an unknown name or option, or a value of the wrong type, is a one-line
:class:`ConfigError` listing the valid choices.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import pydantic

from distml.errors import ConfigError
from distml.federated.strategies.base import Strategy
from distml.federated.strategies.fedadagrad import FedAdagrad
from distml.federated.strategies.fedadam import FedAdam
from distml.federated.strategies.fedavg import FedAvg
from distml.federated.strategies.fedavgm import FedAvgM
from distml.federated.strategies.fedmedian import FedMedian
from distml.federated.strategies.fedprox import FedProx
from distml.federated.strategies.fedyogi import FedYogi
from distml.federated.strategies.krum import Krum, MultiKrum
from distml.federated.strategies.scaffold import Scaffold
from distml.federated.strategies.trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedMedian,
        TrimmedMean,
        Krum,
        MultiKrum,
        Scaffold,
    )
}


def strategy_names() -> list[str]:
    return sorted(STRATEGIES)


def strategy_options(cls: type[Strategy]) -> dict[str, Any]:
    """Option name -> type annotation, following ``**base`` up the class hierarchy."""
    options: dict[str, Any] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        init = vars(klass)["__init__"]
        hints = typing.get_type_hints(init)
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                options.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return options


def build_strategy(name: str, **options: Any) -> Strategy:
    """A strategy by registry name with validated options: ``build_strategy("fedprox", mu=0.1)``."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown federated strategy {name!r}; choose one of: {', '.join(strategy_names())}"
        )
    valid = strategy_options(cls)
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in valid:
            raise ConfigError(
                f"unknown option {key!r} for strategy {name!r}; valid options: "
                f"{', '.join(sorted(valid))}"
            )
        try:
            checked[key] = pydantic.TypeAdapter(valid[key]).validate_python(value, strict=True)
        except pydantic.ValidationError:
            raise ConfigError(
                f"strategy {name!r} option {key} must be {_type_name(valid[key])}, got {value!r}"
            ) from None
    return cls(**checked)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
