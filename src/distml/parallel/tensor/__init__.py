"""Tensor (intra-layer) parallelism: Megatron-style sharding of transformer layers.

:func:`apply_tensor_parallel` shards a plain model over the mesh's ``tp``
axis; :func:`tensor_parallel_loss` gives the matching loss (vocabulary-
parallel cross-entropy when the logits stay sharded); :mod:`.state` converts
between sharded and full state dicts for checkpoints. ``sequence_parallel=True``
adds Megatron-style sequence parallelism (:mod:`.sequence`).
"""

from distml.parallel.tensor.comm import (
    copy_to_region,
    gather_from_region,
    gather_from_sequence,
    reduce_from_region,
    reduce_scatter_to_sequence,
)
from distml.parallel.tensor.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelLayer,
    VocabParallelEmbedding,
)
from distml.parallel.tensor.loss import vocab_parallel_cross_entropy
from distml.parallel.tensor.plan import (
    TensorParallelInfo,
    apply_tensor_parallel,
    check_tensor_parallel_sizes,
    tensor_parallel_loss,
)
from distml.parallel.tensor.sequence import SequenceParallelDropout, check_sequence_parallel
from distml.parallel.tensor.state import full_state_dict, load_full_state_dict, shard_state_dict

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "SequenceParallelDropout",
    "TensorParallelInfo",
    "TensorParallelLayer",
    "VocabParallelEmbedding",
    "apply_tensor_parallel",
    "check_sequence_parallel",
    "check_tensor_parallel_sizes",
    "copy_to_region",
    "full_state_dict",
    "gather_from_region",
    "gather_from_sequence",
    "load_full_state_dict",
    "reduce_from_region",
    "reduce_scatter_to_sequence",
    "shard_state_dict",
    "tensor_parallel_loss",
    "vocab_parallel_cross_entropy",
]
