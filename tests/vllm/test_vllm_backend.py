"""`serve --backend vllm` against a real vLLM: the same text as our own engine, streaming,
soft prompts checked before vLLM sees them, and a vLLM that goes away."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kobold_desktop.engine import Engine, SamplingSettings

from ..helpers import FLOAT32
from ..server.test_front_ends import SILLYTAVERN, sse
from .conftest import SKIP, answers

pytestmark = SKIP

GREEDY = SamplingSettings(max_new_tokens=24, temperature=0.0, repetition_penalty=1.0, top_p=1.0)
PROMPTS = ["Once upon a time there was", "The knight rode through the", "She opened the door"]


@pytest.fixture(scope="module")
def local(llama_dir):
    engine = Engine()
    engine.load(llama_dir, FLOAT32)
    return engine


def local_text(local, softprompts, name, prompt):
    """Our engine's greedy text (the server makes its text from vLLM's token ids with our
    detokenizer, so even half a UTF-8 character at the end comes out the same)."""
    softprompt = local.prepare_softprompts([softprompts[name]]) if name else None
    return local.generate(prompt, GREEDY, softprompt=softprompt).text


def complete(client, model, prompt, **extra):
    status, body = client.call("POST", "/v1/completions", {
        "model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0, **extra})
    assert status == 200, body
    return body


@pytest.mark.parametrize("name", [None, "sea", "forest"])
def test_greedy_text_equals_our_local_engine(served, local, softprompts, name):
    client = served.client()
    for prompt in PROMPTS:
        body = complete(client, name or "tiny-llama", prompt)
        expected = local_text(local, softprompts, name, prompt)
        assert body["choices"][0]["text"] == expected
        ids = local.encode(prompt)
        assert ids[0] == local.loaded.tokenizer.bos_token_id  # the BOS row went to vLLM in the tensor
        n_soft = 0 if name is None else {"sea": 6, "forest": 11}[name]
        assert body["usage"]["prompt_tokens"] == len(ids) + n_soft
        assert body["usage"]["completion_tokens"] == 24 and body["choices"][0]["finish_reason"] == "length"


def test_soft_prompts_steer_the_text(served):
    client = served.client()
    texts = {name: complete(client, name, PROMPTS[0])["choices"][0]["text"] for name in ("tiny-llama", "sea", "forest")}
    assert len(set(texts.values())) == 3


def test_kobold_routes_go_through_vllm(served, local, softprompts):
    client = served.client()
    status, body = client.call("POST", "/api/v1/generate", {
        "prompt": PROMPTS[1], "max_length": 24, "temperature": 0.01, "top_k": 1, "rep_pen": 1.0,
        "soft_prompt": "forest", "max_context_length": 256})
    assert status == 200, body
    assert body["results"][0]["text"] == local_text(local, softprompts, "forest", PROMPTS[1])


def test_streaming_with_the_openai_client(served, local, softprompts):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{served.port}/v1", api_key="none")
    chunks = [c.choices[0].text for c in client.completions.create(
        model="sea", prompt=PROMPTS[2], max_tokens=24, temperature=0, stream=True) if c.choices]
    assert len([c for c in chunks if c]) > 3  # token by token, not one lump
    assert "".join(chunks) == local_text(local, softprompts, "sea", PROMPTS[2])


def test_sillytavern_streams_through_koboldcpp_routes(served, local, softprompts):
    """SillyTavern's whole KoboldCpp body (rep_pen 1 with a range, stop sequences, samplers
    vLLM lacks left at their neutral values), streamed, under a soft prompt."""
    body = {**SILLYTAVERN, "prompt": PROMPTS[0], "max_length": 24, "soft_prompt": "sea", "genkey": "KCPP7"}
    events = sse(served.client().raw("POST", "/api/extra/generate/stream", body))
    want = local.generate(PROMPTS[0], GREEDY.with_changes(stop=("\nYou:",), repetition_penalty_range=64),
                          softprompt=local.prepare_softprompts([softprompts["sea"]]))
    assert len(events) > 3 and all(name == "message" for name, _ in events)
    assert "".join(data["token"] for _, data in events) == want.text
    assert events[-1][1]["finish_reason"] == want.finish_reason


def test_eight_clients_at_once_get_what_each_gets_alone(served, local, softprompts):
    client = served.client()
    jobs = [(name, prompt) for name in ("sea", "forest", "tiny-llama", "sea") for prompt in PROMPTS[:2]]
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda job: complete(client, *job)["choices"][0]["text"], jobs))
    for (name, prompt), text in zip(jobs, texts):
        assert text == local_text(local, softprompts, None if name == "tiny-llama" else name, prompt)


def test_a_soft_prompt_of_the_wrong_width_is_refused_before_vllm(served):
    client = served.client()
    status, body = client.call("POST", "/v1/soft_prompt/load", {"name": "wide", "path": "wide"})
    assert status == 400
    assert "64" in body["error"]["message"] and "128" in body["error"]["message"]
    status, body = client.call("GET", "/v1/models")
    assert "wide" not in [m["id"] for m in body["data"]]


def test_what_vllm_cannot_do_is_refused_with_a_clear_4xx(served):
    client = served.client()
    status, body = client.call("POST", "/api/v1/generate", {
        "prompt": PROMPTS[0], "max_length": 16, "rep_pen": 1.2, "rep_pen_range": 4, "soft_prompt": "sea"})
    assert status == 422 and "rep_pen_range" in body["error"]["message"]
    status, body = client.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "typical_p": 0.5})
    assert status == 422 and "typical" in body["error"]["message"]
    # vLLM's own refusals come back as they are (a 4xx, its message)
    status, body = client.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "max_tokens": 16,
                                                           "top_p": 1.0, "min_p": 1.5})
    assert 400 <= status < 500, body


def test_sampling_with_a_seed_repeats(served):
    client = served.client()
    first = complete(client, "forest", PROMPTS[0], temperature=0.9, seed=7)["choices"][0]["text"]
    again = complete(client, "forest", PROMPTS[0], temperature=0.9, seed=7)["choices"][0]["text"]
    assert first == again


def _vllm_pids(port: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"vllm.entrypoints.openai.api_server" in b" ".join(cmdline) and str(port).encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_zz_vllm_gone_gives_502_and_our_server_lives_then_stops_vllm_with_it(served):
    client = served.client()
    pids = _vllm_pids(served.vllm_port)
    assert pids, "vLLM was started by our server"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while answers(f"http://127.0.0.1:{served.vllm_port}/v1/models") and time.monotonic() < deadline:
        time.sleep(0.5)
    status, body = client.call("POST", "/v1/completions", {"model": "sea", "prompt": "x", "max_tokens": 4})
    assert status == 502 and "cannot reach vLLM" in body["error"]["message"]
    status, body = client.call("POST", "/api/v1/generate", {"prompt": "x", "max_length": 4})
    assert status == 502
    assert client.call("GET", "/v1/models")[0] == 200  # our server lives on
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(60) == 0
    assert "Stopping vLLM" in served.log.read_text()
