"""The "code" verifier: a response's final code block run against the query's tests in the sandbox.

Score = the fraction of the first `max_tests` tests passed (DeepDistill: first <= 10; a response
passes above 0.99, i.e. all of them). Test cases come from the record's `tests` field (a list, or
that list as a JSON string), each either

- ``{"input": "...", "output": "..."}``: stdin/stdout; the output is compared token by token after
  splitting on whitespace, numbers within `float_tol` (relative or absolute) counting as equal;
- ``{"assert": "assert f(2) == 4"}`` or a bare string: assert style (Python); the test code is
  appended to the program and passes when the run exits 0.

Language: the code fence's tag (```python / ```cpp ...), else the record's `language`, else
`default_language`. Python runs as `python -I main.py`; C++ is compiled once (g++, inside the
sandbox too) and the binary runs per test. Each test is one sandbox step (fresh process, limits);
all of a response's tests share one sandbox job. Responses grade in parallel through `lt-jax grade
--workers N` (processes) or `verify_many` (threads); both draw uids from the sandbox's slot pool.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import re
import shutil
from typing import Any, Sequence

from lt_jax.data import sandbox
from lt_jax.data.verify import Verdict, register_verifier

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_LANGS = {"python": "python", "py": "python", "python3": "python", "cpp": "cpp", "c++": "cpp", "cc": "cpp",
          "cxx": "cpp"}


@dataclasses.dataclass(frozen=True)
class CodeVerifyConfig:
    max_tests: int = 10
    default_language: str = "python"
    float_tol: float = 1e-6
    python: str | None = None  # default: sandbox.default_python()
    cxx: str = "g++"
    cxx_flags: tuple[str, ...] = ("-O2", "-std=c++17")
    sandbox: sandbox.SandboxConfig = sandbox.SandboxConfig()

    def __post_init__(self) -> None:
        if self.max_tests < 1:
            raise ValueError(f"code.max_tests must be >= 1, got {self.max_tests}")
        if self.default_language not in ("python", "cpp"):
            raise ValueError(f"code.default_language must be python or cpp, got {self.default_language!r}")


CODE_OPTIONS = CodeVerifyConfig()


@dataclasses.dataclass(frozen=True)
class TestCase:
    input: str | None = None
    output: str | None = None
    assert_code: str | None = None


def extract_code(text: str) -> tuple[str | None, str] | None:
    """(language tag or None, code) of the LAST fenced block in `text`, or None when there is none."""
    blocks = _FENCE.findall(text or "")
    if not blocks:
        return None
    tag, code = blocks[-1]
    return _LANGS.get(tag.lower()), code


def parse_tests(raw: Any) -> list[TestCase]:
    """The record's `tests` value as TestCases; raises ValueError saying what is wrong."""
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, list):
        raise ValueError(f"tests must be a list, got {type(raw).__name__}")
    out = []
    for i, t in enumerate(raw):
        if isinstance(t, str):
            out.append(TestCase(assert_code=t))
        elif isinstance(t, dict) and isinstance(t.get("assert"), str):
            out.append(TestCase(assert_code=t["assert"]))
        elif isinstance(t, dict) and "input" in t and "output" in t:
            out.append(TestCase(input=str(t["input"]), output=str(t["output"])))
        else:
            raise ValueError(f"tests[{i}]: expected {{input, output}}, {{assert}} or a string, got {str(t)[:80]!r}")
    return out


def _number(tok: str) -> float | None:
    try:
        return float(tok)
    except ValueError:
        return None


def outputs_match(got: str, want: str, float_tol: float = 1e-6) -> bool:
    """Token-wise equality over whitespace-split output; numeric tokens within float_tol."""
    a, b = got.split(), want.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        fx, fy = _number(x), _number(y)
        if fx is None or fy is None or not math.isclose(fx, fy, rel_tol=float_tol, abs_tol=float_tol):
            return False
    return True


def _steps(lang: str, code: str, tests: Sequence[TestCase], cfg: CodeVerifyConfig) -> tuple[dict, list[sandbox.Step]]:
    lim = cfg.sandbox.run
    if lang == "python":
        py = cfg.python or sandbox.default_python()
        files, steps = {}, []
        for i, t in enumerate(tests):
            if t.assert_code is not None:
                files[f"t{i}.py"] = f"{code}\n\n{t.assert_code}\n"
                steps.append(sandbox.Step((py, "-I", f"t{i}.py"), "", lim))
            else:
                files.setdefault("main.py", code)
                steps.append(sandbox.Step((py, "-I", "main.py"), t.input or "", lim))
        return files, steps
    if any(t.assert_code is not None for t in tests):
        raise ValueError("assert-style tests are Python only; C++ takes stdin/stdout tests")
    cxx = shutil.which(cfg.cxx)
    if cxx is None:
        raise ValueError(f"C++ code but no compiler {cfg.cxx!r} on PATH")
    build = sandbox.Step((cxx, *cfg.cxx_flags, "-o", "main", "main.cpp"), "", cfg.sandbox.compile, required=True)
    return {"main.cpp": code}, [build] + [sandbox.Step(("./main",), t.input or "", lim) for t in tests]


def run_tests(lang: str, code: str, tests: Sequence[TestCase], cfg: CodeVerifyConfig = CODE_OPTIONS) -> tuple[int, list[str]]:
    """(tests passed, one outcome word per test) for `code` over `tests`."""
    files, steps = _steps(lang, code, tests, cfg)
    results = sandbox.run_job(files, steps, cfg.sandbox)
    if lang == "cpp":
        build, results = results[0], results[1:]
        if not build.ok:
            return 0, ["compile_error"] * len(tests)
    outcomes = []
    for t, r in zip(tests, results):
        if r.over_time:
            outcomes.append("timeout")
        elif r.output_capped:
            outcomes.append("output_limit")
        elif r.returncode != 0:
            outcomes.append("runtime_error")
        elif t.assert_code is None and not outputs_match(r.stdout, t.output or "", cfg.float_tol):
            outcomes.append("wrong_answer")
        else:
            outcomes.append("passed")
    return outcomes.count("passed"), outcomes


def verify_code(answer_text: str, record: dict[str, Any], cfg: CodeVerifyConfig) -> Verdict:
    """Scores the final code block of `answer_text` against `record["tests"]`."""
    block = extract_code(answer_text)
    if block is None:
        return Verdict(0.0, None, "no code block")
    tag, code = block
    lang = tag or _LANGS.get(str(record.get("language") or "").lower()) or cfg.default_language
    if record.get("tests") in (None, "", []):
        return Verdict(0.0, lang, "no tests")
    try:
        tests = parse_tests(record["tests"])[: cfg.max_tests]
        passed, outcomes = run_tests(lang, code, tests, cfg)
    except (ValueError, json.JSONDecodeError) as e:
        return Verdict(0.0, lang, f"bad tests: {e}"[:200])
    worst = next((o for o in outcomes if o != "passed"), None)
    return Verdict(passed / len(tests), lang, None if worst is None else f"code {worst}")


def code_verifier(answer_text: str, reference: str | None, record: dict[str, Any]) -> Verdict:
    """The registered "code" verifier (options: CODE_OPTIONS, set per grading worker)."""
    return verify_code(answer_text, record, CODE_OPTIONS)


def verify_many(items: Sequence[tuple[str, dict[str, Any]]], cfg: CodeVerifyConfig = CODE_OPTIONS,
                workers: int = 8) -> list[Verdict]:
    """(answer text, record) pairs graded `workers` at a time; results in input order."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda it: verify_code(it[0], it[1], cfg), items))


register_verifier("code", code_verifier)
