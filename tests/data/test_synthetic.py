"""The synthetic long-thought task: correct traces, per-level wrong rates, prompt parsing, files."""

from __future__ import annotations

import math
import random
import re

import pytest

from lt_jax.config import ConfigError, load
from lt_jax.data import synthetic, verify
from lt_jax.data.synthetic import SyntheticConfig


def _boxed(answer_text: str) -> str:
    m = re.search(r"\\boxed\{(\d+)\}$", answer_text)
    assert m, answer_text
    return m.group(1)


def test_traces_correct_without_injected_errors():
    cfg = SyntheticConfig(num_problems=300, num_heldout=0, levels=(1, 2, 3, 4, 5), wrong_rate=(0.0,) * 5)
    rng = random.Random(0)
    problems = synthetic.make_problems(cfg)
    for p in problems:
        a, op, b = synthetic.parse_problem(p["problem"])
        assert int(p["answer"]) == (a + b if op == "add" else a * b)
        thinking, answer = synthetic.teacher_response(cfg.prompt_template.format(problem=p["problem"]), rng, cfg)
        assert _boxed(answer) == p["answer"]
        assert thinking.splitlines()[-1].endswith(f"={p['answer']}")  # the trace itself arrives there
    # and math-verify agrees on a sample, through the verifier grading uses
    for p in problems[:40]:
        _, answer = synthetic.teacher_response(p["problem"], rng, cfg)
        assert verify.math_verifier(answer, p["answer"], {}).score == 1.0


def test_every_trace_step_is_right_arithmetic():
    lines, result = synthetic.solve(9876, "mul", 543)
    assert result == 9876 * 543
    for line in lines:
        for lhs, rhs in re.findall(r"(\d+(?:[+*]\d+)+)=(\d+)", line):
            assert eval(lhs) == int(rhs), line  # noqa: S307 - digits and + * only


def test_injected_error_propagates_to_a_wrong_answer():
    for a, op, b in [(7, "add", 5), (905, "add", 95), (347, "mul", 58), (1000, "mul", 10), (99, "mul", 9)]:
        right = a + b if op == "add" else a * b
        n = synthetic._count_steps(a, op, b)
        for step in range(n):
            for delta in (-1, 1):
                lines, wrong = synthetic.solve(a, op, b, (step, delta))
                assert wrong != right, (a, op, b, step, delta)
                assert lines[-1].endswith(f"={wrong}")


def test_wrong_rate_per_level_matches_config():
    cfg = SyntheticConfig(levels=(1, 2, 3), wrong_rate=(0.1, 0.4, 0.7), num_problems=60, num_heldout=0)
    problems = synthetic.make_problems(cfg)
    n_per_level = 900
    for level, rate in zip(cfg.levels, cfg.wrong_rate):
        pool = [p for p in problems if p["level"] == level]
        wrong = 0
        for i in range(n_per_level):
            p = pool[i % len(pool)]
            _, answer = synthetic.teacher_response(p["problem"], synthetic.sample_rng(cfg, p["id"], i), cfg)
            wrong += _boxed(answer) != p["answer"]
        sigma = math.sqrt(rate * (1 - rate) / n_per_level)
        assert abs(wrong / n_per_level - rate) < 4 * sigma, (level, wrong / n_per_level, rate)


def test_teacher_parses_problem_out_of_a_chat_prompt():
    cfg = SyntheticConfig(wrong_rate=(0.0, 0.0, 0.0))
    prompt = ("<|im_start|>system\nYou are a careful assistant. Version 2.\n<|im_end|>\n<|im_start|>user\n"
              "Compute 482 * 37.\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n")
    thinking, answer = synthetic.teacher_response(prompt, random.Random(1), cfg)
    assert _boxed(answer) == str(482 * 37) and "482*7" in thinking
    assert synthetic.parse_problem("what is 12 x 3 ?") == (12, "mul", 3)
    with pytest.raises(ValueError, match="no 'A \\+ B' or 'A \\* B' problem"):
        synthetic.teacher_response("Tell me a story.", random.Random(0), cfg)
    # same rng seed -> same text
    assert synthetic.teacher_response(prompt, random.Random(5), SyntheticConfig()) == synthetic.teacher_response(prompt, random.Random(5), SyntheticConfig())


