"""What the server does, independent of HTTP: each route is a method taking its checked body.

OpenAI-compatible (`/v1/...`), KoboldAI-compatible (`/api/v1/...`) and KoboldCpp's
(`/api/extra/...`) routes share one `Service`: the base model, the soft prompts served as
models ("prompt adapters"), the batch scheduler, and the generations running now (for
KoboldCpp's check and abort). Errors are `ApiError`s carrying OpenAI's error shape.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kobold_desktop import __version__, paths
from kobold_desktop.engine.active import Active, ActiveMixture
from kobold_desktop.engine.engine import Engine
from kobold_desktop.engine.sampling import DEFAULT_SAMPLER_ORDER, SEED_LIMIT, SamplingSettings, SettingsError
from kobold_desktop.engine.sequence import GenerationResult, TextChunk
from kobold_desktop.errors import KoboldError
from kobold_desktop.server import protocol as p
from kobold_desktop.server.config import ServeConfig, ServeConfigError
from kobold_desktop.server.scheduler import BatchScheduler, RequestStream, Scheduler
from kobold_desktop.story.context import trim_in_blocks

LOG = logging.getLogger("kobold_desktop.server")
KOBOLD_API_VERSION = "1.2.5"
# What KoboldCpp's /api/extra/version reports: SillyTavern and KoboldAI Lite unlock
# streaming, token counting and min-p by comparing `result` and `version`.
KOBOLDCPP_VERSION = "1.80.0"
KOBOLD_TOP_LOGPROBS = 5  # alternatives per token when a KoboldCpp client asks for logprobs
DEFAULT_MAX_LENGTH = 512


def reuse_report(result: GenerationResult) -> str:
    """One line on a generation's prompt: read in full, partly from the cache, or shifted."""
    total = result.prompt_tokens + result.softprompt_tokens
    if not result.cached_tokens:
        return f"prompt of {total} positions read in full"
    line = f"prompt of {total} positions: {total - result.cached_tokens} read, {result.cached_tokens} from the cache"
    if result.shifted_tokens:
        line += f" ({result.shifted_tokens} of them shifted past dropped text: context shift, close to a fresh read)"
    return line


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Adapter:
    name: str
    softprompt: Active  # a soft prompt, or a mixture of them
    source: str


@dataclass
class Generation:
    """A generation running now, on any route: its streams, who asked (for an abort without a
    genkey), and the text so far (KoboldCpp's check)."""

    key: str
    streams: list[RequestStream]
    client: str = ""
    text: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        for stream in self.streams:
            stream.cancel.set()


class EventStream:
    """Server-sent events of a streaming request; `cancel()` stops its generations (the
    HTTP layer calls it when the client goes away)."""

    def __init__(self, events: Iterator[str], streams: list[RequestStream], done: Callable[[], None] = lambda: None,
                 dialect: str = "openai", fitted: list[str] | None = None):
        self._events, self._streams, self._done = events, streams, done
        self.dialect = dialect
        self.fitted = fitted or []  # what was clamped or trimmed to fit the model (a response header)

    def error_event(self, error: "ApiError") -> str:
        """The stream's last event when it fails after the headers went out (a 200 is sent
        by then): OpenAI's error object, or KoboldCpp's `event: error` with KoboldAI's
        `{"detail": {"msg", "type"}}`. Clients show it instead of a broken connection."""
        if self.dialect == "kobold":
            detail = {"detail": {"msg": error.message, "type": error.kind}}
            return f"event: error\ndata: {json.dumps(detail)}\n\n"
        return f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n"

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._events
        finally:
            self._done()

    def cancel(self) -> None:
        for stream in self._streams:
            stream.cancel.set()


