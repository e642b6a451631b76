"""Qwen3-MoE (model_type qwen3_moe) against transformers' Qwen3MoeForCausalLM: config, logits on
padded and packed rows, the load-balancing loss, import/export of the per-expert tensors, greedy
generation, loading on a mesh."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import jax

from hf_models import hf_greedy, redrawn_from_config
from lt_jax.model import hf, moe
from lt_jax.model import transformer as tfm

# 3 layers, 4 experts, top-2; layer 1 dense (mlp_only_layers). SPARSE_STEP: layers 0 and 2 dense.
MAIN = dict(mlp_only_layers=[1], norm_topk_prob=False)
SPARSE_STEP = dict(decoder_sparse_step=2, norm_topk_prob=True)
ALL_SPARSE = dict(norm_topk_prob=True)  # the released checkpoints' layout: one stack, one scan
VOCAB = 256


def redrawn_moe(extra: dict, seed: int = 0):
    """A random-init Qwen3MoeForCausalLM with every weight redrawn (norms near 1, others ~N(0, 0.1))."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, router_aux_loss_coef=0.01, bos_token_id=None, eos_token_id=None, **extra,
    )
    return redrawn_from_config(config, seed)


@pytest.fixture(scope="module")
def moe_folders(tmp_path_factory):
    out = {}
    for name, extra in (("main", MAIN), ("sparse_step", SPARSE_STEP), ("all_sparse", ALL_SPARSE)):
        model = redrawn_moe(extra)
        folder = str(tmp_path_factory.mktemp(f"hf_qwen3_moe_{name}"))
        model.save_pretrained(folder)
        out[name] = (folder, model)
    return out


@pytest.fixture(scope="module")
def main_model(moe_folders):
    return hf.load_hf(moe_folders["main"][0])


