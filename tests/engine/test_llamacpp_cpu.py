"""llama.cpp on any x86-64 CPU: the CPU variant is chosen at start (never the AMX one, whose
matrix product crashes), each x86-64 level runs, and every weight type we test loads and
decodes on the variant chosen here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kobold_desktop.engine import Engine, ModelError, SamplingSettings
from kobold_desktop.engine.llamacpp import cpu

GREEDY = SamplingSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
PROMPTS = ["Once upon a time", "The knight rode", "In the beginning", "She opened the door", 'He said: "We']
TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m")
# x86-64 levels v1 (x64), v2 (sse42), v3 (haswell) and v4 (skylakex): the floor of every CPU.
LABELS = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k_m": "Q4_K_M"}
LEVELS = ("x64", "sse42", "haswell", "skylakex")


def test_the_weight_type_is_named_as_gguf_files_name_it():
    from kobold_desktop.engine.llamacpp.model import weight_type

    assert weight_type("llama 135M Q4_K - Medium") == "Q4_K_M"
    assert weight_type("llama ?B Q8_0") == "Q8_0"
    assert weight_type("llama ?B all F32") == "F32"
    assert weight_type("qwen2 7B IQ2_XS - 2.3125 bpw") == "IQ2_XS - 2.3125 bpw"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((l for l in text.splitlines() if l.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def test_the_amx_variant_is_passed_over_when_it_scores_best():
    scores = {"sapphirerapids": 120, "zen4": 100, "icelake": 90, "haswell": 40, "x64": 1, "armv9": 0}
    assert cpu.choose(scores) == ("zen4", ("sapphirerapids", "zen4", "icelake", "haswell", "x64"), ("sapphirerapids",))
    assert cpu.choose({"haswell": 40, "x64": 1}) == ("haswell", ("haswell", "x64"), ())


def test_a_forced_variant_is_taken_or_refused_with_what_there_is():
    scores = {"sapphirerapids": 120, "haswell": 40, "skylakex": 0}
    assert cpu.choose(scores, forced="sapphirerapids")[0] == "sapphirerapids"  # asked for by name
    with pytest.raises(ModelError, match="cannot run that variant.*sapphirerapids, haswell"):
        cpu.choose(scores, forced="skylakex")
    with pytest.raises(ModelError, match="no such CPU variant"):
        cpu.choose(scores, forced="zen9")
    with pytest.raises(ModelError, match="none of llama.cpp's CPU variants"):
        cpu.choose({"sapphirerapids": 120, "x64": 0})


@pytest.fixture(scope="module")
def backend(gguf_model):
    from kobold_desktop.engine.llamacpp.model import cpu_backend

    return cpu_backend()


def test_the_variant_chosen_here_is_the_best_safe_one_and_has_no_amx_buffers(backend):
    assert "AMX" not in backend.extra_buffer_types or backend.extra_buffers_off
    if backend.variant == cpu.BUILT_IN:
        pytest.skip("this llama.cpp has its CPU code linked in (not built by make)")
    assert backend.variant not in cpu.AMX_VARIANTS
    safe = [v for v in backend.supported if v not in cpu.AMX_VARIANTS]
    assert backend.variant == safe[0]
    if {"amx_int8", "amx_tile"} <= cpu_flags():  # the CPUs that crashed: the AMX variant was there to take
        assert backend.passed_over == ("sapphirerapids",)
        assert "llama.cpp CPU variant" in backend.describe() and "AMX" in backend.describe()
    assert "x64" in backend.supported  # the baseline runs everywhere


@pytest.fixture(scope="module")
def typed(gguf_model, tmp_path_factory):
    """The tiny Llama as every weight type we test: f32 and q8_0 from the converter, the
    rest through llama.cpp's quantizer (q4_K_M falls back to q5_0/q8_0 for the tensors
    whose width is not a multiple of 256, as llama.cpp does)."""
    from kobold_desktop.engine.llamacpp.convert import convert, quantize

    root = tmp_path_factory.mktemp("types")
    files = {"f32": gguf_model["f32"], "q8_0": gguf_model["q8_0"],
             "f16": convert(gguf_model["dir"], root / "f16.gguf", "f16")}
    for kind in ("q4_0", "q4_1", "q4_k_m"):
        quantize(gguf_model["f32"], root / f"{kind}.gguf", kind)
        files[kind] = root / f"{kind}.gguf"
    return files


def _first_tokens(engine) -> list[list[int]]:
    return [list(engine.generate(p, GREEDY).token_ids) for p in PROMPTS]


@pytest.fixture(scope="module")
def f32_tokens(typed):
    engine = Engine()
    engine.load(typed["f32"])
    yield _first_tokens(engine)
    engine.unload()


@pytest.mark.parametrize("kind", TYPES)
def test_every_weight_type_loads_and_decodes_here(typed, f32_tokens, kind):
    engine = Engine()
    engine.load(typed[kind])
    try:
        precision = engine.loaded.precision
        tokens = _first_tokens(engine)
    finally:
        engine.unload()
    assert precision == LABELS[kind]  # llama.cpp's own description of the file it runs
    assert all(len(t) == GREEDY.max_new_tokens for t in tokens)  # nothing stopped early on garbage
    first = sum(a[0] == b[0] for a, b in zip(tokens, f32_tokens))
    print(f"{kind}: first greedy token agrees with f32 on {first}/{len(PROMPTS)} prompts")
    if kind in ("f32", "f16", "q8_0"):
        assert first >= len(PROMPTS) - 1


# A process loads one CPU variant: each run is a child that decodes 8 greedy tokens.
CHILD = ("import json, sys\n"
         "from kobold_desktop.engine import Engine, SamplingSettings\n"
         "from kobold_desktop.engine.llamacpp.model import cpu_backend\n"
         "e = Engine(); e.load(sys.argv[1])\n"
         "r = e.generate('Once upon a time', SamplingSettings(max_new_tokens=8, temperature=0, repetition_penalty=1.0))\n"
         "print(json.dumps({'variant': cpu_backend().variant, 'tokens': list(r.token_ids)}))\n")


def _run_forced(variant: str, model: Path) -> dict:
    env = dict(os.environ, **{cpu.ENV: variant})
    done = subprocess.run([sys.executable, "-c", CHILD, str(model)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{variant}: exit {done.returncode}\n{done.stderr[-2000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("level", LEVELS)
def test_each_x86_64_level_runs_quantized_weights(backend, typed, level):
    """Each level in its own process (a process loads one CPU variant): what a CPU of that
    level would run, here. A level above this CPU's is refused by name instead."""
    if backend.variant == cpu.BUILT_IN:
        pytest.skip("this llama.cpp has its CPU code linked in (not built by make)")
    if level not in backend.supported:
        with pytest.raises(AssertionError, match="cannot run that variant"):
            _run_forced(level, typed["q4_0"])
        return
    for kind in ("q4_0", "q8_0"):
        out = _run_forced(level, typed[kind])
        assert out["variant"] == level and len(out["tokens"]) == 8


EMULATED = {"Nehalem": "sse42", "Haswell-v4": "haswell"}  # x86-64-v2 (no AVX) and v3 (no AVX-512)


@pytest.mark.parametrize("model", sorted(EMULATED))
def test_an_older_cpu_under_emulation_picks_its_level_and_decodes_the_same(backend, typed, model):
    """What a user with an older CPU gets, checked here with qemu-user emulating that CPU
    (`apt-get install qemu-user`): an illegal instruction anywhere in the path (our choice,
    the variant's code, numpy, torch's sampling) would kill the process."""
    import shutil

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-user is not installed (apt-get install qemu-user) to emulate an older CPU")
    if backend.variant == cpu.BUILT_IN:
        pytest.skip("this llama.cpp has its CPU code linked in (not built by make)")
    env = {k: v for k, v in os.environ.items() if k != cpu.ENV}
    done = subprocess.run([qemu, "-cpu", model, sys.executable, "-c", CHILD, str(typed["q8_0"])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["variant"] == EMULATED[model]
    assert out["tokens"] == _run_forced(backend.variant, typed["q8_0"])["tokens"]  # as natively here
