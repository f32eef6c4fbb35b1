"""Parameter-server data parallelism: sharded parameters, push/pull, sync/async/ssp.

``sharding`` plans which server owns which bytes, ``shard`` holds one server's
parameters and optimizer, ``transport`` is the point-to-point wire protocol,
``server`` and ``worker`` are the two ends, and ``strategy`` plugs them into
the Trainer as ``parallel.strategy: ps``.
"""

from distml.parallel.ps.server import ParameterServer, ServerStats
from distml.parallel.ps.shard import Shard, assemble_full, clone_optimizer, is_elementwise
from distml.parallel.ps.sharding import Chunk, ShardPlan, plan_shards
from distml.parallel.ps.strategy import PSStrategy, check_ps_settings, ps_world_size
from distml.parallel.ps.transport import ParameterServerLost, PSJobStopped
from distml.parallel.ps.worker import PSClient

__all__ = [
    "Chunk",
    "PSClient",
    "PSJobStopped",
    "PSStrategy",
    "ParameterServer",
    "ParameterServerLost",
    "ServerStats",
    "Shard",
    "ShardPlan",
    "assemble_full",
    "check_ps_settings",
    "clone_optimizer",
    "is_elementwise",
    "plan_shards",
    "ps_world_size",
]
