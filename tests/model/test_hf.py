"""Hugging Face import/export against transformers as the reference."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from lt_jax.model import hf
from lt_jax.model.hf import HFFormatError, hf_to_model_config, model_config_to_hf

VARIANTS = ["qwen2_tied", "qwen2_untied", "qwen3", "llama3"]


def _our_logits(model, ids, lengths, hfx):
    return np.asarray(model(ids, segment_ids=hfx.segment_ids(ids, lengths)))


def _params(model) -> dict[str, np.ndarray]:
    from lt_jax.model.transformer import flat_abstract_state

    return {k: np.asarray(v) for k, v in flat_abstract_state(model).items()}


def _read_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Config conversion


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_roundtrip_through_transformers(variant, hf_folder):
    import transformers

    folder, ref = hf_folder(variant)
    cfg = hf_to_model_config(_read_config(folder))
    assert cfg.family == variant.split("_")[0].replace("llama3", "llama")
    assert cfg.tie_word_embeddings == (variant == "qwen2_tied")
    assert cfg.attention_bias == variant.startswith("qwen2") and cfg.qk_norm == (variant == "qwen3")
    assert cfg.resolved_head_dim == (32 if variant == "qwen3" else 16)
    exported = model_config_to_hf(cfg)
    assert hf_to_model_config(exported) == cfg
    back = transformers.AutoConfig.for_model(**exported)
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(back, key) == getattr(ref.config, key), key
    assert back.rope_parameters == ref.config.rope_parameters


def test_classic_and_transformers5_config_forms_agree(hf_folder):
    folder, _ = hf_folder("llama3")
    v5 = _read_config(folder)
    assert "rope_parameters" in v5 and "rope_scaling" not in v5  # what transformers 5.23 writes
    params = dict(v5.pop("rope_parameters"))
    classic = dict(v5, rope_theta=params.pop("rope_theta"), torch_dtype="bfloat16")
    for key in ("rope_type", "type"):  # Llama 3.1 hub configs use rope_type; older exports "type"
        scaling = {k: v for k, v in params.items() if k != "rope_type"}
        classic["rope_scaling"] = dict(scaling, **{key: "llama3"})
        assert hf_to_model_config(classic) == hf_to_model_config(_read_config(folder))
    cfg = hf_to_model_config(classic)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.original_max_position_embeddings == 32


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported; supported: llama, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope type 'yarn'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_unsupported_configs_name_file_and_field(change, needle, hf_folder):
    folder, _ = hf_folder("qwen3")
    data = dict(_read_config(folder), **change)
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(HFFormatError) as e:
        hf_to_model_config(data, "/some/dir/config.json")
    assert str(e.value).startswith("/some/dir/config.json: ")
    assert needle in str(e.value)


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("variant", VARIANTS)
def test_load_hf_logits_match_transformers(variant, hf_folder, prompts, hfx):
    import lt_jax

    folder, ref_model = hf_folder(variant)
    ids, lengths = prompts
    ref = hfx.hf_logits(ref_model, ids, lengths)
    assert ref.std() > 0.1  # logits vary enough for a layout bug to show
    model = lt_jax.load_hf(folder)
    assert hfx.real_token_diff(_our_logits(model, ids, lengths, hfx), ref, lengths) < 1e-4


def test_sharded_index_loads_identically(hf_folder):
    single, _ = hf_folder("qwen2_untied")
    sharded, _ = hf_folder("qwen2_untied", max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, hf.INDEX_FILE))
    assert len([n for n in os.listdir(sharded) if n.endswith(".safetensors")]) > 2
    a, b = _params(hf.load_hf(single)), _params(hf.load_hf(sharded))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bf16_checkpoint_upcasts_exactly(hf_folder, hfx):
    import jax.numpy as jnp

    folder, ref_model = hf_folder("qwen3", dtype="bfloat16")
    ref = {k: v.float().numpy() for k, v in ref_model.state_dict().items()}
    fp32 = _params(hf.load_hf(folder))
    assert fp32["layers.attn.q_norm.scale"].dtype == np.float32
    np.testing.assert_array_equal(fp32["layers.attn.q_proj.kernel"][1], ref["model.layers.1.self_attn.q_proj.weight"].T)
    bf16 = hf.load_hf(folder, dtype="bfloat16")
    assert bf16.config.compute_dtype == "bfloat16"
    kernel = bf16.layers.mlp.down_proj.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel[0], np.float32), ref["model.layers.0.mlp.down_proj.weight"].T)


def test_load_on_mesh_reads_only_slices_and_matches(hf_folder, prompts, hfx, monkeypatch):
    import jax

    from lt_jax.model.sharding import MeshConfig, make_mesh, model_shardings
    from lt_jax.model.transformer import flat_abstract_state

    folder, ref_model = hf_folder("qwen2_untied")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    reads = []
    original = hf.SafetensorsFolder.read
    monkeypatch.setattr(hf.SafetensorsFolder, "read", lambda self, req: reads.extend(req) or original(self, req))
    model = hf.load_hf(folder, mesh=mesh)

    expected = model_shardings(model, mesh)
    for path, leaf in flat_abstract_state(model).items():
        assert leaf.sharding == expected[path], path
    q = model.layers.attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    # HF q_proj.weight is [out=64, in=64]; fsdp splits `in`, tensor splits `out`: 32x32 blocks, each read once.
    q_reads = [idx for name, idx in reads if name == "model.layers.0.self_attn.q_proj.weight"]
    assert len(q_reads) == 4
    assert all((s.stop - s.start) == 32 for idx in q_reads for s in idx)

    ids, lengths = prompts
    with jax.set_mesh(mesh):
        ours = _our_logits(model, ids, lengths, hfx)
    assert hfx.real_token_diff(ours, hfx.hf_logits(ref_model, ids, lengths), lengths) < 1e-4


# ---------------------------------------------------------------------------------------------
# Bad input: every message names the file and the tensor


def _rewrite(folder, tmp_path, edit):
    """Copy of `folder` with model.safetensors passed through `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path / "bad"
    shutil.copytree(folder, out)
    path = str(out / "model.safetensors")
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return str(out), path


def test_missing_config_json(tmp_path):
    with pytest.raises(HFFormatError, match=f"{tmp_path}: no config.json"):
        hf.load_hf(str(tmp_path))


def test_no_safetensors(hf_folder, tmp_path):
    folder, _ = hf_folder("llama3")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    with pytest.raises(HFFormatError, match="no model.safetensors or model.safetensors.index.json"):
        hf.load_hf(str(tmp_path))


def test_missing_tensor(hf_folder, tmp_path):
    folder, _ = hf_folder("llama3")
    name = "model.layers.1.mlp.up_proj.weight"
    bad, path = _rewrite(folder, tmp_path, lambda t: {k: v for k, v in t.items() if k != name})
    with pytest.raises(HFFormatError) as e:
        hf.load_hf(bad)
    assert str(e.value) == f"{path}: tensor '{name}' is missing (a llama model needs it)"


def test_unexpected_tensor(hf_folder, tmp_path):
    folder, _ = hf_folder("llama3")
    name = "model.layers.0.self_attn.o_proj.bias"
    bad, path = _rewrite(folder, tmp_path, lambda t: dict(t, **{name: np.zeros(64, np.float32)}))
    with pytest.raises(HFFormatError) as e:
        hf.load_hf(bad)
    assert str(e.value).startswith(f"{path}: unexpected tensor '{name}'")


def test_shape_mismatch(hf_folder, tmp_path):
    folder, _ = hf_folder("llama3")
    name = "model.layers.0.mlp.down_proj.weight"
    bad, path = _rewrite(folder, tmp_path, lambda t: dict(t, **{name: np.zeros((64, 96), np.float32)}))
    with pytest.raises(HFFormatError) as e:
        hf.load_hf(bad)
    assert str(e.value) == f"{path}: tensor '{name}' has shape [64, 96], but config.json implies [64, 128]"


def test_missing_tensor_in_sharded_folder_names_the_index(hf_folder, tmp_path):
    folder, _ = hf_folder("qwen2_untied", max_shard_size="40KB")
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    index_path = bad / hf.INDEX_FILE
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.norm.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(HFFormatError) as e:
        hf.load_hf(str(bad))
    assert str(e.value) == f"{index_path}: tensor 'model.norm.weight' is missing (a qwen2 model needs it)"


def test_tied_checkpoint_may_store_an_equal_lm_head_only(hf_folder, prompts, hfx, tmp_path):
    folder, ref_model = hf_folder("qwen2_tied")
    copy, _ = _rewrite(folder, tmp_path, lambda t: dict(t, **{"lm_head.weight": t["model.embed_tokens.weight"]}))
    ids, lengths = prompts
    ours = _our_logits(hf.load_hf(copy), ids, lengths, hfx)
    assert hfx.real_token_diff(ours, hfx.hf_logits(ref_model, ids, lengths), lengths) < 1e-4

    shutil.rmtree(copy)
    bad, path = _rewrite(folder, tmp_path, lambda t: dict(t, **{"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
    with pytest.raises(HFFormatError) as e:
        hf.load_hf(bad)
    assert str(e.value).startswith(f"{path}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight'")


# ---------------------------------------------------------------------------------------------
# Saving


@pytest.mark.parametrize("variant, max_shard_bytes", [("qwen2_tied", 10**9), ("llama3", 60_000)])
def test_save_hf_roundtrip_is_bitwise_and_loads_in_transformers(
    variant, max_shard_bytes, hf_folder, prompts, hfx, tmp_path
):
    import torch
    import transformers

    folder, ref_model = hf_folder(variant)
    out = str(tmp_path / "export")
    files = hf.save_hf(hf.load_hf(folder), out, max_shard_bytes=max_shard_bytes)
    original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        assert exported[name].dtype == original[name].dtype
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    shards = [f for f in files if f.endswith(".safetensors")]
    if max_shard_bytes < 10**9:
        assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        index = json.loads(open(os.path.join(out, hf.INDEX_FILE)).read())
        assert set(index["weight_map"]) == set(original) and set(index["weight_map"].values()) == set(shards)
    else:
        assert shards == ["model.safetensors"]

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
    ids, lengths = prompts
    np.testing.assert_array_equal(hfx.hf_logits(reloaded, ids, lengths), hfx.hf_logits(ref_model, ids, lengths))


def test_save_hf_bf16_matches_torch_rounding(hf_folder, hfx, tmp_path):
    import torch

    folder, ref_model = hf_folder("qwen3")
    out = str(tmp_path / "bf16")
    hf.save_hf(hf.load_hf(folder), out, dtype="bfloat16")
    exported = hfx.safetensors_dict(out)
    assert _read_config(out)["torch_dtype"] == "bfloat16"
    for name, tensor in ref_model.state_dict().items():
        want = tensor.to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(exported[name].astype(np.float32), want, err_msg=name)


def test_reexport_with_fewer_shards_removes_stale_files(hf_folder, tmp_path):
    folder, _ = hf_folder("qwen2_untied")
    model = hf.load_hf(folder)
    out = str(tmp_path / "export")
    hf.save_hf(model, out, max_shard_bytes=40_000)
    hf.save_hf(model, out)
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]


def test_save_hf_checks_the_tokenizer_folder_before_writing(hf_folder, tmp_path):
    folder, _ = hf_folder("qwen2_tied")
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    with pytest.raises(HFFormatError, match=f"{empty}: no tokenizer files"):
        hf.save_hf(hf.load_hf(folder), str(out), tokenizer_dir=str(empty))
    assert not out.exists()


def test_save_hf_gathers_a_mesh_sharded_model(hf_folder, hfx, tmp_path):
    from lt_jax.model.sharding import MeshConfig, make_mesh

    folder, _ = hf_folder("qwen3")
    model = hf.load_hf(folder, mesh=make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)))
    out = str(tmp_path / "export")
    hf.save_hf(model, out, max_shard_bytes=50_000)
    original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# gs://


def test_load_hf_from_gcs_reads_ranges(hf_folder, gcs_bucket):
    from lt_jax import storage
    from lt_jax.model.sharding import MeshConfig, make_mesh

    folder, _ = hf_folder("qwen2_untied", max_shard_size="40KB")
    remote = f"{gcs_bucket}/models/tiny"
    storage.copy_local_to(folder, remote)
    local = _params(hf.load_hf(folder))
    for mesh in (None, make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        loaded = _params(hf.load_hf(remote, mesh=mesh))
        assert loaded.keys() == local.keys()
        for k in local:
            np.testing.assert_array_equal(loaded[k], local[k], err_msg=k)
    with pytest.raises(HFFormatError, match=f"{gcs_bucket}/nothing: no config.json"):
        hf.load_hf(f"{gcs_bucket}/nothing")


def test_save_hf_to_gcs(hf_folder, hfx, gcs_bucket, qwen_tokenizer_dir, tmp_path):
    from lt_jax import storage

    folder, _ = hf_folder("llama3")
    remote = f"{gcs_bucket}/export"
    hf.save_hf(hf.load_hf(folder), remote, tokenizer_dir=qwen_tokenizer_dir, max_shard_bytes=60_000)
    local = storage.download_dir(remote, str(tmp_path / "down"))
    original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(local)
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    for name in os.listdir(qwen_tokenizer_dir):
        with open(os.path.join(qwen_tokenizer_dir, name), "rb") as a, open(os.path.join(local, name), "rb") as b:
            assert a.read() == b.read(), name


# ---------------------------------------------------------------------------------------------
# Two processes (jax.distributed over gloo): per-host slice reads, gathers, process-0 writes


def _two_process_worker(pid: int, port: int, folder: str, out: str) -> None:
    """Runs in a child process: 4 local CPU devices, 8 global, mesh fsdp=4 x tensor=2."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    from lt_jax.model.sharding import MeshConfig, make_mesh
    from lt_jax.train.checkpoint import load_model_checkpoint, save_model_checkpoint

    reads = []
    original = hf.SafetensorsFolder.read
    hf.SafetensorsFolder.read = lambda self, req: reads.extend(req) or original(self, req)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    model = hf.load_hf(folder, mesh=mesh)
    hf.save_hf(model, os.path.join(out, "direct"), max_shard_bytes=50_000)
    save_model_checkpoint(model, os.path.join(out, "ckpt"), step=3)
    hf.save_hf(load_model_checkpoint(os.path.join(out, "ckpt"), mesh=mesh), os.path.join(out, "via_ckpt"))
    blocks = sorted({tuple((s.start, s.stop) for s in idx) for n, idx in reads if n.endswith("0.mlp.gate_proj.weight")})
    with open(os.path.join(out, f"reads{pid}.json"), "w") as f:
        json.dump(blocks, f)


@pytest.mark.slow
def test_two_processes_load_and_save(hf_folder, hfx, tmp_path):
    import socket
    import subprocess
    import sys

    folder, _ = hf_folder("qwen3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_hf; "
        "test_hf._two_process_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(pid), str(port), folder, str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)

    for sub in ("direct", "via_ckpt"):
        original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(str(tmp_path / sub))
        assert sorted(original) == sorted(exported)
        for name in original:
            np.testing.assert_array_equal(exported[name], original[name], err_msg=f"{sub}: {name}")
    # gate_proj.weight is [128, 64]; each host holds half of `in` (fsdp) and reads only that half.
    reads = [json.loads((tmp_path / f"reads{pid}.json").read_text()) for pid in range(2)]
    cols = [{tuple(block[1]) for block in r} for r in reads]
    assert cols[0].isdisjoint(cols[1])
    assert sorted(cols[0] | cols[1]) == [(0, 16), (16, 32), (32, 48), (48, 64)]
