"""GPU smoke check: is this machine's GPU attention path (cuDNN, packed rows, GQA) right and fast?

    python tools/gpu_smoke.py                          # one NVIDIA GPU, about five minutes
    python tools/gpu_smoke.py --platform cpu --quick   # the parts a CPU can run (CI runs this)
    python tools/gpu_smoke.py --cases parity,layer --out smoke.json

Every case runs in its own subprocess (an illegal-address error kills the process; the table then
shows the case as CRASH with the error's last line), then one table and a one-line verdict:

  env          device kind, compute capability, cuDNN version, JAX; whether lt_jax's platform rule
               allows the cuDNN packed path (`attention.cudnn_unsupported_reason`) and whether the
               installed JAX needs the GQA k/v repeat.
  hlo          the compiled fwd+bwd of attention(impl="auto") in bf16 holds cuDNN's fused attention
               custom call exactly when the rule allows it (on CPU: holds none).
  parity       packed rows of documents of 1, 7, 100, 300 and 513 tokens plus padding, heads 4/4,
               28/4 and 8/1, head sizes 64/128/256, causal and not: output and dq/dk/dv of cuDNN
               bf16 and XLA bf16 against XLA fp32 (matmul precision "highest"). Error = max |x - ref|
               over real tokens / max |ref|. Tolerances: XLA-bf16 <= 2e-2 (output) and 5e-2
               (gradients); cuDNN <= 2 x XLA-bf16's error + 2e-3.
  isolation    changing one document's k/v leaves every other document's outputs bit-identical,
               and a loss on one document gives exactly zero gradient to every other token.
  overflow     a row with more segments than max_segments: the loader's host check raises; on the
               cuDNN path the row comes out NaN and the other rows are untouched.
  layer        one attention layer at 32k, 28/4 heads, head size 128, bf16: fwd+bwd time and
               compiled temp memory for 1 and 64 documents per row against unpacked causal.
  bench        tools/bench.py, Qwen2.5-1.5B shape, 16k tokens packed (8 documents per row), bf16.
  bench_train  tools/bench_train.py, the same shape through the trainer and loader.
  xla_flags    the GPU launcher's XLA_FLAGS (tpu_scripts/gpu/launch.py) accepted and a jit runs.

`--quick` shrinks every shape (rows of 128, a 512-token layer, a two-layer model) so the CPU run
takes about a minute; on CPU the cuDNN columns read "-" and only the XLA halves are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("env", "hlo", "parity", "isolation", "overflow", "layer", "bench", "bench_train", "xla_flags")
XLA_TOL = {"out": 2e-2, "grad": 5e-2}
CUDNN_FACTOR, CUDNN_SLACK = 2.0, 2e-3


@dataclasses.dataclass(frozen=True)
class Sizes:
    docs: tuple[int, ...]  # document lengths of a packed row (then padding to `row`)
    row: int
    head_dims: tuple[int, ...]
    layer_seq: int
    bench_model: tuple[str, ...]  # ModelConfig overrides
    bench_seq: int


QWEN25_15B = ("family=qwen2", "vocab_size=151936", "hidden_size=1536", "intermediate_size=8960", "num_layers=28",
              "num_heads=12", "num_kv_heads=2", "tie_word_embeddings=true", "max_position_embeddings=32768")
TINY = ("family=qwen2", "vocab_size=512", "hidden_size=64", "intermediate_size=128", "num_layers=2",
        "num_heads=4", "num_kv_heads=2")
FULL = Sizes((1, 7, 100, 300, 513), 1024, (64, 128, 256), 32768, QWEN25_15B, 16384)
QUICK = Sizes((1, 7, 30, 60), 128, (128,), 512, TINY, 256)
HEADS = ((4, 4), (28, 4), (8, 1))


# ---------------------------------------------------------------------------------------------
# Inputs and helpers (run inside a case's process)


def packed_row(sizes: Sizes, order=1) -> tuple:
    """(segment ids, positions) [row] of `sizes.docs` in the given order, then padding (segment 0)."""
    import numpy as np

    seg, pos, at = np.zeros(sizes.row, np.int32), np.zeros(sizes.row, np.int32), 0
    for i, n in enumerate(sizes.docs[::order], start=1):
        seg[at : at + n], pos[at : at + n] = i, np.arange(n)
        at += n
    return seg, pos


def batch_inputs(sizes: Sizes, nq: int, nkv: int, dim: int, seed: int = 0):
    """q, k, v, cotangent (fp32), segment ids and positions [2, row]: the docs forward and reversed."""
    import jax
    import numpy as np

    rows = [packed_row(sizes, 1), packed_row(sizes, -1)]
    seg, pos = np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = lambda n: (2, sizes.row, n, dim)  # noqa: E731
    q, k, v, ct = (jax.random.normal(kk, shape(n)) for kk, n in zip(keys, (nq, nkv, nkv, nq)))
    return q, k, v, ct * (seg > 0)[..., None, None], seg, pos


def cudnn_reason():
    from lt_jax.model import attention as attn

    return attn.cudnn_unsupported_reason(attn.platform())


def attend(impl, dtype, seg, pos, causal, max_segments=64):
    """f(q, k, v) -> fp32 attention output through lt_jax's attention() in `dtype`."""
    import jax.numpy as jnp

    from lt_jax.model.attention import attention

    def f(q, k, v):
        out = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), q_segment_ids=seg, kv_segment_ids=seg,
                        q_positions=pos, kv_positions=pos, causal=causal, impl=impl, max_segments=max_segments)
        return out.astype(jnp.float32)

    return f


