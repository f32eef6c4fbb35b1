"""The HTTP face of a served model: FastAPI routes, limits, auth, and the uvicorn entry point.

``POST /v1/predict`` takes JSON (``{"inputs": [...]}`` or, for text models,
``{"texts": [...]}``) or one ``application/x-distml-tensor`` body, and answers
JSON predictions plus logits or probabilities, or a tensor of logits when the
client accepts that type. ``POST /v1/generate`` samples text from a causal LM,
optionally streamed as server-sent events. ``GET /health`` and ``GET /metrics``
(Prometheus) need no token. Every failure is a JSON ``{"error": "..."}`` with
one line and a 4xx/5xx status; the server keeps serving afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from distml.errors import UserError
from distml.serve.codec import TENSOR_CONTENT_TYPE, encode_tensor
from distml.serve.inputs import RequestError, output_kind, parse_json_object
from distml.serve.pool import JobFailed
from distml.serve.service import ModelService, TokenText
from distml.serve.settings import ServeSettings, make_settings

log = logging.getLogger("distml.serve")
ENDPOINTS = ("/v1/predict", "/v1/generate", "/health", "/metrics")
Handler = Callable[[Request], Awaitable[Response]]


class _RequestMetrics:
    """ASGI middleware: count every response by endpoint and status and time it."""

    def __init__(self, app: ASGIApp, service: ModelService) -> None:
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            self.metrics.latency.labels(endpoint=endpoint).observe(time.perf_counter() - start)


class _HotRoutes:
    """ASGI middleware: run the model endpoints' handlers directly, skipping the router.

    FastAPI's routing (exception and exit-stack middlewares, route matching,
    dependency solving) cost about a third of the server's CPU per request in
    a profile of one-digit cnn predictions, more than the handler itself.
    The handlers depend on nothing FastAPI injects, so exact ``(method, path)``
    matches go straight to them; everything else (other methods, /health,
    /metrics, 404s) takes the normal route.
    """

    def __init__(self, app: ASGIApp, routes: dict[tuple[str, str], Handler]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = (
            self.routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        )
        if handler is None:
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(Request(scope, receive))
        except Exception:
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])
            response = _error(500, "internal server error; see the server log")
        await response(scope, receive, send)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise RequestError(401, "missing bearer token; send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise RequestError(401, "invalid bearer token")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > limit:
            raise RequestError(
                413, f"body of {declared} bytes exceeds the {limit}-byte limit; send fewer inputs"
            )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked bodies declare no length: count as they come
            raise RequestError(413, f"body exceeds the {limit}-byte limit; send fewer inputs")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _predict_response(outputs: list[np.ndarray], kind: str, binary: bool) -> Response:
    if binary:
        if len({o.shape for o in outputs}) != 1:
            raise RequestError(
                406, "outputs differ in length; ask for JSON (Accept: application/json)"
            )
        return Response(encode_tensor(np.stack(outputs)), media_type=TENSOR_CONTENT_TYPE)
    payload: dict[str, Any] = {"predictions": [o.argmax(-1).tolist() for o in outputs]}
    payload[kind] = [(o if kind == "logits" else _softmax(o)).tolist() for o in outputs]
    return Response(orjson.dumps(payload), media_type="application/json")


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class ServeApp:
    """The ASGI app ``distml serve`` runs: metrics, then the hot routes, then FastAPI.

    The model endpoints sit in front of the FastAPI app rather than inside its
    middleware stack: FastAPI's own outer layers (server-error, telemetry and
    body-limit middlewares) took about a fifth of the server's time per
    request, and our handlers enforce their own body limit and errors.
    """

    def __init__(
        self, api: FastAPI, service: ModelService, hot: dict[tuple[str, str], Handler]
    ) -> None:
        self.api = api
        self.service = service
        self._asgi = _RequestMetrics(_HotRoutes(api, hot), service)

    @property
    def state(self) -> State:
        return self.api.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._asgi(scope, receive, send)


def build_app(model_path: str, settings: ServeSettings | None = None, **overrides: Any) -> ServeApp:
    """A FastAPI app serving ``model_path`` (a .pt checkpoint or a quantized .safetensors).

    ``overrides`` are :class:`ServeSettings` fields (``replicas``, ``max_batch_size``,
    ``max_delay_ms``, ``token``, ...). The model metadata is read now, so a bad path
    raises :class:`UserError` here; replicas start with the app's lifespan.
    """
    s = make_settings(settings, **overrides)
    service = ModelService(model_path, s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await service.start()
        except BaseException:
            await asyncio.to_thread(service.pool.close, 0.0)
            raise
        # Everything loaded so far (torch, the app, the replicas' handles) lives until
        # shutdown; frozen, a full collection skips it. Unfrozen, those collections
        # paused the loop long enough to triple the p99 latency of a busy server.
        gc.freeze()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="distml serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    inputs = service.inputs

    async def guarded(request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            _check_token(request, s.token)
            return await handler()
        except RequestError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
            return _error(exc.status, exc.message, headers)
        except JobFailed as exc:
            return _error(exc.status, exc.message)
        except asyncio.TimeoutError:
            return _error(504, f"request timed out after {s.request_timeout_s:g}s; retry later")
        except UserError as exc:
            return _error(422, str(exc))

    async def predict(request: Request) -> Response:
        async def handle() -> Response:
            body = await _read_body(request, s.max_body_bytes)
            media = _media_type(request)
            if media == TENSOR_CONTENT_TYPE:
                rows, kind = inputs.rows_from_tensor(body), "logits"
            elif media == "application/json":
                obj = parse_json_object(body)
                rows, kind = inputs.rows_from_json(obj), output_kind(obj)
            else:
                raise RequestError(
                    415,
                    f"unsupported Content-Type {media!r}; send application/json "
                    f"or {TENSOR_CONTENT_TYPE}",
                )
            outputs = await service.predict(rows)
            binary = TENSOR_CONTENT_TYPE in request.headers.get("accept", "")
            return _predict_response(outputs, kind, binary)

        return await guarded(request, handle)

    async def generate(request: Request) -> Response:
        async def handle() -> Response:
            body = await _read_body(request, s.max_body_bytes)
            obj = parse_json_object(body)
            prompt, params, stream = inputs.generate_params(obj, s.max_new_tokens)
            text = TokenText(service.tokenizer)
            if not stream:
                tokens = await service.generate(prompt, params)
                out = "".join(text.piece(t) for t in tokens) + text.flush()
                return JSONResponse({"prompt": obj["prompt"], "text": out, "tokens": tokens})
            return StreamingResponse(_stream(prompt, params, text), media_type="text/event-stream")

        return await guarded(request, handle)

    async def _stream(
        prompt: np.ndarray, params: dict[str, Any], text: TokenText
    ) -> AsyncIterator[bytes]:
        count = 0
        try:
            async for token in service.generate_stream(prompt, params):
                count += 1
                yield _sse({"token": token, "text": text.piece(token)})
            yield _sse({"done": True, "tokens": count, "text": text.flush()})
        except JobFailed as exc:
            yield _sse({"error": exc.message, "status": exc.status}, "error")
        except asyncio.TimeoutError:
            yield _sse(
                {"error": f"timed out after {s.request_timeout_s:g}s", "status": 504}, "error"
            )

    hot: dict[tuple[str, str], Handler] = {
        ("POST", "/v1/predict"): predict,
        ("POST", "/v1/generate"): generate,
    }
    for (method, path), handler in hot.items():  # also routed, so a wrong method gets 405
        app.add_api_route(path, handler, methods=[method])

    @app.get("/health")
    async def health() -> Response:
        ready = service.pool.ready_count()
        return JSONResponse(
            {
                "status": "ok" if ready else "unavailable",
                "model": service.meta["model_name"],
                "task": service.task,
                "replicas_ready": ready,
                "replicas_target": service.pool.target_size(),
                "queue_depth": service.queue_depth(),
            },
            status_code=200 if ready else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    return ServeApp(app, service, hot)


def serve_main(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    *,
    log_level: str = "info",
    access_log: bool = False,
    graceful_timeout_s: int = 30,
    **overrides: Any,
) -> None:
    """Serve ``model_path`` with uvicorn until SIGINT/SIGTERM, then drain and stop."""
    import uvicorn

    app = build_app(model_path, settings, **overrides)
    service = app.service
    if host not in ("127.0.0.1", "localhost", "::1") and service.settings.token is None:
        log.warning("serving on %s without a token: anyone who can reach it can use it", host)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s distml.serve %(levelname)s %(message)s")
        )
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        # X-Forwarded-* only matter for the client address in the access log, and
        # parsing them costs ~5% per request; trust them only when logging.
        proxy_headers=access_log,
        timeout_graceful_shutdown=graceful_timeout_s,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc}); pick another --port") from None
    if not server.started:
        raise UserError(
            f"the server for {model_path} did not start (see the log above); "
            "check the model file, --replicas and the port"
        )
