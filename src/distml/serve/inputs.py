"""Validation of request bodies into the arrays the replicas run.

Everything a client sends is checked here, before any queue: JSON syntax
(400), the shape, dtype and length of inputs against the model's metadata
(422), and the generation parameters. Each problem raises one
:class:`RequestError` whose message names the field and the fix. The arrays
built here are the only thing that crosses into replicas.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from distml.data.text import Tokenizer
from distml.errors import UserError
from distml.serve.codec import CodecError, decode_tensor

OUTPUT_KINDS = ("logits", "probabilities")
GENERATE_FIELDS = ("prompt", "max_new_tokens", "temperature", "top_k", "seed", "stream")


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _bad(message: str, status: int = 422) -> RequestError:
    return RequestError(status, message)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body)  # 7x the stdlib json on a digit (12 us saved per request)
    except orjson.JSONDecodeError:
        # Strict JSON failed: the stdlib parser accepts NaN/Infinity (so validation can
        # name them) and words its syntax errors better; only bad requests get here.
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(f"malformed JSON body: {exc}", 400) from None
    if not isinstance(value, dict):
        raise _bad(f"the JSON body must be an object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ModelInputs:
    """What a model accepts, taken from its checkpoint metadata."""

    task: str
    input_shape: tuple[int, ...]
    vocab_size: int
    block_size: int
    tokenizer: Tokenizer | None

    @property
    def kind(self) -> str:
        return "classify" if self.task == "classification" else "tokens"

    def _is_int(self, v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    # ------------------------------------------------------------ predict
    def classify_rows(self, array: np.ndarray) -> list[np.ndarray]:
        shape = self.input_shape
        numel = int(np.prod(shape)) if shape else 1
        if array.ndim >= 1 and tuple(array.shape[1:]) == shape:
            rows = array
        elif array.ndim == 2 and array.shape[1] == numel:
            rows = array.reshape(len(array), *shape)
        else:
            got = tuple(array.shape[1:]) if array.ndim >= 1 else ()
            raise _bad(
                f"each input has shape {list(got)} but the model expects {list(shape)} "
                f"(or {numel} flat values)"
            )
        if len(rows) == 0:
            raise _bad("'inputs' is empty; send at least one input")
        if not np.isfinite(rows).all():
            raise _bad("'inputs' contains NaN or infinity; send finite numbers")
        return list(rows.astype(np.float32, copy=False))

    def token_row(self, ids: np.ndarray, where: str) -> np.ndarray:
        if len(ids) == 0:
            raise _bad(f"{where} is empty; send at least one token")
        if len(ids) > self.block_size:
            raise _bad(
                f"{where} has {len(ids)} tokens but the model's block_size is {self.block_size}; "
                "send shorter sequences"
            )
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise _bad(f"{where} has token id {bad} outside the vocabulary [0, {self.vocab_size})")
        return ids.astype(np.int64, copy=False)

    def rows_from_json(self, body: dict[str, Any]) -> list[np.ndarray]:
        unknown = sorted(set(body) - {"inputs", "texts", "output"})
        if unknown:
            raise _bad(f"unknown field(s) {unknown}; send 'inputs' (or 'texts') and 'output'")
        if self.kind == "tokens" and "texts" in body:
            return self._texts(body["texts"])
        if "inputs" not in body:
            hint = " or 'texts'" if self.kind == "tokens" else ""
            raise _bad(f"the body needs 'inputs'{hint}: a list of model inputs")
        value = body["inputs"]
        if not isinstance(value, list) or not value:
            raise _bad("'inputs' must be a non-empty list of inputs")
        if self.kind == "classify":
            try:
                array = np.asarray(value, dtype=np.float32)
            except (ValueError, TypeError) as exc:
                if "inhomogeneous" in str(exc) or "sequence" in str(exc):
                    raise _bad(
                        f"'inputs' is ragged: every input must have shape {list(self.input_shape)}"
                    ) from None
                raise _bad(f"'inputs' must hold only numbers ({exc})") from None
            return self.classify_rows(array)
        rows = []
        for i, seq in enumerate(value):
            if not isinstance(seq, list) or not all(self._is_int(t) for t in seq):
                raise _bad(f"inputs[{i}] must be a list of integer token ids")
            rows.append(self.token_row(np.asarray(seq, dtype=np.int64), f"inputs[{i}]"))
        return rows

    def _texts(self, texts: Any) -> list[np.ndarray]:
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _bad("'texts' must be a non-empty list of strings")
        return [
            self.token_row(self.encode(t, f"texts[{i}]"), f"texts[{i}]")
            for i, t in enumerate(texts)
        ]

    def encode(self, text: str, where: str) -> np.ndarray:
        if self.tokenizer is None:
            raise _bad("this model has no tokenizer; send token ids in 'inputs'")
        try:
            return self.tokenizer.encode(text).numpy()
        except UserError as exc:
            raise _bad(f"{where}: {exc}") from None

    def rows_from_tensor(self, body: bytes) -> list[np.ndarray]:
        try:
            array = decode_tensor(body)
        except CodecError as exc:
            raise _bad(f"bad tensor body: {exc}", 400) from None
        if self.kind == "classify":
            if array.dtype.kind not in "fiu":
                raise _bad(f"tensor dtype {array.dtype.name} is not numeric")
            return self.classify_rows(array.astype(np.float32))
        if array.dtype.kind not in "iu" or array.ndim != 2:
            raise _bad(
                f"token tensors must be 2-D integer (batch, length); got {array.dtype.name} "
                f"of shape {list(array.shape)}"
            )
        return [self.token_row(row, f"row {i}") for i, row in enumerate(array)]

    # ------------------------------------------------------------ generate
    def generate_params(
        self, body: dict[str, Any], limit: int
    ) -> tuple[np.ndarray, dict[str, Any], bool]:
        """(prompt ids, job params, stream) of a /v1/generate body."""
        if self.task != "causal_lm":
            raise _bad(f"/v1/generate needs a causal_lm model; this one is {self.task}", 400)
        unknown = sorted(set(body) - set(GENERATE_FIELDS))
        if unknown:
            raise _bad(f"unknown field(s) {unknown}; allowed: {list(GENERATE_FIELDS)}")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _bad("'prompt' must be a non-empty string")
        ids = self.encode(prompt, "prompt")
        n = body.get("max_new_tokens", 32)
        if not self._is_int(n) or not 1 <= n <= limit:
            raise _bad(f"'max_new_tokens' must be an integer in [1, {limit}], got {n!r}")
        temperature = body.get("temperature", 1.0)
        if (
            not isinstance(temperature, (int, float))
            or isinstance(temperature, bool)
            or not math.isfinite(temperature)
            or temperature < 0
        ):
            raise _bad(f"'temperature' must be a number >= 0 (0 = greedy), got {temperature!r}")
        top_k = body.get("top_k")
        if top_k is not None and (not self._is_int(top_k) or top_k < 1):
            raise _bad(f"'top_k' must be an integer >= 1 or null, got {top_k!r}")
        seed = body.get("seed")
        if seed is not None and (not self._is_int(seed) or not 0 <= seed < 2**63):
            raise _bad(f"'seed' must be a non-negative integer or null, got {seed!r}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad(f"'stream' must be true or false, got {stream!r}")
        params = {
            "max_new_tokens": n,
            "temperature": float(temperature),
            "top_k": top_k,
            "seed": seed,
        }
        return ids.astype(np.int64), params, stream


def model_inputs(meta: dict[str, Any], tokenizer: Tokenizer | None) -> ModelInputs:
    args = meta.get("model_args") or {}
    return ModelInputs(
        task=str(meta["task"]),
        input_shape=tuple(int(d) for d in meta.get("input_shape") or ()),
        vocab_size=int(args.get("vocab_size", 0)),
        block_size=int(args.get("block_size", 0)),
        tokenizer=tokenizer,
    )


def output_kind(body: dict[str, Any]) -> str:
    kind = body.get("output", "logits")
    if kind not in OUTPUT_KINDS:
        raise _bad(f"'output' must be one of {list(OUTPUT_KINDS)}, got {kind!r}")
    return str(kind)
