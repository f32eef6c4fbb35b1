"""Memory techniques: weight quantization, 8-bit optimizer state and optimizer offload.

Post-training quantization (:func:`quantize_model`, safetensors export with
:func:`save_quantized` / :func:`load_quantized`) shrinks models for serving;
:class:`AdamW8bit` and :class:`OffloadedOptimizer` shrink training memory.
"""

from distml.memory.offload import OffloadedOptimizer
from distml.memory.optim8bit import AdamW8bit, optimizer_state_bytes
from distml.memory.quantized_io import (
    load_quantized,
    quantized_state_dict,
    read_quantized_metadata,
    save_quantized,
)
from distml.memory.quantized_modules import QuantizedEmbedding, QuantizedLinear, quantize_model

__all__ = [
    "AdamW8bit",
    "OffloadedOptimizer",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "load_quantized",
    "optimizer_state_bytes",
    "quantize_model",
    "quantized_state_dict",
    "read_quantized_metadata",
    "save_quantized",
]
