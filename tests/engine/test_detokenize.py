"""Tokens to text: multibyte characters, leading spaces, stop sequences held back across chunks."""

from kobold_desktop.engine.detokenize import IncrementalDetokenizer, StopSequences

from ..helpers import tiny_tokenizer

TEXT = "日本語の文章 and café 🐉✨ naïve"


def test_multibyte_characters_split_across_tokens_never_show_as_mojibake():
    tokenizer = tiny_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    singles = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in s for s in singles)  # the test text really splits characters
    detok = IncrementalDetokenizer(tokenizer, tokenizer("Prompt:", add_special_tokens=False)["input_ids"])
    chunks = [detok.add(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == TEXT


def test_leading_space_survives_incremental_decoding():
    tokenizer = tiny_tokenizer()
    prompt = tokenizer("Once upon", add_special_tokens=False)["input_ids"]
    cont = tokenizer(" a time", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.add(i) for i in cont) + detok.flush() == " a time"


def test_stop_sequences_are_held_back_across_chunks():
    stops = StopSequences(["\nYou:", "THE END"])
    shown = [stops.feed(t) for t in ["Hello", " there\n", "Yo", "u: what"]]
    assert shown == ["Hello", " there", "", ""]
    assert stops.stopped
    partial = StopSequences(["THE END"])
    assert partial.feed("and THE EN") == "and "
    assert partial.feed("chanted") == "THE ENchanted" and not partial.stopped
    assert StopSequences([]).feed("x") == "x"
