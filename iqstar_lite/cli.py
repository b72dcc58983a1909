"""``iqstar-lite COMMAND ...`` (also ``python -m iqstar_lite COMMAND ...``): the one console script.

    iqstar-lite ls                                    # shipped recipes and prompt sets
    iqstar-lite cp smollm2_cpu my.yaml                # a recipe to edit, then: iqstar-lite train my.yaml
    iqstar-lite train smollm2_cpu [key=value ...]     # train (+ export + check, the recipe's stages); --dry-run, --list
    iqstar-lite eval RUN_DIR --prompts FILE           # judge a run on prompts it never saw
    iqstar-lite export RUN_DIR | check RUN_DIR/onnx | chat RUN_DIR | curves RUN_DIR

Each command has ``--help``. The old form ``iqstar-lite NAME [key=value ...]`` (and ``python -m iqstar_lite.recipe NAME``)
is ``train``. Bad input: one line on stderr, exit code 2 (``errors.run_cli``).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from iqstar_lite.errors import UserError, run_cli

PROG = "iqstar-lite"


def _train(argv: list[str], prog: str) -> int:
    from iqstar_lite.recipe import main

    return main(argv, prog)


def _eval(argv: list[str], prog: str) -> int:
    from iqstar_lite.console import setup_logging
    from iqstar_lite.evaluation.eval_prompts import main

    setup_logging()
    return main(argv, prog)


def _export(argv: list[str], prog: str) -> int:
    from iqstar_lite.export.stage import main

    return main(argv, prog)


def _check(argv: list[str], prog: str) -> int:
    from iqstar_lite.export.check import main

    return main(argv, prog)


def _chat(argv: list[str], prog: str) -> int:
    from iqstar_lite.chat import main

    return main(argv, prog)


def _curves(argv: list[str], prog: str) -> int:
    from iqstar_lite.evaluation.curves import main

    return main(argv, prog)


def recipe_summary(name: str) -> str:
    """The first line of a shipped recipe's header comment, without its ``name:`` prefix."""
    from iqstar_lite.config import recipe_path

    for line in recipe_path(name).read_text().splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text.split(": ", 1)[1] if text.startswith(f"{name}:") else text
        if line.strip():
            break
    return ""


def _ls(argv: list[str], prog: str) -> int:
    import argparse

    argparse.ArgumentParser(
        prog=prog, description="List the shipped recipes (train, cp) and prompt sets (eval --prompts builtin:NAME)."
    ).parse_args(argv)
    from iqstar_lite.config import list_recipes
    from iqstar_lite.data.sources import builtin_sets

    names = list_recipes()
    width = max(len(n) for n in names)
    print("recipes (iqstar-lite train NAME; iqstar-lite cp NAME FILE.yaml to edit one):")
    for name in names:
        print(f"  {name:<{width}}  {recipe_summary(name)}")
    print("prompt sets (data.prompts=builtin:NAME, iqstar-lite eval --prompts builtin:NAME):")
    from collections import Counter

    from iqstar_lite.config import DataConfig
    from iqstar_lite.data.sources import load_examples

    set_width = max(len(n) for n in builtin_sets()) + len("builtin:")
    for name in builtin_sets():
        splits = Counter(ex.meta.get("split") or "-" for ex in load_examples(DataConfig(prompts=f"builtin:{name}"))[0])
        alias = "  (data.prompts=builtin)" if name == "builtin" else ""
        print(
            f"  {'builtin:' + name:<{set_width}}  {sum(splits.values())} prompts: "
            + ", ".join(f"{n} {s}" for s, n in sorted(splits.items()))
            + alias
        )
    return 0


def _cp(argv: list[str], prog: str) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog=prog,
        description="Copy a shipped recipe to a file of your own, to edit and train with "
        "'iqstar-lite train FILE.yaml'.",
    )
    ap.add_argument("recipe", help="a shipped recipe (iqstar-lite ls)")
    ap.add_argument("dest", help="a .yaml file, or a folder (the recipe keeps its name there)")
    ap.add_argument("--force", action="store_true", help="replace an existing file")
    args = ap.parse_args(argv)
    from iqstar_lite.config import RECIPES_DIR, list_recipes

    if args.recipe not in list_recipes():
        import difflib

        close = difflib.get_close_matches(args.recipe, list_recipes(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown recipe {args.recipe!r}{hint}; choose one of: {', '.join(list_recipes())}")
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / f"{args.recipe}.yaml"
    elif dest.suffix not in (".yaml", ".yml"):
        raise UserError(f"{args.dest!r} is not a .yaml file or an existing folder; name it e.g. {args.recipe}.yaml")
    if dest.exists() and not args.force:
        raise UserError(f"{str(dest)!r} already exists; choose another name, or pass --force to replace it")
    if not dest.parent.is_dir():
        raise UserError(f"folder {str(dest.parent)!r} does not exist; create it first or choose another destination")
    shutil.copyfile(RECIPES_DIR / f"{args.recipe}.yaml", dest)
    print(f"copied {args.recipe} to {dest}; edit it, then: {PROG} train {dest}")
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str], str], int], str]] = {
    "train": (
        _train,
        "train from a recipe (name or .yaml) with key=value overrides; also exports and checks per its stages",
    ),
    "eval": (_eval, "judge a run, an adapter or an untrained base on prompts of your own (JSON report)"),
    "export": (_export, "merge a run's adapter and export it (ONNX, int8, genai, GGUF)"),
    "check": (_check, "parity gate: exported models against the merged PyTorch model"),
    "chat": (_chat, "streaming chat: a run (PyTorch), its exports, or contrastive decoding with --principle"),
    "ls": (_ls, "list the shipped recipes and prompt sets"),
    "cp": (_cp, "copy a shipped recipe to a file to edit"),
    "curves": (_curves, "draw RUN_DIR/curves.png from a run's metrics"),
}


def usage() -> str:
    from iqstar_lite import __version__

    lines = [
        f"usage: {PROG} COMMAND [ARGS ...]     ({PROG} COMMAND --help for each)",
        "",
        f"Inverse-Q* alignment on a laptop (iqstar_lite {__version__}): a principle in, an aligned model out.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"The old form '{PROG} RECIPE [key=value ...]' is '{PROG} train RECIPE ...'."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from iqstar_lite import __version__

        print(f"iqstar_lite {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        run, _ = COMMANDS[command]
        return run(rest, f"{PROG} {command}")
    if command.startswith("-") or "=" in command or _is_recipe(command):  # the old form: train
        return _train(argv, PROG)
    import difflib

    close = difflib.get_close_matches(command, list(COMMANDS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    from iqstar_lite.config import list_recipes

    raise UserError(
        f"unknown command {command!r}{hint}; choose one of: {', '.join(COMMANDS)} "
        f"(or a recipe to train: {', '.join(list_recipes())})"
    )


def _is_recipe(name: str) -> bool:
    from iqstar_lite.config import list_recipes

    return name in list_recipes() or Path(name).suffix in (".yaml", ".yml")


def cli() -> None:
    """Console script ``iqstar-lite``."""
    run_cli(main)


if __name__ == "__main__":
    cli()
