"""tools/gpu_smoke.py on CPU: every case runs (each in its own process) with small shapes and the
verdict is PASS, so the script meets its first GPU without typos. The cuDNN halves need a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_cpu_run_of_every_case_passes(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "tools/gpu_smoke.py", "--platform", "cpu", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    cases = {r["case"]: r for r in report["results"]}
    assert set(cases) == {"env", "hlo", "parity", "isolation", "overflow", "layer", "bench", "bench_train", "xla_flags"}
    assert all(r["status"] == "PASS" for r in cases.values()), cases
    assert report["verdict"].startswith("VERDICT: PASS on cpu") and "cuDNN path NOT checked" in report["verdict"]
    assert proc.stdout.strip().splitlines()[-1] == report["verdict"]  # the one-line verdict ends the output
    parity = cases["parity"]["rows"]
    assert {r["heads"] for r in parity} == {"4/4", "28/4", "8/1"} and {r["causal"] for r in parity} == {True, False}
    assert all(r["xla_out"] < 2e-2 and r["xla_grad"] < 5e-2 and "cudnn_out" not in r for r in parity)
    assert "tok/s" in cases["bench"]["detail"] and "tokens/s" in cases["bench_train"]["detail"]


def test_a_crashing_case_is_reported_not_fatal(tmp_path, monkeypatch):
    """A case whose process dies (as on an illegal-address error) shows as CRASH with its error line."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_smoke

    monkeypatch.setattr(gpu_smoke, "__file__", str(tmp_path / "fake.py"))
    (tmp_path / "fake.py").write_text("import sys\nprint('RuntimeError: CUDA_ERROR_ILLEGAL_ADDRESS')\nsys.exit(134)\n")
    args = gpu_smoke.parse_args(["--platform", "cpu", "--timeout", "60"])
    result = gpu_smoke.spawn("parity", args)
    assert result["status"] == "CRASH" and "ILLEGAL_ADDRESS" in result["detail"] and "exit 134" in result["detail"]
    assert gpu_smoke.verdict([result], "cpu").startswith("VERDICT: FAIL on cpu: parity")


def test_cudnn_halves_lower_for_cuda_on_a_faked_hopper(monkeypatch):
    """The functions the smoke runs only on a GPU (packed cuDNN in parity/isolation/overflow/layer,
    the unpacked cuDNN baseline) trace and lower for CUDA, forward and backward, on CPU."""
    import jax
    import jax.numpy as jnp
    from fake_gpu import use_hopper

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import gpu_smoke

    use_hopper(monkeypatch)
    assert gpu_smoke.cudnn_reason() is None
    q, k, v, ct, seg, pos = gpu_smoke.batch_inputs(gpu_smoke.QUICK, 28, 4, 128)
    packed = gpu_smoke.attend("cudnn", jnp.bfloat16, seg, pos, True, max_segments=4)
    bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, k, v))
    for f, args in ((packed, (q, k, v)), (gpu_smoke.cudnn_unpacked, bf16)):
        def run(q, k, v, f=f):
            out, vjp = jax.vjp(f, q, k, v)
            return out, vjp(ct)

        text = jax.jit(run).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__cudnn$fmhaSoftmax" in text and "__cudnn$fmhaSoftmaxBackward" in text
