"""Summaries and reports: per-benchmark metrics, a JSON summary, a Markdown table and a PNG plot.

Every benchmark summary has a ``headline`` ({"name", "value"[, "std"]}, higher is better) used for
the comparison table and the bar chart: pass@1 for math, the CORRECT share for Chinese SimpleQA,
the SAFE share for safety sets and the NOT_SYCOPHANTIC share for the sycophancy probe.
"""

from __future__ import annotations

import io
from collections import defaultdict
from typing import Any, Sequence

import numpy as np

from lt_jax import storage
from lt_jax.data import jsonl
from lt_jax.eval import metrics

MAX_GROUPS = 20  # meta fields with more distinct values than this get no breakdown


def summarize_math(records: Sequence[dict], n: int) -> dict[str, Any]:
    """Metrics of a math benchmark from its per-problem records (see metrics.py for definitions)."""
    correct = np.array([[bool(s["correct"]) for s in r["samples"]] for r in records], dtype=np.float64)
    tokens = np.array([[s["num_tokens"] for s in r["samples"]] for r in records], dtype=np.float64)
    keys = [[s.get("vote_key") for s in r["samples"]] for r in records]
    finish = [s["finish_reason"] for r in records for s in r["samples"]]
    p1 = metrics.pass1_stats(correct)
    out: dict[str, Any] = {
        "kind": "math",
        "num_items": len(records),
        "samples_per_item": n,
        "pass@1": p1["mean"],
        "pass@1_std": p1["std"],
        "pass@1_stderr": p1["stderr"],
        "pass@1_runs": p1["runs"],
        "pass@k": {str(k): metrics.mean_pass_at_k(correct, k) for k in metrics.default_ks(n)},
        f"maj@{n}": metrics.maj_at_k(keys, correct),
        "mean_tokens": metrics.mean_tokens_by_outcome(correct, tokens),
        "cutoff_share": metrics.cutoff_share(finish),
        "generation_errors": sum(f == "error" for f in finish),
        "no_answer_share": float(np.mean([k is None for row in keys for k in row])),
        "by_meta": _breakdown(records, correct),
    }
    out["headline"] = {"name": "pass@1", "value": p1["mean"], "std": p1["std"]}
    return out


