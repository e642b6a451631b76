"""Phi-3 / Phi-4 (model_type phi3) through its family spec, against transformers' Phi3ForCausalLM.

The family differs from Llama only in its fused HF tensors (qkv_proj, gate_up_proj): loading
splits them into the decoder's kernels, saving fuses them back.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hf_models import redrawn_model
from lt_jax.model import hf

# Phi-4's layout (partial_rotary_factor 1, no sliding window); pad None: Phi3Config's default pad
# id (32000) indexes past the tiny vocabulary.
PHI3 = dict(rope_theta=250000.0, bos_token_id=1, eos_token_id=2, pad_token_id=None, sliding_window=None)


@pytest.fixture(scope="module")
def phi3_folder(tmp_path_factory):
    """(folder, torch model): a random-init Phi3ForCausalLM saved with save_pretrained."""
    model = redrawn_model("Phi3Config", PHI3, seed=3)
    folder = str(tmp_path_factory.mktemp("hf_phi3"))
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def _config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def test_hf_tensors_are_fused(phi3_folder, hfx):
    names = set(hfx.safetensors_dict(phi3_folder[0]))
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any("q_proj" in n or "gate_proj" in n for n in names)


def test_config_roundtrip_and_defaults(phi3_folder):
    import transformers

    folder, ref = phi3_folder
    cfg = hf.hf_to_model_config(_config(folder))
    assert cfg.family == "phi3" and not cfg.attention_bias and not cfg.qk_norm
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.eos_token_id) == (250000.0, ref.config.rms_norm_eps, 2)
    exported = hf.model_config_to_hf(cfg)
    assert hf.hf_to_model_config(exported) == cfg
    back = transformers.AutoConfig.for_model(**exported)
    assert type(back) is type(ref.config) and back.rope_parameters == ref.config.rope_parameters
    # Absent keys take Phi3Config's defaults, not Llama's.
    bare = {k: v for k, v in _config(folder).items() if k not in ("rms_norm_eps", "max_position_embeddings")}
    default = transformers.Phi3Config()
    cfg = hf.hf_to_model_config(bare)
    assert (cfg.rms_norm_eps, cfg.max_position_embeddings) == (default.rms_norm_eps, default.max_position_embeddings)


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                              "long_factor": [1.0] * 8}}, "rope type 'longrope' is not supported for phi3"),
        # The classic hub form (Phi-4-mini): top level, no rope_parameters.
        ({"rope_parameters": None, "rope_theta": 1e4, "partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
         "partial_rotary_factor 0.5"),
        ({"sliding_window": 2047, "max_position_embeddings": 4096}, "sliding_window 2047"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_unsupported_phi3_configs_are_refused(change, needle, phi3_folder):
    data = {k: v for k, v in dict(_config(phi3_folder[0]), **change).items() if v is not None}
    with pytest.raises(hf.HFFormatError) as e:
        hf.hf_to_model_config(data, "/phi/config.json")
    assert str(e.value).startswith("/phi/config.json: ") and needle in str(e.value)


def test_window_as_long_as_the_context_is_full_attention(phi3_folder):
    data = dict(_config(phi3_folder[0]), sliding_window=256, max_position_embeddings=256)
    assert hf.hf_to_model_config(data).family == "phi3"


def test_logits_match_transformers_on_padded_rows(phi3_folder, prompts, hfx):
    folder, ref_model = phi3_folder
    ids, lengths = prompts
    ref = hfx.hf_logits(ref_model, ids, lengths)
    assert ref.std() > 0.1
    model = hf.load_hf(folder)
    ours = np.asarray(model(ids, segment_ids=hfx.segment_ids(ids, lengths)))
    assert hfx.real_token_diff(ours, ref, lengths) < 1e-4


def test_packed_rows_equal_documents_alone(phi3_folder, hfx):
    import torch

    folder, ref_model = phi3_folder
    model = hf.load_hf(folder)
    rng = np.random.RandomState(5)
    docs = [rng.randint(1, 512, n).astype(np.int32) for n in (6, 9, 5)]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(len(d)) for d in docs])[None].astype(np.int32)
    packed = np.asarray(model(np.concatenate(docs)[None], pos, seg))[0]
    start = 0
    for doc in docs:
        with torch.no_grad():
            alone = ref_model(input_ids=torch.tensor(doc[None].astype(np.int64))).logits[0].numpy()
        np.testing.assert_allclose(packed[start : start + len(doc)], alone, atol=1e-4, rtol=0)
        start += len(doc)


def test_load_on_mesh_splits_the_fused_tensors(phi3_folder, prompts, hfx):
    import jax

    from lt_jax.model.sharding import MeshConfig, make_mesh

    folder, ref_model = phi3_folder
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    model = hf.load_hf(folder, mesh=mesh)
    ref = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    qkv = ref["model.layers.1.self_attn.qkv_proj.weight"]  # rows: q (64), k (32), v (32)
    np.testing.assert_array_equal(np.asarray(model.layers.attn.k_proj.kernel.get_value())[1], qkv[64:96].T)
    gate_up = ref["model.layers.0.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(np.asarray(model.layers.mlp.up_proj.kernel.get_value())[0], gate_up[128:].T)
    ids, lengths = prompts
    with jax.set_mesh(mesh):
        ours = np.asarray(model(ids, segment_ids=hfx.segment_ids(ids, lengths)))
    assert hfx.real_token_diff(ours, hfx.hf_logits(ref_model, ids, lengths), lengths) < 1e-4


def test_export_fuses_again_bitwise_and_loads_in_transformers(phi3_folder, prompts, hfx, tmp_path):
    import torch
    import transformers

    folder, ref_model = phi3_folder
    out = str(tmp_path / "export")
    hf.save_hf(hf.load_hf(folder), out, max_shard_bytes=60_000)
    original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
    ids, lengths = prompts
    np.testing.assert_array_equal(hfx.hf_logits(reloaded, ids, lengths), hfx.hf_logits(ref_model, ids, lengths))
