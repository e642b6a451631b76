"""Data-path benchmark: tokenization throughput and random-batch reads, measured side by side.

  python tools/bench_data.py                  # everything, ~2-4 minutes on 2 cores
  python tools/bench_data.py --skip-reads     # tokenization only

(a) Tokenization, same records, same tokenizer (real Qwen2.5) and template, same mask path:
    encode-only tokens/s on one core for `ChatEncoder.encode` vs `datasets.Dataset.map`
    (per-example and batched), then the whole `lt-jax tokenize` stage (JSONL -> shards) with
    1 and 2 workers vs `Dataset.map(num_proc=1|2)` (which writes Arrow cache files).
(b) Reads from a tokenized folder, local disk vs the GCS emulator (fake-gcs-server on loopback:
    no real network latency, so gs:// numbers are a floor on the client-side cost), for random
    batches through `TokenizedSource.read_batch` and one `__getitem__` at a time; and the same
    records in array_record through grain's ArrayRecordDataSource (the alternative format).

Records are synthetic long chain-of-thought answers (<think> sections of arithmetic steps,
self-checks and LaTeX) of a few thousand tokens each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from lt_jax import storage  # noqa: E402

SHARED = os.environ.get("LT_JAX_SHARED", os.path.join(os.path.dirname(REPO), "shared"))


def long_cot(rng: random.Random, steps: int) -> str:
    parts = ["<think>\nOkay, let me work through this carefully."]
    for k in range(steps):
        a, b = rng.randint(10, 9999), rng.randint(2, 999)
        kind = rng.random()
        if kind < 0.4:
            parts.append(f"Step {k + 1}: {a} \\times {b} = {a * b}. Let me double-check: {a * b} / {b} = {a}. Yes.")
        elif kind < 0.7:
            parts.append(f"Now, $\\frac{{{a}}}{{{b}}} \\approx {a / b:.4f}$, so the remainder is {a % b}.")
        elif kind < 0.85:
            parts.append(f"Wait, that doesn't look right. Going back to {a} + {b} = {a + b}, hmm, so far so good.")
        else:
            parts.append(f"Alternatively, consider $x^2 - {a}x + {b} = 0$; the discriminant is {a * a - 4 * b}.")
    answer = rng.randint(0, 999)
    return " ".join(parts) + f"\n</think>\n\nTherefore the answer is $\\boxed{{{answer}}}$."


def make_records(n: int, mean_steps: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        steps = max(5, int(rng.gauss(mean_steps, mean_steps / 3)))
        recs.append({"id": f"b{i}", "messages": [
            {"role": "user", "content": f"Problem {i}: find the value of the expression described above."},
            {"role": "assistant", "content": long_cot(rng, steps)}], "meta": {}})
    return recs


def _cpu() -> float:
    """CPU seconds of this process and of its reaped children (worker pools are joined on exit)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def timed_cpu(fn):
    """(result, wall seconds, CPU seconds): CPU time makes rates comparable on a shared machine."""
    c0, t0 = _cpu(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, _cpu() - c0


# ---------------------------------------------------------------------------------------------
# (a) tokenization


def _hf_map_fn(tok):
    def one(ex):
        out = tok.apply_chat_template(ex["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "loss_mask": out["assistant_masks"]}

    def batch(exs):
        out = tok.apply_chat_template(exs["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return {"input_ids": out["input_ids"], "loss_mask": out["assistant_masks"]}

    return one, batch


def bench_tokenize(tok_dir: str, records: list[dict], tmp: str) -> None:
    import datasets
    from transformers import AutoTokenizer

    from lt_jax.data import tokenize as tk

    datasets.disable_progress_bars()
    enc = tk.ChatEncoder(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    one, batch = _hf_map_fn(tok)
    ds = datasets.Dataset.from_list([{"messages": r["messages"]} for r in records])
    ours, t_ours, c_ours = timed_cpu(lambda: [enc.encode(r["messages"]) for r in records])
    n_tok = sum(len(x) for x, _ in ours)
    hf1, t_hf1, c_hf1 = timed_cpu(lambda: ds.map(one, remove_columns=["messages"], keep_in_memory=True))
    hfb, t_hfb, c_hfb = timed_cpu(
        lambda: ds.map(batch, batched=True, batch_size=64, remove_columns=["messages"], keep_in_memory=True))
    assert [x.tolist() for x, _ in ours[:5]] == hf1["input_ids"][:5] == hfb["input_ids"][:5]
    assert [m.tolist() for _, m in ours[:5]] == hf1["loss_mask"][:5]
    print(f"\n(a) tokenization: {len(records)} records, {n_tok} tokens ({n_tok / len(records):.0f}/record)")
    print("  encode only, in this process:            k tokens/s per CPU-second (wall)")
    for name, t, c in [("lt_jax ChatEncoder.encode", t_ours, c_ours), ("datasets.map (per example)", t_hf1, c_hf1),
                       ("datasets.map (batched 64)", t_hfb, c_hfb)]:
        print(f"    {name:36s} {n_tok / c / 1e3:8.1f}  ({n_tok / t / 1e3:.1f})")

    path = os.path.join(tmp, "bench.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print("  whole stage, JSONL -> files, start-up included: k tokens/s per CPU-second, wall k tokens/s (s)")
    rows = []
    for workers in (1, 2):
        out = os.path.join(tmp, f"tok_w{workers}")
        cfg = tk.TokenizeConfig(inputs=(path,), tokenizer=tok_dir, out=out, workers=workers,
                                records_per_shard=max(1, len(records) // 16))
        _, t, c = timed_cpu(lambda: tk.tokenize(cfg, progress=False))
        rows.append((f"lt-jax tokenize, {workers} worker(s)", t, c))
    for procs in (1, 2):
        ds_file = datasets.load_dataset("json", data_files=path, split="train", cache_dir=os.path.join(tmp, f"hf{procs}"))
        _, t, c = timed_cpu(lambda: ds_file.map(one, remove_columns=list(ds_file.column_names),
                                                num_proc=procs if procs > 1 else None))
        rows.append((f"datasets.map, num_proc={procs}", t, c))
    for name, t, c in rows:
        print(f"    {name:36s} {n_tok / c / 1e3:8.1f}  {n_tok / t / 1e3:8.1f} ({t:.1f} s)")
    print(f"    wall-clock speed-up 2 vs 1: lt-jax {rows[0][1] / rows[1][1]:.2f}x, datasets {rows[2][1] / rows[3][1]:.2f}x "
          f"(load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


# ---------------------------------------------------------------------------------------------
# (b) reads


def write_array_record(src, path: str) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(path, "group_size:1")
    for i in range(len(src)):
        r = src[i]
        w.write(np.int64(len(r["input_ids"])).tobytes() + r["input_ids"].tobytes() + r["loss_mask"].tobytes())
    w.close()


def decode_array_record(raw: bytes) -> dict:
    n = int(np.frombuffer(raw[:8], np.int64)[0])
    return {"input_ids": np.frombuffer(raw[8 : 8 + 4 * n], np.int32), "loss_mask": np.frombuffer(raw[8 + 4 * n :], np.uint8)}


def read_rate(name: str, n_records: int, read_batch, batch: int, batches: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    plan = [rng.integers(0, n_records, batch) for _ in range(batches)]
    read_batch(plan[0])  # open handles, warm metadata
    nbytes = 0
    t0 = time.perf_counter()
    for idx in plan[1:]:
        nbytes += sum(r["input_ids"].nbytes + r["loss_mask"].nbytes for r in read_batch(idx))
    t = time.perf_counter() - t0
    n = batch * (batches - 1)
    print(f"    {name:44s} {n / t:8.1f} records/s  {nbytes / t / 2**20:7.1f} MB/s")


def bench_reads(tok_dir: str, records: list[dict], tmp: str, bucket: str, batch: int, batches: int) -> None:
    from grain.sources import ArrayRecordDataSource

    from lt_jax.data import tokenize as tk
    from lt_jax.data.source import TokenizedSource

    path = os.path.join(tmp, "reads.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    local_out, gcs_out = os.path.join(tmp, "reads_local"), storage.join(bucket, "reads")
    per_shard = max(1, len(records) // 4)
    times = {}
    for out in (local_out, gcs_out):
        cfg = tk.TokenizeConfig(inputs=(path,), tokenizer=tok_dir, out=out, workers=1, records_per_shard=per_shard)
        _, times[out] = timed(lambda: tk.tokenize(cfg, progress=False))
    local, remote = TokenizedSource(local_out), TokenizedSource(gcs_out)
    n = len(local)
    tokens = int(local.lengths.sum())
    ar_local = os.path.join(tmp, "records.array_record")
    _, t_ar = timed(lambda: write_array_record(local, ar_local))
    ar_remote = storage.join(bucket, "records.array_record")
    _, t_up = timed(lambda: storage.copy_local_to(ar_local, ar_remote))
    zarr_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(os.path.join(local_out, "shards")) for f in fs)
    print(f"\n(b) reads: {n} records, {tokens} tokens, {tokens * 5 / 2**20:.1f} MB raw (int32 ids + uint8 mask)")
    print(f"    on disk: zarr3 shards {zarr_bytes / 2**20:.1f} MB (zstd), array_record {os.path.getsize(ar_local) / 2**20:.1f} MB")
    print(f"    write: tokenize->local {times[local_out]:.1f} s, tokenize->gs:// {times[gcs_out]:.1f} s (same work); "
          f"array_record local write {t_ar:.2f} s + upload {t_up:.2f} s")
    print(f"  random batches of {batch}:")
    for name, src in (("zarr3 local, read_batch", local), ("zarr3 gs://, read_batch", remote)):
        read_rate(name, n, src.read_batch, batch, batches)
    for name, src in (("zarr3 local, __getitem__ one by one", local), ("zarr3 gs://, __getitem__ one by one", remote)):
        read_rate(name, n, lambda idx, s=src: [s[int(i)] for i in idx], batch, batches)
    for name, p in (("array_record local (grain source)", ar_local), ("array_record gs:// (grain source)", ar_remote)):
        ar = ArrayRecordDataSource([p])
        read_rate(name, n, lambda idx, a=ar: [decode_array_record(x) for x in a.__getitems__([int(i) for i in idx])], batch, batches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=240)
    ap.add_argument("--steps", type=int, default=120, help="mean reasoning steps per record (~25 tokens each)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--skip-reads", action="store_true")
    ap.add_argument("--skip-tokenize", action="store_true")
    args = ap.parse_args()
    import tests.gcs as gcs

    gcs.configure_environment()  # before any GCS client or TensorStore is imported
    tok_dir = os.path.join(SHARED, "tokenizers", "qwen2.5")
    records = make_records(args.records, args.steps)
    tmp = tempfile.mkdtemp(prefix="lt_jax_bench_")
    try:
        print(f"cores: {len(os.sched_getaffinity(0))}, load average: {os.getloadavg()[0]:.1f}")
        if not args.skip_tokenize:
            bench_tokenize(tok_dir, records, tmp)
        if not args.skip_reads:
            gcs.start()
            bench_reads(tok_dir, records, tmp, gcs.new_bucket(), args.batch, args.batches)
            gcs.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
