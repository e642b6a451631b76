"""Judge verifiers through the project's own server with a rule-based stub judge on loopback."""

import re

import pytest

from lt_jax.data import grade, judge_verify, verify
from lt_jax.sample.backends import Choice, GenResult
from lt_jax.sample.server import ServerConfig, ServerThread


class StubJudge:
    """Answers our judge prompts by rule; replies for a "MALFORMED" response are unparsable.
    After `fail_after` requests it raises, which the server answers with HTTP 500 (an outage)."""

    name = "stub-judge"

    def __init__(self, fail_after: int | None = None):
        self.fail_after, self.requests, self.largest_batch = fail_after, 0, 0

    def reply(self, prompt: str) -> str:
        response = prompt.rsplit("<<<", 1)[1].rsplit(">>>", 1)[0].strip()
        if "MALFORMED" in response:
            return {0: "Looks fine to me.", 1: "SCORE: 9", 2: "SCORE: 4.5"}[len(response) % 3]
        if "SCORE: <one" in prompt:  # science
            ref = re.search(r"Reference answer: (.*)", prompt).group(1)
            return "<think>SCORE: 0</think>Same facts.\nSCORE: 5" if ref in response else "Partly.\n**SCORE:** 3"
        if "COHERENCE" in prompt:  # reward
            n = 4 if "thorough" in response else 1
            return f"Fine.\nCOHERENCE: {n}\nCORRECTNESS: {n}\nHELPFULNESS: {min(n, 3)}"
        return "VERDICT: EQUIVALENT" if "one half" in response else "VERDICT: NOT_EQUIVALENT"  # math re-check

    def generate(self, requests):
        self.largest_batch = max(self.largest_batch, len(requests))
        out = []
        for r in requests:
            self.requests += 1
            if self.fail_after is not None and self.requests > self.fail_after:
                raise RuntimeError("judge is down")
            text = self.reply(r.messages[-1]["content"])
            out.append(GenResult((Choice(text, "stop", len(text.split())),), 10))
        return out


@pytest.fixture
def judge_server():
    started = []

    def start(backend, **server):
        srv = ServerThread(backend, ServerConfig(port=0, **server)).start()
        started.append(srv)
        return srv.url

    yield start
    for srv in started:
        srv.stop()
    judge_verify.configure(judge_verify.JudgeVerifyConfig())  # the plain math verifier again


def cfg(url, tmp_path, **kw):
    return judge_verify.JudgeVerifyConfig(base_url=url, model="stub-judge", cache=str(tmp_path / "cache.sqlite"),
                                          max_retries=1, backoff_initial_s=0.01, backoff_max_s=0.02, **kw)


@pytest.mark.parametrize("text, expected", [
    ("ok\nSCORE: 5", 5), ("SCORE: 2\nthen\n**Score:** 4", 4), ("SCORE: 6", None), ("score 5", None),
    ("SCORE: 4.5", None), ("The SCORE: 5 is what I give", None), ("<think>SCORE: 1</think>\nSCORE: 0", 0), (None, None),
])
def test_parse_similarity(text, expected):
    assert judge_verify.parse_similarity(text) == expected


def test_parse_reward():
    assert judge_verify.parse_reward("COHERENCE: 4\nCORRECTNESS: 3\nHELPFULNESS: 2") == {
        "COHERENCE": 4, "CORRECTNESS": 3, "HELPFULNESS": 2}
    assert judge_verify.parse_reward("COHERENCE: 4\nCORRECTNESS: 3") is None
    assert judge_verify.parse_reward("COHERENCE: 4\nCORRECTNESS: 5\nHELPFULNESS: 2") is None


def rows(domain, items):
    return [{"problem_id": f"{domain}{i}", "sample_index": 0, "prompt": q, "response": r, "reference_answer": ref,
             "status": "ok", "domain": domain} for i, (q, r, ref) in enumerate(items)]


