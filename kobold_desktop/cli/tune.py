"""`kobold-desktop tune`: create a soft prompt (or a mixture of K) from your own writing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobold_desktop.cli.common import (
    EXIT_OK,
    UsageError,
    load_options,
    model_argument,
    model_flags,
    quiet_transformers,
    resolve_model,
)


def _progress_line(p) -> str:
    width = 30
    done = int(width * p.step / p.total_steps)
    held = f" held-out {p.held_out_loss:.3f}" if p.held_out_loss is not None else ""
    left = f"{p.seconds_left:4.0f}s left" if p.seconds_left != float("inf") else ""
    return (f"\r[{'#' * done}{'.' * (width - done)}] {p.step}/{p.total_steps} loss {p.loss:.3f}{held} "
            f"{p.tokens_per_second:,.0f} tok/s {left}   ")


def cmd_tune(args: argparse.Namespace) -> int:
    from kobold_desktop import paths
    from kobold_desktop.engine import Engine
    from kobold_desktop.softprompt import Metadata
    from kobold_desktop.tuning import TuningConfig, make_blocks, read_training_text, train_softprompt
    from kobold_desktop.tuning.export import export_softprompt, output_path

    config = TuningConfig(
        n_tokens=args.tokens, steps=args.steps, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
        block_len=args.block_size, held_out_share=args.held_out, optimizer=args.optimizer,
        init=args.init or ("text" if args.init_text else "vocab"), init_text=args.init_text or "", seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    out = output_path(args.out)
    if args.mixture is not None:
        if args.mixture < 2:
            raise UsageError("--mixture K trains K soft prompts together; K is at least 2.")
        if args.peft_out:
            raise UsageError("--peft-out writes one adapter; with --mixture convert the member zips afterwards.")
        targets = mixture_outputs(out, args.mixture)
    else:
        targets = [out]
    for target in targets:
        if target.exists():
            raise UsageError(f"--out: {target} already exists; choose another name.")
    text = read_training_text(args.data)
    quiet_transformers()
    engine = Engine()
    model = resolve_model(args.model)
    print(f"Loading {model} ...", file=sys.stderr)
    from kobold_desktop.engine.device import choose_device, training_dtype

    dtype = training_dtype(choose_device(args.device), args.dtype)
    loaded = engine.load(model, load_options(args, dtype=dtype), trainable=True,
                         say=lambda message: print(message[0].upper() + message[1:], file=sys.stderr))
    loaded.require_transformers("Tuning")
    blocks = make_blocks(text, loaded.tokenizer, config.block_len, config.held_out_share, config.seed)
    print(f"{blocks.train.shape[0]} training blocks, {blocks.held_out.shape[0]} held out, "
          f"{config.block_len} tokens each", file=sys.stderr)
    if args.mixture is not None:
        return _tune_mixture(args, engine, loaded, blocks, config, targets)
    checkpoint = paths.user_cache_dir() / "tuning" / (out.stem + ".ckpt")
    with engine.lock:
        result = train_softprompt(loaded.model, loaded.tokenizer, blocks, config,
                                  progress=lambda p: sys.stderr.write(_progress_line(p)), checkpoint=checkpoint,
                                  notice=lambda message: print(message, file=sys.stderr))
    sys.stderr.write("\n")
    meta = Metadata(name=args.name or out.stem, authors=tuple(args.author or ()), description=args.description or "")
    path = export_softprompt(result.tensor, out, meta, loaded.info.name, args.peft_out, loaded.fingerprint)
    checkpoint.unlink(missing_ok=True)
    print(f"wrote {path}" + (f" and {args.peft_out}" if args.peft_out else ""))
    if result.held_out_loss is not None and result.baseline_held_out_loss is not None:
        change = (result.held_out_loss / result.baseline_held_out_loss - 1) * 100
        print(f"held-out loss: {result.held_out_loss:.4f} with the soft prompt, "
              f"{result.baseline_held_out_loss:.4f} without ({change:+.1f}%)", file=sys.stderr)
    return EXIT_OK


def mixture_outputs(out: Path, k: int) -> list[Path]:
    """`Style.zip` with --mixture 3 -> Style-1.zip, Style-2.zip, Style-3.zip, then Style.json."""
    return [out.with_name(f"{out.stem}-{i}.zip") for i in range(1, k + 1)] + [out.with_suffix(".json")]


def _tune_mixture(args: argparse.Namespace, engine, loaded, blocks, config, targets: list[Path]) -> int:
    from kobold_desktop.softprompt import Metadata
    from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture
    from kobold_desktop.tuning.export import export_softprompt
    from kobold_desktop.tuning.mixture import train_mixture

    with engine.lock:
        result = train_mixture(loaded.model, loaded.tokenizer, blocks, config, args.mixture,
                               progress=lambda p: sys.stderr.write(_progress_line(p)))
    sys.stderr.write("\n")
    *zips, mixture_path = targets
    name = args.name or mixture_path.stem
    for i, (tensor, zip_path) in enumerate(zip(result.tensors, zips), 1):
        meta = Metadata(name=f"{name} {i}", authors=tuple(args.author or ()),
                        description=(args.description or f"Member {i} of the mixture '{name}'."))
        export_softprompt(tensor, zip_path, meta, loaded.info.name, fingerprint=loaded.fingerprint)
    mixture = Mixture(name, "bayes", tuple(MixtureMember(z.name, round(w, 6)) for z, w in zip(zips, result.weights)))
    write_mixture(mixture_path, mixture)
    print(f"wrote {', '.join(str(z) for z in zips)} and {mixture_path}")
    if result.mixture_held_out_loss is not None:
        members = ", ".join(f"{w:.0%} {loss:.4f}" for w, loss in zip(result.weights, result.held_out_losses))
        print(f"held-out loss: mixture {result.mixture_held_out_loss:.4f}; members (weight, loss alone) {members}; "
              f"no soft prompt {result.baseline_held_out_loss:.4f}", file=sys.stderr)
    return EXIT_OK


def add_parser(commands) -> None:
    """tune --model M --data PATH --out FILE.zip ..."""
    t = commands.add_parser("tune", help="create a soft prompt from your own writing")
    model_argument(t, training=True)
    t.add_argument("--data", required=True, metavar="PATH", help="a .txt file, a folder of .txt files, or a story")
    t.add_argument("--out", required=True, metavar="FILE.zip",
                   help="the soft prompt to write; a bare name goes into your soft prompt folder")
    t.add_argument("--peft-out", metavar="DIR", help="also write a PEFT prompt-tuning adapter folder")
    t.add_argument("--mixture", type=int, metavar="K",
                   help="train K soft prompts and their weights together (EM): writes OUT-1.zip ... OUT-K.zip "
                        "and the mixture OUT.json")
    t.add_argument("--tokens", type=int, default=20, metavar="N", help="virtual tokens (default 20)")
    t.add_argument("--steps", type=int, default=200, metavar="N")
    t.add_argument("--lr", type=float, default=0.03, metavar="X", help="learning rate (default 0.03)")
    t.add_argument("--batch-size", type=int, default=4, metavar="N")
    t.add_argument("--grad-accum", type=int, default=1, metavar="N")
    t.add_argument("--block-size", type=int, default=128, metavar="N", help="tokens per training block")
    t.add_argument("--held-out", type=float, default=0.08, metavar="SHARE", help="share kept for evaluation")
    t.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw")
    t.add_argument("--init", choices=["text", "vocab", "random"], help="how the rows start (default: text "
                   "when --init-text is given, else sampled vocabulary rows)")
    t.add_argument("--init-text", metavar="TEXT", help="start from this text's token embeddings")
    t.add_argument("--seed", type=int, default=1234, metavar="S")
    t.add_argument("--gradient-checkpointing", action="store_true", help="less memory, more time")
    t.add_argument("--name", metavar="NAME")
    t.add_argument("--author", action="append", metavar="NAME")
    t.add_argument("--description", metavar="TEXT")
    model_flags(t, gguf=False)
    t.set_defaults(func=cmd_tune)
