"""`lt-jax`: one entry point, one subcommand per stage.

Each subcommand has a thin CLI module in the stage that owns it (lt_jax/train/cli.py,
lt_jax/data/grade_cli.py, ...) with two functions: `add_arguments(parser, command)` and
`run(args) -> int` (`args.command` names the subcommand, so one module can serve several); it
parses and calls the stage's library. This file only lists them, so adding a stage never touches
another stage's code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module, one-line help). Only the module of the command being run is imported.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "lt_jax.pipeline", "every stage end to end on the embedded default (configs/tiny.yaml)"),
    ("import-hf", "lt_jax.model.hf_cli", "Hugging Face folder -> Orbax checkpoint"),
    ("export-hf", "lt_jax.model.hf_cli", "Orbax checkpoint -> Hugging Face folder"),
    ("tokenize", "lt_jax.data.tokenize_cli", "sft.jsonl -> token shards (TensorStore zarr3) + manifest, assistant-only loss mask"),
    ("serve", "lt_jax.sample.serve_cli", "OpenAI-compatible HTTP server over a teacher or a checkpoint"),
    ("sample", "lt_jax.sample.cli", "generate from a checkpoint or HF folder (KV-cache sampling on the mesh)"),
    ("distill", "lt_jax.data.distill_cli", "problems -> responses.jsonl from an OpenAI-compatible teacher (resumable)"),
    ("synthetic", "lt_jax.data.synthetic_cli", "the synthetic arithmetic long-thought task: problems, held-out split, teacher responses"),
    ("grade", "lt_jax.data.grade_cli", "responses.jsonl -> graded.jsonl + per-problem pass rate / CV (resumable)"),
    ("select", "lt_jax.data.select_cli", "graded.jsonl -> sft.jsonl: DeepDistill rules, length, dedup, decontamination, report"),
    ("perplexity", "lt_jax.data.perplexity_cli", "query+answer perplexity under a reference model on the mesh, for select's max_perplexity (resumable)"),
    ("eval", "lt_jax.eval.cli", "checkpoints or a served model x benchmarks -> pass@1/maj@k, judge evals, reports"),
    ("train", "lt_jax.train.cli", "SFT on packed token shards: resumable, multi-host, Orbax checkpoints (exit 42 = preempted)"),
    ("compile", "lt_jax.scale.cli", "ahead-of-time fit check: compile the train step / sampler for a TPU slice or GPU node, memory vs HBM"),
]


def build_parser(only: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and the sub-parsers: every command's, or only the one named `only`.

    The command list and its help come from COMMANDS alone; a stage module is imported only for
    the command that runs, so `lt-jax --help` and one command's `--help` don't pay for the others.
    """
    parser = argparse.ArgumentParser(prog="lt-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = {}
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module, command=name)
        if only is None or name == only:
            importlib.import_module(module).add_arguments(p, name)
        commands[name] = p
    return parser, commands


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    names = {name for name, _, _ in COMMANDS}
    if not argv or argv[0] not in names:
        build_parser(only="")[0].parse_args(argv)  # prints help or the error naming the unknown command
        return 2
    parser, commands = build_parser(only=argv[0])
    # Intermixed: `key=value` overrides may come before or after flags.
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if not _is_input_error(e):
            raise
        print(f"lt-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


def _is_input_error(e: BaseException) -> bool:
    """Bad input (our ValueError subclasses, missing files) prints one line; bugs keep their traceback."""
    if isinstance(e, (FileNotFoundError, FileExistsError)):
        return True
    return type(e) is not ValueError and type(e).__module__.startswith("lt_jax")


if __name__ == "__main__":
    sys.exit(main())
