"""`lt-jax import-hf` / `export-hf` through the real CLI entry point, local and gs://."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from lt_jax.cli import main


def _assert_same_tensors(hfx, a_dir, b_dir):
    a, b = hfx.safetensors_dict(a_dir), hfx.safetensors_dict(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_import_then_export_roundtrip(hf_folder, prompts, hfx, qwen_tokenizer_dir, tmp_path):
    import torch
    import transformers

    folder, ref_model = hf_folder("qwen3")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert main(["import-hf", "--hf", folder, "--out", ckpt, "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    assert main(["export-hf", "--checkpoint", ckpt, "--out", out, "--tokenizer", qwen_tokenizer_dir]) == 0
    _assert_same_tensors(hfx, folder, out)

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, lengths = prompts
    np.testing.assert_array_equal(hfx.hf_logits(reloaded, ids, lengths), hfx.hf_logits(ref_model, ids, lengths))

    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(qwen_tokenizer_dir, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ref_tok = transformers.AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    messages = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "\\boxed{5}"}]
    assert tok.chat_template == ref_tok.chat_template
    assert tok.apply_chat_template(messages, tokenize=False) == ref_tok.apply_chat_template(messages, tokenize=False)
    # Generation stops at the model's eos and at the chat template's end of turn.
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [ref_model.config.eos_token_id, ref_tok.eos_token_id]
    assert ref_tok.convert_ids_to_tokens(ref_tok.eos_token_id) == "<|im_end|>"


def test_export_reads_only_model_items_of_a_training_checkpoint(hf_folder, hfx, tmp_path, capsys):
    """A trainer saves more items per step; export-hf picks the asked step and ignores the rest."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from lt_jax.model import hf
    from lt_jax.train import checkpoint as ckpt_lib

    folder, _ = hf_folder("qwen3")
    model = hf.load_hf(folder)
    ckpt = str(tmp_path / "train")
    manager = ckpt_lib.checkpoint_manager(ckpt)
    for step, scale in ((100, 1.0), (200, 2.0)):
        params = model.layers.mlp.up_proj.kernel
        params.set_value(params.get_value() * scale)
        items = ckpt_lib.model_items(model)
        items["opt_state"] = ocp.args.StandardSave({"mu": jnp.ones((3,)), "count": jnp.int32(step)})
        items["train_config"] = ocp.args.JsonSave({"lr": 8e-5})
        manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
    manager.close()

    out = str(tmp_path / "hf100")
    assert main(["export-hf", "--checkpoint", ckpt, "--out", out, "--step", "100", "--max-shard-size", "50KB"]) == 0
    _assert_same_tensors(hfx, folder, out)  # step 100 scaled by 1.0
    latest = str(tmp_path / "latest")
    assert main(["export-hf", "--checkpoint", ckpt, "--out", latest, "--dtype", "bfloat16"]) == 0
    up = hfx.safetensors_dict(latest)["model.layers.1.mlp.up_proj.weight"]
    orig = hfx.safetensors_dict(folder)["model.layers.1.mlp.up_proj.weight"]
    assert str(up.dtype) == "bfloat16"
    np.testing.assert_allclose(up.astype(np.float32), 2 * orig, rtol=1e-2)

    _fails(capsys, ["export-hf", "--checkpoint", ckpt, "--out", out, "--step", "7"],
           r"no step 7; available steps: \[100, 200\]")


def test_gcs_import_export(hf_folder, hfx, gcs_bucket, qwen_tokenizer_dir, tmp_path):
    from lt_jax import storage

    folder, _ = hf_folder("llama3")
    remote_hf = f"{gcs_bucket}/base/llama"
    storage.copy_local_to(folder, remote_hf)
    ckpt, out = f"{gcs_bucket}/ckpt", f"{gcs_bucket}/export"
    assert main(["import-hf", "--hf", remote_hf, "--out", ckpt]) == 0
    assert main(["export-hf", "--checkpoint", ckpt, "--out", out, "--tokenizer", qwen_tokenizer_dir]) == 0
    local = storage.download_dir(out, str(tmp_path / "down"))
    _assert_same_tensors(hfx, folder, local)
    with open(os.path.join(qwen_tokenizer_dir, "chat_template.jinja"), "rb") as f:
        assert storage.read_bytes(f"{out}/chat_template.jinja") == f.read()


def _fails(capsys, argv, pattern):
    """The CLI reports bad input as one `lt-jax CMD: error: ...` line and exit status 2."""
    capsys.readouterr()  # drop earlier output (progress bars)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err) and err.startswith(f"lt-jax {argv[0]}: error:"), err


def test_cli_errors(hf_folder, tmp_path, capsys):
    _fails(capsys, ["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "ckpt")], "no config.json")
    _fails(capsys, ["export-hf", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "x")],
           "no checkpoint steps found")
    _fails(capsys, ["import-hf", "--hf", str(tmp_path), "--out", str(tmp_path / "c"), "--mesh", "data=two"], "--mesh")
    with pytest.raises(SystemExit):
        main(["import-hf", "--out", str(tmp_path)])  # --hf is required
    assert "the following arguments are required: --hf" in capsys.readouterr().err

    folder, _ = hf_folder("qwen2_tied")
    ckpt = str(tmp_path / "twice")
    assert main(["import-hf", "--hf", folder, "--out", ckpt, "--step", "5"]) == 0
    _fails(capsys, ["import-hf", "--hf", folder, "--out", ckpt, "--step", "5"], "step 5 already exists")


def test_parse_size():
    import argparse

    from lt_jax.model.hf_cli import parse_size

    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("40kb") == 40_000
    assert parse_size("1234") == 1234
    for bad in ("five", "5XB", "-3GB", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="cannot read"):
            parse_size(bad)


def test_checkpoint_restore_into_mesh_and_dtype(hf_folder, tmp_path):
    import jax
    import jax.numpy as jnp

    from lt_jax.model import hf
    from lt_jax.model.sharding import MeshConfig, make_mesh, model_shardings
    from lt_jax.model.transformer import flat_abstract_state
    from lt_jax.train.checkpoint import load_model_checkpoint, load_model_config, save_model_checkpoint

    folder, _ = hf_folder("llama3")
    model = hf.load_hf(folder)
    ckpt = str(tmp_path / "ckpt")
    save_model_checkpoint(model, ckpt, step=0)
    assert load_model_config(ckpt) == model.config
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    restored = load_model_checkpoint(ckpt, mesh=mesh, param_dtype="bfloat16")
    assert restored.config.param_dtype == "bfloat16" and restored.config.rope_scaling == model.config.rope_scaling
    want = model_shardings(restored, mesh)
    original = flat_abstract_state(model)
    for path, leaf in flat_abstract_state(restored).items():
        assert leaf.sharding == want[path] and leaf.dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(original[path].astype(jnp.bfloat16)), err_msg=path)
    spec = restored.layers.attn.q_proj.kernel.get_value().sharding.spec
    assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # really sharded, not replicated
