"""What a replica does with a job: run a batch through the model, or generate text.

:class:`ModelRunner` wraps a model loaded with
:func:`~distml.inference.predict.load_for_inference` (training checkpoint or
quantized file) and executes the three job kinds the server sends: ``classify``
(a float batch), ``tokens`` (right-padded token ids plus their lengths; the
masked-LM encoder gets an attention mask so padding changes nothing) and
``generate`` (one prompt, tokens emitted one at a time for streaming). Jobs
and results are plain numpy arrays so they can cross a process pipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distml.data.text import ByteTokenizer, CharTokenizer, Tokenizer
from distml.errors import UserError
from distml.inference.predict import load_for_inference
from distml.inference.quantize import is_quantized_file
from distml.memory import read_quantized_metadata
from distml.train.checkpoint import load_checkpoint

TASKS = ("classification", "causal_lm", "masked_lm")
#: (message, arrays) sent back for each generated token while a job streams.
Emit = Callable[[dict[str, Any], list[np.ndarray]], None]
META_KEYS = ("model_name", "model_args", "task", "input_shape", "tokenizer")


def read_model_meta(model_path: str) -> dict[str, Any]:
    """The inference metadata of a checkpoint or quantized file, without building the model."""
    if is_quantized_file(model_path):
        try:
            meta = read_quantized_metadata(model_path)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"cannot read {model_path} ({exc}); pass a `distml quantize` file"
            ) from None
    else:
        meta = load_checkpoint(model_path)
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise UserError(f"{model_path} lacks {', '.join(missing)}; serve a distml checkpoint")
    if meta["task"] not in TASKS:
        raise UserError(f"{model_path} has task {meta['task']!r}; distml serves {TASKS}")
    return {k: meta[k] for k in META_KEYS}


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer | None:
    spec = meta.get("tokenizer") or {}
    if spec.get("kind") == "char":
        # CharTokenizer sorts the distinct characters of its text: the saved list rebuilds it.
        return CharTokenizer(spec["chars"])
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    return None


class ModelRunner:
    """A loaded model plus the code to run each kind of job on it."""

    def __init__(self, model_path: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        meta, model = load_for_inference(model_path, self.device)
        self.meta = {k: meta[k] for k in META_KEYS}
        self.model = model.eval()
        self.task = str(self.meta["task"])

    @torch.no_grad()
    def run(
        self,
        kind: str,
        message: dict[str, Any],
        arrays: list[np.ndarray],
        emit: Emit | None = None,
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        if kind == "classify":
            x = torch.from_numpy(arrays[0]).to(self.device)
            return {}, [self.model(x).float().cpu().numpy()]
        if kind == "tokens":
            ids = torch.from_numpy(arrays[0]).to(self.device)
            lengths = torch.from_numpy(arrays[1]).to(self.device)
            if self.task == "masked_lm":
                mask = torch.arange(ids.shape[1], device=self.device)[None, :] < lengths[:, None]
                logits = self.model(ids, attention_mask=mask.long())
            else:
                # Causal attention: right padding cannot influence earlier positions.
                logits = self.model(ids)
            return {}, [logits.float().cpu().numpy()]
        if kind == "generate":
            return self._generate(message, arrays[0], emit)
        raise ValueError(f"unknown job kind {kind!r}")

    def _generate(
        self, message: dict[str, Any], prompt: np.ndarray, emit: Emit | None
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise UserError(f"model {self.meta['model_name']!r} cannot generate text")
        generator = None
        if message.get("seed") is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(message["seed"]))
        idx = torch.from_numpy(prompt).to(self.device).view(1, -1)
        new: list[int] = []
        for _ in range(int(message["max_new_tokens"])):
            # One step at a time with a persistent generator equals one generate(n) call.
            idx = generate(idx, 1, float(message["temperature"]), message.get("top_k"), generator)
            token = int(idx[0, -1])
            new.append(token)
            if emit is not None and message.get("stream"):
                emit({"token": token}, [])
        return {}, [np.asarray(new, dtype=np.int64)]
