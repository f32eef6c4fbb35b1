"""Scheduling policies by name: ``build_policy("las", thresholds=[3600])``.

One file per policy, all with the :class:`~distml.cluster.policies.base.Policy`
interface, so the simulator and the live scheduler service pick them by the
same name from config or the command line.
"""

from __future__ import annotations

import inspect
from typing import Any

from distml.cluster.policies.base import Policy
from distml.cluster.policies.fifo import FifoPolicy
from distml.cluster.policies.gandiva import GandivaPolicy
from distml.cluster.policies.las import LasPolicy
from distml.errors import ConfigError

POLICIES: dict[str, type[Policy]] = {
    FifoPolicy.name: FifoPolicy,
    LasPolicy.name: LasPolicy,
    GandivaPolicy.name: GandivaPolicy,
}


def available_policies() -> list[str]:
    return sorted(POLICIES)


def policy_options(name: str) -> list[str]:
    """Option names that :func:`build_policy` accepts for ``name``."""
    return list(inspect.signature(_lookup(name).__init__).parameters)[1:]


def build_policy(name: str, **options: Any) -> Policy:
    """A fresh policy instance; raises ConfigError for unknown names or options."""
    cls = _lookup(name)
    valid = policy_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ConfigError(
            f"policy '{name}' has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {listed}"
        )
    return cls(**options)


def _lookup(name: str) -> type[Policy]:
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown scheduling policy '{name}'; choose one of {', '.join(available_policies())}"
        )
    return cls


__all__ = [
    "POLICIES",
    "FifoPolicy",
    "GandivaPolicy",
    "LasPolicy",
    "Policy",
    "available_policies",
    "build_policy",
    "policy_options",
]
