"""The generation engine: greedy parity with transformers with more requests than slots, seeded
streams independent of what else runs, page pressure (preemption and recompute), cancellations."""

from __future__ import annotations

import numpy as np
import pytest

from hf_models import TINY, hf_greedy, saved_models
from test_sampler import FAMILIES as LOCKSTEP_FAMILIES

from lt_jax.model.hf import load_hf
from lt_jax.sample import engine as eng
from lt_jax.sample import sampler as smp

FAMILIES = {**LOCKSTEP_FAMILIES,
            "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=False, bos_token_id=None,
                                          eos_token_id=None))}
# (prompt length, new tokens): more requests than slots, a prompt longer than one prefill chunk.
REQUESTS = ((11, 20), (4, 6), (37, 12), (1, 16), (7, 3), (20, 9))
SMALL = eng.EngineConfig(num_slots=3, page_size=8, decode_steps=4, prefill_chunk=16)
# Other slot count and page size, and 13 pages of 4 tokens: the longest request alone needs 12,
# all of them together 38.
TIGHT = eng.EngineConfig(num_slots=2, page_size=4, decode_steps=4, prefill_chunk=16, num_pages=14)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    return saved_models(tmp_path_factory, FAMILIES)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(5)
    return [[int(t) for t in rng.randint(1, TINY["vocab_size"], size=n)] for n, _ in REQUESTS]


@pytest.fixture(scope="module")
def qwen(hf_models):
    return load_hf(hf_models["qwen2"][1])


def greedy_specs(news=None):
    return [[smp.RowSpec(0, temperature=0.0, max_new_tokens=new)] for _, new in (news or REQUESTS)]


def assert_all_pages_free(engine):
    assert engine.allocator.available == engine.config.num_pages - 1
    assert not engine.allocator.refs.any() and not engine.busy


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_with_more_requests_than_slots(hf_models, prompts, family):
    hf_model, folder = hf_models[family]
    engine = eng.Engine(load_hf(folder), SMALL)
    got = engine.run(prompts, greedy_specs())
    for p, (_, new), res in zip(prompts, REQUESTS, got):
        assert res[0].tokens == hf_greedy(hf_model, p, new), f"prompt of length {len(p)}"
        assert res[0].finish_reason == "length"
    assert engine.stats["prefill_calls"] > len(prompts)  # the 37-token prompt was prefilled in chunks
    assert_all_pages_free(engine)


def test_page_pressure_preempts_and_recomputes_without_changing_greedy_outputs(prompts, qwen):
    want = eng.Engine(qwen, SMALL).run(prompts, greedy_specs())
    tight = eng.Engine(qwen, TIGHT)
    got = tight.run(prompts, greedy_specs())
    assert [r[0].tokens for r in got] == [r[0].tokens for r in want]
    assert tight.stats["preempted"] > 0
    assert_all_pages_free(tight)


def sampled(seed, n=1, new=14, **kw):
    return [smp.RowSpec(0, seed=smp.row_seed(seed, j), temperature=1.0, top_p=0.9, max_new_tokens=new, **kw)
            for j in range(n)]


def test_seeded_sample_is_the_same_alone_busy_late_and_under_other_configs(prompts, qwen):
    target = prompts[0]
    alone = eng.Engine(qwen, SMALL).run([target], [sampled(7, n=3)])[0]
    # Admitted late into a full engine of other sampled and greedy requests, with other slot counts,
    # page sizes, decode chunks, and a page budget that forces preemption.
    for cfg in (SMALL, TIGHT):
        engine = eng.Engine(qwen, cfg)
        others = [engine.submit(p, sampled(100 + i, n=2, new=10)) for i, p in enumerate(prompts[1:])]
        for _ in range(3):
            engine.step()
        rid = engine.submit(target, sampled(7, n=3))
        while engine.busy:
            engine.step()
        assert [r.tokens for r in engine.pop(rid)] == [r.tokens for r in alone], cfg
        assert all(engine.finished(o) for o in others)
        assert_all_pages_free(engine)
    assert engine.stats["preempted"] > 0
    assert len({tuple(r.tokens) for r in alone}) == 3  # the n samples differ


