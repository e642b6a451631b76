"""Quality filters: repeated n-grams, turns, format, and query+answer perplexity on the mesh."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hf_models import TINY, redrawn_model

from lt_jax.data import quality
from lt_jax.data.select import SelectConfig, select_file

V = TINY["vocab_size"]


def test_ngram_turn_and_format_checks():
    loop = " ".join(["the same five words again"] * 84)  # 420 words, 401 windows: 5 distinct 20-grams
    assert quality.max_ngram_count("a b c a b c".split(), 3) == 2
    assert quality.max_ngram_count(list(range(10)), 20) == 0
    assert quality.max_ngram_count(loop.split(), 20) == 81 and quality.repeated_ngram(loop)
    assert not quality.repeated_ngram(" ".join(["the same five words again"] * 7))  # 16 windows: at most 4 each
    assert quality.repeated_ngram(" ".join(["x"] * 40)) and not quality.repeated_ngram(" ".join(map(str, range(500))))
    assert quality.even_turns([{"role": "system"}, {"role": "user"}, {"role": "assistant"}])
    assert not quality.even_turns([{"role": "user"}, {"role": "assistant"}, {"role": "user"}])
    assert quality.has_thinking_and_answer("t", "a") and not quality.has_thinking_and_answer(None, "a")
    assert not quality.has_thinking_and_answer("t", " ")


def words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def word_tokenizer(folder) -> str:
    """A word-level tokenizer w0..w510 (+ [UNK]) in its own folder (a model folder's config.json
    would make AutoTokenizer pick the model family's tokenizer class)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V - 1)} | {"[UNK]": V - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def succession_model(tmp_path_factory):
    """(Qwen2 folder, tokenizer folder): a model that predicts token t+1 after token t (near-1
    perplexity on counting text, huge on random words)."""
    import torch

    model = redrawn_model("Qwen2Config", {"tie_word_embeddings": False}, seed=1)
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(V, TINY["hidden_size"], generator=g), dim=-1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias")):
                p.zero_()  # the layers add nothing: the residual stream is the token's embedding
            elif "norm" in name:
                p.fill_(1.0)
        model.model.embed_tokens.weight.copy_(emb)
        model.lm_head.weight.copy_(2.0 * torch.roll(emb, 1, dims=0))  # logit(v | x) ~ <e_x, e_{v-1}>
    folder = tmp_path_factory.mktemp("succession")
    model.save_pretrained(folder)
    return str(folder), word_tokenizer(tmp_path_factory.mktemp("words"))


def _rows(n_good: int, garbage: set[int], repeats: set[int]):
    rng = random.Random(0)
    rows = []
    for i in range(n_good + len(garbage) + len(repeats)):
        start = 13 * i  # distinct problems
        q, a = list(range(start, start + 12)), list(range(start + 12, start + 12 + rng.randrange(5, 60)))
        if i in garbage:
            a = [rng.randrange(0, V - 1) for _ in range(40)]
        answer = words(a) if i not in repeats else " ".join([words(range(100, 120))] * 22)
        rows.append({"problem_id": f"p{i}", "sample_index": 0, "prompt": words(q), "response": f"<think>\nok\n</think>\n\n{answer}",
                     "status": "ok", "finish_reason": "stop", "verdict": True, "score": 1.0, "domain": "other"})
    return rows


@pytest.mark.slow
def test_planted_garbage_and_repeats_removed_and_counted(tmp_path, jl, succession_model):
    from lt_jax.data import perplexity

    garbage, repeats = {3, 11, 17}, {5, 14}
    src = jl.write(tmp_path / "graded.jsonl", _rows(20, garbage, repeats))
    out = str(tmp_path / "scored.jsonl")
    cfg = perplexity.PerplexityConfig(model=succession_model[0], tokenizer=succession_model[1], seq_len=128, batch_rows=8, chunk_records=10)
    scorer = perplexity.Scorer(cfg)
    first = perplexity.score_file(src, out, cfg, scorer)
    scored = jl.read(out)
    assert first["scored"] == 25 and [r["problem_id"] for r in scored] == [f"p{i}" for i in range(25)]
    ppl = {int(r["problem_id"][1:]): r["perplexity"] for r in scored}
    assert all(ppl[i] > 20 for i in garbage) and all(ppl[i] < 5 for i in range(25) if i not in garbage and i not in repeats)
    # a killed run: keep 7 rows and a torn line; the rerun scores only the rest, identically
    lines = open(out, encoding="utf-8").read().splitlines(True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(lines[:7])
        f.write(lines[7][:30])
    again = perplexity.score_file(src, out, cfg, scorer)
    assert again["already_scored"] == 7 and again["scored"] == 18 and jl.read(out) == scored
    report = select_file(out, str(tmp_path / "sft.jsonl"), SelectConfig(max_perplexity=20, cv_threshold=None, dedup_near=False))
    assert report["dropped"] == {"high_perplexity": 3, "repeated_ngram": 2}
    assert report["records_out"] == 20


@pytest.mark.slow
def test_packed_perplexity_matches_transformers(tmp_path_factory, jl):
    import torch

    from lt_jax.data import perplexity

    model = redrawn_model("Qwen2Config", {}, seed=3)
    folder = tmp_path_factory.mktemp("ref")
    model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    texts = [words(rng.integers(0, V - 1, rng.integers(2, 70))) for _ in range(12)] + ["w1"]
    tokenizer = word_tokenizer(tmp_path_factory.mktemp("words"))
    scorer = perplexity.Scorer(perplexity.PerplexityConfig(model=str(folder), tokenizer=tokenizer, seq_len=96, batch_rows=4))
    got = scorer.score(texts)
    for text, (ppl, n) in zip(texts, got):
        ids = torch.tensor([[int(w[1:]) for w in text.split()]])
        if ids.shape[1] < 2:
            assert (ppl, n) == (None, 0)
            continue
        with torch.no_grad():
            loss = model(ids, labels=ids).loss.item()
        assert n == ids.shape[1] - 1 and ppl == pytest.approx(math.exp(loss), rel=1e-4)


def test_ngram_count_matches_counting_tuples():
    from collections import Counter

    rng = random.Random(0)
    for _ in range(200):  # tiny alphabets: many repeats and overlapping windows
        toks = [rng.choice("abc") for _ in range(rng.randrange(0, 150))]
        n = rng.randrange(1, 25)
        expected = max(Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)).values()) if len(toks) >= n else 0
        assert quality.max_ngram_count(toks, n) == expected
