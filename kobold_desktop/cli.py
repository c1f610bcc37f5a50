"""The `kobold-desktop` command.

Exit codes (DESIGN.md): 0 success; 2 bad arguments or rejected input, with a one-line
reason on stderr; 1 anything else. `--json` prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from kobold_desktop import __version__
from kobold_desktop.errors import KoboldError

EXIT_OK, EXIT_FAILURE, EXIT_REJECTED = 0, 1, 2


class UsageError(KoboldError):
    """Bad arguments."""


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=1) + "\n")


def _limits(args: argparse.Namespace):
    from kobold_desktop.softprompt import Limits

    if args.token_limit < 1:
        raise UsageError("--token-limit must be at least 1.")
    return Limits(max_tokens=args.token_limit)


def _library(args: argparse.Namespace):
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    dirs = [Path(d) for d in (args.dir or [])]
    for folder in dirs:
        if not folder.is_dir():
            raise UsageError(f"--dir {folder}: no such folder.")
    if dirs:
        return SoftPromptLibrary(dirs[0], dirs[1:], limits=_limits(args))
    return SoftPromptLibrary(limits=_limits(args))


def cmd_softprompt_list(args: argparse.Namespace) -> int:
    library = _library(args)
    info = None
    if args.model:
        from kobold_desktop.engine.model_info import read_model_info

        info = read_model_info(args.model)
    entries = library.scan()
    rows = []
    for entry in entries:
        row = entry.to_dict()
        if info is not None:
            compat = entry.compatibility(info.hidden_size, info.name)
            row["compatible"] = compat.ok
            row["reason"] = compat.reason
            row["warnings"] = list(row.get("warnings", [])) + list(compat.warnings)
        rows.append(row)
    if args.json:
        _print_json(
            {
                "folders": [str(f) for f in library.folders],
                "model": None if info is None else {"name": info.name, "hidden_size": info.hidden_size},
                "softprompts": rows,
            }
        )
        return EXIT_OK
    print("Folders: " + ", ".join(str(f) for f in library.folders))
    if not rows:
        print("No soft prompts found.")
    for row in rows:
        if not row["valid"]:
            status = f"INVALID: {row['error']}"
        elif info is not None and not row["compatible"]:
            status = f"does not fit: {row['reason']}"
        else:
            status = f"{row['n_tokens']} tokens, hidden size {row['hidden_size']}, {row['format']}"
        print(f"{row['name']}  [{row['file']}]  {status}")
    return EXIT_OK


def cmd_softprompt_inspect(args: argparse.Namespace) -> int:
    from kobold_desktop.softprompt import load_softprompt, require_compatible

    softprompt, tensor = load_softprompt(Path(args.path), _limits(args))
    data = softprompt.to_dict()
    data["valid"] = True
    data["stats"] = {
        "mean": float(tensor.float().mean()),
        "std": float(tensor.float().std()) if tensor.numel() > 1 else 0.0,
        "min": float(tensor.float().min()),
        "max": float(tensor.float().max()),
    }
    if args.model:
        from kobold_desktop.engine.model_info import read_model_info

        info = read_model_info(args.model)
        data["warnings"] += list(require_compatible(softprompt, info.hidden_size, info.name))
        data["model"] = {"name": info.name, "hidden_size": info.hidden_size}
    if args.json:
        _print_json(data)
        return EXIT_OK
    print(f"Name:        {data['name']}")
    print(f"File:        {data['path']}")
    print(f"Format:      {data['format']} ({data['compression']})")
    print(f"Tokens:      {data['n_tokens']}")
    print(f"Hidden size: {data['hidden_size']}")
    print(f"Dtype:       {data['dtype']}")
    if data["authors"]:
        print(f"Author:      {', '.join(data['authors'])}")
    if data["supported"]:
        print(f"Made for:    {', '.join(data['supported'])}")
    if data["description"]:
        print(f"Description: {data['description']}")
    for warning in data["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_softprompt_import(args: argparse.Namespace) -> int:
    library = _library(args)
    imported, rejected = library.import_paths(Path(p) for p in args.paths)
    for entry in imported:
        print(f"imported {entry.name} -> {entry.path}")
    for error in rejected:
        print(f"rejected {error}", file=sys.stderr)
    return EXIT_REJECTED if rejected else EXIT_OK


def cmd_softprompt_convert(args: argparse.Namespace) -> int:
    from kobold_desktop.softprompt import convert

    result = convert(Path(args.src), Path(args.dst), _limits(args))
    print(f"wrote {result.format.value} {result.path} ({result.n_tokens} tokens, {result.dtype})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kobold-desktop",
        description="Write stories with a local language model steered by soft prompts.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    sp = commands.add_parser("softprompt", help="list, inspect, import and convert soft prompts")
    sp_commands = sp.add_subparsers(dest="sp_command", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser, *, dirs: bool = False, json_flag: bool = False) -> None:
        if dirs:
            p.add_argument(
                "--dir",
                action="append",
                metavar="DIR",
                help="a soft prompt folder (repeatable; the first receives imports). "
                "Default: your soft prompt folder and the bundled examples.",
            )
        if json_flag:
            p.add_argument("--json", action="store_true", help="print one JSON object")
        p.add_argument(
            "--token-limit",
            type=int,
            default=2048,
            metavar="N",
            help="refuse soft prompts with more tokens than this (default 2048)",
        )

    p = sp_commands.add_parser("list", help="list the soft prompts in the library folders")
    common(p, dirs=True, json_flag=True)
    p.add_argument("--model", metavar="M", help="mark which ones fit this model")
    p.set_defaults(func=cmd_softprompt_list)

    p = sp_commands.add_parser("inspect", help="validate one soft prompt fully and describe it")
    p.add_argument("path", metavar="PATH")
    common(p, json_flag=True)
    p.add_argument("--model", metavar="M", help="also check that it fits this model")
    p.set_defaults(func=cmd_softprompt_inspect)

    p = sp_commands.add_parser("import", help="validate and copy soft prompts into your folder")
    p.add_argument("paths", nargs="+", metavar="PATH")
    common(p, dirs=True)
    p.set_defaults(func=cmd_softprompt_import)

    p = sp_commands.add_parser(
        "convert", help="KoboldAI zip <-> PEFT folder; mkultra .json -> zip (DST .zip = zip)"
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    common(p)
    p.set_defaults(func=cmd_softprompt_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        from kobold_desktop.qt.app import run_window

        return run_window(args)
    json_mode = bool(getattr(args, "json", False))
    try:
        return args.func(args)
    except KoboldError as exc:
        message = " ".join(str(exc).split())
        print(f"error: {message}", file=sys.stderr)
        if json_mode:
            _print_json({"error": {"type": type(exc).__name__, "message": message}})
        return EXIT_REJECTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
