"""HTTP for the service: JSON in and out, server-sent events for streams, Bearer keys.

The standard library's threading HTTP server is enough here: one thread per
connection, and the model work happens on the scheduler's thread anyway.
"""

from __future__ import annotations

import hmac
import json
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from kobold_desktop.server.service import ApiError, Service

MAX_BODY_BYTES = 16 << 20


def _routes(service: Service) -> dict[tuple[str, str], tuple[Callable[..., Any], bool, bool]]:
    """(method, path) -> (handler, takes a body, needs the admin key)."""
    return {
        ("GET", "/v1/models"): (service.models, False, False),
        ("POST", "/v1/completions"): (service.completions, True, False),
        ("POST", "/v1/chat/completions"): (service.chat_completions, True, False),
        ("POST", "/v1/soft_prompt/load"): (service.load_softprompt, True, True),
        ("DELETE", "/v1/soft_prompt/unload"): (service.unload_softprompt, True, True),
        ("GET", "/api/v1/model"): (service.kobold_model, False, False),
        ("POST", "/api/v1/generate"): (service.kobold_generate, True, False),
        ("GET", "/api/v1/info/version"): (service.kobold_version, False, False),
        ("GET", "/api/extra/version"): (service.kobold_extra_version, False, False),
        ("GET", "/api/v1/config/soft_prompt"): (service.kobold_get_softprompt, False, False),
        ("PUT", "/api/v1/config/soft_prompt"): (service.kobold_put_softprompt, True, False),
        ("GET", "/api/v1/config/soft_prompts_list"): (service.kobold_softprompts_list, False, False),
    }


def make_handler(service: Service, quiet: bool = True) -> type[BaseHTTPRequestHandler]:
    routes = _routes(service)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "KoboldDesktop"

        def log_message(self, fmt: str, *args: Any) -> None:
            if not quiet:
                sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.wfile.write(data)

        def _send_stream(self, events) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.end_headers()
            self.close_connection = True
            try:
                for data in events:
                    self.wfile.write(f"data: {data}\n\n".encode("utf-8"))
                    self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left; closing the generator cancels its requests
            finally:
                events.close()

        def _authorized(self, key: str | None) -> bool:
            if not key:
                return True
            header = self.headers.get("Authorization", "")
            token = header[7:] if header.startswith("Bearer ") else self.headers.get("X-Api-Key", "")
            return hmac.compare_digest(token.encode(), key.encode())

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise ApiError(413, "the request body is too large.")
            raw = self.rfile.read(length) if length else b""
            if not raw.strip():
                return {}
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ApiError(400, f"the body is not valid JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise ApiError(400, "the body must be a JSON object.")
            return body

        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/") or "/"
            try:
                route = routes.get((method, path))
                body = self._body() if method in ("POST", "PUT", "DELETE") else {}
                if route is None:
                    known = any(p == path for _, p in routes)
                    raise ApiError(405 if known else 404, f"{method} {path} is not a route of this server.")
                handler, takes_body, admin = route
                if not self._authorized(service.config.api_key):
                    raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY').",
                                   kind="authentication_error", code="invalid_api_key")
                if admin and not self._authorized(service.config.admin):
                    raise ApiError(401, "this route needs the admin key.", kind="authentication_error",
                                   code="invalid_api_key")
                if takes_body:
                    for key, values in parse_qs(url.query).items():
                        body.setdefault(key, values[-1])
                    result = handler(body)
                else:
                    result = handler()
            except ApiError as exc:
                self._send_json(exc.status, exc.body())
                return
            except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
                traceback.print_exc()
                self._send_json(500, ApiError(500, f"internal error: {exc}", kind="server_error").body())
                return
            if isinstance(result, dict):
                self._send_json(200, result)
            else:
                self._send_stream(result)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_DELETE(self) -> None:
            self._dispatch("DELETE")

        def do_OPTIONS(self) -> None:
            self.send_response(204)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type, X-Api-Key")
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


class KoboldServer:
    """The HTTP server around a `Service`; `start()` runs it on a background thread."""

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 2242, quiet: bool = True):
        self.service = service
        self.httpd = ThreadingHTTPServer((host, port), make_handler(service, quiet))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "KoboldServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.service.close()
        if self._thread is not None:
            self._thread.join(timeout=10)
