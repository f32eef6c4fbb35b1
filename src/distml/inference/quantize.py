"""Post-training weight quantization of a training checkpoint into a servable file.

``distml quantize CKPT --bits 8|4 --out PATH`` rebuilds the float model from a
checkpoint, replaces its linear and embedding layers with int8 (per-channel)
or int4 (group-wise) modules from :mod:`distml.memory`, and writes one
safetensors file whose metadata carries what inference needs (model name and
args, task, input shape, tokenizer). ``distml predict`` and ``distml eval``
load such files directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from distml.errors import UserError
from distml.memory import load_quantized, quantize_model, read_quantized_metadata, save_quantized
from distml.models import get_model_spec, make_model_config
from distml.train.checkpoint import load_checkpoint

INFERENCE_KEYS = ("model_name", "model_args", "task", "input_shape", "tokenizer")


def quantize_checkpoint(
    checkpoint: str, bits: int, out: str, group_size: int = 128, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Quantize ``checkpoint``'s model to ``bits`` and save it to ``out`` (safetensors)."""
    from distml.inference.predict import model_from_checkpoint

    if bits not in (4, 8):
        raise UserError(f"--bits {bits} is not supported; use 8 or 4")
    if not out.endswith(".safetensors"):
        raise UserError(f"--out {out!r} must end in .safetensors")
    state = load_checkpoint(checkpoint)
    model = quantize_model(model_from_checkpoint(state), bits, group_size=group_size, skip=skip)
    meta = {key: state[key] for key in INFERENCE_KEYS}
    meta.update(bits=bits, group_size=group_size, source=str(checkpoint), step=state["step"])
    save_quantized(model, out, metadata=meta)
    return {
        "out": out,
        "bits": bits,
        "bytes": Path(out).stat().st_size,
        "checkpoint_bytes": Path(checkpoint).stat().st_size,
    }


def is_quantized_file(path: str) -> bool:
    return path.endswith(".safetensors")


def load_quantized_for_inference(path: str) -> tuple[dict[str, Any], nn.Module]:
    """(inference metadata, model in eval mode) from a ``distml quantize`` file."""
    user = read_quantized_metadata(path)
    missing = [k for k in INFERENCE_KEYS if k not in user]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; create it with `distml quantize`")
    name = user["model_name"]

    def build() -> nn.Module:
        return get_model_spec(name).build(make_model_config(name, user["model_args"]))

    model = load_quantized(path, build)
    model.eval()
    return dict(user), model
