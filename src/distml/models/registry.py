"""The model registry: names to plain ``nn.Module`` builders with typed configs.

Each model file defines a dataclass config (nanoGPT style) and registers a
builder with :func:`register_model`. :func:`build_model` validates the
user's ``model.args`` against that dataclass (unknown keys and wrong types
are rejected with the key named) after filling the fields the dataset
determines (``num_classes``, ``in_channels``, ``vocab_size``...). Models never
import training or parallel code, so they run without distml.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
from torch import nn

from distml.errors import ConfigError

#: What a model's forward returns and how the loss is computed from it.
#: classification: (B, C) logits vs (B,) labels; causal_lm / masked_lm:
#: (B, T, V) logits vs (B, T) token ids with -100 where no loss applies;
#: extractive_qa: (B, 2, T) start/end logits vs (B, 2) positions (the LM loss applies).
TASKS = ("classification", "causal_lm", "masked_lm", "extractive_qa")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    task: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str, config_cls: type, task: str
) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator: ``@register_model("gpt", GPTConfig, "causal_lm")`` over ``def build(cfg)``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config class for model {name!r} must be a dataclass")

    def decorate(build: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        _REGISTRY[name] = ModelSpec(name=name, config_cls=config_cls, build=build, task=task)
        return build

    return decorate


def _ensure_builtin_models_loaded() -> None:
    # Importing the package registers the built-in models (side effect by design).
    import distml.models  # noqa: F401


def model_names() -> list[str]:
    _ensure_builtin_models_loaded()
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    _ensure_builtin_models_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r} (model.name); choose one of: {', '.join(model_names())}"
        ) from None


def model_config_fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(get_model_spec(name).config_cls)]


def make_model_config(
    name: str, args: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> Any:
    """Validate ``args`` (plus dataset-derived ``defaults`` for known fields) into the config."""
    spec = get_model_spec(name)
    fields = model_config_fields(name)
    unknown = sorted(set(args) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key model.args.{unknown[0]} for model {name!r}; "
            f"valid keys: {', '.join(fields)}"
        )
    merged = {k: v for k, v in (defaults or {}).items() if k in fields}
    merged.update(args)
    try:
        return pydantic.TypeAdapter(spec.config_cls).validate_python(merged)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"model.args.{loc}: {err['msg']} (got {err.get('input')!r})") from None


def build_model(
    name: str, args: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None
) -> nn.Module:
    """Build a registered model from its name and validated args."""
    cfg = make_model_config(name, args or {}, defaults)
    return get_model_spec(name).build(cfg)
