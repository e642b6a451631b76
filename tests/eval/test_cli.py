"""`lt-jax eval` against a served model (the project's server on loopback) and a judge."""

import json

from eval_stubs import RuleBackend, judge_reply, reference_answers

from lt_jax import cli
from lt_jax.eval import benchmarks


def test_eval_a_served_model_with_separate_reasoning(tmp_path, serve, capsys):
    bench = benchmarks.load_benchmark("aime24").head(4)
    table = reference_answers(bench)
    # Right answer after the thinking for the first two problems; for the others, only inside it.
    first_two = set(list(table)[:2])

    def respond(question, choice):
        ans = table[question].rsplit("\\boxed{", 1)[1].split("}")[0]
        if question in first_two:
            return f"<think>\nwork \\boxed{{1}}\n</think>\n\nSo \\boxed{{{ans}}}."
        return f"<think>\nit is \\boxed{{{ans}}}\n</think>\n\nSo \\boxed{{1}}."

    backend = RuleBackend(respond, "served")
    url = serve(backend, reasoning_format="separate")  # thinking comes back as reasoning_content
    out = tmp_path / "out"
    argv = ["eval", "--base-url", url, "--model", "served", "--benchmarks", "aime24", "--out", str(out),
            "--no-progress", "num_samples=3", "limit=4", "sampling.max_new_tokens=512"]
    assert cli.main(argv) == 0
    s = json.loads((out / "summary.json").read_text())["runs"]["served"]["aime24"]
    assert s["pass@1"] == 0.5 and s["samples_per_item"] == 3 and s["num_items"] == 4
    record = json.loads((out / "served" / "aime24" / "generations.jsonl").read_text().splitlines()[0])
    assert record["samples"][0]["reasoning"].strip().startswith("work")  # kept, but not graded
    assert record["prompt"][-1]["content"].endswith("put your final answer within \\boxed{}.")
    assert "served" in capsys.readouterr().out
    requests = backend.requests
    assert cli.main(argv) == 0  # rerun: resumes a finished eval, asks nothing
    assert backend.requests == requests


def test_eval_file_benchmark_and_judge_flags(tmp_path, serve):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"key": f"k{i}", "q": f"Capital of country {i}?", "a": f"City{i}"})
                              for i in range(3)) + "\n")
    model = serve(RuleBackend(lambda q, c: f"It is City{q.split()[-1][:-1]}.", "m"))
    judge_url = serve(RuleBackend(judge_reply, "j"))
    out = tmp_path / "out"
    rc = cli.main(["eval", "--base-url", model, "--model", "m", "--name", "mine", "--benchmarks", f"capitals={path}",
                   "--field", "problem=q,answer=a,id=key", "--kind", "simpleqa", "--judge-base-url", judge_url,
                   "--judge-model", "j", "--out", str(out), "--no-progress"])
    assert rc == 0
    s = json.loads((out / "mine" / "capitals" / "summary.json").read_text())
    assert s["scores"]["correct"] == 1.0 and s["num_items"] == 3
    assert "| mine | 100.0 |" in (out / "results.md").read_text()


def test_eval_errors_are_messages(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert cli.main(["eval", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", out,
                     "--benchmarks", "flames"]) == 2
    assert "judge.base_url" in capsys.readouterr().err
    assert cli.main(["eval", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", out,
                     "sampling.temperature=hot"]) == 2
    assert "sampling.temperature" in capsys.readouterr().err
    assert cli.main(["eval", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", out,
                     "--benchmarks", "aime24", "limit=1", "--no-progress", "--max-retries", "0"]) == 1  # nothing listens on port 9
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_rejected_requests_are_counted_not_fatal(tmp_path, serve, capsys):
    url = serve(RuleBackend(lambda q, c: "\\boxed{1}", "m"))
    out = tmp_path / "o"
    # the server accepts temperature in [0, 2]: each request is answered 400, recorded as an error
    assert cli.main(["eval", "--base-url", url, "--model", "m", "--benchmarks", "aime25", "--out", str(out),
                     "--no-progress", "limit=2", "num_samples=2", "sampling.temperature=3.0"]) == 0
    s = json.loads((out / "m" / "aime25" / "summary.json").read_text())
    assert s["generation_errors"] == 4 and s["pass@1"] == 0.0
    rec = json.loads((out / "m" / "aime25" / "generations.jsonl").read_text().splitlines()[0])
    assert "temperature" in rec["samples"][0]["error"] and rec["samples"][0]["finish_reason"] == "error"
    assert "4 samples rejected by the endpoint" in capsys.readouterr().err
