"""The federated gRPC client: join, long-poll for tasks, train locally, upload compressed updates.

A :class:`FederatedClient` learns the model architecture and data settings
from the server's Join reply, loads its own data (a ``.npz`` file or a shard
spec, see :mod:`distml.federated.deploy`), then loops: fetch a task (the
global model arrives in checksummed chunks, possibly quantized), train with
SGD under the server's settings and its own step budget, and send back only
the update ``w_local - w_global``, encoded by the round's codec with error
feedback kept across rounds; or, when the round asks for secure aggregation,
only a masked fixed-point vector through the ``SecAgg`` steps (see
:mod:`~distml.federated.transport.secure_round`). Raw data never leaves the client. Lost
connections (a restarted server) are retried until ``reconnect_timeout_s``;
rejections the user must fix (a bad token, an update the server refuses)
raise :class:`~distml.errors.UserError` with the server's explanation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch
import torch.nn.functional as F
from torch import nn

from distml.comm.codecs import FeedbackEncoder
from distml.errors import UserError
from distml.federated.deploy import ClientData, load_client_data
from distml.federated.parameters import (
    Parameters,
    flatten,
    get_parameters,
    parameter_names,
    subtract,
)
from distml.federated.privacy import add_gaussian_noise, clip_update
from distml.federated.secagg import (
    ForwardedShares,
    KeyDirectory,
    SecAggClient,
    SecAggError,
    UnmaskRequest,
)
from distml.federated.simulation import evaluate
from distml.federated.strategies import proximal_term
from distml.federated.transport import fl_pb2, fl_pb2_grpc
from distml.federated.transport.wire import (
    Assembler,
    PayloadError,
    decode_parameters,
    encode_parameters,
    iter_chunks,
    make_encoder,
    sha256_hex,
)

log = logging.getLogger("distml.federated")

#: Environment variable read for the bearer token when none is passed.
TOKEN_ENV = "DISTML_FL_TOKEN"

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class ClientSummary:
    """What one client did over the job."""

    name: str
    client_id: int
    fit_rounds: list[int] = field(default_factory=list)
    evaluate_rounds: list[int] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    batch_size: int,
    max_steps: int | None,
    seed: int,
    proximal_mu: float = 0.0,
) -> tuple[int, float]:
    """Plain SGD with cross-entropy on ``(x, y)``; returns (steps taken, mean batch loss).

    ``max_steps`` is the compute budget: training stops after that many steps
    even mid-epoch. ``proximal_mu > 0`` adds FedProx's term towards the
    weights the model started from.
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = torch.optim.SGD(params, lr=lr)
    model.train()
    steps, total = 0, 0.0
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            if max_steps is not None and steps >= max_steps:
                return steps, total / max(steps, 1)
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            total += float(loss.detach())
            if anchor:
                loss = loss + proximal_term(params, anchor, proximal_mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    return steps, total / max(steps, 1)


class FederatedClient:
    """One federated client process; :meth:`run` returns when the server says FINISH."""

    def __init__(
        self,
        server: str,
        data: str | ClientData,
        *,
        token: str | None = None,
        name: str | None = None,
        root_cert: str | os.PathLike[str] | bytes | None = None,
        tls_server_name: str | None = None,
        max_steps: int | None = None,
        seed: int | None = None,
        reconnect_timeout_s: float = 60.0,
        max_message_mb: float = 16.0,
    ) -> None:
        if max_steps is not None and max_steps < 1:
            raise UserError(f"client max_steps must be >= 1, got {max_steps}")
        self.server = server
        self.data_spec = data
        self.token = token
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.max_steps = max_steps
        self.seed = seed if seed is not None else zlib.crc32(self.name.encode())
        self.reconnect_timeout_s = reconnect_timeout_s
        limit = int(max_message_mb * 2**20)
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Reconnect quickly after a server restart instead of backing off for minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if root_cert is not None:
            pem = root_cert if isinstance(root_cert, bytes) else Path(root_cert).read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=pem)
            self.channel = grpc.secure_channel(server, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(server, options=options)
        self.stub = fl_pb2_grpc.FederatedLearningStub(self.channel)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.summary = ClientSummary(self.name, -1)
        self._joined: Any = None
        self._model: nn.Module | None = None
        self._data: ClientData | None = None
        self._encoders: dict[tuple[str, float, bool], FeedbackEncoder] = {}

    def close(self) -> None:
        self.channel.close()

    # -- protocol --------------------------------------------------------------

    def run(self) -> ClientSummary:
        """Serve tasks until the server finishes; retries lost connections."""
        last_ok = time.monotonic()
        try:
            while True:
                try:
                    if self._joined is None:
                        self._join()
                    header, payload = self._get_task()
                except grpc.RpcError as err:
                    last_ok = self._handle_error(err, last_ok)
                    continue
                except PayloadError as exc:
                    # A damaged download: the task stays open until its deadline, fetch it again.
                    log.warning("client %s: discarded a task download: %s", self.name, exc)
                    time.sleep(0.5)
                    continue
                last_ok = time.monotonic()
                if header.kind == fl_pb2.FINISH:
                    log.info("client %s: server finished the job", self.name)
                    return self.summary
                if header.kind == fl_pb2.WAIT:
                    continue
                self._serve(header, payload)
        finally:
            self.close()

    def _handle_error(self, err: grpc.RpcError, last_ok: float) -> float:
        code = err.code()
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            self._joined = None  # e.g. a server on a fresh state dir: join again
            time.sleep(0.2)
            return last_ok
        if code not in _RETRYABLE:
            raise UserError(
                f"server {self.server} refused the client: {code.name}: {err.details()}"
            )
        waited = time.monotonic() - last_ok
        if waited > self.reconnect_timeout_s:
            raise UserError(
                f"lost the federated server at {self.server} for {waited:.0f}s ({code.name}); "
                "check that it runs and restart the client"
            )
        time.sleep(0.5)
        return last_ok

    def _join(self) -> None:
        reply = self.stub.Join(
            fl_pb2.JoinRequest(client_name=self.name), metadata=self.metadata, timeout=30.0
        )
        self._joined = reply
        self.name = reply.client_name
        self.summary.name = reply.client_name
        self.summary.client_id = int(reply.client_id)
        if self._model is None:
            from distml.models import build_model

            self._model = build_model(reply.model_name, json.loads(reply.model_args_json))
            data_settings = json.loads(reply.data_json or "{}")
            if isinstance(self.data_spec, ClientData):
                self._data = self.data_spec
            else:
                self._data = load_client_data(
                    self.data_spec, data=data_settings, seed=int(data_settings.get("seed", 0))
                )
            log.info(
                "client %s joined %s as id %d with %d local samples",
                self.name,
                self.server,
                reply.client_id,
                len(self._data),
            )

    def _get_task(self) -> tuple[Any, bytes]:
        model = self._require_model()
        poll = float(self._joined.poll_timeout_s)
        stream = self.stub.GetTask(
            fl_pb2.TaskRequest(client_name=self.name), metadata=self.metadata, timeout=poll + 120
        )
        header: Any = None
        assembler: Assembler | None = None
        limit = 4 * sum(t.numel() * 4 for t in model.state_dict().values()) + 2**20
        for message in stream:
            if message.WhichOneof("msg") == "header":
                header = message.header
                if header.kind in (fl_pb2.FIT, fl_pb2.EVALUATE):
                    assembler = Assembler(header.payload_size, header.sha256, limit, "global model")
            elif assembler is not None:
                assembler.add(message.chunk)
        if header is None:
            raise UserError(f"server {self.server} sent a task without a header; is it distml?")
        payload = assembler.finish() if assembler is not None else b""
        self.summary.bytes_received += len(payload)
        return header, payload

    def _serve(self, header: Any, payload: bytes) -> None:
        model = self._require_model()
        names = parameter_names(model)
        shapes = [tuple(t.shape) for t in model.state_dict().values()]
        global_params = decode_parameters(payload, header.codec, names, shapes)
        model.load_state_dict(dict(zip(names, global_params, strict=True)))
        if header.kind == fl_pb2.FIT:
            config = json.loads(header.config_json)
            if config.get("secagg_threshold"):
                self._fit_secure(header, config, global_params)
                return
            result = self._fit(int(header.round), config, global_params)
        else:
            result = self._evaluate(global_params)
        try:
            reply = self.stub.SubmitResult(
                self._result_messages(header, *result), metadata=self.metadata, timeout=120.0
            )
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, *_RETRYABLE):
                log.info(
                    "client %s: round %d result not taken (%s)",
                    self.name,
                    header.round,
                    err.details(),
                )
                return
            raise UserError(
                f"server {self.server} rejected the round {header.round} result: "
                f"{err.code().name}: {err.details()}"
            ) from None
        self.summary.bytes_sent += int(reply.bytes_received)
        rounds = (
            self.summary.fit_rounds if header.kind == fl_pb2.FIT else self.summary.evaluate_rounds
        )
        rounds.append(int(header.round))

    def _fit(
        self, server_round: int, config: dict[str, Any], global_params: Parameters
    ) -> tuple[Any, bytes]:
        update, metrics = self._train(server_round, config, global_params)
        codec = str(config.get("upload_codec", "none"))
        encoder = self._encoder(
            codec, float(config.get("topk_fraction", 0.01)), bool(config.get("error_feedback"))
        )
        payload = encode_parameters(update, encoder)
        header = fl_pb2.ResultHeader(
            num_examples=len(self._require_data()), metrics=_finite(metrics), codec=codec
        )
        return header, payload

    def _fit_secure(self, task: Any, config: dict[str, Any], global_params: Parameters) -> None:
        """Train, then upload the update only as a masked vector through the SecAgg steps.

        The vector is ``[w * update, w * loss, n, w]`` with ``w = n`` (FedAvg's
        example weighting) or ``w = 1`` (DP, uniform); the server unmasks only the sum.
        """
        update, metrics = self._train(int(task.round), config, global_params)
        n = float(len(self._require_data()))
        w = 1.0 if config.get("secagg_weighting") == "uniform" else n
        tail = torch.tensor([w * metrics["train_loss"], n, w], dtype=torch.float64)
        vector = torch.cat([flatten(update, torch.float64) * w, tail])
        if 8 * len(vector) + 4096 > int(self._joined.max_message_bytes):
            raise UserError(
                f"the masked update ({8 * len(vector)} bytes) exceeds the server's message limit; "
                "raise federated.max_message_mb on the server"
            )
        sa = SecAggClient(self.summary.client_id, len(vector))
        try:
            keys = sa.advertise_keys()
            directory = self._secure_step(
                task,
                "keys",
                fl_pb2.SecAggKeys(
                    enc_public_key=keys.enc_public_key, mask_public_key=keys.mask_public_key
                ),
            ).directory
            shares = sa.share_keys(
                KeyDirectory(
                    list(directory.client_ids),
                    list(directory.enc_public_keys),
                    list(directory.mask_public_keys),
                    int(directory.threshold),
                )
            )
            forwarded = self._secure_step(
                task,
                "shares",
                fl_pb2.SecAggShares(
                    recipient_ids=shares.recipient_ids, ciphertexts=shares.ciphertexts
                ),
            ).forwarded
            masked = sa.masked_input(
                ForwardedShares(
                    sa.client_id, list(forwarded.sender_ids), list(forwarded.ciphertexts)
                ),
                vector,
            )
            request = self._secure_step(
                task, "masked", fl_pb2.SecAggMasked(data=masked.data)
            ).unmask_request
            response = sa.unmask(
                UnmaskRequest(list(request.survivor_ids), list(request.dropped_ids))
            )
            self._secure_step(
                task,
                "unmask",
                fl_pb2.SecAggUnmask(
                    seed_owner_ids=response.seed_owner_ids,
                    seed_shares=response.seed_shares,
                    key_owner_ids=response.key_owner_ids,
                    key_shares=response.key_shares,
                ),
            )
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.FAILED_PRECONDITION, *_RETRYABLE):
                log.info(
                    "client %s: round %d secure aggregation left without it (%s)",
                    self.name,
                    task.round,
                    err.details(),
                )
                return
            raise UserError(
                f"server {self.server} rejected the round {task.round} secure aggregation: "
                f"{err.code().name}: {err.details()}"
            ) from None
        except SecAggError as exc:
            # A malformed directory or share from the server: skip this round, keep serving.
            log.warning(
                "client %s: round %d secure aggregation aborted: %s", self.name, task.round, exc
            )
            return
        self.summary.fit_rounds.append(int(task.round))

    def _secure_step(self, task: Any, step: str, message: Any) -> Any:
        """Send one SecAgg step; returns the server's answer once the step closed."""
        request = fl_pb2.SecAggRequest(client_name=self.name, task_id=task.task_id)
        getattr(request, step).CopyFrom(message)
        reply = self.stub.SecAgg(request, metadata=self.metadata, timeout=600.0)
        self.summary.bytes_sent += request.ByteSize()
        self.summary.bytes_received += reply.ByteSize()
        return reply

    def _train(
        self, server_round: int, config: dict[str, Any], global_params: Parameters
    ) -> tuple[Parameters, dict[str, float]]:
        """Local SGD from ``global_params``; the (possibly clipped and noised) update."""
        model, data = self._require_model(), self._require_data()
        budget = [s for s in (config.get("max_steps"), self.max_steps) if s is not None]
        start = time.perf_counter()
        steps, loss = train_local(
            model,
            data.x,
            data.y,
            lr=float(config.get("lr", 0.05)),
            epochs=int(config.get("local_epochs", 1)),
            batch_size=int(config.get("batch_size", 32)),
            max_steps=min(budget) if budget else None,
            seed=self.seed * 100_003 + server_round,
            proximal_mu=float(config.get("proximal_mu", 0.0)),
        )
        update = subtract(get_parameters(model), global_params)
        if "dp_clip_norm" in config:
            # Local differential privacy: clip and noise before anything leaves the device.
            clip = float(config["dp_clip_norm"])
            gen = torch.Generator().manual_seed(secrets.randbits(62))
            update = add_gaussian_noise(
                clip_update(update, clip), float(config["dp_noise_multiplier"]) * clip, gen
            )
        metrics = {
            "train_loss": loss,
            "local_steps": float(steps),
            "train_seconds": time.perf_counter() - start,
        }
        return update, metrics

    def _evaluate(self, global_params: Parameters) -> tuple[Any, bytes]:
        model, data = self._require_model(), self._require_data()
        x, y = data.eval_split()
        loss, acc = evaluate(model, global_params, x, y)
        header = fl_pb2.ResultHeader(
            num_examples=len(x), loss=loss, metrics=_finite({"accuracy": acc})
        )
        return header, b""

    def _result_messages(self, task: Any, header: Any, payload: bytes) -> Iterator[Any]:
        header.client_name = self.name
        header.task_id = task.task_id
        if task.kind == fl_pb2.FIT:
            header.payload_size = len(payload)
            header.sha256 = sha256_hex(payload)
        yield fl_pb2.ResultMessage(header=header)
        for chunk in iter_chunks(payload, int(self._joined.chunk_size)):
            yield fl_pb2.ResultMessage(chunk=chunk)

    def _encoder(self, codec: str, fraction: float, feedback: bool) -> FeedbackEncoder:
        key = (codec, fraction, feedback)
        if key not in self._encoders:
            self._encoders[key] = make_encoder(
                codec,
                topk_fraction=fraction,
                error_feedback=feedback,
                stochastic=True,
                seed=self.seed,
            )
        return self._encoders[key]

    def _require_model(self) -> nn.Module:
        if self._model is None:
            raise RuntimeError("client has not joined yet")
        return self._model

    def _require_data(self) -> ClientData:
        if self._data is None:
            raise RuntimeError("client has not joined yet")
        return self._data


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def run_client(
    server: str,
    *,
    data: str,
    token: str | None = None,
    name: str | None = None,
    root_cert: str | None = None,
    tls_server_name: str | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    reconnect_timeout_s: float = 60.0,
) -> ClientSummary:
    """Join the federated server at ``server`` (HOST:PORT) and serve it until it finishes.

    ``data`` is a ``.npz`` path or a shard spec such as ``digits:0/2``;
    ``root_cert`` (a PEM file) turns on TLS; ``token`` is this client's
    bearer token (default: the ``DISTML_FL_TOKEN`` environment variable, which
    keeps it out of process listings); ``max_steps`` caps local SGD steps per round.
    """
    client = FederatedClient(
        server,
        data,
        token=token if token is not None else os.environ.get(TOKEN_ENV) or None,
        name=name,
        root_cert=root_cert,
        tls_server_name=tls_server_name,
        max_steps=max_steps,
        seed=seed,
        reconnect_timeout_s=reconnect_timeout_s,
    )
    return client.run()
