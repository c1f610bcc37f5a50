"""The embedded demo model and the example soft prompts: the app works out of the box."""

import json
import re
from pathlib import Path

import pytest

from kobold_desktop import paths
from kobold_desktop.engine import Engine, SamplingSettings
from kobold_desktop.softprompt.library import SoftPromptLibrary
from kobold_desktop.tuning import held_out_loss, make_blocks

ROOT = Path(__file__).resolve().parent.parent
STYLES = ("Proverbs", "Laws of Leviticus")
STYLE_TEXTS = ROOT / "tests" / "data" / "styles"


@pytest.fixture(scope="module")
def demo():
    engine = Engine()
    engine.load(paths.demo_model_dir())
    return engine


def test_demo_model_is_small_and_meets_its_target():
    folder = paths.demo_model_dir()
    weights = list(folder.glob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) <= 40 * 2**20
    stats = json.loads((folder / "training.json").read_text())
    assert stats["held_out_bits_per_char"] <= 1.6
    assert f"{stats['held_out_bits_per_char']:.3f} bits per character" in (folder / "README.md").read_text()


def test_demo_model_writes_recognisable_english(demo):
    vocabulary = set(re.findall(r"[a-z]+", " ".join(p.read_text() for p in STYLE_TEXTS.glob("*.txt")).lower()))
    text = demo.generate("And it came to pass, when the king", SamplingSettings(
        temperature=0.7, max_new_tokens=80, seed=1), softprompt=None).text
    words = re.findall(r"[a-z]+", text.lower())
    assert len(words) >= 30
    known = sum(w in vocabulary for w in words) / len(words)
    assert known >= 0.8, (known, text)


def test_example_softprompts_are_in_the_library_and_fit(demo):
    library = SoftPromptLibrary(extra_folders=[paths.bundled_softprompt_dir()])
    for name in STYLES:
        entry = library.find(name)
        assert not entry.writable and entry.softprompt.description
        assert entry.compatibility(demo.hidden_size, demo.loaded.info.name) == entry.compatibility(demo.hidden_size)
        assert entry.compatibility(demo.hidden_size).ok and not entry.compatibility(demo.hidden_size).warnings


@pytest.mark.parametrize("name", STYLES)
def test_each_example_lowers_the_loss_on_its_own_style(demo, name):
    """On chapters it never trained on, in 16-token windows (the start of a text, where
    the style can only come from the soft prompt), the loss falls by at least 10%."""
    text = (STYLE_TEXTS / f"{name}.txt").read_text()
    blocks = make_blocks(text, demo.loaded.tokenizer, 16, 0.0, 0).train
    model = demo.loaded.model
    rows = demo.prepare_softprompts([paths.bundled_softprompt_dir() / f"{name}.zip"]).tensor
    import contextlib

    with_sp = held_out_loss(model, rows, blocks, 8, contextlib.nullcontext)
    without = held_out_loss(model, None, blocks, 8, contextlib.nullcontext)
    assert with_sp <= 0.9 * without, (name, with_sp, without)


@pytest.mark.parametrize("name", STYLES)
def test_each_example_changes_what_is_written(demo, name):
    settings = SamplingSettings(temperature=0, repetition_penalty=1.1, max_new_tokens=40)
    plain = demo.generate("And he said,", settings, softprompt=None)
    styled = demo.generate("And he said,", settings,
                           softprompt=demo.prepare_softprompts([paths.bundled_softprompt_dir() / f"{name}.zip"]))
    assert styled.text != plain.text


def test_generate_without_model_uses_the_demo_model(capsys):
    from kobold_desktop.cli import main

    assert main(["generate", "--prompt", "In the beginning", "--max-new-tokens", "5", "--json"]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["generated_tokens"] <= 5
