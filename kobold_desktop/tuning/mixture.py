"""Learning which soft prompts fit a text, and training several together (Qin & Eisner 2021).

The text is cut into blocks (the examples). Soft prompt k gives block b the probability
p_k(b); a mixture with weights w gives it sum_k w_k p_k(b), which is exactly what
generating in `bayes` mode computes token by token. EM fits the weights:

- E-step: each soft prompt's share of a block, r_bk = w_k p_k(b) / sum_j w_j p_j(b);
- M-step: each weight becomes its average share, w_k = mean_b r_bk.

`rank_softprompts` scores given soft prompts on the text, fits the weights on the
training part and reports every loss on the held-out part. `train_mixture` learns K
soft prompts and their weights together: between E-steps each soft prompt is trained on
the blocks weighted by its share, so each specialises on the part of the text it
explains best. Losses are mean cross-entropy per scored token, in nats; the first token
of a block is never scored (nothing but the soft prompt comes before it, and the loss
with no soft prompt must score the same tokens).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from kobold_desktop.tuning.data import Blocks
from kobold_desktop.tuning.trainer import (
    TuningConfig,
    TuningProgress,
    _autocast_for,
    _lr_at,
    _optimizer,
    initial_rows,
)

Progress = Callable[[float, str], None]  # (fraction done, what is happening)


def block_logliks(model: Any, rows: torch.Tensor | None, ids: torch.Tensor, autocast: Any = None) -> torch.Tensor:
    """log p(block) for each block of `ids` [B, L] with `rows` (or no soft prompt) before
    it: the sum over tokens 1..L-1. Differentiable in `rows`."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    ids = ids.to(device)
    with torch.no_grad():
        embeds = embed(ids)
    n_soft = 0
    if rows is not None:
        n_soft = rows.shape[0]
        embeds = torch.cat([rows.to(embeds.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1), embeds], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
    import contextlib

    with (autocast or contextlib.nullcontext)():
        logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
    # position n_soft + i - 1 predicts token i, for i = 1..L-1
    predicted = logits[:, n_soft : n_soft + ids.shape[1] - 1].float()
    logp = -torch.nn.functional.cross_entropy(predicted.transpose(1, 2), ids[:, 1:], reduction="none")
    return logp.sum(dim=1)


@torch.no_grad()
def score_blocks(model: Any, softprompts: Sequence[torch.Tensor | None], blocks: torch.Tensor, batch_size: int = 8,
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> torch.Tensor:
    """[n_blocks, K]: log p_k(block) for each soft prompt (None: no soft prompt)."""
    out = torch.zeros(blocks.shape[0], len(softprompts), dtype=torch.float64)
    steps = max(1, len(softprompts) * math.ceil(blocks.shape[0] / batch_size))
    done = 0
    for k, rows in enumerate(softprompts):
        for start in range(0, blocks.shape[0], batch_size):
            if cancel is not None and cancel.is_set():
                raise InterruptedError("cancelled")
            batch = blocks[start : start + batch_size]
            out[start : start + batch.shape[0], k] = block_logliks(model, rows, batch).double().cpu()
            done += 1
            if progress is not None:
                progress(done / steps, f"scoring {k + 1} of {len(softprompts)}")
    return out


def shares_of(log_weights: torch.Tensor, logliks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The E-step: each soft prompt's share of each block [B, K], and log p(block) under
    the mixture [B]."""
    joint = log_weights[None, :] + logliks.double()
    total = torch.logsumexp(joint, dim=1)
    return (joint - total[:, None]).exp(), total


def fit_weights(logliks: torch.Tensor, prior: Sequence[float] | None = None, iterations: int = 500,
                tolerance: float = 1e-10) -> torch.Tensor:
    """EM for the weights of a mixture over blocks: `logliks` [B, K] -> weights [K]."""
    n_blocks, k = logliks.shape
    log_w = (torch.tensor(prior, dtype=torch.float64) if prior is not None
             else torch.full((k,), 1.0 / k, dtype=torch.float64)).log()
    previous = -math.inf
    for _ in range(iterations):
        shares, total = shares_of(log_w, logliks)  # E-step
        log_w = shares.mean(dim=0).clamp_min(1e-300).log()  # M-step
        likelihood = float(total.sum())
        if likelihood - previous < tolerance * max(1.0, abs(likelihood)):
            break
        previous = likelihood
    return log_w.exp() / log_w.exp().sum()


def mixture_loss(logliks: torch.Tensor, weights: torch.Tensor | Sequence[float], tokens_per_block: int) -> float:
    """Mean cross-entropy per scored token of the mixture over whole blocks (nats)."""
    log_w = torch.as_tensor(weights, dtype=torch.float64).clamp_min(1e-300).log()
    total = torch.logsumexp(log_w[None, :] + logliks.double(), dim=1)
    return float(-total.mean() / tokens_per_block)


def single_losses(logliks: torch.Tensor, tokens_per_block: int) -> list[float]:
    return [float(v) for v in -logliks.double().mean(dim=0) / tokens_per_block]


@dataclass(frozen=True)
class RankedSoftPrompt:
    name: str
    path: Path
    loss: float  # held out, with this soft prompt alone
    weight: float  # in the fitted mixture


@dataclass(frozen=True)
class Ranking:
    none_loss: float
    softprompts: tuple[RankedSoftPrompt, ...]  # best (lowest loss) first
    mixture_loss: float
    train_blocks: int
    held_out_blocks: int
    block_len: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "none_loss": self.none_loss,
            "softprompts": [{"name": s.name, "path": str(s.path), "loss": s.loss, "weight": s.weight}
                            for s in self.softprompts],
            "mixture_loss": self.mixture_loss,
        }


def rank_softprompts(model: Any, blocks: Blocks, softprompts: Sequence[tuple[str, Path, torch.Tensor]],
                     batch_size: int = 8, progress: Progress | None = None,
                     cancel: threading.Event | None = None) -> Ranking:
    """Score each soft prompt (name, path, rows on the model's device) and no soft prompt
    on the held-out blocks, fit the mixture's weights on the training blocks."""
    was_training = model.training
    model.eval()
    try:
        tensors = [None] + [rows for _, _, rows in softprompts]
        n_train, n_held = blocks.train.shape[0], blocks.held_out.shape[0]
        both = torch.cat([blocks.train, blocks.held_out])
        scores = score_blocks(model, tensors, both, batch_size, progress, cancel)
    finally:
        model.train(was_training)
    tokens = both.shape[1] - 1
    train, held = scores[:n_train, 1:], scores[n_train:]
    weights = fit_weights(train)
    losses = single_losses(held, tokens)
    ranked = sorted(
        (RankedSoftPrompt(name, path, losses[k + 1], float(weights[k]))
         for k, (name, path, _) in enumerate(softprompts)),
        key=lambda s: s.loss)
    return Ranking(losses[0], tuple(ranked), mixture_loss(held[:, 1:], weights, tokens), n_train, n_held,
                   both.shape[1])


# -- training a mixture ------------------------------------------------------------------


@dataclass
class MixtureTrainingResult:
    tensors: list[torch.Tensor]  # K x [n_tokens, hidden], float32 on the CPU
    weights: list[float]
    steps_done: int
    cancelled: bool
    held_out_losses: list[float] | None  # each member alone
    mixture_held_out_loss: float | None
    baseline_held_out_loss: float | None
    shares: torch.Tensor  # [n_train_blocks, K]: each member's share of each training block


def train_mixture(model: Any, tokenizer: Any, blocks: Blocks, config: TuningConfig, k: int,
                  progress: Callable[[TuningProgress], None] | None = None,
                  cancel: threading.Event | None = None) -> MixtureTrainingResult:
    """Train `k` soft prompts and their weights together with EM on `blocks.train`.

    Member 0 starts as `config.init` says; the others start from sampled vocabulary rows
    with their own seeds (identical starts would never specialise). Every
    `config.eval_every` steps a full E-step recomputes each member's share of every
    training block and the weights; between, each optimizer step trains all members on a
    batch, each member's loss weighted by its shares (the M-step for the rows).
    """
    if k < 2:
        raise ValueError("a mixture needs at least 2 members")
    device = model.get_input_embeddings().weight.device
    was_training = model.training
    requires_grad = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    autocast = _autocast_for(model, config)
    try:
        starts = [initial_rows(model, tokenizer, config)] + [
            initial_rows(model, tokenizer, replace(config, init="vocab" if config.init != "random" else "random",
                                                   seed=config.seed + i)) for i in range(1, k)]
        rows = [torch.nn.Parameter(r.to(device)) for r in starts]
        optimizer = _optimizer(rows, config)
        generator = torch.Generator().manual_seed(config.seed)
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        tokens = blocks.train.shape[1] - 1
        tokens_per_step = config.batch_size * blocks.train.shape[1] * k

        def e_step() -> torch.Tensor:
            nonlocal weights
            scores = score_blocks(model, [r.detach() for r in rows], blocks.train, config.batch_size)
            shares, _ = shares_of(weights.log(), scores)
            weights = shares.mean(dim=0).clamp_min(1e-12)
            weights = weights / weights.sum()
            return shares

        shares = e_step()
        step, start, cancelled = 0, time.perf_counter(), False
        while step < config.steps:
            if cancel is not None and cancel.is_set():
                cancelled = True
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            optimizer.zero_grad(set_to_none=True)
            pick = torch.randint(0, blocks.train.shape[0], (config.batch_size,), generator=generator)
            batch, share = blocks.train[pick], shares[pick].to(device=device, dtype=torch.float32)
            loss = sum(-(share[:, i] * block_logliks(model, rows[i], batch, autocast)).sum() for i in range(k))
            loss = loss / (config.batch_size * tokens)
            loss.backward()
            optimizer.step()
            step += 1
            if step % config.eval_every == 0 and step < config.steps:
                shares = e_step()
            if progress is not None:
                elapsed = time.perf_counter() - start
                rate = step / elapsed if elapsed > 0 else 0.0
                progress(TuningProgress(step=step, total_steps=config.steps, loss=float(loss.detach()), held_out_loss=None,
                                        baseline_held_out_loss=None, tokens_per_second=rate * tokens_per_step,
                                        seconds_left=(config.steps - step) / rate if rate > 0 else float("inf")))
        shares = e_step()
        tensors = [r.detach().float().cpu().clone() for r in rows]
        member_losses = mix_loss = baseline = None
        if blocks.held_out.numel():
            held = score_blocks(model, [None] + [r.detach() for r in rows], blocks.held_out, config.batch_size)
            losses = single_losses(held, tokens)
            baseline, member_losses = losses[0], losses[1:]
            mix_loss = mixture_loss(held[:, 1:], weights, tokens)
        return MixtureTrainingResult(tensors, [float(w) for w in weights], step, cancelled, member_losses, mix_loss,
                                     baseline, shares)
    finally:
        for parameter, flag in zip(model.parameters(), requires_grad):
            parameter.requires_grad_(flag)
        model.train(was_training)
