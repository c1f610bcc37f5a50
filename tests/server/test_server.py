"""The server over real HTTP: OpenAI and KoboldAI routes, errors, auth, batching."""

import threading

import pytest

from kobold_desktop.engine import SamplingSettings
from kobold_desktop.server.config import ServeConfig, ServeConfigError
from kobold_desktop.server.service import Service

from .conftest import Client, start_server

GREEDY = SamplingSettings(temperature=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=12)
BODY = {"prompt": "The knight rode", "max_tokens": 12, "temperature": 0}


def expected(engine, prompt, adapter_path=None, settings=GREEDY):
    softprompt = engine.prepare_softprompts([adapter_path]) if adapter_path else None
    return engine.generate(prompt, settings, softprompt=softprompt)


def test_models_lists_the_base_model_and_every_softprompt(client, server):
    status, body = client.call("GET", "/v1/models")
    assert status == 200
    ids = [m["id"] for m in body["data"]]
    base = server.service.model_id
    assert ids == [base, "sea", "forest"]
    assert all(m["root"] == base for m in body["data"])


def test_completion_with_base_model_and_with_a_softprompt(client, server_engine, adapter_files):
    status, body = client.call("POST", "/v1/completions", {**BODY, "model": "gpt2"})
    assert status == 200
    want = expected(server_engine, "The knight rode")
    assert body["choices"][0]["text"] == want.text and body["object"] == "text_completion"
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert body["usage"] == {"prompt_tokens": want.prompt_tokens, "completion_tokens": want.generated_tokens,
                             "total_tokens": want.prompt_tokens + want.generated_tokens}
    assert 0 <= cached < want.prompt_tokens  # OpenAI's field: prompt tokens taken from the cache
    again = client.call("POST", "/v1/completions", {**BODY, "model": "gpt2"})[1]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == want.prompt_tokens - 1  # all but the last
    status, body = client.call("POST", "/v1/completions", {**BODY, "model": "sea"})
    sea = expected(server_engine, "The knight rode", adapter_files["sea"])
    assert status == 200 and body["choices"][0]["text"] == sea.text != want.text
    assert body["usage"]["prompt_tokens"] == sea.prompt_tokens + 4


def test_prompt_list_n_stop_and_seed(client, server_engine):
    status, body = client.call("POST", "/v1/completions",
                               {"prompt": ["Once", "In the"], "max_tokens": 8, "n": 2, "temperature": 1.0,
                                "seed": 5, "top_k": 40, "min_p": 0.01})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    again = client.call("POST", "/v1/completions", {"prompt": ["Once", "In the"], "max_tokens": 8, "n": 2,
                                                     "temperature": 1.0, "seed": 5, "top_k": 40, "min_p": 0.01})[1]
    assert [c["text"] for c in body["choices"]] == [c["text"] for c in again["choices"]]
    full = expected(server_engine, "The knight rode").text
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2])
    status, body = client.call("POST", "/v1/completions", {**BODY, "stop": [stop]})
    assert body["choices"][0]["text"] == full[: full.index(stop)] and body["choices"][0]["finish_reason"] == "stop"


