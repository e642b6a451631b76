"""Fixtures for the data-stage tests (formats, grading, selection, dedup, synthetic task).

Helpers are handed out as fixtures rather than imported: several test folders have a conftest.py,
so `from conftest import ...` would pick whichever was imported first.
"""

from __future__ import annotations

import json
import os

import pytest
from token_data import random_data  # noqa: F401  (a fixture shared with tests/train)

# The eval sets shipped in lt_jax/eval/data with the field that holds their problem text.
BENCHMARKS = {
    "aime24": ("aime24/test.jsonl", "problem"),
    "aime25": ("aime25/aime25.jsonl", "question"),
    "math500": ("math500/test.jsonl", "problem"),
    "cn_math_2024": ("cn_math_2024/test.jsonl", "problem"),
}


class JsonlFiles:
    """Plain JSONL reading and writing, independent of the code under test."""

    @staticmethod
    def write(path, rows, *, tail: bytes = b"") -> str:
        """Writes rows as JSON lines, then raw `tail` bytes (for torn or invalid lines)."""
        with open(path, "wb") as f:
            for r in rows:
                f.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            f.write(tail)
        return str(path)

    @staticmethod
    def read(path) -> list[dict]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="session")
def jl() -> type[JsonlFiles]:
    return JsonlFiles


@pytest.fixture(scope="session")
def benchmark_specs(benchmark_data_dir) -> list[str]:
    """"PATH:FIELD" decontamination specs for the math eval sets."""
    return [os.path.join(benchmark_data_dir, rel) + f":{field}" for rel, field in BENCHMARKS.values()]


@pytest.fixture(scope="session")
def benchmark_items(benchmark_data_dir):
    """{name: [(problem text, answer), ...]} for the math eval sets."""
    out = {}
    for name, (rel, field) in BENCHMARKS.items():
        with open(os.path.join(benchmark_data_dir, rel), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out[name] = [(r[field], str(r["answer"])) for r in rows]
    return out
