"""Fuzzing the server's request bodies: valid bodies of each route, as SillyTavern, KoboldAI
Lite and the OpenAI client send them, with any field replaced by a hostile value (huge,
deep, denormal, negative, lone surrogates, wrong types), mutated byte by byte, or streamed.
The property: an answer below 500 in the route's shape (a stream ends with [DONE] or an
error event, never a cut connection), and afterwards the same greedy text as before."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..server.conftest import Client, adapter_files, server_engine, start_server  # noqa: F401 - fixtures
from .test_files import COUNTS, OPS, mutate_bytes, mutate_json

EXAMPLES = int(os.environ.get("KOBOLD_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=EXAMPLES <= 100,
                suppress_health_check=list(HealthCheck))

BODIES = {
    "/v1/completions": {"model": "sea", "prompt": "The knight rode", "max_tokens": 4, "temperature": 0.7,
                        "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "seed": 5,
                        "stop": ["\n"], "n": 1, "stream": False},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
    "/api/v1/generate": {"prompt": "The knight rode", "memory": "A tale.", "max_length": 4,
                         "max_context_length": 200, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "typical": 1,
                         "rep_pen": 1.1, "rep_pen_range": 64, "sampler_seed": -1, "stop_sequence": ["\n"],
                         "genkey": "KCPP1234"},
    "/api/extra/generate/stream": {"prompt": "The knight rode", "max_length": 4, "temperature": 0},
    "/api/extra/tokencount": {"prompt": "The knight rode"},
    "/v1/tokenize": {"prompt": "The knight"},
    "/v1/detokenize": {"tokens": [1, 2, 3]},
}


@pytest.fixture(scope="module")
def live(server_engine, adapter_files):
    from kobold_desktop.server.config import ServeConfig

    server = start_server(server_engine, ServeConfig(prompt_adapters={"sea": str(adapter_files["sea"])},
                                                     max_prompt_adapter_token=32))
    yield server
    server.stop()


def _greedy(client):
    return client.call("POST", "/v1/completions", {"prompt": "The knight", "max_tokens": 5, "temperature": 0})[1]


@pytest.mark.parametrize("route", sorted(BODIES))
def test_request_bodies(route, live):
    client = Client(live)
    before = _greedy(client)["choices"][0]["text"]

    @FUZZ
    @given(data=st.data(), bytewise=st.booleans(), stream=st.booleans())
    def run(data, bytewise, stream):
        body = json.loads(json.dumps(BODIES[route]))
        if stream and "max_tokens" in body:
            body["stream"] = True
        raw = mutate_bytes(json.dumps(body).encode(), data.draw(OPS)) if bytewise else \
            mutate_json(body, data).encode("utf-8", "surrogatepass")
        response = client.raw("POST", route, raw)
        payload = response.read()
        kind = f"request {route}"
        if response.status >= 500:
            COUNTS[kind]["defect"] += 1
            raise AssertionError(f"{response.status}: {payload[:300]!r} for {raw[:300]!r}")
        if response.getheader("Content-Type", "").startswith("text/event-stream"):
            text = payload.decode()
            assert text.rstrip().endswith("data: [DONE]") or "event: error" in text or \
                text.rstrip().endswith("}") and "finish_reason" in text, text[-300:]
        else:
            json.loads(payload)  # a JSON answer, whole
        COUNTS[kind]["accepted" if response.status < 400 else "refused"] += 1

    run()
    assert _greedy(client)["choices"][0]["text"] == before
