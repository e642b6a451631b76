"""The decoder on one device: packing, padding, families, dtypes, remat, KV cache, construction."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lt_jax.model.config import ModelConfig, RopeScaling
from lt_jax.model.transformer import (
    abstract_model,
    flat_abstract_state,
    init_cache,
    init_model,
    model_from_state,
    rope_inv_freq,
)

VOCAB = 256
FAMILIES = {
    "qwen2": ModelConfig(family="qwen2", vocab_size=VOCAB, attention_bias=True, rope_theta=1e6),
    "qwen3": ModelConfig(family="qwen3", vocab_size=VOCAB, qk_norm=True, head_dim=32, tie_word_embeddings=True),
    "llama": ModelConfig(
        family="llama", vocab_size=VOCAB, rope_theta=5e5, rms_norm_eps=1e-5,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16),
    ),
}


@nnx.jit
def forward(model, ids, positions, segment_ids):
    return model(ids, positions, segment_ids)


@nnx.jit
def call(model, ids):
    return model(ids)


def _ids(rng, *shape):
    return rng.randint(1, VOCAB, shape).astype(np.int32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_documents_match_running_each_alone(family):
    cfg = FAMILIES[family]
    model = init_model(cfg, seed=1)
    rng = np.random.RandomState(0)
    lengths = (7, 9, 8)
    docs = [_ids(rng, n) for n in lengths]
    ids = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    packed = np.asarray(forward(model, ids, pos, seg))[0]
    # Each document alone in its own row (right-padded to a common length, which
    # test_padding_gives_the_unpadded_logits_and_no_nans shows is the same as unpadded).
    n = max(lengths)
    alone_ids = np.stack([np.pad(d, (0, n - len(d))) for d in docs])
    alone_seg = np.stack([np.pad(np.ones(len(d), np.int32), (0, n - len(d))) for d in docs])
    alone = np.asarray(forward(model, alone_ids, np.broadcast_to(np.arange(n, dtype=np.int32), (3, n)), alone_seg))
    start = 0
    for i, doc in enumerate(docs):
        np.testing.assert_allclose(packed[start : start + len(doc)], alone[i, : len(doc)], atol=1e-5, rtol=1e-5)
        start += len(doc)
    assert np.abs(packed).max() > 1e-3, "logits should not be trivially zero"


def test_padding_gives_the_unpadded_logits_and_no_nans():
    cfg = FAMILIES["qwen2"]
    model = init_model(cfg)
    rng = np.random.RandomState(1)
    rows = [_ids(rng, 16), _ids(rng, 10)]
    ids = np.zeros((2, 16), np.int32)  # pad id 0
    seg = np.zeros((2, 16), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)], seg[i, : len(r)] = r, 1
    pos = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16))
    out = np.asarray(forward(model, ids, pos, seg))
    assert np.isfinite(out).all()
    for i, r in enumerate(rows):
        alone = np.asarray(call(model, r[None]))[0]  # default positions/segments
        np.testing.assert_allclose(out[i, : len(r)], alone, atol=1e-5, rtol=1e-5)


def test_llama3_rope_frequencies_match_transformers():
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(
        family="llama", hidden_size=128, num_heads=2, num_kv_heads=1, rope_theta=5e5,
        rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=64),
    )
    hf = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=2, num_key_value_heads=1, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    )
    ref, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, None)
    ours = rope_inv_freq(cfg)
    assert scaling == 1.0
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    assert not np.allclose(ours, plain), "this config must exercise the scaled bands"


def _with_config(model, cfg):
    """The same parameters under another config (dtype, remat), without compiling a new init."""
    return model_from_state(abstract_model(cfg), flat_abstract_state(model))


def test_bf16_compute_and_bf16_params():
    cfg = FAMILIES["qwen2"]
    ids = _ids(np.random.RandomState(2), 2, 12)
    model = init_model(cfg)
    ref = np.asarray(call(model, ids))
    out = call(_with_config(model, dataclasses.replace(cfg, compute_dtype="bfloat16")), ids)
    assert out.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert 0 < rel < 3e-2, rel
    both = _with_config(model, dataclasses.replace(cfg, compute_dtype="bfloat16", param_dtype="bfloat16"))
    assert all(v.dtype == jnp.bfloat16 for v in flat_abstract_state(both).values())
    out = call(both, ids)
    assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
    rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert rel < 5e-2, rel


def _grads(model, ids):
    @nnx.jit
    def grad_fn(model):
        def loss(m):
            logits = m(ids[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1))

        return nnx.grad(loss)(model)

    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grad_fn(model))}


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients():
    cfg = FAMILIES["qwen3"]
    ids = jnp.asarray(_ids(np.random.RandomState(3), 2, 17))
    model = init_model(cfg, seed=3)
    base = _grads(model, ids)
    assert set(base) == set(flat_abstract_state(model))
    for policy in ("full", "dots", "dots_with_no_batch_dims", "save_attention_out"):
        got = _grads(_with_config(model, dataclasses.replace(cfg, remat=policy)), ids)
        for name, g in base.items():
            np.testing.assert_allclose(got[name], g, atol=1e-6, rtol=1e-6, err_msg=f"{policy}: {name}")


def test_kv_cache_prefill_and_decode_equal_full_forward():
    """Right-padded prompts of different lengths, prefill, then two decode steps per row."""
    cfg = FAMILIES["qwen3"]
    model = init_model(cfg, seed=4)
    rng = np.random.RandomState(4)
    prompts, new = [_ids(rng, 5), _ids(rng, 3)], _ids(rng, 2, 2)
    ids = np.zeros((2, 5), np.int32)
    seg = np.zeros((2, 5), np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)], seg[i, : len(p)] = p, 1
    pos = np.broadcast_to(np.arange(5, dtype=np.int32), (2, 5))

    step = nnx.jit(lambda m, i, p, s, c: m(i, p, s, cache=c))
    cache = init_cache(cfg, batch=2, max_len=8)
    prefill, cache = step(model, ids, pos, seg, cache)
    assert int(cache.index) == 5
    decoded = []
    for t in range(2):
        tok_pos = np.array([[len(p) + t] for p in prompts], np.int32)
        logits, cache = step(model, new[:, t : t + 1], tok_pos, np.ones((2, 1), np.int32), cache)
        decoded.append(np.asarray(logits)[:, 0])
    assert cache.k.shape == (cfg.num_layers, 2, 8, cfg.num_kv_heads, cfg.resolved_head_dim)
    for i, p in enumerate(prompts):
        full = np.asarray(call(model, np.concatenate([p, new[i]])[None]))[0]
        np.testing.assert_allclose(np.asarray(prefill)[i, : len(p)], full[: len(p)], atol=1e-5, rtol=1e-5)
        for t in range(2):
            np.testing.assert_allclose(decoded[t][i], full[len(p) + t], atol=1e-5, rtol=1e-5)



def test_decode_step_updates_the_donated_cache_in_place():
    """A decode step may copy one layer's k/v at a time, never the whole cache: with k/v scanned as
    xs/ys, XLA stacked a fresh cache-sized output every step (temp > 1.4 caches here)."""
    cfg = dataclasses.replace(FAMILIES["qwen3"], num_layers=4)
    graphdef, params = nnx.split(init_model(cfg))
    cache = init_cache(cfg, batch=2, max_len=512)
    step = jax.jit(lambda p, c, t: nnx.merge(graphdef, p)(t, cache=c), donate_argnums=(1,))
    mem = step.lower(params, cache, jnp.zeros((2, 1), jnp.int32)).compile().memory_analysis()
    kv_bytes = cache.k.nbytes + cache.v.nbytes
    assert mem.alias_size_in_bytes >= kv_bytes, "the donated k/v buffers are not reused for the new cache"
    assert mem.temp_size_in_bytes < kv_bytes, f"decode temp {mem.temp_size_in_bytes} B >= cache {kv_bytes} B"


PATHS = {
    "qwen2": {"embed.embedding", "final_norm.scale", "lm_head.kernel", "layers.input_norm.scale",
              "layers.post_attn_norm.scale", "layers.attn.o_proj.kernel", "layers.mlp.gate_proj.kernel",
              "layers.mlp.up_proj.kernel", "layers.mlp.down_proj.kernel"}
    | {f"layers.attn.{p}_proj.{w}" for p in "qkv" for w in ("kernel", "bias")},
}
PATHS["qwen3"] = (PATHS["qwen2"] - {"lm_head.kernel"} - {f"layers.attn.{p}_proj.bias" for p in "qkv"}) | {
    "layers.attn.q_norm.scale", "layers.attn.k_norm.scale"}
PATHS["llama"] = PATHS["qwen2"] - {f"layers.attn.{p}_proj.bias" for p in "qkv"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parameter_tree_follows_the_contract(family):
    cfg = FAMILIES[family]
    flat = flat_abstract_state(abstract_model(cfg))
    assert set(flat) == PATHS[family]
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == cfg.num_params()
    h, d, L = cfg.hidden_size, cfg.resolved_head_dim, cfg.num_layers
    assert flat["layers.attn.q_proj.kernel"].shape == (L, h, cfg.num_heads * d)
    assert flat["layers.attn.o_proj.kernel"].shape == (L, cfg.num_heads * d, h)
    assert flat["embed.embedding"].shape == (cfg.vocab_size, h)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())


def test_init_is_seeded_and_layers_differ():
    cfg = FAMILIES["llama"]
    a, b, c = init_model(cfg, seed=0), init_model(cfg, seed=0), init_model(cfg, seed=1)
    fa, fb, fc = (flat_abstract_state(m) for m in (a, b, c))
    for name in fa:
        np.testing.assert_array_equal(fa[name], fb[name])
    q = np.asarray(fa["layers.attn.q_proj.kernel"])
    assert not np.allclose(q[0], q[1]), "each scanned layer needs its own random init"
    assert not np.allclose(q, np.asarray(fc["layers.attn.q_proj.kernel"]))


def test_model_from_state_roundtrip_and_errors():
    cfg = FAMILIES["qwen2"]
    source = init_model(cfg, seed=5)
    flat = {k: jnp.asarray(v) for k, v in flat_abstract_state(source).items()}
    rebuilt = model_from_state(abstract_model(cfg), flat)
    for name, value in flat_abstract_state(rebuilt).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(flat[name]))
    with pytest.raises(KeyError, match="layers.attn.q_proj.bias"):
        model_from_state(abstract_model(cfg), {k: v for k, v in flat.items() if k != "layers.attn.q_proj.bias"})
    bad = dict(flat, **{"final_norm.scale": jnp.ones((3,))})
    with pytest.raises(ValueError, match=r"final_norm.scale has shape \(3,\)"):
        model_from_state(abstract_model(cfg), bad)
    half = {k: v.astype(jnp.bfloat16) for k, v in flat.items()}
    cast = model_from_state(abstract_model(cfg), half)
    assert all(v.dtype == jnp.float32 for v in flat_abstract_state(cast).values())
