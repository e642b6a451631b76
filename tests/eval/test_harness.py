"""The harness end to end with stand-in generators: scores, resume, reports, gs:// outputs."""

import json
import os

import pytest
from eval_stubs import CoinGenerator, LookupGenerator, reference_answers

from lt_jax.data import jsonl
from lt_jax.eval import benchmarks, harness
from lt_jax.eval.generators import Completion


def read_records(path):
    return [rec for _, rec in jsonl.read_jsonl(path, policy="strict")]


def test_reference_answers_score_100_and_shuffled_near_0(tmp_path):
    cfg = harness.EvalConfig(num_samples=2)
    for name, limit in (("aime24", None), ("math500", 60)):
        bench = benchmarks.load_benchmark(name).head(limit)
        good = harness.evaluate_benchmark(LookupGenerator(reference_answers(bench)), bench, cfg,
                                          str(tmp_path / f"{name}-ref"), progress=False)
        assert good["pass@1"] == 1.0 and good["maj@2"] == 1.0 and good["pass@k"]["2"] == 1.0
        assert good["num_items"] == len(bench) and good["no_answer_share"] == 0.0
        bad = harness.evaluate_benchmark(LookupGenerator(reference_answers(bench, shuffle_seed=1)), bench, cfg,
                                         str(tmp_path / f"{name}-shuf"), progress=False)
        assert bad["pass@1"] < 0.1, name  # a few MATH-500 answers repeat (e.g. two problems with answer 2)
        assert bad["pass@1_std"] == 0.0  # both samples identical -> both runs identical


def test_answer_only_inside_thinking_scores_zero(tmp_path):
    bench = benchmarks.load_benchmark("aime24").head(3)
    answers = {t: f"<think>It is \\boxed{{{it.answer}}}</think>\n\nI give up." for t, it in
               zip(reference_answers(bench), bench.items)}
    s = harness.evaluate_benchmark(LookupGenerator(answers), bench, harness.EvalConfig(num_samples=1),
                                   str(tmp_path / "o"), progress=False)
    assert s["pass@1"] == 0.0 and s["no_answer_share"] == 1.0


def test_kill_and_resume_gives_the_uninterrupted_result(tmp_path):
    bench = benchmarks.load_benchmark("math500").head(13)
    answers = reference_answers(bench)
    cfg = harness.EvalConfig(num_samples=4, batch_size=3)
    fresh, fresh_records = harness.run_benchmark(CoinGenerator(answers), bench, cfg, str(tmp_path / "fresh"), progress=False)

    out = str(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="simulated crash"):
        harness.run_benchmark(CoinGenerator(answers, fail_after=2), bench, cfg, out, progress=False)
    gen_path = os.path.join(out, "generations.jsonl")
    assert [r["id"] for r in read_records(gen_path)] == [it.id for it in bench.items[:6]]
    with open(gen_path, "a") as f:  # a write torn by the kill
        f.write('{"id": "test/half-written')
    rerun = CoinGenerator(answers)
    resumed, records = harness.run_benchmark(rerun, bench, cfg, out, progress=False)
    assert rerun.calls == 3  # only the 7 missing problems were generated, in batches of 3
    ids = [r["id"] for r in read_records(gen_path)]
    assert ids == [it.id for it in bench.items]  # no duplicates, no gaps, benchmark order
    drop = lambda s: {k: v for k, v in s.items() if k != "generator"}  # noqa: E731
    assert drop(resumed) == drop(fresh)
    assert 0 < fresh["pass@1"] < 1 and fresh["pass@1_std"] > 0  # the coin really varied
    full = read_records(gen_path)
    assert full == read_records(str(tmp_path / "fresh" / "generations.jsonl"))  # texts, seeds, scores
    assert [r["samples"][0]["num_tokens"] for r in records] == [r["samples"][0]["num_tokens"] for r in fresh_records]
    # a finished eval rerun generates nothing
    again = CoinGenerator(answers)
    harness.run_benchmark(again, bench, cfg, out, progress=False)
    assert again.calls == 0


