"""tpu_scripts/gpu: the plain multi-node launcher and the Slurm script in dry-run, the GPU
environment's XLA flags against the pinned jaxlib, and the Slurm hand-off to jax.distributed."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from lt_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "tpu_scripts", "gpu", "launch.py")
SBATCH = os.path.join(REPO, "tpu_scripts", "gpu", "train.sbatch")
CONFIG = "configs/qwen2.5-7b-32k.yaml"


def launch(*argv, env=None):
    return subprocess.run([sys.executable, LAUNCH, *argv], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env=env)


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0] if value else ""
    return out


def test_gpu_xla_flags_exist_in_this_jaxlib():
    """XLA aborts on an unknown flag: every flag we set must parse (they are GPU flags, but XLA
    parses XLA_FLAGS on any backend, so the CPU here checks them)."""
    env = _exports(launch("env").stdout)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.92"
    proc = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready(); print('ok')"],
                          env={**os.environ, "XLA_FLAGS": env["XLA_FLAGS"], "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(2)"],
                         env={**os.environ, "XLA_FLAGS": "--xla_gpu_no_such_flag=1", "JAX_PLATFORMS": "cpu"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0  # the check above can fail


def test_run_builds_the_distributed_command():
    proc = launch("run", "--coordinator", "node0:1234", "--num-processes", "2", "--process-id", "1",
                  "--config", CONFIG, "mesh.fsdp=-1", "train.grad_accum=8", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmd = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert cmd == [["lt-jax", "train", "--config", CONFIG, "mesh.fsdp=-1", "train.grad_accum=8",
                    "--coordinator", "node0:1234", "--num-processes", "2", "--process-id", "1"]]
    assert "XLA_FLAGS" in _exports(proc.stdout)
    single = launch("run", "--config", CONFIG, "--dry-run").stdout
    assert "+ lt-jax train --config configs/qwen2.5-7b-32k.yaml\n" in single


@pytest.mark.parametrize("argv,message", [
    (["--num-processes", "2", "--process-id", "0"], "--coordinator"),
    (["--coordinator", "n0:1", "--num-processes", "2", "--process-id", "2"], "--process-id"),
    (["--coordinator", "n0", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
])
def test_run_rejects_bad_distributed_flags(argv, message):
    proc = launch("run", *argv, "--config", CONFIG, "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr and "+ " not in proc.stdout


def test_ssh_starts_one_process_per_host():
    proc = launch("ssh", "--hosts", "gpu-a,gpu-b,gpu-c", "--port", "4000", "--repo", "/opt/lt jax", "--config", CONFIG,
                  "data.train=/shared/tokens", "--dry-run", "--mem-fraction", "0.9")
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    assert [c[3] for c in cmds] == ["gpu-a", "gpu-b", "gpu-c"]
    for i, c in enumerate(cmds):
        remote = shlex.split(c[4])
        assert remote[:3] == ["cd", "/opt/lt jax", "&&"]
        run = remote[3:]
        assert run[run.index("--coordinator") + 1] == "gpu-a:4000"
        assert run[run.index("--process-id") + 1] == str(i) and run[run.index("--num-processes") + 1] == "3"
        assert "--mem-fraction=0.9" in run and run[-1] == "data.train=/shared/tokens"
    assert launch("ssh", "--hosts", "a,a", "--config", CONFIG, "--dry-run").returncode == 2


SLURM_STEP_ENV = {  # what srun sets inside task 1 of a 2-node step
    "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "8",
}


def test_sbatch_dry_run_prints_env_and_srun(tmp_path):
    env = {"PATH": os.environ["PATH"], "LT_JAX_DRY_RUN": "1", "SLURM_SUBMIT_DIR": REPO, **SLURM_STEP_ENV}
    proc = subprocess.run(["bash", SBATCH, CONFIG, "mesh.fsdp=-1", "train.grad_accum=4"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in lines
    assert any(line.startswith("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true") for line in lines)
    assert lines[-1] == (f"+ srun --ntasks-per-node=1 --kill-on-bad-exit=1 lt-jax train --config {CONFIG} "
                         "mesh.fsdp=-1 train.grad_accum=4")
    bad = subprocess.run(["bash", SBATCH, CONFIG, "grad_accum"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "expected section.key=value" in bad.stderr
    missing = subprocess.run(["bash", SBATCH, "configs/none.yaml"], cwd=REPO, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_slurm_step_hands_jax_every_gpu_of_the_node(monkeypatch):
    """Inside srun, lt_jax.train.distributed sees a Slurm job, and JAX's Slurm detection finds the
    coordinator and process id; JAX_LOCAL_DEVICE_IDS (set by train.sbatch) overrides the one GPU
    per task JAX would otherwise pick from SLURM_LOCALID."""
    from jax._src import clusters

    assert distributed.multiprocess_environment(SLURM_STEP_ENV) == "slurm"
    for k, v in SLURM_STEP_ENV.items():
        monkeypatch.setenv(k, v)
    coordinator, n, pid, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300
    )
    assert coordinator.startswith("gpu017:") and (n, pid) == (2, 1)
    assert local == [0]  # what JAX alone would do: one GPU per process
    import inspect

    from jax._src import distributed as jax_distributed

    assert "JAX_LOCAL_DEVICE_IDS" in inspect.getsource(jax_distributed.State.initialize)  # the override we rely on
