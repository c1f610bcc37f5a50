"""Context shift on the server: `serve --shift` (KoboldCpp's ContextShift; `--noshift`, the
default, reads exactly what it is sent), reported in OpenAI's usage and in the log."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from kobold_desktop.cli import main
from kobold_desktop.engine import Engine
from kobold_desktop.server.config import ServeConfig

from ..engine.test_context_shift import story_parts
from ..helpers import FLOAT32
from .conftest import Client, start_server
from .test_serve_command import free_port


def two_turns(call):
    """The earlier turn, then the next one whose prompt dropped the oldest text (A)."""
    K, A, B, C = story_parts()
    call({"prompt": K + A + B, "max_tokens": 1, "temperature": 0})
    return call({"prompt": K + B + C, "max_tokens": 4, "temperature": 0}), (K, A, B, C)


@pytest.mark.parametrize("shift", [True, False])
def test_usage_says_what_was_shifted(model_dirs, shift, caplog):
    engine = Engine()
    engine.load(model_dirs["llama"], FLOAT32)
    engine.context_shift = shift
    server = start_server(engine, ServeConfig())
    client = Client(server)
    try:
        with caplog.at_level(logging.INFO, logger="kobold_desktop.server"):
            (status, body), (K, A, B, C) = two_turns(lambda b: client.call("POST", "/v1/completions", b))
    finally:
        server.stop()
    details = body["usage"]["prompt_tokens_details"]
    if shift:
        assert details == {"cached_tokens": len(K) + len(B), "shifted_tokens": len(B)}
        assert f"{len(B)} of them shifted past dropped text" in caplog.text
    else:
        assert details == {"cached_tokens": len(K)}  # the unchanged start only: exact
        assert "shifted" not in caplog.text


def test_serve_shift_flag(model_dirs, tmp_path, capsys, monkeypatch):
    port = free_port()
    env = {**os.environ, "KOBOLD_DESKTOP_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "kobold_desktop", "serve", str(model_dirs["llama"]), "--shift",
                             "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)

    def call(body):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=60).read())

    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.3)
        body, (K, A, B, C) = two_turns(call)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert body["usage"]["prompt_tokens_details"]["shifted_tokens"] == len(B)
    assert proc.returncode == 0 and "Traceback" not in err

    # --shift and --noshift together are a usage error; a model that cannot shift says so and serves exactly
    with pytest.raises(SystemExit) as exited:
        main(["serve", str(model_dirs["llama"]), "--shift", "--noshift"])
    assert exited.value.code == 2
    import kobold_desktop.cli.serve as serve_command

    seen = {}
    monkeypatch.setattr(serve_command, "serve", lambda service, config, args: seen.setdefault("engine", service.engine)
                        and 0)
    assert main(["serve", str(model_dirs["gpt2"]), "--shift", "--only-prompt-adapters"]) == 0
    assert "--shift is off: context shift supports" in capsys.readouterr().err
    assert seen["engine"].context_shift  # asked for; the cores fall back to exact on this model
