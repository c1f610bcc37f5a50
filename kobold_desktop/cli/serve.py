"""`kobold-desktop serve`: the OpenAI-, KoboldAI- and KoboldCpp-compatible server."""

from __future__ import annotations

import argparse
import shlex
import sys
from contextlib import contextmanager
from dataclasses import replace

from kobold_desktop.cli.common import (
    EXIT_OK,
    UsageError,
    load_options,
    model_flags,
    quiet_transformers,
    resolve_model,
    say_runs_on,
)


def cmd_serve(args: argparse.Namespace) -> int:
    from kobold_desktop.engine import Engine
    from kobold_desktop.server.config import ServeConfig, parse_adapter_args
    from kobold_desktop.server.service import Service

    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    config = config.merged(
        model=args.model, prompt_adapters=parse_adapter_args(args.prompt_adapters),
        max_prompt_adapter_token=args.max_prompt_adapter_token, max_prompt_adapters=args.max_prompt_adapters,
        host=args.host, port=args.port, api_key=args.api_key, admin_key=args.admin_key,
        allowed_origins=[o.rstrip("/") for o in args.allowed_origins] if args.allowed_origins else None,
        backend=args.backend, backend_url=args.backend_url, backend_api_key=args.backend_api_key,
        context_shift=args.context_shift,
    )
    quiet_transformers()
    model = resolve_model(config.model)
    if config.backend == "vllm":
        if config.context_shift:
            print("warning: --shift is for the local backend; vLLM keeps its own cache.", file=sys.stderr)
        with remote_backend(model, config, args) as (engine, scheduler):
            return serve(Service(engine, with_library(config, engine, args, mixtures=False), scheduler), config, args)
    engine = Engine()
    print(f"Loading {model} ...", file=sys.stderr)
    engine.load(model, load_options(args))
    engine.context_shift = config.context_shift
    refusal = engine.loaded.shift_refusal() if config.context_shift else None
    if refusal:
        print(f"warning: --shift is off: {refusal}; prompts past the context are trimmed exactly.", file=sys.stderr)
    return serve(Service(engine, with_library(config, engine, args)), config, args)


def with_library(config, engine, args: argparse.Namespace, mixtures: bool = True):
    """The library's soft prompts that fit the model beside those named by hand, unless
    --only-prompt-adapters (KoboldAI serves its softprompts folder)."""
    from kobold_desktop.server.library import library_adapters
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    if args.only_prompt_adapters or not config.enable_prompt_adapter:
        return config
    found = library_adapters(SoftPromptLibrary(), engine.hidden_size, engine.loaded.info.name,
                             config.max_prompt_adapter_token, set(config.prompt_adapters), mixtures)
    named = {str(p) for p in config.prompt_adapters.values()}
    return replace(config, library_adapters={name: path for name, path in found.items() if path not in named})


@contextmanager
def remote_backend(model: str, config, args: argparse.Namespace):
    """The engine (the model's tokenizer and input embeddings only) and the scheduler that
    sends generation to vLLM: the one at --backend-url, or one started here and stopped
    when we stop."""
    from kobold_desktop.engine import Engine
    from kobold_desktop.engine.remote.embeddings import load_embeddings_only
    from kobold_desktop.engine.remote.http import RemoteError
    from kobold_desktop.engine.remote.vllm import VllmClient, VllmProcess
    from kobold_desktop.server.vllm import VllmScheduler

    # The model folder first: a wrong one is said at once, not after vLLM's minute of start-up.
    print(f"Reading {model}'s tokenizer and input embeddings ...", file=sys.stderr)
    loaded = load_embeddings_only(model)
    process = None
    try:
        url = config.backend_url
        if not url:
            process = VllmProcess(model, args.vllm_python, shlex.split(args.vllm_args or ""))
            print(f"Starting vLLM: {shlex.join(process.args)}", file=sys.stderr, flush=True)
            process.start(progress=lambda message: print(message, file=sys.stderr, flush=True))
            url = process.url
        client = VllmClient(url, api_key=config.backend_api_key)
        try:
            served, limit = client.describe()
            if limit and limit < loaded.context_length:  # vLLM may serve a shorter context than the config's
                loaded.info = replace(loaded.info, context_length=limit)
            print(f"vLLM at {client.url} serves '{served}' (context {limit or '?'}).", file=sys.stderr)
        except RemoteError as exc:
            print(f"warning: {exc} Requests will answer 502 until it does.", file=sys.stderr)
        engine = Engine(loaded)
        yield engine, VllmScheduler(engine, client)
    finally:
        if process is not None:
            print("Stopping vLLM ...", file=sys.stderr)
            process.stop()


