"""`kobold-desktop generate`: continue a prompt, with soft prompts or a mixture."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kobold_desktop.cli.common import (
    EXIT_OK,
    UsageError,
    json_flag,
    load_options,
    model_argument,
    model_flags,
    print_json,
    say_runs_on,
    quiet_transformers,
    resolve_model,
)
from kobold_desktop.softprompt.library import resolve_softprompt


def resolve_mixture(args: argparse.Namespace):
    """The mixture of --mixture FILE_OR_NAME (its mode changed by --mix-mode) or of
    --mix SP=WEIGHT..., or None. Its members are found when it is prepared
    (`engine.active.prepare`), beside its file or in the library."""
    from kobold_desktop.softprompt.mixture import MixtureMember, read_mixture

    mode = getattr(args, "mix_mode", None)
    if getattr(args, "mixture", None):
        from kobold_desktop.softprompt.library import SoftPromptLibrary

        from kobold_desktop.softprompt.mixture import is_mixture_file

        library = SoftPromptLibrary()
        path = library.resolve(args.mixture)
        if not is_mixture_file(path):
            raise UsageError(f"--mixture {args.mixture}: that is a soft prompt, not a mixture file; "
                             "use --softprompt, or --mix SP=WEIGHT.")
        mixture = read_mixture(path)
        if mode:
            from dataclasses import replace

            mixture = replace(mixture, mode=mode)
        return mixture
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

        return parse_mixture({"name": "command line", "mode": mode or "bayes",
                              "members": [{"softprompt": m.softprompt, "weight": m.weight} for m in members]},
                             paths_allowed=True)
    if mode:
        raise UsageError("--mix-mode goes with --mixture or --mix.")
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    from kobold_desktop.engine import ActiveMixture, Engine, SamplingSettings

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
    # Names are looked up before the model loads (a typo fails at once); a mixture file
    # given as --softprompt is used as one (`engine.active.prepare`).
    files = [resolve_softprompt(s) for s in args.softprompt or ()]
    mixture = resolve_mixture(args)
    quiet_transformers()
    engine = Engine()
    model = resolve_model(args.model)
    print(f"Loading {model} ...", file=sys.stderr)
    engine.load(model, load_options(args, trust_remote_code=args.trust_remote_code))
    runs_on = engine.loaded.runs_on()
    say_runs_on(runs_on)
    active = engine.set_softprompt(mixture if mixture is not None else files)
    if isinstance(active, ActiveMixture):
        print(active.name + f" ({active.mode})", file=sys.stderr)
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
        data["runs_on"] = runs_on
        if result.mixture_weights is not None:
            data["mixture_weights"] = {name: round(w, 6) for name, w in
                                       zip(active.member_names, result.mixture_weights)}
        print_json(data)
    else:
        sys.stdout.write("\n")
        print(
            f"[{result.finish_reason}: {result.generated_tokens} tokens in {result.seconds:.2f} s, "
            f"{result.tokens_per_second:.1f} tokens/s]",
            file=sys.stderr,
        )
    return EXIT_OK


def add_parser(commands) -> None:
    """generate --model M [--softprompt SP]... --prompt TEXT ..."""
    g = commands.add_parser("generate", help="continue a prompt with the model")
    model_argument(g)
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
    json_flag(g, "print one JSON object with the result")
    g.set_defaults(func=cmd_generate)