def test_streaming_completion(client, server_engine, adapter_files):
    events = client.stream("/v1/completions", {**BODY, "model": "forest", "stream": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == expected(server_engine, "The knight rode", adapter_files["forest"]).text


def test_chat_completions_need_a_template(client, server_engine):
    status, body = client.call("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400 and "no chat template" in body["error"]["message"]
    tokenizer = server_engine.loaded.tokenizer
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    try:
        status, body = client.call("POST", "/v1/chat/completions",
                                   {"model": "sea", "messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 6, "temperature": 0})
        assert status == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        events = Client.stream(client, "/v1/chat/completions",
                               {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True})
        assert events[-1] == "[DONE]" and events[0]["object"] == "chat.completion.chunk"
    finally:
        tokenizer.chat_template = None


@pytest.mark.parametrize("method,path,body,status,text", [
    ("POST", "/v1/completions", {**BODY, "model": "nope"}, 404, "does not exist"),
    ("POST", "/v1/completions", "{not json", 400, "not valid JSON"),
    ("POST", "/v1/completions", {**BODY, "max_tokens": "ten"}, 422, "'max_tokens' must be int"),
    ("POST", "/v1/completions", {**BODY, "temperature": -1}, 422, "'temperature' must be between"),
    ("POST", "/v1/completions", {**BODY, "prompt": "word " * 5000}, 400, "holds far less"),
    ("POST", "/v1/completions", {**BODY, "stop": 5}, 422, "'stop' must be"),
    ("GET", "/v1/nothing", None, 404, "not a route"),
    ("GET", "/v1/completions", None, 405, "not a route"),
])
def test_errors_have_openai_shape_and_the_server_keeps_serving(client, method, path, body, status, text):
    got, payload = client.call(method, path, body)
    assert got == status and text in payload["error"]["message"]
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert client.call("POST", "/v1/completions", BODY)[0] == 200


def test_api_key_protects_every_route(server_engine, adapter_files):
    srv = start_server(server_engine, ServeConfig(api_key="s3cret", admin_key="adm1n"))
    try:
        anonymous, user, admin = Client(srv), Client(srv, "s3cret"), Client(srv, "adm1n")
        for path in ("/v1/models", "/api/v1/model", "/api/extra/version"):
            assert anonymous.call("GET", path)[0] == 401
            assert user.call("GET", path)[0] == 200
        assert Client(srv, "wrong").call("POST", "/v1/completions", BODY)[0] == 401
        load = {"name": "sea", "path": str(adapter_files["sea"])}
        assert user.call("POST", "/v1/soft_prompt/load", load)[0] == 401
        # The separate admin key works on its own (it used to need the API key in the same header).
        assert admin.call("POST", "/v1/soft_prompt/load", load)[0] == 200
        assert admin.call("GET", "/v1/models")[0] == 200
    finally:
        srv.stop()
    srv = start_server(server_engine, ServeConfig(api_key="k"))
    try:
        from kobold_desktop.paths import user_softprompt_dir

        inside = user_softprompt_dir() / "sea.zip"
        inside.write_bytes(adapter_files["sea"].read_bytes())
        assert Client(srv, "k").call("POST", "/v1/soft_prompt/load", {"name": "sea", "path": str(inside)})[0] == 200
    finally:
        srv.stop()


def test_load_and_unload_softprompts(client, adapter_files):
    status, body = client.call("POST", "/v1/soft_prompt/load", {"name": "extra", "path": str(adapter_files["sea"])})
    assert status == 200 and body["softprompt_tokens"] == 4
    assert "extra" in [m["id"] for m in client.call("GET", "/v1/models")[1]["data"]]
    status, body = client.call("POST", "/v1/soft_prompt/load", {"name": "x", "path": str(adapter_files["forest"])})
    assert status == 400 and "max_prompt_adapters (3)" in body["error"]["message"]
    from kobold_desktop.paths import user_softprompt_dir

    wide = user_softprompt_dir() / "wide.zip"
    wide.write_bytes(adapter_files["wide"].read_bytes())
    client.call("DELETE", "/v1/soft_prompt/unload", {"name": "extra"})
    assert client.call("POST", "/v1/soft_prompt/load", {"name": "w", "path": str(wide)})[1][
        "error"]["message"].endswith("made for a model with hidden size 64; this model has 32.")
    client.call("POST", "/v1/soft_prompt/load", {"name": "extra", "path": str(adapter_files["sea"])})
    assert client.call("DELETE", "/v1/soft_prompt/unload?name=extra")[0] == 200
    assert client.call("POST", "/v1/completions", {**BODY, "model": "extra"})[0] == 404
    assert client.call("DELETE", "/v1/soft_prompt/unload", {"name": "extra"})[0] == 404


def test_koboldai_routes(client, server_engine, adapter_files):
    assert client.call("GET", "/api/v1/model")[1] == {"result": "gpt2"}
    assert client.call("GET", "/api/v1/info/version")[1]["result"]
    version = client.call("GET", "/api/extra/version")[1]
    assert version["result"] == "KoboldCpp" and version["product"] == "Kobold Desktop"  # clients compare `result`
    assert client.call("GET", "/api/v1/config/soft_prompts_list")[1] == {"values": [{"value": "sea"}, {"value": "forest"}]}
    assert client.call("GET", "/api/v1/config/soft_prompt")[1] == {"value": ""}
    assert client.call("PUT", "/api/v1/config/soft_prompt", {"value": "sea"})[0] == 200
    assert client.call("GET", "/api/v1/config/soft_prompt")[1] == {"value": "sea"}
    assert client.call("PUT", "/api/v1/config/soft_prompt", {"value": "nope"})[0] == 404
    body = {"prompt": "The knight rode", "max_length": 12, "temperature": 0, "rep_pen": 1.0, "top_p": 1.0}
    status, payload = client.call("POST", "/api/v1/generate", body)
    assert status == 200
    assert payload["results"][0]["text"] == expected(server_engine, "The knight rode", adapter_files["sea"]).text
    status, payload = client.call("POST", "/api/v1/generate", {**body, "soft_prompt": "forest"})
    assert payload["results"][0]["text"] == expected(server_engine, "The knight rode", adapter_files["forest"]).text
    long_story = "word " * 400  # longer than the context: the end is kept, as KoboldAI does
    status, payload = client.call("POST", "/api/v1/generate", {**body, "prompt": long_story, "max_context_length": 100})
    assert status == 200


def test_concurrent_requests_are_batched_and_match_running_alone(client, server, server_engine, adapter_files):
    names = [None, "sea", "forest", "sea", None, "forest"]
    prompts = ["The knight", "Once upon a time", "In", "She opened the door", "The dragon slept", "A"]
    results = [None] * len(names)
    barrier = threading.Barrier(len(names))

    def ask(i):
        barrier.wait()
        body = {**BODY, "prompt": prompts[i]}
        if names[i]:
            body["model"] = names[i]
        results[i] = client.call("POST", "/v1/completions", body)[1]["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    sizes: list[int] = []
    server.service.scheduler.on_step = sizes.append
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, name in enumerate(names):
        assert results[i] == expected(server_engine, prompts[i], adapter_files[name] if name else None).text
    assert max(sizes) > 1


def test_refused_at_start(server_engine, adapter_files):
    with pytest.raises(ServeConfigError, match="wide.*made for a model with hidden size 64; this model has 32"):
        Service(server_engine, ServeConfig(prompt_adapters={"wide": str(adapter_files["wide"])}))
    with pytest.raises(ServeConfigError, match="40 tokens is more than max_prompt_adapter_token \\(32\\)"):
        Service(server_engine, ServeConfig(prompt_adapters={"long": str(adapter_files["long"])},
                                           max_prompt_adapter_token=32))


def test_one_bad_request_among_three_concurrent_fails_alone(client, server_engine):
    bodies = [{**BODY, "prompt": "The knight"}, {**BODY, "prompt": "Once", "seed": 2**64, "temperature": 1.0},
              {**BODY, "prompt": "In the"}]
    answers = [None] * 3
    barrier = threading.Barrier(3)

    def ask(i):
        barrier.wait()
        answers[i] = client.call("POST", "/v1/completions", bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers[1][0] == 422 and "seed" in answers[1][1]["error"]["message"]
    for i in (0, 2):
        assert answers[i][0] == 200
        assert answers[i][1]["choices"][0]["text"] == expected(server_engine, bodies[i]["prompt"]).text
    assert client.call("POST", "/v1/completions", BODY)[0] == 200  # and it keeps serving


def test_a_short_request_joins_a_running_batch_and_is_answered_first(client, server, server_engine):
    """The long request streams; the short one is sent once the long one has begun, joins
    its batch, and its answer arrives while the long one still runs."""
    order, first_chunk = [], threading.Event()
    long_body = {**BODY, "prompt": "The dragon", "max_tokens": 200, "stream": True}
    long_settings = GREEDY.with_changes(max_new_tokens=200)
    server_engine.loaded.model.generation_config.eos_token_id = None  # run all 200 tokens
    eos = server_engine.loaded.tokenizer.eos_token
    server_engine.loaded.tokenizer.eos_token = None
    try:
        def long():
            response = client.raw("POST", "/v1/completions", long_body)
            text = []
            for line in response:
                if line.startswith(b"data: {"):
                    first_chunk.set()
                    text.append(__import__("json").loads(line[6:])["choices"][0]["text"])
            order.append(("long", "".join(text)))

        thread = threading.Thread(target=long)
        thread.start()
        assert first_chunk.wait(60)
        status, body = client.call("POST", "/v1/completions", {**BODY, "prompt": "In the", "max_tokens": 4})
        order.append(("short", body["choices"][0]["text"]))
        thread.join()
        assert [name for name, _ in order] == ["short", "long"]
        assert order[0][1] == expected(server_engine, "In the", settings=GREEDY.with_changes(max_new_tokens=4)).text
        assert order[1][1] == expected(server_engine, "The dragon", settings=long_settings).text
    finally:
        server_engine.loaded.tokenizer.eos_token = eos
        server_engine.loaded.model.generation_config.eos_token_id = 0


def test_an_empty_prompt_with_nothing_to_start_from_is_refused(client):
    status, body = client.call("POST", "/v1/completions", {**BODY, "prompt": ""})
    assert status == 400 and "prompt is empty" in body["error"]["message"]
