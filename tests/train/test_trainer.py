"""The trainer in-process: the tiny model learns the synthetic task; metrics reach JSONL and
TensorBoard; eval loss is logged; checkpoints hold the whole state and export to Hugging Face; a run
starts from imported weights; the run config keeps other stages' sections out of the way."""

from __future__ import annotations

import argparse
import math
import os
import struct

import numpy as np
import pytest

from lt_jax.config import ConfigError, from_dict
from lt_jax.model.config import ModelConfig
from lt_jax.train import cli as train_cli
from lt_jax.train import trainer
from lt_jax.train.config import RunConfig, load_run_config

STEPS = 24


@pytest.fixture(scope="module")
def tiny_run(tiny_data, helpers, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tiny_run") / "out")
    raw = helpers.run_config(out, tiny_data.train, tiny_data.eval, train={"steps": STEPS, "eval_every": 12},
                             logging={"every": 4}, checkpoint={"every": 12})
    lines: list[str] = []
    rc = trainer.train(from_dict(RunConfig, raw), printer=lambda s, **_: lines.append(s))
    assert rc == 0, "\n".join(lines)
    return out, lines


def test_tiny_model_learns_the_synthetic_task(tiny_run, helpers):
    out, lines = tiny_run
    train = helpers.read_metrics(out)
    evals = helpers.read_metrics(out, "eval")
    assert sorted(train) == list(range(1, STEPS + 1))
    first = np.mean([train[s]["loss"] for s in (1, 2, 3)])
    last = np.mean([train[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)])
    assert first > math.log(128) - 0.2 and last < first - 1.0
    assert evals[STEPS]["eval_loss"] < evals[12]["eval_loss"] < math.log(128) - 0.5
    assert evals[12]["eval_tokens"] == evals[STEPS]["eval_tokens"] > 0  # the whole held-out set each time
    # throughput on logging steps, with an ETA; the console says the same
    for key in ("tokens_per_s", "tokens_per_s_per_device", "step_time_s", "data_wait_s", "eta_s"):
        assert train[8][key] >= 0, key
    assert train[8]["tokens"] > 0 and train[8]["lr"] > 0 and train[8]["grad_norm"] > 0
    assert any(line.startswith(f"step 8/{STEPS} | loss") and "tok/s" in line and "ETA" in line for line in lines)
    # step 1 compiles: its time is logged on its own, not as step 1's throughput
    assert train[1]["compile_time_s"] > 0 and "tokens_per_s" not in train[1]
    assert "z_loss" not in train[8]  # train.z_loss is 0: there is no z term to report
    assert any("eval loss" in line for line in lines)


def read_events(folder: str) -> dict[str, dict[int, float]]:
    """Scalars from TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_events_hold_every_step(tiny_run, helpers):
    out, _ = tiny_run
    events = read_events(os.path.join(out, "tensorboard"))
    jsonl = helpers.read_metrics(out)
    assert sorted(events["train/loss"]) == list(range(1, STEPS + 1))
    assert events["train/loss"][5] == pytest.approx(jsonl[5]["loss"], rel=1e-6)
    assert set(events["eval/eval_loss"]) == {12, STEPS} and "train/tokens_per_s" in events


def test_checkpoints_hold_the_training_state_and_export_to_hugging_face(tiny_run, tmp_path):
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    from lt_jax.model import hf_cli
    from lt_jax.train.checkpoint import load_model_checkpoint

    out, _ = tiny_run
    ckpt = os.path.join(out, "checkpoints")
    assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [12, STEPS]
    items = set(os.listdir(os.path.join(ckpt, str(STEPS))))
    assert {"params", "opt_state", "train_state", "loader", "run_config", "model_config"} <= items
    hf = str(tmp_path / "hf")
    parser = argparse.ArgumentParser()
    hf_cli.add_arguments(parser, "export-hf")
    args = parser.parse_args(["--checkpoint", ckpt, "--out", hf])
    args.command = "export-hf"
    assert hf_cli.run(args) == 0
    ours = load_model_checkpoint(ckpt)
    ids = np.array([[72, 101, 108, 108, 111, 44, 32, 50, 51, 43, 52, 53]])
    want = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(ids)))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        got = theirs(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_a_run_starts_from_imported_weights(tiny_run, tiny_data, helpers, tmp_path):
    out, _ = tiny_run
    trained = helpers.read_metrics(out)
    raw = helpers.run_config(str(tmp_path / "out"), tiny_data.train, train={"steps": 1})
    # architecture from the checkpoint; this section may only repeat it or change runtime fields
    raw["model"] = {"hidden_size": 64, "remat": "full"}
    raw["train"]["init_from"] = os.path.join(out, "checkpoints")
    lines: list[str] = []
    assert trainer.train(from_dict(RunConfig, raw), printer=lambda s, **_: lines.append(s)) == 0
    first = helpers.read_metrics(str(tmp_path / "out"))[1]["loss"]
    assert first < trained[1]["loss"] - 1.0  # starts where the trained model left off, not at random
    assert any("remat full" in line for line in lines) and any(f"started from {raw['train']['init_from']}" in line for line in lines)


def test_run_config_skips_other_stages_and_rejects_typos(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "synthetic: {num_problems: 8}\ntokenize: {max_length: 512}\n"
        "model: {hidden_size: 32, num_heads: 4}\ndata: {train: /tmp/x, seq_len: 64}\n"
    )
    cfg = load_run_config(str(path), ["train.global_batch=4", "optim.lr=1e-4"])
    assert cfg.train.global_batch == 4 and cfg.optim.lr == 1e-4 and cfg.model_config().hidden_size == 32
    path.write_text("data: {train: /tmp/x}\ntrian: {steps: 3}\n")
    with pytest.raises(ConfigError, match="trian: unknown key"):
        load_run_config(str(path))
    with pytest.raises(ConfigError, match="model.num_layer: unknown key"):
        load_run_config(None, ["data.train=/tmp/x", "model.num_layer=3"])
    with pytest.raises(ConfigError, match="multiple of grad_accum"):
        load_run_config(None, ["data.train=/tmp/x", "train.global_batch=6", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match="data.train: required"):
        load_run_config(None, [])


def test_model_section_must_agree_with_an_imported_checkpoint():
    cfg = load_run_config(None, ["data.train=/tmp/x", "model.hidden_size=128", "model.compute_dtype=bfloat16"])
    base = ModelConfig(hidden_size=64)
    with pytest.raises(ConfigError, match=r"model.hidden_size: 128 here but 64 in /ckpt"):
        cfg.model_config(base, source="/ckpt")
    ok = load_run_config(None, ["data.train=/tmp/x", "model.compute_dtype=bfloat16", "model.remat=full"])
    resolved = ok.model_config(base)
    assert resolved.hidden_size == 64 and resolved.compute_dtype == "bfloat16" and resolved.remat == "full"


def test_train_is_an_lt_jax_subcommand(tmp_path, capsys):
    from lt_jax import cli

    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["train", "--config", missing, "train.steps=3"]) == 2
    assert missing in capsys.readouterr().err


def test_multi_process_environments_are_recognised():
    from lt_jax.train.distributed import initialize, multiprocess_environment

    assert multiprocess_environment({}) is None
    assert multiprocess_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None  # one task: one process
    assert multiprocess_environment({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert multiprocess_environment({"TPU_WORKER_HOSTNAMES": "t0"}) is None  # a single-host TPU VM
    assert multiprocess_environment({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}) == "tpu-pod"
    assert multiprocess_environment({"JAX_COORDINATOR_ADDRESS": "h:1"}) == "JAX_COORDINATOR_ADDRESS"
    with pytest.raises(ValueError, match="all of --coordinator, --num-processes and --process-id"):
        initialize("127.0.0.1:1", 2, None)


def test_a_batch_that_does_not_split_over_the_mesh_is_refused(tiny_data, helpers, tmp_path):
    raw = helpers.run_config(str(tmp_path / "out"), tiny_data.train, train={"global_batch": 12, "grad_accum": 2})
    with pytest.raises(ValueError, match=r"6 rows per micro-batch cannot be split over the 8 batch shards"):
        trainer.train(from_dict(RunConfig, raw), printer=lambda *a, **k: None)


def test_device_memory_where_the_platform_reports_it():
    from lt_jax.train import metrics

    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gib = 2**30
    two = [Device({"bytes_in_use": 3 * gib, "peak_bytes_in_use": 5 * gib}), Device({"bytes_in_use": 4 * gib, "peak_bytes_in_use": 4 * gib})]
    assert metrics.device_memory(two) == {"memory_in_use_gb": 4.0, "memory_peak_gb": 5.0}
    assert metrics.device_memory([Device(None)]) == {}  # CPU devices report nothing
    line = metrics.console_line(3, 10, {"loss": 1.0, "memory_in_use_gb": 4.0, "memory_peak_gb": 5.0})
    assert "mem 4.0 (peak 5.0) GiB" in line


def test_gcs_reads_do_not_flood_the_console():
    import logging

    saved = {name: logging.getLogger(name).level for name in ("", "fsspec", "fsspec.caching", "gcsfs")}
    try:
        train_cli.quiet_libraries()
        logging.getLogger().setLevel(logging.INFO)  # what basicConfig(level=INFO) gives process 0 outside pytest
        assert not logging.getLogger("fsspec.caching").isEnabledFor(logging.INFO)
        assert not logging.getLogger("gcsfs").isEnabledFor(logging.INFO)
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def test_z_loss_is_logged_as_the_term_added_to_the_loss():
    import types

    record = {"loss": 2.0, "grad_norm": 1.0, "lr": 1e-3, "loss_tokens": 10.0, "tokens": 12.0, "z_loss": 55.0}
    meter = object.__new__(trainer.Meter)  # only the record formatting, no devices
    for weight, want in ((0.0, None), (1e-4, 55.0 * 1e-4)):
        meter.run = types.SimpleNamespace(cfg=types.SimpleNamespace(train=types.SimpleNamespace(z_loss=weight)))
        fields = meter._fields(record)
        assert fields.get("z_loss") == (pytest.approx(want) if want else None) and fields["loss"] == 2.0


def test_the_loader_packs_to_the_models_segment_ceiling(tiny_data, helpers, tmp_path):
    """model.max_segments reaches the loader: no row holds more segments (documents + padding)."""
    import jax

    from lt_jax.data import packing

    raw = helpers.run_config(str(tmp_path / "out"), tiny_data.train, model={"max_segments": 3})
    run = trainer.setup(from_dict(RunConfig, raw), printer=lambda *a, **k: None)
    try:
        assert run.model_config.max_segments == 3 and run.loader.options.max_segments == 3
        seg = np.asarray(jax.device_get(next(run.loader)["segment_ids"]))
        assert packing.count_runs(seg).max() <= 3 and run.loader.stats(0)["rows_capped_at_max_segments"] > 0
    finally:
        run.loader.close()
        run.checkpointer.close()
