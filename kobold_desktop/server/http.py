"""HTTP for the service on FastAPI and uvicorn (what vLLM, Aphrodite and text-generation-webui
serve with): thin routes, pydantic bodies, one error shape, server-sent events, and the
rules that keep a local server safe from the web pages its user visits.

Safe by default (Ollama's and Jupyter's rules):
- Host: a request must name a loopback host or the address we bound (DNS rebinding is
  refused with 421), unless the server is bound to a public address, where the key is
  the protection.
- Origin: browsers send it on cross-site requests; only loopback origins and the
  `allowed_origins` list may call at all (403), and only they get CORS headers.
- Keys: `api_key` protects every route; `admin_key` the routes that load and unload soft
  prompts, and it alone lets a request load a soft prompt from any path.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import socket
import sys
import threading
import traceback
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from kobold_desktop import __version__
from kobold_desktop.server import protocol as p
from kobold_desktop.engine.remote.http import RemoteError
from kobold_desktop.errors import KoboldError
from kobold_desktop.server.scheduler import release_memory
from kobold_desktop.server.service import ApiError, EventStream, Service

MAX_BODY_BYTES = 16 << 20
BODY_TIMEOUT_S = 30.0  # the whole body within this, however it trickles in, or 408
HEADER_TIMEOUT_S = 10.0  # a connection whose request headers are not complete by then is closed
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1", "[::1]"}
LOOPBACK_ORIGIN = r"^https?://(localhost|127(\.\d{1,3}){3}|\[::1\])(:\d{1,5})?$"


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(ApiError(status, message, kind, param, code).body(), status_code=status)


def _bounds(request: Request, name: str) -> tuple[Any, Any]:
    """The declared bounds of a body field, for messages like "must be between 0 and 100"."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    for candidate in getattr(model, "__args__", None) or (model,):
        info = getattr(candidate, "model_fields", {}).get(name)
        if info is not None:
            found = {type(m).__name__: m for m in info.metadata}
            return getattr(found.get("Ge"), "ge", None), getattr(found.get("Le"), "le", None)
    return None, None


_KIND_WORDS = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "a list", "dict": "an object"}


def _validation_message(request: Request, error: dict[str, Any]) -> tuple[int, str, str | None]:
    kind = error["type"]
    if kind == "json_invalid":
        return 400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}", None
    loc = [str(part) for part in error["loc"] if part != "body"]
    if not loc and kind in ("model_attributes_type", "dict_type"):
        return 400, "the body must be a JSON object.", None
    name = loc[0] if loc else "body"
    where = ".".join(loc) or "body"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        low, high = _bounds(request, name)
        return 422, f"'{where}' must be between {low} and {high}.", name
    if kind == "missing":
        return 422, f"'{where}' is required.", name
    if kind == "value_error":
        return 422, f"'{where}' {error['msg'].removeprefix('Value error, ')}.", name
    for prefix, word in _KIND_WORDS.items():
        if kind.startswith(prefix):
            return 422, f"'{where}' must be {word}.", name
    return 422, f"'{where}': {error['msg']}.", name


TRIM_AFTER_BYTES = 1 << 20