def serve(service, config, args: argparse.Namespace) -> int:
    from kobold_desktop.server.http import KoboldServer, warn_if_exposed

    try:
        server = KoboldServer(service, config.host, config.port, quiet=not args.verbose)
    except OSError as exc:
        service.close()
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from exc
    warn_if_exposed(config.host, config.api_key)
    names = ", ".join(service.adapters) or "none"
    backend = f" on vLLM at {service.scheduler.client.url}" if config.backend == "vllm" else ""
    print(f"Serving {service.model_id}{backend} (soft prompts: {names}) at {server.url}/v1 (OpenAI) and "
          f"{server.url}/api (KoboldAI); Ctrl+C stops.", file=sys.stderr, flush=True)
    say_runs_on(service.runs_on())
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return EXIT_OK


def add_parser(commands) -> None:
    """serve MODEL [--prompt-adapters NAME=PATH ...] ..."""
    v = commands.add_parser("serve", help="OpenAI- and KoboldAI-compatible server; each soft prompt is a model")
    v.add_argument("model", nargs="?", metavar="MODEL", help="model folder, GGUF file (llama.cpp) or Hugging Face id "
                   "(default: the config's, else the demo model)")
    v.add_argument("--prompt-adapters", nargs="+", metavar="NAME=PATH",
                   help="more soft prompts to serve as models: a zip, a PEFT folder or a library name each")
    v.add_argument("--only-prompt-adapters", action="store_true",
                   help="serve only the soft prompts named by --prompt-adapters (by default every soft prompt "
                        "and mixture in your library that fits the model is served too)")
    v.add_argument("--max-prompt-adapter-token", type=int, metavar="N", help="longest soft prompt allowed (512)")
    v.add_argument("--max-prompt-adapters", type=int, metavar="N", help="most soft prompts served at once (8)")
    v.add_argument("--host", metavar="HOST", help="address to listen on (127.0.0.1: this computer only)")
    v.add_argument("--port", type=int, metavar="PORT", help="port (2242)")
    v.add_argument("--config", metavar="YAML", help="read these settings from a YAML file")
    v.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route")
    v.add_argument("--admin-key", metavar="KEY", help="key for loading/unloading soft prompts (default: the API key)")
    v.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="web pages beyond localhost that may call the server, e.g. https://lite.koboldai.net")
    v.add_argument("--backend", choices=["local", "vllm"],
                   help="where the model runs: here (local, the default) or on a vLLM server (vllm)")
    v.add_argument("--backend-url", metavar="URL", help="the vLLM server's OpenAI address, e.g. "
                   "http://gpu-box:8000/v1; without it --backend vllm starts vLLM here")
    v.add_argument("--backend-api-key", metavar="KEY", help="the API key the vLLM server was started with")
    v.add_argument("--vllm-python", metavar="PYTHON", help="the Python that has vLLM installed, to start it "
                   "(default: this one, or the one behind the vllm command)")
    v.add_argument("--vllm-args", metavar="ARGS", help="more arguments for the vLLM started here, as one "
                   "string, e.g. \"--tensor-parallel-size 2 --max-model-len 8192\"")
    model_flags(v)
    shift = v.add_mutually_exclusive_group()
    shift.add_argument("--shift", dest="context_shift", action="store_const", const=True, default=None,
                       help="context shift: a prompt that dropped its oldest text reuses the cache by moving the "
                            "rest back (KoboldCpp's ContextShift; faster past the context, close to a fresh read "
                            "but not exact; RoPE models)")
    shift.add_argument("--noshift", dest="context_shift", action="store_const", const=False,
                       help="no context shift (the default): the model reads exactly the prompt it is sent")
    v.add_argument("--verbose", action="store_true", help="log every request on stderr")
    v.set_defaults(func=cmd_serve)
