"""`lt-jax synthetic`: the synthetic arithmetic task's problems, held-out split and teacher responses
(see lt_jax.data.synthetic)."""

from __future__ import annotations

from typing import Any

import yaml

from lt_jax import config, storage
from lt_jax.data.synthetic import SyntheticConfig, write_problems, write_responses


def add_arguments(parser, command: str) -> None:
    parser.add_argument("--out", required=True, help="output folder (local or gs://)")
    parser.add_argument("--config", default=None, help="YAML file with SyntheticConfig fields")
    parser.add_argument("--no-responses", action="store_true", help="write only the problem files")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_problems=64 levels=[1,2]")


def run(args) -> int:
    cfg = config.load(SyntheticConfig, args.config, args.overrides)
    out = args.out
    storage.makedirs(out)
    n_train = write_problems(cfg, storage.join(out, "problems.jsonl"), "train")
    n_held = write_problems(cfg, storage.join(out, "heldout.jsonl"), "heldout")
    storage.write_text(storage.join(out, "synthetic.yaml"), _yaml(config.to_dict(cfg)))
    print(f"problems: {n_train} train -> {storage.join(out, 'problems.jsonl')}, {n_held} held-out -> {storage.join(out, 'heldout.jsonl')}")
    if not args.no_responses:
        n = write_responses(cfg, storage.join(out, "responses.jsonl"))
        print(f"responses: {n} -> {storage.join(out, 'responses.jsonl')}")
    return 0


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
