"""Code benchmarks (LiveCodeBench-style): each sample's final code block through the code verifier.

A file row holds the problem text, its `tests` (as lt_jax.data.code_verify reads them: stdin/stdout
pairs, or assert lines for Python) and optionally `language` (python | cpp). A sample scores the
fraction of the first `code.max_tests` tests it passes in the sandbox and is correct when it
passes (`verify.passes`, domain code: all of them). The samples of a batch run `workers` at a time.
"""

from __future__ import annotations

from typing import Any, Sequence

from lt_jax.data import code_verify, verify

from lt_jax.eval.answer import final_answer
from lt_jax.eval.benchmarks import Item

PROMPT = ("{problem}\n\nSolve this in Python. Give the complete program, which reads standard input and writes "
          "standard output, in one ```python code block at the end of your reply.")


class CodeScorer:
    def __init__(self, cfg: Any = None, workers: int = 8):
        self.cfg = cfg or code_verify.CODE_OPTIONS
        self.workers = workers

    def score(self, items: Sequence[Item], completions: Sequence[Sequence[Any]]) -> list[list[dict]]:
        jobs = [(final_answer(c), {"tests": it.meta.get("tests"), "language": it.meta.get("language")})
                for it, comps in zip(items, completions) for c in comps]
        verdicts = iter(code_verify.verify_many(jobs, self.cfg, self.workers))
        out = []
        for comps in completions:
            row = []
            for _ in comps:
                v = next(verdicts)
                row.append({"correct": verify.passes(v.score, "code"), "score": v.score, "extracted": v.extracted,
                            "vote_key": None, "verify_note": v.note})
            out.append(row)
        return out
