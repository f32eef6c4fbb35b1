"""Secure aggregation for one round (Bonawitz et al. 2017, semi-honest variant), as messages.

The server learns the sum of the clients' vectors and nothing else, even when
some clients drop out. Each client has two X25519 key pairs: ``enc`` keys
derive AES-GCM keys for the Shamir shares it sends to peers through the
server, ``mask`` keys derive a pairwise seed ``s_uv`` with every peer. A client
``u`` sends ``y_u = x_u + PRG(b_u) + sum_v sign(u, v) PRG(s_uv)  (mod 2^64)``
with ``sign = +1`` if ``u < v`` else ``-1``, so pairwise masks cancel in the
sum; ``b_u`` is a random self-mask seed. ``b_u`` and the mask private key are
Shamir-shared (threshold ``t``) among the round's clients. At unmasking each
surviving client reveals, per peer, either its share of ``b_v`` (``v`` sent a
masked input) or of ``v``'s mask key (``v`` dropped before sending it), never
both, and the server removes the remaining masks.

Rounds (message types): :class:`AdvertiseKeys` -> :class:`KeyDirectory` ->
:class:`EncryptedShares` -> :class:`ForwardedShares` -> :class:`MaskedInput` ->
:class:`UnmaskRequest` -> :class:`UnmaskResponse`. Messages hold only ints,
bytes and lists of them, so a transport can map them to protobuf; nothing is
pickled. The PRG is AES-256-CTR keyed through HKDF-SHA256. Floats are encoded
by :class:`FixedPoint`. The protocol assumes a semi-honest server (no
signatures or consistency round); pick ``t > n/2``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from distml.errors import ConfigError, DistmlError

#: Field of the Shamir shares: the Mersenne prime 2^521 - 1 holds 256-bit keys and seeds.
PRIME = 2**521 - 1
_SHARE_BYTES = 66
_SEED_BYTES = 32


class SecAggError(DistmlError):
    """A protocol step was invalid: too few clients, a bad message, or steps out of order."""


# -- Shamir secret sharing over GF(PRIME) -------------------------------------


def shamir_split(secret: int, threshold: int, xs: Sequence[int]) -> list[int]:
    """``f(x)`` for each x, ``f`` random of degree ``threshold - 1`` with ``f(0) = secret``."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be in [0, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in 1..{len(xs)}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y)
    return shares


def shamir_reconstruct(points: Sequence[tuple[int, int]]) -> int:
    """``f(0)`` by Lagrange interpolation through ``points`` (at least ``threshold`` of them)."""
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise ValueError("share points must be distinct")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# -- fixed-point encoding and the mask PRG --------------------------------------


