"""Job specs for the cluster service: a small YAML file, validated before anything runs.

A spec names the job, points at a distml training config (a path, resolved
against the spec's folder, or an inline mapping), and asks for slots (GPUs on
CUDA machines, worker processes on CPU), a priority and, for elastic jobs, a
slot range. Unknown fields, malformed YAML, a config that ``distml train``
would reject, a global batch that the allowed worker counts cannot split, and
more slots than the cluster has are each reported as one line with the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from distml.config import build_config, load_config
from distml.errors import ConfigError, UserError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SpecSyntaxError(UserError):
    """The spec is not YAML or not a mapping (HTTP 400)."""


class SpecError(UserError):
    """The spec is YAML but asks for something invalid (HTTP 422)."""


class ElasticSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int = Field(ge=1)
    max: int = Field(ge=1)


class JobSpec(BaseModel):
    """The fields of a job spec file (``extra='forbid'``: typos are errors)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    #: Path to a distml config (relative to the spec's folder) or the config itself.
    config: str | dict[str, Any] | None = None
    #: key=value overrides applied to the config, as on the ``distml train`` command line.
    overrides: list[str] = Field(default_factory=list)
    #: Slots to run on (GPUs on CUDA machines, one worker process each on CPU).
    slots: int | None = Field(None, ge=1)
    #: Alias of ``slots``.
    gpus: int | None = Field(None, ge=1)
    priority: int = 0
    elastic: ElasticSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if self.name is not None and not _NAME.match(self.name):
            raise ValueError(
                f"name {self.name!r} must be 1-64 letters, digits, '.', '_' or '-' "
                "starting with a letter or digit"
            )
        if self.slots is not None and self.gpus is not None and self.slots != self.gpus:
            raise ValueError(f"slots={self.slots} and gpus={self.gpus} disagree; give one of them")
        if self.elastic is not None and self.elastic.min > self.elastic.max:
            raise ValueError(
                f"elastic.min={self.elastic.min} exceeds elastic.max={self.elastic.max}"
            )
        return self


@dataclass(frozen=True)
class ResolvedJob:
    """A validated job, ready for the scheduler: sizes, priority and the full config."""

    name: str | None  # None: the service names it job-<id>
    slots: int
    min_slots: int
    max_slots: int
    priority: int
    config: dict[str, Any]
    workdir: str


def _format_error(exc: pydantic.ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        valid = ", ".join(sorted(JobSpec.model_fields))
        return f"unknown field '{loc}' in the job spec; valid fields: {valid}"
    if err["type"] == "value_error":
        return f"invalid job spec: {str(err['msg']).removeprefix('Value error, ')}"
    where = f" for '{loc}'" if loc else ""
    return f"invalid job spec value{where}: {err['msg']} (got {err.get('input')!r})"


def parse_spec_text(text: str) -> JobSpec:
    """YAML text -> :class:`JobSpec`; SpecSyntaxError or SpecError with one line."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecSyntaxError(f"job spec is not valid YAML{where}; fix the syntax") from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecSyntaxError(
            f"job spec is {kind}, not a mapping; write fields such as 'config:' and 'slots:'"
        )
    try:
        return JobSpec.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(_format_error(exc)) from None


def resolve_spec(
    spec: JobSpec,
    *,
    base_dir: str | Path,
    workdir: str | Path,
    cluster_slots: int,
    slots: int | None = None,
    priority: int | None = None,
    default_name: str = "job",
) -> ResolvedJob:
    """Load and check the job's config and sizes; ``slots``/``priority`` override the spec."""
    try:
        if isinstance(spec.config, str):
            path = Path(spec.config).expanduser()
            if not path.is_absolute():
                path = Path(base_dir) / path
            cfg = load_config(path, spec.overrides)
        else:
            cfg = build_config(spec.config or {}, spec.overrides, source="the job spec's config")
    except ConfigError as exc:
        raise SpecError(str(exc)) from None
    lo, hi = (spec.elastic.min, spec.elastic.max) if spec.elastic else (None, None)
    want = slots or spec.slots or spec.gpus
    if want is None:
        want = (
            cfg.parallel.nproc if lo is None or hi is None else min(max(cfg.parallel.nproc, lo), hi)
        )
    lo = want if lo is None else lo
    hi = want if hi is None else hi
    name = spec.name or default_name
    if not lo <= want <= hi:
        raise SpecError(
            f"job '{name}' asks for {want} slots outside its elastic range [{lo}, {hi}]; "
            "pick slots within elastic.min..elastic.max"
        )
    if not spec.elastic and want > cluster_slots:
        raise SpecError(
            f"job '{name}' asks for {want} slots but the cluster has {cluster_slots}; lower "
            f"slots or start the cluster with --slots {want}"
        )
    if lo > cluster_slots:
        raise SpecError(
            f"job '{name}' needs {lo} slots but the cluster has {cluster_slots}; lower "
            f"slots (or elastic.min) or start the cluster with --slots {lo}"
        )
    batch, accum = cfg.data.global_batch_size, cfg.schedule.accumulation_steps
    top = min(hi, cluster_slots)
    for k in range(lo, top + 1):
        if batch % (k * accum):
            unit = _lcm_range(lo, top) * accum
            raise SpecError(
                f"job '{name}': data.global_batch_size={batch} is not divisible by {k} workers "
                f"x {accum} accumulation steps; use a multiple of {unit} such as "
                f"{-(-batch // unit) * unit}"
            )
    data = cfg.to_dict()
    data["parallel"]["nproc"] = want
    data["checkpoint"]["resume"] = False
    return ResolvedJob(
        name=spec.name,
        slots=want,
        min_slots=lo,
        max_slots=hi,
        priority=spec.priority if priority is None else priority,
        config=data,
        workdir=str(Path(workdir).resolve()),
    )


def _lcm_range(lo: int, hi: int) -> int:
    from math import lcm

    out = 1
    for k in range(lo, hi + 1):
        out = lcm(out, k)
    return out
