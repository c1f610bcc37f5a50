"""Front ends with their own defaults, on a model with a small context (256 tokens): what
KoboldAI Lite and SillyTavern send as they are, fitted instead of refused, and the rest of
what KoboldCpp's clients expect."""

import json
import threading

from .conftest import Client
from .test_front_ends import SILLYTAVERN, sse
from .test_server import BODY, GREEDY, expected

# KoboldAI Lite's first Submit with its default settings (index.html: max_context_length
# 6144, max_length 768, its default sampler set and order).
LITE = {"n": 1, "max_context_length": 6144, "max_length": 768, "rep_pen": 1.07, "temperature": 0.75, "top_p": 0.92,
        "top_k": 100, "top_a": 0, "typical": 1, "tfs": 1, "rep_pen_range": 360, "rep_pen_slope": 0.7,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5], "memory": "", "trim_stop": True, "genkey": "KCPP4242",
        "min_p": 0, "dynatemp_range": 0, "dynatemp_exponent": 1, "smoothing_factor": 0, "nsigma": 0,
        "banned_tokens": [], "render_special": False, "logprobs": False, "presence_penalty": 0,
        "logit_bias": {}, "prompt": "The knight rode into the valley.", "quiet": True,
        "stop_sequence": ["You:", "\nYou "], "use_default_badwordsids": False, "bypass_eos": False}


def test_lites_first_submit_with_its_defaults_is_fitted_not_refused(client, server_engine):
    status, body = client.call("POST", "/api/v1/generate", LITE)
    assert status == 200 and body["results"][0]["text"] is not None
    fitted = body["fitted"]
    assert "context 256 (asked 6144)" in fitted[0]
    most = 256 - 256 // 5
    assert any(f"max tokens {most} (asked 768)" in f for f in fitted)
    assert body["results"][0]["completion_tokens"] <= most
    response = client.raw("POST", "/api/extra/generate/stream", LITE)
    assert response.status == 200 and "asked 6144" in response.getheader("X-Kobold-Fitted")
    assert sse(response)[-1][1]["finish_reason"] in ("length", "stop")


def test_a_prompt_longer_than_the_context_is_trimmed_at_its_start_on_every_route(client, server_engine):
    long = "The knight rode through the dark valley and the sea. " * 40  # far over 256 tokens
    settings = GREEDY.with_changes(max_new_tokens=8)
    ids = server_engine.encode(long)
    bos = server_engine.loaded.tokenizer.bos_token_id
    lead = [bos] if bos is not None and ids[0] == bos else []
    room = 256 - 8
    from kobold_desktop.story.context import trim_in_blocks

    drop = trim_in_blocks(len(ids) - len(lead), room - len(lead))  # in blocks, as the window trims
    want = expected(server_engine, lead + ids[len(lead) + drop:], settings=settings)
    status, body = client.call("POST", "/v1/completions", {"prompt": long, "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == want.text
    assert any("prompt trimmed by" in f for f in body["fitted"])
    memory = "Memory: the knight is called Ser Aldo.\n"
    status, body = client.call("POST", "/api/v1/generate", {"prompt": long, "memory": memory, "max_length": 8,
                                                            "temperature": 0, "rep_pen": 1.0})
    memory_ids = server_engine.encode(memory)
    tail = server_engine.encode(long, add_special_tokens=False)
    drop = trim_in_blocks(len(tail), room - len(memory_ids))
    want = expected(server_engine, memory_ids + tail[drop:], settings=settings)
    assert status == 200 and body["results"][0]["text"] == want.text  # the memory is kept whole


def test_sillytaverns_defaults_on_the_openai_route(client):
    for extra in ({"seed": -1}, {"min_p": 1}, {"sampler_seed": -1, "seed": -1}):
        status, body = client.call("POST", "/v1/completions", {**BODY, **extra})
        assert status == 200, body


def test_the_current_soft_prompt_is_the_default_on_every_route(client, server_engine, adapter_files):
    assert client.call("PUT", "/api/v1/config/soft_prompt", {"value": "sea"})[0] == 200
    try:
        sea = expected(server_engine, "The knight rode", adapter_files["sea"]).text
        assert client.call("POST", "/v1/completions", BODY)[1]["choices"][0]["text"] == sea  # no model: the current
        plain = expected(server_engine, "The knight rode").text
        named = client.call("POST", "/v1/completions", {**BODY, "model": "gpt2"})[1]["choices"][0]["text"]
        assert named == plain  # a request that names the base model gets it
    finally:
        client.call("PUT", "/api/v1/config/soft_prompt", {"value": ""})


def test_abort_stops_an_openai_stream_too(client, server):
    response = client.raw("POST", "/v1/completions", {"prompt": "The knight", "max_tokens": 200, "stream": True,
                                                      "temperature": 1.0})
    assert response.status == 200
    response.readline()  # it runs
    status, body = client.call("POST", "/api/extra/abort", {})
    assert status == 200 and body["success"] == "true"
    rest = response.read().decode()
    events = [line.strip() for line in rest.split("\n\n") if line.strip().startswith("data: ")]
    finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events if e != "data: [DONE]"]
    assert finish[-1] == "stop" and len(events) < 200


def test_a_chat_stream_names_the_role_in_its_first_chunk(client, server_engine):
    tokenizer = server_engine.loaded.tokenizer
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    try:
        events = client.stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 4, "stream": True})
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all("role" not in e["choices"][0]["delta"] for e in events[1:-1])
    finally:
        tokenizer.chat_template = None