def fwd_bwd(f, q, k, v, ct):
    """(output, (dq, dk, dv)) of f, jitted."""
    import jax

    def run(q, k, v, ct):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(ct)

    return jax.jit(run)(q, k, v, ct)


def rel_err(x, ref, real) -> float:
    import numpy as np

    x, ref = np.asarray(x, np.float64)[real], np.asarray(ref, np.float64)[real]
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-12))


# ---------------------------------------------------------------------------------------------
# Cases: each returns {"status": PASS/FAIL/SKIP, "detail": str, "rows": [...]}


def case_env(sizes, args):
    import jax
    import jaxlib

    from lt_jax.model import attention as attn

    info = attn.platform()
    reason = attn.cudnn_unsupported_reason(info)
    cc = ".".join(map(str, info.compute_capability)) if info.compute_capability else "-"
    cudnn = attn._version(info.cudnn_version) if info.cudnn_version else "-"
    detail = (f"{info.device_kind or jax.devices()[0].device_kind} x{jax.device_count()}, cc {cc}, cuDNN {cudnn}, "
              f"jax {jax.__version__}/jaxlib {jaxlib.__version__}; cuDNN packed path: "
              f"{'yes' if reason is None else 'no (' + reason + ')'}; GQA k/v repeat: "
              f"{'yes' if attn._kv_offsets_use_query_heads() else 'no'}")
    wrong_platform = args.platform == "gpu" and info.backend != "gpu"
    return {"status": "FAIL" if wrong_platform else "PASS", "detail": detail}


def case_hlo(sizes, args):
    import jax
    import jax.numpy as jnp

    q, k, v, ct, seg, pos = batch_inputs(sizes, 8, 2, 128)
    f = attend("auto", jnp.bfloat16, seg, pos, True)

    def loss(q, k, v):
        return jnp.sum(f(q, k, v) * ct)

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
    calls = sorted(set(re.findall(r"__cudnn\$fmha\w*", text)))
    expect = cudnn_reason() is None
    ok = bool(calls) == expect
    detail = f"cuDNN calls in the compiled HLO: {calls or 'none'} (expected {'some' if expect else 'none'})"
    return {"status": "PASS" if ok else "FAIL", "detail": detail}


