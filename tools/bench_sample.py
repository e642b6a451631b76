"""Sampling benchmark: prefill and decode tokens/s of the KV-cache sampler against batch size.

    # CPU: a tiny Qwen2 model, side by side with transformers' generate on the same weights
    python tools/bench_sample.py --preset tiny --batch 1,4,16 --prompt-len 64 --new-tokens 64

    # GPU/TPU: a Qwen2.5-1.5B-shaped model (random weights), bf16, batch 64, 1k prompts, 8k new tokens
    python tools/bench_sample.py --preset qwen2.5-1.5b --batch 64 --prompt-len 1024 --new-tokens 8192

    # the same, scaled down for a CPU smoke run (key=value overrides of ModelConfig fields)
    python tools/bench_sample.py --preset qwen2.5-1.5b num_layers=1 --batch 2 --prompt-len 16 --new-tokens 4

Every row samples exactly --new-tokens tokens (no EOS), from random prompts. Reported per batch size:
  prefill tok/s   batch * prompt_len / time of the prefill call (one jitted device call)
  decode tok/s    batch * (new_tokens - 1) / decode time (from the end of prefill to the last token;
                  includes the host work between decode chunks: token transfer, stop checks)
  e2e tok/s       batch * new_tokens / whole generation time
With --compare-hf (default for the tiny preset) the same model is built in transformers (random
init, saved, loaded into lt_jax with lt_jax.model.hf), and `model.generate` runs on the same left-padded
prompts in the same process: prefill = one forward over the prompts, decode = generate - prefill.
Times are medians of --repeats runs after a warm-up (compiles excluded).

--workload heavy-tail: the long-thought eval shape. --requests prompts (16-64 tokens) whose output
lengths are log-normal with a mean near a third of --cap (each request stops at its drawn length, as
it would at an EOS). The same requests run through the lockstep sampler in fixed batches of --slots
rows (a batch lasts as long as its longest row, as `lt-jax eval` ran before the engine) and through
the engine with --slots slots, side by side: generated tokens/s, and KV memory held (the dense cache
of a lockstep batch vs the engine's peak pages in use, and the engine's page pool).

    python tools/bench_sample.py --workload heavy-tail --requests 256 --cap 512 --slots 32

With --frequency-penalty F (heavy-tail), every engine request also sets frequency_penalty F and
repetition_penalty 1.1 (per-slot token counts on device); the lockstep side is skipped (the
lockstep sampler refuses penalties), so the line reports the engine alone.

Decode roofline (memory-bound regime). One decode step must read every weight once and every
cached key/value it attends to:
  bytes/step = P_bytes + KV_bytes
  P_bytes    = bytes/param * (N_params - V*H if the embedding is untied: its lookup reads B rows only)
  KV_bytes   = 2 (K and V) * L * B * T * Nkv * D * bytes/element
with T = cache_len (the preallocated buffer the XLA decode attention reads in full each step: what
the kernel does) or T = the mean filled length prompt + new/2 (what an ideal paged kernel reads).
fraction of roofline = bytes/step / (decode step time) / peak HBM bandwidth, step time = decode
time / (new_tokens - 1). Peak bandwidth from --peak-gbps or the table below by device kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# peak HBM bandwidth in GB/s, matched against jax's device_kind (first match wins)
PEAK_GBPS = (("H200", 4800.0), ("H100", 3350.0), ("A100", 2039.0), ("v6", 1640.0), ("v5 lite", 819.0),
             ("v5p", 2765.0), ("TPU v5", 2765.0), ("v4", 1228.0))

PRESETS = {
    "tiny": dict(family="qwen2", vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                 num_kv_heads=2, attention_bias=True, tie_word_embeddings=True, max_position_embeddings=4096),
    "qwen2.5-1.5b": dict(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                         num_heads=12, num_kv_heads=2, attention_bias=True, tie_word_embeddings=True,
                         rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="ModelConfig fields as key=value, applied to the preset")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--batch", default="1,4,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (as the HF comparison)")
    p.add_argument("--compare-hf", action=argparse.BooleanOptionalAction, default=None,
                   help="time transformers' generate on the same model (default: on for the tiny preset)")
    p.add_argument("--threads", type=int, help="CPU: intra-op threads for both XLA and torch (fairer on a busy machine)")
    p.add_argument("--peak-gbps", type=float, help="peak HBM bandwidth for the roofline (default: by device kind)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median reported)")
    p.add_argument("--json-out", help="append one JSON line per batch size here")
    p.add_argument("--workload", choices=["fixed", "heavy-tail"], default="fixed")
    p.add_argument("--requests", type=int, default=256, help="heavy-tail: number of requests")
    p.add_argument("--cap", type=int, default=512, help="heavy-tail: max new tokens per request")
    p.add_argument("--slots", type=int, default=32, help="heavy-tail: engine slots = lockstep batch rows")
    p.add_argument("--page-size", type=int, default=16, help="heavy-tail: engine page size")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="heavy-tail: engine requests with penalties (lockstep skipped: it refuses them)")
    return p.parse_args(argv)


def peak_gbps(args, device_kind: str):
    if args.peak_gbps:
        return args.peak_gbps
    return next((bw for name, bw in PEAK_GBPS if name.lower() in device_kind.lower()), None)


def build_models(args, cfg_fields: dict, mesh):
    """(lt_jax model, transformers model or None)."""
    from lt_jax.model.config import ModelConfig
    from lt_jax.model.transformer import init_model

    if not args.compare_hf:
        cfg = ModelConfig(**cfg_fields, param_dtype=args.dtype, compute_dtype=args.dtype)
        return init_model(cfg, mesh=mesh), None
    import torch
    import transformers

    from lt_jax.model.hf import load_hf

    f = cfg_fields
    hf_cfg = transformers.Qwen2Config(
        vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
        num_hidden_layers=f["num_layers"], num_attention_heads=f["num_heads"], num_key_value_heads=f["num_kv_heads"],
        tie_word_embeddings=f["tie_word_embeddings"], max_position_embeddings=f["max_position_embeddings"],
        bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    folder = tempfile.mkdtemp(prefix="bench_sample_")
    hf.save_pretrained(folder)
    return load_hf(folder, mesh=mesh, dtype=args.dtype), hf.to(getattr(torch, args.dtype))


def bench_ours(model, mesh, args, batch: int, prompts):
    """(prefill s, decode s, total s, cache_len, tokens): medians over --repeats timed runs."""
    import jax
    import numpy as np

    from lt_jax.sample import sampler as smp

    rows = [smp.RowSpec(i, smp.row_seed(0, i), temperature=args.temperature, max_new_tokens=args.new_tokens)
            for i in range(batch)]
    sampler = smp.Sampler(model, mesh, smp.SamplerConfig(chunk_size=args.chunk_size))
    # Compile (and run once) prefill and one decode chunk of the same shapes, and wait for them.
    with smp.mesh_context(sampler.mesh):
        state, first, plan = sampler.prefill(prompts, rows)
        jax.block_until_ready(smp._decode(sampler.graphdef, sampler.params, state, plan.rows,
                                          np.zeros(first.shape[0], bool), chunk=args.chunk_size, mode=plan.mode))
    sampler.timed = True
    runs = []
    for _ in range(args.repeats):
        sampler.stats.update(prefill_s=0.0, decode_s=0.0)
        t0 = time.perf_counter()
        results = sampler.run(prompts, rows)
        runs.append((sampler.stats["prefill_s"], sampler.stats["decode_s"], time.perf_counter() - t0))
    assert all(len(r.tokens) == args.new_tokens for r in results)
    t_pre, t_dec, t_tot = (statistics.median(x) for x in zip(*runs))
    return t_pre, t_dec, t_tot, sampler.last_shapes["cache_len"], [r.tokens for r in results]


def bench_hf(hf, args, prompts):
    """(prefill s, generate s, tokens) for transformers on the same left-padded prompts (medians)."""
    import torch

    n = len(prompts)
    ids = torch.zeros((n, args.prompt_len), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, -len(p):], mask[i, -len(p):] = torch.tensor(p), 1
    kwargs = dict(attention_mask=mask, do_sample=args.temperature > 0, max_new_tokens=args.new_tokens,
                  min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)
    if args.temperature > 0:
        kwargs["temperature"] = args.temperature
    pre, tot = [], []
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            hf(input_ids=ids, attention_mask=mask)
            pre.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = hf.generate(ids, **kwargs)
            tot.append(time.perf_counter() - t0)
    return statistics.median(pre), statistics.median(tot), out[:, args.prompt_len:].tolist()


def roofline(cfg, batch: int, cache_len: int, args, step_s: float, peak):
    """(bytes per decode step with T = cache_len, with T = mean filled length, fractions of peak)."""
    import numpy as np

    elem = np.dtype(args.dtype).itemsize if args.dtype != "bfloat16" else 2
    n_params = cfg.num_params()
    if not cfg.tie_word_embeddings:
        n_params -= cfg.vocab_size * cfg.hidden_size
    p_bytes = n_params * elem
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.resolved_head_dim * elem * batch
    full = p_bytes + per_token * cache_len
    filled = p_bytes + per_token * (args.prompt_len + args.new_tokens / 2)
    fracs = (full / step_s / (peak * 1e9), filled / step_s / (peak * 1e9)) if peak else (None, None)
    return full, filled, fracs


def heavy_tail(model, mesh, args) -> dict:
    """Engine vs lockstep on the same heavy-tailed requests (see the module doc)."""
    import numpy as np

    from lt_jax.sample import engine as eng
    from lt_jax.sample import paged
    from lt_jax.sample import sampler as smp

    cfg = model.config
    rng = np.random.RandomState(0)
    sigma = 1.0  # log-normal: mean = exp(mu + sigma^2 / 2) = cap / 3
    lengths = np.clip(rng.lognormal(np.log(args.cap / 3) - sigma ** 2 / 2, sigma, args.requests), 1, args.cap)
    lengths = [int(n) for n in lengths]
    prompts = [[int(t) for t in rng.randint(1, cfg.vocab_size, size=rng.randint(16, 65))] for _ in lengths]
    pen = dict(frequency_penalty=args.frequency_penalty, repetition_penalty=1.1) if args.frequency_penalty else {}
    spec = lambda i, n, **kw: smp.RowSpec(i, smp.row_seed(0, i), temperature=args.temperature,  # noqa: E731
                                          max_new_tokens=n, **kw)
    sampler = smp.Sampler(model, mesh, smp.SamplerConfig(chunk_size=args.chunk_size))
    config = eng.EngineConfig(num_slots=args.slots, page_size=args.page_size, decode_steps=args.chunk_size,
                              max_len=64 + args.cap)
    engine = eng.Engine(model, config, mesh)
    per_token = paged.page_bytes(cfg, 1, None)

    def lockstep():
        dense = 0
        if pen:
            return 0
        for start in range(0, len(prompts), args.slots):
            group = range(start, min(start + args.slots, len(prompts)))
            rows = [spec(k, lengths[i]) for k, i in enumerate(group)]
            sampler.run([prompts[i] for i in group], rows)
            shapes = sampler.last_shapes
            dense = max(dense, shapes["rows"] * shapes["cache_len"] * per_token)
        return dense

    def engine_run():
        engine.run(prompts, [[spec(0, n, **pen)] for n in lengths])

    lockstep(), engine_run()  # compile every shape both sides use
    engine.stats.clear()
    t0 = time.perf_counter()
    dense = lockstep()
    t_lock = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine_run()
    t_eng = time.perf_counter() - t0
    tokens = sum(lengths)
    rec = dict(workload="heavy-tail", requests=args.requests, cap=args.cap, slots=args.slots, tokens=tokens,
               mean_len=tokens / len(lengths), lockstep_tok_s=tokens / t_lock, engine_tok_s=tokens / t_eng,
               speedup=t_lock / t_eng, lockstep_kv_bytes=dense,
               engine_kv_peak_bytes=engine.stats["pages_peak"] * args.page_size * per_token,
               engine_kv_pool_bytes=(engine.config.num_pages - 1) * args.page_size * per_token,
               preempted=engine.stats["preempted"])
    print(f"heavy-tail: {args.requests} requests, cap {args.cap}, mean {rec['mean_len']:.0f} new tokens, "
          f"{args.slots} slots/rows")
    if pen:
        rec.update(lockstep_tok_s=None, speedup=None, penalties=pen)
        print(f"  engine with penalties {pen}: {rec['engine_tok_s']:.0f} tok/s "
              f"({engine.stats['decode_calls']} decode calls, {engine.stats['decode_s']:.2f} s in them)")
    else:
        print(f"  lockstep {rec['lockstep_tok_s']:.0f} tok/s, engine {rec['engine_tok_s']:.0f} tok/s "
              f"({rec['speedup']:.2f}x)")
    print(f"  KV held: lockstep dense cache {dense / 2**20:.1f} MiB per batch; engine peak pages "
          f"{rec['engine_kv_peak_bytes'] / 2**20:.1f} MiB (pool {rec['engine_kv_pool_bytes'] / 2**20:.1f} MiB)")
    return rec


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:  # before jax/torch start their thread pools
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen="
                                   + ("true" if args.threads > 1 else "false")
                                   + f" intra_op_parallelism_threads={args.threads}").strip()
        import torch

        torch.set_num_threads(args.threads)
    import jax
    import numpy as np

    from lt_jax.model.sharding import parse_mesh
    from lt_jax.model.sharding import make_mesh

    cpu = jax.default_backend() == "cpu"
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    if args.compare_hf is None:
        args.compare_hf = args.preset == "tiny" and cpu
    mesh = make_mesh(parse_mesh(args.mesh)) if len(jax.devices()) > 1 else None
    fields = dict(PRESETS[args.preset])
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key not in fields and key not in ("rope_theta", "rms_norm_eps", "head_dim"):
            raise SystemExit(f"bench_sample: unknown or unsupported override {item!r}")
        fields[key] = type(fields.get(key, 0.0))(value) if key in fields else float(value)
    model, hf = build_models(args, fields, mesh)
    cfg = model.config
    kind = jax.devices()[0].device_kind
    peak = peak_gbps(args, kind)
    if args.workload == "heavy-tail":
        rec = heavy_tail(model, mesh, args)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(dict(rec, device=kind, dtype=args.dtype, preset=args.preset)) + "\n")
        return 0
    print(f"device {kind} x{len(jax.devices())}, {cfg.num_params() / 1e6:.1f}M params, {args.dtype}, "
          f"prompt {args.prompt_len}, new {args.new_tokens}, chunk {args.chunk_size}")
    header = f"{'batch':>5} {'prefill tok/s':>13} {'decode tok/s':>12} {'e2e tok/s':>10} {'ms/step':>8}"
    header += f" {'roofline(T=cache)':>17} {'roofline(T=filled)':>18}"
    if hf is not None:
        header += f" {'HF prefill':>10} {'HF decode':>10} {'decode x HF':>11} {'same tokens':>11}"
    print(header)
    rng = np.random.RandomState(0)
    for batch in [int(b) for b in args.batch.split(",")]:
        # Lengths vary a little (left padding is exercised); the longest is exactly prompt_len.
        lens = [args.prompt_len] + list(rng.randint(args.prompt_len // 2, args.prompt_len + 1, size=batch - 1))
        prompts = [[int(t) for t in rng.randint(1, cfg.vocab_size, size=n)] for n in lens]
        t_pre, t_dec, t_tot, cache_len, ours = bench_ours(model, mesh, args, batch, prompts)
        steps = max(args.new_tokens - 1, 1)
        full, filled, (f_full, f_filled) = roofline(cfg, batch, cache_len, args, t_dec / steps, peak)
        rec = dict(batch=batch, prefill_tok_s=sum(lens) / t_pre, decode_tok_s=batch * steps / t_dec,
                   e2e_tok_s=batch * args.new_tokens / t_tot, ms_per_step=1e3 * t_dec / steps, cache_len=cache_len,
                   bytes_per_step_cache=full, bytes_per_step_filled=filled, roofline_cache=f_full,
                   roofline_filled=f_filled, device=kind, dtype=args.dtype, preset=args.preset,
                   prompt_len=args.prompt_len, new_tokens=args.new_tokens)
        fmt = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        line = (f"{batch:>5} {rec['prefill_tok_s']:>13.0f} {rec['decode_tok_s']:>12.0f} {rec['e2e_tok_s']:>10.0f} "
                f"{rec['ms_per_step']:>8.2f} {fmt(f_full):>17} {fmt(f_filled):>18}")
        if hf is not None:
            h_pre, h_tot, theirs = bench_hf(hf, args, prompts)
            h_dec = max(h_tot - h_pre, 1e-9)
            rec.update(hf_prefill_tok_s=sum(lens) / h_pre, hf_decode_tok_s=batch * steps / h_dec,
                       decode_speedup=(batch * steps / t_dec) / (batch * steps / h_dec),
                       same_tokens=sum(a == b for a, b in zip(ours, theirs)) / batch)
            line += (f" {rec['hf_prefill_tok_s']:>10.0f} {rec['hf_decode_tok_s']:>10.0f} "
                     f"{rec['decode_speedup']:>10.2f}x {rec['same_tokens']:>11.0%}")
        print(line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
