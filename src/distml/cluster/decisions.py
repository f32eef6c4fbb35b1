"""Scheduling decisions: what a policy asks the cluster to do, each with a reason.

A policy never mutates the cluster itself; it returns a list of these frozen
records and the owner of the state (the simulator or the live scheduler
service) applies them in order with :meth:`ClusterState.apply`. Every decision
carries a human-readable ``reason`` that the live service logs as an event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from distml.errors import DistmlError

Slot = tuple[int, int]
"""A GPU slot: ``(node index, GPU index on that node)``."""

Placement = tuple[Slot, ...]


class InvalidDecision(DistmlError):
    """A policy asked for something the cluster state forbids (a policy bug)."""


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Base of every decision: the job it concerns and why."""

    kind: ClassVar[str] = "decision"
    job: int
    reason: str

    def describe(self) -> str:
        """One log line: kind, job, details and reason."""
        details = self._details()
        extra = f" {details}" if details else ""
        return f"{self.kind} job {self.job}{extra}: {self.reason}"

    def _details(self) -> str:
        return ""


@dataclass(frozen=True, kw_only=True)
class Start(Decision):
    """Run a job that has never run on ``placement``."""

    kind: ClassVar[str] = "start"
    placement: Placement

    def _details(self) -> str:
        return f"on {format_placement(self.placement)}"


@dataclass(frozen=True, kw_only=True)
class Resume(Decision):
    """Restart a suspended job from its checkpoint on ``placement``."""

    kind: ClassVar[str] = "resume"
    placement: Placement

    def _details(self) -> str:
        return f"on {format_placement(self.placement)}"


@dataclass(frozen=True, kw_only=True)
class Suspend(Decision):
    """Preempt a running job: checkpoint it and free its GPUs."""

    kind: ClassVar[str] = "suspend"


Preempt = Suspend


@dataclass(frozen=True, kw_only=True)
class Migrate(Decision):
    """Move a running job (checkpoint, restart) to ``placement`` of the same size."""

    kind: ClassVar[str] = "migrate"
    placement: Placement

    def _details(self) -> str:
        return f"to {format_placement(self.placement)}"


@dataclass(frozen=True, kw_only=True)
class Pack(Decision):
    """Run 1-GPU job ``job`` on ``slot`` beside 1-GPU job ``host`` already there."""

    kind: ClassVar[str] = "pack"
    host: int
    slot: Slot

    def _details(self) -> str:
        return f"with job {self.host} on {format_placement((self.slot,))}"


@dataclass(frozen=True, kw_only=True)
class Unpack(Decision):
    """Take ``job`` off a shared slot: to ``placement`` if given, else suspend it."""

    kind: ClassVar[str] = "unpack"
    placement: Placement | None = None

    def _details(self) -> str:
        if self.placement is None:
            return "to the queue"
        return f"to {format_placement(self.placement)}"


@dataclass(frozen=True, kw_only=True)
class Grow(Decision):
    """Give an elastic job more GPUs: its new (larger) placement."""

    kind: ClassVar[str] = "grow"
    placement: Placement

    @property
    def new_size(self) -> int:
        return len(self.placement)

    def _details(self) -> str:
        return f"to {self.new_size} GPUs"


@dataclass(frozen=True, kw_only=True)
class Shrink(Decision):
    """Take GPUs from an elastic job: its new (smaller) placement, a subset of the old."""

    kind: ClassVar[str] = "shrink"
    placement: Placement

    @property
    def new_size(self) -> int:
        return len(self.placement)

    def _details(self) -> str:
        return f"to {self.new_size} GPUs"


def format_placement(placement: Placement) -> str:
    """``n0:[0,1] n3:[2]`` -- compact, grouped by node."""
    by_node: dict[int, list[int]] = {}
    for node, gpu in placement:
        by_node.setdefault(node, []).append(gpu)
    return " ".join(f"n{node}:{sorted(gpus)}".replace(" ", "") for node, gpus in by_node.items())
