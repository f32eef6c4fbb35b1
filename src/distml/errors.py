"""Error types that carry the user-facing contract of distml.

A :class:`UserError` is bad input the user can fix (config, file, batch size,
port): the CLI prints its one-line message and exits with code 2, with no
traceback unless ``--debug``. Everything else is a bug or a runtime failure and
exits non-zero with the failing rank named.
"""

from __future__ import annotations


class DistmlError(Exception):
    """Base class of every error raised on purpose by distml."""


class UserError(DistmlError):
    """Bad input with a fix the user can apply; the CLI maps it to exit code 2.

    The message must be one line naming the problem and the fix.
    """

    exit_code = 2


class ConfigError(UserError):
    """A config file or override is invalid (unknown key, wrong type, bad value)."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated or incompatible with the config."""


class JobStopped(DistmlError):
    """The job was asked to stop (SIGTERM/SIGUSR1) and stopped at a step boundary."""

    exit_code = 0


class WorkerFailure(DistmlError):
    """A worker process of a distributed job raised or was killed."""

    exit_code = 1