def test_grading_with_judges_caches_and_counts_unparsable(tmp_path, jl, judge_server):
    stub = StubJudge()
    url = judge_server(stub, batch_window_ms=200)  # a wide window: calls sent together land in one batch
    data = rows("science", [("Why is the sky blue?", "<think>hmm</think>Rayleigh scattering", "Rayleigh scattering"),
                            ("What is H2O?", "water, mostly", "water and ice"), ("X?", "MALFORMED", "y")])
    data += rows("other", [("Plan a trip", "a thorough plan", None), ("Hi", "meh", None), ("Q", "MALFORMED!", None)])
    data += rows("math", [("1/2?", "\\boxed{0.5}", "\\frac{1}{2}"), ("1/2 in words", "one half", "\\frac{1}{2}"),
                          ("2+2", "\\boxed{5}", "4")])
    src = jl.write(tmp_path / "responses.jsonl", data)
    out = str(tmp_path / "graded.jsonl")
    gcfg = grade.GradeConfig(judge=cfg(url, tmp_path, math_recheck=True))
    summary = grade.grade_file(src, out, gcfg)
    got = {r["problem_id"]: r for r in jl.read(out)}
    assert [got[f"science{i}"]["score"] for i in range(3)] == [1.0, 0.6, 0.0]
    assert [got[f"science{i}"]["verdict"] for i in range(3)] == [True, False, False]
    assert [got[f"other{i}"]["score"] for i in range(3)] == [pytest.approx(11 / 12), pytest.approx(3 / 12), 0.0]
    assert [got[f"other{i}"]["verdict"] for i in range(3)] == [True, False, False]
    assert [got[f"math{i}"]["verdict"] for i in range(3)] == [True, True, False]
    assert got["math1"]["grade_note"] == "judge: equivalent"
    assert summary.notes[judge_verify.UNPARSABLE] == 2
    assert stub.requests == 8  # science 3, other 3, math negatives 2 (math-verify settled the first)
    assert stub.largest_batch > 1  # science / other calls were asked ahead, concurrently
    tmp_out = str(tmp_path / "graded_again.jsonl")
    grade.grade_file(src, tmp_out, gcfg)  # a fresh output: every judge call comes from the cache
    assert stub.requests == 8 and jl.read(tmp_out) == jl.read(out)
    assert verify.get_verifier("math") is verify.math_verifier  # the re-check ends with the grade run


def test_judge_outage_resumes_without_duplicates(tmp_path, jl, judge_server):
    data = rows("science", [(f"Q{i}", f"answer {i}", f"answer {i}" if i % 2 else "other") for i in range(20)])
    src = jl.write(tmp_path / "responses.jsonl", data)
    out = str(tmp_path / "graded.jsonl")
    down = StubJudge(fail_after=12)  # calls are asked ahead in chunks of 8 x concurrency (1 here)
    with pytest.raises(judge_verify.JudgeUnavailable, match="rerun to resume"):
        grade.grade_file(src, out, grade.GradeConfig(judge=cfg(judge_server(down), tmp_path, concurrency=1)))
    assert len(jl.read(out)) == 8  # the first chunk graded; the second's 4 answered calls are cached
    up = StubJudge()
    grade.grade_file(src, out, grade.GradeConfig(judge=cfg(judge_server(up), tmp_path, concurrency=4)))
    graded = jl.read(out)
    assert sorted(r["problem_id"] for r in graded) == sorted(r["problem_id"] for r in data)  # no gaps, no duplicates
    assert up.requests == 20 - 12
    assert [r["score"] for r in sorted(graded, key=lambda r: int(r["problem_id"][7:]))] == [0.6, 1.0] * 10


def test_judged_domain_without_judge_is_a_config_error(tmp_path, jl):
    src = jl.write(tmp_path / "r.jsonl", rows("science", [("Q", "A", "A")]))
    with pytest.raises(judge_verify.ConfigError, match="judge.base_url"):
        grade.grade_file(src, str(tmp_path / "g.jsonl"), grade.GradeConfig())


def test_pass_rule_is_strict_and_per_domain():
    assert verify.passes(1.0, "science") and not verify.passes(0.8, "science")
    assert verify.passes(0.71, "other") and not verify.passes(0.7, "other")
    assert verify.passes(0.5, "other", {"other": 0.4}) and verify.passes(0.5, "math", {"*": 0.4})
    assert not verify.passes(0.99, "math") and verify.passes(1.0, "math") and verify.passes(1.0, "my_domain")
