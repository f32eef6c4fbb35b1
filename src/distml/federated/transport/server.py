"""The federated gRPC server: authentication, chunked transfers and input checks around rounds.

:class:`FederatedServer` builds the strategy (an unknown name is a
:class:`~distml.errors.ConfigError` before anything binds), the initial model
and the server's test split from a distml config, opens the state directory,
and serves the ``FederatedLearning`` service on 127.0.0.1 unless told
otherwise, with TLS when a certificate and key are given. With tokens
configured every call must carry ``authorization: Bearer <token>``, and the
token, not the request, names the client. Every failure of one request (bad
token, malformed or oversized message, update of the wrong shape) is answered
with a gRPC status and one line of explanation; the server goes on serving
the other clients. :func:`run_server` is the blocking entry point for the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pydantic
import torch
import yaml

from distml.config import Config
from distml.errors import CheckpointError, ConfigError, UserError
from distml.federated.config import FederatedSection
from distml.federated.parameters import num_bytes
from distml.federated.privacy import DifferentialPrivacy
from distml.federated.secagg import SecAggError
from distml.federated.strategies import EvaluateResult, FitResult, Scaffold, Strategy
from distml.federated.transport import fl_pb2, fl_pb2_grpc
from distml.federated.transport.rounds import (
    WAIT,
    NotJoined,
    RoundCoordinator,
    StaleTask,
    Task,
)
from distml.federated.transport.secure_round import as_message
from distml.federated.transport.store import ServerStore
from distml.federated.transport.wire import (
    UPLOAD_CODECS,
    Assembler,
    PayloadError,
    PayloadTooLarge,
    decode_parameters,
    iter_chunks,
)

log = logging.getLogger("distml.federated")

_NAME = re.compile(r"^[\w.@-]{1,64}$")
_MAX_METRICS = 64


class _Auth:
    """Maps a bearer token to its client name (constant-time), or trusts the claimed name."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._digests = [(hashlib.sha256(t.encode()).digest(), name) for name, t in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, context: grpc.ServicerContext, claimed: str) -> str:
        if not self._digests:
            if not _NAME.match(claimed):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "client_name must be 1-64 letters, digits or ._@- (this server has no tokens, "
                    "so clients name themselves; pass --name)",
                )
            return claimed
        value = dict(context.invocation_metadata()).get("authorization", "")
        if not isinstance(value, str) or not value.startswith("Bearer "):
            log.warning("rejected a call without a token from %s", context.peer())
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing 'authorization: Bearer <token>' metadata; start the client with --token",
            )
        digest = hashlib.sha256(value[len("Bearer ") :].encode()).digest()
        name = None
        for known, owner in self._digests:
            if hmac.compare_digest(known, digest):
                name = owner
        if name is None:
            log.warning("rejected a call with an invalid token from %s", context.peer())
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid token; use the token the server operator issued to this client",
            )
        return str(name)


