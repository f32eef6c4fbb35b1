"""Communication: collective algorithms over point-to-point, compression codecs and
DDP hooks, and the alpha-beta cost model.

Everything runs over torch.distributed (gloo or nccl); nothing here opens its
own sockets.
"""

from distml.comm.codecs import (
    CODEC_NAMES,
    Codec,
    ErrorFeedback,
    FeedbackEncoder,
    HalfCodec,
    IdentityCodec,
    Int8Codec,
    Payload,
    TopKCodec,
    make_codec,
)
from distml.comm.collectives import (
    ALL_REDUCE_ALGORITHMS,
    all_gather,
    all_reduce,
    broadcast,
    gather,
    halving_doubling_all_reduce,
    reduce,
    ring_all_reduce,
    tree_all_reduce,
)
from distml.comm.compression import HOOK_NAMES, CompressionState, make_compression_hook
from distml.comm.ddp_hooks import HOOK_ALGORITHMS, allreduce_algorithm_hook
from distml.comm.hierarchical import (
    HierarchicalAllReduce,
    discover_host_groups,
    hierarchical_all_reduce,
    host_groups_from_env,
)

__all__ = [
    "ALL_REDUCE_ALGORITHMS",
    "CODEC_NAMES",
    "HOOK_ALGORITHMS",
    "HOOK_NAMES",
    "Codec",
    "CompressionState",
    "ErrorFeedback",
    "FeedbackEncoder",
    "HalfCodec",
    "HierarchicalAllReduce",
    "IdentityCodec",
    "Int8Codec",
    "Payload",
    "TopKCodec",
    "all_gather",
    "all_reduce",
    "allreduce_algorithm_hook",
    "broadcast",
    "discover_host_groups",
    "gather",
    "halving_doubling_all_reduce",
    "hierarchical_all_reduce",
    "host_groups_from_env",
    "make_codec",
    "make_compression_hook",
    "reduce",
    "ring_all_reduce",
    "tree_all_reduce",
]
