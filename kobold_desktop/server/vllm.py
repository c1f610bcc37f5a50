"""The server's generation on a vLLM server instead of the local model.

`VllmScheduler` has the `BatchScheduler`'s shape (`submit` returns a `RequestStream` of
text chunks and a result), so every route, key and CORS rule stays as it is. What runs
here: the soft prompt checks (against the embedding table read from the model's
safetensors), the rows `[soft prompt][tokens]`, and the mapping of our sampling to
vLLM's. vLLM does the batching (continuous, paged) across however many GPUs it has.
"""

from __future__ import annotations

import threading
import traceback
from typing import Sequence as Seq

from kobold_desktop.engine.active import Active, ActiveMixture
from kobold_desktop.engine.engine import Engine
from kobold_desktop.engine.errors import ModelError
from kobold_desktop.engine.sampling import SamplingSettings
from kobold_desktop.engine.remote.http import RemoteError
from kobold_desktop.engine.remote.vllm import VllmClient, sampling_fields
from kobold_desktop.engine.sequence import Continuation, FinishReason
from kobold_desktop.server.scheduler import RequestStream

MIXTURES_REFUSED = ("soft prompt mixtures cannot be served through vLLM: it takes one row of embeddings per "
                    "position, and a mixture runs each member side by side. Serve the members one by one, or "
                    "serve the mixture with the local backend.")


class VllmScheduler:
    """Requests sent to vLLM, each on its own thread while its events come back."""

    supports_mixtures = False
    supports_logprobs = False

    def __init__(self, engine: Engine, client: VllmClient):
        self.engine = engine
        self.client = client

    def submit(self, prompt_ids: Seq[int], softprompt: Active | None,
               settings: SamplingSettings, group: object = None, logprobs: int | None = None) -> RequestStream:
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
        events = self.client.complete(ids, embeds, fields)
        stream = RequestStream(threading.Event())
        loaded = self.engine.loaded
        # vLLM sends token ids; our own detokenizer and stop rules make the text, so it is
        # exactly what the local backend writes for the same tokens.
        text = Continuation(loaded.tokenizer, ids, n_soft, settings, loaded.eos_ids, stream.cancel)
        threading.Thread(target=self._pump, args=(events, stream, text), name="vllm-request", daemon=True).start()
        return stream

    def _pump(self, events, stream: RequestStream, text: Continuation) -> None:
        try:
            for event in events:
                choices = event.get("choices") or []
                if not choices:
                    continue  # the usage at the end
                choice = choices[0]
                token_ids = choice.get("token_ids")
                if token_ids is None:
                    raise RemoteError("vLLM sent no token ids; it needs to be 0.11 or later (return_token_ids).")
                for token in token_ids:
                    for chunk in text.feed(int(token)):
                        stream.put(chunk)
                    if text.finish_reason:
                        break
                if text.finish_reason:
                    break  # ours ended first (a stop sequence, cancel): vLLM sees us leave and stops
                if choice.get("finish_reason"):
                    for chunk in text.close(FinishReason.from_server(choice["finish_reason"])):
                        stream.put(chunk)
                    break
            for chunk in text.close("stop"):  # nothing when it closed above
                stream.put(chunk)
            stream.put(text.result())
        except RemoteError as exc:
            stream.put(exc)
        except Exception as exc:  # noqa: BLE001 - a reader must hear of any failure
            traceback.print_exc()
            stream.put(RemoteError(f"the request to vLLM failed: {exc}"))
        finally:
            events.close()

    def stop(self) -> None:
        """Nothing to stop here: requests in flight end when their clients go."""
