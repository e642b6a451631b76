"""The engine on two processes (jax.distributed over gloo, one mesh across both) gives what it gives
on one: requests enter at process 0, the other process follows its operations, and both make the
same admission, preemption and finish decisions, under page pressure too; `lt-jax serve`'s engine
runner on process 0 answers the openai client as a single process does."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys

import numpy as np
import openai
import pytest

from test_generate import hf_folder  # noqa: F401 (a tiny Qwen2 folder with its tokenizer)

from lt_jax.sample import hosts
from lt_jax.sample.server import ServerConfig, ServerThread

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


def _http(backend) -> list:
    """Phase 3, `lt-jax serve` on several hosts: process 0 serves the official openai client (a
    streamed chat with logprobs while a completion runs), the others follow its engine."""
    if not hosts.primary():
        backend.engine.follow()  # returns when process 0's server stops
        return []
    with ServerThread(backend, ServerConfig(port=0)) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="-", max_retries=0)
        chat = lambda: list(client.chat.completions.create(  # noqa: E731
            model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=0.8, top_p=0.9, seed=3,
            max_tokens=12, logprobs=True, top_logprobs=2, stream=True, extra_body=dict(ignore_eos=True)))
        completion = lambda: client.completions.create(  # noqa: E731
            model="tiny", prompt="12+30=", temperature=0.8, top_p=0.9, seed=4, max_tokens=16,
            extra_body=dict(ignore_eos=True))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            chunks, done = pool.submit(chat), pool.submit(completion)
            chunks, done = chunks.result(), done.result()
    # How tokens group into chunks depends on when each request reached the engine (timing), so
    # the stream is compared as its text and its token logprobs, and the number of chunks with some.
    parts = [c for ch in chunks for c in ch.choices]
    lps = [(x.token, x.logprob) for c in parts if c.logprobs for x in c.logprobs.content]
    return ["".join(c.delta.content or "" for c in parts), lps, sum(1 for c in parts if c.logprobs),
            done.choices[0].text, done.choices[0].finish_reason]


def _worker(pid: int, nproc: int, port: int, out: str, folder: str) -> None:
    """A child process: 4 CPU devices in all (4 // nproc here), a data=1 x fsdp=2 x tensor=2 mesh."""
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // nproc}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if nproc > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)
    # Imported once jax.distributed runs (before, nothing may touch a device).
    from lt_jax.model.hf import load_hf
    from lt_jax.model.sharding import MeshConfig, make_mesh
    from lt_jax.sample import engine as eng
    from lt_jax.sample import sampler as smp
    from lt_jax.sample.generate import load_tokenizer
    from lt_jax.sample.model_backend import ModelBackend

    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
    model = load_hf(folder, mesh=mesh)
    rng = np.random.RandomState(0)
    prompts = [[int(t) for t in rng.randint(1, model.config.vocab_size, size=n)] for n in PROMPT_LENS]
    # 5 pages of 8 tokens for 2 slots: the longest sample alone needs 5, two together up to 10. One
    # sampling mode keeps the compiles few (one decode per page-table width and logprob width).
    cfg = eng.EngineConfig(num_slots=2, page_size=8, decode_steps=4, prefill_chunk=16, num_pages=6)
    view = _session(eng.Engine(model, cfg, mesh), prompts, smp)
    view["http"] = _http(ModelBackend(model, load_tokenizer(folder), "tiny", mesh=mesh, config=cfg,
                                      max_new_tokens=24))
    with open(os.path.join(out, f"n{nproc}_p{pid}.json"), "w") as f:
        json.dump(view, f)


@pytest.mark.slow
def test_two_processes_follow_process_0_and_match_one_process(hf_folder, tmp_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_hosts; "
            "test_hosts._worker(*map(int, sys.argv[1:4]), *sys.argv[4:6])")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    runs = [(0, 1), (0, 2), (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", code, str(pid), str(n), str(port), str(tmp_path), hf_folder], env=env,
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
    # Through the server: process 0 answers as one process does; the other served nothing itself.
    chat, lps, with_lps, text, reason = one["http"]
    assert p1["http"] == [] and len(lps) == 12 and with_lps > 1 and text and reason == "length"
    assert [p0["http"][i] for i in (0, 3, 4)] == [chat, text, reason]
    assert [t for t, _ in p0["http"][1]] == [t for t, _ in lps]
    np.testing.assert_allclose([x for _, x in p0["http"][1]], [x for _, x in lps], rtol=1e-4, atol=1e-5)
