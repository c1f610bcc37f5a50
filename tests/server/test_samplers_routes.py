"""The samplers through the routes, under the names clients send: what each changes in the
text, the names of SillyTavern's Text Completion bodies, and what is not applied said."""

import logging

from .conftest import Client
from .test_server import BODY

KOBOLD = {"prompt": "The knight rode", "max_length": 12, "temperature": 0, "rep_pen": 1.0}


def text(client, path, body):
    status, answer = client.call("POST", path, body)
    assert status == 200, answer
    return answer["choices"][0]["text"] if path.startswith("/v1") else answer["results"][0]["text"]


def first_token(server_engine, text_):
    return server_engine.encode(text_, add_special_tokens=False)[0]


def test_logit_bias_minus_100_bans_the_token_on_every_route(client, server_engine):
    plain = text(client, "/v1/completions", BODY)
    token = first_token(server_engine, plain)
    banned = text(client, "/v1/completions", {**BODY, "logit_bias": {str(token): -100}})
    assert first_token(server_engine, banned) != token
    kobold = text(client, "/api/v1/generate", {**KOBOLD, "logit_bias": {str(token): -100}})
    assert first_token(server_engine, kobold) != token
    bans = text(client, "/api/v1/generate", {**KOBOLD, "custom_token_bans": f"{token}"})  # KoboldCpp's text
    assert first_token(server_engine, bans) != token
    llama_cpp_shape = text(client, "/v1/completions", {**BODY, "logit_bias": [[token, False]]})
    assert first_token(server_engine, llama_cpp_shape) != token


def repeated_4grams(ids):
    grams = [tuple(ids[i:i + 4]) for i in range(len(ids) - 3)]
    return len(grams) - len(set(grams))


def test_dry_cuts_repeated_phrases_on_a_repetitive_prompt(client, server_engine):
    prompt = "the cat sat on the mat. " * 6
    body = {"prompt": prompt, "max_tokens": 60, "temperature": 0}
    plain = server_engine.encode(text(client, "/v1/completions", body), add_special_tokens=False)
    dry = server_engine.encode(text(client, "/v1/completions", {**body, "dry_multiplier": 2.0, "dry_base": 1.75,
                                                                "dry_allowed_length": 2,
                                                                "dry_sequence_breakers": '["\\n"]'}),
                               add_special_tokens=False)
    assert repeated_4grams(dry) < repeated_4grams(plain)


def test_xtc_with_probability_1_changes_the_seeded_text(client):
    body = {**BODY, "temperature": 1.0, "seed": 11, "max_tokens": 16}
    plain = text(client, "/v1/completions", body)
    assert text(client, "/v1/completions", body) == plain  # seeded: the same twice
    assert text(client, "/v1/completions", {**body, "xtc_probability": 1.0, "xtc_threshold": 0.01}) != plain


def test_sillytavern_text_completion_body_with_its_default_values(client):
    """Names and shapes from SillyTavern's getTextGenGenerationData: seed -1, breakers as JSON
    text, custom_token_bans as text, typical and typical_p, rep_pen and repetition_penalty."""
    body = {"prompt": "The knight", "max_tokens": 8, "max_new_tokens": 8, "temperature": 0.7, "top_p": 1,
            "typical_p": 1, "typical": 1, "sampler_seed": -1, "seed": -1, "min_p": 0, "repetition_penalty": 1,
            "rep_pen": 1, "rep_pen_range": 0, "repetition_penalty_range": 0, "frequency_penalty": 0,
            "presence_penalty": 0, "top_k": 0, "min_length": 0, "min_tokens": 0, "add_bos_token": True,
            "smoothing_factor": 0, "smoothing_curve": 1, "dry_allowed_length": 2, "dry_multiplier": 0,
            "dry_base": 1.75, "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "dry_penalty_last_n": 0,
            "max_tokens_second": 0, "stopping_strings": [], "stop": [], "truncation_length": 256,
            "ban_eos_token": False, "skip_special_tokens": True, "top_a": 0, "tfs": 1, "mirostat_mode": 0,
            "mirostat_tau": 5, "mirostat_eta": 0.1, "custom_token_bans": "", "banned_strings": [],
            "xtc_threshold": 0.1, "xtc_probability": 0, "nsigma": 0, "rep_pen_slope": 1, "tfs_z": 1,
            "repeat_penalty": 1, "repeat_last_n": 0, "mirostat": 0, "api_type": "koboldcpp"}
    status, answer = client.call("POST", "/v1/completions", body)
    assert status == 200 and answer["choices"][0]["text"]