@dataclass(frozen=True)
class FixedPoint:
    """Floats <-> integers mod 2^64: ``round(clamp(x, -clip, clip) * 2^scale_bits)``.

    The rounding error is at most ``2^-(scale_bits+1)`` per value and client.
    The sum decodes exactly while ``clients * clip * 2^scale_bits < 2^63``;
    the defaults (clip 2^20, 24 bits) allow 2^19 clients with 6e-8 resolution.
    """

    scale_bits: int = 24
    clip: float = 2.0**20

    def __post_init__(self) -> None:
        if not 0 <= self.scale_bits <= 52 or self.clip <= 0:
            raise ConfigError(
                f"fixed point needs 0 <= scale_bits <= 52 and clip > 0, got "
                f"scale_bits={self.scale_bits}, clip={self.clip}"
            )
        if self.max_clients < 1:
            raise ConfigError("fixed point clip * 2^scale_bits must be below 2^62; lower either")

    @property
    def max_clients(self) -> int:
        return int(2.0**63 // (self.clip * 2.0**self.scale_bits + 1))

    def encode(self, values: torch.Tensor | np.ndarray) -> np.ndarray:
        x = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else values
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), -self.clip, self.clip)
        return np.rint(x * 2.0**self.scale_bits).astype(np.int64).view(np.uint64)

    def decode(self, encoded: np.ndarray) -> np.ndarray:
        return encoded.astype(np.uint64).view(np.int64).astype(np.float64) / 2.0**self.scale_bits


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def prg(seed: bytes, dim: int) -> np.ndarray:
    """``dim`` pseudorandom uint64 words: AES-256-CTR keystream under ``HKDF(seed)``."""
    key = _hkdf(seed, b"distml-secagg/prg")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    stream = encryptor.update(b"\0" * (8 * dim)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _pair_seed(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, b"distml-secagg/mask")


def _apply_pair_mask(acc: np.ndarray, own_id: int, peer_id: int, seed: bytes, add: bool) -> None:
    """Add (or, with ``add=False``, remove) the mask ``own_id`` uses toward ``peer_id``."""
    mask = prg(seed, len(acc))
    if (own_id < peer_id) == add:
        acc += mask
    else:
        acc -= mask


def _int_to_share(value: int) -> bytes:
    return value.to_bytes(_SHARE_BYTES, "big")


def _share_to_int(data: bytes) -> int:
    if len(data) != _SHARE_BYTES:
        raise SecAggError(f"a share must be {_SHARE_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")


def _x(client_id: int) -> int:
    # Shamir points must be nonzero; client ids start at 0.
    return client_id + 1


# -- messages --------------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseKeys:
    """Client -> server, round 0: the client's two public keys (32 bytes each)."""

    client_id: int
    enc_public_key: bytes
    mask_public_key: bytes


@dataclass(frozen=True)
class KeyDirectory:
    """Server -> every client: all advertised keys (U1) and the threshold."""

    client_ids: list[int]
    enc_public_keys: list[bytes]
    mask_public_keys: list[bytes]
    threshold: int


@dataclass(frozen=True)
class EncryptedShares:
    """Client -> server, round 1: AES-GCM ciphertexts of shares, one per peer."""

    sender_id: int
    recipient_ids: list[int]
    ciphertexts: list[bytes]


@dataclass(frozen=True)
class ForwardedShares:
    """Server -> one client: the ciphertexts addressed to it by the senders in U2."""

    recipient_id: int
    sender_ids: list[int]
    ciphertexts: list[bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Client -> server, round 2: the masked vector as little-endian uint64 bytes."""

    client_id: int
    data: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> survivors: who sent masked inputs (U3) and who dropped (U2 minus U3)."""

    survivor_ids: list[int]
    dropped_ids: list[int]


@dataclass(frozen=True)
class UnmaskResponse:
    """Client -> server, round 4: self-mask seed shares of survivors, mask key shares of dropped."""

    client_id: int
    seed_owner_ids: list[int]
    seed_shares: list[bytes]
    key_owner_ids: list[int]
    key_shares: list[bytes]


# -- client ----------------------------------------------------------------------


@dataclass
class _Peer:
    enc_public_key: bytes
    mask_public_key: bytes
    seed_share: int = 0
    key_share: int = 0


class SecAggClient:
    """One client's side of a round: call the four steps in order, each once."""

    def __init__(self, client_id: int, dim: int, fixed_point: FixedPoint | None = None) -> None:
        if client_id < 0 or dim < 1:
            raise ConfigError(f"secagg needs client_id >= 0 and dim >= 1, got {client_id}, {dim}")
        self.client_id = client_id
        self.dim = dim
        self.fixed_point = fixed_point or FixedPoint()
        self._enc_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._self_seed = secrets.token_bytes(_SEED_BYTES)
        self._peers: dict[int, _Peer] = {}
        self._channel_keys: dict[int, bytes] = {}
        self._threshold = 0
        self._u2: list[int] = []
        self._step = 0

    def _advance(self, expected: int, name: str) -> None:
        if self._step != expected:
            raise SecAggError(f"client {self.client_id}: {name} called out of order")
        self._step += 1

    def advertise_keys(self) -> AdvertiseKeys:
        self._advance(0, "advertise_keys")
        return AdvertiseKeys(
            self.client_id,
            self._enc_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
        )

    def share_keys(self, directory: KeyDirectory) -> EncryptedShares:
        """Shamir-share the self-mask seed and the mask key among U1, encrypted per peer."""
        self._advance(1, "share_keys")
        ids = directory.client_ids
        t = directory.threshold
        if len(set(ids)) != len(ids) or self.client_id not in ids:
            raise SecAggError(f"client {self.client_id}: key directory is malformed")
        if not 2 <= t <= len(ids):
            raise SecAggError(
                f"client {self.client_id}: threshold {t} invalid for {len(ids)} clients"
            )
        me = ids.index(self.client_id)
        if directory.mask_public_keys[me] != self._mask_key.public_key().public_bytes_raw():
            raise SecAggError(
                f"client {self.client_id}: directory holds a wrong key for this client"
            )
        self._threshold = t
        self._peers = {
            v: _Peer(e, m)
            for v, e, m in zip(
                ids, directory.enc_public_keys, directory.mask_public_keys, strict=True
            )
        }
        xs = [_x(v) for v in ids]
        seed_shares = shamir_split(int.from_bytes(self._self_seed, "big"), t, xs)
        key_int = int.from_bytes(self._mask_key.private_bytes_raw(), "big")
        key_shares = shamir_split(key_int, t, xs)
        recipients, ciphertexts = [], []
        for v, s_share, k_share in zip(ids, seed_shares, key_shares, strict=True):
            if v == self.client_id:
                self._peers[v].seed_share, self._peers[v].key_share = s_share, k_share
                continue
            plain = (
                self.client_id.to_bytes(8, "big")
                + v.to_bytes(8, "big")
                + _int_to_share(s_share)
                + _int_to_share(k_share)
            )
            nonce = secrets.token_bytes(12)
            aead = AESGCM(self._channel_key(v))
            recipients.append(v)
            ciphertexts.append(nonce + aead.encrypt(nonce, plain, _aad(self.client_id, v)))
        return EncryptedShares(self.client_id, recipients, ciphertexts)

    def _channel_key(self, peer: int) -> bytes:
        # Cached: the same key encrypts shares to the peer and decrypts the peer's shares,
        # and each X25519 exchange is the protocol's main cost.
        key = self._channel_keys.get(peer)
        if key is None:
            shared = self._enc_key.exchange(
                X25519PublicKey.from_public_bytes(self._peers[peer].enc_public_key)
            )
            key = self._channel_keys[peer] = _hkdf(shared, b"distml-secagg/enc")
        return key

    def masked_input(
        self, forwarded: ForwardedShares, values: torch.Tensor | np.ndarray
    ) -> MaskedInput:
        """Decrypt peers' shares, then mask the encoded ``values`` against every peer in U2."""
        self._advance(2, "masked_input")
        if forwarded.recipient_id != self.client_id:
            raise SecAggError(f"client {self.client_id}: got shares for {forwarded.recipient_id}")
        for v, blob in zip(forwarded.sender_ids, forwarded.ciphertexts, strict=True):
            if v not in self._peers or v == self.client_id:
                raise SecAggError(f"client {self.client_id}: shares from unknown client {v}")
            try:
                plain = AESGCM(self._channel_key(v)).decrypt(
                    blob[:12], blob[12:], _aad(v, self.client_id)
                )
            except Exception:
                raise SecAggError(
                    f"client {self.client_id}: shares from {v} fail to decrypt"
                ) from None
            if plain[:16] != v.to_bytes(8, "big") + self.client_id.to_bytes(8, "big"):
                raise SecAggError(f"client {self.client_id}: shares from {v} are mislabelled")
            self._peers[v].seed_share = _share_to_int(plain[16 : 16 + _SHARE_BYTES])
            self._peers[v].key_share = _share_to_int(plain[16 + _SHARE_BYTES :])
        self._u2 = sorted({*forwarded.sender_ids, self.client_id})
        if len(self._u2) < self._threshold:
            raise SecAggError(
                f"client {self.client_id}: only {len(self._u2)} clients shared keys, "
                f"threshold is {self._threshold}"
            )
        encoded = self.fixed_point.encode(values)
        if encoded.shape != (self.dim,):
            raise SecAggError(
                f"client {self.client_id}: input has {encoded.size} values, expected {self.dim}"
            )
        masked = encoded + prg(self._self_seed, self.dim)
        for v in self._u2:
            if v != self.client_id:
                seed = _pair_seed(self._mask_key, self._peers[v].mask_public_key)
                _apply_pair_mask(masked, self.client_id, v, seed, add=True)
        return MaskedInput(self.client_id, masked.astype("<u8").tobytes())

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Reveal seed shares of survivors and key shares of dropped clients, never both."""
        self._advance(3, "unmask")
        survivors, dropped = set(request.survivor_ids), set(request.dropped_ids)
        if survivors & dropped or survivors | dropped != set(self._u2):
            raise SecAggError(f"client {self.client_id}: unmask request does not partition U2")
        if self.client_id not in survivors:
            raise SecAggError(f"client {self.client_id}: listed as dropped after sending its input")
        if len(survivors) < self._threshold:
            raise SecAggError(f"client {self.client_id}: fewer survivors than the threshold")
        seed_ids, key_ids = sorted(survivors), sorted(dropped)
        return UnmaskResponse(
            self.client_id,
            seed_ids,
            [_int_to_share(self._peers[v].seed_share) for v in seed_ids],
            key_ids,
            [_int_to_share(self._peers[v].key_share) for v in key_ids],
        )


def _aad(sender: int, recipient: int) -> bytes:
    return b"distml-secagg/" + sender.to_bytes(8, "big") + recipient.to_bytes(8, "big")


# -- server ----------------------------------------------------------------------


@dataclass
class _RoundState:
    enc_keys: dict[int, bytes] = field(default_factory=dict)
    mask_keys: dict[int, bytes] = field(default_factory=dict)
    u2: list[int] = field(default_factory=list)
    u3: list[int] = field(default_factory=list)


class SecAggServer:
    """The aggregator: relays shares, keeps only the running sum of masked inputs, unmasks it."""

    def __init__(self, dim: int, threshold: int, fixed_point: FixedPoint | None = None) -> None:
        if threshold < 2 or dim < 1:
            raise ConfigError(
                f"secure aggregation needs threshold >= 2 and dim >= 1, got {threshold}"
            )
        self.dim = dim
        self.threshold = threshold
        self.fixed_point = fixed_point or FixedPoint()
        self._state = _RoundState()
        self._masked_sum = np.zeros(dim, dtype=np.uint64)
        self._step = 0

    def _advance(self, expected: int, name: str) -> None:
        if self._step != expected:
            raise SecAggError(f"server: {name} called out of order")
        self._step += 1

    def _need(self, count: int, what: str) -> None:
        if count < self.threshold:
            raise SecAggError(f"server: only {count} clients {what}, threshold is {self.threshold}")

    def collect_keys(self, messages: Sequence[AdvertiseKeys]) -> KeyDirectory:
        self._advance(0, "collect_keys")
        for m in messages:
            if m.client_id in self._state.mask_keys:
                raise SecAggError(f"server: client {m.client_id} advertised keys twice")
            if len(m.enc_public_key) != 32 or len(m.mask_public_key) != 32:
                raise SecAggError(f"server: client {m.client_id} sent malformed keys")
            self._state.enc_keys[m.client_id] = m.enc_public_key
            self._state.mask_keys[m.client_id] = m.mask_public_key
        self._need(len(self._state.mask_keys), "advertised keys")
        if len(self._state.mask_keys) > self.fixed_point.max_clients:
            raise ConfigError("more clients than the fixed-point range can sum; lower clip")
        ids = sorted(self._state.mask_keys)
        return KeyDirectory(
            ids,
            [self._state.enc_keys[i] for i in ids],
            [self._state.mask_keys[i] for i in ids],
            self.threshold,
        )

    def collect_shares(self, messages: Sequence[EncryptedShares]) -> dict[int, ForwardedShares]:
        """Route ciphertexts among the senders (U2); returns one bundle per U2 client."""
        self._advance(1, "collect_shares")
        u2 = sorted({m.sender_id for m in messages if m.sender_id in self._state.mask_keys})
        self._need(len(u2), "shared keys")
        self._state.u2 = u2
        inbox: dict[int, tuple[list[int], list[bytes]]] = {v: ([], []) for v in u2}
        for m in messages:
            if m.sender_id not in u2:
                continue
            for v, blob in zip(m.recipient_ids, m.ciphertexts, strict=True):
                if v in inbox and v != m.sender_id:
                    inbox[v][0].append(m.sender_id)
                    inbox[v][1].append(blob)
        return {v: ForwardedShares(v, senders, blobs) for v, (senders, blobs) in inbox.items()}

    def collect_masked_inputs(self, messages: Sequence[MaskedInput]) -> UnmaskRequest:
        """Add masked inputs into the running sum (none is kept) and name survivors and dropped."""
        self._advance(2, "collect_masked_inputs")
        seen: set[int] = set()
        for m in messages:
            if m.client_id not in self._state.u2 or m.client_id in seen:
                raise SecAggError(f"server: unexpected masked input from client {m.client_id}")
            if len(m.data) != 8 * self.dim:
                raise SecAggError(f"server: masked input of client {m.client_id} has wrong size")
            self._masked_sum += np.frombuffer(m.data, dtype="<u8").astype(np.uint64)
            seen.add(m.client_id)
        self._need(len(seen), "sent masked inputs")
        self._state.u3 = sorted(seen)
        dropped = sorted(set(self._state.u2) - seen)
        return UnmaskRequest(self._state.u3, dropped)

    @property
    def included_clients(self) -> list[int]:
        """Clients whose inputs are in the sum (U3), known after masked inputs arrive."""
        return list(self._state.u3)

    def finish(self, responses: Sequence[UnmaskResponse]) -> np.ndarray:
        """Remove all masks with the revealed shares and return the decoded float64 sum."""
        self._advance(3, "finish")
        u3 = self._state.u3
        dropped = sorted(set(self._state.u2) - set(u3))
        responses = [r for r in responses if r.client_id in u3]
        self._need(len({r.client_id for r in responses}), "answered the unmask request")
        seeds: dict[int, list[tuple[int, int]]] = {v: [] for v in u3}
        keys: dict[int, list[tuple[int, int]]] = {v: [] for v in dropped}
        for r in responses:
            if set(r.seed_owner_ids) & set(r.key_owner_ids):
                raise SecAggError(f"server: client {r.client_id} revealed both shares of a peer")
            for v, share in zip(r.seed_owner_ids, r.seed_shares, strict=True):
                if v in seeds:
                    seeds[v].append((_x(r.client_id), _share_to_int(share)))
            for v, share in zip(r.key_owner_ids, r.key_shares, strict=True):
                if v in keys:
                    keys[v].append((_x(r.client_id), _share_to_int(share)))
        total = self._masked_sum.copy()
        for v, points in seeds.items():
            self._need(len(points), f"revealed the self-mask seed of client {v}")
            value = shamir_reconstruct(points[: self.threshold])
            if value >= 2 ** (8 * _SEED_BYTES):
                raise SecAggError(f"server: reconstructed seed of client {v} is out of range")
            total -= prg(value.to_bytes(_SEED_BYTES, "big"), self.dim)
        for v, points in keys.items():
            self._need(len(points), f"revealed the mask key of dropped client {v}")
            key = self._recover_mask_key(v, shamir_reconstruct(points[: self.threshold]))
            for u in u3:
                _apply_pair_mask(total, u, v, _pair_seed(key, self._state.mask_keys[u]), add=False)
        return self.fixed_point.decode(total)

    def _recover_mask_key(self, client_id: int, value: int) -> X25519PrivateKey:
        if value >= 2**256:
            raise SecAggError(f"server: shares of client {client_id}'s mask key are inconsistent")
        key = X25519PrivateKey.from_private_bytes(value.to_bytes(32, "big"))
        if key.public_key().public_bytes_raw() != self._state.mask_keys[client_id]:
            raise SecAggError(f"server: shares of client {client_id}'s mask key are inconsistent")
        return key


# -- in-process driver -----------------------------------------------------------


def secure_sum(
    inputs: Mapping[int, torch.Tensor | np.ndarray],
    threshold: int,
    *,
    fixed_point: FixedPoint | None = None,
    drop_before_masking: Sequence[int] = (),
    drop_after_masking: Sequence[int] = (),
) -> tuple[np.ndarray, list[int]]:
    """Run one full round in memory; returns the sum and the ids whose inputs it contains.

    ``drop_before_masking`` clients share keys but never send their input (left
    out of the sum); ``drop_after_masking`` clients send their input but do not
    answer the unmask request (still in the sum). The simulation and tests use
    this; a deployment drives the same objects over its transport.
    """
    if not inputs:
        raise ConfigError("secure_sum needs at least one client input")
    dims = {int(np.asarray(v.shape).prod()) for v in inputs.values()}
    if len(dims) != 1:
        raise ConfigError("secure_sum inputs must all have the same number of values")
    dim = dims.pop()
    fp = fixed_point or FixedPoint()
    server = SecAggServer(dim, threshold, fp)
    clients = {cid: SecAggClient(cid, dim, fp) for cid in sorted(inputs)}
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bundles = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    masked = [
        clients[cid].masked_input(bundles[cid], inputs[cid])
        for cid in clients
        if cid not in drop_before_masking
    ]
    request = server.collect_masked_inputs(masked)
    responses = [
        clients[cid].unmask(request)
        for cid in request.survivor_ids
        if cid not in drop_after_masking
    ]
    return server.finish(responses), server.included_clients


def weighted_input(update: Sequence[torch.Tensor], num_examples: int) -> torch.Tensor:
    """``[n * flatten(update), n]``: what a client sends so that the sum yields a weighted mean."""
    flat = torch.cat([t.reshape(-1).double() for t in update])
    return torch.cat(
        [flat * num_examples, torch.tensor([float(num_examples)], dtype=torch.float64)]
    )


def weighted_mean_from_sum(total: np.ndarray) -> tuple[torch.Tensor, float]:
    """Inverse of summed :func:`weighted_input`: the example-weighted mean vector and the count."""
    count = float(total[-1])
    if count <= 0:
        raise SecAggError("secure sum carries no examples")
    return torch.from_numpy(total[:-1] / count), count
