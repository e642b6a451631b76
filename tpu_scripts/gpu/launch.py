#!/usr/bin/env python3
"""Multi-GPU `lt-jax train` without Slurm: one process per host drives all of that host's GPUs.

    # on every host (process ids 0..N-1; host 0 is the coordinator):
    python tpu_scripts/gpu/launch.py run --coordinator node0:12345 --num-processes 2 --process-id 0 \\
        --config configs/qwen2.5-7b-32k.yaml mesh.fsdp=-1 train.grad_accum=8 data.train=/shared/tokens
    # or from one machine, over ssh to every host (same repo path and Python on each):
    python tpu_scripts/gpu/launch.py ssh --hosts node0,node1 --config configs/qwen2.5-7b-32k.yaml ...
    # the environment alone (what train.sbatch evaluates):
    python tpu_scripts/gpu/launch.py env

The same YAML recipe runs on TPU and GPU; only the mesh changes, through overrides (e.g. TPU
`fsdp: -1` over 32 chips vs GPU `mesh.fsdp=-1` over 16 GPUs with more `train.grad_accum`).
`--dry-run` prints the environment and commands and runs nothing. Preemption: `lt-jax train`
exits 42 after saving a checkpoint; `run` restarts it in place (the same command resumes).

The environment (`gpu_env`) is the single place the GPU settings live; every one is explained there.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Optional

PREEMPTED_EXIT_CODE = 42
DEFAULT_PORT = 12355

# XLA GPU flags, each checked to exist in the pinned jaxlib (an unknown flag aborts start-up).
XLA_GPU_FLAGS: tuple[tuple[str, str], ...] = (
    # Schedule collectives (FSDP all-gathers / reduce-scatters, DP all-reduces) to overlap compute.
    ("--xla_gpu_enable_latency_hiding_scheduler=true", "overlap collectives with compute"),
    # Run collectives on the highest-priority stream so they are not starved by compute kernels.
    ("--xla_gpu_enable_highest_priority_async_stream=true", "collectives first on the GPU"),
    # Issue the next layer's all-gather (and the previous layer's reduce-scatter) inside the scanned
    # layer loop, one iteration ahead: what makes ZeRO-3 over scanned layers overlap at all.
    ("--xla_gpu_enable_pipelined_all_gather=true", "prefetch next layer's weights"),
    ("--xla_gpu_enable_pipelined_reduce_scatter=true", "reduce-scatter grads behind compute"),
    ("--xla_gpu_enable_pipelined_all_reduce=true", "same for data-parallel all-reduces"),
    ("--xla_gpu_enable_while_loop_double_buffering=true", "double-buffer the layer scan's carries"),
    # Combine small collectives into ~128 MiB ones: fewer, larger NCCL calls use the links better.
    ("--xla_gpu_all_reduce_combine_threshold_bytes=134217728", "combine all-reduces"),
    ("--xla_gpu_all_gather_combine_threshold_bytes=134217728", "combine all-gathers"),
    ("--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728", "combine reduce-scatters"),
    # cuBLAS beats Triton for the large bf16 GEMMs of a 7B+ model, and compiles faster.
    ("--xla_gpu_enable_triton_gemm=false", "cuBLAS GEMMs"),
    # CUDA graphs: little gain for a few large kernels per layer, extra memory; off.
    ("--xla_gpu_enable_command_buffer=", "no CUDA graphs"),
)


def gpu_env(mem_fraction: float = 0.92, extra_xla_flags: str = "") -> dict[str, str]:
    """The environment of every training process on an H100 node (see the comments per entry)."""
    flags = " ".join(f for f, _ in XLA_GPU_FLAGS)
    return {
        "XLA_FLAGS": (flags + " " + extra_xla_flags).strip(),
        # JAX preallocates this share of each GPU's memory (default 0.75 leaves 20 GB of an H100
        # idle); the fit check (`lt-jax compile --gpu h100x8 --mem-fraction 0.92`) uses the same.
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{mem_fraction:g}",
        # NCCL over InfiniBand with GPUDirect RDMA: keep IB on, let NCCL read/write GPU memory
        # directly across the PCIe switch; warnings only. Site-specific NCCL_IB_HCA and
        # NCCL_SOCKET_IFNAME (which NICs) are left to the cluster's environment and passed through.
        "NCCL_IB_DISABLE": "0",
        "NCCL_NET_GDR_LEVEL": "PHB",
        "NCCL_DEBUG": "WARN",
        # cuDNN flash attention (model.attention auto/cudnn) needs nothing set: JAX's cuDNN
        # bindings pick the fused kernel; packed rows use its segment-offset layout.
        "TF_CPP_MIN_LOG_LEVEL": "1",
    }


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        if not re.fullmatch(r"[A-Za-z_][\w.]*=.*", item):
            raise ValueError(f"override {item!r}: expected the form section.key=value")


def train_command(config: str, overrides: list[str], coordinator: Optional[str], num_processes: int,
                  process_id: Optional[int]) -> list[str]:
    """`lt-jax train` for one process; the distributed flags only when there are several."""
    cmd = ["lt-jax", "train", "--config", config, *overrides]
    if num_processes > 1:
        cmd += ["--coordinator", coordinator, "--num-processes", str(num_processes), "--process-id", str(process_id)]
    return cmd


def check_run(coordinator: Optional[str], num_processes: int, process_id: Optional[int]) -> None:
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if num_processes > 1:
        if not coordinator or not re.fullmatch(r"[\w.\-\[\]:]+:\d+", coordinator):
            raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT of process 0")
        if process_id is None or not 0 <= process_id < num_processes:
            raise ValueError(f"--process-id {process_id!r}: expected 0..{num_processes - 1}")


def export_lines(env: dict[str, str]) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())


def restart_loop(cmd: list[str], env: dict[str, str]) -> int:
    """Runs `cmd` until it exits with something other than the preemption status."""
    while True:
        rc = subprocess.call(cmd, env={**os.environ, **env})
        if rc != PREEMPTED_EXIT_CODE:
            return rc
        print(f"launch.py: preempted (exit {rc}); restarting to resume from the checkpoint", flush=True)


def ssh_commands(hosts: list[str], port: int, config: str, overrides: list[str], repo: str,
                 env_flags: list[str]) -> list[list[str]]:
    """One ssh command per host: cd to the repo and start `launch.py run` as process i of N there
    (`run` sets the environment itself; `env_flags` forwards --mem-fraction / --xla-flags)."""
    if len(set(hosts)) != len(hosts) or not all(re.fullmatch(r"[\w.\-@]+", h) for h in hosts):
        raise ValueError(f"--hosts {','.join(hosts)!r}: expected distinct host names, comma separated")
    coordinator = f"{hosts[0].split('@')[-1]}:{port}"
    cmds = []
    for i, host in enumerate(hosts):
        run = ["python3", "tpu_scripts/gpu/launch.py", "run", *env_flags, "--coordinator", coordinator,
               "--num-processes", str(len(hosts)), "--process-id", str(i), "--config", config, *overrides]
        cmds.append(["ssh", "-o", "BatchMode=yes", host, f"cd {shlex.quote(repo)} && {shlex.join(run)}"])
    return cmds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env_p = sub.add_parser("env", help="print the training environment as shell exports")
    run_p = sub.add_parser("run", help="start this host's process (restarts it after preemption)")
    ssh_p = sub.add_parser("ssh", help="start one process per host over ssh")
    for p in (env_p, run_p, ssh_p):
        p.add_argument("--mem-fraction", type=float, default=0.92)
        p.add_argument("--xla-flags", default="", help="extra XLA flags appended to the defaults")
    for p in (run_p, ssh_p):
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*")
        p.add_argument("--dry-run", action="store_true")
    run_p.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
    run_p.add_argument("--num-processes", type=int, default=1)
    run_p.add_argument("--process-id", type=int, default=None)
    ssh_p.add_argument("--hosts", required=True, help="comma-separated; the first is the coordinator")
    ssh_p.add_argument("--port", type=int, default=DEFAULT_PORT)
    ssh_p.add_argument("--repo", default=os.getcwd(), help="repository path on every host (default: here)")
    args = parser.parse_args(argv)
    if not 0 < args.mem_fraction <= 1:
        print("launch.py: --mem-fraction must be in (0, 1]", file=sys.stderr)
        return 2
    env = gpu_env(args.mem_fraction, args.xla_flags)
    if args.command == "env":
        sys.stdout.write(export_lines(env))
        return 0
    try:
        check_overrides(args.overrides)
        if args.command == "run":
            check_run(args.coordinator, args.num_processes, args.process_id)
            cmds = [train_command(args.config, args.overrides, args.coordinator, args.num_processes, args.process_id)]
        else:
            env_flags = [f"--mem-fraction={args.mem_fraction:g}"]
            env_flags += [f"--xla-flags={args.xla_flags}"] if args.xla_flags else []
            cmds = ssh_commands([h for h in args.hosts.split(",") if h], args.port, args.config, args.overrides,
                                args.repo, env_flags)
    except ValueError as e:
        print(f"launch.py {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "run":
        sys.stdout.write(export_lines(env))
    for cmd in cmds:
        print("+ " + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if args.command == "run":
        return restart_loop(cmds[0], env)
    procs = [subprocess.Popen(c) for c in cmds]
    return max(p.wait() for p in procs)


if __name__ == "__main__":
    sys.exit(main())
