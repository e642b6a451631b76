"""`lt-jax train --config run.yaml [a.b=value ...]`: the command line of the training stage.

Parses the flags, joins a multi-host job, quiets the libraries, and hands the run config to
`lt_jax.train.trainer.train`. `python -m lt_jax.cli train ...` is the same as `lt-jax train ...`
(handy in launch scripts).
"""

from __future__ import annotations

import argparse
import logging

import jax
from absl import logging as absl_logging

from lt_jax.train import distributed
from lt_jax.train.config import load_run_config
from lt_jax.train.trainer import train


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", required=True, help="run YAML (see configs/); local or gs://")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 optim.lr=1e-5")
    parser.add_argument("--coordinator", default=None, help="multi-host: coordinator HOST:PORT (process 0's)")
    parser.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    parser.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    parser.add_argument("--accept-config-changes", action="store_true",
                        help="resume even though the config differs from the checkpoint's (the changes are printed)")


def run(args: argparse.Namespace) -> int:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    quiet_libraries()
    cfg = load_run_config(args.config, args.overrides)
    return train(cfg, accept_config_changes=getattr(args, "accept_config_changes", False))


def quiet_libraries() -> None:
    """INFO from our loggers on process 0 (WARNING elsewhere); the chatty libraries at WARNING."""
    level = logging.INFO if jax.process_index() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax", "grain", "etils", "fsspec", "gcsfs"):  # fsspec.caching: a line per read
        logging.getLogger(noisy).setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
