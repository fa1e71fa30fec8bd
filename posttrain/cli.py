"""The ``posttrain`` command line.

Commands:
  posttrain run RECIPE.yaml [KEY.PATH=VALUE ...] [--only NAME,NAME] [--force]
  posttrain validate RECIPE.yaml [KEY.PATH=VALUE ...]
  posttrain keys [KIND]              document the recipe keys of every stage kind
  posttrain make-tiny-model OUT_DIR  build a test model + tokenizer (tiny, Qwen2-shaped, MoE; --tokenizer qwen2)
  posttrain preview RECIPE --stage NAME [--rows N] [--json]   the tokens a trainer stage trains on
Other commands (sandbox, annotate, eval, preview) are added by their modules below.
Errors in recipes print one line (file, key path, what was expected) and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from posttrain.core.errors import USER_ERRORS, ConfigError


def _cmd_run(a: argparse.Namespace) -> int:
    from posttrain.stages import load_recipe

    recipe = load_recipe(a.recipe, a.overrides)
    results = recipe.run(only=a.only, force=a.force)
    for name, m in results.items():
        print(f"{name:24s} {m['kind']:20s} {m['seconds']:8.1f}s  {os.path.join(recipe.output_dir, name)}")
    return 0


def _cmd_validate(a: argparse.Namespace) -> int:
    from posttrain.stages import load_recipe

    r = load_recipe(a.recipe, a.overrides)
    print(f"{a.recipe}: ok ({len(r.stages)} stages: {', '.join(s.name for s in r.stages)})")
    return 0


def _cmd_keys(a: argparse.Namespace) -> int:
    from posttrain.core.config import field_doc
    from posttrain.core.recipe import RecipeFile
    from posttrain.stages import STAGES

    kinds = [a.kind] if a.kind else ["<recipe>"] + sorted(STAGES)
    for kind in kinds:
        if kind == "<recipe>":
            cls = RecipeFile
        elif kind in STAGES:
            cls = STAGES[kind][0]
        else:
            raise ConfigError(f"unknown stage kind {kind!r} (expected one of: {', '.join(sorted(STAGES))})")
        print(f"## {kind}" + (f"  ({cls.__doc__.strip().splitlines()[0]})" if cls.__doc__ else ""))
        for name, tp, default, note in field_doc(cls, nested=True):
            print(f"  {name}: {tp}, default {default!r}" + (f"\n      {note}" if note else ""))
        print()
    return 0


def _cmd_tiny(a: argparse.Namespace) -> int:
    from posttrain.core.config import build
    from posttrain.core.tiny import TinySpec, make_tiny_model

    raw = {"num_hidden_layers": a.layers, "seed": a.seed, "tokenizer": a.tokenizer, "shape": a.shape, "moe": a.moe}
    if a.hidden_size is not None:
        raw["hidden_size"] = a.hidden_size
    spec = build(TinySpec, raw, "", "posttrain make-tiny-model")
    out = make_tiny_model(a.out_dir, spec)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    p = argparse.ArgumentParser(prog="posttrain", description="Qwen2 post-training pipeline toolkit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run a recipe (finished stages are skipped)")
    r.add_argument("recipe")
    r.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE")
    r.add_argument("--only", type=lambda v: [x for x in v.split(",") if x], metavar="NAME[,NAME...]",
                   help="run only these stages (comma-separated)")
    r.add_argument("--force", action="store_true", help="re-run stages even if complete")
    r.set_defaults(fn=_cmd_run)

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE")
    v.set_defaults(fn=_cmd_validate)

    k = sub.add_parser("keys", help="list the recipe keys of each stage kind")
    k.add_argument("kind", nargs="?")
    k.set_defaults(fn=_cmd_keys)

    t = sub.add_parser("make-tiny-model", help="build a test model (tiny, Qwen2-shaped or MoE) and tokenizer locally")
    t.add_argument("out_dir")
    t.add_argument("--tokenizer", choices=["tiny", "qwen2", "qwen2.5"], default="tiny",
                   help="tiny BPE trained here, or Qwen's real tokenizer with its published chat template")
    t.add_argument("--shape", choices=["tiny", "qwen2-0.5b"], default="tiny", help="tiny widths or Qwen2-0.5B's")
    t.add_argument("--moe", action="store_true", help="a Qwen2-MoE model")
    t.add_argument("--hidden-size", type=int, default=None)
    t.add_argument("--layers", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=_cmd_tiny)

    for add in _extra_commands():
        add(sub)
    return p


LONG_RUNNING = ("run", "annotate", "eval")  # commands that serve or call servers (see main)


def _extra_commands() -> list:
    """Subcommands that live next to their feature (each module exposes ``add_cli(sub)``)."""
    from data_synthesis import annotate as annotate_app
    from posttrain import preview
    from posttrain.evaluation import evaluate
    from reward import sandbox

    return [sandbox.add_cli, annotate_app.add_cli, evaluate.add_cli, preview.add_cli]


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point."""
    import signal

    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # KEY.PATH=VALUE overrides may stand anywhere after the recipe (also after --only/--force);
    # argparse cannot mix a trailing positional list with options, so they are pulled out first.
    cmd = next((x for x in argv if not x.startswith("-")), None)
    if hasattr(signal, "SIGPIPE") and cmd not in LONG_RUNNING:
        # `posttrain keys | head` should end quietly, like other CLIs. Not for commands that talk to
        # servers: under the default action a write into a socket a dead server reset kills the process
        # without a word, where ignoring it turns into an error that the sampler retries.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    overrides: list[str] = []
    if cmd in ("run", "validate", "preview"):
        at = argv.index(cmd)
        rest = argv[at + 1:]
        overrides = [x for x in rest[1:] if "=" in x and not x.startswith("-")]
        argv = argv[: at + 1] + [x for i, x in enumerate(rest) if i == 0 or x not in overrides]
    a = p.parse_args(argv)
    if cmd in ("run", "validate", "preview"):
        stray = getattr(a, "overrides", None) or []  # what argparse took as overrides lacks '='
        if stray:
            print(f"error: {a.recipe}: override {stray[0]!r}: expected KEY.PATH=VALUE (e.g. seed=1)", file=sys.stderr)
            return 2
        a.overrides = overrides
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return a.fn(a) or 0
    except USER_ERRORS as e:  # bad input of any kind: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
