"""Grading: math-verify on the answer after the thinking, per-problem statistics, resume, CLI."""

from __future__ import annotations

import json
import math
import random
import re
import shutil

import pytest

from lt_jax import cli
from lt_jax.data import grade, verify
from lt_jax.data.grade import GradeConfig, problem_stats
from lt_jax.data.jsonl import DataError


def _resp(pid, k, response, reference, **extra):
    row = {"problem_id": pid, "sample_index": k, "prompt": f"problem {pid}", "response": response, "reasoning_content": None,
           "reference_answer": reference, "finish_reason": "stop", "status": "ok", "error": None, "teacher": "t"}
    row.update(extra)
    return row


def _write(path, rows, tail: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.writelines((json.dumps(r) + "\n").encode() for r in rows)
        f.write(tail)
    return str(path)


def _read(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _grade(tmp_path, rows, name="r", **cfg):
    src = _write(tmp_path / f"{name}.jsonl", rows)
    out = str(tmp_path / f"{name}.graded.jsonl")
    summary = grade.grade_file(src, out, GradeConfig(**cfg))
    return summary, _read(out)


def test_references_score_one_and_shuffled_near_zero(tmp_path, benchmark_items):
    """Every aime24 / aime25 / math500 reference, given back as a boxed prediction, verifies."""
    items = [(name, i, ans) for name in ("aime24", "aime25", "math500") for i, (_, ans) in enumerate(benchmark_items[name])]
    assert len(items) == 560
    rows = [_resp(f"{n}-{i}", 0, f"<think>\nworking\n</think>\n\nThus the answer is \\boxed{{{a}}}.", a) for n, i, a in items]
    shuffled = [a for _, _, a in items]
    random.Random(0).shuffle(shuffled)
    rows += [_resp(f"{n}-{i}", 1, f"<think>\nworking\n</think>\n\nThus the answer is \\boxed{{{s}}}.", a) for (n, i, a), s in zip(items, shuffled)]
    summary, graded = _grade(tmp_path, rows)
    right = [r for r in graded if r["sample_index"] == 0]
    wrong = [r for r in graded if r["sample_index"] == 1]
    failures = [(r["problem_id"], r["reference_answer"], r["extracted_answer"]) for r in right if not r["verdict"]]
    assert failures == []
    assert all(r["score"] == 1.0 for r in right)
    assert sum(r["verdict"] for r in wrong) / len(wrong) < 0.05
    assert summary.graded == 1120 and summary.passed == len(right) + sum(r["verdict"] for r in wrong)


def test_answer_only_inside_thinking_scores_zero(tmp_path):
    rows = [
        _resp("a", 0, "<think>\nso it is \\boxed{7}\n</think>\n\nI am not sure.", "7"),
        _resp("a", 1, "<think>\nthe answer is \\boxed{7} but I ran out of", "7", finish_reason="length"),
        _resp("a", 2, "I am not sure.", "7", reasoning_content="clearly \\boxed{7}"),
        _resp("a", 3, "<think>\nwrong guess \\boxed{6}\n</think>\n\nFinal: \\boxed{7}", "7"),
        _resp("a", 4, "The answer is 7.", None),
    ]
    _, graded = _grade(tmp_path, rows)
    assert [r["score"] for r in graded] == [0.0, 0.0, 0.0, 1.0, 0.0]
    assert graded[3]["extracted_answer"] == "7" and graded[4]["grade_note"] == "no reference answer"
    assert graded[0]["grade_note"] == "no answer found" and graded[1]["extracted_answer"] is None
    assert all(set(grade.GRADE_FIELDS) <= set(r) for r in graded)
    assert graded[0]["teacher"] == "t" and graded[0]["domain"] == "math"


@pytest.mark.parametrize(
    "scores, pass_rate, cv",
    [
        ([1, 0, 0, 1], 0.5, math.sqrt(1 / 3) / 0.5),  # mean 0.5, sample std sqrt(4 * 0.25 / 3)
        ([1, 1, 1, 0], 0.75, 0.5 / 0.75),  # sample std sqrt(0.75 / 3) = 0.5
        ([1, 0, 0, 0], 0.25, 0.5 / 0.25),
        ([0.9, 0.1, 0.7, 0.3, 0.5], 0.0, 0.632),  # DeepDistill's worked example (no score here passes)
        ([1, 1, 1, 1], 1.0, 0.0),
        ([0, 0, 0, 0], 0.0, 0.0),  # mean 0: cv defined as 0.0
    ],
)
def test_pass_rate_and_cv_hand_computed(scores, pass_rate, cv):
    st = problem_stats([float(s) for s in scores], [s >= 1 for s in scores], [10, 20, 30, 40, 50][: len(scores)])
    assert st["n"] == len(scores) and st["passes"] == sum(s >= 1 for s in scores)
    assert st["pass_rate"] == pytest.approx(pass_rate)
    assert st["cv"] == pytest.approx(cv, abs=1e-3)
    assert st["mean_response_tokens"] == 25 + 5 * (len(scores) - 4)


def test_cv_on_continuous_scores():
    st = problem_stats([0.2, 0.4], [False, False])
    assert st["mean_score"] == pytest.approx(0.3)
    assert st["cv"] == pytest.approx(math.sqrt(0.02) / 0.3)


def test_stats_file_failed_and_superseded(tmp_path):
    rows = [
        _resp("p", 0, "\\boxed{1}", "1"),
        _resp("p", 1, None, "1", status="failed", error="timeout"),
        _resp("p", 2, "\\boxed{2}", "1"),
        _resp("q", 0, None, "5", status="failed", error="429"),
        _resp("q", 0, "\\boxed{5}", "5"),  # the retry of the failed request supersedes it
    ]
    summary, graded = _grade(tmp_path, rows)
    assert [(r["problem_id"], r["sample_index"]) for r in graded] == [("p", 0), ("p", 2), ("q", 0)]
    assert (summary.failed_generation, summary.superseded, summary.graded) == (1, 1, 3)
    stats = {s["problem_id"]: s for s in _read(tmp_path / "r.graded.stats.jsonl")}
    assert stats["p"]["n"] == 2 and stats["p"]["passes"] == 1 and stats["p"]["cv"] == pytest.approx(math.sqrt(2))
    assert stats["q"]["pass_rate"] == 1.0 and stats["q"]["cv"] == 0.0


def test_resume_after_kill_gives_identical_output(tmp_path):
    rows = [_resp(f"p{i // 3}", i % 3, f"<think>\nt\n</think>\n\n\\boxed{{{i % 4}}}", str(i % 3)) for i in range(30)]
    src = _write(tmp_path / "r.jsonl", rows)
    full = str(tmp_path / "full.jsonl")
    grade.grade_file(src, full, GradeConfig())
    data = open(full, "rb").read()
    lines = data.splitlines(keepends=True)
    partial = str(tmp_path / "partial.jsonl")
    with open(partial, "wb") as f:  # a run killed while writing record 12
        f.write(b"".join(lines[:11]) + lines[11][:25])
    summary = grade.grade_file(src, partial, GradeConfig())
    assert summary.resumed == 11 and summary.graded == 19
    assert open(partial, "rb").read() == data
    assert open(tmp_path / "partial.stats.jsonl", "rb").read() == open(tmp_path / "full.stats.jsonl", "rb").read()


@pytest.mark.timeout(120)
def test_pathological_answer_is_bounded_by_the_timeouts(tmp_path):
    """Huge towers make sympy run away; the math-verify timeouts turn them into score 0, not a hang."""
    rows = [_resp("h", 0, "\\boxed{9^{9^{9^{9}}}}", "10^{10^{10}}"), _resp("h", 1, "\\boxed{3}", "3")]
    _, graded = _grade(tmp_path, rows, parse_timeout_s=1, verify_timeout_s=1)
    assert [r["score"] for r in graded] == [0.0, 1.0]


@pytest.mark.slow
def test_worker_processes_match_single_process(tmp_path):
    rows = [_resp(f"p{i}", 0, f"\\boxed{{\\frac{{{i}}}{{2}}}}", f"{i / 2}") for i in range(1, 25)]
    src = _write(tmp_path / "r.jsonl", rows)
    grade.grade_file(src, str(tmp_path / "one.jsonl"), GradeConfig(workers=1))
    grade.grade_file(src, str(tmp_path / "two.jsonl"), GradeConfig(workers=2))
    assert open(tmp_path / "one.jsonl", "rb").read() == open(tmp_path / "two.jsonl", "rb").read()
    assert all(r["verdict"] for r in _read(tmp_path / "one.jsonl"))


def test_pluggable_verifier_by_domain(tmp_path):
    def exact(answer, reference, record):
        return verify.Verdict(1.0 if answer.strip() == reference else 0.25, answer.strip())

    verify.register_verifier("exact-test", exact, overwrite=True)
    with pytest.raises(ValueError, match="already registered"):
        verify.register_verifier("exact-test", lambda *a: None)
    rows = [_resp("c", 0, "<think>x</think>yes", "yes", domain="exact-test"), _resp("c", 1, "no", "yes", domain="exact-test")]
    _, graded = _grade(tmp_path, rows)
    assert [(r["score"], r["verdict"], r["domain"]) for r in graded] == [(1.0, True, "exact-test"), (0.25, False, "exact-test")]
    with pytest.raises(KeyError, match="no verifier for domain 'nope'"):
        _grade(tmp_path, [_resp("c", 0, "a", "a", domain="nope")], name="n")


@pytest.mark.slow  # loading the 151k-vocab tokenizer takes ~5 s per load on 2 cores
def test_response_tokens_with_tokenizer(tmp_path, qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    response = "<think>\nLet me add 12 and 30.\n</think>\n\nThe answer is \\boxed{42}."
    _, (plain,) = _grade(tmp_path, [_resp("t", 0, response, "42")])
    _, (counted,) = _grade(tmp_path, [_resp("t", 0, response, "42")], name="tok", tokenizer=qwen_tokenizer_dir)
    assert plain["response_tokens"] == len(response.split())
    assert counted["response_tokens"] == len(tok(response, add_special_tokens=False)["input_ids"])


def test_other_layouts_group_by_problem_text(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Compute 2+2."}, {"role": "assistant", "content": "<think>t</think>\\boxed{4}"}], "answer": "4"},
        {"messages": [{"role": "user", "content": "Compute  2+2. "}, {"role": "assistant", "content": "\\boxed{5}"}], "answer": "4"},
    ]
    _, graded = _grade(tmp_path, rows)
    assert graded[0]["problem_id"] == graded[1]["problem_id"]
    assert [r["sample_index"] for r in graded] == [0, 1] and [r["verdict"] for r in graded] == [True, False]


def test_cli_grade_and_strict(tmp_path, capsys):
    src = _write(tmp_path / "r.jsonl", [_resp("a", 0, "\\boxed{1}", "1")], tail=b'{"problem_id": "b", "sample')
    out = str(tmp_path / "g.jsonl")
    assert cli.main(["grade", "--in", src, "--out", out]) == 0
    assert "1 graded" in capsys.readouterr().out and len(_read(out)) == 1
    rep = json.loads(open(tmp_path / "g.report.json").read())
    assert rep["dropped_input"]["by_reason"] == {"invalid_json": 1}
    shutil.copy(src, tmp_path / "s.jsonl")
    assert cli.main(["grade", "--in", str(tmp_path / "s.jsonl"), "--out", str(tmp_path / "gs.jsonl"), "--strict"]) == 2
    assert re.search(r"lt-jax grade: error: .*s.jsonl:2: invalid JSON", capsys.readouterr().err)
    with pytest.raises(DataError, match=r"s.jsonl:2: invalid JSON"):
        grade.grade_file(str(tmp_path / "s.jsonl"), str(tmp_path / "gs2.jsonl"), GradeConfig(policy="strict"))
    assert len(_read(tmp_path / "gs.jsonl")) == 1  # the record before the bad line was written
