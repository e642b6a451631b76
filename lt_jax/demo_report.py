"""The demo's closing report: a table of the stages, a loss curve and held-out accuracy by level.

Pure readers of the files the stages wrote (metrics.jsonl, the eval summary.json) plus two
matplotlib figures, so the demo's last lines can point at pictures a newcomer can open.
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Optional, Sequence

import numpy as np

from lt_jax import storage


@dataclasses.dataclass(frozen=True)
class StageRecord:
    """One demo stage: how long it took and how many records went in and came out (None: n/a)."""

    name: str
    seconds: float
    records_in: Optional[int] = None
    records_out: Optional[int] = None


def stage_table(stages: Sequence[StageRecord]) -> str:
    """A fixed-width text table of the stages, with the total time."""

    def cell(n: Optional[int]) -> str:
        return "-" if n is None else str(n)

    width = max([len(s.name) for s in stages] + [5])
    lines = [f"{'stage':<{width}}  {'in':>8}  {'out':>8}  {'seconds':>8}"]
    lines += [f"{s.name:<{width}}  {cell(s.records_in):>8}  {cell(s.records_out):>8}  {s.seconds:>8.1f}" for s in stages]
    lines.append(f"{'total':<{width}}  {'':>8}  {'':>8}  {sum(s.seconds for s in stages):>8.1f}")
    return "\n".join(lines)


def read_losses(metrics_path: str) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "eval": [(step, eval_loss)]} from a training run's metrics.jsonl."""
    out: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    if not storage.exists(metrics_path):
        return out
    for line in storage.read_text(metrics_path).splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "step" not in row:
            continue
        if "loss" in row and row.get("kind", "train") == "train":
            out["train"].append((int(row["step"]), float(row["loss"])))
        if "eval_loss" in row:
            out["eval"].append((int(row["step"]), float(row["eval_loss"])))
    return out


def accuracy_by_level(summary_path: str, benchmark: str = "heldout") -> dict[str, dict[str, float]]:
    """{run: {"all": pass@1, "level 2": pass@1, ...}} from an eval summary.json."""
    if not storage.exists(summary_path):
        return {}
    runs = json.loads(storage.read_text(summary_path)).get("runs", {})
    out: dict[str, dict[str, float]] = {}
    for run, benches in runs.items():
        if benchmark not in benches:
            continue
        s = benches[benchmark]
        row = {f"level {lv}": v["pass@1"] for lv, v in sorted(s.get("by_meta", {}).get("level", {}).items(), key=lambda kv: int(kv[0]))}
        out[run] = {"all": s["pass@1"], **row}
    return out


def _figure_bytes(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg")

    return plt


def loss_curve_png(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes:
    """Training (solid) and eval (dashed) loss per step, one colour per training run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (run, losses) in enumerate(curves.items()):
        colour = f"C{i}"
        if losses["train"]:
            steps, values = zip(*losses["train"])
            ax.plot(steps, values, color=colour, label=f"{run}: train loss")
        if losses["eval"]:
            steps, values = zip(*losses["eval"])
            ax.plot(steps, values, color=colour, linestyle="--", marker="o", label=f"{run}: eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per trained token)")
    ax.set_yscale("log")
    ax.set_title("Training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _figure_bytes(fig)


def accuracy_png(acc: dict[str, dict[str, float]]) -> bytes:
    """Held-out pass@1 per run and level as grouped bars, each labelled with its value.

    Labels sit on every bar, so a value of 0.5% is still readable next to one of 60%.
    """
    plt = _pyplot()
    groups = list(dict.fromkeys(g for per_run in acc.values() for g in per_run))
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups) + 3), 4.2))
    width = 0.8 / max(len(acc), 1)
    x = np.arange(len(groups))
    for i, (run, per_run) in enumerate(acc.items()):
        values = [100 * per_run.get(g, 0.0) for g in groups]
        bars = ax.bar(x + (i - (len(acc) - 1) / 2) * width, values, width, label=run, color=f"C{i}")
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(x, groups)
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out pass@1 (%)")
    ax.set_title("Held-out accuracy by level")
    ax.legend(fontsize=8)
    return _figure_bytes(fig)


def accuracy_lines(acc: dict[str, dict[str, float]]) -> list[str]:
    """One printable line per run: overall pass@1, then each level's."""
    return [f"held-out pass@1 {run}: " + ", ".join(f"{g} {v:.1%}" for g, v in per_run.items()) for run, per_run in acc.items()]
