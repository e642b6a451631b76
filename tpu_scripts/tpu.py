#!/usr/bin/env python3
"""TPU VMs and queued resources for lt_jax: create, set up, launch `lt-jax train`, logs, stop, delete.

    python tpu_scripts/tpu.py create --name run1 --zone us-east5-a --type v5p-64 --spot
    python tpu_scripts/tpu.py setup  --name run1 --zone us-east5-a --wheel dist/lt_jax-0.1.0-py3-none-any.whl
    python tpu_scripts/tpu.py launch --name run1 --zone us-east5-a --config configs/qwen2.5-7b-32k.yaml \\
        data.train=gs://B/tokens train.output_dir=gs://B/runs/7b train.init_from=gs://B/ckpt/7b
    python tpu_scripts/tpu.py logs   --name run1 --zone us-east5-a --follow
    python tpu_scripts/tpu.py stop   --name run1 --zone us-east5-a        # SIGTERM: checkpoint, exit 42
    python tpu_scripts/tpu.py delete --name run1 --zone us-east5-a

Queued resources (`--queued`, the way to get capacity that is scarce) and multi-slice
(`--slices N`, always queued): N slices joined over the data-center network. The TPU runtime sets
the MEGASCALE_* variables on every worker and `lt-jax train` initialises jax.distributed from
them; `launch` adds `mesh.dcn_data=N`, so the batch (and only the batch) is split across slices
while each slice keeps the recipe's own fsdp/tensor/context mesh.

Every subcommand checks its inputs, prints each gcloud command before running it, and with
`--dry-run` only prints. Only the standard library is used (runs where gcloud is installed).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Optional

JAX_VERSION = "0.10.2"
RUN_DIR = "~/lt_jax_run"  # on every worker: run.sh, config.yaml, train.log, train.pid

# accelerator generation -> TPU VM runtime (software) version
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5", "v5litepod": "v2-alpha-tpuv5-lite",
            "v6e": "v2-alpha-tpuv6e"}

# libtpu flags: run the FSDP all-gathers and reduce-scatters asynchronously, fused with and
# overlapping the layer compute (the collectives of ZeRO-3 otherwise sit on the critical path).
DEFAULT_LIBTPU_ARGS = " ".join([
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
])

PREEMPTED_EXIT_CODE = 42  # lt_jax.train.trainer: "checkpoint saved, restart me"


class UsageError(ValueError):
    """Bad input: the message says which flag and what is accepted."""


# ---------------------------------------------------------------------------------------------
# The resource: a TPU VM, or a queued resource with one or more slices


class Tpu:
    """Builds gcloud command lines for one TPU VM or queued resource."""

    def __init__(self, name: str, zone: str, project: Optional[str] = None, queued: bool = False, slices: int = 1):
        check_name(name)
        check_zone(zone)
        if slices < 1:
            raise UsageError(f"--slices must be >= 1, got {slices}")
        self.name, self.zone, self.project = name, zone, project
        self.slices = slices
        self.queued = queued or slices > 1  # multi-slice exists only as a queued resource

    def _common(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def _group(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources" if self.queued else "tpu-vm"]

    def ssh(self, command: str, worker: str = "all") -> list[str]:
        nodes = ["--node=all"] if self.queued else []
        return [*self._group(), "ssh", self.name, *self._common(), f"--worker={worker}", *nodes,
                f"--command={command}"]

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        nodes = ["--node=all"] if self.queued else []
        return [*self._group(), "scp", local, f"{self.name}:{remote}", *self._common(), "--worker=all", *nodes]

    def create(self, accelerator: str, *, spot: bool, reserved: bool, runtime: Optional[str]) -> list[str]:
        runtime = runtime or runtime_for(accelerator)
        tier = ["--spot"] if spot else ["--reserved"] if reserved else []
        if not self.queued:
            return [*self._group(), "create", self.name, *self._common(), f"--accelerator-type={accelerator}",
                    f"--version={runtime}", *tier]
        nodes = [f"--node-id={self.name}"] if self.slices == 1 else [
            f"--node-count={self.slices}", f"--node-prefix={self.name}"]
        return [*self._group(), "create", self.name, *self._common(), f"--accelerator-type={accelerator}",
                f"--runtime-version={runtime}", *nodes, *tier]

    def delete(self) -> list[str]:
        force = ["--force"] if self.queued else []  # a queued resource's nodes go with it
        return [*self._group(), "delete", self.name, *self._common(), "--quiet", *force]

    def describe(self) -> list[str]:
        return [*self._group(), "describe", self.name, *self._common()]


# ---------------------------------------------------------------------------------------------
# Input checks


def check_name(name: str) -> None:
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name or ""):
        raise UsageError(f"--name {name!r}: lowercase letters, digits and hyphens, starting with a letter, <= 63 chars")


def check_zone(zone: str) -> None:
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", zone or ""):
        raise UsageError(f"--zone {zone!r}: expected a zone like us-east5-a or europe-west4-b")


def runtime_for(accelerator: str) -> str:
    m = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", accelerator or "")
    if not m:
        raise UsageError(f"--type {accelerator!r}: expected v4-N, v5p-N, v5litepod-N or v6e-N (e.g. v5p-64)")
    return RUNTIMES[m.group(1)]


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        if not re.fullmatch(r"[A-Za-z_][\w.]*=.*", item):
            raise UsageError(f"override {item!r}: expected the form section.key=value")


# ---------------------------------------------------------------------------------------------
# Remote scripts


def setup_script(package: str, jax_version: str = JAX_VERSION) -> str:
    """Shell run on every worker: the same jax[tpu] and lt_jax everywhere, then print the versions."""
    return " && ".join([
        f"mkdir -p {RUN_DIR}",
        "python3 -m pip install --upgrade pip",
        f"python3 -m pip install 'jax[tpu]=={jax_version}'",
        f"python3 -m pip install {package}",
        "python3 -c 'import jax, lt_jax, flax, optax, orbax.checkpoint as oc; "
        "print(\"versions:\", jax.__version__, flax.__version__, optax.__version__, oc.__version__)'",
    ])


def run_script(config: str, overrides: list[str], env: dict[str, str]) -> str:
    """run.sh: `lt-jax train`, restarted in place while it exits 42 (preempted, checkpoint saved)
    and the VM survives (e.g. a maintenance event); any other status ends it."""
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    cmd = shlex.join(["lt-jax", "train", "--config", config, *overrides])
    return f"""#!/bin/bash
{exports}
while true; do
  {cmd}
  rc=$?
  echo "lt-jax train exited with $rc at $(date -u +%FT%TZ)"
  [ "$rc" -eq {PREEMPTED_EXIT_CODE} ] || exit "$rc"