def test_what_is_not_applied_is_logged_once_per_client_and_listed(client, server, caplog):
    body = {**BODY, "grammar_string": "root ::= x", "some_new_field": 1}
    with caplog.at_level(logging.WARNING, logger="kobold_desktop.server"):
        client.call("POST", "/v1/completions", body)
        client.call("POST", "/v1/completions", body)
    said = [r.getMessage() for r in caplog.records if "not applied" in r.getMessage()]
    assert len(said) == 1 and "grammar_string: grammars are not offered" in said[0] and "some_new_field" in said[0]
    status, report = client.call("GET", "/api/extra/sampling")
    assert status == 200 and "grammar_string" in report["not_applied"] and "some_new_field" in report["unknown_seen"]
    assert "dry_multiplier" in report["applied"]["/v1/completions"]
    assert "dry_sequence_breakers" in report["applied"]["/api/v1/generate"]
    other = Client(server)
    with caplog.at_level(logging.WARNING, logger="kobold_desktop.server"):
        other.call("POST", "/v1/completions", body, headers={"User-Agent": "another client"})
    assert sum("not applied" in r.getMessage() for r in caplog.records) == 2  # a new client hears of it too


def test_bad_sampler_values_get_422_with_our_message(client, server_engine):
    status, answer = client.call("POST", "/v1/completions", {**BODY, "logit_bias": {"99999999": 1}})
    assert status == 422 and "vocabulary" in answer["error"]["message"]
    status, answer = client.call("POST", "/api/v1/generate", {**KOBOLD, "sampler_order": [0, 0]})
    assert status == 422 and "sampler_order" in answer["error"]["message"]
    status, answer = client.call("POST", "/v1/completions", {**BODY, "custom_token_bans": "1, two"})
    assert status == 422


def test_a_banned_phrase_never_reaches_a_client_on_any_route(client, server_engine):
    plain = text(client, "/v1/completions", {**BODY, "max_tokens": 16})
    phrase = next(plain[i:i + 2] for i in range(len(plain) - 2)  # the random test model writes few letters
                  if plain[i:i + 2].isprintable() and "\ufffd" not in plain[i:i + 2] and plain[i:i + 2].strip())
    for path, body in (("/v1/completions", {**BODY, "max_tokens": 16, "banned_strings": [phrase.upper()]}),
                       ("/api/v1/generate", {**KOBOLD, "max_length": 16, "banned_tokens": [phrase]})):
        assert phrase.lower() not in text(client, path, body).lower()
    events = client.stream("/v1/completions", {**BODY, "max_tokens": 16, "stream": True, "banned_strings": [phrase]})
    streamed = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert phrase.lower() not in streamed.lower()
    status, answer = client.call("POST", "/v1/completions", {**BODY, "banned_strings": ["/([/"]})
    assert status == 422 and "regular expression" in answer["error"]["message"]


def test_a_regex_that_backtracks_without_end_fails_its_own_request_only(client, server):
    """A shared server's phrase bans are other people's regular expressions: one that never
    ends checking fails its request with our message; the request beside it is untouched."""
    import threading

    evil = {**BODY, "max_tokens": 40, "temperature": 1.0, "seed": 1,
            "banned_strings": ["/(?:[\\s\\S]|[\\s\\S][\\s\\S])+(?!)/"]}  # never matches; exponential to find out
    replies = {}

    def ask(name, body):
        replies[name] = client.call("POST", "/v1/completions", body)

    threads = [threading.Thread(target=ask, args=("evil", evil)),
               threading.Thread(target=ask, args=("good", {**BODY, "max_tokens": 8}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    status, answer = replies["evil"]
    assert status == 422 and "takes too long to check" in answer["error"]["message"]
    assert replies["good"][0] == 200 and replies["good"][1]["choices"][0]["text"]
