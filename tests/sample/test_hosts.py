"""The engine on two processes (jax.distributed over gloo, one mesh across both) gives what it gives
on one: requests enter at process 0, the other process follows its operations, and both make the
same admission, preemption and finish decisions, under page pressure too."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from lt_jax.sample import hosts

PROMPT_LENS = (11, 4, 23, 7, 9)


def _session(engine, prompts, smp) -> dict:
    """What both processes run. Phase 1, every host one program: all call `run` with the same
    requests. Phase 2, a server: process 0 submits (some while others decode), cancels one, forgets
    finished ones; the others only `step` until process 0 closes. Returns each process's view."""
    spec = lambda seed, new, **kw: smp.RowSpec(0, seed=seed, temperature=1.0, top_p=0.9,  # noqa: E731
                                               max_new_tokens=new, **kw)
    ran = engine.run(prompts[:3], [[spec(1, 12)], [spec(2, 9), spec(3, 9)], [spec(8, 14)]])
    updates, results = [], {}
    if hosts.primary():
        first = [engine.submit(prompts[3], [spec(4, 16)]), engine.submit(prompts[4], [spec(5, 10)])]
        for _ in range(2):
            updates += engine.step()
        later = engine.submit(prompts[0], [spec(6, 13, stop_token_ids=(7, 9))])
        dropped = engine.submit(prompts[2], [spec(7, 15)])
        updates += engine.step()
        engine.cancel(dropped)
        while engine.busy:
            updates += engine.step()
        for rid in first + [later, dropped]:
            results[rid] = [(r.tokens, r.finish_reason) for r in engine.pop(rid)]
        engine.close()
    else:
        while not engine.closed:
            updates += engine.step()
    return dict(ran=[[(r.tokens, r.finish_reason) for r in rs] for rs in ran],
                updates=[list(u) for u in updates], results=results,
                stats={k: engine.stats[k] for k in ("preempted", "prefill_calls", "decode_calls", "cancelled")},
                free=engine.allocator.available, busy=engine.busy, requests=sorted(engine.requests))


def _worker(pid: int, nproc: int, port: int, out: str) -> None:
    """A child process: 4 CPU devices in all (4 // nproc here), a data=1 x fsdp=2 x tensor=2 mesh."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    from lt_jax.model.config import ModelConfig
    from lt_jax.model.sharding import MeshConfig, make_mesh
    from lt_jax.model.transformer import init_model
    from lt_jax.sample import engine as eng
    from lt_jax.sample import sampler as smp

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    cfg = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_position_embeddings=64)
    model = init_model(cfg, mesh, seed=0)
    rng = np.random.RandomState(0)
    prompts = [[int(t) for t in rng.randint(1, cfg.vocab_size, size=n)] for n in PROMPT_LENS]
    # 5 pages of 8 tokens for 2 slots: the longest sample alone needs 5, two together up to 10. One
    # sampling mode and no logprobs keep the compiles few (one decode per page-table width).
    engine = eng.Engine(model, eng.EngineConfig(num_slots=2, page_size=8, decode_steps=4, prefill_chunk=16,
                                                num_pages=6), mesh)
    view = _session(engine, prompts, smp)
    with open(os.path.join(out, f"n{nproc}_p{pid}.json"), "w") as f:
        json.dump(view, f)


@pytest.mark.slow
def test_two_processes_follow_process_0_and_match_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_hosts; "
            "test_hosts._worker(*map(int, sys.argv[1:4]), sys.argv[4])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = [(0, 1), (0, 2), (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(pid), str(n), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid, n in runs]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(log[-3000:] for log in logs)
    one, p0, p1 = (json.loads((tmp_path / f"n{n}_p{pid}.json").read_text()) for pid, n in runs)

    # The page budget was far below the demand: samples were preempted and recomputed.
    assert one["stats"]["preempted"] > 0 and one["stats"]["cancelled"] == 1
    # Every process made the same decisions as one process: same device calls, same token stream.
    for view in (p0, p1):
        assert view["stats"] == one["stats"]
        assert view["ran"] == one["ran"]
        assert view["updates"] == one["updates"]
        assert view["free"] == 5 and not view["busy"] and view["requests"] == []
    # Results come back to process 0 (the others forgot them when process 0 did).
    assert p0["results"] == one["results"] and p1["results"] == {}
    reasons = [r for rs in one["results"].values() for _, r in rs]
    assert "cancelled" in reasons and "length" in reasons
