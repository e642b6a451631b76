"""Exact resume: runs stopped by SIGTERM (exit 42) or SIGKILL and restarted end with the same per-step
losses and bit-identical parameters as a run that never stopped; half-written checkpoints are
skipped; checkpoints on gs:// too; two processes train like one with the same global batch."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time

import numpy as np
import pytest

from lt_jax import storage

pytestmark = pytest.mark.slow

STEPS, EVERY = 30, 3


def committed_steps(ckpt_dir: str) -> list[int]:
    """Steps Orbax has finished: a plain numbered folder locally, one holding commit_success.txt on gs://."""
    if not storage.exists(ckpt_dir):
        return []
    steps = [int(n) for n in storage.listdir(ckpt_dir) if n.isdigit()]
    if storage.is_remote(ckpt_dir):
        steps = [s for s in steps if storage.exists(storage.join(ckpt_dir, str(s), "commit_success.txt"))]
    return sorted(steps)


def wait_then_signal(proc, ckpt_dir: str, sig: int, after: int = 0, timeout: float = 240) -> int:
    """Sends `sig` once a checkpoint newer than `after` is committed, while `proc` still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [s for s in committed_steps(ckpt_dir) if s > after]
        if done:
            assert proc.poll() is None, f"run finished before it could be interrupted:\n{proc.stdout.read()}"
            proc.send_signal(sig)
            return done[-1]
        if proc.poll() is not None:
            pytest.fail(f"run exited with {proc.returncode} before a checkpoint:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint committed in time")


def finish(proc, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def final_params(ckpt_dir: str) -> dict[str, np.ndarray]:
    from flax import nnx

    from lt_jax.train.checkpoint import load_model_checkpoint

    model = load_model_checkpoint(ckpt_dir, STEPS)
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


def assert_same_run(reference_dir: str, output_dir: str, helpers) -> None:
    want, got = helpers.read_metrics(reference_dir), helpers.read_metrics(output_dir)
    assert sorted(got) == list(range(1, STEPS + 1))  # every step once: no gaps, no duplicates
    assert [got[s]["loss"] for s in sorted(got)] == [want[s]["loss"] for s in sorted(want)]
    a = final_params(storage.join(reference_dir, "checkpoints"))
    b = final_params(storage.join(output_dir, "checkpoints"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def config(helpers, tmp_path, output_dir: str, data: str, name: str = "run.yaml") -> str:
    cfg = helpers.run_config(
        output_dir, data, data={"seq_len": 128, "pack_window": 32},
        train={"steps": STEPS, "global_batch": 8}, checkpoint={"every": EVERY, "keep": 3, "keep_every": 15},
    )
    return helpers.write_config(str(tmp_path / name), cfg)


@pytest.fixture(scope="module")
def reference(helpers, random_data, tmp_path_factory):
    """An uninterrupted run (one process, two devices)."""
    tmp = tmp_path_factory.mktemp("reference")
    out = str(tmp / "out")
    rc, log = finish(helpers.train_subprocess(config(helpers, tmp, out, random_data.path)))
    assert rc == 0, log
    return out


def test_sigterm_and_sigkill_then_resume_match_an_uninterrupted_run(helpers, random_data, reference, tmp_path):
    out = str(tmp_path / "out")
    cfg = config(helpers, tmp_path, out, random_data.path)
    ckpt = os.path.join(out, "checkpoints")

    proc = helpers.train_subprocess(cfg)
    wait_then_signal(proc, ckpt, signal.SIGTERM)
    rc, log = finish(proc)
    assert rc == 42, log  # preempted: saved and asked to be restarted
    stopped_at = int(log.split("preempted: saved step ")[1].split()[0])
    assert committed_steps(ckpt)[-1] == stopped_at < STEPS

    # A save killed half-way: Orbax's temporary folder, holding a copy of a real step.
    half = os.path.join(ckpt, f"{stopped_at + 100}.orbax-checkpoint-tmp-1234")
    shutil.copytree(os.path.join(ckpt, str(stopped_at)), half)

    proc = helpers.train_subprocess(cfg)
    killed_after = wait_then_signal(proc, ckpt, signal.SIGKILL, after=stopped_at)
    rc, log = finish(proc)
    assert rc == -signal.SIGKILL and f"resumed from step {stopped_at}" in log, log
    assert not os.path.exists(half)  # cleaned up, never resumed from

    rc, log = finish(helpers.train_subprocess(cfg))
    assert rc == 0, log
    resumed_from = int(log.split("resumed from step ")[1].split()[0])
    assert stopped_at < killed_after <= resumed_from < STEPS
    assert_same_run(reference, out, helpers)
    # keep the last 3 and every 15th
    assert committed_steps(ckpt) == [15, 24, 27, 30]


def test_resume_from_gcs_matches_an_uninterrupted_run(helpers, random_data, reference, gcs_bucket, tmp_path):
    data = helpers.write_tokenized(f"{gcs_bucket}/tokens", random_data.records)
    out = f"{gcs_bucket}/run"
    cfg = config(helpers, tmp_path, out, data)
    ckpt = storage.join(out, "checkpoints")

    proc = helpers.train_subprocess(cfg)
    wait_then_signal(proc, ckpt, signal.SIGKILL)
    finish(proc)
    # A step folder without Orbax's commit marker: what a save killed on GCS leaves.
    last = committed_steps(ckpt)[-1]
    storage.write_text(storage.join(ckpt, str(last + 100), "partial.txt"), "half-written")

    rc, log = finish(helpers.train_subprocess(cfg))
    assert rc == 0 and f"resumed from step {last}" in log, log
    assert_same_run(reference, out, helpers)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_and_stop_together(helpers, random_data, reference, tmp_path):
    """Two processes of one device each (gloo collectives) against one process of two devices. A
    SIGTERM to one of them stops both at the same step with a checkpoint (JAX's preemption sync)."""
    out = str(tmp_path / "out")
    cfg = config(helpers, tmp_path, out, random_data.path)

    def launch():
        flags = ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2"]
        return [helpers.train_subprocess(cfg, *flags, "--process-id", str(i), device_count=1) for i in range(2)]

    procs = launch()
    wait_then_signal(procs[1], os.path.join(out, "checkpoints"), signal.SIGTERM)
    results = [finish(p) for p in procs]
    assert [rc for rc, _ in results] == [42, 42], results[0][1] + results[1][1]
    assert "2 processes" in results[0][1] and "step 1/" not in results[1][1]  # only process 0 reports
    results = [finish(p) for p in launch()]
    for rc, log in results:
        assert rc == 0, log
    want, got = helpers.read_metrics(reference), helpers.read_metrics(out)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s]["loss"] for s in sorted(got)], [want[s]["loss"] for s in sorted(want)], rtol=1e-5)
    a = final_params(os.path.join(reference, "checkpoints"))
    b = final_params(os.path.join(out, "checkpoints"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)