def test_problem_splits_are_disjoint_and_stable():
    cfg = SyntheticConfig(num_problems=100, num_heldout=30)
    train, held = synthetic.make_problems(cfg), synthetic.make_problems(cfg, "heldout")
    assert len(train) == 100 and len(held) == 30
    assert not {p["problem"] for p in train} & {p["problem"] for p in held}
    assert len({p["problem"] for p in train}) == 100
    assert synthetic.make_problems(SyntheticConfig(num_problems=10, num_heldout=30), "heldout") == held
    assert synthetic.make_problems(cfg) == train and train != synthetic.make_problems(SyntheticConfig(num_problems=100, num_heldout=30, seed=1))
    assert {p["level"] for p in train} == {1, 2, 3}
    assert set(train[0]) == {"id", "problem", "answer", "level"}
    with pytest.raises(ValueError, match="too few distinct problems"):
        synthetic.make_problems(SyntheticConfig(levels=(1,), wrong_rate=(0.0,), num_problems=500, num_heldout=0, ops=("add",)))


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="one rate per level"):
        SyntheticConfig(levels=(1, 2), wrong_rate=(0.1,))
    (tmp_path / "s.yaml").write_text("levels: [2, 4]\nwrong_rate: [0.2, 0.6]\n")
    cfg = load(SyntheticConfig, str(tmp_path / "s.yaml"), ["num_problems=8", "reasoning=separate"])
    assert cfg.levels == (2, 4) and cfg.num_problems == 8 and cfg.rate_for(3) == 0.2 and cfg.rate_for(9) == 0.6
    with pytest.raises(ConfigError, match="reasoning"):
        load(SyntheticConfig, None, ["reasoning=hidden"])


@pytest.mark.parametrize("reasoning", ["inline", "separate"])
def test_write_responses_contract(tmp_path, jl, reasoning):
    cfg = SyntheticConfig(num_problems=12, num_heldout=3, samples_per_problem=3, reasoning=reasoning)
    assert synthetic.write_responses(cfg, str(tmp_path / "r.jsonl")) == 36
    assert synthetic.write_problems(cfg, str(tmp_path / "h.jsonl"), "heldout") == 3
    rows = jl.read(tmp_path / "r.jsonl")
    keys = {"problem_id", "sample_index", "prompt", "response", "reasoning_content", "reference_answer", "finish_reason", "status", "error", "teacher"}
    assert all(keys <= set(r) for r in rows) and all(r["status"] == "ok" for r in rows)
    assert [(r["problem_id"], r["sample_index"]) for r in rows[:4]] == [("syn-train-00000", 0), ("syn-train-00000", 1), ("syn-train-00000", 2), ("syn-train-00001", 0)]
    if reasoning == "inline":
        assert all(r["response"].startswith("<think>\n") and r["reasoning_content"] is None for r in rows)
    else:
        assert all("<think>" not in r["response"] and r["reasoning_content"] for r in rows)
    assert all(r["response"].endswith("}") and "\\boxed{" in r["response"] for r in rows)
    assert len(rows[-1]["response"]) < 1200  # short enough for the tiny demo model's context
    assert synthetic.write_responses(cfg, str(tmp_path / "r2.jsonl")) == 36
    assert open(tmp_path / "r.jsonl", "rb").read() == open(tmp_path / "r2.jsonl", "rb").read()  # deterministic


def test_addition_lines_share_one_layout_across_levels():
    """Every column line of an addition task has one layout, whatever the level, and the operands
    each line restates are the previous line's shifted right by one column."""
    cfg = SyntheticConfig(levels=(2, 4), wrong_rate=(0.0, 0.0), ops=("add",))
    short, _ = synthetic.teacher_response("Compute 59 + 63.", random.Random(0), cfg)
    long, _ = synthetic.teacher_response("Compute 9016 + 2786.", random.Random(0), cfg)
    pattern = re.compile(r"^([_\d]{5})\+([_\d]{5}): (\d)\+(\d)\+(\d)=(\d\d) ([_\d]{5})$")
    for thinking in (short, long):
        cols = [pattern.match(line) for line in thinking.splitlines()[1:-1]]
        assert len(cols) == 5 and all(cols), thinking
        for prev, cur in zip(cols, cols[1:]):
            assert cur.group(1) == "_" + prev.group(1)[:-1] and cur.group(2) == "_" + prev.group(2)[:-1]
            assert cur.group(3) == cur.group(1)[-1] and cur.group(5) == prev.group(6)[0]  # digit and carry in
    assert short.splitlines()[1] == "00059+00063: 9+3+0=12 ____2" and short.splitlines()[-1] == "59+63=122"