def test_random_admissions_cancellations_and_preemptions_return_every_page(prompts, qwen):
    """A seeded property test over the engine's host bookkeeping with a tight page budget."""
    engine = eng.Engine(qwen, TIGHT)
    rng = np.random.RandomState(0)
    live: list[int] = []
    for _ in range(60):
        op = rng.choice(["submit", "cancel", "step", "step"])
        if op == "submit":
            p = prompts[rng.randint(len(prompts))]
            specs = [smp.RowSpec(0, temperature=0.0, max_new_tokens=int(rng.randint(1, 12)),
                                 stop_token_ids=(int(rng.randint(1, 512)),)) for _ in range(rng.randint(1, 4))]
            live.append(engine.submit(p, specs))
        elif op == "cancel" and live:
            rid = live.pop(rng.randint(len(live)))
            engine.cancel(rid)
            assert all(r.finish_reason is not None for r in engine.results(rid))
        else:
            engine.step()
        held = [p for s in engine.slots if s is not None for p in s.pages]
        held += [p for j in list(engine.ready) + [engine.prefilling] if j is not None for p in j.pages]
        assert engine.allocator.in_use == len(set(held))
    while engine.busy:
        engine.step()
    assert engine.stats["preempted"] + engine.stats["requeued"] > 0
    assert_all_pages_free(engine)


def test_requests_that_cannot_fit_are_refused_before_queueing(qwen):
    engine = eng.Engine(qwen, eng.EngineConfig(num_slots=2, page_size=8, max_len=64))
    with pytest.raises(ValueError, match="exceed the context of 64"):
        engine.submit([1] * 60, [smp.RowSpec(0, max_new_tokens=5)])
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], [smp.RowSpec(0)])
    assert not engine.busy


def test_logprobs_come_from_the_distribution_each_token_was_drawn_from(prompts, qwen):
    """Chosen and top-N logprobs equal log_softmax(logits / temperature) of a full forward pass."""
    import jax
    import jax.numpy as jnp

    spec = smp.RowSpec(0, seed=3, temperature=0.7, top_p=0.9, max_new_tokens=9, logprobs=4)
    (res,) = eng.Engine(qwen, SMALL).run([prompts[0]], [[spec]])[0]
    ids = prompts[0] + res.tokens
    logits = qwen(jnp.asarray([ids]))[0, len(prompts[0]) - 1: -1]
    want = np.asarray(jax.nn.log_softmax(logits / 0.7, axis=-1))
    assert len(res.logprobs) == len(res.tokens) == 9
    for k, (tok, (lp, top)) in enumerate(zip(res.tokens, res.logprobs)):
        np.testing.assert_allclose(lp, want[k, tok], atol=2e-4)
        assert [t for t, _ in top] == list(np.argsort(-want[k])[:4])
        np.testing.assert_allclose([x for _, x in top], np.sort(want[k])[::-1][:4], atol=2e-4)


def test_min_tokens_and_min_p_constrain_the_draw(prompts, qwen):
    greedy = eng.Engine(qwen, SMALL).run([prompts[1]], [[smp.RowSpec(0, temperature=0.0, max_new_tokens=8)]])
    eos = greedy[0][0].tokens[0]  # make the greedy first token the EOS
    specs = [smp.RowSpec(0, temperature=0.0, max_new_tokens=8, stop_token_ids=(eos,)),
             smp.RowSpec(0, temperature=0.0, max_new_tokens=8, stop_token_ids=(eos,), min_tokens=5),
             # min_p 1: only the most likely token survives, so sampling at temperature 1 is greedy
             smp.RowSpec(0, seed=9, temperature=1.0, max_new_tokens=8, min_p=1.0)]
    free, held, top = eng.Engine(qwen, SMALL).run([prompts[1]], [specs])[0]
    assert (free.tokens, free.finish_reason) == ([eos], "stop")
    assert eos not in held.tokens[:5] and len(held.tokens) >= 5
    assert top.tokens == greedy[0][0].tokens
