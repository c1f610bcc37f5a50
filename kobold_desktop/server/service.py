"""What the server does, independent of HTTP: each route is a function of the request body.

OpenAI-compatible (`/v1/...`) and KoboldAI-compatible (`/api/...`) routes share one
`Service`: the base model, the soft prompts served as models ("prompt adapters"), and
the batch scheduler. Errors are `ApiError`s carrying OpenAI's error shape and status.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from kobold_desktop import __version__
from kobold_desktop.engine import ActiveSoftPrompt, Engine, SamplingSettings, SettingsError
from kobold_desktop.engine.sampling import SEED_LIMIT
from kobold_desktop.engine.sequence import GenerationResult, TextChunk
from kobold_desktop.errors import KoboldError
from kobold_desktop.server.config import ServeConfig, ServeConfigError
from kobold_desktop.server.scheduler import BatchScheduler, RequestStream

KOBOLD_API_VERSION = "1.2.5"
MAX_N = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _field(body: dict, name: str, kind, default=None, *, minimum=None, maximum=None):
    """A request field of the given type (int accepted for float), within bounds."""
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ApiError(422, f"'{name}' must be {kind.__name__}.", param=name)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ApiError(422, f"'{name}' must be between {minimum} and {maximum}.", param=name)
    return value


def _stops(value: Any, name: str = "stop") -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and len(value) <= 16:
        return tuple(value)
    raise ApiError(422, f"'{name}' must be a string or a list of at most 16 strings.", param=name)


@dataclass(frozen=True)
class Adapter:
    name: str
    softprompt: ActiveSoftPrompt
    source: str


class Service:
    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine = engine
        self.config = config
        self.adapters: dict[str, Adapter] = {}
        self.kobold_softprompt: str | None = None  # KoboldAI's "current soft prompt"
        self._lock = threading.Lock()
        self.model_id = engine.loaded.info.name
        if config.prompt_adapters and not config.enable_prompt_adapter:
            raise ServeConfigError("prompt_adapters are listed but enable_prompt_adapter is false.")
        for name, source in config.prompt_adapters.items():
            try:
                self.add_adapter(name, source)
            except ApiError as exc:
                raise ServeConfigError(f"prompt adapter '{name}': {exc.message}") from exc
        self.scheduler = BatchScheduler(engine, max_batch=config.max_batch)

    def close(self) -> None:
        self.scheduler.stop()

    # -- soft prompts as models --------------------------------------------------------------

    def _resolve(self, source: str) -> Path:
        path = Path(source).expanduser()
        if path.exists():
            return path
        from kobold_desktop.softprompt.library import SoftPromptLibrary

        try:
            return SoftPromptLibrary().find(source).path
        except KoboldError as exc:
            raise ApiError(404, str(exc), code="softprompt_not_found") from exc

    def add_adapter(self, name: str, source: str) -> Adapter:
        if not self.config.enable_prompt_adapter:
            raise ApiError(400, "soft prompts (prompt adapters) are disabled on this server.")
        if not name or name == self.model_id:
            raise ApiError(422, "a soft prompt needs a name other than the base model's.", param="name")
        try:
            softprompt = self.engine.prepare_softprompts([self._resolve(source)])
        except ApiError:
            raise
        except KoboldError as exc:
            raise ApiError(400, str(exc), param="path") from exc
        if softprompt.n_tokens > self.config.max_prompt_adapter_token:
            raise ApiError(400, f"{softprompt.n_tokens} tokens is more than max_prompt_adapter_token "
                                f"({self.config.max_prompt_adapter_token}).", param="path")
        with self._lock:
            if name not in self.adapters and len(self.adapters) >= self.config.max_prompt_adapters:
                raise ApiError(400, f"already serving max_prompt_adapters ({self.config.max_prompt_adapters}) soft "
                                    "prompts; unload one first.")
            adapter = Adapter(name, softprompt, source)
            self.adapters[name] = adapter
        return adapter

    def _model(self, name: Any) -> ActiveSoftPrompt | None:
        if name is None or name == self.model_id:
            return None
        if not isinstance(name, str):
            raise ApiError(422, "'model' must be a string.", param="model")
        with self._lock:
            adapter = self.adapters.get(name)
        if adapter is None:
            raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")
        return adapter.softprompt

    def models(self) -> dict[str, Any]:
        created = int(time.time())
        base = {"id": self.model_id, "object": "model", "created": created, "owned_by": "kobold-desktop",
                "root": self.model_id, "parent": None}
        with self._lock:
            adapters = list(self.adapters.values())
        return {"object": "list", "data": [base] + [
            {"id": a.name, "object": "model", "created": created, "owned_by": "kobold-desktop",
             "root": self.model_id, "parent": self.model_id, "softprompt_tokens": a.softprompt.n_tokens}
            for a in adapters]}

    def load_softprompt(self, body: dict) -> dict[str, Any]:
        name = _field(body, "name", str)
        path = _field(body, "path", str)
        if not name or not path:
            raise ApiError(422, "'name' and 'path' are required.", param="name" if not name else "path")
        adapter = self.add_adapter(name, path)
        return {"status": "loaded", "name": name, "softprompt_tokens": adapter.softprompt.n_tokens}

    def unload_softprompt(self, body: dict) -> dict[str, Any]:
        name = _field(body, "name", str)
        with self._lock:
            if name not in self.adapters:
                raise ApiError(404, f"no soft prompt named `{name}` is loaded.", param="name", code="model_not_found")
            del self.adapters[name]
        if self.kobold_softprompt == name:
            self.kobold_softprompt = None
        return {"status": "unloaded", "name": name}

    # -- generation ---------------------------------------------------------------------

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ApiError(422, "'prompt' must be a string, a list of strings, or a list of token ids.", param="prompt")

    def _check_length(self, ids: list[int], softprompt: ActiveSoftPrompt | None, max_tokens: int) -> None:
        context = self.engine.context_length
        n_soft = softprompt.n_tokens if softprompt else 0
        if len(ids) + n_soft + max_tokens > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                                f"{len(ids) + n_soft + max_tokens} tokens ({len(ids)} in the prompt, {n_soft} in the "
                                f"soft prompt, {max_tokens} for the completion).", param="prompt",
                           code="context_length_exceeded")

    def _settings(self, body: dict, max_tokens_field: str = "max_tokens", default_max: int = 16) -> SamplingSettings:
        try:
            return SamplingSettings(
                max_new_tokens=_field(body, max_tokens_field, int, default_max, minimum=1, maximum=1_000_000),
                temperature=_field(body, "temperature", float, 1.0, minimum=0, maximum=100),
                top_p=_field(body, "top_p", float, 1.0, minimum=0, maximum=1) or 1.0,
                top_k=max(0, _field(body, "top_k", int, 0, minimum=-1, maximum=1_000_000)),
                min_p=_field(body, "min_p", float, 0.0, minimum=0, maximum=0.999),
                typical_p=_field(body, "typical_p", float, 1.0, minimum=0.001, maximum=1) or 1.0,
                repetition_penalty=_field(body, "repetition_penalty", float, 1.0, minimum=0.01, maximum=100),
                seed=_field(body, "seed", int, None),
                stop=_stops(body.get("stop")),
            )
        except SettingsError as exc:
            raise ApiError(422, str(exc)) from exc

    def _submit(self, prompts: list[list[int]], softprompt, settings, n: int) -> list[RequestStream]:
        """Queue every request, or none: each is checked before the first joins the batch."""
        if any(not ids for ids in prompts) and softprompt is None:
            raise ApiError(400, "the prompt is empty, and this model adds no BOS token and has no soft prompt to "
                                "start from; send some text.", param="prompt")
        streams = []
        for ids in prompts:
            for copy in range(n):
                # n copies must differ: each gets its own seed derived from the request's.
                seeded = settings if settings.seed is None or copy == 0 else settings.with_changes(
                    seed=(settings.seed + copy) % SEED_LIMIT)
                try:
                    streams.append(self.scheduler.submit(ids, softprompt, seeded))
                except KoboldError as exc:
                    for stream in streams:
                        stream.cancel.set()
                    raise ApiError(400, str(exc)) from exc
        return streams

    @staticmethod
    def _finish(reason: str) -> str:
        return "length" if reason == "length" else "stop"

    def completions(self, body: dict) -> dict[str, Any] | Iterator[str]:
        softprompt = self._model(body.get("model"))
        prompt = body.get("prompt", "")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self._prompt_ids(p) for p in prompt]
        else:
            prompts = [self._prompt_ids(prompt)]
        settings = self._settings(body)
        n = _field(body, "n", int, 1, minimum=1, maximum=MAX_N)
        for ids in prompts:
            self._check_length(ids, softprompt, settings.max_new_tokens)
        streams = self._submit(prompts, softprompt, settings, n)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.get("model") or self.model_id}
        if _field(body, "stream", bool, False):
            return self._stream_completion(meta, streams)
        results = [s.result() for s in streams]
        return {**meta, "choices": [{"index": i, "text": r.text, "logprobs": None,
                                     "finish_reason": self._finish(r.finish_reason)} for i, r in enumerate(results)],
                "usage": self._usage(results)}

    @staticmethod
    def _usage(results: list[GenerationResult]) -> dict[str, int]:
        prompt = sum(r.prompt_tokens + r.softprompt_tokens for r in results)
        completion = sum(r.generated_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _stream_completion(self, meta: dict, streams: list[RequestStream]) -> Iterator[str]:
        def chunk(index: int, text: str, finish: str | None) -> str:
            return json.dumps({**meta, "choices": [{"index": index, "text": text, "logprobs": None,
                                                    "finish_reason": finish}]})

        return self._stream_events(streams, chunk)

    def _stream_events(self, streams: list[RequestStream], render) -> Iterator[str]:
        results = []
        try:
            for index, stream in enumerate(streams):
                for event in stream:
                    if isinstance(event, TextChunk):
                        yield render(index, event.text, None)
                    else:
                        results.append(event)
                        yield render(index, "", self._finish(event.finish_reason))
            yield "[DONE]"
        finally:  # the client went away: stop what is still running
            for stream in streams:
                stream.cancel.set()

    def chat_completions(self, body: dict) -> dict[str, Any] | Iterator[str]:
        softprompt = self._model(body.get("model"))
        tokenizer = self.engine.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions.")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(422, "'messages' must be a list of {role, content} objects.", param="messages")
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's fault
            raise ApiError(400, f"the chat template failed: {exc}", param="messages") from exc
        ids = self.engine.encode(text, add_special_tokens=False)
        settings = self._settings(body, "max_tokens" if "max_tokens" in body else "max_completion_tokens")
        n = _field(body, "n", int, 1, minimum=1, maximum=MAX_N)
        self._check_length(ids, softprompt, settings.max_new_tokens)
        streams = self._submit([ids], softprompt, settings, n)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": body.get("model") or self.model_id}
        if _field(body, "stream", bool, False):
            def chunk(index: int, text: str, finish: str | None) -> str:
                delta = {"content": text} if text else {}
                return json.dumps({**meta, "object": "chat.completion.chunk",
                                   "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})

            return self._stream_events(streams, chunk)
        results = [s.result() for s in streams]
        return {**meta, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": r.text},
             "finish_reason": self._finish(r.finish_reason)} for i, r in enumerate(results)],
            "usage": self._usage(results)}

    # -- KoboldAI-compatible routes ------------------------------------------------------------

    def kobold_model(self) -> dict[str, Any]:
        return {"result": self.model_id}

    def kobold_version(self) -> dict[str, Any]:
        return {"result": KOBOLD_API_VERSION}

    def kobold_extra_version(self) -> dict[str, Any]:
        return {"result": "Kobold Desktop", "version": __version__}

    def kobold_softprompts_list(self) -> dict[str, Any]:
        with self._lock:
            return {"values": [{"value": name} for name in self.adapters]}

    def kobold_get_softprompt(self) -> dict[str, Any]:
        return {"value": self.kobold_softprompt or ""}

    def kobold_put_softprompt(self, body: dict) -> dict[str, Any]:
        value = _field(body, "value", str, "")
        if value:
            self._model(value)  # 404 if unknown
        self.kobold_softprompt = value or None
        return {}

    @staticmethod
    def _kobold_seed(value: Any) -> Any:
        """KoboldAI clients send -1 (or any negative seed) for a random one."""
        return None if isinstance(value, int) and not isinstance(value, bool) and value < 0 else value

    def kobold_generate(self, body: dict) -> dict[str, Any]:
        prompt = _field(body, "prompt", str, "")
        name = _field(body, "soft_prompt", str, None) or self.kobold_softprompt
        softprompt = self._model(name) if name else None
        settings = self._settings({
            "max_tokens": body.get("max_length", 80), "temperature": body.get("temperature", 0.7),
            "top_p": body.get("top_p", 0.9), "top_k": body.get("top_k", 0),
            "repetition_penalty": body.get("rep_pen", 1.1), "seed": self._kobold_seed(body.get("sampler_seed")),
            "stop": body.get("stop_sequence"), "typical_p": body.get("typical", 1.0),
            "min_p": body.get("min_p", 0.0)})
        if "rep_pen_range" in body:
            settings = settings.with_changes(
                repetition_penalty_range=_field(body, "rep_pen_range", int, 1024, minimum=0, maximum=1_000_000))
        ids = self.engine.encode(prompt)
        limit = _field(body, "max_context_length", int, self.engine.context_length, minimum=1, maximum=10_000_000)
        limit = min(limit, self.engine.context_length) - (softprompt.n_tokens if softprompt else 0)
        room = limit - settings.max_new_tokens
        if room < 1:
            raise ApiError(400, "max_context_length leaves no room for the prompt after max_length and the soft prompt.")
        ids = ids[-room:]  # KoboldAI front ends send the whole story; keep its end
        result = self._submit([ids], softprompt, settings, 1)[0].result()
        return {"results": [{"text": result.text, "finish_reason": self._finish(result.finish_reason)}]}