def parity_row(sizes, nq, nkv, dim, causal, use_cudnn):
    import jax
    import jax.numpy as jnp

    q, k, v, ct, seg, pos = batch_inputs(sizes, nq, nkv, dim)
    real = seg > 0
    with jax.default_matmul_precision("highest"):
        ref = fwd_bwd(attend("xla", jnp.float32, seg, pos, causal), q, k, v, ct)
    row = {"heads": f"{nq}/{nkv}", "dim": dim, "causal": causal}
    impls = [("xla", "xla")] + ([("cudnn", "cudnn")] if use_cudnn else [])
    for name, impl in impls:
        out, grads = fwd_bwd(attend(impl, jnp.bfloat16, seg, pos, causal), q, k, v, ct)
        row[f"{name}_out"] = rel_err(out, ref[0], real)
        row[f"{name}_grad"] = max(rel_err(g, r, real) for g, r in zip(grads, ref[1]))
    ok = row["xla_out"] <= XLA_TOL["out"] and row["xla_grad"] <= XLA_TOL["grad"]
    if use_cudnn:
        for part in ("out", "grad"):
            ok &= row[f"cudnn_{part}"] <= CUDNN_FACTOR * row[f"xla_{part}"] + CUDNN_SLACK
    row["ok"] = bool(ok)
    return row


def case_parity(sizes, args):
    reason = cudnn_reason()
    rows = [parity_row(sizes, nq, nkv, dim, causal, reason is None)
            for nq, nkv in HEADS for dim in sizes.head_dims for causal in (True, False)]
    bad = [r for r in rows if not r["ok"]]
    detail = f"{len(rows) - len(bad)}/{len(rows)} configs within tolerance"
    if reason:
        detail += f"; cuDNN not run: {reason}"
    return {"status": "FAIL" if bad else "PASS", "detail": detail, "rows": rows}


def case_isolation(sizes, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    impl = "cudnn" if cudnn_reason() is None else "xla"
    q, k, v, ct, seg, pos = batch_inputs(sizes, 28, 4, 128)
    f = jax.jit(attend(impl, jnp.bfloat16, seg, pos, True))
    doc = (seg == 3) & (np.arange(2) == 0)[:, None]  # the third document of row 0
    base = np.asarray(f(q, k, v))
    bump = jnp.asarray(doc)[..., None, None]
    moved = np.asarray(f(q, k + 1.0 * bump, v - 2.0 * bump))
    others = ~doc
    same = bool(np.array_equal(moved[others], base[others]))
    changed = not np.allclose(moved[doc], base[doc])
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * ct * bump), argnums=(0, 1, 2)))(q, k, v)
    leak = max(float(np.abs(np.asarray(g)[others]).max()) for g in grads)
    ok = same and changed and leak == 0.0
    detail = (f"{impl}: other documents bit-identical: {same}; changed document changed: {changed}; "
              f"largest gradient outside the document: {leak:g}")
    return {"status": "PASS" if ok else "FAIL", "detail": detail}


def case_overflow(sizes, args):
    import jax.numpy as jnp
    import numpy as np

    from lt_jax.data import packing

    q, k, v, ct, seg, pos = batch_inputs(sizes, 8, 2, 64)
    seg, pos = seg.copy(), pos.copy()
    seg[1] = (seg[1] > 0).astype(np.int32)  # row 1: one document and padding (2 segments)
    pos[1] = np.where(seg[1] > 0, np.arange(sizes.row), 0)
    limit = int(packing.count_runs(seg)[0]) - 1  # row 0 is one segment over
    try:
        packing.check_segment_count(seg, limit, "smoke")
        loader_ok, msg = False, "no error raised"
    except ValueError as e:
        loader_ok, msg = "max_segments is" in str(e), str(e)
    detail = f"loader check: {msg.split(': ', 1)[-1].split(';')[0]}"
    if cudnn_reason() is not None:
        return {"status": "PASS" if loader_ok else "FAIL", "detail": detail + "; cuDNN row guard not run (no cuDNN)"}
    out = np.asarray(attend("cudnn", jnp.bfloat16, seg, pos, True, max_segments=limit)(q, k, v))
    ref = np.asarray(attend("xla", jnp.bfloat16, seg, pos, True)(q, k, v))
    nan_row, fine_row = bool(np.isnan(out[0]).all()), bool(np.isfinite(out[1]).all())
    close = rel_err(out[1], ref[1], seg[1] > 0) <= 2 * XLA_TOL["out"]
    ok = loader_ok and nan_row and fine_row and close
    detail += f"; cuDNN: overflowing row NaN {nan_row}, other row finite {fine_row} and matches XLA {close}"
    return {"status": "PASS" if ok else "FAIL", "detail": detail}


