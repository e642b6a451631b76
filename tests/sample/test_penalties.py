"""Presence, frequency and repetition penalties in the engine, against a numpy reference over the
transformers model and against transformers' own repetition penalty."""

from __future__ import annotations

import numpy as np
import pytest

from test_generate import hf_folder  # noqa: F401 (the tiny model fixture)

import lt_jax
from lt_jax.sample import generate as gen
from lt_jax.sample import penalties
from lt_jax.sample.engine import Engine, EngineConfig
from lt_jax.sample.generate import SamplingParams, load_tokenizer

PROMPTS = ["The sum of 12 and 30 is", "Let me think step by step.", "naïve café, déjà vu"]
NEW = 14


def reference_penalize(logits, prompt, output, presence, frequency, repetition):
    """The definitions, one row, in numpy: repetition on prompt and output tokens, then
    frequency x count and presence x (count > 0) over the output."""
    logits = np.asarray(logits, np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    logits[seen] = np.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(logits))
    return logits - frequency * counts - presence * (counts > 0)


def reference_greedy(hf_model, prompt, params):
    import torch

    ids, out = list(prompt), []
    for _ in range(params.max_new_tokens):
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double().numpy()
        tok = int(np.argmax(reference_penalize(logits, prompt, out, params.presence_penalty,
                                               params.frequency_penalty, params.repetition_penalty)))
        out.append(tok)
        ids.append(tok)
    return out


@pytest.fixture(scope="module")
def setup(hf_folder):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    return lt_jax.load_hf(hf_folder), load_tokenizer(hf_folder), hf


