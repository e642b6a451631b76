"""tpu_scripts/tpu.py: the gcloud commands each subcommand prints in --dry-run, its input checks,
and the remote shell it sends to the workers, run for real under bash with a stand-in `lt-jax`."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tpu_scripts", "tpu.py")


def _module():
    spec = importlib.util.spec_from_file_location("tpu_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tpu = _module()


def dry(*argv):
    """Runs the script as a user would, with --dry-run; returns (status, printed commands, stderr)."""
    proc = subprocess.run([sys.executable, SCRIPT, *argv, "--dry-run"], capture_output=True, text=True, timeout=60)
    # a command may span lines (a quoted script), so split at the "+ " that starts each one
    cmds = [shlex.split(chunk) for chunk in re.split(r"(?m)^\+ ", proc.stdout)[1:]]
    return proc.returncode, cmds, proc.stderr


BASE = ["--name", "run1", "--zone", "us-east5-a"]


def _flag(cmd, name):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(name + "="))


def test_create_vm_queued_and_multislice():
    rc, cmds, _ = dry("create", *BASE, "--type", "v5p-64", "--spot")
    assert rc == 0 and cmds == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "run1", "--zone=us-east5-a",
        "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot",
    ]]
    rc, cmds, _ = dry("create", *BASE, "--type", "v6e-256", "--reserved", "--queued", "--project", "p1")
    assert cmds[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-id=run1" in cmds[0] and "--reserved" in cmds[0] and "--project=p1" in cmds[0]
    assert _flag(cmds[0], "--runtime-version") == "v2-alpha-tpuv6e"
    rc, cmds, _ = dry("create", *BASE, "--type", "v5p-128", "--slices", "4")
    assert "queued-resources" in cmds[0] and "--node-count=4" in cmds[0] and "--node-prefix=run1" in cmds[0]
    assert not any(a.startswith("--node-id") for a in cmds[0])


@pytest.mark.parametrize("argv,message", [
    (["create", "--name", "Run_1", "--zone", "us-east5-a", "--type", "v5p-8"], "--name"),
    (["create", "--name", "r", "--zone", "useast", "--type", "v5p-8"], "--zone"),
    (["create", "--name", "r", "--zone", "us-east5-a", "--type", "v5p"], "--type"),
    (["create", "--name", "r", "--zone", "us-east5-a", "--type", "v5p-8", "--spot", "--reserved"], "exclude"),
    (["setup", "--name", "r", "--zone", "us-east5-a"], "exactly one of --wheel"),
    (["setup", "--name", "r", "--zone", "us-east5-a", "--wheel", "/no/such.whl"], "no such file"),
    (["setup", "--name", "r", "--zone", "us-east5-a", "--git", "https://x/y"], "URL@REF"),
    (["launch", "--name", "r", "--zone", "us-east5-a", "--config", "gs://b/c.yaml", "train.steps"], "key=value"),
    (["launch", "--name", "r", "--zone", "us-east5-a", "--config", "missing.yaml"], "no such file"),
    (["logs", "--name", "r", "--zone", "us-east5-a", "--collect", "/tmp/x"], "gs://"),
])
def test_bad_input_fails_before_any_command(argv, message):
    rc, cmds, err = dry(*argv)
    assert rc == 2 and cmds == [] and message in err


def test_setup_installs_the_same_versions_everywhere(tmp_path):
    wheel = tmp_path / "lt_jax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"not really a wheel")
    rc, cmds, _ = dry("setup", *BASE, "--wheel", str(wheel))
    assert rc == 0 and len(cmds) == 3
    assert cmds[1][4] == "scp" and cmds[1][5] == str(wheel) and "--worker=all" in cmds[1]
    script = _flag(cmds[2], "--command")
    assert "'jax[tpu]==0.10.2'" in script and "~/lt_jax_run/lt_jax-0.1.0-py3-none-any.whl" in script
    rc, cmds, _ = dry("setup", *BASE, "--git", "https://github.com/o/lt_jax@v0.1.0", "--slices", "2")
    assert "--node=all" in cmds[0] and "git+https://github.com/o/lt_jax@v0.1.0" in _flag(cmds[0], "--command")


def test_launch_multislice_adds_dcn_data_and_copies_a_local_config():
    config = os.path.join(REPO, "tests", "scale", "test_tpu_scripts.py")  # any local file stands in
    rc, cmds, _ = dry("launch", *BASE, "--slices", "2", "--config", config, "train.steps=10")
    assert rc == 0 and [c[4] for c in cmds] == ["ssh", "scp", "ssh"]
    assert all("queued-resources" in c and "--node=all" in c and "--worker=all" in c for c in cmds)
    remote = _flag(cmds[2], "--command")
    assert "lt-jax train --config config.yaml train.steps=10 mesh.dcn_data=2" in remote
    assert "LIBTPU_INIT_ARGS" in remote
    rc, cmds, _ = dry("launch", *BASE, "--config", "gs://b/c.yaml", "mesh.fsdp=8", "--env", "A=1")
    assert len(cmds) == 1 and "mesh.dcn_data" not in _flag(cmds[0], "--command")


def test_logs_stop_delete_status():
    assert "tail -n 50 -F" in _flag(dry("logs", *BASE, "--follow", "--lines", "50")[1][0], "--command")
    rc, cmds, _ = dry("logs", *BASE, "--collect", "gs://b/logs/run1/")
    assert "gs://b/logs/run1/$(hostname).log" in _flag(cmds[0], "--command")
    assert "kill -TERM" in _flag(dry("stop", *BASE)[1][0], "--command")
    assert "kill -KILL" in _flag(dry("stop", *BASE, "--force")[1][0], "--command")
    assert dry("delete", *BASE)[1] == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "run1", "--zone=us-east5-a",
                                        "--quiet"]]
    assert dry("delete", *BASE, "--queued")[1][0][-1] == "--force"
    assert dry("status", *BASE)[1][0][4] == "describe"


# ---------------------------------------------------------------------------------------------
# The remote shell, executed here


FAKE_TRAIN = """#!/bin/bash
# stands in for lt-jax: records its arguments, exits 42 (preempted) the first time, then 0 --
# or, with FAKE_SLEEP set, waits to be signalled.
echo "args: $*" >> "$HOME/calls.txt"
echo "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS" >> "$HOME/calls.txt"
if [ -n "$FAKE_SLEEP" ]; then trap 'echo got TERM >> "$HOME/calls.txt"; exit 42' TERM; sleep 60 & wait; fi
if [ ! -f "$HOME/preempted_once" ]; then touch "$HOME/preempted_once"; exit 42; fi
exit 0
"""


def _fake_worker(tmp_path, sleep=False):
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    fake = bin_dir / "lt-jax"
    fake.write_text(FAKE_TRAIN)
    fake.chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{bin_dir}:/usr/bin:/bin"}
    if sleep:
        env["FAKE_SLEEP"] = "1"
    return home, env


def _wait_for(predicate, timeout=20.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_launch_shell_runs_detached_and_restarts_after_preemption(tmp_path):
    home, env = _fake_worker(tmp_path)
    overrides = ["train.steps=10", "data.train=gs://b/my tokens"]
    script = tpu.run_script("config.yaml", overrides, {"LIBTPU_INIT_ARGS": "--a=1 --b=2"})
    out = subprocess.run(["bash", "-c", tpu.launch_command(script)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "started" in out.stdout, out.stderr
    log = home / "lt_jax_run" / "train.log"
    assert _wait_for(lambda: log.exists() and "exited with 0" in log.read_text())
    calls = (home / "calls.txt").read_text().splitlines()
    # run twice (42 -> restarted, then 0), with the arguments intact (quoting survives)
    assert calls.count("args: train --config config.yaml train.steps=10 data.train=gs://b/my tokens") == 2
    assert "LIBTPU_INIT_ARGS=--a=1 --b=2" in calls
    assert "exited with 42" in log.read_text()


def test_stop_shell_signals_the_whole_run(tmp_path):
    home, env = _fake_worker(tmp_path, sleep=True)
    script = tpu.run_script("config.yaml", [], {})
    subprocess.run(["bash", "-c", tpu.launch_command(script)], env=env, check=True, timeout=30, capture_output=True)
    calls = home / "calls.txt"
    assert _wait_for(lambda: calls.exists() and "args:" in calls.read_text())
    pid = int((home / "lt_jax_run" / "train.pid").read_text())
    out = subprocess.run(["bash", "-c", tpu.stop_command(force=False)], env=env, capture_output=True, text=True,
                         timeout=30)
    assert "signalled" in out.stdout
    assert _wait_for(lambda: "got TERM" in calls.read_text())

    def gone():
        try:
            os.killpg(pid, 0)
            return False
        except ProcessLookupError:
            return True

    try:
        assert _wait_for(gone), "the run's process group survived SIGTERM"
    finally:
        if not gone():
            os.killpg(pid, signal.SIGKILL)
    assert "nothing running" not in out.stdout