def cudnn_unpacked(q, k, v):
    """The unpacked baseline: JAX's public cuDNN call, causal, no offsets (fp32 out, like attend)."""
    import jax
    import jax.numpy as jnp

    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32)


def layer_row(label, f, q, k, v, ct, repeats=5):
    import statistics

    import jax

    def run(q, k, v, ct):
        out, vjp = jax.vjp(f, q, k, v)
        return vjp(ct)

    compiled = jax.jit(run).lower(q, k, v, ct).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(q, k, v, ct))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, ct))
        times.append(time.perf_counter() - t)
    temp = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    return {"variant": label, "ms": 1e3 * statistics.median(times), "temp_gib": None if temp is None else temp / 2**30}


def case_layer(sizes, args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    t, reason = sizes.layer_seq, cudnn_reason()
    impl = "cudnn" if reason is None else "xla"
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (1, t, 28, 128), jnp.bfloat16)
    ct = jax.random.normal(keys[1], (1, t, 28, 128), jnp.float32)  # attend() returns fp32
    k, v = (jax.random.normal(kk, (1, t, 4, 128), jnp.bfloat16) for kk in keys[2:])
    one_doc = np.ones((1, t), np.int32)
    rows = []
    if reason is None:
        rows.append(layer_row("unpacked causal (cudnn)", cudnn_unpacked, q, k, v, ct))
    else:
        unpacked = attend("xla", jnp.bfloat16, one_doc, _pos(one_doc), True)
        rows.append(layer_row("unpacked causal (xla)", unpacked, q, k, v, ct))
    for docs in (1, 64):
        seg = (np.arange(t) * docs // t + 1).astype(np.int32)[None]
        rows.append(layer_row(f"packed {docs} doc(s) ({impl})", attend(impl, jnp.bfloat16, seg, _pos(seg), True, 64),
                              q, k, v, ct))
    base = rows[0]["ms"]
    detail = f"seq {t}, 28/4 heads, dim 128: " + ", ".join(f"{r['variant']} {r['ms'] / base:.2f}x" for r in rows[1:])
    return {"status": "PASS", "detail": detail, "rows": rows}


def _pos(seg):
    import numpy as np

    starts = np.r_[True, seg[0, 1:] != seg[0, :-1]]
    idx = np.arange(seg.shape[1])
    return (idx - np.maximum.accumulate(np.where(starts, idx, 0)))[None].astype(np.int32)


def _tool(cmd: list[str], timeout: int) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def _pick(text: str, pattern: str) -> str:
    found = re.findall(pattern, text)
    return found[-1].strip() if found else "?"


def case_bench(sizes, args):
    dtype = ("param_dtype=bfloat16", "compute_dtype=bfloat16", "remat=full")
    cmd = ["tools/bench.py", *sizes.bench_model, *dtype, "--batch", "1", "--seq", str(sizes.bench_seq),
           "--docs-per-row", "8", "--steps", "3", "--warmup", "1"] + (["--peak-tflops", "1"] if args.platform == "cpu" else [])
    rc, out = _tool(cmd, 600)
    tps, mfu, peak = (_pick(out, p) for p in (r"([\d,]+ tok/s) \|", r"MFU\s+([\d.]+%)", r"peak memory: (.*)"))
    detail = f"{tps}, MFU {mfu}, peak memory {peak}"
    return {"status": "PASS" if rc == 0 else "FAIL", "detail": detail if rc == 0 else out.strip().splitlines()[-1]}


def case_bench_train(sizes, args):
    model = [f"model.{o}" for o in sizes.bench_model] + [
        "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16", "model.remat=full"]
    cmd = ["tools/bench_train.py", "--config", "configs/tiny.yaml", "--steps", "3", "--warmup", "1", "--records",
           "400" if args.quick else "2000", "--loader-batches", "4", "--workers", "0",
           *model, f"data.seq_len={sizes.bench_seq}", "train.global_batch=1"]
    rc, out = _tool(cmd, 600)
    tps, mfu, peak = (_pick(out, p) for p in (r"trainer : ([\d,]+ tokens/s)", r"MFU (\S+)", r"peak memory: (.*)"))
    detail = f"{tps}, MFU {mfu}, peak memory {peak}"
    return {"status": "PASS" if rc == 0 else "FAIL", "detail": detail if rc == 0 else out.strip().splitlines()[-1]}


def case_xla_flags(sizes, args):
    sys.path.insert(0, os.path.join(ROOT, "tpu_scripts", "gpu"))
    import launch

    env = {**os.environ, "XLA_FLAGS": launch.gpu_env()["XLA_FLAGS"]}
    code = "import jax, jax.numpy as jnp; x = jnp.ones((256, 256)); print(jax.jit(lambda a: a @ a)(x).sum())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    n = len(env["XLA_FLAGS"].split())
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    ok = proc.returncode == 0
    return {"status": "PASS" if ok else "FAIL", "detail": f"{n} flags {'accepted' if ok else 'refused: ' + tail[0]}"}


# ---------------------------------------------------------------------------------------------
# Driver


def run_case(name: str, args) -> int:
    """Child process: one case, its result as the last stdout line."""
    sys.path.insert(0, ROOT)
    result = globals()[f"case_{name}"](QUICK if args.quick else FULL, args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def spawn(name: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", name, "--platform", args.platform]
    cmd += ["--quick"] if args.quick else []
    # One device: the first GPU, or one CPU device (a test runner's virtual-device flag removed).
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    env = {**os.environ, "JAX_PLATFORMS": "cpu" if args.platform == "cpu" else "cuda", "XLA_FLAGS": flags,
           "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    if args.platform == "gpu":
        env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), None
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if lines and rc == 0:
        result = json.loads(lines[-1][len("RESULT "):])
    else:
        lines = [ln for ln in out.strip().splitlines() if ln.strip() and not ln.startswith(("-----", "For simplicity"))]
        errors = [ln for ln in lines if re.search(r"Error|error:|Check failed|illegal", ln)]
        last = (errors or lines)[-1:] or ["no output"]
        why = "timed out" if rc is None else f"exit {rc}"
        result = {"status": "CRASH", "detail": f"{why}: {last[0][:160]}"}
    return {"case": name, "seconds": time.perf_counter() - t0, **result}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    return "-" if x is None else str(x)


def print_table(results: list[dict]) -> None:
    print(f"{'case':<12} {'status':<6} {'secs':>6}  detail")
    for r in results:
        print(f"{r['case']:<12} {r['status']:<6} {r['seconds']:6.1f}  {r['detail']}")
    for r in results:
        if r.get("rows"):
            cols = list(dict.fromkeys(c for row in r["rows"] for c in row))
            print(f"\n{r['case']}: " + " | ".join(cols))
            for row in r["rows"]:
                print("  " + " | ".join(_fmt(row.get(c)) for c in cols))


def verdict(results: list[dict], platform: str) -> str:
    bad = [r["case"] for r in results if r["status"] not in ("PASS", "SKIP")]
    env = next((r["detail"] for r in results if r["case"] == "env"), "")
    cudnn = "cuDNN path checked" if "packed path: yes" in env else "cuDNN path NOT checked (not available here)"
    if bad:
        return f"VERDICT: FAIL on {platform}: {', '.join(bad)} ({len(results) - len(bad)}/{len(results)} passed)"
    return f"VERDICT: PASS on {platform}: {len(results)}/{len(results)} cases; {cudnn}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--platform", choices=("gpu", "cpu"), default="gpu")
    p.add_argument("--quick", action="store_true", help="small shapes (what --platform cpu is meant for)")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    p.add_argument("--timeout", type=int, default=900, help="seconds per case")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.case:
        return run_case(args.case, args)
    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; choose from {', '.join(CASES)}")
    results = []
    for name in cases:
        results.append(spawn(name, args))
        print(f"[{name}] {results[-1]['status']} in {results[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    print_table(results)
    line = verdict(results, args.platform)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"results": results, "verdict": line}, f, indent=1)
    return 0 if line.startswith("VERDICT: PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
