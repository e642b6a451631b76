"""tools/attention_memory.py at a small shape: the softmax-stats rows grow linearly in M from the
compiled stand-in's memory_analysis, and the GQA-option lines are printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_small_run_reports_stats_linear_in_segments():
    proc = subprocess.run(
        [sys.executable, "tools/attention_memory.py", "--seq", "1024", "--heads", "8", "--kv-heads", "2",
         "--dim", "64", "--layers", "4", "--time-seq", "256"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert proc.returncode == 0, proc.stderr
    rows = {int(m): float(mib) for m, mib in re.findall(r"^\s+(\d+)\s+([\d.]+) MiB", proc.stdout, re.M)}
    per_slot = 1024 * 8 * 4 / 2**20  # T * Nq fp32 values per segment slot
    assert rows and all(abs(mib - m * per_slot) < 0.05 for m, mib in rows.items()), proc.stdout
    assert "(a) pre-scaled k/v offsets" in proc.stdout and "(b) repeat k/v to 8 heads" in proc.stdout
