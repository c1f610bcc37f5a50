"""A mixture file served as a model: listed, generated with, batched beside soft prompts."""

import concurrent.futures

import pytest

from kobold_desktop.engine import SamplingSettings
from kobold_desktop.server.config import ServeConfig
from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture

from .conftest import Client, start_server

GREEDY = {"temperature": 0, "max_tokens": 8, "repetition_penalty": 1.0}


@pytest.fixture
def mixture_file(adapter_files):
    folder = adapter_files["sea"].parent
    path = folder / "blend-of-two.json"
    if not path.exists():
        write_mixture(path, Mixture("Sea and forest", "bayes",
                                    (MixtureMember("sea.zip", 0.6), MixtureMember("forest.zip", 0.4))))
    return path


@pytest.fixture
def mix_server(server_engine, adapter_files, mixture_file):
    config = ServeConfig(prompt_adapters={"sea": str(adapter_files["sea"]), "mix": str(mixture_file)},
                         max_prompt_adapter_token=32)
    srv = start_server(server_engine, config)
    yield srv
    srv.stop()


def test_a_mixture_is_a_model_and_generates_what_the_engine_does(mix_server, server_engine, mixture_file):
    client = Client(mix_server)
    status, models = client.call("GET", "/v1/models")
    entry = next(m for m in models["data"] if m["id"] == "mix")
    assert entry["softprompt_tokens"] == 9  # the longest member
    assert entry["mixture"] == {"mode": "bayes", "members": [{"name": "sea", "weight": pytest.approx(0.6)},
                                                            {"name": "forest", "weight": pytest.approx(0.4)}]}
    status, body = client.call("POST", "/v1/completions", {"model": "mix", "prompt": "The knight", **GREEDY})
    assert status == 200, body
    active = mix_server.service.adapters["mix"].softprompt
    expected = server_engine.generate("The knight", SamplingSettings(temperature=0, max_new_tokens=8,
                                                                     repetition_penalty=1.0), softprompt=active)
    assert body["choices"][0]["text"] == expected.text


def test_mixture_and_softprompt_requests_batch_together(mix_server):
    client = Client(mix_server)
    requests = [{"model": m, "prompt": p, **GREEDY} for m in ("mix", "sea") for p in ("The knight", "Once upon")]
    alone = [client.call("POST", "/v1/completions", r)[1]["choices"][0]["text"] for r in requests]
    sizes: list[int] = []
    mix_server.service.scheduler.on_step = sizes.append
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda r: client.call("POST", "/v1/completions", r)[1]["choices"][0]["text"],
                                 requests))
    assert together == alone
    assert max(sizes) > 2  # a mixture's two rows beside others


def test_a_mixture_streams_on_koboldai_routes(mix_server):
    client = Client(mix_server)
    events = client.stream("/v1/completions", {"model": "mix", "prompt": "The knight", "stream": True, **GREEDY})
    assert events[-1] == "[DONE]" and len(events) > 2
    status, body = client.call("POST", "/api/v1/generate", {"prompt": "The knight", "max_length": 4,
                                                            "temperature": 0.01, "soft_prompt": "mix"})
    assert status == 200 and body["results"][0]["text"], body


def test_a_mixture_with_a_bad_member_is_refused_at_start(server_engine, adapter_files):
    path = adapter_files["sea"].parent / "bad-mix.json"
    write_mixture(path, Mixture("Bad", "fixed", (MixtureMember("sea.zip", 1), MixtureMember("wide.zip", 1))),
                  overwrite=True)
    from kobold_desktop.server.config import ServeConfigError

    with pytest.raises(ServeConfigError, match="member 'wide.zip' cannot be used"):
        start_server(server_engine, ServeConfig(prompt_adapters={"bad": str(path)}))
