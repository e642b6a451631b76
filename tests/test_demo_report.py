"""The demo's closing report: stage table, losses and accuracy read back from the stages' files, pictures."""

import io
import json

import numpy as np

from lt_jax import demo_report
from lt_jax.demo_report import StageRecord


def test_stage_table_lists_counts_and_total():
    table = demo_report.stage_table([StageRecord("5. grade", 3.8, 8000, 8000), StageRecord("6. select", 1.2, 8000, 1961),
                                     StageRecord("4. tokenizer", 2.0)])
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "in", "out", "seconds"]
    assert lines[2].split() == ["6.", "select", "8000", "1961", "1.2"]
    assert lines[3].split() == ["4.", "tokenizer", "-", "-", "2.0"]
    assert lines[-1].split() == ["total", "7.0"]


def test_losses_and_accuracy_read_back(tmp_path):
    rows = [{"step": 1, "kind": "train", "loss": 6.0}, {"step": 2, "kind": "train", "loss": 3.0},
            {"step": 2, "kind": "eval", "eval_loss": 3.5}, {"kind": "run"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert demo_report.read_losses(str(tmp_path / "metrics.jsonl")) == {"train": [(1, 6.0), (2, 3.0)], "eval": [(2, 3.5)]}
    assert demo_report.read_losses(str(tmp_path / "missing.jsonl")) == {"train": [], "eval": []}
    by_level = {"level": {"10": {"n": 4, "pass@1": 0.25}, "2": {"n": 4, "pass@1": 1.0}}}
    summary = {"runs": {"before": {"heldout": {"pass@1": 0.0, "by_meta": {}}},
                        "after": {"heldout": {"pass@1": 0.625, "by_meta": by_level}, "other": {"pass@1": 1.0}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    acc = demo_report.accuracy_by_level(str(tmp_path / "summary.json"))
    # levels in numeric order (2 before 10), overall first
    assert acc == {"before": {"all": 0.0}, "after": {"all": 0.625, "level 2": 1.0, "level 10": 0.25}}
    assert list(acc["after"]) == ["all", "level 2", "level 10"]
    assert demo_report.accuracy_lines(acc)[1] == "held-out pass@1 after: all 62.5%, level 2 100.0%, level 10 25.0%"


def _image(png: bytes) -> np.ndarray:
    import matplotlib.image

    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(io.BytesIO(png), format="png")


def test_pictures_are_drawn():
    loss = _image(demo_report.loss_curve_png({"selected": {"train": [(1, 6.0), (2, 0.5)], "eval": [(2, 0.7)]},
                                              "unfiltered": {"train": [(1, 6.0), (2, 0.9)], "eval": []}}))
    acc = _image(demo_report.accuracy_png({"before": {"all": 0.004, "level 2": 0.0}, "after": {"all": 0.6, "level 2": 0.9}}))
    for img in (loss, acc):
        assert img.shape[0] > 300 and img.shape[1] > 500
        assert np.unique(img.reshape(-1, img.shape[-1]), axis=0).shape[0] > 20  # more than a blank canvas


def test_small_values_get_a_readable_label(monkeypatch):
    """A 0.4% bar is invisible at this scale, so every bar carries its value as text."""
    import matplotlib.axes

    labels = []
    real = matplotlib.axes.Axes.bar_label
    monkeypatch.setattr(matplotlib.axes.Axes, "bar_label",
                        lambda self, bars, labels_=None, **kw: labels.append(kw.get("labels")) or real(self, bars, **kw))
    demo_report.accuracy_png({"before": {"all": 0.004, "level 2": 0.0}, "after": {"all": 0.6, "level 2": 0.9}})
    assert labels == [["0.4", "0.0"], ["60.0", "90.0"]]
