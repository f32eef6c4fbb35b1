"""What a replica does with a job: run a batch through the model, or generate text.

:class:`ModelRunner` wraps a model loaded with
:func:`~distml.inference.predict.load_for_inference` (training checkpoint or
quantized file) and executes the three job kinds the server sends: ``classify``
(a float batch), ``tokens`` (right-padded token ids plus their lengths; the
masked-LM encoder gets an attention mask so padding changes nothing) and
``generate`` (a batch of right-padded prompts with per-row sampling
parameters, decoded together by :func:`~distml.serve.generation.generate_batch`;
streamed rows emit each token as it is chosen). Jobs
and results are plain numpy arrays so they can cross a process pipe.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distml.data.text import ByteTokenizer, CharTokenizer, Tokenizer
from distml.errors import UserError
from distml.inference.kv_cache import KVCacheDecoder, supports_kv_cache
from distml.inference.predict import load_for_inference
from distml.inference.quantize import is_quantized_file
from distml.memory import read_quantized_metadata
from distml.serve.generation import SamplingParams, generate_batch
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
    """A loaded model plus the code to run each kind of job on it.

    Token models are reached only through :meth:`forward_tokens`, which a
    model-parallel runner overrides to run the forward on its process group.
    """

    def __init__(self, model_path: str, device: str = "cpu") -> None:
        self.device = torch.device(device)
        meta, model = load_for_inference(model_path, self.device)
        self.meta = {k: meta[k] for k in META_KEYS}
        self.model = model.eval()
        self.task = str(self.meta["task"])

    def forward_tokens(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits of right-padded token rows (each row valid up to its length)."""
        if self.task == "masked_lm":
            mask = torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
            out: torch.Tensor = self.model(ids, attention_mask=mask.long())
            return out
        # Causal attention: right padding cannot influence earlier positions.
        logits: torch.Tensor = self.model(ids)
        return logits

    def causal_logits(self, ids: torch.Tensor) -> torch.Tensor:
        full = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        return self.forward_tokens(ids, full)

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
            return {}, [self.forward_tokens(ids, lengths).float().cpu().numpy()]
        if kind == "generate":
            return self._generate(message, arrays, emit)
        raise ValueError(f"unknown job kind {kind!r}")

    def _generate(
        self, message: dict[str, Any], arrays: list[np.ndarray], emit: Emit | None
    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """A batch of prompts (right-padded ids, lengths) and per-row sampling parameters."""
        if self.task != "causal_lm":
            raise UserError(f"model {self.meta['model_name']!r} cannot generate text")
        ids, lengths = arrays
        rows: list[dict[str, Any]] = message["rows"]
        prompts = [torch.from_numpy(ids[i, : int(n)]) for i, n in enumerate(lengths)]
        params = [
            SamplingParams(
                int(r["max_new_tokens"]), float(r["temperature"]), r.get("top_k"), r.get("seed")
            )
            for r in rows
        ]
        streaming = {i for i, r in enumerate(rows) if r.get("stream")}

        def on_token(row: int, token: int) -> None:
            if emit is not None and row in streaming:
                emit({"row": row, "token": token}, [])

        block = int(self.meta["model_args"].get("block_size", ids.shape[1]))
        decoder = KVCacheDecoder(self.model) if supports_kv_cache(self.model) else None
        new = generate_batch(
            self.causal_logits, prompts, params, block, on_token, self.device, decoder
        )
        out = np.full((len(new), max(len(t) for t in new)), -1, dtype=np.int64)
        for i, tokens in enumerate(new):
            out[i, : len(tokens)] = tokens
        return {}, [out]
