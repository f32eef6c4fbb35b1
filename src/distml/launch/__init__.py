"""Launching workers (local and multi-node) through torch.distributed's elastic launcher."""

from distml.launch.launcher import LaunchSpec, check_port_free, launch, parse_master

__all__ = ["LaunchSpec", "check_port_free", "launch", "parse_master"]
