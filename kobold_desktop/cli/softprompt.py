"""`kobold-desktop softprompt list|inspect|import|convert|rank|blend`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobold_desktop.cli.common import (
    EXIT_OK,
    EXIT_REJECTED,
    UsageError,
    library_of,
    limits,
    load_options,
    model_argument,
    model_flags,
    print_json,
    quiet_transformers,
    resolve_model,
    softprompt_flags,
)
from kobold_desktop.softprompt.library import resolve_softprompt


def cmd_softprompt_list(args: argparse.Namespace) -> int:
    library = library_of(args)
    info = fingerprint = None
    if args.model:
        from kobold_desktop.engine.fingerprint import of_source
        from kobold_desktop.engine.model_info import read_model_info

        info = read_model_info(args.model)
        fingerprint = of_source(args.model, info)
    entries = library.scan()
    rows = []
    for entry in entries:
        row = entry.to_dict()
        if info is not None:
            compat = entry.compatibility(info.hidden_size, info.name, fingerprint)
            row["compatible"] = compat.ok
            row["reason"] = compat.reason
            row["warnings"] = list(row.get("warnings", [])) + list(compat.warnings)
        rows.append(row)
    if args.json:
        print_json(
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
    for row, entry in zip(rows, entries):
        if not row["valid"]:
            status = f"INVALID: {row['error']}"
        elif info is not None and not row["compatible"]:
            status = f"does not fit: {row['reason']}"
        elif entry.is_mixture:
            missing = [m["softprompt"] for m in row["members"] if not m["found"]]
            status = f"{entry.mixture.mode} {entry.mixture.label}" + (
                f"; missing: {', '.join(missing)}" if missing else "")
        else:
            status = f"{row['n_tokens']} tokens, hidden size {row['hidden_size']}, {row['format']}"
        print(f"{row['name']}  [{row['file']}]  {status}")
    return EXIT_OK


def cmd_softprompt_inspect(args: argparse.Namespace) -> int:
    from kobold_desktop.softprompt import load_softprompt, require_compatible

    softprompt, tensor = load_softprompt(Path(args.path), limits(args))
    data = softprompt.to_dict()
    data["valid"] = True
    data["stats"] = {
        "mean": float(tensor.float().mean()),
        "std": float(tensor.float().std()) if tensor.numel() > 1 else 0.0,
        "min": float(tensor.float().min()),
        "max": float(tensor.float().max()),
    }
    if args.model:
        from kobold_desktop.engine.fingerprint import of_source
        from kobold_desktop.engine.model_info import read_model_info

        info = read_model_info(args.model)
        data["warnings"] += list(require_compatible(softprompt, info.hidden_size, info.name,
                                                    of_source(args.model, info)))
        data["model"] = {"name": info.name, "hidden_size": info.hidden_size}
    if args.json:
        print_json(data)
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
    library = library_of(args)
    imported, rejected = library.import_paths(Path(p) for p in args.paths)
    for entry in imported:
        print(f"imported {entry.name} -> {entry.path}")
    for error in rejected:
        print(f"rejected {error}", file=sys.stderr)
    return EXIT_REJECTED if rejected else EXIT_OK


def cmd_softprompt_convert(args: argparse.Namespace) -> int:
    from kobold_desktop.softprompt import convert

    result = convert(Path(args.src), Path(args.dst), limits(args))
    print(f"wrote {result.format.value} {result.path} ({result.n_tokens} tokens, {result.dtype})")
    return EXIT_OK


def cmd_softprompt_blend(args: argparse.Namespace) -> int:
    from kobold_desktop.softprompt.blend import write_blend

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(args.softprompts)
    except ValueError as exc:
        raise UsageError(f"--weights {args.weights}: write numbers separated by commas, e.g. 0.5,0.5.") from exc
    paths_ = [resolve_softprompt(s) for s in args.softprompts]
    out = write_blend(paths_, weights, Path(args.out), limits(args), args.name)
    print(f"wrote {out}")
    return EXIT_OK


def cmd_softprompt_rank(args: argparse.Namespace) -> int:
    from kobold_desktop.engine import Engine
    from kobold_desktop.softprompt.library import SoftPromptLibrary
    from kobold_desktop.softprompt.mixture import Mixture, MixtureMember, write_mixture
    from kobold_desktop.tuning import make_blocks, read_training_text
    from kobold_desktop.tuning.mixture import rank_softprompts

    if len(args.softprompts) < 1:
        raise UsageError("give at least one soft prompt to rank.")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix.lower() != ".json":
        raise UsageError("--out writes a mixture file; give it a name ending in .json.")
    if out is not None and out.exists():
        raise UsageError(f"--out {out} already exists; choose another name.")
    if not 0 < args.held_out < 1:
        raise UsageError("--held-out is a share between 0 and 1, e.g. 0.25.")
    files = [resolve_softprompt(s) for s in args.softprompts]
    text = read_training_text(args.data)
    quiet_transformers()
    engine = Engine()
    model = resolve_model(args.model)
    print(f"Loading {model} ...", file=sys.stderr)
    engine.load(model, load_options(args), trainable=True,
                say=lambda message: print(message[0].upper() + message[1:], file=sys.stderr))
    engine.loaded.require_transformers("Ranking soft prompts")
    prepared = [engine.prepare_softprompts([f]) for f in files]
    loaded = engine.loaded
    blocks = make_blocks(text, loaded.tokenizer, args.block_size, args.held_out, args.seed)
    print(f"{blocks.train.shape[0]} blocks to fit the weights, {blocks.held_out.shape[0]} held out, "
          f"{args.block_size} tokens each", file=sys.stderr)
    with engine.lock:
        ranking = rank_softprompts(loaded.model, blocks, [(p.name, f, p.tensor) for p, f in zip(prepared, files)],
                                   progress=lambda done, what: sys.stderr.write(f"\r{what}: {done:.0%}   "))
    sys.stderr.write("\n")
    if out is not None:
        mixture = Mixture(out.stem, args.mode, tuple(MixtureMember(s.path.name, round(s.weight, 6))
                                                     for s in ranking.softprompts))
        write_mixture(out, mixture)
        folders = [out.resolve().parent] + [f.resolve() for f in SoftPromptLibrary().folders]
        for s in ranking.softprompts:
            if not any((folder / s.path.name).exists() for folder in folders):
                print(f"warning: {s.path.name} is neither beside {out.name} nor in your soft prompt folder; "
                      f"copy it there or the mixture cannot find it.", file=sys.stderr)
    if args.json:
        print_json(ranking.to_dict())
        return EXIT_OK
    width = max([len(s.name) for s in ranking.softprompts] + [len("mixture (learned weights)")]) + 2
    print(f"Held-out loss, nats per token (lower is better), on {blocks.held_out.shape[0]} blocks:")
    for i, s in enumerate(ranking.softprompts, 1):
        print(f"{i:3}. {s.name:<{width}} {s.loss:8.4f}   weight {s.weight:6.1%}")
    print(f"     {'no soft prompt':<{width}} {ranking.none_loss:8.4f}")
    print(f"     {'mixture (learned weights)':<{width}} {ranking.mixture_loss:8.4f}")
    if out is not None:
        print(f"wrote {out}")
    return EXIT_OK


def add_parser(commands) -> None:
    """softprompt ACTION ..."""
    sp = commands.add_parser("softprompt", help="list, inspect, import and convert soft prompts")
    sp_commands = sp.add_subparsers(dest="sp_command", metavar="ACTION", required=True)

    p = sp_commands.add_parser("list", help="list the soft prompts in the library folders")
    softprompt_flags(p, dirs=True, json_flag=True)
    p.add_argument("--model", metavar="M", help="mark which ones fit this model")
    p.set_defaults(func=cmd_softprompt_list)

    p = sp_commands.add_parser("inspect", help="validate one soft prompt fully and describe it")
    p.add_argument("path", metavar="PATH")
    softprompt_flags(p, json_flag=True)
    p.add_argument("--model", metavar="M", help="also check that it fits this model")
    p.set_defaults(func=cmd_softprompt_inspect)

    p = sp_commands.add_parser("import", help="validate and copy soft prompts into your folder")
    p.add_argument("paths", nargs="+", metavar="PATH")
    softprompt_flags(p, dirs=True)
    p.set_defaults(func=cmd_softprompt_import)

    p = sp_commands.add_parser("rank", help="score soft prompts on a text and learn a mixture's weights")
    p.add_argument("softprompts", nargs="+", metavar="SP", help="soft prompts (paths or library names)")
    model_argument(p, training=True)
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt file, a folder of .txt files, or a story")
    p.add_argument("--out", metavar="MIX.json", help="write the mixture with the learned weights")
    p.add_argument("--mode", choices=["bayes", "fixed"], default="bayes", help="the written mixture's mode")
    p.add_argument("--block-size", type=int, default=64, metavar="N", help="tokens per scored block (64)")
    p.add_argument("--held-out", type=float, default=0.25, metavar="SHARE",
                   help="share of blocks the losses are reported on; the rest fits the weights (0.25)")
    p.add_argument("--seed", type=int, default=1234, metavar="S")
    model_flags(p, gguf=False)
    softprompt_flags(p, json_flag=True)
    p.set_defaults(func=cmd_softprompt_rank)

    p = sp_commands.add_parser("blend", help="average same-length soft prompts into a new one")
    p.add_argument("softprompts", nargs="+", metavar="SP", help="soft prompts (paths or library names)")
    p.add_argument("--weights", metavar="W,W,...", help="one weight each (default: equal)")
    p.add_argument("--out", required=True, metavar="FILE.zip")
    p.add_argument("--name", metavar="NAME", help="the new soft prompt's name (default: the file name)")
    softprompt_flags(p)
    p.set_defaults(func=cmd_softprompt_blend)

    p = sp_commands.add_parser(
        "convert", help="KoboldAI zip <-> PEFT folder; mkultra .json -> zip (DST .zip = zip)"
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    softprompt_flags(p)
    p.set_defaults(func=cmd_softprompt_convert)
