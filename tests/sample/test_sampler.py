"""The KV-cache sampler: parity with transformers' generate, sampling distributions, the mesh,
shared prefill, stop tokens, reproducibility and compile reuse."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from scipy import stats

from hf_models import TINY, hf_greedy, saved_models

from lt_jax.model.hf import load_hf
from lt_jax.model.sharding import MeshConfig, make_mesh
from lt_jax.sample import sampler as smp

FAMILIES = {
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False, rope_theta=1000000.0, bos_token_id=None,
                                  eos_token_id=None)),
    "llama": ("LlamaConfig", dict(rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                    high_freq_factor=4.0, original_max_position_embeddings=32))),
}
LENGTHS = (11, 4, 7, 1)  # prompts of different lengths in one batch
NEW = 24
CHUNK = smp.SamplerConfig(chunk_size=8)  # several device calls per generation


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{family: (transformers model, saved folder)}."""
    return saved_models(tmp_path_factory, FAMILIES)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(3)
    return [[int(t) for t in rng.randint(1, TINY["vocab_size"], size=n)] for n in LENGTHS]


@pytest.fixture(scope="module")
def qwen(hf_models):
    return load_hf(hf_models["qwen2"][1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers_generate(hf_models, prompts, family):
    hf_model, folder = hf_models[family]
    ours = smp.greedy(prompts, load_hf(folder), NEW, config=CHUNK)
    for p, got in zip(prompts, ours):
        assert got == hf_greedy(hf_model, p, NEW), f"prompt of length {len(p)}"


# ---------------------------------------------------------------------------------------------
# Sampling math


LOGITS = np.array([2.0, 1.6, 1.1, 0.9, 0.4, 0.0, -0.3, -1.0, -1.7, -2.5], np.float32)
CASES = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0),
    (0.6, 0, 1.0),
    (1.4, 4, 1.0),
    (1.0, 0, 0.75),
    (0.8, 5, 0.9),
    (1.0, 2, 0.99),
]


