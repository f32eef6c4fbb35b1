"""Executors of the cluster service: where job processes run.

``local`` starts ``distml train`` subprocesses on this machine, one worker per
slot (a GPU on CUDA machines, a pinned CPU core otherwise); ``ray`` starts the
same command inside a Ray actor that holds the slots' resources. Both follow
:class:`distml.cluster.service.executor.Executor`.
"""

from __future__ import annotations

__all__ = ["LocalExecutor", "RayExecutor"]


def __getattr__(name: str) -> object:
    # Lazy, so importing the package never imports ray.
    if name == "LocalExecutor":
        from distml.cluster.executors.local import LocalExecutor

        return LocalExecutor
    if name == "RayExecutor":
        from distml.cluster.executors.ray_executor import RayExecutor

        return RayExecutor
    raise AttributeError(name)
