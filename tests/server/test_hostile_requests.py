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
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    from kobold_desktop.engine.sequence import FinishReason

    monkeypatch.setattr(FinishReason, "openai", property(broken))  # fails when the stream's last chunk is made
    response = client.raw("POST", "/v1/completions", {**GREEDY, "stream": True})
    text = response.read().decode()
    assert response.status == 200
    events = [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["message"] == "internal error: RuntimeError"
    response = client.raw("POST", "/api/extra/generate/stream", {"prompt": "The knight", "max_length": 4})
    text = response.read().decode()
    assert "event: error" in text and json.loads(text.split("event: error\ndata: ")[1].split("\n\n")[0])["detail"]["msg"]


def test_openapi_json_is_served_and_describes_every_route(client, server):
    from fastapi.routing import APIRoute

    status, spec = client.call("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    operations = [(method.upper(), path, op) for path, item in spec["paths"].items() for method, op in item.items()]
    ids = [op["operationId"] for _, _, op in operations]
    assert len(ids) == len(set(ids))  # API tools and client generators need them unique
    routes = {(method, route.path) for route in server._server.config.app.routes if isinstance(route, APIRoute)
              for method in route.methods}
    assert routes == {(method, path) for method, path, _ in operations}
    for method, path, op in operations:  # every error the server sends is described
        assert {"400", "401", "422", "500"} <= set(op["responses"]), (method, path)
    for path in ("/v1/completions", "/v1/chat/completions", "/api/extra/generate/stream"):
        assert "text/event-stream" in spec["paths"][path]["post"]["responses"]["200"]["content"]
    assert "CompletionRequest" in spec["components"]["schemas"]


def _slow_server(server_engine, monkeypatch):
    from kobold_desktop.server import http
    from kobold_desktop.server.config import ServeConfig

    from .conftest import start_server

    monkeypatch.setattr(http, "HEADER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(http, "BODY_TIMEOUT_S", 1.5)
    return start_server(server_engine, ServeConfig())


def test_a_client_that_never_finishes_its_headers_is_cut_off(server_engine, monkeypatch):
    import socket
    import time

    server = _slow_server(server_engine, monkeypatch)
    try:
        with socket.create_connection((server.host, server.port)) as conn:
            conn.settimeout(10)
            start = time.monotonic()
            for piece in (b"POST /v1/completions HTTP/1.1\r\n", b"Host: 127.0.0.1\r\n", b"X-a: b\r\n", b"X-c: d\r\n"):
                try:
                    conn.sendall(piece)
                except OSError:
                    break
                time.sleep(0.4)  # a byte every so often restarted no clock before
            assert conn.recv(1024) == b""  # closed by the server
            assert time.monotonic() - start < 5
        assert Client(server).call("GET", "/v1/models")[0] == 200  # others are served
    finally:
        server.stop()


def test_a_body_that_trickles_in_gets_408_within_the_whole_request_deadline(server_engine, monkeypatch):
    import socket
    import time

    server = _slow_server(server_engine, monkeypatch)
    try:
        with socket.create_connection((server.host, server.port)) as conn:
            conn.settimeout(10)
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n")
            start = time.monotonic()
            reply = b""
            for _ in range(20):  # one byte every 0.3 s: each under the old per-chunk timeout
                try:
                    conn.sendall(b" ")
                except OSError:
                    break
                time.sleep(0.3)
                conn.setblocking(False)
                try:
                    reply += conn.recv(4096)
                except BlockingIOError:
                    pass
                conn.setblocking(True)
                if reply:
                    break
            assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
            assert time.monotonic() - start < 4
    finally:
        server.stop()


def test_a_request_with_n_16_does_not_make_a_short_one_wait_for_its_rows(server_engine):
    """One client asking for 16 copies used to fill all 16 rows; a 4-token request then
    waited for them (48.5 s in the abuse run). It joins at the next step now."""
    from kobold_desktop.engine import SamplingSettings
    from kobold_desktop.server.scheduler import BatchScheduler

    sizes: list[int] = []
    scheduler = BatchScheduler(server_engine, max_batch=16, on_step=sizes.append)
    try:
        ids = server_engine.encode("The knight rode")
        heavy, group = [], object()
        for copy in range(16):
            heavy.append(scheduler.submit(ids, None, SamplingSettings(max_new_tokens=120, temperature=1.0, seed=copy,
                                                                      repetition_penalty=1.0), group=group))
        next(iter(heavy[0]))  # the heavy rows are running
        short = scheduler.submit(ids, None, SamplingSettings(max_new_tokens=4, temperature=0))
        result = short.result()
        assert result.generated_tokens >= 1
        heavy_results = [s.result() for s in heavy]
        assert max(sizes) == 17  # it joined past the heavy client's 16 rows
        longest = max(r.generated_tokens for r in heavy_results)
        # it finished within a few steps of joining, long before the heavy rows ended
        assert sizes.index(17) + result.generated_tokens + 2 < len(sizes) \
            or longest <= result.generated_tokens + 2
    finally:
        scheduler.stop()


def test_many_separate_clients_still_share_max_batch(server_engine):
    from kobold_desktop.engine import SamplingSettings
    from kobold_desktop.server.scheduler import BatchScheduler

    sizes: list[int] = []
    scheduler = BatchScheduler(server_engine, max_batch=4, on_step=sizes.append)
    try:
        ids = server_engine.encode("The knight")
        streams = [scheduler.submit(ids, None, SamplingSettings(max_new_tokens=6, temperature=1.0, seed=i))
                   for i in range(10)]
        for stream in streams:
            stream.result()
        assert max(sizes) <= 4  # no client holds more than half: no overflow
    finally:
        scheduler.stop()


def test_a_bad_file_in_the_library_never_stops_the_server_or_gives_500(server_engine, tmp_path):
    """`serve --prompt-adapters x=Sea` failed at start and a load by name gave 500 while
    one damaged file sat in the library."""
    import torch

    from kobold_desktop.paths import user_softprompt_dir
    from kobold_desktop.server.config import ServeConfig
    from kobold_desktop.softprompt import Metadata, kobold_zip

    from ..softprompt.test_hostile import mkultra_view
    from .conftest import start_server

    folder = user_softprompt_dir()
    folder.mkdir(parents=True, exist_ok=True)
    kobold_zip.write(folder / "sea.zip", torch.randn(4, 32), Metadata(name="Sea"))
    mkultra_view(folder / "leak.json", 16, 0, (8, 4), (4, 1))
    (folder / "deep.json").write_text('{"tensor": ' + "[" * 5000 + "]" * 5000 + "}")
    server = start_server(server_engine, ServeConfig(prompt_adapters={"x": "Sea"}))  # by name, at start
    try:
        client = Client(server)
        assert [m["id"] for m in client.call("GET", "/v1/models")[1]["data"]][1:] == ["x"]
        for name in ("leak", "deep.json"):
            status, body = client.call("POST", "/v1/soft_prompt/load", {"name": name, "path": name})
            assert status == 400 and "error" in body, (status, body)
        status, body = client.call("PUT", "/api/v1/config/soft_prompt", {"value": "leak"})
        assert 400 <= status < 500, (status, body)
    finally:
        server.stop()
