"""Writing with a remote server instead of a local model: ours, or any KoboldAI- or
OpenAI-compatible one (KoboldCpp, vLLM, llama.cpp's server, text-generation-webui).

`RemoteSession` has the part of `Engine` the window's model thread uses: what is
"loaded" (the server and its model), the soft prompt (one of the server's models), the
context budget, and `stream()`, which yields text chunks and then a result as the local
engine does. The story's context (Memory, World Info, Author's Note, the end of the
story) is built by the same code as for a local model, with the server's tokenizer
when it offers one (`/tokenize`, or KoboldCpp's `/api/extra/tokencount`); without one,
by characters, three to a token, and the server gets the text.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from kobold_desktop.engine.remote.http import Endpoint, HttpClient, RemoteError
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.detokenize import StopSequences
from kobold_desktop.engine.active import RemoteModel
from kobold_desktop.engine.loader import room
from kobold_desktop.engine.sequence import FinishReason, GenerationResult, TextChunk

CHARS_PER_TOKEN = 3  # without the server's tokenizer: a safe guess (English runs near 4)
@dataclass(frozen=True)
class ServerModel:
    name: str
    softprompt_tokens: int = 0


@dataclass
class RemoteInfo:
    name: str
    context_length: int


@dataclass
class RemoteLoaded:
    """What the window shows of a connected server (the local `LoadedModel`'s shape)."""

    info: RemoteInfo
    source: str
    tokenizer: Any
    device_label: str
    precision: str

    @property
    def context_length(self) -> int:
        return self.info.context_length


class ServerTokenizer:
    """A tokenizer that asks the server (the `tokenizer(text)["input_ids"]` and `decode`
    the context builder uses)."""

    def __init__(self, http: HttpClient, dialect: str):
        self.http, self.dialect = http, dialect

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        if self.dialect == "openai":
            data = self.http.post("/tokenize", {"prompt": text, "add_special_tokens": add_special_tokens})
            ids = data.get("tokens")
        else:  # KoboldCpp counts without special tokens
            ids = self.http.post("/api/extra/tokencount", {"prompt": text}).get("ids")
        if not isinstance(ids, list):
            raise RemoteError(f"{self.http.name} did not tokenize the text.")
        return {"input_ids": [int(t) for t in ids]}

    def decode(self, ids: Sequence[int]) -> str:
        if self.dialect == "openai":
            return str(self.http.post("/detokenize", {"tokens": list(ids)}).get("prompt", ""))
        return str(self.http.post("/api/extra/detokenize", {"ids": list(ids)}).get("result", ""))


class CharTokenizer:
    """One "token" per character, for servers that do not tokenize for us."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)


class RemoteSession:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        endpoint = Endpoint.parse(url)  # the server's root, given with or without /v1 or /api
        self.endpoint = endpoint.with_prefix(endpoint.prefix.removesuffix("/v1").removesuffix("/api"))
        self.http = HttpClient(self.endpoint, api_key, name="the server", timeout=timeout)
        self.lock = threading.RLock()
        self.dialect = ""  # "openai", "koboldcpp" or "koboldai": how we generate
        self.base_model = ""
        self.models: list[ServerModel] = []
        self.context_length = 2048  # until the server says
        self.tokenizer: ServerTokenizer | CharTokenizer = CharTokenizer()
        self._softprompt: RemoteModel | None = None
        self.connected = False

    @property
    def by_chars(self) -> bool:
        """No tokenizer of the server's: the context is counted in characters."""
        return isinstance(self.tokenizer, CharTokenizer)

    # -- connecting ------------------------------------------------------------------------

    def connect(self) -> "RemoteSession":
        """Ask the server what it is, what it serves and how long its context is."""
        try:
            data = self.http.get("/v1/models", timeout=15)
            listed = data.get("data") if isinstance(data, dict) else None
        except RemoteError as exc:
            if exc.status != 502 and exc.status not in (404, 405):
                raise  # a wrong key says so
            listed = None
        if isinstance(listed, list) and listed:
            self.dialect = "openai"
            bases = [m for m in listed if not m.get("parent")] or listed[:1]
            self.base_model = str(bases[0]["id"])
            self.models = [ServerModel(str(m["id"]), int(m.get("softprompt_tokens") or 0))
                           for m in listed if m is not bases[0]]
            length = bases[0].get("max_model_len")
            told = isinstance(length, int) and length > 0
            if told:
                self.context_length = length
        else:
            told = False
            try:
                self.base_model = str(self.http.get("/api/v1/model", timeout=15).get("result", "model"))
            except RemoteError as exc:
                raise RemoteError(f"no KoboldAI or OpenAI-compatible server at {self.endpoint.base}: {exc}",
                                  exc.status) from exc
            self.dialect = "koboldcpp" if self._answers("/api/extra/version") else "koboldai"
            try:
                values = self.http.get("/api/v1/config/soft_prompts_list", timeout=15).get("values", [])
                self.models = [ServerModel(str(v["value"])) for v in values if v.get("value")]
            except RemoteError:
                self.models = []
        if not told:  # KoboldAI's route (KoboldCpp's OpenAI models list has no length)
            try:
                self.context_length = int(self.http.get("/api/v1/config/max_context_length", timeout=15)["value"])
            except (RemoteError, KeyError, TypeError, ValueError):
                pass
        self._choose_tokenizer()
        self.connected = True
        return self

    def _answers(self, path: str) -> bool:
        try:
            self.http.get(path, timeout=15)
            return True
        except RemoteError:
            return False

    def _choose_tokenizer(self) -> None:
        for dialect in ("openai", "koboldcpp"):
            tokenizer = ServerTokenizer(self.http, dialect)
            try:
                if tokenizer("Hello there", add_special_tokens=False)["input_ids"] and tokenizer.decode(
                        tokenizer("Hi", add_special_tokens=False)["input_ids"]).strip() == "Hi":
                    self.tokenizer = tokenizer
                    return
            except RemoteError:
                continue
        self.tokenizer = CharTokenizer()

    # -- the Engine's shape ---------------------------------------------------------------

    @property
    def is_loaded(self) -> bool:
        return self.connected

    @property
    def loaded(self) -> RemoteLoaded:
        where = f"{self.endpoint.host}:{self.endpoint.port}"
        return RemoteLoaded(RemoteInfo(self.base_model, self.context_length), self.endpoint.base, self.tokenizer,
                            f"server {where}", {"openai": "OpenAI API", "koboldcpp": "KoboldCpp API",
                                                "koboldai": "KoboldAI API"}[self.dialect])

    @property
    def hidden_size(self) -> int:
        return 0

    @property
    def softprompt(self) -> RemoteModel | None:
        return self._softprompt

    def set_softprompt(self, name: str | None) -> RemoteModel | None:
        if name is None:
            self._softprompt = None
            return None
        found = next((m for m in self.models if m.name == name), None)
        if found is None:
            raise RemoteError(f"the server serves no model named '{name}'.", 404)
        self._softprompt = RemoteModel(found.name, found.softprompt_tokens)
        return self._softprompt

    def unload(self) -> None:
        self.connected = False
        self._softprompt = None

    def context_budget(self, settings: SamplingSettings, context_limit: int | None = None) -> int:
        tokens = room(self.context_length, self._softprompt, settings.max_new_tokens, context_limit)
        return tokens * CHARS_PER_TOKEN if self.by_chars else tokens

    # -- generating -------------------------------------------------------------------------

    def stream(self, prompt: Sequence[int], settings: SamplingSettings = SamplingSettings(),
               cancel: threading.Event | None = None) -> Iterator[TextChunk | GenerationResult]:
        """The server's text as it comes, then the result; `cancel` drops the request."""
        ids = list(prompt)
        started = time.perf_counter()
        pieces: list[str] = []
        finish = FinishReason.LENGTH
        first = None
        stops = StopSequences(settings.stop)  # servers trim their stop strings; this trims any they miss
        events = self._start(ids, settings)
        try:
            for text, reason in events:
                if cancel is not None and cancel.is_set():
                    finish = FinishReason.CANCELLED
                    break
                if text:
                    first = first if first is not None else time.perf_counter() - started
                    shown = stops.feed(text)
                    if shown:
                        pieces.append(shown)
                        yield TextChunk(shown)
                    if stops.stopped:
                        finish = FinishReason.STOP
                        break
                if reason:
                    finish = FinishReason.from_server(reason)
            else:
                rest = stops.flush()
                if rest:
                    pieces.append(rest)
                    yield TextChunk(rest)
        finally:
            close = getattr(events, "close", None)
            if close:
                close()
        text = "".join(pieces)
        yield GenerationResult(text=text, finish_reason=finish, prompt_tokens=len(ids),
                               softprompt_tokens=self._softprompt.n_tokens if self._softprompt else 0,
                               generated_tokens=0 if self.by_chars else len(self.tokenizer(text, False)["input_ids"])
                               if text else 0,
                               seconds=time.perf_counter() - started, first_token_seconds=first)

    def _prompt_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if ids else ""

    def _start(self, ids: list[int], settings: SamplingSettings):
        model = self._softprompt.name if self._softprompt else None
        if self.dialect == "openai":
            # Token ids when they are the server's own (ours, vLLM), else the text
            exact = isinstance(self.tokenizer, ServerTokenizer) and self.tokenizer.dialect == "openai"
            prompt: Any = ids if exact else self._prompt_text(ids)
            body = {"model": model or self.base_model, "prompt": prompt, "stream": True, **settings.openai_fields()}
            if settings.banned_phrases:  # text-generation-webui's and KoboldCpp's OpenAI routes read it
                body["banned_strings"] = list(settings.banned_phrases)
            return _openai_text(self.http.stream("/v1/completions", body))
        body = {"prompt": self._prompt_text(ids), "max_length": settings.max_new_tokens,
                "max_context_length": self.context_length, "temperature": settings.temperature,
                "top_p": settings.top_p, "top_k": settings.top_k, "min_p": settings.min_p,
                "typical": settings.typical_p, "rep_pen": settings.repetition_penalty,
                "rep_pen_range": settings.repetition_penalty_range, "stop_sequence": list(settings.stop),
                "sampler_seed": settings.seed if settings.seed is not None else -1}
        if settings.banned_phrases:
            body["banned_tokens"] = list(settings.banned_phrases)  # KoboldCpp's name for phrase bans
        if model:
            body["soft_prompt"] = model
        if self.dialect == "koboldcpp":
            return _kobold_text(self.http.stream("/api/extra/generate/stream", body))
        result = self.http.post("/api/v1/generate", body)
        return iter([(str(result["results"][0].get("text", "")), "stop")])


class _Events:
    """(text, finish reason) pairs from an event stream, closable."""

    def __init__(self, events, pick):
        self._events, self._pick = events, pick

    def __iter__(self):
        for event in self._events:
            pair = self._pick(event)
            if pair is not None:
                yield pair

    def close(self) -> None:
        self._events.close()


def _openai_text(events) -> _Events:
    def pick(event):
        choices = event.get("choices") or []
        return (str(choices[0].get("text") or ""), choices[0].get("finish_reason")) if choices else None

    return _Events(events, pick)


def _kobold_text(events) -> _Events:
    return _Events(events, lambda event: (str(event.get("token") or ""), event.get("finish_reason")))
