"""The demo end to end on a shrunken tiny.yaml: every stage runs and hands its files to the next."""

import json
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
    for step in ("1. synthetic", "2. teacher", "distill", "4. tokenizer", "5. grade", "6. select", "7. tokenize",
                 "8. train", "9. eval", "10. export"):
        assert f"=== {step}" in out or step in out, step
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
    losses = [json.loads(line)["loss"] for line in (work / "train" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) >= 2
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert set(summary["runs"]) == {"before", "after"}
    assert (work / "hf" / "model.safetensors").exists() and (work / "hf" / "chat_template.jinja").exists()
    # A rerun resumes: every stage finds its work done and the demo still succeeds.
    assert cli.main(["demo", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"demo.workdir={work}",
                     "synthetic.num_problems=40", "synthetic.num_heldout=8", "train.steps=3", "train.global_batch=8",
                     "eval.num_samples=1", "eval.sampling.max_new_tokens=48"]) == 0
    again = [json.loads(line) for line in (work / "responses.jsonl").read_text().splitlines()]
    assert len(again) == len(responses)