class Service:
    """`scheduler`: where generation runs; the local model's `BatchScheduler` unless
    another is given (`server.vllm.VllmScheduler` sends it to a vLLM server)."""

    def __init__(self, engine: Engine, config: ServeConfig, scheduler: Scheduler | None = None):
        self.engine = engine
        self.scheduler: Scheduler | None = scheduler
        self.config = config
        self.adapters: dict[str, Adapter] = {}
        self.kobold_softprompt: str | None = None  # KoboldAI's "current soft prompt"
        self.generations: dict[str, Generation] = {}  # KoboldAI generations running now, by genkey
        self._lock = threading.Lock()
        self._from_library: set[str] = set()  # adapters served from the library at start (outside the limit)
        self.started_at = time.time()
        self.perf: dict[str, Any] = {"last_process": 0.0, "last_eval": 0.0, "last_token_count": 0,
                                     "last_input_count": 0, "last_seed": -1, "total_gens": 0, "stop_reason": -1}
        self.last_logprobs: dict[str, Any] = {}
        self._noted: set[tuple[str, str]] = set()  # (client, field) already logged as not applied
        self.unknown_seen: set[str] = set()
        self.model_id = engine.loaded.info.name
        self.start_paths: set[Path] = set()  # paths given at start may be loaded again by path
        if config.prompt_adapters and not config.enable_prompt_adapter:
            raise ServeConfigError("prompt_adapters are listed but enable_prompt_adapter is false.")
        for name, source in config.prompt_adapters.items():
            try:
                adapter = self.add_adapter(name, source, trusted=True)
            except ApiError as exc:
                raise ServeConfigError(f"prompt adapter '{name}': {exc.message}") from exc
            self.start_paths.add(adapter_path(adapter.source))
        for name, source in config.library_adapters.items():
            try:
                self.add_adapter(name, source, trusted=True, counted=False)
            except ApiError as exc:
                LOG.warning("soft prompt '%s' (%s) is not served: %s", name, source, exc.message)
        if self.scheduler is None:
            self.scheduler = BatchScheduler(engine, max_batch=config.max_batch)

    def close(self) -> None:
        self.scheduler.stop()

    # -- soft prompts as models --------------------------------------------------------------

    def _resolve(self, source: str, trusted: bool) -> Path:
        """A soft prompt by path or library name. Untrusted requests (no admin key) may
        name only the user's soft prompt folders, the bundled examples, and paths given at
        start: a web page must not make the server read the user's other files."""
        from kobold_desktop.softprompt.library import SoftPromptLibrary

        try:
            path = SoftPromptLibrary().resolve(source)
        except KoboldError as exc:
            raise ApiError(404, str(exc), code="softprompt_not_found") from exc
        if not trusted and not self._allowed(path):
            raise ApiError(403, "soft prompts load by path only from your soft prompt folders or the paths "
                                "given at start; set an admin key and send it to load others.",
                           param="path", code="path_not_allowed")
        return path

    def _allowed(self, path: Path) -> bool:
        resolved = path.resolve()
        folders = [paths.user_softprompt_dir(), paths.bundled_softprompt_dir()]
        return resolved in {p.resolve() for p in self.start_paths} or any(
            resolved.is_relative_to(folder.resolve()) for folder in folders)

    def _prepare(self, path: Path, trusted: bool = True) -> Active:
        """A soft prompt file, or a mixture file (its members are found by file name beside
        it or in the library, never by a path; each member, links resolved, must pass the
        folder rule above too)."""
        def allow(file: Path) -> None:
            if not trusted and file != path and not self._allowed(file):
                raise ApiError(403, f"mixture member '{file.name}' is outside your soft prompt folders; "
                                    "set an admin key and send it to load it.", param="path",
                               code="path_not_allowed")

        return self.engine.prepare(path, allow=allow)

    def add_adapter(self, name: str, source: str, trusted: bool = False, counted: bool = True) -> Adapter:
        """Serve a soft prompt (or mixture) as the model `name`. `counted=False`: one of the
        library's, served at start beside the ones named by hand, outside max_prompt_adapters."""
        if not self.config.enable_prompt_adapter:
            raise ApiError(400, "soft prompts (prompt adapters) are disabled on this server.")
        if not name or name == self.model_id:
            raise ApiError(422, "a soft prompt needs a name other than the base model's.", param="name")
        try:
            softprompt = self._prepare(self._resolve(source, trusted), trusted)
        except ApiError:
            raise
        except KoboldError as exc:
            raise ApiError(400, str(exc), param="path") from exc
        # (the local scheduler starts after the adapters given at start are prepared)
        scheduler = self.scheduler if self.scheduler is not None else BatchScheduler
        if isinstance(softprompt, ActiveMixture) and not scheduler.supports_mixtures:
            from kobold_desktop.server.vllm import MIXTURES_REFUSED

            raise ApiError(400, MIXTURES_REFUSED, param="path", code="mixture_not_supported")
        if softprompt.n_tokens > self.config.max_prompt_adapter_token:
            raise ApiError(400, f"{softprompt.n_tokens} tokens is more than max_prompt_adapter_token "
                                f"({self.config.max_prompt_adapter_token}).", param="path")
        with self._lock:
            if counted and name not in self.adapters and len(set(self.adapters) - self._from_library) >= \
                    self.config.max_prompt_adapters:
                raise ApiError(400, f"already serving max_prompt_adapters ({self.config.max_prompt_adapters}) soft "
                                    "prompts; unload one first.")
            adapter = Adapter(name, softprompt, source)
            if counted:
                self._from_library.discard(name)
            else:
                self._from_library.add(name)
            self.adapters[name] = adapter
        return adapter

    def _chosen(self, name: str | None) -> Active | None:
        """The soft prompt a request asks for by model name; none named: the server's current
        one (KoboldAI's PUT /api/v1/config/soft_prompt), as KoboldCpp does for every route."""
        return self._model(name if name else self.kobold_softprompt)

    def _model(self, name: str | None) -> Active | None:
        if not name or name == self.model_id:
            return None
        with self._lock:
            adapter = self.adapters.get(name)
        if adapter is None:
            raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return adapter.softprompt

    def runs_on(self) -> dict[str, str]:
        """Where and in what precision the model runs (LoadedModel.runs_on; vLLM's own)."""
        if self.config.backend == "vllm":
            return {"backend": "vllm", "device": self.scheduler.client.url, "precision": "vLLM's",
                    "why": "vLLM runs the model; this server turns soft prompts into its prompt embeddings"}
        return self.engine.loaded.runs_on()

    def models(self) -> dict[str, Any]:
        created = int(time.time())
        runs_on = self.runs_on()
        base = {"id": self.model_id, "object": "model", "created": created, "owned_by": "kobold-desktop",
                "root": self.model_id, "parent": None, "max_model_len": self.engine.context_length,
                "runs_on": runs_on}
        with self._lock:
            adapters = list(self.adapters.values())
        return {"object": "list", "data": [base] + [
            {"id": a.name, "object": "model", "created": created, "owned_by": "kobold-desktop",
             "root": self.model_id, "parent": self.model_id, "max_model_len": self.engine.context_length,
             "softprompt_tokens": a.softprompt.n_tokens, "runs_on": runs_on, **self._mixture_info(a.softprompt)}
            for a in adapters]}

    @staticmethod
    def _mixture_info(softprompt: Active) -> dict[str, Any]:
        if not isinstance(softprompt, ActiveMixture):
            return {}
        return {"mixture": {"mode": softprompt.mode, "members": [
            {"name": name, "weight": weight} for name, weight in zip(softprompt.member_names, softprompt.weights)]}}

    def load_softprompt(self, body: p.LoadSoftPromptRequest, trusted: bool) -> dict[str, Any]:
        adapter = self.add_adapter(body.name, body.path, trusted)
        return {"status": "loaded", "name": body.name, "softprompt_tokens": adapter.softprompt.n_tokens}

    def unload_softprompt(self, body: p.UnloadSoftPromptRequest) -> dict[str, Any]:
        with self._lock:
            if body.name not in self.adapters:
                raise ApiError(404, f"no soft prompt named `{body.name}` is loaded.", param="name",
                               code="model_not_found")
            del self.adapters[body.name]
            self._from_library.discard(body.name)
        if self.kobold_softprompt == body.name:
            self.kobold_softprompt = None
        return {"status": "unloaded", "name": body.name}

    # -- generation ---------------------------------------------------------------------

    # A token is at most this many characters in every tokenizer we know (most are under
    # 20); longer text cannot fit the context whatever it says, so it is refused before the
    # tokenizer spends seconds and hundreds of MB on it.
    MAX_CHARS_PER_TOKEN = 64

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        most = self.engine.context_length * self.MAX_CHARS_PER_TOKEN
        if len(text) > most:
            raise ApiError(400, f"the text is {len(text):,} characters; this model's context of "
                                f"{self.engine.context_length} tokens holds far less (at most {most:,}).",
                           param="prompt", code="context_length_exceeded")
        return self.engine.encode(text, add_special_tokens=add_special_tokens)

    def _prompt_ids(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self._encode(prompt)]
        if prompt and all(isinstance(t, str) for t in prompt):
            return [self._encode(t) for t in prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            self._check_ids(prompt, "prompt")
            return [list(prompt)]
        raise ApiError(422, "'prompt' must be a string, a list of strings, or a list of token ids.", param="prompt")

    def _check_ids(self, ids: list[int], param: str) -> None:
        vocab = len(self.engine.loaded.tokenizer)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(422 if param == "tokens" else 400, f"token id {bad} is not in this model's vocabulary "
                                                              f"(ids 0 to {vocab - 1}).", param=param)

    # At least this share of the context stays for the prompt when a client asks for more new
    # tokens than fit (KoboldCpp keeps a fifth).
    PROMPT_SHARE = 5

    def _fit(self, ids: list[int], softprompt: Active | None, settings: SamplingSettings,
             max_context: int | None = None, memory: list[int] | None = None) -> tuple[list[int], SamplingSettings, list[str]]:
        """Fit a request to the model as KoboldCpp does: the context clamped to the model's,
        max tokens shortened to leave the prompt room, the prompt's start trimmed (whole
        characters; the memory and the soft prompt always kept). Returns the prompt (memory
        first), the settings and what was changed; refuses only what cannot fit at all."""
        memory = memory or []
        model_context = self.engine.context_length
        context = min(max_context, model_context) if max_context else model_context
        notes = [f"context {context} (asked {max_context})"] if max_context and max_context > model_context else []
        n_soft = softprompt.n_tokens if softprompt else 0
        usable = context - n_soft - len(memory)
        if usable < 2:
            raise ApiError(400, f"the soft prompt ({n_soft} tokens) and the memory ({len(memory)}) leave no room in a "
                                f"context of {context} tokens.", param="prompt", code="context_length_exceeded")
        most = max(1, usable - max(1, (context - n_soft) // self.PROMPT_SHARE))
        if settings.max_new_tokens > most:
            notes.append(f"max tokens {most} (asked {settings.max_new_tokens})")
            settings = settings.with_changes(max_new_tokens=most)
        room = usable - settings.max_new_tokens
        if len(ids) > room:
            tokenizer = self.engine.loaded.tokenizer
            bos = getattr(tokenizer, "bos_token_id", None)
            lead = [bos] if bos is not None and ids and ids[0] == bos and not memory else []
            # in blocks, as the window trims a story: the start stays put for several turns
            # of a growing story, so each of them reuses the cache (story/context.py)
            kept = ids[len(lead) + trim_in_blocks(len(ids) - len(lead), room - len(lead)):]
            while kept and tokenizer.decode(kept[:1]).startswith("\ufffd"):
                kept = kept[1:]  # never start inside a character
            notes.append(f"prompt trimmed by {len(ids) - len(lead) - len(kept)} tokens at its start")
            ids = lead + kept
        if notes:
            LOG.info("fitted a request to the model: %s", "; ".join(notes))
        return memory + ids, settings, notes

    def _settings(self, body: p.Sampling | p.KoboldGenerateRequest, *args: int) -> SamplingSettings:
        try:
            settings = body.to_settings(*args)
            settings.check_vocab(len(self.engine.loaded.tokenizer))
        except SettingsError as exc:
            raise ApiError(422, str(exc)) from exc
        return settings

    # -- fields sent that we do not apply --------------------------------------------------------

    def note_fields(self, client: str, route: str, body: p.Body) -> None:
        """Log, once per client and field, what a body carried that we do not apply: the
        fields of `protocol.NOT_APPLIED` (with why) and fields no route knows."""
        unapplied = sorted(name for name in body.sent if name in p.NOT_APPLIED)
        unknown = sorted(body.sent - type(body).known_names() - set(p.NOT_APPLIED))
        with self._lock:
            self.unknown_seen.update(unknown)
            fresh = [name for name in unapplied + unknown if (client, name) not in self._noted]
            self._noted.update((client, name) for name in fresh)
        if fresh:
            reasons = "; ".join(f"{name}: {p.NOT_APPLIED.get(name, 'not a field this server knows')}"
                                for name in fresh)
            LOG.warning("%s sent %s fields that are not applied (%s); GET /api/extra/sampling lists them.",
                        client, route, reasons)

    def sampling_report(self) -> dict[str, Any]:
        """What each generation route applies, what it accepts without applying, and the
        unknown fields clients have sent."""
        routes = {"/v1/completions": p.CompletionRequest, "/v1/chat/completions": p.ChatCompletionRequest,
                  "/api/v1/generate": p.KoboldGenerateRequest}
        return {"applied": {route: sorted(body.known_names()) for route, body in routes.items()},
                "not_applied": dict(sorted(p.NOT_APPLIED.items())),
                "unknown_seen": sorted(self.unknown_seen),
                "sampler_order_default": list(DEFAULT_SAMPLER_ORDER)}

    def _submit(self, prompts: list[list[int]], softprompt, settings, n: int,
                logprobs: int | None = None) -> list[RequestStream]:
        """Queue every request, or none: each is checked before the first joins the batch."""
        if logprobs is not None and not self.scheduler.supports_logprobs:
            raise ApiError(422, "log-probabilities are not offered with this backend.", param="logprobs")
        if any(not ids for ids in prompts) and softprompt is None:
            raise ApiError(400, "the prompt is empty, and this model adds no BOS token and has no soft prompt to "
                                "start from; send some text.", param="prompt")
        streams, group = [], object()  # the n copies of this request share one fair share
        for ids in prompts:
            for copy in range(n):
                # n copies must differ: each gets its own seed derived from the request's.
                seeded = settings if settings.seed is None or copy == 0 else settings.with_changes(
                    seed=(settings.seed + copy) % SEED_LIMIT)
                try:
                    streams.append(self.scheduler.submit(ids, softprompt, seeded, group=group, logprobs=logprobs))
                except KoboldError as exc:
                    for stream in streams:
                        stream.cancel.set()
                    # A remote backend's refusal keeps its 4xx; one that cannot be reached is a 502.
                    status = exc.status
                    raise ApiError(status, str(exc), kind="server_error" if status >= 500 else
                                   "invalid_request_error") from exc
        return streams

    # -- log-probabilities and KoboldCpp's perf ------------------------------------------------------

    def _token_text(self, token: int) -> str:
        return self.engine.loaded.tokenizer.decode([token])

    def _openai_logprobs(self, result: GenerationResult) -> dict[str, Any] | None:
        """OpenAI's completions shape: tokens, their log-probabilities, the top alternatives."""
        if result.logprobs is None:
            return None
        tokens = [self._token_text(t.token) for t in result.logprobs]
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        def alternatives(top) -> dict[str, float]:
            found: dict[str, float] = {}
            for token, logprob in top:  # most likely first: tokens with the same text keep the likeliest
                found.setdefault(self._token_text(token), logprob)
            return found

        return {"tokens": tokens, "token_logprobs": [t.logprob for t in result.logprobs],
                "top_logprobs": [alternatives(t.top) for t in result.logprobs], "text_offset": offsets}

    def _content_logprobs(self, result: GenerationResult) -> dict[str, Any] | None:
        """The chat shape (OpenAI's chat completions and KoboldCpp's): one entry per token."""
        if result.logprobs is None:
            return None

        def entry(token: int, logprob: float) -> dict[str, Any]:
            text = self._token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]}
                            for t in result.logprobs]}

    def _record(self, result: GenerationResult, client: str = "", genkey: str | None = None) -> None:
        """What KoboldCpp's /api/extra/perf and /api/extra/last_logprobs report; the log
        says how much of the prompt was read, came from the cache, or was shifted."""
        LOG.info("%s", reuse_report(result))
        with self._lock:
            self.perf.update(last_process=round(result.first_token_seconds or 0.0, 4),
                             last_eval=round(result.seconds - (result.first_token_seconds or 0.0), 4),
                             last_token_count=result.generated_tokens, last_input_count=result.prompt_tokens,
                             stop_reason=1 if result.finish_reason == "stop" else 0,
                             total_gens=self.perf["total_gens"] + 1)
            self.last_logprobs[client] = self.last_logprobs[genkey or ""] = self._content_logprobs(result)

    def kobold_perf(self) -> dict[str, Any]:
        with self._lock:
            running = len(self.generations)
            return {**self.perf, "queue": max(0, running - 1), "idle": int(running == 0),
                    "uptime": round(time.time() - self.started_at, 1), "hordeexitcounter": 0, "quiet": False}

    def kobold_last_logprobs(self, body: p.GenkeyRequest, client: str = "") -> dict[str, Any]:
        """The log-probabilities of the last generation that asked for them (by genkey, or the caller's)."""
        with self._lock:
            found = self.last_logprobs.get(body.genkey or "") if body.genkey else self.last_logprobs.get(client)
        return {"logprobs": found or {"content": []}}

    def kobold_tokenize(self, body: p.TokenCountRequest) -> dict[str, Any]:
        ids = self._encode(body.prompt, add_special_tokens=False)
        return {"value": len(ids), "ids": ids}

    def kobold_detokenize(self, body: p.KoboldDetokenizeRequest) -> dict[str, Any]:
        self._check_ids(body.ids, "ids")
        return {"result": self.engine.loaded.tokenizer.decode(body.ids), "success": True}

    @staticmethod
    def _usage(results: list[GenerationResult]) -> dict[str, Any]:
        prompt = sum(r.prompt_tokens + r.softprompt_tokens for r in results)
        completion = sum(r.generated_tokens for r in results)
        cached = sum(r.cached_tokens for r in results)  # read from the cache of an earlier request, not run again
        shifted = sum(r.shifted_tokens for r in results)  # of those, moved back past dropped text (context shift)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached, **({"shifted_tokens": shifted} if shifted else {})}}

    def _register(self, streams: list[RequestStream], client: str, key: str | None = None) -> Generation:
        generation = Generation(key or uuid.uuid4().hex, streams, client)
        with self._lock:
            self.generations[generation.key] = generation
        return generation

    def completions(self, body: p.CompletionRequest, client: str = "") -> dict[str, Any] | EventStream:
        softprompt = self._chosen(body.model)
        settings = self._settings(body, body.new_tokens)
        prompts, notes = [], []
        for ids in self._prompt_ids(body.prompt):
            ids, fitted, changed = self._fit(ids, softprompt, settings)
            prompts.append(ids)
            notes += [n for n in changed if n not in notes]
        settings = fitted
        streams = self._submit(prompts, softprompt, settings, body.n, body.logprobs)
        generation = self._register(streams, client)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or self.model_id}
        def chunk(index: int, text: str, finish: str | None, first: bool) -> str:
            return json.dumps({**meta, "choices": [{"index": index, "text": text, "logprobs": None,
                                                    "finish_reason": finish}]})

        answer = self._openai_answer(streams, generation, client, notes, chunk if body.stream else None)
        if isinstance(answer, EventStream):
            return answer
        results = answer
        return {**meta, "choices": [{"index": i, "text": r.text, "logprobs": self._openai_logprobs(r),
                                     "finish_reason": r.finish_reason.openai} for i, r in enumerate(results)],
                "usage": self._usage(results), **({"fitted": notes} if notes else {})}

    def _openai_answer(self, streams: list[RequestStream], generation: Generation, client: str, notes: list[str],
                       render=None) -> "EventStream | list[GenerationResult]":
        """A stream of `render`'s chunks, or (no `render`) every result, recorded for
        KoboldCpp's perf and logprobs routes."""
        if render is not None:
            return EventStream(self._openai_events(streams, render, client), streams, lambda: self._end(generation),
                               fitted=notes)
        try:
            results = [s.result() for s in streams]
        finally:
            self._end(generation)
        for result in results:
            self._record(result, client)
        return results

    def _openai_events(self, streams: list[RequestStream], render, client: str = "") -> Iterator[str]:
        for index, stream in enumerate(streams):
            first = True
            for event in stream:
                if isinstance(event, TextChunk):
                    yield f"data: {render(index, event.text, None, first)}\n\n"
                else:
                    self._record(event, client)
                    yield f"data: {render(index, '', event.finish_reason.openai, first)}\n\n"
                first = False
        yield "data: [DONE]\n\n"

    def chat_completions(self, body: p.ChatCompletionRequest, client: str = "") -> dict[str, Any] | EventStream:
        softprompt = self._chosen(body.model)
        tokenizer = self.engine.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions.")
        messages = [m.model_dump() for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise ApiError(400, f"the chat template failed: {exc}", param="messages") from exc
        ids = self._encode(text, add_special_tokens=False)
        ids, settings, notes = self._fit(ids, softprompt, self._settings(body, body.new_tokens))
        streams = self._submit([ids], softprompt, settings, body.n, body.top_logprobs if body.logprobs else None)
        generation = self._register(streams, client)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or self.model_id}
        def chunk(index: int, text: str, finish: str | None, first: bool) -> str:
            delta = {"role": "assistant"} if first else {}  # OpenAI's first chunk names the role
            if text or first:
                delta["content"] = text
            return json.dumps({**meta, "object": "chat.completion.chunk",
                               "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

        answer = self._openai_answer(streams, generation, client, notes, chunk if body.stream else None)
        if isinstance(answer, EventStream):
            return answer
        results = answer
        return {**meta, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": self._content_logprobs(r),
             "finish_reason": r.finish_reason.openai} for i, r in enumerate(results)],
            "usage": self._usage(results), **({"fitted": notes} if notes else {})}

    # -- tokens ------------------------------------------------------------------------------

    def tokenize(self, body: p.TokenizeRequest) -> dict[str, Any]:
        ids = self._encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.engine.context_length}

    def detokenize(self, body: p.DetokenizeRequest) -> dict[str, Any]:
        self._check_ids(body.tokens, "tokens")
        return {"prompt": self.engine.loaded.tokenizer.decode(body.tokens)}

    def kobold_tokencount(self, body: p.TokenCountRequest) -> dict[str, Any]:
        ids = self._encode(body.prompt, add_special_tokens=False)
        return {"value": len(ids), "ids": ids}

    # -- KoboldAI- and KoboldCpp-compatible routes -------------------------------------------------

    def kobold_model(self) -> dict[str, Any]:
        return {"result": self.model_id}

    def kobold_version(self) -> dict[str, Any]:
        return {"result": KOBOLD_API_VERSION}

    def kobold_extra_version(self) -> dict[str, Any]:
        return {"result": "KoboldCpp", "version": KOBOLDCPP_VERSION, "protected": bool(self.config.api_key),
                "txt2img": False, "vision": False, "transcribe": False, "multiplayer": False, "websearch": False,
                "product": "Kobold Desktop", "product_version": __version__}

    def kobold_max_context_length(self) -> dict[str, Any]:
        return {"value": self.engine.context_length}

    def kobold_max_length(self) -> dict[str, Any]:
        return {"value": min(DEFAULT_MAX_LENGTH, self.engine.context_length // 2)}

    def kobold_softprompts_list(self) -> dict[str, Any]:
        with self._lock:
            return {"values": [{"value": name} for name in self.adapters]}

    def kobold_get_softprompt(self) -> dict[str, Any]:
        return {"value": self.kobold_softprompt or ""}

    def kobold_put_softprompt(self, body: p.PutSoftPromptRequest) -> dict[str, Any]:
        if body.value:
            self._model(body.value)  # 404 if unknown
        self.kobold_softprompt = body.value or None
        return {}

    def _kobold_start(self, body: p.KoboldGenerateRequest, client: str = "") -> tuple[Generation, list[str]]:
        softprompt = self._chosen(body.soft_prompt)
        memory = self._encode(body.memory) if body.memory else []
        ids = self._encode(body.prompt, add_special_tokens=not memory)
        # front ends send the whole story: keep its end, and the memory whole
        ids, settings, notes = self._fit(ids, softprompt, self._settings(body), body.max_context_length, memory)
        with self._lock:
            self.perf["last_seed"] = settings.seed if settings.seed is not None else -1
        streams = self._submit([ids], softprompt, settings, 1, KOBOLD_TOP_LOGPROBS if body.logprobs else None)
        return self._register(streams, client, body.genkey), notes

    def _end(self, generation: Generation) -> None:
        with self._lock:
            if self.generations.get(generation.key) is generation:
                del self.generations[generation.key]

    def kobold_generate(self, body: p.KoboldGenerateRequest, client: str = "") -> dict[str, Any]:
        generation, notes = self._kobold_start(body, client)
        try:
            for event in generation.streams[0]:
                if isinstance(event, TextChunk):
                    generation.text.append(event.text)
                else:
                    self._record(event, client, body.genkey)
                    logprobs = {"logprobs": self._content_logprobs(event)} if body.logprobs else {}
                    return {"results": [{"text": event.text, "finish_reason": event.finish_reason.openai,
                                         "prompt_tokens": event.prompt_tokens + event.softprompt_tokens,
                                         "completion_tokens": event.generated_tokens, **logprobs}],
                            **({"fitted": notes} if notes else {})}
        finally:
            self._end(generation)
        raise ApiError(500, "the generation ended without a result.", kind="server_error")

    def kobold_generate_stream(self, body: p.KoboldGenerateRequest, client: str = "") -> EventStream:
        """KoboldCpp's stream: `event: message` and `data: {"token", "finish_reason"}` per
        chunk, the last with the finish reason; the stream ends by closing (no [DONE])."""
        generation, notes = self._kobold_start(body, client)

        def events() -> Iterator[str]:
            for event in generation.streams[0]:
                if isinstance(event, TextChunk):
                    generation.text.append(event.text)
                    data = {"token": event.text, "finish_reason": None}
                else:
                    self._record(event, client, body.genkey)
                    data = {"token": "", "finish_reason": event.finish_reason.openai}
                yield f"event: message\ndata: {json.dumps(data)}\n\n"

        return EventStream(events(), generation.streams, lambda: self._end(generation), dialect="kobold",
                           fitted=notes)

    def _generation_for(self, genkey: str | None, client: str = "") -> Generation | None:
        """The generation named by `genkey`; without one, the caller's own if it has one
        running, else the one running if only one runs (never another client's choice)."""
        with self._lock:
            if genkey:
                return self.generations.get(genkey)
            own = [g for g in self.generations.values() if client and g.client == client]
            if len(own) == 1:
                return own[0]
            if len(self.generations) == 1:
                return next(iter(self.generations.values()))
        return None

    def kobold_abort(self, body: p.GenkeyRequest, client: str = "") -> dict[str, Any]:
        """Stop a generation on any route, streams included (see `_generation_for`)."""
        generation = self._generation_for(body.genkey, client)
        if generation is not None:
            generation.cancel()
        return {"success": "true" if generation else "false", "done": "true"}

    def kobold_check(self, body: p.GenkeyRequest, client: str = "") -> dict[str, Any]:
        generation = self._generation_for(body.genkey, client)
        return {"results": [{"text": "".join(generation.text) if generation else ""}]}


def adapter_path(source: str) -> Path:
    return Path(source).expanduser()
