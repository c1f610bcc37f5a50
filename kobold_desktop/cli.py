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


def _quiet_transformers() -> None:
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


def resolve_softprompt(name_or_path: str) -> Path:
    """A soft prompt given as a path (zip, PEFT folder, mkultra .json) or a library name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    from kobold_desktop.softprompt.library import SoftPromptLibrary

    return SoftPromptLibrary().find(name_or_path).path


def resolve_mixture(args: argparse.Namespace):
    """(mixture, member files) from --mixture FILE_OR_NAME or --mix SP=WEIGHT..., or None."""
    from kobold_desktop.softprompt.mixture import MixtureMember, read_mixture, resolve_members

    mode = getattr(args, "mix_mode", None)
    if getattr(args, "mixture", None):
        from kobold_desktop.softprompt.library import SoftPromptLibrary

        library = SoftPromptLibrary()
        path = Path(args.mixture).expanduser()
        if not path.is_file():
            entry = library.find(args.mixture)
            if entry.mixture is None:
                raise UsageError(f"--mixture {args.mixture}: that is a soft prompt, not a mixture file; "
                                 "use --softprompt, or --mix SP=WEIGHT.")
            path = entry.path
        mixture = read_mixture(path)
        if mode:
            from dataclasses import replace

            mixture = replace(mixture, mode=mode)
        return mixture, resolve_members(mixture, library.folders)
    if getattr(args, "mix", None):
        members = []
        for item in args.mix:
            name, sep, weight = item.rpartition("=")
            try:
                value = float(weight)
            except ValueError:
                value = None
            if not sep or not name or value is None:
                raise UsageError(f"--mix {item}: write it as SOFTPROMPT=WEIGHT, e.g. --mix Proverbs.zip=0.7.")
            members.append(MixtureMember(str(resolve_softprompt(name)), value))
        from kobold_desktop.softprompt.mixture import parse_mixture

        mixture = parse_mixture({"name": "command line", "mode": mode or "bayes",
                                 "members": [{"softprompt": m.softprompt, "weight": m.weight} for m in members]},
                                paths_allowed=True)
        return mixture, [Path(m.softprompt) for m in mixture.members]
    if mode:
        raise UsageError("--mix-mode goes with --mixture or --mix.")
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    from kobold_desktop.engine import Engine, SamplingSettings

    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {exc}") from exc
    else:
        prompt = args.prompt
    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty,
        repetition_penalty_range=args.repetition_penalty_range,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    if args.softprompt and (args.mixture or args.mix):
        raise UsageError("--softprompt concatenates soft prompts, --mixture and --mix mix them; use one or the other.")
    files = [resolve_softprompt(s) for s in args.softprompt or ()]
    from kobold_desktop.softprompt.mixture import is_mixture_file

    if any(is_mixture_file(f) for f in files):  # a mixture file given as --softprompt: use it as one
        if len(files) > 1:
            raise UsageError("a mixture file cannot be concatenated with other soft prompts; give it alone.")
        args.mixture, files = str(files[0]), []
    mixture = resolve_mixture(args)
    _quiet_transformers()
    engine = Engine()
    model = resolve_model(args.model)
    print(f"Loading {model} ...", file=sys.stderr)
    engine.load(model, load_options(args, trust_remote_code=args.trust_remote_code))
    active = None
    if mixture is not None:
        active = engine.set_mixture(*mixture)
        print(active.name + f" ({active.mode})", file=sys.stderr)
    elif files:
        active = engine.set_softprompts(files)
    for warning in active.warnings if active else ():
        print(f"warning: {warning}", file=sys.stderr)
    result = None
    for event in engine.stream(prompt, settings):
        if hasattr(event, "finish_reason"):
            result = event
        elif not args.json:
            sys.stdout.write(event.text)
            sys.stdout.flush()
    assert result is not None
    if args.json:
        data = result.to_dict()
        if result.mixture_weights is not None:
            data["mixture_weights"] = {name: round(w, 6) for name, w in
                                       zip(active.member_names, result.mixture_weights)}
        _print_json(data)
    else:
        sys.stdout.write("\n")
        print(
            f"[{result.finish_reason}: {result.generated_tokens} tokens in {result.seconds:.2f} s, "
            f"{result.tokens_per_second:.1f} tokens/s]",
            file=sys.stderr,
        )
    return EXIT_OK


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
    _quiet_transformers()
    engine = Engine()
    model = resolve_model(args.model)
    print(f"Loading {model} ...", file=sys.stderr)
    from kobold_desktop.engine.device import choose_device

    # Gradients want float32 on a CPU (bfloat16 there is for reading, not for learning);
    # GPUs tune float32 weights under autocast, or float16 weights with loss scaling.
    dtype = args.dtype or ("float32" if choose_device(args.device).type == "cpu" else None)
    loaded = engine.load(model, load_options(args, dtype=dtype))
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
    path = export_softprompt(result.tensor, out, meta, loaded.info.name, args.peft_out)
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
        export_softprompt(tensor, zip_path, meta, loaded.info.name)
    mixture = Mixture(name, "bayes", tuple(MixtureMember(z.name, round(w, 6)) for z, w in zip(zips, result.weights)))
    write_mixture(mixture_path, mixture)
    print(f"wrote {', '.join(str(z) for z in zips)} and {mixture_path}")
    if result.mixture_held_out_loss is not None:
        members = ", ".join(f"{w:.0%} {loss:.4f}" for w, loss in zip(result.weights, result.held_out_losses))
        print(f"held-out loss: mixture {result.mixture_held_out_loss:.4f}; members (weight, loss alone) {members}; "
              f"no soft prompt {result.baseline_held_out_loss:.4f}", file=sys.stderr)
    return EXIT_OK


def cmd_softprompt_blend(args: argparse.Namespace) -> int:
    from kobold_desktop.softprompt.blend import write_blend

    try:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(args.softprompts)
    except ValueError as exc:
        raise UsageError(f"--weights {args.weights}: write numbers separated by commas, e.g. 0.5,0.5.") from exc
    paths_ = [resolve_softprompt(s) for s in args.softprompts]
    out = write_blend(paths_, weights, Path(args.out), _limits(args), args.name)
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
    _quiet_transformers()
    engine = Engine()
    model = resolve_model(args.model)
    print(f"Loading {model} ...", file=sys.stderr)
    engine.load(model, load_options(args))
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
        _print_json(ranking.to_dict())
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
    _quiet_transformers()
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
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    g = commands.add_parser("generate", help="continue a prompt with the model")
    g.add_argument("--model", metavar="M", help="model folder or Hugging Face id (default: the demo model)")
    g.add_argument("--softprompt", action="append", metavar="PATH",
                   help="a soft prompt zip, PEFT folder or library name (repeatable: concatenated)")
    g.add_argument("--mixture", metavar="MIX.json", help="generate with a mixture file (a path or a library name)")
    g.add_argument("--mix", action="append", metavar="SP=WEIGHT",
                   help="a member of a mixture made here (repeatable), e.g. --mix Proverbs.zip=0.7")
    g.add_argument("--mix-mode", choices=["bayes", "fixed"],
                   help="bayes: the weights follow which soft prompt explains the text best (default); "
                        "fixed: the same weights at every token")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt, used verbatim")
    source.add_argument("--prompt-file", metavar="F", help="read the prompt from a UTF-8 file, verbatim")
    g.add_argument("--max-new-tokens", type=int, default=80, metavar="N")
    g.add_argument("--temperature", type=float, default=0.7, metavar="T", help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.9, metavar="P")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    g.add_argument("--min-p", type=float, default=0.0, metavar="P")
    g.add_argument("--typical-p", type=float, default=1.0, metavar="P")
    g.add_argument("--repetition-penalty", type=float, default=1.1, metavar="R")
    g.add_argument("--repetition-penalty-range", type=int, default=1024, metavar="N")
    g.add_argument("--seed", type=int, metavar="S")
    g.add_argument("--stop", action="append", metavar="STR", help="stop at this text (repeatable)")
    model_flags(g)
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model's own Python code to run (only for models you trust)")
    g.add_argument("--json", action="store_true", help="print one JSON object with the result")
    g.set_defaults(func=cmd_generate)

    t = commands.add_parser("tune", help="create a soft prompt from your own writing")
    t.add_argument("--model", metavar="M", help="model folder or Hugging Face id (default: the demo model)")
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

    p = sp_commands.add_parser("rank", help="score soft prompts on a text and learn a mixture's weights")
    p.add_argument("softprompts", nargs="+", metavar="SP", help="soft prompts (paths or library names)")
    p.add_argument("--model", metavar="M", help="model folder or Hugging Face id (default: the demo model)")
    p.add_argument("--data", required=True, metavar="PATH", help="a .txt file, a folder of .txt files, or a story")
    p.add_argument("--out", metavar="MIX.json", help="write the mixture with the learned weights")
    p.add_argument("--mode", choices=["bayes", "fixed"], default="bayes", help="the written mixture's mode")
    p.add_argument("--block-size", type=int, default=64, metavar="N", help="tokens per scored block (64)")
    p.add_argument("--held-out", type=float, default=0.25, metavar="SHARE",
                   help="share of blocks the losses are reported on; the rest fits the weights (0.25)")
    p.add_argument("--seed", type=int, default=1234, metavar="S")
    model_flags(p, gguf=False)
    common(p, json_flag=True)
    p.set_defaults(func=cmd_softprompt_rank)

    p = sp_commands.add_parser("blend", help="average same-length soft prompts into a new one")
    p.add_argument("softprompts", nargs="+", metavar="SP", help="soft prompts (paths or library names)")
    p.add_argument("--weights", metavar="W,W,...", help="one weight each (default: equal)")
    p.add_argument("--out", required=True, metavar="FILE.zip")
    p.add_argument("--name", metavar="NAME", help="the new soft prompt's name (default: the file name)")
    common(p)
    p.set_defaults(func=cmd_softprompt_blend)

    p = sp_commands.add_parser(
        "convert", help="KoboldAI zip <-> PEFT folder; mkultra .json -> zip (DST .zip = zip)"
    )
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    common(p)
    p.set_defaults(func=cmd_softprompt_convert)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.self_test:
        from kobold_desktop.selftest import run_self_test

        _quiet_transformers()
        return run_self_test()
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