done
"""


def launch_command(script: str) -> str:
    """Remote one-liner: write run.sh, start it detached, remember its pid (for `stop`)."""
    return (
        f"mkdir -p {RUN_DIR} && cd {RUN_DIR} && printf %s {shlex.quote(script)} > run.sh && "
        "(nohup setsid bash run.sh > train.log 2>&1 < /dev/null & echo $! > train.pid) && "
        "echo started $(hostname) pid $(cat train.pid)"
    )


def stop_command(force: bool) -> str:
    # The whole process group: run.sh's loop and lt-jax train (setsid made the pid the group id).
    # SIGTERM lets the trainer save a checkpoint and exit 42; the loop is killed with it.
    sig = "KILL" if force else "TERM"
    return (f"cd {RUN_DIR} 2>/dev/null && [ -f train.pid ] && kill -{sig} -- -$(cat train.pid) "
            "&& echo signalled $(hostname) || echo nothing running on $(hostname)")


# ---------------------------------------------------------------------------------------------
# Subcommands: each returns the command lines to run


def cmd_create(args) -> list[list[str]]:
    if args.spot and args.reserved:
        raise UsageError("--spot and --reserved exclude each other")
    tpu = Tpu(args.name, args.zone, args.project, args.queued, args.slices)
    return [tpu.create(args.type, spot=args.spot, reserved=args.reserved, runtime=args.runtime)]


def cmd_setup(args) -> list[list[str]]:
    tpu = _tpu(args)
    if bool(args.wheel) == bool(args.git):
        raise UsageError("give exactly one of --wheel (a .whl, local or gs://) or --git (URL@REF)")
    cmds = []
    if args.wheel:
        if not args.wheel.endswith(".whl"):
            raise UsageError(f"--wheel {args.wheel!r}: expected a .whl file (build it with `python -m build --wheel`)")
        remote = f"{RUN_DIR}/{os.path.basename(args.wheel)}"
        if args.wheel.startswith("gs://"):
            package = f"{remote}"
            fetch = f"mkdir -p {RUN_DIR} && gcloud storage cp {args.wheel} {remote}"
            cmds.append(tpu.ssh(fetch))
        else:
            if not os.path.isfile(args.wheel):
                raise UsageError(f"--wheel {args.wheel}: no such file")
            cmds.append(tpu.ssh(f"mkdir -p {RUN_DIR}"))
            cmds.append(tpu.scp_to_all(args.wheel, remote))
            package = remote
    else:
        if not re.fullmatch(r"\S+@\S+", args.git):
            raise UsageError(
                f"--git {args.git!r}: expected URL@REF (a tag or commit, so every worker gets the same code)"
            )
        url, ref = args.git.rsplit("@", 1)
        package = shlex.quote(f"lt_jax @ git+{url}@{ref}")
    cmds.append(tpu.ssh(setup_script(package, args.jax_version)))
    return cmds


def cmd_launch(args) -> list[list[str]]:
    tpu = _tpu(args)
    check_overrides(args.overrides)
    cmds, config = [], args.config
    if not config.startswith("gs://"):
        if not os.path.isfile(config):
            raise UsageError(f"--config {config}: no such file (give a local YAML or a gs:// path)")
        cmds.append(tpu.ssh(f"mkdir -p {RUN_DIR}"))
        cmds.append(tpu.scp_to_all(config, f"{RUN_DIR}/config.yaml"))
        config = "config.yaml"  # run.sh runs in RUN_DIR
    overrides = list(args.overrides)
    if tpu.slices > 1 and not any(o.startswith("mesh.dcn_data=") for o in overrides):
        overrides.append(f"mesh.dcn_data={tpu.slices}")
    env = {"LIBTPU_INIT_ARGS": args.libtpu_args} if args.libtpu_args else {}
    if args.compile_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = args.compile_cache
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise UsageError(f"--env {item!r}: expected NAME=VALUE")
        env[key] = value
    cmds.append(tpu.ssh(launch_command(run_script(config, overrides, env))))
    return cmds


def cmd_logs(args) -> list[list[str]]:
    tpu = _tpu(args)
    if args.collect:
        if not args.collect.startswith("gs://"):
            raise UsageError(f"--collect {args.collect!r}: expected a gs:// folder every worker can write")
        dest = args.collect.rstrip("/")
        return [tpu.ssh(f"gcloud storage cp {RUN_DIR}/train.log {dest}/$(hostname).log")]
    if args.follow:
        return [tpu.ssh(f"tail -n {args.lines} -F {RUN_DIR}/train.log", worker=str(args.worker or 0))]
    return [tpu.ssh(f"echo == $(hostname); tail -n {args.lines} {RUN_DIR}/train.log", worker=str(args.worker or "all"))]


def cmd_stop(args) -> list[list[str]]:
    return [_tpu(args).ssh(stop_command(args.force))]


def cmd_delete(args) -> list[list[str]]:
    return [_tpu(args).delete()]


def cmd_status(args) -> list[list[str]]:
    return [_tpu(args).describe()]


def _tpu(args) -> Tpu:
    return Tpu(args.name, args.zone, args.project, args.queued, args.slices)


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "create": (cmd_create, "create a TPU VM or queued resource"),
        "setup": (cmd_setup, "install jax[tpu] and lt_jax on every worker"),
        "launch": (cmd_launch, "start `lt-jax train` on every worker (detached)"),
        "logs": (cmd_logs, "show, follow or collect the training logs"),
        "stop": (cmd_stop, "stop training: SIGTERM (checkpoint, exit 42) or --force"),
        "delete": (cmd_delete, "delete the TPU VM / queued resource"),
        "status": (cmd_status, "describe the TPU VM / queued resource"),
    }
    for name, (fn, help_text) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(fn=fn)
        p.add_argument("--name", required=True, help="TPU VM / queued resource name")
        p.add_argument("--zone", required=True)
        p.add_argument("--project", default=None)
        p.add_argument("--queued", action="store_true", help="a queued resource (implied by --slices > 1)")
        p.add_argument("--slices", type=int, default=1, help="multi-slice: number of slices over DCN")
        p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
        _add_specific(p, name)
    return parser


def _add_specific(p: argparse.ArgumentParser, name: str) -> None:
    if name == "create":
        p.add_argument("--type", required=True, help="accelerator type per slice, e.g. v5p-64, v6e-256")
        p.add_argument("--spot", action="store_true", help="spot capacity (preemptible, cheaper)")
        p.add_argument("--reserved", action="store_true", help="use the project's reservation")
        p.add_argument("--runtime", default=None, help="TPU software version (default: by generation)")
    elif name == "setup":
        p.add_argument("--wheel", help="lt_jax wheel: a local .whl (copied to every worker) or gs://.../x.whl")
        p.add_argument("--git", help="URL@REF of the lt_jax repository (a tag or commit)")
        p.add_argument("--jax-version", default=JAX_VERSION)
    elif name == "launch":
        p.add_argument("--config", required=True, help="run YAML: local (copied to every worker) or gs://")
        p.add_argument("overrides", nargs="*", help="dotted overrides for lt-jax train")
        p.add_argument("--env", action="append", default=[], help="extra NAME=VALUE for the workers (repeatable)")
        p.add_argument("--libtpu-args", default=DEFAULT_LIBTPU_ARGS, help="LIBTPU_INIT_ARGS ('' for none)")
        p.add_argument("--compile-cache", default=None, help="JAX_COMPILATION_CACHE_DIR, e.g. gs://B/jax-cache")
    elif name == "logs":
        p.add_argument("--follow", action="store_true", help="stream one worker's log (default worker 0)")
        p.add_argument("--worker", default=None, help="worker index (default: all; 0 with --follow)")
        p.add_argument("--lines", type=int, default=100)
        p.add_argument("--collect", default=None, help="copy every worker's log to this gs:// folder")
    elif name == "stop":
        p.add_argument("--force", action="store_true", help="SIGKILL instead of a checkpointing SIGTERM")


def execute(cmds: list[list[str]], dry_run: bool, out=sys.stdout) -> int:
    """Prints each command (as a shell line) and runs it unless `dry_run`; stops at the first failure."""
    for cmd in cmds:
        print("+ " + shlex.join(cmd), file=out, flush=True)
        if dry_run:
            continue
        rc = subprocess.call(cmd)
        if rc:
            print(f"tpu.py: command failed with status {rc}", file=sys.stderr)
            return rc
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cmds = args.fn(args)
    except UsageError as e:
        print(f"tpu.py {args.command}: {e}", file=sys.stderr)
        return 2
    return execute(cmds, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