def _breakdown(records: Sequence[dict], correct: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """pass@1 per value of each meta field (e.g. MATH-500 subject and level)."""
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(records):
        for key, value in (r.get("meta") or {}).items():
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                groups[key][str(value)].append(i)
    out = {}
    for key, by_value in sorted(groups.items()):
        if len(by_value) > MAX_GROUPS:
            continue
        out[key] = {v: {"n": len(idx), "pass@1": float(correct[idx].mean())} for v, idx in sorted(by_value.items())}
    return out


def item_rows(records: Sequence[dict], kind: str) -> list[dict[str, Any]]:
    """Per-problem results for items.jsonl."""
    rows = []
    for r in records:
        samples = r["samples"]
        row: dict[str, Any] = {"id": r["id"], "n": len(samples),
                               "mean_tokens": float(np.mean([s["num_tokens"] for s in samples])),
                               "cutoff": sum(s["finish_reason"] == "length" for s in samples)}
        if kind in ("math", "multiple_choice", "code"):  # right/wrong per sample (harness.SAMPLED_KINDS)
            winner = metrics.majority_vote([s.get("vote_key") for s in samples])
            row |= {"reference": r.get("reference"), "num_correct": r["num_correct"],
                    "pass_rate": r["num_correct"] / len(samples),
                    "majority_answer": None if winner is None else samples[winner].get("extracted"),
                    "majority_correct": bool(winner is not None and samples[winner]["correct"])}
        else:
            row["labels"] = [s.get("label") for s in samples]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Reports over runs x benchmarks


def write_reports(out_dir: str, result: dict[str, Any], lengths: dict[str, list[int]]) -> None:
    """Writes summary.json, results.md and results.png into `out_dir` (local or gs://)."""
    jsonl.write_json(storage.join(out_dir, "summary.json"), result)
    storage.write_text(storage.join(out_dir, "results.md"), markdown(result["runs"]))
    storage.write_bytes(storage.join(out_dir, "results.png"), plot_png(result["runs"], lengths))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _headline_cell(s: dict[str, Any]) -> str:
    h = s["headline"]
    return _pct(h["value"]) + (f" ± {100 * h['std']:.1f}" if h.get("std") is not None else "")


def markdown(runs: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One comparison table (runs x benchmarks, headline metric in %), then a detail table per benchmark."""
    benches = list(dict.fromkeys(b for per_run in runs.values() for b in per_run))
    first = {b: _first(runs, b) for b in benches}
    lines = ["# Evaluation results", "", "Numbers are percentages; pass@1 is the mean over samples ± the std across sample-index runs.", ""]
    lines.append("| run | " + " | ".join(f"{b} ({first[b]['headline']['name']})" for b in benches) + " |")
    lines.append("|---|" + "---|" * len(benches))
    for run, per_run in runs.items():
        cells = [_headline_cell(per_run[b]) if b in per_run else "-" for b in benches]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    for b in benches:
        lines += ["", *_detail_table(b, {run: per_run[b] for run, per_run in runs.items() if b in per_run})]
    return "\n".join(lines) + "\n"


def _detail_table(bench: str, per_run: dict[str, dict[str, Any]]) -> list[str]:
    s0 = next(iter(per_run.values()))
    head = f"## {bench} ({s0['kind']}, {s0['num_items']} items x {s0['samples_per_item']} samples)"
    if "pass@k" in s0:  # math, multiple choice, code
        n = s0["samples_per_item"]
        ks = list(s0["pass@k"])
        cols = ["pass@1", "std", f"maj@{n}", *[f"pass@{k}" for k in ks if k != "1"],
                "tokens (correct)", "tokens (wrong)", "cut off", "no answer"]
        rows = []
        for run, s in per_run.items():
            mt = s["mean_tokens"]
            rows.append([run, _pct(s["pass@1"]), _pct(s["pass@1_std"]), _pct(s.get(f"maj@{n}")),
                         *[_pct(s["pass@k"][k]) for k in ks if k != "1"],
                         _tokens(mt["correct"]), _tokens(mt["incorrect"]), _pct(s["cutoff_share"]),
                         _pct(s.get("no_answer_share"))])
    else:
        cols = [*s0["scores"], "mean tokens", "cut off", "judge errors"]
        rows = [[run, *[_pct(v) for v in s["scores"].values()], _tokens(s["mean_tokens"]),
                 _pct(s["cutoff_share"]), str(s["judge_errors"])] for run, s in per_run.items()]
    out = [head, "", "| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _tokens(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def plot_png(runs: dict[str, dict[str, dict[str, Any]]], lengths: dict[str, list[int]]) -> bytes:
    """Headline metric per benchmark and run (bars, std as error bars), and response-length histograms."""
    import matplotlib  # here, not at the top: the Agg backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after matplotlib.use("Agg")

    benches = list(dict.fromkeys(b for per_run in runs.values() for b in per_run))
    fig, (ax_bar, ax_len) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(benches) + 6), 5))
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(benches))
    for i, (run, per_run) in enumerate(runs.items()):
        vals = [100 * per_run[b]["headline"]["value"] if b in per_run else 0.0 for b in benches]
        errs = [100 * (per_run[b]["headline"].get("std") or 0.0) if b in per_run else 0.0 for b in benches]
        ax_bar.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, yerr=errs, capsize=3, label=run)
    ax_bar.set_xticks(x, [f"{b}\n{_first(runs, b)['headline']['name']}" for b in benches], fontsize=8)
    ax_bar.set_ylabel("%")
    ax_bar.set_ylim(0, 100)
    ax_bar.set_title("Accuracy (headline metric)")
    ax_bar.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(runs), 4), frameon=False)
    all_lengths = [v for vals in lengths.values() for v in vals]
    if all_lengths:
        bins = np.linspace(0, max(all_lengths) + 1, 31)
        for run, vals in lengths.items():
            ax_len.hist(vals, bins=bins, histtype="step", linewidth=1.5, label=run)
        ax_len.legend(fontsize=8)
    else:
        ax_len.text(0.5, 0.5, "no math benchmarks", ha="center", va="center", transform=ax_len.transAxes)
    ax_len.set_xlabel("output tokens per sample (math benchmarks)")
    ax_len.set_ylabel("samples")
    ax_len.set_title("Response length")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _first(runs: dict[str, dict[str, dict[str, Any]]], bench: str) -> dict[str, Any]:
    return next(per_run[bench] for per_run in runs.values() if bench in per_run)
