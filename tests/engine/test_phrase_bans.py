"""Phrase bans that rewind: a phrase the model is made to want (a logit bias) never reaches
the text; the result equals the rewind algorithm run from first principles (a full forward
pass per step, no cache), on transformers and on llama.cpp; streams never show it."""

import pytest
import torch

from kobold_desktop.engine import Engine, SamplingSettings, TextChunk
from kobold_desktop.engine.detokenize import PhraseBans

from ..helpers import FLOAT32

PROMPT = "Once upon a time"


@pytest.fixture(scope="module", params=["transformers", "llama.cpp"])
def engines(request, gguf_model):
    """(engine under test, a transformers model for the reference) on the same weights."""
    from transformers import AutoModelForCausalLM

    engine = Engine()
    engine.load(gguf_model["dir"] if request.param == "transformers" else gguf_model["f32"], FLOAT32)
    reference = AutoModelForCausalLM.from_pretrained(gguf_model["dir"], dtype=torch.float32).eval()
    yield engine, reference
    engine.unload()


def rewind_reference(model, tokenizer, prompt_ids, settings, phrase):
    """The published algorithm with no cache: greedy steps; when the text holds the phrase,
    drop the tokens from the one where it began and ban that token at that position."""
    generated, bans = [], {}
    while len(generated) < settings.max_new_tokens:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + generated]), use_cache=False).logits[0, -1].float()
        for token, bias in settings.logit_bias:
            logits[token] += bias
        for token in bans.get(len(generated), ()):
            logits[token] = float("-inf")
        generated.append(int(logits.argmax()))
        text = tokenizer.decode(generated, skip_special_tokens=True)
        start = text.lower().find(phrase.lower())
        if start >= 0:
            k = next(i for i in range(len(generated))
                     if len(tokenizer.decode(generated[: i + 1], skip_special_tokens=True)) > start)
            bans.setdefault(k, set()).add(generated[k])
            generated = generated[:k]
    return generated


def forced_phrase(engine):
    """A token the bias makes the model repeat, and the phrase of it twice."""
    tokenizer = engine.loaded.tokenizer
    token = next(t for t in range(200, len(tokenizer)) if (text := tokenizer.decode([t])).strip().isalpha()
                 and len(text.strip()) >= 3 and text.startswith(" "))
    return token, tokenizer.decode([token, token])


def test_a_phrase_the_model_is_made_to_write_is_rewound_exactly(engines):
    engine, reference = engines
    token, phrase = forced_phrase(engine)
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=14, logit_bias=((token, 8.0),))
    unbanned = engine.generate(PROMPT, settings)
    assert phrase.lower() in unbanned.text.lower()  # the bias makes the model write it
    banned = engine.generate(PROMPT, settings.with_changes(banned_phrases=(phrase.upper(),)))
    assert phrase.lower() not in banned.text.lower()
    ids = engine.encode(PROMPT)
    want = rewind_reference(reference, engine.loaded.tokenizer, ids, settings, phrase)
    assert list(banned.token_ids) == want


def test_a_stream_never_shows_a_banned_phrase_and_a_regex_works(engines):
    engine, _ = engines
    token, phrase = forced_phrase(engine)
    word = phrase.split()[0]
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=12, logit_bias=((token, 8.0),),
                                banned_phrases=(f"/{word}\\s+{word}/",))
    chunks = [e.text for e in engine.stream(PROMPT, settings) if isinstance(e, TextChunk)]
    shown = "".join(chunks)
    assert word.lower() in shown.lower() and f"{word} {word}".lower() not in shown.lower()


def test_the_bans_hold_back_only_what_a_phrase_can_span():
    bans = PhraseBans(["the end", "/f[aeiou]{1,2}d/"])
    assert bans.longest == 7 and bans.search("In THE END") == 3 and bans.search("a feed") == 2
    assert bans.search("the en") is None and not PhraseBans([])
    assert PhraseBans(["/x.*y/"]).longest == 256  # unbounded: looked for within 256 characters


def test_a_bad_regular_expression_is_refused_with_a_message():
    from kobold_desktop.engine.sampling import SettingsError

    with pytest.raises(SettingsError, match="regular expression"):
        SamplingSettings(banned_phrases=("/([a-z/",))


def test_a_mixture_with_dry_xtc_and_a_phrase_ban(engines, tmp_path):
    """The chain runs on the mixed distribution; the rewind restarts every member row."""
    from kobold_desktop.softprompt import Metadata, kobold_zip
    from kobold_desktop.softprompt.mixture import Mixture, MixtureMember

    engine, _ = engines
    torch.manual_seed(4)
    files = []
    for name in ("a", "b"):
        kobold_zip.write(tmp_path / f"{name}.zip", torch.randn(3, engine.hidden_size) * 0.5, Metadata(name=name))
        files.append(tmp_path / f"{name}.zip")
    mixture = engine.prepare_mixture(Mixture("m", "bayes", (MixtureMember("a.zip", 1.0), MixtureMember("b.zip", 1.0))),
                                     files)
    token, phrase = forced_phrase(engine)
    settings = SamplingSettings(temperature=0.8, seed=3, max_new_tokens=12, logit_bias=((token, 8.0),),
                                dry_multiplier=0.5, xtc_probability=0.5, banned_phrases=(phrase,))
    first = engine.generate(PROMPT, settings, softprompt=mixture)
    again = engine.generate(PROMPT, settings, softprompt=mixture)
    assert phrase.lower() not in first.text.lower() and first.token_ids == again.token_ids  # seeded
    assert first.generated_tokens == 12 and first.mixture_weights is not None
