"""What every command shares: exit codes, errors, the flags declared once, and the
model and soft prompt resolution."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kobold_desktop.errors import KoboldError

EXIT_OK, EXIT_FAILURE, EXIT_REJECTED = 0, 1, 2


class UsageError(KoboldError):
    """Bad arguments."""


def say_runs_on(runs_on: dict[str, str]) -> None:
    """The device and precision chosen, with why (LoadedModel.runs_on), on stderr."""
    print(f"Running on {runs_on['device']} in {runs_on['precision']} ({runs_on['why']}).", file=sys.stderr, flush=True)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def limits(args: argparse.Namespace):
    from kobold_desktop.softprompt import Limits

    if args.token_limit < 1:
        raise UsageError("--token-limit must be at least 1.")
    return Limits(max_tokens=args.token_limit)


def library_of(args: argparse.Namespace):
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    dirs = [Path(d) for d in (args.dir or [])]
    for folder in dirs:
        if not folder.is_dir():
            raise UsageError(f"--dir {folder}: no such folder.")
    if dirs:
        return SoftPromptLibrary(dirs[0], dirs[1:], limits=limits(args))
    return SoftPromptLibrary(limits=limits(args))


def quiet_transformers() -> None:
    """Progress bars and advice from transformers are noise on a command line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_model(model: str | None) -> str:
    """The model to use: the one given, else the embedded demo model."""
    from kobold_desktop import paths

    if model:
        return model
    demo = paths.demo_model_dir()
    if (demo / "config.json").is_file():
        return str(demo)
    raise UsageError(
        "no --model given and the embedded demo model is not installed; pass --model with a "
        "model folder or a Hugging Face id."
    )


def model_argument(p: argparse.ArgumentParser, training: bool = False) -> None:
    p.add_argument("--model", metavar="M", help="model folder, GGUF file or Hugging Face id (default: the demo model)"
                   + ("; a GGUF's weights are dequantized by transformers for training (the `gguf` package, "
                      "in the [gguf] extra), once: they are kept in the cache for the next time"
                      if training else ""))


def json_flag(p: argparse.ArgumentParser, help: str = "print one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=help)


add_json_flag = json_flag


def model_flags(p: argparse.ArgumentParser, gguf: bool = True) -> None:
    """How a model is loaded: the flags every command that loads one shares."""
    p.add_argument("--device", metavar="D", help="cuda, cuda:1, mps or cpu (default: a GPU if there is one)")
    p.add_argument("--dtype", metavar="T",
                   help="float32, float16 or bfloat16 (default: bfloat16 where the GPU or CPU computes it "
                        "natively, else float16 on GPUs and float32 on CPUs)")
    if gguf:
        p.add_argument("--threads", type=int, metavar="N", help="GGUF models: CPU threads (default: the cores)")
        p.add_argument("--context-size", type=int, metavar="N",
                       help="GGUF models: tokens of context (default: the model's, at most 4096)")
        p.add_argument("--gpu-layers", type=int, metavar="N",
                       help="GGUF models: layers on the GPU, for llama.cpp built with CUDA or Metal "
                            "(default: all of them when it was, else 0)")


def load_options(args: argparse.Namespace, **overrides: Any) -> Any:
    from kobold_desktop.engine import LoadOptions

    values = dict(device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                  threads=getattr(args, "threads", None), context=getattr(args, "context_size", None),
                  gpu_layers=getattr(args, "gpu_layers", None))
    for name in ("threads", "context", "gpu_layers"):
        if values[name] is not None and values[name] < (0 if name == "gpu_layers" else 1):
            raise UsageError(f"--{name.replace('_', '-').replace('context', 'context-size')} must be "
                             f"{'0 or more' if name == 'gpu_layers' else 'at least 1'}.")
    values.update({k: v for k, v in overrides.items() if v is not None or k == "dtype"})
    return LoadOptions(**values)


def softprompt_flags(p: argparse.ArgumentParser, *, dirs: bool = False, json_flag: bool = False) -> None:
    """The flags of the softprompt commands: library folders, --json, --token-limit."""
    if dirs:
        p.add_argument(
            "--dir",
            action="append",
            metavar="DIR",
            help="a soft prompt folder (repeatable; the first receives imports). "
            "Default: your soft prompt folder and the bundled examples.",
        )
    if json_flag:
        add_json_flag(p)
    p.add_argument(
        "--token-limit",
        type=int,
        default=2048,
        metavar="N",
        help="refuse soft prompts with more tokens than this (default 2048)",
    )
