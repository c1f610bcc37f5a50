"""Requests shaped as real clients send them: SillyTavern and KoboldAI Lite (KoboldCpp's
dialect), the openai client, browsers on other sites, and malformed HTTP."""

import json
import socket
import threading

import pytest

from kobold_desktop.server.config import ServeConfig

from .conftest import Client, start_server
from .test_server import BODY, GREEDY, expected

# SillyTavern's "KoboldAI Classic" generate body (public/scripts/kai-settings.js), trimmed of nothing.
SILLYTAVERN = {
    "prompt": "The knight rode", "max_context_length": 200, "max_length": 12, "rep_pen": 1.0, "rep_pen_range": 64,
    "rep_pen_slope": 0.9, "temperature": 0, "tfs": 1, "top_a": 0, "top_k": 0, "top_p": 1, "min_p": 0, "typical": 1,
    "sampler_order": [6, 0, 1, 3, 4, 2, 5], "use_default_badwordsids": False, "n": 1, "mirostat": 0,
    "mirostat_tau": 5, "mirostat_eta": 0.1, "grammar": "", "sampler_seed": -1, "stop_sequence": ["\nYou:"],
    "dry_multiplier": 0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_sequence_breakers": ["\n", ":"],
    "xtc_threshold": 0.1, "xtc_probability": 0, "dynatemp_range": 0, "smoothing_factor": 0, "banned_tokens": [],
    "api_server": "http://127.0.0.1:5001/api", "can_abort": True, "streaming": True, "trim_stop": True,
}


def sse(response):
    """KoboldCpp-style events: (event name, data) pairs, as the clients split them."""
    text = response.read().decode()
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            lines = dict(line.split(": ", 1) for line in block.split("\n"))
            events.append((lines.get("event"), json.loads(lines["data"])))
    return events


def test_sillytavern_connects_probes_and_generates_with_its_full_body(client, server_engine):
    version = client.call("GET", "/api/extra/version")[1]
    assert version["result"] == "KoboldCpp" and version["version"]
    assert client.call("GET", "/api/v1/model")[1] == {"result": "gpt2"}
    for path in ("/api/v1/config/max_context_length", "/api/extra/true_max_context_length"):
        assert client.call("GET", path)[1] == {"value": 256}
    assert 0 < client.call("GET", "/api/v1/config/max_length")[1]["value"] <= 256
    status, body = client.call("POST", "/api/v1/generate", SILLYTAVERN)
    want = expected(server_engine, "The knight rode", settings=GREEDY.with_changes(
        stop=("\nYou:",), repetition_penalty_range=64))
    assert status == 200 and body["results"][0]["text"] == want.text


def test_the_koboldcpp_stream_format_and_its_final_event(client, server_engine):
    response = client.raw("POST", "/api/extra/generate/stream", {**SILLYTAVERN, "genkey": "KCPP1234"})
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/event-stream")
    events = sse(response)
    assert all(name == "message" for name, _ in events)
    assert all(data["finish_reason"] is None for _, data in events[:-1])
    assert events[-1][1]["finish_reason"] in ("length", "stop")
    text = "".join(data["token"] for _, data in events)
    assert text == expected(server_engine, "The knight rode", settings=GREEDY.with_changes(
        stop=("\nYou:",), repetition_penalty_range=64)).text


def test_abort_mid_stream_and_check_by_genkey(client, server_engine):
    server_engine.loaded.model.generation_config.eos_token_id = None
    eos, server_engine.loaded.tokenizer.eos_token = server_engine.loaded.tokenizer.eos_token, None
    try:
        body = {**SILLYTAVERN, "max_length": 200, "max_context_length": 256, "stop_sequence": [], "genkey": "KCPP42"}
        response = client.raw("POST", "/api/extra/generate/stream", body)
        first = response.readline() + response.readline() + response.readline()
        assert first.startswith(b"event: message")
        partial = client.call("POST", "/api/extra/generate/check", {"genkey": "KCPP42"})[1]["results"][0]["text"]
        assert partial
        assert client.call("POST", "/api/extra/abort", {"genkey": "KCPP42"})[1]["success"] == "true"
        rest = sse(response)
        assert rest[-1][1]["finish_reason"] == "stop"  # KoboldCpp reports an abort as a stop
        assert len("".join(d["token"] for _, d in rest)) < 200 * 4
        assert client.call("POST", "/api/extra/abort", {"genkey": "KCPP42"})[1]["success"] == "false"  # gone
    finally:
        server_engine.loaded.tokenizer.eos_token = eos
        server_engine.loaded.model.generation_config.eos_token_id = 0


