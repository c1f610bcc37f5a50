"""Requests built to break the server (issue 25's abuse run): each gets a 4xx in the
route's shape, never a 500 or a cut stream, and the server writes the same greedy text
afterwards."""

import json

import pytest

from .conftest import Client

GREEDY = {"prompt": "The knight rode", "max_tokens": 6, "temperature": 0}


def greedy_text(client):
    return client.call("POST", "/v1/completions", GREEDY)[1]["choices"][0]["text"]


@pytest.fixture
def client(server):
    return Client(server)


@pytest.mark.parametrize("prompt", [[10 ** 6], [-1], [2 ** 63], [1, 2, 400]])
def test_token_ids_outside_the_vocabulary_are_4xx(client, prompt):
    before = greedy_text(client)
    status, body = client.call("POST", "/v1/completions", {**GREEDY, "prompt": prompt})
    assert status in (400, 422) and "error" in body
    assert greedy_text(client) == before


@pytest.mark.parametrize("route,body", [
    ("/v1/completions", {**GREEDY, "prompt": "a \\ud800 b"}),
    ("/v1/completions", {**GREEDY, "stop": ["\\udfff"]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x\\ud83d"}], "max_tokens": 4}),
    ("/api/v1/generate", {"prompt": "ok", "memory": "\\ud800", "max_length": 4}),
    ("/api/extra/tokencount", {"prompt": "\\udc00"}),
])
def test_a_lone_surrogate_in_any_text_field_is_422(client, route, body):
    raw = json.dumps(body).replace("\\\\u", "\\u")  # the JSON escape itself, as a client sends it
    response = client.raw("POST", route, raw)
    payload = json.loads(response.read())
    assert response.status == 422, payload
    assert "surrogate" in json.dumps(payload)


@pytest.mark.parametrize("field", ["temperature", "typical_p", "top_p", "min_p"])
def test_denormal_sampler_values_do_not_break_generation(client, field):
    status, body = client.call("POST", "/v1/completions", {**GREEDY, "temperature": 1.0, field: 2.5e-324, "seed": 1})
    assert status in (200, 422), body
    if field == "temperature":  # as good as 0: the argmax
        assert status == 200 and body["choices"][0]["text"] == greedy_text(client)


def test_a_prompt_far_longer_than_the_context_is_refused_before_tokenizing(client, server_engine):
    huge = "word " * 2_000_000  # 10 MB, under the body cap
    status, body = client.call("POST", "/v1/completions", {**GREEDY, "prompt": huge})
    assert status == 400 and "characters" in body["error"]["message"]
    status, body = client.call("POST", "/api/v1/generate", {"prompt": huge, "max_length": 4})
    assert status == 400


def test_an_error_inside_a_stream_ends_it_with_an_error_event_in_the_routes_dialect(client, server, monkeypatch):
    service = server.service

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(service, "_finish", broken)  # fails when the stream's last chunk is made
    response = client.raw("POST", "/v1/completions", {**GREEDY, "stream": True})
    text = response.read().decode()
    assert response.status == 200
    events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == "internal error: RuntimeError"
    response = client.raw("POST", "/api/extra/generate/stream", {"prompt": "The knight", "max_length": 4})
    text = response.read().decode()
    assert "event: error" in text and json.loads(text.split("event: error\ndata: ")[1].split("\n\n")[0])["detail"]["msg"]
