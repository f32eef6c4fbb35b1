"""Memory techniques: quantization, 8-bit optimizer state, offload, recomputation, profiling.

Post-training quantization (:func:`quantize_model`, safetensors export with
:func:`save_quantized` / :func:`load_quantized`) shrinks models for serving;
:class:`AdamW8bit`, :class:`OffloadedOptimizer` and activation recomputation
(:func:`apply_recompute`) shrink training memory; :func:`profile_memory`
measures where a training step's memory goes and advises what fits a budget.
"""

from distml.memory.offload import OffloadedOptimizer
from distml.memory.optim8bit import AdamW8bit, optimizer_state_bytes
from distml.memory.profiler import (
    LayerMemory,
    MemoryOption,
    MemoryReport,
    format_advice,
    format_report,
    profile_memory,
)
from distml.memory.quantized_io import (
    load_quantized,
    quantized_state_dict,
    read_quantized_metadata,
    save_quantized,
)
from distml.memory.quantized_modules import QuantizedEmbedding, QuantizedLinear, quantize_model
from distml.memory.recompute import (
    RECOMPUTE_MODES,
    CheckpointWrapper,
    RecomputePlan,
    apply_recompute,
    measure_saved_bytes,
    profile_blocks,
    remove_recompute,
)

__all__ = [
    "RECOMPUTE_MODES",
    "AdamW8bit",
    "CheckpointWrapper",
    "LayerMemory",
    "MemoryOption",
    "MemoryReport",
    "OffloadedOptimizer",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "RecomputePlan",
    "apply_recompute",
    "format_advice",
    "format_report",
    "load_quantized",
    "measure_saved_bytes",
    "optimizer_state_bytes",
    "profile_blocks",
    "profile_memory",
    "quantize_model",
    "quantized_state_dict",
    "read_quantized_metadata",
    "remove_recompute",
    "save_quantized",
]