def test_token_counting_and_tokenize_routes(client, server_engine):
    ids = server_engine.encode("The knight rode", add_special_tokens=False)
    assert client.call("POST", "/api/extra/tokencount", {"prompt": "The knight rode"})[1] == {"value": len(ids), "ids": ids}
    for path in ("/v1/tokenize", "/tokenize"):
        body = client.call("POST", path, {"model": "gpt2", "prompt": "The knight rode"})[1]
        assert body == {"tokens": server_engine.encode("The knight rode"), "count": len(ids), "max_model_len": 256}
    assert client.call("POST", "/v1/detokenize", {"tokens": ids})[1] == {"prompt": "The knight rode"}
    assert client.call("POST", "/v1/detokenize", {"tokens": [10**9]})[0] == 422


def test_the_openai_client(server, server_engine, adapter_files):
    from openai import OpenAI

    api = OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in api.models.list()] == ["gpt2", "sea", "forest"]
    completion = api.completions.create(model="sea", prompt="The knight rode", max_tokens=12, temperature=0,
                                        extra_body={"repetition_penalty": 1.0})
    assert completion.choices[0].text == expected(server_engine, "The knight rode", adapter_files["sea"]).text
    chunks = api.completions.create(model="gpt2", prompt="The knight rode", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected(server_engine, "The knight rode").text


# -- safe by default -------------------------------------------------------------------------


def test_a_web_page_on_another_site_cannot_call_and_reads_only_why(client, server):
    """Its request is refused before any route runs; the refusal carries CORS headers for
    that page (its preflight is answered too), so the page can show our message instead of
    "failed to connect"."""
    evil = {"Origin": "https://evil.example"}
    response = client.raw("POST", "/api/extra/abort", {}, headers={**evil, "Content-Type": "text/plain"})
    body = json.loads(response.read())
    assert response.status == 403 and "not allowed" in body["error"]["message"]
    assert response.getheader("Access-Control-Allow-Origin") == "https://evil.example"
    preflight = client.raw("OPTIONS", "/v1/completions", None, headers={
        **evil, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
    preflight.read()
    assert preflight.status == 204 and preflight.getheader("Access-Control-Allow-Origin") == "https://evil.example"
    response = client.raw("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2},
                          headers={**evil, "Content-Type": "application/json"})
    assert response.status == 403 and b"not allowed" in response.read()
    response = client.raw("GET", "/v1/models", None, headers={"Origin": "http://localhost:5173"})
    response.read()
    assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") == "http://localhost:5173"


def test_allowed_origins_let_koboldai_lite_connect(server_engine):
    srv = start_server(server_engine, ServeConfig(allowed_origins=["https://lite.koboldai.net"]))
    try:
        response = Client(srv).raw("GET", "/api/extra/version", None, headers={"Origin": "https://lite.koboldai.net"})
        response.read()
        assert response.status == 200
        assert response.getheader("Access-Control-Allow-Origin") == "https://lite.koboldai.net"
    finally:
        srv.stop()


def test_dns_rebinding_is_refused_by_the_host_check(client):
    status, body = client.call("GET", "/v1/models", headers={"Host": "attacker.example:2242"})
    assert status == 421 and "only requests to localhost" in body["error"]["message"]
    assert client.call("GET", "/v1/models", headers={"Host": "localhost:2242"})[0] == 200


def test_soft_prompts_load_by_path_only_from_the_users_folders_unless_the_admin_key_is_sent(server_engine, tmp_path):
    import torch

    from kobold_desktop.softprompt import Metadata, kobold_zip

    outside = tmp_path / "private" / "secret.zip"
    outside.parent.mkdir()
    kobold_zip.write(outside, torch.randn(3, 32), Metadata(name="secret"))
    srv = start_server(server_engine, ServeConfig())
    try:
        status, body = Client(srv).call("POST", "/v1/soft_prompt/load", {"name": "s", "path": str(outside)})
        assert status == 403 and "only from your soft prompt folders" in body["error"]["message"]
    finally:
        srv.stop()
    srv = start_server(server_engine, ServeConfig(api_key="user", admin_key="admin"))
    try:
        assert Client(srv, "user").call("POST", "/v1/soft_prompt/load", {"name": "s", "path": str(outside)})[0] == 401
        assert Client(srv, "admin").call("POST", "/v1/soft_prompt/load", {"name": "s", "path": str(outside)})[0] == 200
    finally:
        srv.stop()


def test_binding_beyond_loopback_without_a_key_warns(capsys):
    from kobold_desktop.server.http import warn_if_exposed

    warn_if_exposed("0.0.0.0", None)
    assert "without an API key" in capsys.readouterr().err
    warn_if_exposed("0.0.0.0", "k")
    warn_if_exposed("127.0.0.1", None)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("raw", [
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ten\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999\r\n\r\n{}",
    b"GARBAGE\r\n\r\n",
])
def test_malformed_http_gets_a_4xx_and_the_server_lives_on(client, raw):
    with socket.create_connection((client.host, client.port), timeout=10) as conn:
        conn.sendall(raw)
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert client.call("POST", "/v1/completions", BODY)[0] == 200


def test_a_truncated_body_from_a_client_that_leaves_harms_nothing(client):
    with socket.create_connection((client.host, client.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500\r\n\r\n{\"prompt\": \"The")
    results = []
    threads = [threading.Thread(target=lambda: results.append(client.call("POST", "/v1/completions", BODY)[0]))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200]


# KoboldAI Lite's generate body (its submit_generation for a KoboldCpp endpoint).
LITE = {
    "n": 1, "max_context_length": 64, "max_length": 10, "rep_pen": 1.0, "temperature": 0, "top_p": 1, "top_k": 0,
    "top_a": 0, "typical": 1, "tfs": 1, "rep_pen_range": 360, "rep_pen_slope": 0.7, "sampler_order": [6, 0, 1, 3, 4, 2, 5],
    "memory": "A tale of the sea.\n", "trim_stop": True, "genkey": "KCPP7788", "min_p": 0, "dynatemp_range": 0,
    "dynatemp_exponent": 1, "smoothing_factor": 0, "banned_tokens": [], "render_special": False,
    "presence_penalty": 0, "logit_bias": {}, "prompt": "word " * 100 + "The knight rode", "quiet": True,
    "stop_sequence": ["You:", "\nYou "], "use_default_badwordsids": False, "bypass_eos": False,
}


def test_koboldai_lites_body_keeps_its_memory_whole_and_the_storys_end(client, server_engine):
    status, body = client.call("POST", "/api/v1/generate", LITE)
    assert status == 200
    memory = server_engine.encode(LITE["memory"])
    story = server_engine.encode(LITE["prompt"], add_special_tokens=False)
    room = 64 - 10 - len(memory)
    from kobold_desktop.story.context import trim_in_blocks

    drop = trim_in_blocks(len(story), room)  # the story's start goes in blocks, as the window trims
    want = server_engine.generate(memory + story[drop:], GREEDY.with_changes(
        max_new_tokens=10, stop=("You:", "\nYou "), repetition_penalty_range=360))
    assert body["results"][0]["text"] == want.text
    assert body["results"][0]["prompt_tokens"] == len(memory) + len(story) - drop <= 64 - 10


def test_a_client_that_stops_sending_its_body_gets_408(server_engine, monkeypatch):
    monkeypatch.setattr("kobold_desktop.server.http.BODY_TIMEOUT_S", 0.5)
    srv = start_server(server_engine, ServeConfig())
    try:
        client = Client(srv)
        with socket.create_connection((client.host, client.port), timeout=10) as conn:
            conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 500\r\n\r\n{\"prompt\": \"The")
            reply = conn.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
        assert client.call("POST", "/v1/completions", BODY)[0] == 200
    finally:
        srv.stop()


def test_abort_without_a_genkey_stops_only_a_lone_generation(client, server):
    from kobold_desktop.server.service import Generation

    service = server.service
    a, b = Generation("A", []), Generation("B", [])
    service.generations.update({"A": a, "B": b})
    try:
        assert client.call("POST", "/api/extra/abort")[1]["success"] == "false"  # two run: not guessed
        del service.generations["B"]
        assert client.call("POST", "/api/extra/abort")[1]["success"] == "true"
    finally:
        service.generations.clear()
