"""Runtime services shared by every layer: process groups, device choice, seeding, timers."""

from distml.runtime.dist import (
    DistContext,
    barrier,
    destroy_distributed,
    init_distributed,
    pick_backend,
    pick_device,
)
from distml.runtime.seed import seed_everything

__all__ = [
    "DistContext",
    "barrier",
    "destroy_distributed",
    "init_distributed",
    "pick_backend",
    "pick_device",
    "seed_everything",
]
