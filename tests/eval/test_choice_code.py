"""Multiple-choice (shuffled by seed, letter after the thinking) and code (through the sandbox) evals."""

from __future__ import annotations

import json

import pytest

from lt_jax.eval import benchmarks, choice, harness
from lt_jax.eval.generators import Completion

QUESTIONS = [
    {"id": "q0", "problem": "Which gas do plants take in?", "choices": ["Carbon dioxide", "Oxygen", "Helium", "Neon"],
     "answer": "Carbon dioxide"},
    {"id": "q1", "problem": "2 + 2 = ?", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"id": "q2", "problem": "Largest planet?", "choices": ["Mars", "Venus", "Jupiter", "Earth"], "answer": "C"},
    {"id": "q3", "problem": "Water boils at sea level at?", "choices": ["50 C", "100 C", "150 C"], "answer": "100 C"},
]
CORRECT_TEXT = {"q0": "Carbon dioxide", "q1": "4", "q2": "Jupiter", "q3": "100 C"}


def write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("text, n, expected", [
    ("<think>A or B?</think>\nAnswer: B", 4, "B"), ("Answer: (c)", 4, "C"), ("**Answer:** D", 4, "D"),
    ("The answer is: A", 4, "A"), ("\\boxed{B}", 4, "B"), ("C", 3, "C"), (" (B). ", 4, "B"),
    ("Answer: E", 4, None), ("I think B, maybe C", 4, None), ("", 4, None),
    ("Answer: A\nOn reflection.\nAnswer: D", 4, "D"),
])
def test_extract_letter(text, n, expected):
    from lt_jax.eval.harness import final_answer

    assert choice.extract_letter(final_answer(Completion(text, 1, "stop")), n) == expected


def test_choices_shuffled_by_seed_and_reference_follows(tmp_path):
    path = write(tmp_path, "mc.jsonl", QUESTIONS)
    a = benchmarks.load_benchmark(path, kind="multiple_choice", choice_seed=0)
    again = benchmarks.load_benchmark(path, kind="multiple_choice", choice_seed=0)
    b = benchmarks.load_benchmark(path, kind="multiple_choice", choice_seed=1)
    assert a.items == again.items
    assert [it.meta["choices"] for it in a.items] != [it.meta["choices"] for it in b.items]
    for it in a.items + b.items:
        letter_index = ord(it.answer) - ord("A")
        assert it.meta["choices"][letter_index] == CORRECT_TEXT[it.id]
        assert f"{it.answer}) {CORRECT_TEXT[it.id]}" in it.problem and "Answer: X" in it.problem
    assert sorted(a.items[0].meta["choices"]) == sorted(QUESTIONS[0]["choices"])
    gpqa = write(tmp_path, "gpqa.jsonl", [{"Question": "Noble gas?", "Correct Answer": "Argon", "Incorrect Answer 1": "Iron",
                                           "Incorrect Answer 2": "Carbon", "Incorrect Answer 3": "Sodium"}])
    g = benchmarks.load_benchmark(gpqa, kind="multiple_choice", fields="problem=Question,answer=Correct Answer").items[0]
    assert sorted(g.meta["choices"]) == ["Argon", "Carbon", "Iron", "Sodium"] and g.meta["choices"][ord(g.answer) - 65] == "Argon"
    bad = write(tmp_path, "bad.jsonl", [dict(QUESTIONS[0], answer="Argon")])
    with pytest.raises(benchmarks.BenchmarkError, match="none of the 4 choices"):
        benchmarks.load_benchmark(bad, kind="multiple_choice")


class ScriptedGenerator:
    """Sample j of each prompt answers `script(item_id_from_prompt, j)`."""

    def __init__(self, by_marker, script, name="scripted"):
        self.by_marker, self.script, self.name = by_marker, script, name

    def generate(self, prompts, n, params, seeds=None):
        out = []
        for p in prompts:
            user = p[-1]["content"]
            key = next(k for marker, k in self.by_marker.items() if marker in user)
            out.append([Completion(self.script(key, j), 10 + j, "stop") for j in range(n)])
        return out


def test_multiple_choice_eval_end_to_end(tmp_path):
    bench = benchmarks.load_benchmark(write(tmp_path, "mc.jsonl", QUESTIONS), kind="multiple_choice", choice_seed=7)
    refs = {it.id: it.answer for it in bench.items}
    wrong = {k: next(c for c in "ABCD" if c != v) for k, v in refs.items()}

    def script(key, j):  # q0 always right, q1 right once in two, q2 answers nothing, q3 always wrong
        letter = {"q0": refs["q0"], "q1": refs["q1"] if j == 0 else wrong["q1"], "q3": wrong["q3"]}.get(key)
        return f"<think>Answer: {refs[key]}</think>\n" + (f"Answer: {letter}" if letter else "no idea")

    gen = ScriptedGenerator({q["problem"]: q["id"] for q in QUESTIONS}, script)
    cfg = harness.EvalConfig(num_samples=2, choice_seed=7)
    summary, records = harness.run_benchmark(gen, bench, cfg, str(tmp_path / "out"), progress=False)
    assert summary["kind"] == "multiple_choice" and summary["pass@1"] == pytest.approx(3 / 8)
    assert summary["no_answer_share"] == pytest.approx(2 / 8)  # the answer inside the thinking does not count
    assert [r["num_correct"] for r in records] == [2, 1, 0, 0]


def test_code_eval_end_to_end(tmp_path):
    from lt_jax.data import sandbox

    if not sandbox.available():
        pytest.skip("no Linux namespaces for the sandbox here")
    rows = [{"id": "add", "problem": "Read two integers and print their sum.",
             "tests": [{"input": "1 2", "output": "3"}, {"input": "5 5", "output": "10"}]},
            {"id": "rev", "problem": "Read a line and print it reversed.",
             "tests": [{"input": "abc", "output": "cba"}, {"input": "xy", "output": "yx"}]}]
    bench = benchmarks.load_benchmark(write(tmp_path, "code.jsonl", rows), kind="code")
    good = {"add": "a, b = map(int, input().split())\nprint(a + b)", "rev": "print(input()[::-1])"}

    def script(key, j):
        code = good[key] if (key, j) != ("rev", 1) else "print(input())"
        return f"<think>plan</think>\n```python\n{code}\n```"

    gen = ScriptedGenerator({r["problem"]: r["id"] for r in rows}, script)
    summary, records = harness.run_benchmark(gen, bench, harness.EvalConfig(num_samples=2), str(tmp_path / "out"),
                                             progress=False)
    assert summary["kind"] == "code" and summary["pass@1"] == pytest.approx(3 / 4)
    assert [s["score"] for s in records[1]["samples"]] == [1.0, 0.0]
    prompt = harness.build_messages(bench.items[0], "code", harness.PromptConfig())[-1]["content"]
    assert prompt.startswith(rows[0]["problem"]) and "```python" in prompt
    empty = write(tmp_path, "notests.jsonl", [{"id": "x", "problem": "p", "tests": []}])
    with pytest.raises(benchmarks.BenchmarkError, match="tests"):
        benchmarks.load_benchmark(empty, kind="code")
