"""The engine's declared shapes: every backend implements `Backend`, one batching behaviour on
each, one way to prepare a soft prompt (`active.prepare`), one context-fit rule, one finish
reason, and the window's Qt-free state."""

import json

import pytest
import torch

from kobold_desktop.engine import ContextOverflow, Engine, FinishReason, SamplingSettings
from kobold_desktop.engine.active import ActiveMixture, ActiveSoftPrompt, RemoteModel, SoftPromptStatus, prepare
from kobold_desktop.engine.backend import Backend
from kobold_desktop.engine.loader import BACKENDS
from kobold_desktop.softprompt import Metadata, kobold_zip
from kobold_desktop.softprompt.errors import SoftPromptError
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.softprompt.mixture import MixtureError

from ..helpers import FLOAT32

GREEDY = SamplingSettings(max_new_tokens=8, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def backend_engine(request, gguf_model):
    engine = Engine()
    engine.load(gguf_model["dir"] if request.param == "transformers" else gguf_model["f32"], FLOAT32)
    yield request.param, engine
    engine.unload()


def test_every_backend_implements_the_declared_interface(backend_engine, gguf_model):
    from kobold_desktop.engine.remote.embeddings import load_embeddings_only

    name, engine = backend_engine
    assert isinstance(engine.loaded.runtime, Backend) and engine.loaded.backend == name
    embeddings = load_embeddings_only(gguf_model["dir"])
    assert isinstance(embeddings.runtime, Backend) and not embeddings.runtime.trainable
    assert [entry[0] for entry in BACKENDS] == ["llama.cpp", "transformers"]  # the loader's table, in order


def test_requests_batched_together_equal_each_alone_on_every_backend(backend_engine, tmp_path):
    _, engine = backend_engine
    torch.manual_seed(3)
    kobold_zip.write(tmp_path / "sp.zip", torch.randn(4, engine.hidden_size) * 0.5, Metadata(name="sp"))
    active = engine.prepare(tmp_path / "sp.zip")
    cases = [("Once upon a time", None), ("The knight rode", active), ("In the beginning", active)]
    alone = [engine.generate(prompt, GREEDY, softprompt=sp).token_ids for prompt, sp in cases]
    loaded = engine.loaded
    results = [[] for _ in cases]
    requests = [loaded.new_request(engine.encode(prompt), sp, GREEDY, results[i].append)
                for i, (prompt, sp) in enumerate(cases)]
    engine.run(requests, max_batch=8)
    assert [r[-1].token_ids for r in results] == alone


def write_mixture(folder, members, **extra):
    (folder / "mix.json").write_text(json.dumps({"name": "Mix", "members": [
        {"softprompt": name, "weight": 1.0} for name in members], **extra}))
    return folder / "mix.json"


def test_prepare_takes_a_file_a_name_a_list_or_a_mixture(engine, tmp_path):
    library = SoftPromptLibrary(tmp_path / "lib", extra_folders=[])
    for name in ("a", "b"):
        kobold_zip.write(library.user_folder / f"{name}.zip", torch.randn(3, engine.hidden_size) * 0.1,
                         Metadata(name=f"Story {name}"))
    loaded = engine.loaded
    one = prepare(loaded, library.user_folder / "a.zip", library)
    by_name = prepare(loaded, "Story b", library)
    both = prepare(loaded, ["a.zip", library.user_folder / "b.zip"], library)
    assert isinstance(one, ActiveSoftPrompt) and one.name == "Story a"
    assert by_name.files == (library.user_folder / "b.zip",)
    assert both.n_tokens == 6 and both.name == "Story a + Story b"
    mixture = prepare(loaded, write_mixture(library.user_folder, ["a.zip", "b.zip"]), library)
    assert isinstance(mixture, ActiveMixture) and mixture.paths == (library.user_folder / "a.zip",
                                                                    library.user_folder / "b.zip")
    assert prepare(loaded, None, library) is None and prepare(loaded, [], library) is None
    with pytest.raises(MixtureError, match="cannot be concatenated"):
        prepare(loaded, ["a.zip", library.user_folder / "mix.json"], library)
    with pytest.raises(SoftPromptError, match="no soft prompt named"):
        prepare(loaded, "Nothing", library)


def test_prepare_asks_allow_about_every_file_a_mixtures_members_too(engine, tmp_path):
    library = SoftPromptLibrary(tmp_path / "lib", extra_folders=[])
    kobold_zip.write(library.user_folder / "a.zip", torch.randn(3, engine.hidden_size), Metadata(name="a"))
    asked = []
    prepare(engine.loaded, write_mixture(library.user_folder, ["a.zip"]), library, allow=asked.append)
    assert [p.name for p in asked] == ["mix.json", "a.zip"]

    def refuse(path):
        raise PermissionError(path.name)

    with pytest.raises(PermissionError, match="mix.json"):
        prepare(engine.loaded, library.user_folder / "mix.json", library, allow=refuse)


def test_the_status_says_what_the_list_marks(engine, tmp_path):
    library = SoftPromptLibrary(tmp_path / "lib", extra_folders=[])
    for name in ("a", "b"):
        kobold_zip.write(library.user_folder / f"{name}.zip", torch.randn(3, engine.hidden_size), Metadata(name=name))
    mix = write_mixture(library.user_folder, ["a.zip", "b.zip"], mode="fixed")
    status = SoftPromptStatus.of(prepare(engine.loaded, mix, library))
    assert status.is_mixture and status.mode == "fixed" and status.members == ("a", "b")
    assert status.shows(library.user_folder / ".." / "lib" / "mix.json")  # however the path is written
    assert not status.shows(library.user_folder / "a.zip")  # a mixture marks its own file
    remote = SoftPromptStatus.of(RemoteModel("sea", 8))
    assert remote.shows(RemoteModel("sea")) and not remote.shows(RemoteModel("forest"))
    assert not remote.shows(library.user_folder / "sea") and SoftPromptStatus.of(None) is None


def test_one_context_fit_rule_for_every_request(engine):
    loaded = engine.loaded
    context = loaded.context_length
    assert loaded.room(None, 10) == context - 10 and loaded.room(None, 10, context_limit=64) == 54
    ids = [1] * (context - 9)
    with pytest.raises(ContextOverflow) as caught:
        loaded.new_request(ids, None, GREEDY.with_changes(max_new_tokens=10))
    assert (caught.value.prompt, caught.value.new_tokens, caught.value.total) == (context - 9, 10, context + 1)
    with pytest.raises(ContextOverflow):
        engine.generate(ids, GREEDY.with_changes(max_new_tokens=10))


def test_finish_reasons_in_each_front_ends_words():
    assert [r.openai for r in FinishReason] == ["length", "stop", "stop"]
    assert [r.vllm for r in FinishReason] == ["length", "stop", "abort"]
    assert FinishReason.from_server("length") is FinishReason.LENGTH
    assert FinishReason.from_server("eos_token") is FinishReason.STOP
    assert FinishReason.CANCELLED == "cancelled" and json.dumps(FinishReason.STOP) == '"stop"'


def test_the_window_state_derives_busy_and_generating():
    from kobold_desktop.qt.window_state import Job, WindowState

    state = WindowState()
    assert not state.busy and not state.can_generate
    assert state.begin("generate") is Job.GENERATE and state.generating and state.busy
    assert Job.GENERATE.cancellable and not Job.LOAD.cancellable and Job.LOAD.shows_progress
    state.finished()
    assert state.job is None and not state.generating
