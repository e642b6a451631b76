"""Selection: DeepDistill stage I / II on hand-computed cases, caps, lengths, the report, the pipeline."""

from __future__ import annotations

import json

import pytest

from lt_jax import cli, storage
from lt_jax.config import ConfigError
from lt_jax.data import jsonl
from lt_jax.data.select import Candidate, SelectConfig, plan, select_file

# problem -> sample scores (verdict = score 1). Hand-computed statistics (sample std / mean):
#   A [1,1,1,1] pass 1.00 cv 0          B [1,0,0,0] pass 0.25 cv 0.5 / 0.25 = 2
#   C [0,0,0,0] pass 0.00 (unsolved)    D [1,1,0,1] pass 0.75 cv 0.5 / 0.75 = 0.667
SCORES = {"A": [1, 1, 1, 1], "B": [1, 0, 0, 0], "C": [0, 0, 0, 0], "D": [1, 1, 0, 1]}
TEXTS = {
    "A": "How many positive divisors does 3600 have?",
    "B": "Find the remainder when 7 to the power 2024 is divided by 100.",
    "C": "A regular hexagon has side length 4. Compute its area.",
    "D": "In how many ways can 5 books be arranged on a shelf if two must be adjacent?",
}


def _cands(scores=SCORES) -> list[Candidate]:
    return [
        Candidate(key=(p, k), problem=TEXTS[p], verdict=bool(s), score=float(s), tokens=100 + 10 * k, chars=500 + 100 * k)
        for p, ss in scores.items() for k, s in enumerate(ss)
    ]


def _kept(result) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for p, k in result.kept:
        out.setdefault(p, []).append(k)
    return out


def test_stage1_drops_unsolved_and_filters_high_cv():
    result = plan(_cands(), SelectConfig(cv_threshold=0.05))
    assert _kept(result) == {"A": [0, 1, 2, 3], "B": [0], "D": [0, 1, 3]}
    assert result.stats["B"]["cv"] == pytest.approx(2.0) and result.stats["D"]["cv"] == pytest.approx(2 / 3)
    assert result.counts() == {"unsolved": 4, "failing_response_high_cv": 4}
    # A threshold between D's and B's CV keeps D's failing response but not B's.
    assert _kept(plan(_cands(), SelectConfig(cv_threshold=1.0))) == {"A": [0, 1, 2, 3], "B": [0], "D": [0, 1, 2, 3]}
    # No CV rule: every response of a solved problem stays.
    assert _kept(plan(_cands(), SelectConfig(cv_threshold=None))) == {"A": [0, 1, 2, 3], "B": [0, 1, 2, 3], "D": [0, 1, 2, 3]}
    # only_passing applies the filter to every problem.
    assert _kept(plan(_cands(), SelectConfig(cv_threshold=None, only_passing=True))) == {"A": [0, 1, 2, 3], "B": [0], "D": [0, 1, 3]}


def test_stage2_highest_cv_one_passing_response_each():
    assert _kept(plan(_cands(), SelectConfig(stage=2, stage2_count=1))) == {"B": [0]}
    assert _kept(plan(_cands(), SelectConfig(stage=2, stage2_count=2))) == {"B": [0], "D": [0]}
    # fraction of the problems left after stage I (A, B, D): round(0.5 * 3) = 2
    assert _kept(plan(_cands(), SelectConfig(stage=2, stage2_fraction=0.5))) == {"B": [0], "D": [0]}
    result = plan(_cands(), SelectConfig(stage=2, stage2_count=5))  # A's CV (0) is not above the threshold
    kept = _kept(result)
    assert kept.keys() == {"B", "D"} and kept["B"] == [0] and len(kept["D"]) == 1 and kept["D"][0] in (0, 1, 3)
    assert result.counts()["not_in_stage2"] == 4 + 2  # all of A, D's other two passing
    picks = {_kept(plan(_cands(), SelectConfig(stage=2, stage2_count=2, seed=s)))["D"][0] for s in range(20)}
    assert picks == {0, 1, 3}  # a random passing response, fixed by the seed
    with pytest.raises(ValueError, match="exactly one of stage2_count or stage2_fraction"):
        SelectConfig(stage=2)


def test_pass_rate_band_cap_and_lengths():
    band = plan(_cands(), SelectConfig(min_pass_rate=0.3, max_pass_rate=0.8, cv_threshold=None))
    assert _kept(band) == {"D": [0, 1, 2, 3]}
    assert band.counts() == {"unsolved": 4, "pass_rate_above_band": 4, "pass_rate_below_band": 4}
    capped = plan(_cands(), SelectConfig(max_per_problem=2, cv_threshold=None))
    assert _kept(capped) == {"A": [0, 1], "B": [0, 1], "D": [0, 1]}  # passing first: B keeps its pass (0), then 1
    capped_d = plan(_cands({"D": [0, 1, 0, 1]}), SelectConfig(max_per_problem=1, cv_threshold=None))
    assert _kept(capped_d) == {"D": [1]}  # the passing response outranks an earlier failing one
    lengths = plan(_cands(), SelectConfig(min_chars=550, max_tokens=125, cv_threshold=None))
    assert _kept(lengths) == {"A": [1, 2], "B": [1, 2], "D": [1, 2]}
    # length rules come first: C's samples 0 and 3 are dropped for length, 1 and 2 as unsolved
    assert lengths.counts() == {"unsolved": 2, "too_short": 4, "too_long": 4}


