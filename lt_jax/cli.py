"""`lt-jax`: one entry point, one subcommand per stage.

Each subcommand lives in the module that owns its stage and exposes two functions:
`add_arguments(parser, command)` and `run(args) -> int` (`args.command` names the subcommand, so
one module can serve several). This file only lists them, so adding a stage
never touches another stage's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, one-line help). Modules keep heavy imports (jax, torch) inside `run` so
# that `lt-jax --help` stays quick.
COMMANDS: list[tuple[str, str, str]] = [
    ("import-hf", "lt_jax.model.hf_cli", "Hugging Face folder -> Orbax checkpoint"),
    ("export-hf", "lt_jax.model.hf_cli", "Orbax checkpoint -> Hugging Face folder"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lt-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
