"""Model serving: an HTTP app with dynamic batching, replica processes and autoscaling.

``build_app(path, replicas=2, max_batch_size=32, ...)`` returns a FastAPI app for a
training checkpoint or a quantized model; ``serve_main(path, host, port, ...)`` runs it
with uvicorn (``distml serve``). See :class:`ServeSettings` for every option. Names are
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
    from distml.serve.settings import ServeSettings, make_settings

_WHERE = {
    "build_app": "app",
    "serve_main": "app",
    "AIMDBatchCap": "batcher",
    "DynamicBatcher": "batcher",
    "TENSOR_CONTENT_TYPE": "codec",
    "decode_tensor": "codec",
    "encode_tensor": "codec",
    "ServeSettings": "settings",
    "make_settings": "settings",
}

__all__ = [
    "TENSOR_CONTENT_TYPE",
    "AIMDBatchCap",
    "DynamicBatcher",
    "ServeSettings",
    "build_app",
    "decode_tensor",
    "encode_tensor",
    "make_settings",
    "serve_main",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'distml.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(f"distml.serve.{_WHERE[name]}"), name)
