"""The demo end to end on a shrunken tiny.yaml: every stage runs and hands its files to the next."""

import json
import math
import os

import pytest

from lt_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    work = tmp_path / "demo"
    status = cli.main([
        "demo", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"demo.workdir={work}",
        "synthetic.num_problems=40", "synthetic.num_heldout=8", "train.steps=3", "train.global_batch=8",
        "eval.num_samples=1", "eval.sampling.max_new_tokens=48",
    ])
    assert status == 0
    out = capsys.readouterr().out
    # Every stage, in order, as its own heading, each lt-jax stage followed by the command it ran.
    lines = out.splitlines()
    headings = [(i, line[4:]) for i, line in enumerate(lines) if line.startswith("=== ")]
    expected = [("1. synthetic", "synthetic"), ("2. teacher", None), ("2-3. distill", "distill"), ("4. tokenizer", None),
                ("5. grade", "grade"), ("6. select", "select"), ("7. tokenize", "tokenize"), ("8. train", "train"),
                ("9. eval", "eval"), ("10. export", "export-hf"), ("demo finished", None)]
    assert len(headings) == len(expected), [h for _, h in headings]
    for (i, heading), (title, command) in zip(headings, expected):
        assert heading.startswith(title), (heading, title)
        if command:
            assert lines[i + 1].startswith(f"$ lt-jax {command} "), lines[i + 1]
    # Distilled over HTTP: one record per (problem, sample), all answered.
    responses = [json.loads(line) for line in (work / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 40 * 4 and all(r["status"] == "ok" for r in responses)
    assert len({(r["problem_id"], r["sample_index"]) for r in responses}) == len(responses)
    # Selection dropped the failing responses of high-CV problems and said so.
    report = json.loads((work / "sft.report.json").read_text())
    sft = (work / "sft.jsonl").read_text().splitlines()
    assert report["records_in"] == len(responses) and len(sft) == report["records_out"] < len(responses)
    manifest = json.loads((work / "tokens" / "train" / "manifest.json").read_text())
    assert manifest["num_records"] == len(sft)
    records = [json.loads(line) for line in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    assert sorted(losses) == [1, 2, 3]
    # From a random init the first loss is about ln(vocab) (the tokenizer's ~1k tokens), and it falls.
    assert abs(losses[1] - math.log(1024)) < 1.0 and losses[3] < losses[1], losses
    assert f"train loss: {losses[1]:.3f} at step 1 -> {losses[3]:.3f} at step 3" in out
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert set(summary["runs"]) == {"before", "after"}
    for name, benches in summary["runs"].items():
        assert 0.0 <= benches["heldout"]["pass@1"] <= 1.0
        assert f"held-out pass@1 {name}: {benches['heldout']['pass@1']:.1%}" in out
    assert (work / "hf" / "model.safetensors").exists() and (work / "hf" / "chat_template.jinja").exists()
    # A rerun resumes: every stage finds its work done and the demo still succeeds.
    assert cli.main(["demo", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"demo.workdir={work}",
                     "synthetic.num_problems=40", "synthetic.num_heldout=8", "train.steps=3", "train.global_batch=8",
                     "eval.num_samples=1", "eval.sampling.max_new_tokens=48"]) == 0
    again = [json.loads(line) for line in (work / "responses.jsonl").read_text().splitlines()]
    assert len(again) == len(responses)
