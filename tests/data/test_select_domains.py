"""Per-domain selection: thresholds, CV thresholds, DeepDistill's easy-query coin, stage II, the report."""

from __future__ import annotations

import random

import pytest

from lt_jax.data import verify
from lt_jax.data.grade import problem_stats
from lt_jax.data.select import Candidate, SelectConfig, plan, select_file

# problem -> (domain, scores). Passing per the published thresholds (score above):
#   M math    [1, 1, 0, 0]          passes TTFF  mean .5    sample std .577  cv 1.155
#   K code    [1, .95, .5, 1]       passes TFFT  (0.95 is not above 0.99)
#   S science [1, .8, 1, 1]         passes TFTT  mean .95   std .1           cv 0.105
#   O other   [.75, .5, .75, .25]   passes TFTF  mean .5625 std .2394        cv 0.426
#   E other   [.75, .75, .75, .75]  passes TTTT  cv 0: easy
#   I instruction_following [1]*4   passes TTTT  cv 0: easy
PROBLEMS = {
    "M": ("math", [1, 1, 0, 0]), "K": ("code", [1, 0.95, 0.5, 1]), "S": ("science", [1, 0.8, 1, 1]),
    "O": ("other", [0.75, 0.5, 0.75, 0.25]), "E": ("other", [0.75] * 4), "I": ("instruction_following", [1.0] * 4),
}


def cands(problems=PROBLEMS):
    return [Candidate(key=(p, k), problem=f"problem {p} text number {i}", verdict=verify.passes(s, dom), score=float(s),
                      tokens=10, chars=50, domain=dom)
            for i, (p, (dom, ss)) in enumerate(problems.items()) for k, s in enumerate(ss)]


def kept(result):
    out: dict[str, list[int]] = {}
    for p, k in result.kept:
        out.setdefault(p, []).append(k)
    return out


def test_paper_cv_example_and_hand_computed_stats():
    assert problem_stats([0.9, 0.1, 0.7, 0.3, 0.5], [False] * 5)["cv"] == pytest.approx(0.632, abs=1e-3)
    res = plan(cands(), SelectConfig(cv_threshold=0.05, dedup_near=False))
    assert res.stats["S"]["cv"] == pytest.approx(0.1 / 0.95) and res.stats["O"]["cv"] == pytest.approx(0.23936 / 0.5625, abs=1e-4)
    assert [res.stats[p]["passes"] for p in "MKSOEI"] == [2, 2, 3, 2, 4, 4]


def test_stage1_keep_rule_per_domain():
    res = plan(cands(), SelectConfig(cv_threshold=0.05, dedup_near=False))
    assert kept(res) == {"M": [0, 1], "K": [0, 3], "S": [0, 2, 3], "O": [0, 2], "E": [0, 1, 2, 3], "I": [0, 1, 2, 3]}
    # per-domain CV thresholds: science at 0.2 makes S easy (all kept under the plain rule)
    res = plan(cands(), SelectConfig(cv_threshold=0.05, cv_thresholds={"science": 0.2}, dedup_near=False))
    assert kept(res)["S"] == [0, 1, 2, 3]
    # per-domain pass thresholds re-judge scores: code passing at 0.9 makes K's 0.95 pass
    res = plan(cands(), SelectConfig(cv_threshold=0.05, pass_thresholds={"code": 0.9}, dedup_near=False))
    assert kept(res)["K"] == [0, 1, 3] and res.stats["K"]["passes"] == 3


def test_deepdistill_easy_rule():
    cfg = SelectConfig(cv_threshold=0.05, easy_rule="deepdistill", dedup_near=False, seed=3)
    res = plan(cands(), cfg)
    assert "I" not in kept(res) and res.dropped[("I", 0)] == "easy_query"  # easy and not other: dropped
    assert kept(res)["M"] == [0, 1] and kept(res)["O"] == [0, 2]  # hard queries as before
    e_kept = "E" in kept(res)
    assert e_kept or res.dropped[("E", 0)] == "easy_query_coin"
    # the coin: about half of many easy "other" problems stay, fixed by the seed, independent of order
    many = {f"e{i}": ("other", [0.75] * 2) for i in range(400)}
    runs = {}
    for seed in (0, 1):
        cfg = SelectConfig(cv_threshold=0.05, easy_rule="deepdistill", dedup_near=False, dedup_exact=False, seed=seed)
        cs = cands(many)
        first = set(kept(plan(cs, cfg)))
        random.Random(seed).shuffle(cs)
        assert set(kept(plan(cs, cfg))) == first
        runs[seed] = first
    assert 160 <= len(runs[0]) <= 240 and runs[0] != runs[1]
    always = SelectConfig(cv_threshold=0.05, easy_rule="deepdistill", dedup_near=False, dedup_exact=False,
                        easy_keep_probability=1.0)
    assert len(kept(plan(cands(many), always))) == 400


def test_stage2_only_above_threshold_highest_cv_one_random_passing():
    res = plan(cands(), SelectConfig(cv_threshold=0.05, stage=2, stage2_count=10, dedup_near=False))
    got = kept(res)
    assert set(got) == {"M", "K", "S", "O"}  # E and I have CV 0
    assert all(len(v) == 1 for v in got.values())
    assert got["M"][0] in (0, 1) and got["K"][0] in (0, 3) and got["S"][0] in (0, 2, 3) and got["O"][0] in (0, 2)
    top2 = plan(cands(), SelectConfig(cv_threshold=0.05, stage=2, stage2_count=2, dedup_near=False))
    assert set(kept(top2)) == {"M", "O"}  # cv 1.155 and 0.426 beat K's 0.282 and S's 0.105


def test_report_balances_per_domain(tmp_path, jl):
    rows = [{"problem_id": p, "sample_index": k, "prompt": f"problem {p} number {i}", "response": f"<think>t</think>a{k}",
             "status": "ok", "finish_reason": "stop", "verdict": verify.passes(s, dom), "score": float(s), "domain": dom}
            for i, (p, (dom, ss)) in enumerate(PROBLEMS.items()) for k, s in enumerate(ss)]
    report = select_file(jl.write(tmp_path / "g.jsonl", rows), str(tmp_path / "sft.jsonl"),
                         SelectConfig(cv_threshold=0.05, easy_rule="deepdistill", dedup_near=False))
    dom = report["by_domain"]
    assert set(dom) == {"math", "code", "science", "other", "instruction_following"}
    assert dom["math"] == {"records_in": 4, "records_out": 2, "problems_in": 1, "problems_out": 1,
                           "dropped": {"failing_response_high_cv": 2}}
    assert dom["instruction_following"]["dropped"] == {"easy_query": 4}
    for d in dom.values():
        assert d["records_in"] == d["records_out"] + sum(d["dropped"].values())
    assert sum(d["records_out"] for d in dom.values()) == report["records_out"]
