"""Training-step benchmark: forward+backward tokens/s and MFU of the lt_jax decoder on a mesh.

    python tools/bench.py --model-config configs/tiny.yaml hidden_size=256 num_layers=4 \
        --batch 8 --seq 1024 --mesh data=1,fsdp=-1,tensor=1 --steps 10 [--compare-torch]

FLOPs counted per trained token (forward + backward = 3x forward):
  matmuls    6 * N_mm, N_mm = L * (H*Nq*D + 2*H*Nkv*D + Nq*D*H + 3*H*I) + V*H
             (every projection and the LM head; the embedding lookup, norms and biases excluded)
  attention  6 * L * S * Nq * D: QK^T and PV are 2*S*Nq*D multiply-adds each per token forward,
             halved for the causal mask (a flash kernel skips the masked half), times 3 for training.
             Packed rows are counted as one causal row of length S, i.e. cross-document blocks that a
             kernel may skip still count. The non-causal figure (12*L*S*Nq*D) is printed too.
MFU = counted FLOPs per step / step time / (peak FLOP/s per device * devices). Peak FLOP/s comes
from --peak-tflops or the table below by device kind (dense bf16); on CPU pass --peak-tflops.

--compare-torch builds the same model in transformers (random init), copies its weights into
lt_jax through lt_jax.model.hf, checks the logits agree, and times both fwd+bwd in this process.
On a small shared CPU machine a multi-threaded torch stalls whenever another job takes a core
(its OpenMP threads wait for each other), so for a fair ratio run both on one core:
`--pin-cpus 1 --torch-threads 1`. The bench warns when the load average says the CPUs are busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="ModelConfig fields as key=value (applied after --model-config)")
    p.add_argument("--model-config", help="YAML of ModelConfig fields, or a config with a `model:` section")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1", help="data=..,fsdp=..,tensor=.. (-1 = the rest)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--docs-per-row", type=int, default=1, help="packed documents per row (segment ids)")
    p.add_argument("--peak-tflops", help="peak FLOP/s per device in TFLOP/s, or 'auto' to measure a matmul (needed on CPU)")
    p.add_argument("--cpu-devices", type=int, help="virtual CPU devices (sets XLA_FLAGS before jax starts)")
    p.add_argument("--compare-torch", action="store_true", help="also time transformers fwd+bwd (CPU, fp32)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--pin-cpus", type=int, help="pin this process (XLA and torch alike) to its first N allowed CPUs; "
                   "with --torch-threads 1 and --pin-cpus 1 both run single-threaded on one core")
    return p.parse_args(argv)


def flops_per_token(cfg, seq: int) -> dict[str, float]:
    """Training FLOPs per token by the formula in the module docstring."""
    h, d, L = cfg.hidden_size, cfg.resolved_head_dim, cfg.num_layers
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    n_mm = L * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h
    attn_causal = 6 * L * seq * q
    return {"n_matmul_params": n_mm, "matmul": 6 * n_mm, "attention": attn_causal,
            "total": 6 * n_mm + attn_causal, "total_noncausal": 6 * n_mm + 2 * attn_causal}


def make_batch(cfg, batch: int, seq: int, docs: int, seed: int = 0):
    """Random tokens; each row split into `docs` equal packed documents (segment ids, reset positions)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = rng.randint(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    doc = np.minimum(np.arange(seq + 1) * docs // (seq + 1), docs - 1)
    seg = np.broadcast_to(doc + 1, (batch, seq + 1)).astype(np.int32)
    starts = np.searchsorted(doc, doc)
    pos = np.broadcast_to(np.arange(seq + 1) - starts, (batch, seq + 1)).astype(np.int32)
    return ids, seg, pos


def build_step():
    """jit(model, ids, seg, pos) -> (loss, grads): next-token cross-entropy, fwd + bwd."""
    import jax.numpy as jnp
    from flax import nnx

    from lt_jax.train.loss import token_nll

    def loss_fn(model, ids, seg, pos):
        logits = model(ids[:, :-1], pos[:, :-1], seg[:, :-1])
        nll, _ = token_nll(logits, ids[:, 1:])  # the trainer's cross-entropy, not a copy of it
        keep = seg[:, 1:] == seg[:, :-1]  # no target across a document boundary
        return jnp.sum(nll * keep) / jnp.maximum(jnp.sum(keep), 1)

    @nnx.jit
    def step(model, ids, seg, pos):
        return nnx.value_and_grad(loss_fn)(model, ids, seg, pos)

    return step


def time_interleaved(runs: dict, steps: int, warmup: int) -> dict:
    """{name: (first-call seconds incl. compile, [per-step seconds])}. Each fn() blocks until done.

    With several functions the timed steps alternate between them, so a change in machine load
    (shared CPUs) hits all of them alike and their ratio stays fair.
    """
    out = {}
    for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        out[name] = (time.perf_counter() - t0, [])
        for _ in range(max(warmup - 1, 0)):
            fn()
    for _ in range(steps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            out[name][1].append(time.perf_counter() - t0)
    return out


def jax_runner(model, mesh, batch_np):
    """A blocking fwd+bwd step on the mesh, returning the loss."""
    import jax

    from lt_jax.model import sharding as shd

    step = build_step()
    spec = shd.logical_to_sharding(("act_batch", "act_seq"), mesh)
    arrays = [jax.device_put(a, spec) for a in batch_np]

    def run():
        with jax.set_mesh(mesh):
            loss, grads = step(model, *arrays)
            jax.block_until_ready((loss, grads))
        return float(loss)

    return run


def torch_model_for(cfg, folder: str):
    """A transformers model of cfg's family, random init, saved to `folder` (for lt_jax to load)."""
    import torch
    import transformers

    from lt_jax.model import hf

    hf_cfg = hf.model_config_to_hf(dataclasses.replace(cfg, param_dtype="float32"))
    hf_cfg = {k: v for k, v in hf_cfg.items() if k not in ("architectures", "torch_dtype", "model_type")}
    config = transformers.AutoConfig.for_model(cfg.family if cfg.family != "llama" else "llama", **hf_cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return model.train()


def torch_runner(model, batch_np):
    """A blocking transformers fwd+bwd step (unpacked causal rows: its eager path has no segment ids)."""
    import torch

    ids, _, pos = (torch.from_numpy(a.copy()).long() for a in batch_np)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids[:, :-1], position_ids=pos[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.item()

    return run


def report(label, first, times, tokens, flops, peak, n_devices):
    med = statistics.median(times)
    tps = tokens / med
    line = (f"{label:>6}: first step {first:7.2f}s | step median {med * 1e3:9.2f} ms (min {min(times) * 1e3:.2f}) | "
            f"{tps:12,.0f} tok/s | {tps / n_devices:12,.0f} tok/s/device")
    if peak:
        line += f" | MFU {100 * flops['total'] * tokens / med / (peak * n_devices):6.2f}%"
    print(line)
    return med


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.cpu_devices}").strip()
    if args.pin_cpus:
        # before jax/torch start: their thread pools size themselves from the affinity mask
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.pin_cpus])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import jax

    from bench_common import load_model_config, peak_flops
    from lt_jax.model import sharding as shd
    from lt_jax.model.transformer import init_model

    cfg = load_model_config(args.model_config, args.overrides)
    if args.compare_torch and args.docs_per_row != 1:
        raise SystemExit("--compare-torch times unpacked rows; use --docs-per-row 1")
    mesh = shd.make_mesh(shd.parse_mesh(args.mesh))
    devices = mesh.devices.size
    flops = flops_per_token(cfg, args.seq)
    peak = peak_flops(jax.devices()[0], args.peak_tflops)
    tokens = args.batch * args.seq
    print(f"device: {jax.devices()[0].device_kind} x{devices} mesh {dict(mesh.shape)} | jax {jax.__version__} | "
          f"process CPUs {sorted(os.sched_getaffinity(0))}")
    print(f"model: {cfg}")
    print(f"params {cfg.num_params():,} (matmul {flops['n_matmul_params']:,}) | batch {args.batch} x seq {args.seq} "
          f"= {tokens:,} tokens/step, {args.docs_per_row} docs/row")
    print(f"FLOPs/token: 6*N_mm = {flops['matmul']:.4g} + causal attention 6*L*S*Nq*D = {flops['attention']:.4g} "
          f"= {flops['total']:.4g} (non-causal count {flops['total_noncausal']:.4g})")
    print(f"peak: {peak / 1e12:.4g} TFLOP/s per device" if peak else "peak: unknown (pass --peak-tflops for MFU)")
    _warn_if_busy()

    batch_np = make_batch(cfg, args.batch, args.seq, args.docs_per_row)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        if args.compare_torch:
            import torch

            if args.torch_threads:
                torch.set_num_threads(args.torch_threads)
            torch_model = torch_model_for(cfg, tmp)
            from lt_jax.model.hf import load_hf

            model = load_hf(tmp, mesh=mesh, dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                            remat=cfg.remat, attention=cfg.attention)
            _check_same_logits(model, torch_model, batch_np[0][:1, :32])
            runs["jax"] = jax_runner(model, mesh, batch_np)
            runs["torch"] = torch_runner(torch_model, batch_np)
        else:
            runs["jax"] = jax_runner(init_model(cfg, mesh=mesh), mesh, batch_np)
        results = time_interleaved(runs, args.steps, args.warmup)
    medians, mins = {}, {}
    for name, (first, times) in results.items():
        mins[name] = min(times)
        on_mesh = name == "jax"
        medians[name] = report(name, first, times, tokens, flops, peak if on_mesh else None, devices if on_mesh else 1)
        print(f"        loss {runs[name]():.4f}" + ("" if on_mesh else f" (torch threads {torch.get_num_threads()})"))
    from lt_jax.train.metrics import peak_memory_gib

    peak_gib = peak_memory_gib(jax.devices()[0])
    print("peak memory: " + ("n/a (no allocator stats on this backend)" if peak_gib is None else f"{peak_gib:.2f} GiB on device 0"))
    if "torch" in medians:
        print(f"ratio: torch step / jax step = {medians['torch'] / medians['jax']:.2f}x (>1 means lt_jax is faster; "
              f"medians of {args.steps} interleaved steps); fastest steps: {mins['torch'] / mins['jax']:.2f}x")
    return 0


def _warn_if_busy() -> None:
    """Other jobs on the machine skew timings, multi-threaded ones most: say so in the output."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cpus:
        print(f"WARNING: load average {load:.1f} on {cpus} CPUs: other jobs are running; step times are "
              "noisy (compare ratios from one run; --pin-cpus 1 --torch-threads 1 is the steadiest)")


def _check_same_logits(model, torch_model, ids):
    import numpy as np
    import torch

    ours = np.asarray(model(ids))
    with torch.no_grad():
        ref = torch_model.eval()(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    torch_model.train()
    diff = float(np.abs(ours - ref).max())
    print(f"weights copied through lt_jax.model.hf: max |logits - transformers| = {diff:.2e}")
    if diff > 1e-2:
        raise SystemExit("lt_jax and transformers disagree; the timing comparison would be meaningless")


if __name__ == "__main__":
    sys.exit(main())