def test_apply_matches_the_numpy_definitions():
    rng = np.random.default_rng(0)
    rows, vocab = 3, 50
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    prompts = [list(rng.integers(0, vocab, 6)) for _ in range(rows)]
    outputs = [list(rng.integers(0, vocab, 9)) for _ in range(rows)]
    presence, frequency, repetition = [0.5, -1.0, 0.0], [0.3, 0.0, 2.0], [1.3, 0.7, 1.0]
    counts = np.stack([np.bincount(o, minlength=vocab) for o in outputs]).astype(np.int32)
    seen = counts > 0
    for i, p in enumerate(prompts):
        seen[i, p] = True
    pen = penalties.Penalties(np.float32(presence), np.float32(frequency), np.float32(repetition), counts, seen)
    got = np.asarray(penalties.apply(logits, pen))
    want = np.stack([reference_penalize(logits[i], prompts[i], outputs[i], presence[i], frequency[i],
                                        repetition[i]) for i in range(rows)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, logits)  # the test data exercises every penalty


def test_slot_counts_kept_on_device_equal_a_fresh_host_build():
    """Random admissions, preemptions (a sample leaves and comes back with a new token), finishes
    and decode calls over 3 slots: the device rows each call gets equal the counts built from
    scratch on the host, while only the rows whose sample changed are uploaded."""
    import types

    import jax.numpy as jnp

    from lt_jax.sample import sampler as smp

    rng = np.random.RandomState(0)
    vocab, rows = 48, 3

    def sample(penalised):
        spec = smp.RowSpec(0, frequency_penalty=0.5 if penalised else 0.0)
        tokens = list(rng.randint(0, vocab, rng.randint(1, 4)))
        return types.SimpleNamespace(spec=spec, prompt=list(rng.randint(0, vocab, 5)),
                                     result=types.SimpleNamespace(tokens=tokens))

    slots, parked, state, calls = [None] * rows, [], penalties.SlotCounts(rows, vocab), 0
    for _ in range(60):
        op, i = rng.randint(4), rng.randint(rows)
        if op == 0 and slots[i] is None:  # admission: a new sample, or a preempted one with its next token
            slots[i] = parked.pop() if parked and rng.rand() < 0.5 else sample(rng.rand() < 0.8)
            slots[i].result.tokens.append(int(rng.randint(vocab)))  # the first token drawn at admission
        elif op == 1 and slots[i] is not None:  # preempted (or finished / cancelled)
            if rng.rand() < 0.5:
                parked.append(slots[i])
            slots[i] = None
        else:  # a decode call of 2 steps
            pen = state.for_call(slots)
            if pen is None:
                continue
            want = penalties.build(slots, rows, vocab)
            for r, s in enumerate(slots):
                if s is not None and penalties.penalized(s.spec):
                    np.testing.assert_array_equal(np.asarray(pen.counts)[r], want.counts[r])
                    np.testing.assert_array_equal(np.asarray(pen.seen)[r], want.seen[r])
            live = np.asarray([s is not None for s in slots])
            pen = penalties.Penalties(*map(jnp.asarray, pen))  # the call's inputs, as the jitted call sees them
            for _ in range(2):
                drawn = rng.randint(0, vocab, rows)
                pen = penalties.record(pen, jnp.asarray(drawn), jnp.asarray(live))
                for r, s in enumerate(slots):
                    if s is not None:
                        s.result.tokens.append(int(drawn[r]))
            state.after_call(pen, slots)
            calls += 1
    assert calls > 10 and state.uploaded_rows < calls * rows  # rows stayed on device between calls


def test_engine_greedy_with_penalties_equals_the_reference(setup):
    """Per-row penalties in one batch, more requests than slots (refills), several device steps per
    call (counts updated on device) and calls rebuilt from the host."""
    model, tok, hf = setup
    variants = [dict(repetition_penalty=1.5), dict(frequency_penalty=1.5, presence_penalty=0.8),
                dict(repetition_penalty=0.8, frequency_penalty=0.6, presence_penalty=-0.4), {}]
    engine = Engine(model, EngineConfig(num_slots=2, page_size=16, decode_steps=4, prefill_chunk=64),
                    decode=gen.make_decoder(tok, True))
    prompts, specs, wants = [], [], []
    for i, kw in enumerate(variants):
        params = SamplingParams(temperature=0.0, max_new_tokens=NEW, ignore_eos=True, **kw)
        _, ids = gen.encode_prompt(tok, PROMPTS[i % len(PROMPTS)])
        prompts.append(ids)
        specs.append(gen.row_specs(params, 0, ()))
        wants.append(reference_greedy(hf, ids, params))
    results = engine.run(prompts, specs)
    got = [r[0].tokens for r in results]
    assert got == wants
    # Page pressure: preempted samples are recomputed and their counts rebuilt from their tokens.
    need = max(-(-(len(p) + NEW) // 4) for p in prompts)
    tight = Engine(model, EngineConfig(num_slots=2, page_size=4, decode_steps=4, prefill_chunk=16,
                                       num_pages=need + 3), decode=gen.make_decoder(tok, True))
    assert [r[0].tokens for r in tight.run(prompts, specs)] == wants
    assert tight.stats["preempted"] > 0
    # the penalties change the output (else the comparison above proves nothing about them)
    plain = reference_greedy(hf, prompts[0], SamplingParams(temperature=0.0, max_new_tokens=NEW))
    assert plain != wants[0] and len(set(wants[1])) > len(set(plain))


def test_repetition_penalty_equals_transformers_generate(setup):
    import torch

    model, tok, hf = setup
    params = SamplingParams(temperature=0.0, max_new_tokens=NEW, ignore_eos=True, repetition_penalty=1.4)
    outs = lt_jax.generate(model, tok, PROMPTS[:2], params, config=EngineConfig(num_slots=2, decode_steps=4))
    for prompt, out in zip(PROMPTS, outs):
        ids = torch.tensor([list(out.prompt_token_ids)])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, repetition_penalty=1.4, eos_token_id=None, pad_token_id=0)
        assert list(out.samples[0].token_ids) == ref[0, ids.shape[1]:].tolist(), prompt


def test_sampled_penalised_rows_are_reproducible_and_the_lockstep_sampler_refuses(setup):
    model, tok, _ = setup
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_new_tokens=NEW, frequency_penalty=1.0)
    alone = lt_jax.generate(model, tok, PROMPTS[0], params, config=EngineConfig(num_slots=2, decode_steps=4))
    crowd = lt_jax.generate(model, tok, PROMPTS, params, seeds=[3, 4, 5],
                            config=EngineConfig(num_slots=8, decode_steps=2))
    assert alone[0].texts == crowd[0].texts
    from lt_jax.sample import sampler as smp

    with pytest.raises(ValueError, match="penalties need the engine"):
        smp.Sampler(model).run([[1, 2, 3]], [smp.RowSpec(0, repetition_penalty=1.2, max_new_tokens=2)])


def test_sample_cli_takes_the_penalties(setup, hf_folder, tmp_path):  # noqa: F811
    import json

    from lt_jax.cli import main

    model, tok, _ = setup
    params = SamplingParams(temperature=0.0, max_new_tokens=8, repetition_penalty=1.5, frequency_penalty=0.5)
    (want,) = lt_jax.generate(model, tok, [PROMPTS[0]], params)
    out = str(tmp_path / "out.jsonl")
    args = ["sample", "--hf", hf_folder, "--raw", "--prompt", PROMPTS[0], "--temperature", "0",
            "--max-new-tokens", "8"]
    assert main([*args, "--repetition-penalty", "1.5", "--frequency-penalty", "0.5", "--out", out]) == 0
    (line,) = [json.loads(x) for x in open(out).read().splitlines()]
    assert [s["text"] for s in line["samples"]] == want.texts
    with pytest.raises(SystemExit, match=r"SamplingParams\.presence_penalty"):
        main([*args, "--presence-penalty", "3"])
