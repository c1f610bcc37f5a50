"""`kobold-desktop serve`: the OpenAI-, KoboldAI- and KoboldCpp-compatible server."""

from __future__ import annotations

import argparse
import sys

from kobold_desktop.cli.common import (
    EXIT_OK,
    UsageError,
    load_options,
    model_flags,
    quiet_transformers,
    resolve_model,
)


def cmd_serve(args: argparse.Namespace) -> int:
    from kobold_desktop.engine import Engine
    from kobold_desktop.server.config import ServeConfig, parse_adapter_args
    from kobold_desktop.server.http import KoboldServer, warn_if_exposed
    from kobold_desktop.server.service import Service

    config = ServeConfig.from_yaml(args.config) if args.config else ServeConfig()
    config = config.merged(
        model=args.model, prompt_adapters=parse_adapter_args(args.prompt_adapters),
        max_prompt_adapter_token=args.max_prompt_adapter_token, max_prompt_adapters=args.max_prompt_adapters,
        host=args.host, port=args.port, api_key=args.api_key, admin_key=args.admin_key,
        allowed_origins=[o.rstrip("/") for o in args.allowed_origins] if args.allowed_origins else None,
    )
    quiet_transformers()
    engine = Engine()
    model = resolve_model(config.model)
    print(f"Loading {model} ...", file=sys.stderr)
    engine.load(model, load_options(args))
    service = Service(engine, config)
    try:
        server = KoboldServer(service, config.host, config.port, quiet=not args.verbose)
    except OSError as exc:
        service.close()
        raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from exc
    warn_if_exposed(config.host, config.api_key)
    names = ", ".join(service.adapters) or "none"
    print(f"Serving {service.model_id} (soft prompts: {names}) at {server.url}/v1 (OpenAI) and "
          f"{server.url}/api (KoboldAI); Ctrl+C stops.", file=sys.stderr, flush=True)
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
    v.add_argument("model", nargs="?", metavar="MODEL", help="model folder or Hugging Face id (default: the config's, "
                   "else the demo model)")
    v.add_argument("--prompt-adapters", nargs="+", metavar="NAME=PATH",
                   help="soft prompts to serve as models: a zip, a PEFT folder or a library name each")
    v.add_argument("--max-prompt-adapter-token", type=int, metavar="N", help="longest soft prompt allowed (512)")
    v.add_argument("--max-prompt-adapters", type=int, metavar="N", help="most soft prompts served at once (8)")
    v.add_argument("--host", metavar="HOST", help="address to listen on (127.0.0.1: this computer only)")
    v.add_argument("--port", type=int, metavar="PORT", help="port (2242)")
    v.add_argument("--config", metavar="YAML", help="read these settings from a YAML file")
    v.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on every route")
    v.add_argument("--admin-key", metavar="KEY", help="key for loading/unloading soft prompts (default: the API key)")
    v.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="web pages beyond localhost that may call the server, e.g. https://lite.koboldai.net")
    model_flags(v)
    v.add_argument("--verbose", action="store_true", help="log every request on stderr")
    v.set_defaults(func=cmd_serve)
