"""``python -m distml.cluster.service``: the service process that ``distml cluster up`` starts.

Prints one line and exits 2 on bad input (unknown policy, port in use, a
second service on the same state dir), like every distml command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from distml.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from distml.cluster.service.server import DEFAULT_HOST, DEFAULT_PORT

    p = argparse.ArgumentParser(prog="python -m distml.cluster.service")
    p.add_argument("--state-dir", required=True, help="database, job folders, token")
    p.add_argument("--slots", type=int, default=None, help="default: GPUs, else CPU cores")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--policy", default="gandiva", help="fifo, las or gandiva")
    p.add_argument("--policy-options", default="{}", help="JSON object of policy options")
    p.add_argument("--executor", default="local", help="local or ray")
    p.add_argument("--executor-options", default="{}", help="JSON object of executor options")
    p.add_argument(
        "--min-run", type=float, default=None, help="seconds a run trains before preemption"
    )
    p.add_argument(
        "--min-run-steps", type=int, default=None, help="steps a run trains before preemption"
    )
    p.add_argument("--stop-timeout", type=float, default=None, help="seconds to checkpoint on stop")
    p.add_argument("--tick", type=float, default=None, help="seconds between scheduler polls")
    return p


def _json_object(text: str, flag: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"quantum\": 60}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"quantum\": 60}}'")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    from distml.cluster.service.scheduler_loop import SchedulerOptions
    from distml.cluster.service.server import serve

    args = build_parser().parse_args(argv)
    try:
        options = SchedulerOptions()
        if args.min_run is not None:
            options.min_run_s = args.min_run
        if args.min_run_steps is not None:
            options.min_run_steps = args.min_run_steps
        if args.stop_timeout is not None:
            options.stop_timeout_s = args.stop_timeout
        if args.tick is not None:
            options.tick_s = args.tick
        serve(
            args.state_dir,
            slots=args.slots,
            host=args.host,
            port=args.port,
            policy=args.policy,
            policy_options=_json_object(args.policy_options, "--policy-options"),
            executor=args.executor,
            executor_options=_json_object(args.executor_options, "--executor-options"),
            options=options,
        )
    except UserError as exc:
        print(f"distml: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