def test_resume_with_other_settings_is_refused(tmp_path):
    bench = benchmarks.load_benchmark("aime25").head(2)
    gen = LookupGenerator(reference_answers(bench))
    harness.evaluate_benchmark(gen, bench, harness.EvalConfig(num_samples=1), str(tmp_path), progress=False)
    other = harness.EvalConfig(num_samples=1, sampling=harness.SamplingConfig(temperature=1.0))
    with pytest.raises(harness.ResumeMismatch, match="sampling"):
        harness.evaluate_benchmark(gen, bench, other, str(tmp_path), progress=False)


def test_reports_for_several_runs(tmp_path):
    benches = [benchmarks.load_benchmark("aime24").head(6), benchmarks.load_benchmark("cn_math_2024").head(4)]
    answers, shuffled = {}, {}
    for b in benches:
        answers |= reference_answers(b)
        shuffled |= reference_answers(b, shuffle_seed=3)
    runs = [harness.RunSpec("good", lambda: LookupGenerator(answers, "good")),
            harness.RunSpec("coin", lambda: CoinGenerator(answers, "coin"))]
    cfg = harness.EvalConfig(num_samples=4)
    result = harness.evaluate(runs, benches, cfg, str(tmp_path), progress=False)

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["runs"]["good"]["aime24"]["pass@1"] == 1.0
    assert summary["runs"]["coin"]["cn_math_2024"]["pass@1"] == result["runs"]["coin"]["cn_math_2024"]["pass@1"]
    assert summary["config"]["num_samples"] == 4
    md = (tmp_path / "results.md").read_text()
    assert "| good | 100.0 ± 0.0 | 100.0 ± 0.0 |" in md
    assert "## aime24 (math, 6 items x 4 samples)" in md and "maj@4" in md
    png = (tmp_path / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(tmp_path / "results.png") as im:
        im.verify()
        assert im.size[0] > 500 and im.size[1] > 300
    items = read_records(str(tmp_path / "good" / "aime24" / "items.jsonl"))
    assert len(items) == 6 and all(r["majority_correct"] and r["pass_rate"] == 1.0 for r in items)
    for run in ("good", "coin"):
        for b in ("aime24", "cn_math_2024"):
            assert json.loads((tmp_path / run / b / "summary.json").read_text())["headline"]["name"] == "pass@1"


def test_cutoff_and_errors_are_reported(tmp_path):
    bench = benchmarks.load_benchmark("aime25").head(2)

    class Mixed:
        name = "mixed"

        def generate(self, prompts, n, params, seeds=None):
            return [[Completion("<think>still going", 100, "length"), Completion("", 0, "error", error="400"),
                     Completion("\\boxed{1}", 10, "stop"), Completion("\\boxed{1}", 30, "stop")] for _ in prompts]

    s = harness.evaluate_benchmark(Mixed(), bench, harness.EvalConfig(num_samples=4), str(tmp_path), progress=False)
    assert s["cutoff_share"] == 0.25 and s["generation_errors"] == 2
    assert s["mean_tokens"]["incorrect"] == pytest.approx((100 + 0 + 10 + 30) / 4)
    assert s["no_answer_share"] == 0.5 and s["pass@1"] == 0.0


def test_gcs_output_dir_and_resume(gcs_bucket):
    from lt_jax import storage

    bench = benchmarks.load_benchmark("aime24").head(5)
    answers = reference_answers(bench)
    out = f"{gcs_bucket}/evals/run1"
    cfg = harness.EvalConfig(num_samples=2, batch_size=2)
    with pytest.raises(RuntimeError):
        harness.evaluate_benchmark(LookupGenerator(answers, fail_after=1), bench, cfg, out, progress=False)
    assert len(read_records(storage.join(out, "generations.jsonl"))) == 2  # uploaded on the way out
    s = harness.evaluate_benchmark(LookupGenerator(answers), bench, cfg, out, progress=False)
    assert s["pass@1"] == 1.0
    assert [r["id"] for r in read_records(storage.join(out, "generations.jsonl"))] == [it.id for it in bench.items]
    assert json.loads(storage.read_text(storage.join(out, "summary.json")))["num_items"] == 5
