"""The server on a GGUF model: every route runs on llama.cpp, soft prompts are models,
and concurrent requests under different soft prompts batch as llama.cpp sequences."""

import threading

import pytest
import torch

from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.softprompt import Metadata, kobold_zip

from .conftest import Client, start_server

GREEDY = SamplingSettings(temperature=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=12)
BODY = {"prompt": "The knight rode", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def gguf_server(gguf_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-adapters")
    torch.manual_seed(3)
    paths = {}
    for name, n in (("sea", 5), ("forest", 8)):
        kobold_zip.write(folder / f"{name}.zip", torch.randn(n, 64) * 0.5, Metadata(name=name))
        paths[name] = folder / f"{name}.zip"
    kobold_zip.write(folder / "wide.zip", torch.randn(3, 32), Metadata(name="wide"))
    paths["wide"] = folder / "wide.zip"
    engine = Engine()
    engine.load(gguf_model["f32"])
    server = start_server(engine, ServeConfig(prompt_adapters={"sea": str(paths["sea"]), "forest": str(paths["forest"])},
                                              max_prompt_adapters=4))
    yield server, engine, paths
    server.stop()
    engine.unload()


def expected(engine, prompt, path=None, settings=GREEDY):
    return engine.generate(prompt, settings, softprompt=engine.prepare_softprompts([path]) if path else None)


def test_openai_koboldai_and_koboldcpp_routes_run_on_llamacpp(gguf_server):
    server, engine, paths = gguf_server
    client = Client(server)
    models = client.call("GET", "/v1/models")[1]
    assert [m["id"] for m in models["data"]] == [server.service.model_id, "sea", "forest"]
    runs_on = models["data"][1]["runs_on"]  # which CPU code and weight type llama.cpp runs
    assert runs_on["backend"] == "llama.cpp" and runs_on["precision"] == engine.loaded.precision
    assert runs_on["why"].startswith("llama.cpp CPU variant ") and "sapphirerapids" not in runs_on["device"]
    status, body = client.call("POST", "/v1/completions", {**BODY, "model": "sea"})
    assert status == 200
    assert body["choices"][0]["text"] == expected(engine, "The knight rode", paths["sea"]).text
    events = client.stream("/v1/completions", {**BODY, "model": "forest", "stream": True})
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert streamed == expected(engine, "The knight rode", paths["forest"]).text
    kobold = {"prompt": "The knight rode", "max_length": 12, "temperature": 0, "rep_pen": 1.0, "top_p": 1.0,
              "soft_prompt": "forest"}
    status, payload = client.call("POST", "/api/v1/generate", kobold)
    assert payload["results"][0]["text"] == expected(engine, "The knight rode", paths["forest"]).text
    response = client.raw("POST", "/api/extra/generate/stream", {**kobold, "genkey": "KCPP42"})
    assert response.status == 200 and b"event: message" in response.read()
    tokens = client.call("POST", "/v1/tokenize", {"prompt": "The knight rode"})[1]
    assert tokens["tokens"] == engine.encode("The knight rode")
    assert tokens["max_model_len"] == 256
    assert client.call("POST", "/v1/detokenize", {"tokens": tokens["tokens"][1:]})[1]["prompt"] == "The knight rode"


def test_a_soft_prompt_of_the_wrong_width_is_refused_and_the_server_serves_on(gguf_server):
    server, engine, paths = gguf_server
    import shutil

    from kobold_desktop import paths as app_paths

    client = Client(server)
    wide = shutil.copy(paths["wide"], app_paths.user_softprompt_dir() / "wide.zip")
    status, body = client.call("POST", "/v1/soft_prompt/load", {"name": "wide", "path": str(wide)})
    assert status == 400 and "hidden size 32" in body["error"]["message"]
    assert client.call("POST", "/v1/completions", {**BODY, "model": "sea"})[0] == 200


def test_concurrent_requests_under_different_soft_prompts_equal_each_alone(gguf_server):
    server, engine, paths = gguf_server
    names = [None, "sea", "forest", "sea", None, "forest"]
    prompts = ["The knight", "Once upon a time", "In", "She opened the door", "The dragon slept", "A"]
    want = [expected(engine, p, paths[n] if n else None).text for p, n in zip(prompts, names)]
    results = [None] * len(names)
    barrier = threading.Barrier(len(names))

    def ask(i):
        barrier.wait()
        body = {**BODY, "prompt": prompts[i]}
        if names[i]:
            body["model"] = names[i]
        results[i] = Client(server).call("POST", "/v1/completions", body)[1]["choices"][0]["text"]

    sizes: list[int] = []
    server.service.scheduler.on_step = sizes.append
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == want
    assert max(sizes) > 1  # they ran side by side
