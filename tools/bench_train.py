"""Training benchmark: the whole train step (loader -> jitted step with AdamW) and the loader alone.

    python tools/bench_train.py --config configs/tiny.yaml --steps 20 [--peak-tflops auto] [a.b=value ...]

Reports, side by side in one run:
  trainer   tokens/s (real tokens, padding excluded), per device, and MFU, over `--steps` steps after
            `--warmup` steps (compilation excluded). FLOPs are counted by lt_jax.train.metrics
            (6 * matmul params * tokens + causal in-segment attention); MFU needs a peak: the
            device table, `--peak-tflops X`, or `--peak-tflops auto`, which measures this device's
            fp32 matmul rate (a 2048^3 matmul) and uses it as the peak: MFU against what this CPU
            actually sustains, not a data-sheet number.
  loader    tokens/s of the Grain loader alone (read + pack, no device work), with 0 and
            `--workers` worker processes, and its margin over the trainer's consumption.

Data: the synthetic arithmetic task encoded one character per token (ids < 128), `--records`
records written as real token shards in a temporary folder, packed into rows of `data.seq_len`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="run config overrides, e.g. model.hidden_size=256 data.seq_len=1024")
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--loader-batches", type=int, default=40)
    p.add_argument("--workers", type=int, default=2, help="grain worker processes for the second loader run")
    p.add_argument("--peak-tflops", default=None, help="peak TFLOP/s per device, or 'auto' to measure a matmul")
    return p.parse_args(argv)


def write_data(folder: str, n: int) -> str:
    """`n` synthetic-task records, one character per token, as a tokenized folder."""
    import json

    import numpy as np

    from lt_jax import storage
    from lt_jax.data import shards as shards_lib
    from lt_jax.data import synthetic

    levels = (2, 3, 4)
    cfg = synthetic.SyntheticConfig(num_problems=n, num_heldout=0, levels=levels, wrong_rate=(0.0,) * 3, prompt_template="{problem}")
    ids, masks = [], []
    for p in synthetic.make_problems(cfg):
        rec = synthetic.response_record(cfg, p, 0)
        prompt, answer = rec["prompt"] + "\n", rec["response"] + "\x03"
        ids.append(np.array([min(ord(c), 127) for c in prompt + answer], np.int32))
        masks.append(np.r_[np.zeros(len(prompt)), np.ones(len(answer))].astype(np.uint8))
    shards_lib.write_shard(shards_lib.shard_dir(folder, 0), ids, masks)
    spec = {"name": shards_lib.shard_name(0), "records": len(ids), "tokens": int(sum(map(len, ids))),
            "loss_tokens": int(sum(m.sum() for m in masks))}
    shards_lib.write_marker(folder, 0, spec)
    storage.write_text(storage.join(folder, "manifest.json"), json.dumps(
        {"format": shards_lib.FORMAT, "num_records": len(ids), "shards": [spec], "tokenizer": {"vocab_size": 128}}))
    return folder


def bench_trainer(cfg, steps: int, warmup: int, peak) -> dict:
    import jax

    from lt_jax.train import metrics, trainer

    run = trainer.setup(cfg, printer=lambda *a, **k: None)
    tokens = flops = 0.0
    with jax.set_mesh(run.mesh):
        for i in range(warmup + steps):
            if i == warmup:
                jax.block_until_ready(run.state)
                t0 = time.perf_counter()
            run.state, m = run.train_step(run.state, next(run.loader))
            if i >= warmup:
                m = jax.device_get(m) if i == warmup + steps - 1 else m
                tokens += float(m["tokens"])
                flops += metrics.step_flops(run.model_config, float(m["tokens"]), float(m["attention_pairs"]))
        jax.block_until_ready(run.state)
    elapsed = time.perf_counter() - t0
    run.loader.close()
    run.checkpointer.close()
    devices = jax.device_count()
    return {"tokens_per_s": tokens / elapsed, "per_device": tokens / elapsed / devices, "step_s": elapsed / steps,
            "mfu": flops / elapsed / (devices * peak) if peak else None, "params": run.model_config.num_params(),
            "peak_gib": metrics.peak_memory_gib(jax.devices()[0])}


def bench_loader(path: str, cfg, batches: int, workers: int) -> float:
    import dataclasses

    from lt_jax.data import loader as loader_lib
    from lt_jax.data.source import TokenizedSource

    opts = loader_lib.LoaderOptions.from_data_config(cfg.data, cfg.train.global_batch)
    opts = dataclasses.replace(opts, worker_count=workers)
    with loader_lib.Loader(TokenizedSource(path), opts) as loader:
        next(loader)  # start-up (worker spawn) excluded
        t0, tokens = time.perf_counter(), 0
        for _ in range(batches):
            tokens += int((next(loader)["segment_ids"] > 0).sum())
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    from lt_jax.train.config import load_run_config

    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(os.path.join(tmp, "tokens"), args.records)
        overrides = [f"data.train={data}", f"train.output_dir={tmp}/run", "train.steps=1000000",
                     "checkpoint.every=1000000", "logging.tensorboard=false", "logging.jsonl=false", *args.overrides]
        cfg = load_run_config(args.config, overrides)
        import jax
        from bench_common import peak_flops

        peak = peak_flops(jax.devices()[0], args.peak_tflops)
        t = bench_trainer(cfg, args.steps, args.warmup, peak)
        loader0 = bench_loader(data, cfg, args.loader_batches, 0)
        loaderw = bench_loader(data, cfg, args.loader_batches, args.workers)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()}; model {t['params'] / 1e6:.2f}M params; "
          f"batch {cfg.train.global_batch} x {cfg.data.seq_len}")
    if peak and args.peak_tflops:
        print(f"peak used for MFU: {peak / 1e12:.3f} TFLOP/s per device ({'measured matmul' if args.peak_tflops == 'auto' else 'given'})")
    mfu = "n/a (no peak for this device; pass --peak-tflops)" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
    print(f"trainer : {t['tokens_per_s']:,.0f} tokens/s ({t['per_device']:,.0f}/device), {t['step_s']:.3f} s/step, MFU {mfu}")
    print("peak memory: " + ("n/a (no allocator stats on this backend)" if t["peak_gib"] is None
                             else f"{t['peak_gib']:.2f} GiB on device 0"))
    print(f"loader  : {loader0:,.0f} tokens/s (0 workers), {loaderw:,.0f} tokens/s ({args.workers} workers)")
    print(f"loader / trainer: {loader0 / t['tokens_per_s']:.1f}x (0 workers), {loaderw / t['tokens_per_s']:.1f}x ({args.workers} workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
