"""Dynamic batching, the AIMD cap and the autoscaling policy, without a model or a server."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from distml.serve.autoscale import Autoscaler
from distml.serve.batcher import AIMDBatchCap, DynamicBatcher, FixedBatchCap, assemble, split
from distml.serve.metrics import ServeMetrics
from distml.serve.pool import JobFailed
from distml.serve.settings import ServeSettings


class FakeModel:
    """Stands in for the pool: records batches; output row = 10 * input row (+ token ids)."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[np.ndarray]] = []
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self, kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
        self.batches.append(arrays)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            raise JobFailed(503, "replica 0 died")
        if kind == "classify":
            return [arrays[0] * 10.0]
        ids, lengths = arrays
        # One "logit" per position: the id, and -1 past the row's length.
        pos = np.arange(ids.shape[1])[None, :]
        return [np.where(pos < lengths[:, None], ids, -1).astype(np.float32)[..., None]]


def _batcher(
    model: FakeModel, cap: int, delay_s: float, inflight: int = 4, wait_when_idle: bool = True
) -> DynamicBatcher:
    batcher = DynamicBatcher(
        model, FixedBatchCap(cap), delay_s, lambda: inflight, ServeMetrics(), wait_when_idle
    )
    batcher.start()
    return batcher


def test_concurrent_requests_merge_and_each_gets_its_own_rows() -> None:
    async def main() -> tuple[FakeModel, list[list[np.ndarray]]]:
        model = FakeModel()
        batcher = _batcher(model, cap=32, delay_s=0.05)
        # Requests of 1, 2 and 3 rows whose values identify the caller.
        reqs = [
            [np.full((2,), 100.0 * i + j, np.float32) for j in range(1 + i % 3)] for i in range(9)
        ]
        results = await asyncio.gather(*(batcher.submit("classify", r) for r in reqs))
        await batcher.close()
        return model, [list(r) for r in results] + [reqs]  # type: ignore[list-item]

    model, out = asyncio.run(main())
    results, reqs = out[:-1], out[-1]
    assert len(model.batches) == 1 and len(model.batches[0][0]) == sum(len(r) for r in reqs)
    for got, sent in zip(results, reqs, strict=True):
        assert len(got) == len(sent)
        for g, s in zip(got, sent, strict=True):
            np.testing.assert_array_equal(g, s * 10.0)


def test_cap_limits_rows_per_batch_and_a_lone_request_waits_only_max_delay() -> None:
    async def main() -> tuple[list[int], float]:
        model = FakeModel()
        batcher = _batcher(model, cap=4, delay_s=0.2)
        rows = [[np.zeros(1, np.float32)] for _ in range(10)]
        await asyncio.gather(*(batcher.submit("classify", r) for r in rows))
        sizes = [len(b[0]) for b in model.batches]
        start = time.monotonic()
        await batcher.submit("classify", [np.zeros(1, np.float32)])
        waited = time.monotonic() - start
        await batcher.close()
        return sizes, waited

    sizes, waited = asyncio.run(main())
    assert sizes == [4, 4, 2]
    assert 0.15 <= waited < 1.5


def test_token_rows_are_padded_and_cut_back_to_their_length() -> None:
    rows = [np.array([5, 6, 7]), np.array([1]), np.array([2, 3])]
    ids, lengths = assemble("tokens", rows)
    assert ids.tolist() == [[5, 6, 7], [1, 0, 0], [2, 3, 0]] and lengths.tolist() == [3, 1, 2]

    async def main() -> list[list[np.ndarray]]:
        batcher = _batcher(FakeModel(), cap=8, delay_s=0.05)
        out = await asyncio.gather(*(batcher.submit("tokens", [r]) for r in rows))
        await batcher.close()
        return list(out)

    for got, row in zip(asyncio.run(main()), rows, strict=True):
        assert got[0][:, 0].tolist() == row.tolist()
    assert [o.shape for o in split("classify", np.ones((2, 3)), rows[:2])] == [(3,), (3,)]


def test_busy_replicas_let_requests_pile_up_into_a_larger_batch() -> None:
    async def main() -> list[int]:
        model = FakeModel(delay_s=0.3)
        batcher = _batcher(model, cap=64, delay_s=0.0, inflight=1)
        first = asyncio.ensure_future(batcher.submit("classify", [np.zeros(1, np.float32)]))
        await asyncio.sleep(0.05)  # the first batch is now running
        rest = [batcher.submit("classify", [np.zeros(1, np.float32)]) for _ in range(6)]
        await asyncio.gather(first, *rest)
        await batcher.close()
        return [len(b[0]) for b in model.batches]

    assert asyncio.run(main()) == [1, 6]


