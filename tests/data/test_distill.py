"""`lt-jax distill` against our server and against a faulty teacher: retries, failures, kill -9 and resume."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import signal
import subprocess
import sys
import time

import pytest

from lt_jax import config, storage
from lt_jax.data import distill, jsonl, synthetic
from lt_jax.data.distill import DistillConfig, distill_async
from lt_jax.sample.backends import SyntheticBackend, choice_seed
from lt_jax.sample.server import ServerConfig, ServerThread

from faulty_teacher import FaultyTeacher, expected_response  # tests/ is on sys.path (conftest.py)

FAST = dict(backoff_initial_s=0.02, backoff_max_s=0.1, progress=False)


def _problems(path, n: int) -> list[dict]:
    rows = [{"id": f"q{i}", "problem": f"Compute {10 + i} + {i}.", "answer": 10 + 2 * i} for i in range(n)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def _records(path) -> list[dict]:
    return [rec for _, rec in jsonl.read_jsonl(str(path), policy="strict")]


def _pairs(records) -> collections.Counter:
    return collections.Counter((r["problem_id"], r["sample_index"]) for r in records)


def test_distill_against_lt_jax_serve(tmp_path):
    cfg_syn = synthetic.SyntheticConfig(num_problems=6, num_heldout=0)
    problems = synthetic.make_problems(cfg_syn)
    synthetic.write_problems(cfg_syn, str(tmp_path / "problems.jsonl"))
    backend = SyntheticBackend(cfg_syn)
    with ServerThread(backend, ServerConfig(port=0, reasoning_format="separate")) as srv:
        cfg = DistillConfig(input=str(tmp_path / "problems.jsonl"), output=str(tmp_path / "out.jsonl"),
                            base_url=srv.url, model=backend.name, n=3, seed=7, temperature=0.6, top_p=0.95,
                            keep_fields=("level",), **FAST)
        summary = asyncio.run(distill_async(cfg))
        comp = dataclasses.replace(cfg, api="completions", output=str(tmp_path / "comp.jsonl"), n=1)
        asyncio.run(distill_async(comp))
    assert summary["ok"] == 18 and summary["failed"] == 0 and summary["completion_tokens"] > 0
    records = _records(tmp_path / "out.jsonl")
    assert set(_pairs(records)) == {(p["id"], k) for p in problems for k in range(3)}
    by_id = {p["id"]: p for p in problems}
    for rec in records:
        problem = by_id[rec["problem_id"]]
        assert (rec["problem"], rec["level"], rec["reference_answer"]) == (problem["problem"], problem["level"],
                                                                           problem["answer"])
        # The teacher's trace, split DeepSeek-style by the server, recorded as it came.
        seed = choice_seed(rec["sampling"]["seed"], 0)
        thinking, answer = synthetic.teacher_response(rec["prompt"], random.Random(seed), cfg_syn)
        assert (rec["reasoning_content"], rec["response"]) == (thinking, answer)
        assert rec["status"] == "ok" and rec["finish_reason"] == "stop"
        assert rec["sampling"]["temperature"] == 0.6 and rec["usage"]["completion_tokens"] > 0
    for rec in _records(tmp_path / "comp.jsonl"):
        assert rec["response"].startswith("<think>\n") and rec["reasoning_content"] is None
    assert json.loads((tmp_path / "out.summary.json").read_text())["ok"] == 18


def test_faulty_teacher_every_pair_answered_or_failed_then_retry_failed(tmp_path):
    _problems(tmp_path / "p.jsonl", 30)
    with FaultyTeacher(fault_rate=0.6, permanent_rate=0.15, slow_s=1.5) as teacher:
        cfg = DistillConfig(input=str(tmp_path / "p.jsonl"), output=str(tmp_path / "r.jsonl"), base_url=teacher.url,
                            model=teacher.model, n=2, seed=0, timeout_s=0.4, max_retries=3, concurrency=16, **FAST)
        first = asyncio.run(distill_async(cfg))
        assert set(teacher.injected) == {"429", "500", "503", "slow", "drop", "truncate", "empty", "malformed"}
        records = _records(cfg.output)
        assert _pairs(records) == collections.Counter({(f"q{i}", k): 1 for i in range(30) for k in range(2)})
        failed = [r for r in records if r["status"] == "failed"]
        assert failed and len(failed) == first["failed"] and first["retries"] > 0
        for r in failed:
            assert r["error"] and r["error_type"] in ("server_error", "timeout", "connection", "rate_limit",
                                                      "bad_response") and r["response"] is None
        for r in records:
            if r["status"] == "ok":
                assert r["response"] == expected_response(r["prompt"], r["sampling"]["seed"])
                assert r["reasoning_content"] == "Let me think about this carefully."
        assert sum(first["failed_by_type"].values()) == len(failed)

        # A plain rerun keeps failed records; --retry-failed asks again, once the teacher heals.
        again = asyncio.run(distill_async(cfg))
        assert again["requested"] == 0 and again["failed_records_kept"] == len(failed)
        teacher.heal()
        # A generous timeout now: the point is that every failed pair is asked again, not how fast.
        retried = asyncio.run(distill_async(dataclasses.replace(cfg, retry_failed=True, max_retries=6, timeout_s=30)))
    assert retried["failed_records_retried"] == len(failed) and retried["requested"] == len(failed)
    final = _records(cfg.output)
    assert len(final) == 60 and set(_pairs(final).values()) == {1}
    assert all(r["status"] == "ok" for r in final)


def _distill_cmd(tmp_path, url, model, *extra):
    return [sys.executable, "-m", "lt_jax.cli", "distill", "--input", str(tmp_path / "p.jsonl"),
            "--output", str(tmp_path / "r.jsonl"), "--base-url", url, "--model", model, "--n", "2",
            "--seed", "3", "--concurrency", "4", "--timeout", "5", "--backoff-initial-s", "0.02",
            "--backoff-max-s", "0.1", "--no-progress", *extra]


def test_kill_9_then_rerun_has_no_duplicates_and_no_gaps(tmp_path):
    _problems(tmp_path / "p.jsonl", 40)
    out = tmp_path / "r.jsonl"
    with FaultyTeacher(fault_rate=0.2, faults=("429", "500", "drop"), delay_s=0.05) as teacher:
        proc = subprocess.Popen(_distill_cmd(tmp_path, teacher.url, teacher.model), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 15):
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = out.read_bytes()
        before = before[: before.rfind(b"\n") + 1]
        assert 15 <= before.count(b"\n") < 80, "the kill should land mid-run"
        torn = b'{"problem_id": "q39", "sample_index": 1, "prompt": "Comp'
        with open(out, "ab") as f:  # a torn last line, as a kill inside write() would leave
            f.write(torn)
        done = subprocess.run(_distill_cmd(tmp_path, teacher.url, teacher.model), capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.summary.json").read_text())["repaired_torn_bytes"] >= len(torn)
    after = out.read_bytes()
    assert after.startswith(before)  # what was written before the kill is kept as is
    records = _records(out)
    assert _pairs(records) == collections.Counter({(f"q{i}", k): 1 for i in range(40) for k in range(2)})
    assert all(r["status"] == "ok" for r in records)


def test_bad_input_names_file_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "problem": "a"}\n{"id": 2, "question": "b"}\n')
    with pytest.raises(jsonl.DataError, match=r"p.jsonl:2: problem: expected non-empty text"):
        distill.read_problems(str(path))
    with pytest.raises(jsonl.DataError, match=r"p.jsonl:1: question: expected non-empty text"):
        distill.read_problems(str(path), problem_field="question")  # remapped field, named in the error
    path.write_text('{"id": 1, "problem": "a"}\n{"id": 1, "problem": "b"}\n')
    with pytest.raises(jsonl.DataError, match=r"p.jsonl:2: id: duplicate id '1' \(first at line 1\)"):
        distill.read_problems(str(path))
    path.write_text('{"id": 1, "problem": "a"}\n{"id": 2, "prob')
    with pytest.raises(jsonl.DataError, match=r"p.jsonl:2"):
        distill.read_problems(str(path))
    with pytest.raises(config.ConfigError, match="literal braces"):
        config.from_dict(DistillConfig, dict(input="i", output="o", base_url="u", model="m",
                                             prompt_template="{problem} \\boxed{}"))
    # A CLI error is one clear line and exit code 2, not a traceback.
    res = subprocess.run([sys.executable, "-m", "lt_jax.cli", "distill", "--input", str(path), "--output",
                          str(tmp_path / "o.jsonl"), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "p.jsonl:2" in res.stderr and "Traceback" not in res.stderr


def test_output_of_another_teacher_is_refused(tmp_path):
    _problems(tmp_path / "p.jsonl", 2)
    (tmp_path / "r.jsonl").write_text(json.dumps({"problem_id": "q0", "sample_index": 0, "status": "ok",
                                                  "teacher": "other-model"}) + "\n")
    cfg = DistillConfig(input=str(tmp_path / "p.jsonl"), output=str(tmp_path / "r.jsonl"),
                        base_url="http://127.0.0.1:9/v1", model="m", **FAST)
    with pytest.raises(config.ConfigError, match="other-model"):
        asyncio.run(distill_async(cfg))


def test_rate_limiter_meters_units_per_minute():
    clock = [0.0]

    async def fake_sleep(s):
        clock[0] += s

    async def main():
        limiter = distill.RateLimiter(per_minute=600, clock=lambda: clock[0], sleep=fake_sleep)  # 10/s, bursts of 100
        for _ in range(160):
            await limiter.acquire(1)
        t_burst = clock[0]
        await limiter.acquire(500)  # bigger than the bucket: waits for a full bucket, then owes the rest
        t_big = clock[0]
        limiter.settle(-300)  # it turned out to cost 200: the bucket still owes 100
        await limiter.acquire(40)
        return t_burst, t_big, clock[0]

    t_burst, t_big, t_end = asyncio.run(main())
    assert t_burst == pytest.approx(6.0)  # 100 free, 60 more at 10/s
    assert t_big == pytest.approx(16.0)  # refill 0 -> 100
    assert t_end == pytest.approx(t_big + 14.0)  # from -100 up to 40 at 10/s


def test_backoff_grows_with_jitter_and_honours_retry_after():
    cfg = DistillConfig(input="i", output="o", base_url="u", model="m", backoff_initial_s=1, backoff_max_s=8)
    rng = random.Random(0)
    delays = [distill.backoff_delay(a, RuntimeError(), cfg, rng) for a in range(6)]
    for a, d in enumerate(delays):
        cap = min(8, 2**a)
        assert cap / 2 <= d <= cap

    class Resp:
        headers = {"retry-after": "5"}

    err = RuntimeError()
    err.response = Resp()
    assert distill.backoff_delay(0, err, cfg, rng) == 5.0


def test_gcs_input_and_output(tmp_path, gcs_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"uid": [f"g{i}" for i in range(5)], "question": [f"Compute {i} * 7." for i in range(5)],
                      "gold": [str(7 * i) for i in range(5)]})
    pq.write_table(table, tmp_path / "p.parquet")
    storage.copy_local_to(str(tmp_path / "p.parquet"), f"{gcs_bucket}/in/p.parquet")
    backend = SyntheticBackend()
    with ServerThread(backend, ServerConfig(port=0)) as srv:
        cfg = DistillConfig(input=f"{gcs_bucket}/in/p.parquet", output=f"{gcs_bucket}/out/r.jsonl",
                            base_url=srv.url, model=backend.name, id_field="uid", problem_field="question",
                            answer_field="gold", n=2, seed=1, **FAST)
        assert asyncio.run(distill_async(cfg))["ok"] == 10
        assert asyncio.run(distill_async(cfg))["requested"] == 0  # resumed from the object, nothing left
    records = _records(f"{gcs_bucket}/out/r.jsonl")
    assert len(records) == 10 and {r["reference_answer"] for r in records} == {str(7 * i) for i in range(5)}
    assert all("\\boxed{" in r["response"] for r in records)
    assert storage.exists(f"{gcs_bucket}/out/r.summary.json")
