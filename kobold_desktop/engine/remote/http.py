"""A small HTTP client for JSON and server-sent events, on the standard library.

Remote backends need three things: a JSON request, a JSON answer, and a stream of
`data:` events that can be dropped half way (closing the connection is how vLLM, our
server and KoboldCpp learn that a client went away, and they stop generating). The
standard library's `http.client` does all three with no dependency, in the bundle too.

Errors are `RemoteError`s with the HTTP status our server should answer: the remote
server's own 4xx when it refused the request, 502 when it cannot be reached or failed.
"""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

from kobold_desktop.errors import KoboldError

DEFAULT_TIMEOUT = 30.0


class RemoteError(KoboldError):
    """A remote server could not be reached, refused a request, or failed."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Endpoint:
    """Where a server lives: `http://host:port/prefix` split into its parts."""

    scheme: str
    host: str
    port: int
    prefix: str  # the path before the routes, without a trailing slash ("" or "/v1")

    @classmethod
    def parse(cls, url: str) -> "Endpoint":
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RemoteError(f"'{url}' is not a server address; give one like http://127.0.0.1:8000.", 400)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:
            raise RemoteError(f"'{url}' has no valid port: {exc}.", 400) from exc
        return cls(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.prefix}"

    def with_prefix(self, prefix: str) -> "Endpoint":
        return Endpoint(self.scheme, self.host, self.port, prefix.rstrip("/"))


class EventStream:
    """The `data:` payloads of a server-sent event stream, parsed as JSON (`[DONE]` ends
    it). `close()` drops the connection; the server sees the client leave."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse, where: str):
        self._connection, self._response, self._where = connection, response, where

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            while True:
                try:
                    line = self._response.readline()
                except (OSError, http.client.HTTPException) as exc:
                    raise RemoteError(f"{self._where} stopped answering: {exc}") from exc
                if not line:
                    return
                text = line.decode("utf-8", "replace").strip()
                if not text.startswith("data:"):
                    continue  # blank separators, `event:` lines and comments
                payload = text[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    data = json.loads(payload)
                except json.JSONDecodeError as exc:
                    raise RemoteError(f"{self._where} sent an event that is not JSON: {payload[:200]}") from exc
                if isinstance(data, dict) and "error" in data and not data.get("choices"):
                    raise RemoteError(f"{self._where} failed while streaming: {error_message(data)}")
                yield data
        finally:
            self.close()

    def close(self) -> None:
        self._connection.close()


def error_message(data: Any) -> str:
    """The message of an OpenAI-, FastAPI- or KoboldAI-shaped error body."""
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        if isinstance(error, dict):
            for key in ("message", "msg"):
                if isinstance(error.get(key), str):
                    return error[key]
        if isinstance(error, str):
            return error
        if isinstance(error, list) and error and isinstance(error[0], dict):
            return "; ".join(str(e.get("msg", e)) for e in error)
    return str(data)[:300]


class HttpClient:
    """JSON requests to one server. Thread-safe: each request opens its own connection."""

    def __init__(self, endpoint: Endpoint, api_key: str | None = None, name: str = "the server",
                 timeout: float = DEFAULT_TIMEOUT):
        self.endpoint, self.api_key, self.name, self.timeout = endpoint, api_key, name, timeout

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.endpoint.scheme == "https" else http.client.HTTPConnection
        return cls(self.endpoint.host, self.endpoint.port, timeout=timeout or self.timeout)

    def _send(self, method: str, path: str, body: Any, timeout: float | None, stream: bool):
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        where = f"{self.name} at {self.endpoint.base}"
        connection = self._connection(timeout)
        try:
            connection.request(method, self.endpoint.prefix + path, body=data, headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            reason = "timed out" if isinstance(exc, socket.timeout) else (getattr(exc, "strerror", None) or str(exc))
            raise RemoteError(f"cannot reach {where}: {reason}.") from exc
        if response.status >= 400:
            try:
                raw = response.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            connection.close()
            try:
                message = error_message(json.loads(raw))
            except ValueError:
                message = raw.decode("utf-8", "replace")[:300] or response.reason
            # The remote server's refusal of the request is the client's to fix (its 4xx);
            # its own failure is ours to report as a bad gateway.
            status = response.status if 400 <= response.status < 500 else 502
            raise RemoteError(f"{where} answered {response.status}: {message}", status)
        return connection, response, where

    def get(self, path: str, timeout: float | None = None) -> Any:
        return self._json("GET", path, None, timeout)

    def post(self, path: str, body: Any, timeout: float | None = None) -> Any:
        return self._json("POST", path, body, timeout)

    def _json(self, method: str, path: str, body: Any, timeout: float | None) -> Any:
        connection, response, where = self._send(method, path, body, timeout, stream=False)
        try:
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteError(f"{where} stopped answering: {exc}") from exc
        finally:
            connection.close()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise RemoteError(f"{where} did not answer JSON on {path}: {raw[:200]!r}") from exc

    def stream(self, path: str, body: Any, timeout: float | None = None) -> EventStream:
        """POST and return the event stream once the server has accepted the request (a
        refusal or an unreachable server raises here, before any event)."""
        connection, response, where = self._send("POST", path, body, timeout, stream=True)
        return EventStream(connection, response, where)
