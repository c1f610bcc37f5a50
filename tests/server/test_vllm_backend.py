"""The server with its generation on a vLLM-shaped server, in every run of the tests.

The stand-in speaks vLLM's completions protocol (prompt_embeds or token ids in, token
ids streamed back) and runs our tiny model with transformers, greedily: the text through
our server must then be our local engine's. `make test-vllm` does the same against a
real vLLM; these check the parts that need no vLLM: the request's shape, stop, abort,
refusals, and a vLLM that cannot be reached.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM

from kobold_desktop.engine import Engine
from kobold_desktop.engine.remote.embeddings import load_embeddings_only
from kobold_desktop.engine.remote.vllm import VllmClient
from kobold_desktop.server.config import ServeConfig, ServeConfigError
from kobold_desktop.server.http import KoboldServer
from kobold_desktop.server.service import Service
from kobold_desktop.server.vllm import VllmScheduler
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture

from ..helpers import greedy_reference
from .conftest import Client
from .test_front_ends import SILLYTAVERN, sse
from .test_server import GREEDY


class FakeVllm:
    """vLLM's /v1/models and streamed /v1/completions, on a transformers model."""

    def __init__(self, model_dir, delay: float = 0.0):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.requests: list[dict] = []
        self.left: list[int] = []  # tokens sent before a client went away
        self.delay = delay
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    return self._json(200, {"object": "list", "data": [{"id": "fake-vllm", "max_model_len": 200}]})
                self._json(404, {"error": {"message": "no such route"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(body)
                if body.get("model") != "fake-vllm":
                    return self._json(404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}})
                if body.get("seed") == 424242:
                    return self._json(400, {"error": {"message": "seed 424242 is refused here."}})
                tokens = fake.generate(body)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i, token in enumerate(tokens):
                        last = i == len(tokens) - 1
                        finish = ("length" if len(tokens) == body["max_tokens"] else "stop") if last else None
                        event = {"choices": [{"index": 0, "text": "?", "token_ids": [token], "finish_reason": finish}]}
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(fake.delay)
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    fake.left.append(i)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def generate(self, body) -> list[int]:
        if "prompt_embeds" in body:  # vLLM takes the whole prompt as embeddings
            rows = torch.load(io.BytesIO(base64.b64decode(body["prompt_embeds"])), weights_only=True)
            tokens = greedy_reference(self.model, [], body["max_tokens"], rows=rows.to(torch.float32))
        else:
            tokens = greedy_reference(self.model, body["prompt"], body["max_tokens"])
        return tokens + [0] if len(tokens) < body["max_tokens"] else tokens  # vLLM returns the EOS it stopped on

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fake_vllm(model_dirs):
    fake = FakeVllm(model_dirs["gpt2"])
    yield fake
    fake.close()


def remote_server(model_dir, url, adapters):
    engine = Engine(load_embeddings_only(model_dir))
    config = ServeConfig(prompt_adapters={k: str(v) for k, v in adapters.items()}, max_prompt_adapter_token=32,
                         backend="vllm", backend_url=url)
    service = Service(engine, config, VllmScheduler(engine, VllmClient(url)))
    return KoboldServer(service, "127.0.0.1", 0).start()


@pytest.fixture
def served(model_dirs, fake_vllm, adapter_files):
    fake_vllm.requests.clear()
    server = remote_server(model_dirs["gpt2"], fake_vllm.url, {"sea": adapter_files["sea"]})
    yield Client(server)
    server.stop()


def test_text_is_our_engines_with_and_without_a_soft_prompt(served, fake_vllm, server_engine, adapter_files):
    for model, softprompt in (("sea", server_engine.prepare_softprompts([adapter_files["sea"]])), ("gpt2", None)):
        status, body = served.call("POST", "/v1/completions", {"model": model, "prompt": "The knight rode",
                                                               "max_tokens": 16, "temperature": 0})
        assert status == 200, body
        want = server_engine.generate("The knight rode", GREEDY.with_changes(max_new_tokens=16), softprompt=softprompt)
        assert body["choices"][0]["text"] == want.text
        assert body["usage"]["prompt_tokens"] == want.prompt_tokens + want.softprompt_tokens


def test_the_request_vllm_gets(served, fake_vllm, server_engine, adapter_files):
    served.call("POST", "/v1/completions", {"model": "sea", "prompt": "The knight", "max_tokens": 8,
                                            "temperature": 0.7, "top_p": 0.9, "min_p": 0.1, "seed": 3, "stop": ["\n"]})
    served.call("POST", "/v1/completions", {"model": "gpt2", "prompt": "The knight", "max_tokens": 8})
    with_soft, plain = fake_vllm.requests
    assert with_soft["model"] == "fake-vllm" and with_soft["stream"] is True and with_soft["return_token_ids"] is True
    assert {k: with_soft[k] for k in ("max_tokens", "temperature", "top_p", "min_p", "seed", "stop")} == {
        "max_tokens": 8, "temperature": 0.7, "top_p": 0.9, "min_p": 0.1, "seed": 3, "stop": ["\n"]}
    rows = torch.load(io.BytesIO(base64.b64decode(with_soft["prompt_embeds"])), weights_only=True)
    soft = server_engine.prepare_softprompts([adapter_files["sea"]]).tensor
    ids = server_engine.encode("The knight")
    embeddings = server_engine.loaded.model.get_input_embeddings().weight
    assert torch.equal(rows, torch.cat([soft, embeddings[ids]]))  # [soft prompt rows][token embeddings]
    assert "prompt" not in with_soft
    assert plain["prompt"] == ids and "prompt_embeds" not in plain  # no soft prompt: plain token ids


def test_sillytavern_stream_with_a_stop_sequence(served, server_engine, adapter_files):
    softprompt = server_engine.prepare_softprompts([adapter_files["sea"]])
    events = sse(served.raw("POST", "/api/extra/generate/stream", {**SILLYTAVERN, "soft_prompt": "sea"}))
    want = server_engine.generate("The knight rode", GREEDY.with_changes(
        max_new_tokens=12, stop=("\nYou:",), repetition_penalty_range=64), softprompt=softprompt)
    assert "".join(data["token"] for _, data in events) == want.text
    assert events[-1][1]["finish_reason"] == want.finish_reason


def test_abort_drops_the_vllm_request(model_dirs, adapter_files):
    slow = FakeVllm(model_dirs["gpt2"], delay=0.05)
    server = remote_server(model_dirs["gpt2"], slow.url, {"sea": adapter_files["sea"]})
    try:
        client = Client(server)
        body = {**SILLYTAVERN, "max_length": 120, "max_context_length": 256, "stop_sequence": [], "genkey": "K1",
                "soft_prompt": "sea"}
        response = client.raw("POST", "/api/extra/generate/stream", body)
        assert response.readline().startswith(b"event: message")
        assert client.call("POST", "/api/extra/abort", {"genkey": "K1"})[1]["success"] == "true"
        assert sse(response)[-1][1]["finish_reason"] == "stop"
        deadline = time.monotonic() + 10
        while not slow.left and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.left and slow.left[0] < 100  # vLLM saw us leave and stopped sending
    finally:
        server.stop()
        slow.close()


def test_refusals(served, fake_vllm, adapter_files):
    status, body = served.call("POST", "/api/v1/generate", {"prompt": "x", "max_length": 8, "rep_pen": 1.2,
                                                            "rep_pen_range": 2})
    assert status == 422 and "rep_pen_range" in body["error"]["message"]
    status, body = served.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "typical_p": 0.5})
    assert status == 422 and "typical" in body["error"]["message"]
    status, body = served.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "dry_multiplier": 0.8,
                                                           "xtc_probability": 0.5, "temperature": 1})
    assert status == 422 and "xtc_probability, dry_multiplier" in body["error"]["message"]
    status, body = served.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "max_tokens": 4,
                                                           "seed": 424242})
    assert status == 400 and "seed 424242 is refused here" in body["error"]["message"]  # vLLM's own words
    assert not [r for r in fake_vllm.requests if r.get("typical_p")]  # ours never reached vLLM