class Guard:
    """Pure ASGI middleware (outermost): Host and Origin rules, and a cap on body size."""

    def __init__(self, app, bound_host: str, allowed_origins: list[str]):
        self.app = app
        self.check_host = is_loopback(bound_host) or bound_host not in ("0.0.0.0", "::", "")
        self.hosts = LOOPBACK_HOSTS | {bound_host, f"[{bound_host}]"}
        self.origins = set(allowed_origins)
        self.origin_re = re.compile(LOOPBACK_ORIGIN)

    def origin_allowed(self, origin: str) -> bool:
        return origin in self.origins or "*" in self.origins or bool(self.origin_re.match(origin))

    async def _refuse(self, send, status: int, message: str, origin: str | None = None) -> None:
        body = json.dumps(ApiError(status, message, "permission_error").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if origin:  # the refused page may read why (and nothing else: no route ran)
            headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _preflight(self, send, origin: str) -> None:
        """A page we refuse still gets its preflight answered, so that the request that
        follows reaches us and its 403 (with our message) reaches the page."""
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
            (b"access-control-allow-methods", b"GET, POST, PUT, DELETE, OPTIONS"),
            (b"access-control-allow-headers", b"authorization, content-type"), (b"access-control-max-age", b"600")]})
        await send({"type": "http.response.body", "body": b""})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.check_host:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in self.hosts:
                return await self._refuse(send, 421, f"this server answers only requests to localhost, not to "
                                                     f"'{host}' (a DNS rebinding attempt, or a proxy: bind --host "
                                                     "to the name clients use).")
        origin = headers.get("origin")
        if origin and origin != "null" and not self.origin_allowed(origin):
            if scope.get("method") == "OPTIONS" and "access-control-request-method" in headers:
                return await self._preflight(send, origin)
            return await self._refuse(send, 403, f"requests from the web page at {origin} are not allowed; "
                                                 "start the server with --allowed-origins to allow that site.",
                                      origin)
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return await self._refuse(send, 413, "the request body is too large.")
        # Read the whole body here, capped in size and time, then hand it on: a client that
        # sends too much gets 413, one that stops sending gets 408, and routes never wait.
        chunks, received = [], 0
        deadline = asyncio.get_running_loop().time() + BODY_TIMEOUT_S  # for the whole body, not per chunk
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s.")
            if message["type"] == "http.disconnect":
                return None  # the client left: nobody to answer
            chunks.append(message.get("body", b""))
            received += len(chunks[-1])
            if received > MAX_BODY_BYTES:
                return await self._refuse(send, 413, "the request body is too large.")
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        del chunks
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices for streaming responses

        try:
            await self.app(scope, replay, send)
        finally:
            if len(body) >= TRIM_AFTER_BYTES:
                del body
                release_memory()


def _token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")


def _matches(token: str, key: str | None) -> bool:
    return bool(key) and hmac.compare_digest(token.encode(), key.encode())


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, on every route: OpenAI's shape (KoboldAI clients read `error.message` too)."""

    error: ErrorDetail


ERRORS = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "The request cannot be served as it is (the message says why)"),
    (401, "Missing or wrong API key"), (403, "Not allowed from this origin or path"),
    (404, "No such model, soft prompt or route"), (408, "The body did not arrive in time"),
    (413, "The body is too large"), (422, "A field is missing, of the wrong type or out of range"),
    (500, "A bug: the server goes on"))}
# Routes that stream server-sent events when the body asks for it (`stream: true`).
# What was clamped or trimmed to fit a request to the model ("context 512 (asked 6144); ...").
FITTED_HEADER = "X-Kobold-Fitted"
STREAMING = {"content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}},
             "description": "JSON, or server-sent events when streaming"}


def _operation_id(route) -> str:
    """Unique and stable: the method and the path ("post_v1_completions")."""
    method = sorted(route.methods)[0].lower()
    return f"{method}_{route.path_format.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"


