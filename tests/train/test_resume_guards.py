"""What a resume must not lose or take silently: metric records of steps before a kill, config
changes (refused, named, kept in a history), a new row shape (one line, before any restore), and a
SIGTERM that lands after the last save (exit 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow

# Runs `lt-jax train` with a hook: LT_TEST_KILL_AFTER=N SIGKILLs the process once checkpoint N has
# committed (so every record a checkpoint covers must already be on disk); LT_TEST_TERM_IN_TEARDOWN
# sends SIGTERM to itself while the checkpointer closes, after the last save.
HOOKED = r"""
import os, signal, sys
from lt_jax.train import trainer, checkpoint
kill_after = int(os.environ.get("LT_TEST_KILL_AFTER", "0"))
save = trainer.save
def hooked_save(run):
    save(run)
    import jax
    step = int(jax.device_get(run.state.step))
    if step == kill_after:
        run.checkpointer.wait()
        os.kill(os.getpid(), signal.SIGKILL)
trainer.save = hooked_save
if os.environ.get("LT_TEST_TERM_IN_TEARDOWN"):
    close = checkpoint.TrainCheckpointer.close
    def closing(self):
        os.kill(os.getpid(), signal.SIGTERM)
        close(self)
    checkpoint.TrainCheckpointer.close = closing
from lt_jax.cli import main
sys.exit(main(["train", *sys.argv[1:]]))
"""


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(helpers, config_path: str, *extra: str, **hooks: str) -> tuple[int, str]:
    """`lt-jax train --config ...` in a child with the hook above (and the session's compile cache)."""
    cache = helpers.train_subprocess.keywords["cache_dir"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **hooks)
    res = subprocess.run([sys.executable, "-c", HOOKED, "--config", config_path, *extra], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    return res.returncode, res.stdout


def test_kills_config_changes_and_teardown(helpers, random_data, tmp_path):
    out = str(tmp_path / "out")
    raw = helpers.run_config(out, random_data.path, data={"seq_len": 128, "pack_window": 32},
                             train={"steps": 6, "global_batch": 8}, checkpoint={"every": 3, "keep": 5},
                             logging={"every": 5})
    cfg = helpers.write_config(str(tmp_path / "run.yaml"), raw)

    # SIGKILL right after checkpoint 3 commits: steps 2 and 3 wait for logging step 5, yet must be on disk.
    rc, log = train(helpers, cfg, LT_TEST_KILL_AFTER="3")
    assert rc == -9, log
    assert sorted(helpers.read_metrics(out)) == [1, 2, 3]
    rc, log = train(helpers, cfg)
    assert rc == 0 and "resumed from step 3" in log, log
    metrics = helpers.read_metrics(out)
    assert sorted(metrics) == list(range(1, 7))  # every step once
    # Compile time apart: the first step of each process carries it and no throughput; z_loss=0 is not logged.
    assert metrics[1]["compile_time_s"] > 0 and "tokens_per_s" not in metrics[1]
    assert metrics[4]["compile_time_s"] > 0 and metrics[5]["tokens_per_s"] > 0
    assert not any("z_loss" in m for m in metrics.values())
    config_yaml = open(os.path.join(out, "config.yaml")).read()

    # A finished run resumed with new steps and optimizer settings: refused, each key named, nothing written.
    rc, log = train(helpers, cfg, "train.steps=8", "optim.lr=0.02", "optim.weight_decay=0.1", "logging.every=2")
    assert rc == 2, log
    error = [line for line in log.splitlines() if "error:" in line]
    assert len(error) == 1 and "Traceback" not in log
    for key in ("train.steps: 6 -> 8", "optim.lr: 0.003 -> 0.02", "optim.weight_decay: 0.01 -> 0.1"):
        assert key in error[0], error[0]
    assert "logging.every" not in error[0]  # how the run reports is not a change to the experiment
    assert open(os.path.join(out, "config.yaml")).read() == config_yaml

    # A new row shape cannot resume even when the user accepts changes: one line, before any restore.
    rc, log = train(helpers, cfg, "data.seq_len=256", "--accept-config-changes")
    assert rc == 2 and "data.seq_len: 128 -> 256" in log and "Traceback" not in log, log
    rc, log = train(helpers, cfg, "train.global_batch=16", "--accept-config-changes")
    assert rc == 2 and "train.global_batch: 8 -> 16" in log, log

    # Accepted: the changes are printed, the run goes on, and every config it ran with is kept.
    # A SIGTERM while the finished run tears down (after its last save) does not turn success into 143.
    rc, log = train(helpers, cfg, "train.steps=8", "--accept-config-changes", LT_TEST_TERM_IN_TEARDOWN="1")
    assert rc == 0, log
    assert "resuming with a changed config: train.steps: 6 -> 8" in log
    assert sorted(helpers.read_metrics(out)) == list(range(1, 9))
    history = sorted(os.listdir(os.path.join(out, "config_history")))
    assert history == ["step-00000000.yaml", "step-00000003.yaml", "step-00000006.yaml"]
    steps = [yaml.safe_load(open(os.path.join(out, "config_history", h)))["train"]["steps"] for h in history]
    assert steps == [6, 6, 8]


def test_which_changes_are_refused():
    from lt_jax.config import ConfigError, from_dict, to_dict
    from lt_jax.train.config import RunConfig
    from lt_jax.train.resume_check import check_resume

    base = {"data": {"train": "/a/tok", "seq_len": 128}, "train": {"output_dir": "/a/out", "steps": 6}}
    stored = json.loads(json.dumps(to_dict(from_dict(RunConfig, base))))
    moved = from_dict(RunConfig, {"data": {"train": "/b/tok", "seq_len": 128},
                                  "train": {"output_dir": "/b/out", "steps": 6, "grad_accum": 2},
                                  "logging": {"every": 7}, "mesh": {"fsdp": 2}})
    assert check_resume(stored, moved, accept=False, where="ckpt") == []  # paths and execution only
    longer = from_dict(RunConfig, {**base, "train": {**base["train"], "steps": 9}, "optim": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"optim.lr: 8e-05 -> 0.001; train.steps: 6 -> 9"):
        check_resume(stored, longer, accept=False, where="ckpt")
    assert check_resume(stored, longer, accept=True, where="ckpt") == ["optim.lr: 8e-05 -> 0.001", "train.steps: 6 -> 9"]
