"""The server's generation on a vLLM server instead of the local model.

`VllmScheduler` has the `BatchScheduler`'s shape (`submit` returns a `RequestStream` of
text chunks and a result), so every route, key and CORS rule stays as it is. What runs
here: the soft prompt checks (against the embedding table read from the model's
safetensors), the rows `[soft prompt][tokens]`, and the mapping of our sampling to
vLLM's. vLLM does the batching (continuous, paged) across however many GPUs it has.
"""

from __future__ import annotations

import threading
import time
import traceback
from typing import Sequence as Seq

from kobold_desktop.engine import ActiveMixture, Engine, ModelError, SamplingSettings
from kobold_desktop.engine.engine import Active
from kobold_desktop.engine.remote.http import RemoteError
from kobold_desktop.engine.remote.vllm import VllmClient, iter_text, sampling_fields
from kobold_desktop.engine.sequence import GenerationResult, TextChunk
from kobold_desktop.server.scheduler import RequestStream

MIXTURES_REFUSED = ("soft prompt mixtures cannot be served through vLLM: it takes one row of embeddings per "
                    "position, and a mixture runs each member side by side. Serve the members one by one, or "
                    "serve the mixture with the local backend.")


class VllmScheduler:
    """Requests sent to vLLM, each on its own thread while its events come back."""

    supports_mixtures = False
    # OpenAI requests carry no repetition-penalty range: vLLM's is the whole text.
    default_penalty_range = 0

    def __init__(self, engine: Engine, client: VllmClient):
        self.engine = engine
        self.client = client
        self.running = 0  # requests in flight, for tests and benchmarks
        self._lock = threading.Lock()

    def submit(self, prompt_ids: Seq[int], softprompt: Active | None,
               settings: SamplingSettings) -> RequestStream:
        """Send a request to vLLM; raises at once when it cannot run (a mixture, a setting
        vLLM lacks, vLLM unreachable or refusing it)."""
        if isinstance(softprompt, ActiveMixture):
            raise ModelError(MIXTURES_REFUSED)
        n_soft = softprompt.n_tokens if softprompt is not None else 0
        ids = list(prompt_ids)
        fields = sampling_fields(settings, n_soft + len(ids) + settings.max_new_tokens)
        embeds = None
        if softprompt is not None:
            embeds = self.engine.loaded.model.rows(ids, softprompt.tensor)
        started = time.monotonic()
        events = self.client.complete(ids, embeds, fields)
        stream = RequestStream(threading.Event())
        with self._lock:
            self.running += 1
        threading.Thread(target=self._pump, args=(events, stream, len(ids), n_soft, started),
                         name="vllm-request", daemon=True).start()
        return stream

    def _pump(self, events, stream: RequestStream, n_prompt: int, n_soft: int, started: float) -> None:
        text, finish, generated, first = [], None, 0, None
        try:
            for chunk, reason, usage in iter_text(events):
                if stream.cancel.is_set():
                    events.close()  # vLLM sees the client leave and stops the request
                    finish = "cancelled"
                    break
                if chunk:
                    first = first if first is not None else time.monotonic() - started
                    text.append(chunk)
                    stream.put(TextChunk(chunk))
                if reason:
                    finish = "length" if reason == "length" else "stop"
                if usage:
                    generated = int(usage.get("completion_tokens") or 0)
            stream.put(GenerationResult(
                text="".join(text), finish_reason=finish or "stop", prompt_tokens=n_prompt, softprompt_tokens=n_soft,
                generated_tokens=generated, seconds=time.monotonic() - started, first_token_seconds=first))
        except RemoteError as exc:
            stream.put(exc)
        except Exception as exc:  # noqa: BLE001 - a reader must hear of any failure
            traceback.print_exc()
            stream.put(RemoteError(f"the request to vLLM failed: {exc}"))
        finally:
            events.close()
            with self._lock:
                self.running -= 1

    def stop(self) -> None:
        """Nothing to stop here: requests in flight end when their clients go."""
