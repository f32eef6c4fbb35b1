"""Saving and loading quantized models as safetensors (tensors only, never pickle).

:func:`quantized_state_dict` turns a model that went through
:func:`~distml.memory.quantized_modules.quantize_model` into plain tensors
(int8/uint8 weights, fp32 scales, the float parameters left unquantized) and a
small JSON-able description: which modules are quantized with what bits,
group size and compute mode, which of them share a tied weight, and which
state-dict keys alias another (stored once, since safetensors refuses shared
memory). :func:`load_quantized` rebuilds the float skeleton with the user's
builder, swaps in empty quantized modules per that description and loads the
tensors with strict key checking.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distml.errors import CheckpointError
from distml.memory.quantized_modules import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantSpec,
    check_bits,
    replace_group,
)

FORMAT = "distml.quantized"
VERSION = 1
_QUANT_KEY = "distml_quantization"
_USER_KEY = "distml_user"


def quantized_state_dict(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, metadata)`` for ``model``; tensors hold no shared memory."""
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for key, t in model.state_dict().items():
        ident = (
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            t.stride(),
            t.dtype,
        )
        if ident in seen and t.numel() > 0:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        ptr = t.untyped_storage().data_ptr()
        # Distinct views into one storage cannot be saved as views: copy them.
        tensors[key] = t.detach().clone() if ptr in storages else t.detach().contiguous()
        storages.add(ptr)
    modules: dict[str, dict[str, Any]] = {}
    by_buffer: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, QuantizedLinear | QuantizedEmbedding):
            spec = mod.weight_q.spec
            modules[name] = {
                "kind": "linear" if isinstance(mod, QuantizedLinear) else "embedding",
                "bits": spec.bits,
                "group_size": spec.group_size,
                "symmetric": spec.symmetric,
                "compute": mod.compute if isinstance(mod, QuantizedLinear) else "dequant",
            }
            by_buffer.setdefault(id(mod.weight_q.qweight), []).append(name)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "modules": modules,
        "tied": [names for names in by_buffer.values() if len(names) > 1],
        "aliases": aliases,
    }
    return tensors, metadata


def save_quantized(
    model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None
) -> None:
    """Write ``model`` to a safetensors file; ``metadata`` (JSON-able) travels alongside."""
    tensors, quant_meta = quantized_state_dict(model)
    header = {_QUANT_KEY: json.dumps(quant_meta), _USER_KEY: json.dumps(metadata or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # Write then rename so a crash never leaves a truncated file under the real name.
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    os.replace(tmp, path)


def _read_header(path: str | Path) -> dict[str, str]:
    if not Path(path).is_file():
        raise CheckpointError(f"quantized model file {str(path)!r} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"{str(path)!r} is not a readable safetensors file ({exc}); re-export the model"
        ) from exc
    if _QUANT_KEY not in header:
        raise CheckpointError(
            f"{str(path)!r} has no distml quantization metadata; save it with save_quantized"
        )
    return dict(header)


def read_quantized_metadata(path: str | Path) -> dict[str, Any]:
    """The user ``metadata`` given to :func:`save_quantized` (e.g. the model config)."""
    return dict(json.loads(_read_header(path).get(_USER_KEY, "{}")))


def restore_quantized_layout(model: nn.Module, quant_meta: dict[str, Any]) -> nn.Module:
    """Swap the float modules named in ``quant_meta`` for empty quantized ones, in place."""
    if quant_meta.get("format") != FORMAT or quant_meta.get("version") != VERSION:
        raise CheckpointError(
            f"unsupported quantized format {quant_meta.get('format')!r} "
            f"v{quant_meta.get('version')}; re-export with this distml version"
        )
    modules: dict[str, dict[str, Any]] = quant_meta["modules"]
    kinds = {"linear": nn.Linear, "embedding": nn.Embedding}

    def plan(name: str, mod: nn.Module) -> tuple[QuantSpec, str]:
        entry = modules[name]
        if type(mod) is not kinds[entry["kind"]]:
            raise CheckpointError(
                f"module {name!r} is {type(mod).__name__} but was saved as a quantized "
                f"{entry['kind']}; build the same architecture that was saved"
            )
        check_bits(int(entry["bits"]), int(entry["group_size"]) or 128)
        spec = QuantSpec(int(entry["bits"]), int(entry["group_size"]), bool(entry["symmetric"]))
        return spec, str(entry["compute"])

    tied: list[list[str]] = quant_meta["tied"]
    grouped = {n for names in tied for n in names}
    groups = tied + [[n] for n in modules if n not in grouped]
    for names in groups:
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError as exc:
                raise CheckpointError(
                    f"quantized checkpoint names module {name!r} that the built model lacks; "
                    "build the same architecture that was saved"
                ) from exc
        replace_group(model, names, plan, from_float=False)
    return model


def load_quantized(path: str | Path, build_model_fn: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a model saved by :func:`save_quantized`, in eval mode.

    ``build_model_fn()`` must return the float architecture that was quantized
    (its float weights are discarded); the tensors land on its device.
    """
    quant_meta = json.loads(_read_header(path)[_QUANT_KEY])
    model = restore_quantized_layout(build_model_fn(), quant_meta)
    tensors = load_file(str(path))
    for alias, canonical in quant_meta["aliases"].items():
        tensors[alias] = tensors[canonical]
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"{str(path)!r} does not fit the built model ({first}); build the saved architecture"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{str(path)!r} does not fit the built model (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}); build the saved architecture"
        )
    # Integer buffers cannot train; the loaded model is for inference.
    return model.eval()