def _jit(model, method="__call__"):
    """`model.<method>` under jax.jit (eager calls re-trace every layer scan on each call)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda st, *a, **kw: getattr(nnx.merge(graphdef, st), method)(*a, **kw))
    return lambda *a, **kw: fn(state, *a, **kw)


def _padded(seed=1):
    rng = np.random.RandomState(seed)
    lengths = np.array([12, 7, 3, 10])
    ids = rng.randint(1, VOCAB, size=(4, 12))
    ids[np.arange(12)[None, :] >= lengths[:, None]] = 0
    return ids, lengths


def test_config_roundtrip_and_layer_kinds(moe_folders):
    import transformers

    folder, ref = moe_folders["main"]
    with open(os.path.join(folder, "config.json")) as f:
        data = json.load(f)
    assert "num_local_experts" in data  # transformers 5 writes num_experts under this name
    cfg = hf.hf_to_model_config(data)
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == ("qwen3_moe", 4, 2, 32)
    assert cfg.qk_norm and cfg.sparse_layers == (True, False, True) and cfg.router_aux_loss_coef == 0.01
    assert cfg.layer_groups == {"layers": (0, 2), "dense_layers": (1,)}
    assert tfm.layer_runs(cfg) == [("layers", 0, 1), ("dense_layers", 0, 1), ("layers", 1, 2)]
    exported = hf.model_config_to_hf(cfg)
    assert hf.hf_to_model_config(exported) == cfg
    back = transformers.AutoConfig.for_model(**exported)
    assert type(back) is type(ref.config) and back.num_experts == 4 and back.mlp_only_layers == [1]
    step = hf.read_config(moe_folders["sparse_step"][0])
    assert step.sparse_layers == (False, True, False) and step.norm_topk_prob


def test_param_count_and_active_flops(main_model):
    from lt_jax.model import families

    cfg = main_model.config
    flat = tfm.flat_abstract_state(main_model)
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == cfg.num_params()
    # Active: 2 of 4 experts in the two sparse layers.
    inactive = 2 * 2 * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert cfg.num_params(active=True) == cfg.num_params() - inactive
    matmul = cfg.num_params(include_embeddings=False, active=True)
    assert families.get("qwen3_moe").flops_per_token(cfg) == 6.0 * matmul


@pytest.mark.parametrize("variant", ["main", "sparse_step", "all_sparse"])
def test_logits_match_transformers_on_padded_rows(moe_folders, variant, hfx):
    folder, ref_model = moe_folders[variant]
    ids, lengths = _padded()
    ref = hfx.hf_logits(ref_model, ids, lengths)
    assert ref.std() > 0.1
    model = hf.load_hf(folder)
    assert (model.dense_layers is None) == (variant == "all_sparse")
    ours = np.asarray(_jit(model)(ids, segment_ids=hfx.segment_ids(ids, lengths)))
    assert hfx.real_token_diff(ours, ref, lengths) < 1e-4


def test_packed_rows_equal_documents_alone(moe_folders, main_model):
    import torch

    ref_model = moe_folders["main"][1]
    rng = np.random.RandomState(5)
    docs = [rng.randint(1, VOCAB, n).astype(np.int32) for n in (6, 9, 5)]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(4)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(4)])[None].astype(np.int32)
    ids = np.concatenate(docs + [np.zeros(4, np.int32)])[None]
    packed = np.asarray(_jit(main_model)(ids, pos, seg))[0]
    start = 0
    for doc in docs:
        with torch.no_grad():
            alone = ref_model(input_ids=torch.tensor(doc[None].astype(np.int64))).logits[0].numpy()
        np.testing.assert_allclose(packed[start: start + len(doc)], alone, atol=1e-4, rtol=0)
        start += len(doc)


def _aux(model, ids, seg, pos=None):
    _, stats = _jit(model, "hidden_states_and_router_stats")(ids, pos, seg)
    return float(moe.load_balancing_loss(stats)), stats


def test_aux_loss_equals_transformers_and_ignores_padding(moe_folders, main_model, hfx):
    import torch

    ref_model = moe_folders["main"][1]
    ids, lengths = _padded(2)
    mask = hfx.segment_ids(ids, lengths)
    with torch.no_grad():
        out = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                        output_router_logits=True)
        full = ref_model(input_ids=torch.tensor(ids[:1]), output_router_logits=True)  # unpadded row
    ours, stats = _aux(main_model, ids, mask)
    np.testing.assert_allclose(ours, float(out.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(_aux(main_model, ids[:1], mask[:1])[0], float(full.aux_loss), rtol=1e-5)
    assert float(stats.tokens) == 2 * lengths.sum()  # two sparse layers x real tokens
    # More padding (other ids in it, a longer row) leaves the loss and the statistics unchanged.
    wider = np.concatenate([np.where(mask > 0, ids, 7), np.full((4, 5), 9)], axis=1)
    again, stats2 = _aux(main_model, wider, np.pad(mask, ((0, 0), (0, 5))))
    assert again == pytest.approx(ours, rel=1e-6)
    np.testing.assert_allclose(np.asarray(stats2.slots), np.asarray(stats.slots))
    # Packed rows: the loss is per token, so the same documents packed into one row give the same value.
    docs = [ids[b, :n] for b, n in enumerate(lengths)]
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    pos = np.concatenate([np.arange(len(d)) for d in docs])[None]
    packed, _ = _aux(main_model, np.concatenate(docs)[None], seg, pos)
    assert packed == pytest.approx(ours, rel=1e-5)


def test_import_export_gives_the_original_tensors_and_loads_in_transformers(moe_folders, main_model, hfx, tmp_path):
    import torch
    import transformers

    folder, ref_model = moe_folders["main"]
    out = str(tmp_path / "export")
    hf.save_hf(main_model, out, max_shard_bytes=100_000)
    original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(out)
    assert sorted(original) == sorted(exported)
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in exported and "model.layers.1.mlp.up_proj.weight" in exported
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
    ids, lengths = _padded()
    np.testing.assert_array_equal(hfx.hf_logits(reloaded, ids, lengths), hfx.hf_logits(ref_model, ids, lengths))


def test_load_on_mesh_reads_expert_slices(moe_folders, hfx, monkeypatch):
    from lt_jax.model.sharding import MeshConfig, make_mesh

    folder, ref_model = moe_folders["main"]
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    reads = []
    original = hf.SafetensorsFolder.read
    monkeypatch.setattr(hf.SafetensorsFolder, "read", lambda self, req: reads.extend(req) or original(self, req))
    model = hf.load_hf(folder, mesh=mesh)
    ref = {k: v.numpy() for k, v in ref_model.state_dict().items()}
    gate = np.asarray(model.layers.mlp.experts.gate_proj.get_value())  # [2 sparse layers, E, H, I]
    np.testing.assert_array_equal(gate[1, 3], ref["model.layers.2.mlp.experts.gate_up_proj"][3, :32].T)
    # gate_proj.weight [I=32, H=48]: tensor splits I, fsdp splits H: each read is a 16 x 24 block.
    blocks = [idx for name, idx in reads if name == "model.layers.0.mlp.experts.1.gate_proj.weight"]
    assert len(blocks) == 4 and all((s.stop - s.start) in (16, 24) for idx in blocks for s in idx)
    ids, lengths = _padded()
    with jax.set_mesh(mesh):
        ours = np.asarray(model(ids, segment_ids=hfx.segment_ids(ids, lengths)))
    assert hfx.real_token_diff(ours, hfx.hf_logits(ref_model, ids, lengths), lengths) < 1e-4


def test_greedy_generation_equals_transformers(moe_folders, main_model):
    from lt_jax.sample import engine as eng
    from lt_jax.sample import sampler as smp

    ref_model = moe_folders["main"][1]
    rng = np.random.RandomState(3)
    prompts = [[int(t) for t in rng.randint(1, VOCAB, size=n)] for n in (9, 3, 20)]
    new = 10
    engine = eng.Engine(main_model, eng.EngineConfig(num_slots=2, page_size=8, decode_steps=4, prefill_chunk=16))
    got = engine.run(prompts, [[smp.RowSpec(0, temperature=0.0, max_new_tokens=new)] for _ in prompts])
    for p, res in zip(prompts, got):
        assert res[0].tokens == hf_greedy(ref_model, p, new), f"prompt of length {len(p)}"
    # The KV-cache path (Transformer.__call__ with a cache) too.
    p = prompts[0]
    step = _jit(main_model)
    logits, cache = step(np.asarray([p]), cache=tfm.init_cache(main_model.config, 1, len(p) + new))
    out = []
    for _ in range(new):
        out.append(int(np.argmax(np.asarray(logits)[0, -1])))
        logits, cache = step(np.asarray([[out[-1]]]), cache=cache)
    assert out == hf_greedy(ref_model, p, new)


def test_qwen2_moe_shared_expert_matches_transformers_and_exports(hfx, tmp_path):
    """Qwen2-MoE: the same router and experts plus a sigmoid-gated shared expert, q/k/v biases."""
    import torch
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=40, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None,
    )
    ref_model = redrawn_from_config(config)
    folder = str(tmp_path / "qwen2_moe")
    ref_model.save_pretrained(folder)
    model = hf.load_hf(folder)
    assert model.config.shared_expert_intermediate_size == 40 and model.config.attention_bias
    ids, lengths = _padded()
    ref = hfx.hf_logits(ref_model, ids, lengths)
    ours = np.asarray(_jit(model)(ids, segment_ids=hfx.segment_ids(ids, lengths)))
    assert hfx.real_token_diff(ours, ref, lengths) < 1e-4
    out = str(tmp_path / "export")
    hf.save_hf(model, out)
    original, exported = hfx.safetensors_dict(folder), hfx.safetensors_dict(out)
    assert sorted(original) == sorted(exported) and "model.layers.2.mlp.shared_expert_gate.weight" in exported
    for name in original:
        np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(reloaded) is type(ref_model)
