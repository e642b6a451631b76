"""The training loop's periodic work as hooks: cadence, user hooks, and the Weights & Biases logger."""

from __future__ import annotations

import glob
import json
import os

import pytest

from lt_jax.config import from_dict
from lt_jax.train import trainer
from lt_jax.train.config import RunConfig
from lt_jax.train.hooks import Hook


def test_hook_cadence():
    hook = Hook("h", lambda r, s: None, every=3, at_start=True, at_end=True)
    assert [s for s in range(5, 12) if hook.due(s, start_step=4, total_steps=11)] == [5, 6, 9, 11]
    never = Hook("n", lambda r, s: None, every=0)
    assert not any(never.due(s, 0, 10) for s in range(1, 11))
    with pytest.raises(ValueError, match="every must be >= 0"):
        Hook("bad", lambda r, s: None, every=-1)


def _wandb_history(run_dir: str) -> list[dict]:
    """History rows of an offline W&B run file (LevelDB-log framing of wandb's Record protos)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL / FIRST start a record, MIDDLE / LAST extend it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_user_hooks_and_wandb_logger_see_every_record(tiny_data, helpers, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the W&B logger is an optional extra: pip install 'lt_jax[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "out")
    raw = helpers.run_config(out, tiny_data.train, tiny_data.eval, train={"steps": 6, "eval_every": 3},
                             logging={"every": 2, "wandb": True, "wandb_project": "lt-jax-test"},
                             checkpoint={"every": 6})
    seen = []
    hook = Hook("probe", lambda run, step: seen.append((step, int(run.state.step))), every=2)
    assert trainer.train(from_dict(RunConfig, raw), printer=lambda *a, **k: None, hooks=[hook]) == 0
    assert seen == [(2, 2), (4, 4), (6, 6)]  # after the step, on the hook's cadence

    (run_dir,) = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    rows = _wandb_history(run_dir)
    train, evals = helpers.read_metrics(out), helpers.read_metrics(out, "eval")
    logged = {r["_step"]: r for r in rows if "train/loss" in r}
    assert sorted(logged) == sorted(train) == list(range(1, 7))
    for step, rec in train.items():
        assert logged[step]["train/loss"] == pytest.approx(rec["loss"], rel=1e-12)
    assert logged[2]["train/tokens_per_s"] == pytest.approx(train[2]["tokens_per_s"])
    eval_rows = {r["_step"]: r["eval/eval_loss"] for r in rows if "eval/eval_loss" in r}
    assert eval_rows == pytest.approx({s: r["eval_loss"] for s, r in evals.items()}) and sorted(eval_rows) == [3, 6]
