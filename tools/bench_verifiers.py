"""Verifier and filter throughput, measured side by side in one run on this machine.

  python tools/bench_verifiers.py                 # all three, ~1-2 minutes on 2 cores
  python tools/bench_verifiers.py --only code     # or judge / perplexity

(a) code: responses/s (and per core) of `code_verify.verify_many` on short Python programs, each with
    3 stdin/stdout tests (one sandbox job per response: namespaces, then 3 program runs);
(b) judge: calls/s of the judge client against `lt-jax serve`'s server on loopback with a stub
    backend (no model time: the client, HTTP and parsing path), uncached, then from the cache;
(c) perplexity: tokens/s of `lt_jax.data.perplexity.Scorer` (load_hf model, packed rows, one jit)
    against a plain transformers forward on the same weights, one text per call and padded batches.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bench_code(n: int = 200) -> None:
    from lt_jax.data import code_verify

    good = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    tests = [{"input": f"{i} {i + 1}", "output": str(2 * i + 1)} for i in range(3)]
    items = [(good, {"tests": tests}) for _ in range(n)]
    cores = os.cpu_count() or 1
    for workers in (1, 2, 4):
        start = time.perf_counter()
        verdicts = code_verify.verify_many(items, workers=workers)
        dt = time.perf_counter() - start
        assert all(v.score == 1.0 for v in verdicts)
        print(f"code  workers={workers}: {n / dt:7.1f} responses/s  ({n / dt / cores:6.1f} per core, {cores} cores; "
              f"{3 * n / dt:.0f} program runs/s)")


def bench_judge(n: int = 300) -> None:
    from lt_jax.data import judge_verify
    from lt_jax.sample.backends import Choice, GenResult
    from lt_jax.sample.server import ServerConfig, ServerThread

    class Stub:
        name = "stub"

        def generate(self, requests):
            return [GenResult((Choice("Same.\nSCORE: 5", "stop", 3),), 10) for _ in requests]

    with tempfile.TemporaryDirectory() as tmp, ServerThread(Stub(), ServerConfig(port=0)) as srv:
        cfg = judge_verify.JudgeVerifyConfig(base_url=srv.url, model="stub", cache=os.path.join(tmp, "c.sqlite"))
        client = judge_verify.JudgeClient(cfg)
        prompts = [f"question {i}" for i in range(n)]
        for rnd in ("uncached", "cached"):
            start = time.perf_counter()
            replies = [judge_verify.parse_similarity(client.ask(p)) for p in prompts]
            dt = time.perf_counter() - start
            assert replies == [5] * n
            print(f"judge {rnd}: {n / dt:8.1f} calls/s (one grading process, sequential calls)")
        _bench_judged_grading(srv.url, tmp, n)


def _bench_judged_grading(url: str, tmp: str, n: int) -> None:
    """`lt-jax grade` over science responses: calls asked ahead `judge.concurrency` at a time."""
    import json

    from lt_jax.data import grade, judge_verify

    src = os.path.join(tmp, "responses.jsonl")
    with open(src, "w") as f:
        for i in range(n):
            f.write(json.dumps({"problem_id": f"p{i}", "sample_index": 0, "prompt": f"Q{i}", "response": f"A{i}",
                                "reference_answer": f"A{i}", "status": "ok", "domain": "science"}) + "\n")
    for conc in (1, 16, 64):
        judge = judge_verify.JudgeVerifyConfig(base_url=url, model="stub", cache=os.path.join(tmp, f"g{conc}.sqlite"),
                                               concurrency=conc)
        start = time.perf_counter()
        grade.grade_file(src, os.path.join(tmp, f"g{conc}.jsonl"), grade.GradeConfig(judge=judge))
        dt = time.perf_counter() - start
        print(f"judge via lt-jax grade, judge.concurrency={conc:2d}: {n / dt:7.1f} judged responses/s (one process)")


def _tiny_model(folder: str, vocab: int) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab - 1)} | {"[UNK]": vocab - 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder + "_tok")


def bench_perplexity(n: int = 64, vocab: int = 4096) -> None:
    import numpy as np
    import torch
    import transformers

    from lt_jax.data import perplexity

    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(vocab - 1)}" for _ in range(rng.randrange(100, 500))) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        _tiny_model(folder, vocab)
        scorer = perplexity.Scorer(perplexity.PerplexityConfig(model=folder, tokenizer=folder + "_tok", seq_len=1024,
                                                               batch_rows=4))
        scorer.score(texts[:8])  # compile
        start = time.perf_counter()
        ours = scorer.score(texts)
        dt_ours = time.perf_counter() - start
        tokens = sum(c + 1 for _, c in ours)
        ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        ids = [torch.tensor([[int(w[1:]) for w in t.split()]]) for t in texts]
        with torch.no_grad():
            start = time.perf_counter()
            single = [float(torch.exp(ref(x, labels=x).loss)) for x in ids]
            dt_single = time.perf_counter() - start
            start = time.perf_counter()
            for b in range(0, n, 8):
                chunk = ids[b : b + 8]
                width = max(x.shape[1] for x in chunk)
                batch = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros_like(batch)
                for i, x in enumerate(chunk):
                    batch[i, : x.shape[1]], mask[i, : x.shape[1]] = x[0], 1
                ref(batch, attention_mask=mask)
            dt_batch = time.perf_counter() - start
        err = max(abs(a - b) / b for (a, _), b in zip(ours, single))
        print(f"perplexity: {n} texts, {tokens} tokens (hidden 256, 4 layers, vocab {vocab}, fp32, CPU)")
        print(f"  lt_jax Scorer (packed 1024 x 4 rows, jit): {tokens / dt_ours:8.0f} tokens/s")
        print(f"  transformers, one text per forward:       {tokens / dt_single:8.0f} tokens/s")
        print(f"  transformers, padded batches of 8:        {tokens / dt_batch:8.0f} tokens/s (logits only)")
        print(f"  max relative perplexity difference: {err:.1e}; torch threads {torch.get_num_threads()}")
        assert np.isfinite(err) and err < 1e-3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["code", "judge", "perplexity"], default=None)
    args = parser.parse_args()
    for name, fn in (("code", bench_code), ("judge", bench_judge), ("perplexity", bench_perplexity)):
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