def create_app(service: Service, bound_host: str = "127.0.0.1") -> FastAPI:
    config = service.config
    # /openapi.json describes every route for API tools and client generators; the
    # interactive docs pages stay off (they load scripts from a CDN).
    app = FastAPI(title="Kobold Desktop", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json", responses=ERRORS, generate_unique_id_function=_operation_id)

    def user(request: Request) -> None:
        """Every route: the API key (or the admin key) when one is set."""
        token = _token(request)
        if config.api_key and not (_matches(token, config.api_key) or _matches(token, config.admin_key)):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY').",
                           kind="authentication_error", code="invalid_api_key")

    def admin(request: Request) -> bool:
        """Loading and unloading soft prompts: the admin key, or the API key when no admin
        key is set. True when the admin key itself was sent (then any path may load)."""
        token = _token(request)
        required = config.admin_key or config.api_key
        if required and not _matches(token, required):
            raise ApiError(401, "this route needs the admin key.", kind="authentication_error", code="invalid_api_key")
        return _matches(token, config.admin_key)

    deps = [Depends(user)]

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(KoboldError)
    async def failed(request: Request, exc: KoboldError):  # a generation failed after it started
        status = exc.status
        return _error(status, str(exc), kind="server_error" if status >= 500 else "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status, message, param = _validation_message(request, exc.errors()[0])
        return _error(status, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code in (404, 405):
            return _error(exc.status_code, f"{request.method} {request.url.path} is not a route of this server.")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):  # a bug must not take the server down
        traceback.print_exception(exc)
        return _error(500, f"internal error: {type(exc).__name__}", kind="server_error")

    def respond(result: dict[str, Any] | EventStream):
        if isinstance(result, dict):
            fitted = result.get("fitted")
            return JSONResponse(result, headers={FITTED_HEADER: "; ".join(fitted)}) if fitted else result

        async def events():
            iterator = iter(result)
            try:
                while True:
                    try:
                        chunk = await run_in_threadpool(next, iterator, None)
                    except Exception as exc:  # noqa: BLE001 - the headers are sent: the stream's last event says it
                        if isinstance(exc, ApiError):
                            error = exc
                        elif isinstance(exc, KoboldError):
                            # after the start, our own failures are the server's; a remote backend's keep theirs
                            error = ApiError(exc.status if isinstance(exc, RemoteError) else 500, str(exc),
                                             "server_error")
                        else:
                            traceback.print_exception(exc)
                            error = ApiError(500, f"internal error: {type(exc).__name__}", "server_error")
                        yield result.error_event(error)
                        return
                    if chunk is None:
                        return
                    yield chunk
            finally:  # finished, or the client went away: stop what still runs
                result.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if result.fitted:
            headers[FITTED_HEADER] = "; ".join(result.fitted)
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    # OpenAI and vLLM
    app.get("/v1/models", dependencies=deps)(service.models)

    def client_of(request: Request) -> str:
        """Who sent a request, for saying things once per client: its address and program."""
        host = request.client.host if request.client else "?"
        return f"{host} ({request.headers.get('user-agent', 'no user agent')[:80]})"

    @app.post("/v1/completions", dependencies=deps, responses={200: STREAMING})
    def completions(body: p.CompletionRequest, request: Request):
        service.note_fields(client_of(request), "/v1/completions", body)
        return respond(service.completions(body, client_of(request)))

    @app.post("/v1/chat/completions", dependencies=deps, responses={200: STREAMING})
    def chat_completions(body: p.ChatCompletionRequest, request: Request):
        service.note_fields(client_of(request), "/v1/chat/completions", body)
        return respond(service.chat_completions(body, client_of(request)))

    @app.post("/v1/soft_prompt/load", dependencies=deps)
    def load_softprompt(body: p.LoadSoftPromptRequest, trusted: bool = Depends(admin)):
        return service.load_softprompt(body, trusted)

    @app.delete("/v1/soft_prompt/unload", dependencies=[*deps, Depends(admin)])
    def unload_softprompt(body: p.UnloadSoftPromptRequest | None = None, name: str | None = Query(None)):
        if body is None and not name:
            raise ApiError(422, "'name' is required.", param="name")
        return service.unload_softprompt(body or p.UnloadSoftPromptRequest(name=name))

    for path in ("/v1/tokenize", "/tokenize"):
        app.post(path, dependencies=deps)(service.tokenize)
    for path in ("/v1/detokenize", "/detokenize"):
        app.post(path, dependencies=deps)(service.detokenize)

    # KoboldAI
    app.get("/api/v1/model", dependencies=deps)(service.kobold_model)
    app.get("/api/v1/info/version", dependencies=deps)(service.kobold_version)
    app.get("/api/v1/config/max_context_length", dependencies=deps)(service.kobold_max_context_length)
    app.get("/api/v1/config/max_length", dependencies=deps)(service.kobold_max_length)
    app.get("/api/v1/config/soft_prompt", dependencies=deps)(service.kobold_get_softprompt)
    app.put("/api/v1/config/soft_prompt", dependencies=deps)(service.kobold_put_softprompt)
    app.get("/api/v1/config/soft_prompts_list", dependencies=deps)(service.kobold_softprompts_list)

    @app.post("/api/v1/generate", dependencies=deps)
    def kobold_generate(body: p.KoboldGenerateRequest, request: Request):
        service.note_fields(client_of(request), "/api/v1/generate", body)
        return respond(service.kobold_generate(body, client_of(request)))

    @app.post("/api/extra/tokenize", dependencies=deps)
    def kobold_tokenize(body: p.TokenCountRequest | None = None):
        return service.kobold_tokenize(body or p.TokenCountRequest())

    @app.post("/api/extra/detokenize", dependencies=deps)
    def kobold_detokenize(body: p.KoboldDetokenizeRequest | None = None):
        return service.kobold_detokenize(body or p.KoboldDetokenizeRequest())

    app.get("/api/extra/perf", dependencies=deps)(service.kobold_perf)

    @app.post("/api/extra/last_logprobs", dependencies=deps)
    def last_logprobs(request: Request, body: p.GenkeyRequest | None = None):
        return service.kobold_last_logprobs(body or p.GenkeyRequest(), client_of(request))

    @app.get("/api/extra/sampling", dependencies=deps)
    def sampling():
        """Every sampler field each route applies, the fields it accepts without applying
        (and why), and unknown fields clients have sent."""
        return service.sampling_report()

    # KoboldCpp
    app.get("/api/extra/version", dependencies=deps)(service.kobold_extra_version)
    app.get("/api/extra/true_max_context_length", dependencies=deps)(service.kobold_max_context_length)

    @app.post("/api/extra/generate/stream", dependencies=deps,
              responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                               "description": "KoboldCpp's server-sent events"}})
    def kobold_stream(body: p.KoboldGenerateRequest, request: Request):
        service.note_fields(client_of(request), "/api/extra/generate/stream", body)
        return respond(service.kobold_generate_stream(body, client_of(request)))

    @app.post("/api/extra/abort", dependencies=deps)
    def abort(request: Request, body: p.GenkeyRequest | None = None):
        return service.kobold_abort(body or p.GenkeyRequest(), client_of(request))

    @app.post("/api/extra/generate/check", dependencies=deps)
    def check(request: Request, body: p.GenkeyRequest | None = None, genkey: str | None = Query(None)):
        return service.kobold_check(body or p.GenkeyRequest(genkey=genkey), client_of(request))

    @app.get("/api/extra/generate/check", dependencies=deps)
    def check_get(request: Request, genkey: str | None = Query(None)):
        return service.kobold_check(p.GenkeyRequest(genkey=genkey), client_of(request))

    @app.post("/api/extra/tokencount", dependencies=deps)
    def tokencount(body: p.TokenCountRequest | None = None):
        return service.kobold_tokencount(body or p.TokenCountRequest())

    app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_origin_regex=LOOPBACK_ORIGIN,
                       allow_methods=["*"], allow_headers=["*"], expose_headers=[FITTED_HEADER], max_age=600)
    app.add_middleware(Guard, bound_host=bound_host, allowed_origins=list(config.allowed_origins))
    return app


