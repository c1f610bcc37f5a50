"""`koboldapi` from PyPI, a third-party KoboldCpp client, against our server: every call it
makes (generate, stream, check, abort, tokenize, detokenize, token count, perf, logprobs,
version, model, context length) answers in the shape it reads."""

import asyncio
import importlib.util
from pathlib import Path

import pytest

from .test_server import GREEDY, expected


def koboldapi_client():
    """koboldapi's API client module. Its package also imports image and document libraries
    (rawpy, pillow-heif, extractous) that we do not install: load the client module alone."""
    found = importlib.util.find_spec("koboldapi")
    if found is None:
        pytest.skip("koboldapi is installed by `make` (requirements/clients.in)")
    path = Path(found.submodule_search_locations[0]) / "core" / "api.py"
    spec = importlib.util.spec_from_file_location("koboldapi_core_api", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_koboldapi_drives_the_server(server, server_engine):
    api_module = koboldapi_client()
    api = api_module.KoboldAPI(server.url, temperature=0, rep_pen=1.0, min_p=0.0)
    assert api.get_version()["result"] == "KoboldCpp"
    assert api.get_model() == server.service.model_id
    assert api.get_max_context_length() == server_engine.context_length
    text = api.generate("The knight rode", max_length=12)
    assert text == expected(server_engine, "The knight rode").text
    ids = api.tokenize("The knight rode")
    assert ids == server_engine.encode("The knight rode", add_special_tokens=False)
    assert api.detokenize(ids) == "The knight rode"
    assert api.count_tokens("The knight rode") == {"count": len(ids), "tokens": ids}
    assert api.get_performance_stats()["total_gens"] >= 1
    assert isinstance(api.get_last_logprobs(), dict)
    assert api.check_generation() in ("", None)

    async def stream():
        return "".join([piece async for piece in api.stream_generate("The knight rode", max_length=12)])

    assert asyncio.run(stream()) == expected(server_engine, "The knight rode").text
    assert api.abort_generation() in ("false", False, "true", True)  # nothing runs now: answered, not an error