def reference_probs(logits, temperature, top_k, top_p) -> np.ndarray:
    """The distribution each case should draw from (transformers' order: temperature, top-k, top-p)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_above = np.cumsum(p[order]) - p[order]
    final = np.zeros(len(z), bool)
    final[order[mass_above < top_p]] = True
    p = np.where(final & keep, p, 0.0)
    return p / p.sum()


def draw(cases, draws: int, mode: str = "filtered") -> np.ndarray:
    """Counts [len(cases), V]: every case in one batch, one row per draw, keys per row."""
    rows = len(cases) * draws
    dtypes = (np.float32, np.int32, np.float32)
    t, k, p = (np.repeat(np.asarray(col, dt), draws) for col, dt in zip(zip(*cases), dtypes))
    keys = smp.step_keys(np.arange(rows, dtype=np.uint32), np.zeros(rows, np.int32))
    logits = np.broadcast_to(LOGITS, (rows, len(LOGITS)))
    fn = jax.jit(lambda *a: smp.sample_from_logits(*a, mode=mode))
    tokens = np.asarray(fn(logits, keys, t, p, k)).reshape(len(cases), draws)
    return np.stack([np.bincount(row, minlength=len(LOGITS)) for row in tokens])


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {counts}"
    return stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue


def test_temperature_top_k_top_p_draw_from_the_right_distribution():
    draws = 20000
    counts = draw(CASES, draws)
    for case, c in zip(CASES, counts):
        want = reference_probs(LOGITS, *case)
        assert chi2_pvalue(c, want) > 1e-3, (case, c / draws, want)
        assert 0.5 * np.abs(c / draws - want).sum() < 0.02, case
    # The test has power: the untruncated softmax is rejected where top-k / top-p cut the tail.
    plain = reference_probs(LOGITS, 1.0, 0, 1.0)
    assert stats.chisquare(counts[3], plain * draws).pvalue < 1e-9
    # The unsorted fast path (no top-k/top-p in the batch) draws from the tempered softmax too.
    fast = draw(CASES[:2], draws, mode="sample")
    for case, c in zip(CASES[:2], fast):
        assert chi2_pvalue(c, reference_probs(LOGITS, *case)) > 1e-3, case


def test_temperature_zero_is_argmax_whatever_the_filters():
    logits = np.random.RandomState(0).randn(6, 50).astype(np.float32)
    keys = smp.step_keys(np.arange(6, dtype=np.uint32), np.zeros(6, np.int32))
    got = jax.jit(smp.sample_from_logits)(logits, keys, np.zeros(6, np.float32), np.full(6, 0.3, np.float32),
                                          np.full(6, 3, np.int32))
    np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


def test_buckets():
    assert smp.bucket(10, 16) == 16
    assert smp.bucket(100) == 104 and smp.bucket(104) == 104  # step 8 between 64 and 128
    b = smp.bucket(1024 + 32768)
    assert 1024 + 32768 <= b <= (1024 + 32768) * 9 / 8 and b % 4096 == 0
    assert smp.bucket(130, align=128) == 256
    assert [smp.batch_bucket(n, 4) for n in (1, 4, 5, 9)] == [4, 4, 8, 16]
    assert smp.batch_bucket(3, 6) == 6


# ---------------------------------------------------------------------------------------------
# The decode loop


def sampled_rows(n_prompts: int, seed: int = 7) -> list[smp.RowSpec]:
    """A mix of greedy and sampled rows with different parameters, two per prompt."""
    rows = []
    for i in range(n_prompts):
        rows.append(smp.RowSpec(i, smp.row_seed(seed, 2 * i), temperature=0.0, max_new_tokens=NEW))
        rows.append(smp.RowSpec(i, smp.row_seed(seed, 2 * i + 1), temperature=0.9, top_p=0.9, top_k=50,
                                max_new_tokens=NEW - i))
    return rows


@pytest.mark.slow
def test_sharded_generation_equals_unsharded(hf_models, prompts, qwen):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    sharded = load_hf(hf_models["qwen2"][1], mesh=mesh)
    assert smp.model_mesh(sharded) == mesh
    rows = sampled_rows(len(prompts))
    plain = smp.Sampler(qwen, config=CHUNK).run(prompts, rows)
    sampler = smp.Sampler(sharded, config=CHUNK)
    on_mesh = sampler.run(prompts, rows)
    assert [r.tokens for r in on_mesh] == [r.tokens for r in plain]
    assert [len(r.tokens) for r in plain] == [spec.max_new_tokens for spec in rows]
    assert {r.finish_reason for r in plain} == {"length"}
    # The rows really were split over the mesh: 8 rows over data*fsdp = 4 shards.
    assert sampler.last_shapes["rows"] == 8


def test_n_samples_share_one_prefill(prompts, qwen):
    n = 4
    params = dict(temperature=1.0, top_p=0.95, max_new_tokens=NEW)
    rows = [smp.RowSpec(0, smp.row_seed(1, j), **params) for j in range(n)]
    rows += [smp.RowSpec(i, smp.row_seed(1, 0), **params) for i in range(1, len(prompts))]
    sampler = smp.Sampler(qwen, config=CHUNK)
    shared = sampler.run(prompts, rows)
    # One prefill of the 4 prompts; prompt 0's cache was broadcast to its 4 sample rows.
    assert sampler.stats["prefill_calls"] == 1 and sampler.stats["prefill_rows"] == len(prompts)
    assert sampler.last_shapes["prompt_rows"] == 4 and sampler.last_shapes["rows"] == 8
    assert len({tuple(r.tokens) for r in shared[:n]}) == n  # distinct samples
    # Each broadcast row continues exactly as if its prompt had been prefilled for it alone.
    copies = [smp.RowSpec(j, smp.row_seed(1, j), **params) for j in range(n)]
    copies += [smp.RowSpec(j, temperature=0.0, max_new_tokens=2) for j in range(n)]
    alone = smp.Sampler(qwen, config=CHUNK).run([prompts[0]] * n, copies)
    assert [r.tokens for r in alone[:n]] == [r.tokens for r in shared[:n]]


def test_seeded_rows_do_not_depend_on_batch_or_chunking(prompts, qwen):
    rows = sampled_rows(len(prompts), seed=11)
    together = smp.Sampler(qwen, config=CHUNK).run(prompts, rows)
    # Row 3 (prompt 1, sampled) in another batch, at another index, with another chunk size.
    order = [3, 1, 0, 2]
    moved = [dataclasses.replace(r, prompt=order.index(r.prompt)) for r in rows[::-1]]
    other = smp.Sampler(qwen, config=smp.SamplerConfig(chunk_size=5)).run([prompts[i] for i in order], moved)
    assert [r.tokens for r in other[::-1]] == [r.tokens for r in together]
    other_seed = smp.Sampler(qwen, config=CHUNK).run(prompts, sampled_rows(len(prompts), seed=12))
    assert [r.tokens for r in other_seed[1::2]] != [r.tokens for r in together[1::2]]
    assert [r.tokens for r in other_seed[0::2]] == [r.tokens for r in together[0::2]]  # greedy rows


def test_stop_token_ends_only_its_row(prompts, qwen):
    base = smp.greedy(prompts, qwen, NEW, config=CHUNK)
    # A token that row 0 emits in the middle of its answer, and that some other row never emits.
    stop = next(t for t in base[0][3:] if any(t not in b for b in base[1:]))
    first = base[0].index(stop)
    results = smp.Sampler(qwen, config=CHUNK).run(
        prompts, [smp.RowSpec(i, temperature=0.0, max_new_tokens=NEW, stop_token_ids=(stop,))
                  for i in range(len(prompts))])
    for b, r in zip(base, results):
        if stop in b:
            assert r.tokens == b[: b.index(stop) + 1] and r.finish_reason == "stop" and r.stop_reason == stop
        else:
            assert r.tokens == b and r.finish_reason == "length"
    assert len(results[0].tokens) == first + 1


def test_compiled_functions_are_reused(prompts, qwen):
    rows = sampled_rows(len(prompts))
    sampler = smp.Sampler(qwen, config=CHUNK)
    sampler.run(prompts, rows)
    sizes = smp._prefill._cache_size(), smp._decode._cache_size()
    # Other prompts of lengths in the same buckets, other params: no new compile.
    rng = np.random.RandomState(9)
    others = [[int(t) for t in rng.randint(1, 512, size=n)] for n in (9, 2, 13)]
    again = [dataclasses.replace(r, prompt=r.prompt % 3, temperature=r.temperature * 0.5) for r in rows[:7]]
    sampler.run(others, again)
    assert (smp._prefill._cache_size(), smp._decode._cache_size()) == sizes
    assert sampler.stats["decode_calls"] >= 2 * (NEW // CHUNK.chunk_size)
