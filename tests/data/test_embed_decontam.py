"""Embedding decontamination with a small random encoder built here (users load bge-m3 from a folder)."""

from __future__ import annotations

import random

import pytest

from lt_jax.data import embed_decontam as ed
from lt_jax.data.dedup import BenchItem
from lt_jax.data.select import SelectConfig, select_file

WORDS = [f"word{i}" for i in range(300)]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A 2-layer random BERT with a WordPiece vocabulary of whole words, saved like any encoder folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("encoder")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128)
    model = BertModel(cfg).eval()
    with torch.no_grad():  # a bag of random word vectors: layers and positions add nothing (a random
        for name, p in model.named_parameters():  # transformer maps every text to nearly one direction)
            if "output.dense" in name or "position_embeddings" in name or "token_type_embeddings" in name:
                p.zero_()
    model.save_pretrained(folder)
    return str(folder)


def sentence(rng: random.Random, n: int = 24) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def test_near_duplicates_found_unrelated_not(encoder_dir):
    rng = random.Random(0)
    bench = [BenchItem("eval/set.jsonl", str(i), sentence(rng)) for i in range(20)]
    index = ed.EmbeddingIndex(bench, ed.Embedder(ed.EmbedderConfig(encoder_dir, pooling="mean")), 0.9)
    texts = {}
    for i in range(5):  # eval items with one word changed: near duplicates
        words = bench[i].text.split()
        words[3] = "word299"
        texts[f"dup{i}"] = " ".join(words)
    for i in range(20):
        texts[f"new{i}"] = sentence(rng)
    hits = index.hits(texts, batch=7)
    assert set(hits) == {f"dup{i}" for i in range(5)}
    assert [hits[f"dup{i}"]["item"] for i in range(5)] == ["0", "1", "2", "3", "4"]
    assert all(0.9 < h["similarity"] <= 1.0 + 1e-6 and h["kind"] == "embedding" for h in hits.values())


def test_select_removes_and_reports_embedding_matches(tmp_path, jl, encoder_dir):
    rng = random.Random(1)
    bench_rows = [{"id": f"b{i}", "problem": sentence(rng, 64)} for i in range(10)]
    bench = jl.write(tmp_path / "bench.jsonl", bench_rows)
    problems = [sentence(rng, 64) for _ in range(8)]
    near = bench_rows[2]["problem"].split()
    for j, k in enumerate((12, 25, 38, 51)):  # runs of 12 words at most: no shared 13-gram
        near[k] = f"word{290 + j}"
    problems.append(" ".join(near))
    rows = [{"problem_id": f"p{i}", "sample_index": 0, "prompt": t, "response": "<think>t</think>a", "status": "ok",
             "finish_reason": "stop", "verdict": True, "score": 1.0} for i, t in enumerate(problems)]
    src = jl.write(tmp_path / "g.jsonl", rows)
    cfg = SelectConfig(cv_threshold=None, decontam=(bench + ":problem",), decontam_embedder=encoder_dir,
                       decontam_pooling="mean", dedup_near=False)
    report = select_file(src, str(tmp_path / "sft.jsonl"), cfg)
    assert report["dropped"] == {"contaminated": 1}
    hit = report["contamination"]["items"][0]
    assert (hit["problem_id"], hit["item"], hit["kind"]) == ("p8", "b2", "embedding")
    plain = select_file(src, str(tmp_path / "sft2.jsonl"), SelectConfig(cv_threshold=None, decontam=(bench + ":problem",),
                                                                        dedup_near=False))
    assert plain["dropped"] == {}  # only the embedding catches it
