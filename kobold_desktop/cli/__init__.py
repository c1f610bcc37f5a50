"""The `kobold-desktop` command: one module per command, the flags they share in `common`.

Exit codes (DESIGN.md): 0 success; 2 bad arguments or rejected input, with a one-line
reason on stderr; 1 anything else. `--json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from kobold_desktop import __version__
from kobold_desktop.cli import generate, model, serve, softprompt, tune
from kobold_desktop.cli.common import (  # noqa: F401  (the names other modules and tests use)
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_REJECTED,
    UsageError,
    load_options,
    model_flags,
    print_json,
    quiet_transformers,
    resolve_model,
)
from kobold_desktop.errors import KoboldError
from kobold_desktop.softprompt.library import resolve_softprompt  # noqa: F401


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kobold-desktop",
        description="Write stories with a local language model steered by soft prompts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--model", metavar="PATH_OR_ID", help="the model to load in the window")
    parser.add_argument("--softprompt", metavar="NAME_OR_PATH", help="the soft prompt to load in the window")
    model_flags(parser)
    parser.add_argument("--screenshot", metavar="PNG", help="start the window, save it as PNG when ready, exit")
    parser.add_argument("--self-test", action="store_true",
                        help="check headless that the demo model, soft prompts and window code work; exit 0 if so")
    # One native check of --self-test, run in a child process so that a crash is reported.
    parser.add_argument("--self-test-check", metavar="NAME", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (generate, tune, serve, softprompt, model):
        command.add_parser(commands)
    return parser


def window_options(args: argparse.Namespace):
    """What `kobold-desktop [--model M] [--softprompt S] [--dtype T] ... [--screenshot PNG]`
    asks of the window."""
    from kobold_desktop.qt.window_state import WindowOptions

    screenshot = getattr(args, "screenshot", None)
    return WindowOptions(model=getattr(args, "model", None), softprompt=getattr(args, "softprompt", None),
                         load=load_options(args), screenshot=Path(screenshot) if screenshot else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.self_test or args.self_test_check:
        from kobold_desktop.selftest import run_native_check, run_self_test

        quiet_transformers()
        return run_native_check(args.self_test_check) if args.self_test_check else run_self_test()
    if args.command is None:
        from kobold_desktop.qt.app import run_window

        return run_window(window_options(args))
    json_mode = bool(getattr(args, "json", False))
    try:
        return args.func(args)
    except KoboldError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        if json_mode:
            print_json({"error": {"type": type(exc).__name__, "message": message}})
        return EXIT_REJECTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
