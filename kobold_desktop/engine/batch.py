"""Generating several requests in one batched forward pass, each with its own soft prompt.

Every row is `[its soft prompt rows][its prompt tokens]`, left-padded to the longest;
the attention mask hides the padding and explicit position ids count each row from
its own start, so a row computes what it would alone. Each row keeps its own sampler,
seed, stop sequences and token budget; finished rows ride along until the batch ends.
PEFT cannot batch different prompt adapters; this is the point of the server.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from kobold_desktop.engine.generate import (
    Continuation,
    StreamEvent,
    _accepts_logits_to_keep,
    eos_token_ids,
)
from kobold_desktop.engine.sampling import SamplingSettings, build_processors, pick_next_token


@dataclass
class BatchRequest:
    prompt_ids: Sequence[int]
    softprompt: torch.Tensor | None  # [v, hidden] in the model's dtype, or None
    settings: SamplingSettings
    on_event: Callable[[StreamEvent], None]  # called on the batching thread
    cancel: threading.Event | None = None
    state: Continuation | None = field(default=None, repr=False)


def _accepts_position_ids(model: Any) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def generate_batch(model: Any, tokenizer: Any, requests: Sequence[BatchRequest]) -> None:
    """Run `requests` together until every one has finished, reporting through `on_event`."""
    embed = model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    eos = eos_token_ids(model, tokenizer)
    pad_id = next(iter(eos), 0) if eos else 0
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    use_positions = _accepts_position_ids(model)

    with torch.inference_mode():
        rows = []
        for request in requests:
            ids = torch.tensor(list(request.prompt_ids), dtype=torch.long, device=device)
            row = embed(ids)
            if request.softprompt is not None:
                row = torch.cat([request.softprompt.to(device=device, dtype=dtype), row])
            rows.append(row)
            n_soft = 0 if request.softprompt is None else int(request.softprompt.shape[0])
            request.state = Continuation(tokenizer, request.prompt_ids, n_soft, request.settings, eos, request.cancel)
        width = max(row.shape[0] for row in rows)
        batch = len(rows)
        embeds = torch.zeros(batch, width, embed.weight.shape[1], dtype=dtype, device=device)
        mask = torch.zeros(batch, width, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, width - row.shape[0]:] = row
            mask[i, width - row.shape[0]:] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        kwargs = {"position_ids": positions} if use_positions else {}
        out = model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, **kwargs, **extra)

        histories = [torch.tensor([list(r.prompt_ids)], dtype=torch.long, device=device) for r in requests]
        processors = [build_processors(r.settings) for r in requests]
        generators = [torch.Generator().manual_seed(r.settings.seed) if r.settings.seed is not None else None
                      for r in requests]
        active = [True] * batch
        for i, request in enumerate(requests):
            if request.state.cancelled():
                _finish(request, "cancelled")
                active[i] = False
        while any(active):
            logits = out.logits[:, -1, :]
            next_tokens = []
            for i, request in enumerate(requests):
                if not active[i]:
                    next_tokens.append(pad_id)
                    continue
                token = pick_next_token(histories[i], logits[i : i + 1], processors[i],
                                        request.settings.greedy, generators[i])
                histories[i] = torch.cat([histories[i], token[:, None]], dim=1)
                for chunk in request.state.feed(int(token[0])):
                    request.on_event(chunk)
                if request.state.finish_reason is not None:
                    _finish(request)
                    active[i] = False
                next_tokens.append(int(token[0]))
            if not any(active):
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
            kwargs = {"position_ids": positions} if use_positions else {}
            out = model(input_ids=torch.tensor(next_tokens, device=device)[:, None], attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True, **kwargs, **extra)


def _finish(request: BatchRequest, reason: str | None = None) -> None:
    for chunk in request.state.close(reason):
        request.on_event(chunk)
    request.on_event(request.state.result())