class FederatedServicer(fl_pb2_grpc.FederatedLearningServicer):
    """gRPC handlers: thin adapters between messages and :class:`RoundCoordinator`."""

    def __init__(
        self,
        coordinator: RoundCoordinator,
        auth: _Auth,
        settings: FederatedSection,
        join_info: Mapping[str, str],
        upload_limit: int,
    ) -> None:
        self.coordinator = coordinator
        self.auth = auth
        self.settings = settings
        self.join_info = join_info
        self.upload_limit = upload_limit

    def Join(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = self.auth.identify(context, request.client_name)
        client_id = self.coordinator.join(name)
        log.info("client %r joined (id %d)", name, client_id)
        return fl_pb2.JoinReply(
            client_id=client_id,
            client_name=name,
            model_name=self.join_info["model_name"],
            model_args_json=self.join_info["model_args_json"],
            data_json=self.join_info["data_json"],
            poll_timeout_s=self.settings.poll_timeout_s,
            chunk_size=self.settings.chunk_size,
            max_message_bytes=self.settings.max_message_bytes,
        )

    def GetTask(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        name = self.auth.identify(context, request.client_name)
        timeout = self.settings.poll_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining - 1.0))
        context.add_callback(self.coordinator.wake)
        try:
            item = self.coordinator.next_task(name, timeout, context.is_active)
        except NotJoined as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        if isinstance(item, str):
            kind = fl_pb2.WAIT if item == WAIT else fl_pb2.FINISH
            yield fl_pb2.TaskMessage(header=fl_pb2.TaskHeader(kind=kind))
            return
        assert isinstance(item, Task)
        yield fl_pb2.TaskMessage(
            header=fl_pb2.TaskHeader(
                kind=fl_pb2.FIT if item.kind == "fit" else fl_pb2.EVALUATE,
                task_id=item.task_id,
                round=item.server_round,
                config_json=json.dumps(item.config),
                codec=item.codec,
                payload_size=len(item.payload),
                sha256=item.sha256,
            )
        )
        sent = 0
        for chunk in iter_chunks(item.payload, self.settings.chunk_size):
            yield fl_pb2.TaskMessage(chunk=chunk)
            sent += len(chunk)
        self.coordinator.delivered(item, sent)

    def SubmitResult(self, request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
        first: Any = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "header":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first SubmitResult message must be a ResultHeader",
            )
        header = first.header
        name = self.auth.identify(context, header.client_name)
        status: tuple[grpc.StatusCode, str] | None = None
        nbytes = 0
        try:
            task = self.coordinator.open_task(name, header.task_id)
            client_id = self.coordinator.client_id(name)
            result: FitResult | EvaluateResult
            if task.kind == "fit":
                result, nbytes = self._read_fit(client_id, header, request_iterator)
            else:
                result = self._read_evaluate(client_id, header, request_iterator)
            self.coordinator.submit(task, result, nbytes)
        except PayloadTooLarge as exc:
            status = (grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (NotJoined, StaleTask) as exc:
            status = (grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except UserError as exc:
            status = (grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if status is not None:
            log.warning("rejected result from %r: %s", name, status[1])
            context.abort(*status)
        return fl_pb2.SubmitReply(accepted=True, bytes_received=nbytes)

    def SecAgg(self, request: Any, context: grpc.ServicerContext) -> Any:
        name = self.auth.identify(context, request.client_name)
        step = request.WhichOneof("step")
        if step is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "a SecAgg request must carry one protocol step"
            )
        status: tuple[grpc.StatusCode, str] | None = None
        try:
            task = self.coordinator.open_task(name, request.task_id)
            secure = self.coordinator.secure_round(task)
            client_id = self.coordinator.client_id(name)
            message = as_message(step, client_id, getattr(request, step))
            remaining = context.time_remaining()
            timeout = self.settings.round_timeout_s + 3 * self.settings.secagg_timeout_s
            timeout = timeout if remaining is None else min(timeout, remaining)
            reply = secure.submit(step, client_id, message, request.ByteSize(), timeout)
        except (NotJoined, StaleTask, SecAggError) as exc:
            status = (grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except UserError as exc:
            status = (grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if status is not None:
            log.warning("secure aggregation: rejected %s from %r: %s", step, name, status[1])
            context.abort(*status)
        return _secagg_reply(step, reply)

    def _read_fit(self, client_id: int, header: Any, rest: Iterator[Any]) -> tuple[FitResult, int]:
        if header.codec not in UPLOAD_CODECS:
            raise PayloadError(
                f"unknown update codec {header.codec!r}; choose one of: {', '.join(UPLOAD_CODECS)}"
            )
        _check_count(header.num_examples)
        metrics = _check_metrics(header.metrics)
        assembler = Assembler(header.payload_size, header.sha256, self.upload_limit, "update")
        for message in rest:
            if message.WhichOneof("msg") != "chunk":
                raise PayloadError("a SubmitResult stream holds exactly one header, then chunks")
            assembler.add(message.chunk)
        data = assembler.finish()
        coordinator = self.coordinator
        update = decode_parameters(data, header.codec, coordinator.names, coordinator.shapes)
        result = FitResult(client_id, update, int(header.num_examples), metrics, is_update=True)
        return result, len(data)

    def _read_evaluate(self, client_id: int, header: Any, rest: Iterator[Any]) -> EvaluateResult:
        if next(rest, None) is not None:
            raise PayloadError("an evaluate result carries no payload chunks")
        _check_count(header.num_examples)
        if not math.isfinite(header.loss):
            raise PayloadError(f"evaluation loss must be finite, got {header.loss}")
        return EvaluateResult(
            client_id, float(header.loss), int(header.num_examples), _check_metrics(header.metrics)
        )


def _secagg_reply(step: str, reply: Any) -> Any:
    if step == "keys":
        return fl_pb2.SecAggReply(
            directory=fl_pb2.SecAggDirectory(
                client_ids=reply.client_ids,
                enc_public_keys=reply.enc_public_keys,
                mask_public_keys=reply.mask_public_keys,
                threshold=reply.threshold,
            )
        )
    if step == "shares":
        return fl_pb2.SecAggReply(
            forwarded=fl_pb2.SecAggForwarded(
                sender_ids=reply.sender_ids, ciphertexts=reply.ciphertexts
            )
        )
    if step == "masked":
        return fl_pb2.SecAggReply(
            unmask_request=fl_pb2.SecAggUnmaskRequest(
                survivor_ids=reply.survivor_ids, dropped_ids=reply.dropped_ids
            )
        )
    return fl_pb2.SecAggReply(done=True)


def build_server_strategy(settings: FederatedSection) -> Strategy:
    """The configured strategy (with DP-FedAvg when ``dp_*`` is set), checked for secure mode."""
    from distml.federated.api import strategy_from_settings

    # Server noise must not be predictable from a config: a fresh seed per server start.
    strategy = strategy_from_settings(settings, seed=secrets.randbits(62))
    inner = strategy.strategy if isinstance(strategy, DifferentialPrivacy) else strategy
    if isinstance(inner, Scaffold):
        raise ConfigError(
            "strategy 'scaffold' runs in simulation only (clients would have to keep control "
            "variates across rounds); use distml fl simulate or another strategy"
        )
    threshold = settings.secagg_threshold
    if threshold:
        if not inner.linear_aggregation:
            raise ConfigError(
                f"strategy {inner.name!r} needs individual client updates, which "
                "federated.secagg_threshold hides; use a FedAvg-family strategy or set it to 0"
            )
        if threshold < 2 or strategy.min_fit_clients < threshold:
            raise ConfigError(
                f"federated.secagg_threshold={threshold} needs 2 <= threshold <= "
                f"min_fit_clients={strategy.min_fit_clients}; raise "
                "strategy_options.min_fit_clients or lower the threshold"
            )
    return strategy


def _check_count(num_examples: int) -> None:
    if not 1 <= num_examples <= 2**40:
        raise PayloadError(f"num_examples must be a positive sample count, got {num_examples}")


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    if len(metrics) > _MAX_METRICS:
        raise PayloadError(f"at most {_MAX_METRICS} metrics per result, got {len(metrics)}")
    out = {}
    for key, value in metrics.items():
        if not _NAME.match(key) or not math.isfinite(value):
            raise PayloadError(f"metric {key[:64]!r}={value} needs a short name and a finite value")
        out[str(key)] = float(value)
    return out


def load_tokens(settings: FederatedSection) -> dict[str, str]:
    """Client name -> token from ``tokens`` and ``tokens_file``; checks names and uniqueness."""
    tokens = dict(settings.tokens)
    if settings.tokens_file:
        path = Path(settings.tokens_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read federated.tokens_file {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"federated.tokens_file {path} must map client names to tokens")
        tokens.update({str(k): str(v) for k, v in loaded.items()})
    for name, token in tokens.items():
        if not _NAME.match(name):
            raise ConfigError(f"federated token name {name!r} must be 1-64 letters, digits or ._@-")
        if len(token) < 8:
            raise ConfigError(f"federated token of client {name!r} is shorter than 8 characters")
    if len(set(tokens.values())) != len(tokens):
        raise ConfigError("federated tokens must be distinct: a token identifies one client")
    return tokens


class FederatedServer:
    """A configured federated server: :meth:`start` binds, :meth:`run` runs all rounds."""

    def __init__(
        self,
        config: Config,
        settings: FederatedSection | None = None,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        address: str | None = None,
    ) -> None:
        from distml.data import ArrayDataset, build_datasets
        from distml.models.registry import get_model_spec, make_model_config

        settings = settings or getattr(config, "federated", None) or FederatedSection()
        if address is not None:
            try:
                settings = FederatedSection.model_validate(
                    {**settings.model_dump(), "address": address}
                )
            except pydantic.ValidationError as exc:
                raise ConfigError(str(exc.errors()[0]["msg"])) from None
        self.settings = settings
        strategy = build_server_strategy(settings)
        self.auth = _Auth(load_tokens(settings))
        self._credentials = _server_credentials(settings)
        bundle = build_datasets(config.data, config.seed)
        spec = get_model_spec(config.model.name)
        model_cfg = make_model_config(
            config.model.name, config.model.args, bundle.info.model_defaults()
        )
        torch.manual_seed(config.seed)
        model = spec.build(model_cfg)
        model_args = dataclasses.asdict(model_cfg)
        root = state_dir or settings.state_dir or os.path.join(config.logging.run_dir, "federated")
        self.store = ServerStore(root)
        state = model.state_dict()
        signature = json.dumps(
            {
                "model": config.model.name,
                "args": model_args,
                "shapes": {k: list(v.shape) for k, v in state.items()},
            },
            sort_keys=True,
        )
        try:
            self.store.ensure_meta(
                "model", signature, "use the same model config or a new federated.state_dir"
            )
            self.store.ensure_meta(
                "strategy", settings.strategy, "use the same strategy or a new federated.state_dir"
            )
        except CheckpointError:
            self.store.close()
            raise
        test_data = None
        if settings.server_evaluate and isinstance(bundle.test, ArrayDataset):
            test_data = (bundle.test.inputs, bundle.test.targets)
        self.coordinator = RoundCoordinator(
            settings=settings,
            strategy=strategy,
            model=model,
            store=self.store,
            seed=config.seed,
            test_data=test_data,
            run_id=secrets.token_hex(4),
        )
        params = list(state.values())
        upload_limit = (
            int(settings.max_upload_mb * 2**20)
            if settings.max_upload_mb is not None
            else 2 * num_bytes([p.float() for p in params]) + 2**20
        )
        join_info = {
            "model_name": config.model.name,
            "model_args_json": json.dumps(model_args),
            "data_json": json.dumps({**config.data.model_dump(mode="json"), "seed": config.seed}),
        }
        self.servicer = FederatedServicer(
            self.coordinator, self.auth, settings, join_info, upload_limit
        )
        self._server: grpc.Server | None = None
        self.port: int | None = None
        _warn_if_exposed(settings, self.auth.enabled)

    def start(self) -> int:
        """Bind and start serving; returns the bound port."""
        s = self.settings
        server = grpc.server(
            ThreadPoolExecutor(max_workers=s.max_workers, thread_name_prefix="fl-grpc"),
            options=[
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.max_receive_message_length", s.max_message_bytes),
            ],
        )
        fl_pb2_grpc.add_FederatedLearningServicer_to_server(self.servicer, server)
        try:
            if self._credentials is not None:
                port = server.add_secure_port(s.address, self._credentials)
            else:
                port = server.add_insecure_port(s.address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise UserError(
                f"cannot bind the federated server to {s.address}; the port may be in use, "
                "choose another federated.address"
            )
        server.start()
        self._server, self.port = server, port
        scheme = "TLS" if self._credentials is not None else "plaintext"
        auth = "token auth" if self.auth.enabled else "no auth"
        log.info(
            "federated server on %s (%s, %s), state in %s", s.address, scheme, auth, self.store.dir
        )
        return port

    def run(self) -> list[dict[str, Any]]:
        """Serve until every round is done (resuming a state dir); return the round records."""
        if self._server is None:
            self.start()
        try:
            return self.coordinator.run()
        finally:
            self.stop()

    def stop(self) -> None:
        self.coordinator.stop()
        if self._server is not None:
            self._server.stop(grace=1.0).wait(5.0)
            self._server = None
        self.store.close()


def run_server(
    config: Config,
    settings: FederatedSection | None = None,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    address: str | None = None,
) -> list[dict[str, Any]]:
    """Serve ``config``'s federated job to completion; returns one record per round.

    ``settings`` defaults to ``config.federated`` (then to the section's
    defaults); ``state_dir`` and ``address`` override its fields. Blocks; on
    KeyboardInterrupt the server stops and a rerun resumes after the last
    completed round.
    """
    return FederatedServer(config, settings, state_dir=state_dir, address=address).run()


def _server_credentials(settings: FederatedSection) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        cert = Path(settings.tls_cert).read_bytes()
        key = Path(settings.tls_key).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read TLS certificate/key ({exc.filename}); set federated.tls_cert and "
            "federated.tls_key to PEM files"
        ) from None
    return grpc.ssl_server_credentials([(key, cert)])


def _warn_if_exposed(settings: FederatedSection, has_tokens: bool) -> None:
    host = settings.address.rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and (settings.tls_cert is None or not has_tokens):
        log.warning(
            "federated server listens on %s without %s; anyone who can reach it can %s",
            settings.address,
            "TLS" if settings.tls_cert is None else "tokens",
            "read models and submit updates",
        )
