"""The demo end to end on a shrunken tiny.yaml: every stage runs and hands its files to the next.

The full demo's accuracy (README) is a benchmark figure; here a short run checks the plumbing, that
the loss falls, and that the model after SFT is not worse on the held-out split than before.
"""

import json
import math
import os

import pytest

from lt_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["synthetic.num_problems=60", "synthetic.num_heldout=9", "train.steps=40", "train.global_batch=8",
         "eval.num_samples=1", "eval.sampling.max_new_tokens=48", "demo.ablation=true"]


def _demo(work) -> int:
    return cli.main(["demo", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"demo.workdir={work}", *SMALL])


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    work = tmp_path / "demo"
    assert _demo(work) == 0
    out = capsys.readouterr().out
    # Every stage, in order, as its own heading, each lt-jax stage followed by the command it ran.
    lines = out.splitlines()
    headings = [(i, line[4:]) for i, line in enumerate(lines) if line.startswith("=== ")]
    expected = [("1. synthetic", "synthetic"), ("2. teacher", None), ("2-3. distill", "distill"), ("4. tokenizer", None),
                ("5. grade", "grade"), ("6. select", "select"), ("7. tokenize", "tokenize"), ("8. train", "train"),
                ("8b. ablation: select", "select"), ("8b. ablation: tokenize", "tokenize"),
                ("8b. ablation: train", "train"), ("9. eval", "eval"), ("10. export", "export-hf"), ("demo finished", None)]
    assert len(headings) == len(expected), [h for _, h in headings]
    for (i, heading), (title, command) in zip(headings, expected):
        assert heading.startswith(title), (heading, title)
        if command:
            assert lines[i + 1].startswith(f"$ lt-jax {command} "), lines[i + 1]
    # Distilled over HTTP: one record per (problem, sample), all answered.
    responses = [json.loads(line) for line in (work / "responses.jsonl").read_text().splitlines()]
    assert len(responses) == 60 * 4 and all(r["status"] == "ok" for r in responses)
    assert len({(r["problem_id"], r["sample_index"]) for r in responses}) == len(responses)
    # Selection dropped the failing responses of high-CV problems and said so; the ablation kept them.
    report = json.loads((work / "sft.report.json").read_text())
    sft = (work / "sft.jsonl").read_text().splitlines()
    assert report["records_in"] == len(responses) and len(sft) == report["records_out"] < len(responses)
    assert report["dropped"]["failing_response_high_cv"] > 0
    unfiltered = (work / "sft_unfiltered.jsonl").read_text().splitlines()
    assert len(unfiltered) == len(responses)  # nothing selected away (the held-out split shares no problem)
    manifest = json.loads((work / "tokens" / "train" / "manifest.json").read_text())
    assert manifest["num_records"] == len(sft)
    # From a random init the first loss is about ln(vocab), and it falls clearly; both runs take as many steps.
    for run, folder in (("selected", "train"), ("unfiltered", "train_unfiltered")):
        records = [json.loads(line) for line in (work / folder / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
        assert sorted(losses) == list(range(1, 41)), (run, sorted(losses))
        assert abs(losses[1] - math.log(512)) < 1.0 and losses[40] < 0.6 * losses[1], (run, losses)
        assert f"train loss ({run} data): {losses[1]:.3f} at step 1 -> {losses[40]:.3f} at step 40" in out
    summary = json.loads((work / "eval" / "summary.json").read_text())
    assert set(summary["runs"]) == {"before", "after", "unfiltered"}
    acc = {name: benches["heldout"]["pass@1"] for name, benches in summary["runs"].items()}
    assert acc["after"] >= acc["before"], acc
    for name, benches in summary["runs"].items():
        by_level = benches["heldout"]["by_meta"]["level"]
        assert sorted(by_level) == ["2", "3", "4"] and sum(v["n"] for v in by_level.values()) == 9
        assert f"held-out pass@1 {name}: all {acc[name]:.1%}, level 2 " in out
    # The closing lines: a table of the stages with their counts, and the pictures.
    table = out[out.index("stage ") :].splitlines()
    assert table[1].split()[-3:-1] == ["-", "60"] and any(r.startswith("6. select") and r.split()[-3] == str(len(responses)) for r in table)
    for picture in ("loss.png", "accuracy.png"):
        assert (work / picture).read_bytes()[:4] == b"\x89PNG" and str(work / picture) in out
    assert (work / "hf" / "model.safetensors").exists() and (work / "hf" / "chat_template.jinja").exists()
    # A rerun resumes: every stage finds its work done and the demo still succeeds.
    assert _demo(work) == 0
    again = [json.loads(line) for line in (work / "responses.jsonl").read_text().splitlines()]
    assert len(again) == len(responses)
