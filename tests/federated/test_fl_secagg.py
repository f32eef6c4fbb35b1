"""Secure aggregation: exact sums, dropout recovery, masking hides inputs, protocol checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from distml.federated.secagg import (
    PRIME,
    FixedPoint,
    SecAggClient,
    SecAggError,
    SecAggServer,
    UnmaskRequest,
    secure_sum,
    shamir_reconstruct,
    shamir_split,
    weighted_input,
    weighted_mean_from_sum,
)

DIM = 257


def _inputs(n: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {cid: rng.normal(scale=3.0, size=DIM) for cid in range(n)}


def _fp_tolerance(n: int, fp: FixedPoint) -> float:
    return n * 0.5 / 2.0**fp.scale_bits + 1e-12


def test_shamir_any_threshold_subset_reconstructs() -> None:
    secret = int.from_bytes(b"\x07" * 32, "big")
    xs = [1, 2, 3, 4, 5, 6]
    shares = shamir_split(secret, 4, xs)
    points = list(zip(xs, shares, strict=True))
    assert shamir_reconstruct(points[:4]) == secret
    assert shamir_reconstruct(points[2:]) == secret
    assert shamir_reconstruct(points) == secret
    # Below the threshold the interpolation gives an unrelated field element.
    assert shamir_reconstruct(points[:3]) != secret
    assert all(0 <= s < PRIME for s in shares)


def test_fixed_point_round_trip_and_clipping() -> None:
    fp = FixedPoint(scale_bits=16, clip=10.0)
    x = np.array([-12.0, -1.5, 0.0, 3.14159, 10.0, 25.0])
    decoded = fp.decode(fp.encode(x))
    np.testing.assert_allclose(decoded, np.clip(x, -10, 10), atol=0.5 / 2**16)
    assert fp.encode(x).dtype == np.uint64


def test_unmasked_sum_equals_plain_sum() -> None:
    inputs = _inputs(6)
    fp = FixedPoint()
    total, included = secure_sum(inputs, threshold=4, fixed_point=fp)
    assert included == list(range(6))
    np.testing.assert_allclose(total, sum(inputs.values()), rtol=0, atol=_fp_tolerance(6, fp))


@pytest.mark.parametrize("dropped", [[2], [1, 4]])
def test_clients_dropping_after_masking_are_still_summed(dropped: list[int]) -> None:
    inputs = _inputs(7, seed=1)
    total, included = secure_sum(inputs, threshold=4, drop_after_masking=dropped)
    assert included == list(range(7))
    np.testing.assert_allclose(total, sum(inputs.values()), atol=_fp_tolerance(7, FixedPoint()))


def test_clients_dropping_before_masking_are_cancelled_out() -> None:
    inputs = _inputs(7, seed=2)
    total, included = secure_sum(
        inputs, threshold=4, drop_before_masking=[0, 5], drop_after_masking=[3]
    )
    assert included == [1, 2, 3, 4, 6]
    expected = sum(inputs[c] for c in included)
    np.testing.assert_allclose(total, expected, atol=_fp_tolerance(5, FixedPoint()))


def test_too_many_dropouts_abort() -> None:
    inputs = _inputs(5, seed=3)
    with pytest.raises(SecAggError, match="only 3 clients sent masked inputs, threshold is 4"):
        secure_sum(inputs, threshold=4, drop_before_masking=[0, 1])
    with pytest.raises(SecAggError, match="only 3 clients answered the unmask request"):
        secure_sum(inputs, threshold=4, drop_after_masking=[0, 1])


def _arrays_in(obj: Any, seen: set[int] | None = None) -> Iterator[np.ndarray]:
    """Every numpy array and bytes payload reachable from ``obj``'s attributes."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (bytes, bytearray)) and len(obj) == 8 * DIM:
        yield np.frombuffer(obj, dtype="<u8")
    elif isinstance(obj, torch.Tensor):
        yield obj.detach().cpu().numpy()
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _arrays_in(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _arrays_in(v, seen)
    elif hasattr(obj, "__dict__"):
        yield from _arrays_in(vars(obj), seen)


def test_masked_vectors_hide_inputs_and_server_keeps_only_the_sum() -> None:
    inputs = _inputs(5, seed=4)
    fp = FixedPoint()
    server = SecAggServer(DIM, threshold=3, fixed_point=fp)
    clients = {c: SecAggClient(c, DIM, fp) for c in inputs}
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bundles = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    masked = [clients[c].masked_input(bundles[c], inputs[c]) for c in clients]
    for msg in masked:
        raw = fp.encode(inputs[msg.client_id])
        seen = np.frombuffer(msg.data, dtype="<u8")
        assert np.mean(seen == raw) < 0.01  # no coordinate leaks as is
        decoded = fp.decode(seen.copy())
        assert np.abs(decoded - inputs[msg.client_id]).mean() > 1e3
    request = server.collect_masked_inputs(masked)
    stored = list(_arrays_in(server))
    raws = [fp.encode(v) for v in inputs.values()]
    singles = [np.frombuffer(m.data, dtype="<u8") for m in masked]
    for arr in stored:
        for other in raws + singles:
            if arr.shape == other.shape:
                assert not np.array_equal(arr, other)
    total = server.finish([clients[c].unmask(request) for c in request.survivor_ids])
    np.testing.assert_allclose(total, sum(inputs.values()), atol=_fp_tolerance(5, fp))


def test_client_refuses_unsafe_unmask_requests() -> None:
    fp = FixedPoint()
    server = SecAggServer(DIM, threshold=3, fixed_point=fp)
    clients = {c: SecAggClient(c, DIM, fp) for c in range(4)}
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bundles = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    for c in clients:
        clients[c].masked_input(bundles[c], np.zeros(DIM))
    # Listing a client that sent its input as dropped would let the server unmask it.
    with pytest.raises(SecAggError, match="listed as dropped after sending its input"):
        clients[0].unmask(UnmaskRequest(survivor_ids=[1, 2, 3], dropped_ids=[0]))
    with pytest.raises(SecAggError, match="does not partition U2"):
        clients[1].unmask(UnmaskRequest(survivor_ids=[0, 1, 2, 3], dropped_ids=[3]))
    with pytest.raises(SecAggError, match="unmask called out of order"):
        clients[1].unmask(UnmaskRequest(survivor_ids=[0, 1, 2, 3], dropped_ids=[]))


def test_tampered_share_ciphertext_is_rejected() -> None:
    server = SecAggServer(DIM, threshold=2)
    clients = {c: SecAggClient(c, DIM) for c in range(3)}
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bundles = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    bundle = bundles[0]
    blob = bytearray(bundle.ciphertexts[0])
    blob[-1] ^= 1
    forged = dataclasses.replace(bundle, ciphertexts=[bytes(blob), *bundle.ciphertexts[1:]])
    with pytest.raises(SecAggError, match="fail to decrypt"):
        clients[0].masked_input(forged, np.zeros(DIM))


def test_messages_carry_only_ints_bytes_and_lists() -> None:
    server = SecAggServer(4, threshold=2)
    clients = {c: SecAggClient(c, 4) for c in range(3)}
    keys = [c.advertise_keys() for c in clients.values()]
    directory = server.collect_keys(keys)
    shares = [c.share_keys(directory) for c in clients.values()]
    bundles = server.collect_shares(shares)
    masked = [clients[c].masked_input(bundles[c], np.ones(4)) for c in clients]
    request = server.collect_masked_inputs(masked)
    responses = [clients[c].unmask(request) for c in request.survivor_ids]
    np.testing.assert_allclose(server.finish(responses), np.full(4, 3.0), atol=1e-6)

    def plain(value: Any) -> bool:
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return isinstance(value, (int, bytes))

    for msg in [*keys, directory, *shares, *bundles.values(), *masked, request, *responses]:
        for f in dataclasses.fields(msg):
            assert plain(getattr(msg, f.name)), (type(msg).__name__, f.name)


def test_weighted_mean_through_secure_sum() -> None:
    updates = {0: [torch.tensor([1.0, 2.0])], 1: [torch.tensor([3.0, -2.0])], 2: [torch.zeros(2)]}
    counts = {0: 10, 1: 30, 2: 60}
    total, _ = secure_sum({c: weighted_input(u, counts[c]) for c, u in updates.items()}, 2)
    mean, n = weighted_mean_from_sum(total)
    assert n == pytest.approx(100.0)
    torch.testing.assert_close(
        mean, torch.tensor([1.0, -0.4], dtype=torch.float64), atol=1e-6, rtol=0
    )