def reference_logprobs(engine, prompt_ids, tokens):
    """log p(token) at each step, from a full forward pass of the model (no cache)."""
    import torch

    model = engine.loaded.model
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for token in tokens:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            out.append((float(logp[token]), int(logp.argmax())))
            ids.append(token)
    return out


def test_logprobs_on_the_openai_and_koboldai_routes(client, server_engine):
    import pytest

    status, body = client.call("POST", "/v1/completions", {**BODY, "max_tokens": 6, "logprobs": 3})
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) >= 1
    ids = server_engine.encode("The knight rode")
    tokens = expected(server_engine, "The knight rode", settings=GREEDY.with_changes(max_new_tokens=6)).token_ids
    assert len(lp["tokens"]) == len(tokens) and lp["text_offset"][0] == 0
    want = reference_logprobs(server_engine, ids, tokens)
    assert lp["token_logprobs"] == pytest.approx([w for w, _ in want], abs=1e-4)
    # greedy: the chosen is the top (OpenAI keys alternatives by text: byte pieces may share one)
    assert all(1 <= len(top) <= 3 and max(top.values()) == pytest.approx(t, abs=1e-4)
               for top, t in zip(lp["top_logprobs"], lp["token_logprobs"]))
    status, body = client.call("POST", "/api/v1/generate", {"prompt": "The knight rode", "max_length": 6,
                                                            "temperature": 0, "rep_pen": 1.0, "logprobs": True,
                                                            "genkey": "KCPP77"})
    content = body["results"][0]["logprobs"]["content"]
    assert status == 200 and [c["logprob"] for c in content] == pytest.approx([w for w, _ in want], abs=1e-4)
    assert len(content[0]["top_logprobs"]) == 5
    last = client.call("POST", "/api/extra/last_logprobs", {"genkey": "KCPP77"})[1]
    assert last["logprobs"]["content"] == content


def test_koboldcpps_tokenize_detokenize_and_perf(client, server_engine):
    status, body = client.call("POST", "/api/extra/tokenize", {"prompt": "The knight rode"})
    ids = server_engine.encode("The knight rode", add_special_tokens=False)
    assert status == 200 and body == {"value": len(ids), "ids": ids}
    status, body = client.call("POST", "/api/extra/detokenize", {"ids": ids})
    assert status == 200 and body["result"] == "The knight rode" and body["success"] is True
    assert client.call("POST", "/api/extra/detokenize", {"ids": [10 ** 9]})[0] in (400, 422)
    client.call("POST", "/api/v1/generate", {"prompt": "Once", "max_length": 4, "temperature": 0})
    status, perf = client.call("GET", "/api/extra/perf")
    assert status == 200 and perf["total_gens"] >= 1 and perf["last_token_count"] >= 1 and perf["idle"] == 1
    assert {"last_process", "last_eval", "stop_reason", "queue", "uptime"} <= set(perf)
