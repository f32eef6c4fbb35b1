"""Model serving: an HTTP app with dynamic batching, replica processes and autoscaling.

``build_app(path, replicas=2, max_batch_size=32, tp=1, pp=1, ...)`` returns a FastAPI
app for a training checkpoint or a quantized model; ``serve_main(path, host, port, ...)``
runs it with uvicorn (``distml serve``). See :class:`ServeSettings` for every option;
:func:`generate_batch` is the batched decoder and :func:`run_load` the load generator. Names are
imported on first use so that replica processes, which import only the model runner,
do not pay for FastAPI at start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distml.serve.app import build_app, serve_main
    from distml.serve.batcher import AIMDBatchCap, DynamicBatcher
    from distml.serve.codec import TENSOR_CONTENT_TYPE, decode_tensor, encode_tensor
    from distml.serve.generation import SamplingParams, generate_batch
    from distml.serve.loadgen import LoadResult, run_load, run_load_sync
    from distml.serve.settings import ServeSettings, make_settings

_WHERE = {
    "build_app": "app",
    "serve_main": "app",
    "AIMDBatchCap": "batcher",
    "DynamicBatcher": "batcher",
    "TENSOR_CONTENT_TYPE": "codec",
    "decode_tensor": "codec",
    "encode_tensor": "codec",
    "SamplingParams": "generation",
    "generate_batch": "generation",
    "LoadResult": "loadgen",
    "run_load": "loadgen",
    "run_load_sync": "loadgen",
    "ServeSettings": "settings",
    "make_settings": "settings",
}

__all__ = [
    "TENSOR_CONTENT_TYPE",
    "AIMDBatchCap",
    "DynamicBatcher",
    "LoadResult",
    "SamplingParams",
    "ServeSettings",
    "build_app",
    "decode_tensor",
    "encode_tensor",
    "generate_batch",
    "make_settings",
    "run_load",
    "run_load_sync",
    "serve_main",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'distml.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"distml.serve.{_WHERE[name]}"), name)