class _HeaderDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers, which
    uvicorn lacks: a client sending its headers a byte at a time (slowloris) held a
    connection for as long as it liked. Armed when a connection opens and when the next
    request's first bytes arrive; disarmed once the headers are complete."""

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._late)

    def _late(self) -> None:
        self._deadline = None
        if self.cycle is None or self.cycle.response_complete:  # still waiting for headers
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle and self._deadline is not None:  # a request's headers arrived
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)


class KoboldServer:
    """uvicorn serving a `Service`; `start()` runs it on a background thread, `stop()` ends
    it (and the service). Port 0 picks a free port."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 2242, quiet: bool = True):
        self.service = service
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(create_app(service, host), log_level="info" if not quiet else "warning",
                                access_log=not quiet, lifespan="off", timeout_keep_alive=5, http=_HeaderDeadline,
                                h11_max_incomplete_event_size=64 * 1024)
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "KoboldServer":
        self._server.config.install_signal_handlers = False  # not the main thread
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http-server", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def serve_forever(self) -> None:
        """In the main thread: Ctrl+C stops it (uvicorn's own signal handling)."""
        self._server.run(sockets=[self._socket])

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._socket.close()
        self.service.close()


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if not is_loopback(host) and not api_key:
        print(f"warning: serving on {host} without an API key: anyone who can reach this machine can use the "
              "model and load soft prompts. Set --api-key (and --admin-key).", file=sys.stderr)