def test_a_failed_batch_fails_all_its_callers_and_timed_out_callers_are_skipped() -> None:
    async def main() -> tuple[list[BaseException | list[np.ndarray]], int]:
        model = FakeModel(fail=True)
        batcher = _batcher(model, cap=8, delay_s=0.1)
        gone = asyncio.ensure_future(batcher.submit("classify", [np.zeros(1, np.float32)]))
        await asyncio.sleep(0.01)
        gone.cancel()  # as asyncio.wait_for does when a request times out
        results = await asyncio.gather(
            *(batcher.submit("classify", [np.zeros(1, np.float32)]) for _ in range(3)),
            return_exceptions=True,
        )
        await batcher.close()
        return list(results), len(model.batches[0][0])

    results, rows = asyncio.run(main())
    assert rows == 3
    assert all(isinstance(r, JobFailed) and r.status == 503 for r in results)


def test_aimd_grows_additively_under_target_and_halves_above() -> None:
    cap = AIMDBatchCap(max_size=16, target_s=0.1, initial=1, increase=2, window=4)
    for _ in range(4 * 5):
        cap.observe(0.01)
    assert cap.value == 11
    for _ in range(4 * 5):
        cap.observe(0.01)
    assert cap.value == 16  # clamped at max_size
    for latency in (0.01, 0.01, 0.01, 0.5):  # one slow batch puts the window's p99 over target
        cap.observe(latency)
    assert cap.value == 8
    for _ in range(4 * 10):
        cap.observe(1.0)
    assert cap.value == 1  # never below one row


class FakePool:
    def __init__(self, size: int) -> None:
        self.size = size

    def target_size(self) -> int:
        return self.size

    def scale_to(self, count: int) -> int:
        delta, self.size = count - self.size, count
        return delta


def test_autoscaler_waits_its_delays_and_stays_within_bounds() -> None:
    settings = ServeSettings(
        replicas=1,
        min_replicas=1,
        max_replicas=3,
        scale_up_load=2.0,
        scale_down_load=0.5,
        upscale_delay_s=1.0,
        downscale_delay_s=5.0,
    )
    pool = FakePool(1)
    load = [10.0]
    metrics = ServeMetrics()
    scaler = Autoscaler(pool, lambda: load[0], settings, metrics)  # type: ignore[arg-type]
    assert [scaler.step(t) for t in (0.0, 0.5, 0.99)] == [0, 0, 0]
    assert scaler.step(1.0) == 1 and pool.size == 2
    assert scaler.step(1.5) == 0  # the clock restarted after the event
    assert scaler.step(2.5) == 1 and pool.size == 3
    assert scaler.step(10.0) == 0 and scaler.step(20.0) == 0  # at max_replicas
    load[0] = 3.0  # 1 per replica: inside the band, nothing happens
    assert scaler.step(30.0) == 0 and scaler.step(60.0) == 0
    load[0] = 0.0
    assert scaler.step(61.0) == 0 and scaler.step(65.9) == 0
    assert scaler.step(66.0) == -1 and pool.size == 2
    # Evidence is gathered afresh at the new size: a full delay from the first low reading.
    assert scaler.step(67.0) == 0 and scaler.step(71.9) == 0
    assert scaler.step(72.0) == -1 and pool.size == 1
    assert scaler.step(100.0) == 0 and pool.size == 1  # at min_replicas
    assert [(d, n) for _, d, n in scaler.events] == [("up", 2), ("up", 3), ("down", 2), ("down", 1)]
    text = metrics.render().decode()
    assert 'distml_serve_scaling_events_total{direction="up"} 2.0' in text
    assert 'distml_serve_scaling_events_total{direction="down"} 2.0' in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 0, "max_replicas": 2}, "autoscaling needs process replicas"),
        (
            {"replicas": 4, "min_replicas": 1, "max_replicas": 2},
            "replicas=4 must lie within [1, 2]",
        ),
        ({"max_batch_size": 0}, "max_batch_size=0 must be >= 1"),
        ({"device": "tpu"}, "device='tpu': use cpu or cuda"),
    ],
)
def test_bad_settings_name_the_option(options: dict[str, object], message: str) -> None:
    from distml.errors import UserError

    with pytest.raises(UserError) as info:
        ServeSettings(**options)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_an_idle_batcher_runs_a_lone_request_at_once_and_batches_while_busy() -> None:
    async def main() -> tuple[float, list[int]]:
        model = FakeModel(delay_s=0.3)
        batcher = _batcher(model, cap=64, delay_s=5.0, inflight=2, wait_when_idle=False)
        start = time.monotonic()
        await batcher.submit("classify", [np.zeros(1, np.float32)])
        lone = time.monotonic() - start  # no 5 s wait: nothing was running
        first = asyncio.ensure_future(batcher.submit("classify", [np.zeros(1, np.float32)]))
        await asyncio.sleep(0.05)  # the first batch is now running
        rest = [batcher.submit("classify", [np.zeros(1, np.float32)]) for _ in range(5)]
        await asyncio.gather(first, *rest)
        await batcher.close()
        return lone, [len(b[0]) for b in model.batches]

    lone, sizes = asyncio.run(main())
    assert lone < 2.0
    # The five that arrived while a batch ran waited for it (not the 5 s delay), then ran together.
    assert sizes == [1, 1, 5]