def test_every_candidate_accounted_for():
    cands = _cands() + [Candidate(key=("E", 0), problem="x", failed=True), Candidate(key=("F", 0), problem="y", verdict=True, score=1.0, truncated=True)]
    result = plan(cands, SelectConfig())
    assert len(result.kept) + len(result.dropped) == len(cands)
    assert result.dropped[("E", 0)] == "failed_generation" and result.dropped[("F", 0)] == "truncated"


def _graded_rows():
    rows = []
    for p, ss in SCORES.items():
        for k, s in enumerate(ss):
            rows.append({"problem_id": p, "sample_index": k, "prompt": TEXTS[p] + "\nPut the answer in \\boxed{}.",
                         "response": f"<think>\nthinking {k}\n</think>\n\n\\boxed{{{s}}}", "reasoning_content": None,
                         "reference_answer": "1", "finish_reason": "stop", "status": "ok", "error": None, "teacher": "t",
                         "verdict": bool(s), "extracted_answer": str(s), "score": float(s), "domain": "math", "response_tokens": 5})
    return rows


def test_select_file_report_adds_up(tmp_path, jl):
    rows = _graded_rows()
    rows.append(dict(rows[0], sample_index=9, status="failed", verdict=False, score=0.0))
    src = jl.write(tmp_path / "graded.jsonl", rows, tail=b'{"problem_id": "A", "sampl')
    out = str(tmp_path / "sft.jsonl")
    report = select_file(src, out, SelectConfig())
    assert report["records_in"] == 18 and report["records_out"] == 8
    assert report["dropped"] == {"bad_input:invalid_json": 1, "failed_generation": 1, "failing_response_high_cv": 4, "unsolved": 4}
    assert report["records_in"] == report["records_out"] + report["dropped_total"]
    assert json.loads(open(tmp_path / "sft.report.json").read())["records_out"] == 8
    sft = jl.read(out)
    assert [r["id"] for r in sft] == ["A#0", "A#1", "A#2", "A#3", "B#0", "D#0", "D#1", "D#3"]
    first = sft[0]
    assert first["messages"] == [
        {"role": "user", "content": TEXTS["A"] + "\nPut the answer in \\boxed{}."},
        {"role": "assistant", "content": "<think>\nthinking 0\n</think>\n\n\\boxed{1}"},
    ]
    assert first["meta"]["pass_rate"] == 1.0 and first["meta"]["cv"] == 0.0 and first["meta"]["problem_id"] == "A"
    assert sft[4]["meta"]["cv"] == pytest.approx(2.0)


def test_ungraded_input_needs_graded_false(tmp_path, jl, capsys):
    rows = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": "<think>t</think>a"}]} for t in TEXTS.values()]
    src = jl.write(tmp_path / "chat.jsonl", rows)
    with pytest.raises(ValueError, match="run `lt-jax grade` first"):
        select_file(src, str(tmp_path / "o.jsonl"), SelectConfig())
    assert cli.main(["select", "--in", src, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "lt-jax select: error:" in capsys.readouterr().err
    report = select_file(src, str(tmp_path / "o.jsonl"), SelectConfig(graded=False, system_prompt="Think first."))
    assert report["records_out"] == 4
    row = jl.read(tmp_path / "o.jsonl")[0]
    assert row["messages"][0] == {"role": "system", "content": "Think first."}
    assert row["messages"][-1]["content"] == "<think>\nt\n</think>\n\na"


def test_config_from_yaml_and_overrides(tmp_path):
    (tmp_path / "select.yaml").write_text("cv_threshold: 0.5\nmax_per_problem: 3\ndecontam: [a.jsonl]\n")
    from lt_jax import config

    cfg = config.load(SelectConfig, str(tmp_path / "select.yaml"), ["stage=2", "stage2_fraction=0.25"])
    assert (cfg.cv_threshold, cfg.max_per_problem, cfg.decontam, cfg.stage) == (0.5, 3, ("a.jsonl",), 2)
    with pytest.raises(ConfigError, match="min_pass_rate"):
        config.load(SelectConfig, None, ["min_pass_rate=0.9", "max_pass_rate=0.1"])


def test_pipeline_synthetic_grade_select_on_gcs(gcs_bucket, benchmark_data_dir, capsys):
    """synthetic -> grade -> select end to end through the CLI, every file on gs://."""
    base = f"{gcs_bucket}/run"
    assert cli.main(["synthetic", "--out", base, "num_problems=24", "num_heldout=4", "samples_per_problem=4"]) == 0
    assert cli.main(["grade", "--in", f"{base}/responses.jsonl", "--out", f"{base}/graded.jsonl"]) == 0
    assert cli.main(["select", "--in", f"{base}/graded.jsonl", "--out", f"{base}/sft.jsonl",
                     "--decontam", f"{benchmark_data_dir}/math500/test.jsonl", "max_per_problem=2"]) == 0
    out = capsys.readouterr().out
    assert "select: 96 records in" in out
    stats = [r for _, r in jsonl.read_jsonl(f"{base}/graded.stats.jsonl")]
    assert len(stats) == 24 and any(0 < s["pass_rate"] < 1 for s in stats)
    sft = [r for _, r in jsonl.read_jsonl(f"{base}/sft.jsonl", policy="strict")]
    report = json.loads(storage.read_text(f"{base}/sft.report.json"))
    assert report["records_out"] == len(sft) > 0 and report["contamination"]["hits"] == 0
    assert all(r["messages"][-1]["content"].startswith("<think>\n") for r in sft)
