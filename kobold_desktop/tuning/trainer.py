"""Prompt tuning: learn soft prompt rows while the model stays frozen.

Only the `[n_tokens, hidden]` rows are a trainable parameter; the model's weights get
no gradients and no optimizer state, so the memory on top of inference is the rows,
their two AdamW moments, and the activations of one batch. Runs are reproducible for a
seed, checkpointed, and resume exactly where a cancelled or crashed run stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kobold_desktop.engine.device import cuda_has_native_bf16
from kobold_desktop.errors import KoboldError
from kobold_desktop.fileio import atomic_write_bytes
from kobold_desktop.tuning.data import Blocks


class TuningError(KoboldError):
    """The tuning settings cannot work."""


@dataclass(frozen=True)
class TuningConfig:
    n_tokens: int = 20
    steps: int = 200
    lr: float = 0.03
    warmup_steps: int = 10
    batch_size: int = 4
    grad_accum: int = 1
    block_len: int = 128
    held_out_share: float = 0.08
    optimizer: str = "adamw"  # or "adafactor"
    init: str = "text"  # "text", "vocab" (sampled vocabulary rows) or "random"
    init_text: str = ""
    seed: int = 1234
    eval_every: int = 25
    checkpoint_every: int = 25
    gradient_checkpointing: bool = False
    mixed_precision: bool = True  # bfloat16/float16 autocast on a GPU; ignored on the CPU

    def __post_init__(self) -> None:
        checks = [
            (self.n_tokens >= 1, "the soft prompt needs at least 1 token"),
            (self.steps >= 1, "train for at least 1 step"),
            (self.lr > 0, "the learning rate must be above 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and accumulation must be at least 1"),
            (self.block_len >= 8, "blocks must be at least 8 tokens"),
            (0 <= self.held_out_share < 0.5, "the held-out share must be between 0 and 0.5"),
            (self.optimizer in ("adamw", "adafactor"), "the optimizer is adamw or adafactor"),
            (self.init in ("text", "vocab", "random"), "init is text, vocab or random"),
        ]
        for ok, message in checks:
            if not ok:
                raise TuningError(message + ".")


@dataclass(frozen=True)
class TuningProgress:
    step: int
    total_steps: int
    loss: float
    held_out_loss: float | None  # with the soft prompt, when just evaluated
    baseline_held_out_loss: float | None  # without any soft prompt
    tokens_per_second: float
    seconds_left: float


@dataclass
class TuningResult:
    tensor: torch.Tensor  # [n_tokens, hidden], float32, on the CPU
    steps_done: int
    cancelled: bool
    held_out_loss: float | None
    baseline_held_out_loss: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def _embed_matrix(model: Any) -> torch.Tensor:
    return model.get_input_embeddings().weight


def initial_rows(model: Any, tokenizer: Any, config: TuningConfig) -> torch.Tensor:
    """Starting rows: a text's token embeddings (repeated or cut to length), rows sampled
    from the vocabulary, or random values of the embeddings' scale."""
    weight = _embed_matrix(model).detach().float().cpu()
    generator = torch.Generator().manual_seed(config.seed)
    if config.init == "text":
        text = config.init_text or "Once upon a time"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise TuningError("the init text has no tokens.")
        ids = (ids * (config.n_tokens // len(ids) + 1))[: config.n_tokens]
        return weight[torch.tensor(ids)].clone()
    if config.init == "vocab":
        # Ordinary tokens, not the rare ones at the end of most BPE vocabularies.
        pool = min(weight.shape[0], 5000)
        ids = torch.randint(0, pool, (config.n_tokens,), generator=generator)
        return weight[ids].clone()
    return torch.randn(config.n_tokens, weight.shape[1], generator=generator) * weight.std()


def _batch_loss(model: Any, rows: torch.Tensor, ids: torch.Tensor, autocast: Any) -> torch.Tensor:
    """Mean next-token loss on `ids` with `rows` before them (None: no soft prompt)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    ids = ids.to(device)
    with torch.no_grad():
        embeds = embed(ids)
    labels = ids
    if rows is not None:
        prefix = rows.to(embeds.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)
        embeds = torch.cat([prefix, embeds], dim=1)
        # The block's first token has nothing before it without a soft prompt, so it is
        # never scored there; score the same tokens here, or the two losses differ in kind.
        ignore = torch.full((ids.shape[0], rows.shape[0] + 1), -100, dtype=torch.long, device=device)
        labels = torch.cat([ignore, ids[:, 1:]], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    with autocast():
        return model(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss


@torch.no_grad()
def held_out_loss(model: Any, rows: torch.Tensor | None, blocks: torch.Tensor, batch_size: int, autocast: Any) -> float:
    """Mean loss over the held-out blocks (weighted by block)."""
    total = 0.0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        total += _batch_loss(model, rows, batch, autocast).item() * batch.shape[0]
    return total / blocks.shape[0]


def _compute_dtype(model: Any, config: TuningConfig) -> tuple[torch.dtype, bool]:
    """The dtype the forward pass computes in, and whether that comes from autocast."""
    weight = _embed_matrix(model)
    if config.mixed_precision and weight.device.type == "cuda" and weight.dtype == torch.float32:
        return (torch.bfloat16 if cuda_has_native_bf16() else torch.float16), True
    return weight.dtype, False


def _autocast_for(model: Any, config: TuningConfig):
    dtype, autocast = _compute_dtype(model, config)
    if autocast:
        return lambda: torch.autocast("cuda", dtype=dtype)
    import contextlib

    return contextlib.nullcontext


def grad_scaler_for(model: Any, config: TuningConfig) -> torch.amp.GradScaler:
    """float16 gradients underflow without loss scaling; bfloat16 and float32 need none
    (the scaler is then a pass-through)."""
    dtype, _ = _compute_dtype(model, config)
    return torch.amp.GradScaler(_embed_matrix(model).device.type, enabled=dtype == torch.float16)


def _set_checkpointing(model: Any, on: bool) -> None:
    """Activation (gradient) checkpointing on or off, under either transformers name."""
    if on:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _optimizer(params: list[torch.nn.Parameter], config: TuningConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=config.lr, scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)


def _lr_at(step: int, config: TuningConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def run_key(model: Any, blocks: Blocks) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the training text (as token blocks)
    and the model (its config and a strided sample of its embedding weights, so another
    fine-tune of the same shape differs too)."""
    data = hashlib.blake2b(digest_size=16)
    for part in (blocks.train, blocks.held_out):
        data.update(str(tuple(part.shape)).encode())
        data.update(part.to(torch.int64).contiguous().numpy().tobytes())
    weights = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    weights.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    matrix = _embed_matrix(model).detach()
    weights.update(str(tuple(matrix.shape)).encode())
    sample = matrix.reshape(-1)[:: max(1, matrix.numel() // 65536)]
    weights.update(sample.to("cpu", torch.float32).numpy().tobytes())
    return {"data": data.hexdigest(), "model": weights.hexdigest()}


def _load_checkpoint(path: Path, config: TuningConfig, key: dict[str, str],
                     notice: Callable[[str], None]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the progress in it
        notice("The saved tuning progress could not be read; starting fresh.")
        return None
    if state.get("config") != asdict(config):
        notice("The saved tuning progress used other settings; starting fresh.")
        return None
    saved = state.get("key") or {}
    if saved.get("model") != key["model"]:
        notice("The saved tuning progress was made with another model; starting fresh.")
        return None
    if saved.get("data") != key["data"]:
        notice("The saved tuning progress was made on other text; starting fresh.")
        return None
    return state


def train_softprompt(
    model: Any,
    tokenizer: Any,
    blocks: Blocks,
    config: TuningConfig,
    progress: Callable[[TuningProgress], None] | None = None,
    cancel: threading.Event | None = None,
    checkpoint: Path | None = None,
    notice: Callable[[str], None] | None = None,
) -> TuningResult:
    """Train soft prompt rows on `blocks.train`; the model's weights never change.
    A `checkpoint` made with the same settings, text and model is resumed; another one
    is ignored, and `notice` says why."""
    device = _embed_matrix(model).device
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    if config.gradient_checkpointing:
        # transformers recomputes activations only in training mode, so this mode trains
        # with the model's dropout on (as PEFT's own training does).
        _set_checkpointing(model, True)
        model.train()
    else:
        model.eval()  # no dropout: exactly reproducible, and the model as it will be used
    autocast = _autocast_for(model, config)
    scaler = grad_scaler_for(model, config)
    try:
        rows = torch.nn.Parameter(initial_rows(model, tokenizer, config).to(device))
        optimizer = _optimizer([rows], config)
        generator = torch.Generator().manual_seed(config.seed)
        step, history = 0, []
        baseline = held_out_loss(model, None, blocks.held_out, config.batch_size, autocast) if blocks.held_out.numel() else None
        key = run_key(model, blocks)
        state = _load_checkpoint(checkpoint, config, key, notice or (lambda message: None)) if checkpoint else None
        if state is not None:
            with torch.no_grad():
                rows.copy_(state["rows"].to(device))
            optimizer.load_state_dict(state["optimizer"])
            if "scaler" in state:
                scaler.load_state_dict(state["scaler"])
            generator.set_state(state["generator"])
            step, history = int(state["step"]), list(state["history"])

        def save() -> None:
            if checkpoint is not None:
                _save_checkpoint(checkpoint, {
                    "config": asdict(config), "rows": rows.detach().cpu(), "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(), "step": step, "history": history,
                    "scaler": scaler.state_dict(), "key": key,
                })

        last_held = history[-1].get("held_out_loss") if history else None
        tokens_per_step = config.batch_size * config.grad_accum * blocks.train.shape[1]
        start, start_step = time.perf_counter(), step
        cancelled = False
        while step < config.steps:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                pick = torch.randint(0, blocks.train.shape[0], (config.batch_size,), generator=generator)
                loss = _batch_loss(model, rows, blocks.train[pick], autocast) / config.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.item()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            held = None
            if blocks.held_out.numel() and (step % config.eval_every == 0 or step == config.steps):
                held = held_out_loss(model, rows.detach(), blocks.held_out, config.batch_size, autocast)
                last_held = held
            record = {"step": step, "loss": loss_sum}
            if held is not None:
                record["held_out_loss"] = held
            history.append(record)
            if step % config.checkpoint_every == 0:
                save()
            if progress is not None:
                elapsed = time.perf_counter() - start
                rate = (step - start_step) / elapsed if elapsed > 0 else 0.0
                progress(TuningProgress(
                    step=step, total_steps=config.steps, loss=loss_sum, held_out_loss=held,
                    baseline_held_out_loss=baseline, tokens_per_second=rate * tokens_per_step,
                    seconds_left=(config.steps - step) / rate if rate > 0 else float("inf"),
                ))
        save()
        return TuningResult(rows.detach().float().cpu().clone(), step, cancelled, last_held, baseline, history)
    finally:
        if config.gradient_checkpointing:
            _set_checkpointing(model, False)
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
