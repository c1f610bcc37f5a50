"""A real vLLM (the CPU build, in its own environment: `make test-vllm`) behind our server.

Our server is started the way a user starts it, `kobold-desktop serve MODEL --backend
vllm`, with no URL: it starts vLLM itself on a free port and stops it when it stops.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from kobold_desktop.softprompt import Metadata, kobold_zip

from ..helpers import build_tiny_model
from ..server.conftest import Client

VLLM_PYTHON = os.environ.get("KOBOLD_VLLM_PYTHON")
# vLLM's CPU attention needs a head size of 32 or more: 128 wide, 4 heads. float32 as our
# reference engine; a small KV cache (this machine has 2 cores and one NUMA node of 7 GiB).
VLLM_ARGS = "--dtype float32 --max-model-len 256 --enforce-eager --gpu-memory-utilization 0.3 --max-num-seqs 16"

SKIP = pytest.mark.skipif(not VLLM_PYTHON, reason="needs vLLM: `make test-vllm` (which .ci/run runs) sets it up")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny random Llama whose tokenizer adds a BOS token."""
    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny-llama", "llama", hidden=128, seed=3)


@pytest.fixture(scope="session")
def softprompts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-softprompts")
    paths = {}
    for name, n, width in (("sea", 6, 128), ("forest", 11, 128), ("wide", 4, 64)):
        torch.manual_seed(n)
        paths[name] = folder / f"{name}.zip"
        kobold_zip.write(paths[name], torch.randn(n, width), Metadata(name=name))
    return paths


class Served:
    def __init__(self, process, port, log, vllm_port):
        self.process, self.port, self.log, self.vllm_port = process, port, log, vllm_port
        self.host = "127.0.0.1"

    def client(self) -> Client:
        return Client(self)


@pytest.fixture(scope="session")
def served(llama_dir, softprompts, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    home = tmp_path_factory.mktemp("home")
    library = home / "data" / "softprompts"  # the user's soft prompt folder: loadable by name
    library.mkdir(parents=True)
    (library / "wide.zip").write_bytes(softprompts["wide"].read_bytes())
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "KOBOLD_DESKTOP_HOME": str(home)}
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "kobold_desktop", "serve", str(llama_dir), "--backend", "vllm",
             "--vllm-python", VLLM_PYTHON, "--vllm-args", VLLM_ARGS, "--port", str(port),
             "--prompt-adapters", f"sea={softprompts['sea']}", f"forest={softprompts['forest']}"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while not answers(f"http://127.0.0.1:{port}/v1/models"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"our server with vLLM did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    vllm_port = int(re.search(r"--port (\d+)", log.read_text()).group(1))
    yield Served(process, port, log, vllm_port)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        process.wait(60)
