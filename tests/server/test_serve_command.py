"""`kobold-desktop serve` as a user runs it: a YAML config, then requests, then Ctrl+C."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import torch

from kobold_desktop.cli import main
from kobold_desktop.softprompt import Metadata, kobold_zip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_from_a_yaml_config(model_dirs, tmp_path):
    kobold_zip.write(tmp_path / "sea.zip", torch.randn(4, 32), Metadata(name="sea"))
    port = free_port()
    (tmp_path / "serve.yaml").write_text(
        f"model: {model_dirs['gpt2']}\nenable_prompt_adapter: true\nprompt_adapters:\n  sea: {tmp_path / 'sea.zip'}\n"
        f"max_prompt_adapter_token: 64\nmax_prompt_adapters: 4\nhost: 127.0.0.1\nport: {port}\napi_key: k\n")
    env = {**os.environ, "KOBOLD_DESKTOP_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "kobold_desktop", "serve", "--config", str(tmp_path / "serve.yaml")],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                                 headers={"Authorization": "Bearer k"})
                models = json.loads(urllib.request.urlopen(request, timeout=5).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.3)
        assert [m["id"] for m in models["data"]] == ["gpt2", "sea"]
        body = json.dumps({"model": "sea", "prompt": "Once", "max_tokens": 5}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Authorization": "Bearer k", "Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert reply["usage"]["completion_tokens"] <= 5
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Serving gpt2 (soft prompts: sea)" in err and "Traceback" not in err
    assert "Running on cpu in " in err  # the device and the precision chosen for this CPU


def test_serve_refuses_bad_adapters_with_exit_2(model_dirs, tmp_path, capsys):
    kobold_zip.write(tmp_path / "wide.zip", torch.randn(3, 64), Metadata(name="wide"))
    code = main(["serve", str(model_dirs["gpt2"]), "--prompt-adapters", f"wide={tmp_path / 'wide.zip'}", "--port", "0"])
    assert code == 2
    assert "made for a model with hidden size 64; this model has 32" in capsys.readouterr().err
    assert main(["serve", str(model_dirs["gpt2"]), "--prompt-adapters", "no-equals-sign"]) == 2
    (tmp_path / "bad.yaml").write_text("colour: blue\n")
    assert main(["serve", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown setting(s) colour" in capsys.readouterr().err


def test_serve_offers_the_library_by_default_and_only_the_named_ones_when_asked(model_dirs, tmp_path, monkeypatch):
    """KoboldAI serves its softprompts folder: with no --prompt-adapters every soft prompt in
    the library that fits the model is a model; --only-prompt-adapters serves just those named."""
    from kobold_desktop import paths

    home = tmp_path / "home"
    monkeypatch.setenv(paths.HOME_ENV, str(home))
    folder = paths.user_softprompt_dir()
    folder.mkdir(parents=True, exist_ok=True)
    kobold_zip.write(folder / "Fits.zip", torch.randn(4, 32), Metadata(name="Fits"))
    kobold_zip.write(folder / "Wide.zip", torch.randn(4, 48), Metadata(name="Wide"))  # another model's width
    kobold_zip.write(tmp_path / "named.zip", torch.randn(4, 32), Metadata(name="named"))

    def served(*extra):
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "kobold_desktop", "serve", str(model_dirs["gpt2"]), "--port",
                                 str(port), *extra], env={**os.environ, paths.HOME_ENV: str(home)},
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read())
                    return [m["id"] for m in models["data"]]
                except OSError:
                    assert proc.poll() is None and time.time() < deadline
                    time.sleep(0.3)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)

    assert served() == ["gpt2", "Fits"]
    assert served("--prompt-adapters", f"named={tmp_path / 'named.zip'}") == ["gpt2", "named", "Fits"]
    assert served("--prompt-adapters", f"named={tmp_path / 'named.zip'}", "--only-prompt-adapters") == ["gpt2", "named"]