def test_a_mixture_is_refused_with_the_reason(model_dirs, fake_vllm, adapter_files):
    path = adapter_files["sea"].parent / "two-for-vllm.json"
    write_mixture(path, Mixture("Two", "fixed", (MixtureMember("sea.zip", 1), MixtureMember("forest.zip", 1))),
                  overwrite=True)
    with pytest.raises(ServeConfigError, match="mixtures cannot be served through vLLM"):
        remote_server(model_dirs["gpt2"], fake_vllm.url, {"two": path})


def test_vllm_unreachable_is_a_502_and_the_server_lives(model_dirs, adapter_files):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = remote_server(model_dirs["gpt2"], f"http://127.0.0.1:{port}/v1", {"sea": adapter_files["sea"]})
    try:
        client = Client(server)
        for path, body in (("/v1/completions", {"model": "sea", "prompt": "x", "max_tokens": 4}),
                           ("/api/v1/generate", {"prompt": "x", "max_length": 4}),
                           ("/v1/chat/completions", {"model": "sea", "messages": [{"role": "user", "content": "x"}]})):
            status, answer = client.call("POST", path, body)
            if path.endswith("chat/completions") and status == 400:
                continue  # the tiny tokenizer has no chat template
            assert status == 502, answer
            assert f"cannot reach vLLM at http://127.0.0.1:{port}/v1" in answer["error"]["message"]
        assert client.call("GET", "/v1/models")[0] == 200
        assert client.call("GET", "/api/v1/model")[1] == {"result": "gpt2"}
    finally:
        server.stop()


def test_what_vllm_has_is_passed_on_under_its_names(served, fake_vllm):
    status, _ = served.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "max_tokens": 4,
                                                        "presence_penalty": 0.5, "frequency_penalty": 0.25,
                                                        "logit_bias": {"5": 2.0}, "custom_token_bans": "7"})
    assert status == 200
    sent = fake_vllm.requests[-1]
    assert sent["presence_penalty"] == 0.5 and sent["frequency_penalty"] == 0.25
    assert sent["logit_bias"] == {"5": 2.0, "7": -100.0}
