"""Every data stage reads the same inputs the same way (formats.read_rows), and bad input is a located,
counted drop (or a strict-mode error) with the good rows kept, never a traceback."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lt_jax import cli
from lt_jax.data import distill
from lt_jax.data import tokenize as tk

from faulty_teacher import FaultyTeacher  # tests/ is on sys.path (conftest.py)

DEEP = b"[" * 100_000 + b"\n"  # Python's json parser recurses once per level


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(tmp_path_factory):
    from lt_jax.data.tiny_tokenizer import build_tokenizer

    texts = [f"What is {i} + {i}? It is {2 * i}. question answer" for i in range(50)]
    return build_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300)


def graded_rows(n: int) -> list[dict]:
    return [{"problem_id": f"p{i}", "sample_index": 0, "prompt": f"What is {i} + {i}?",
             "response": f"<think>add</think>The answer is \\boxed{{{2 * i}}}.", "reference_answer": str(2 * i),
             "status": "ok"} for i in range(n)]


def sft_rows(n: int) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                         {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(n)]


def lines(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def truncated_gz(path, rows: list[dict]) -> str:
    """A .jsonl.gz cut mid-stream (a killed upload): the first rows decompress, then EOF."""
    pad = {"pad": random.Random(0).randbytes(100_000).hex()}  # incompressible, so the cut lands in it
    whole = gzip.compress(lines(rows) + lines([pad]), mtime=0)
    with open(path, "wb") as f:
        f.write(whole[: len(whole) * 2 // 3])
    return str(path)


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("strict", [False, True])
def test_deeply_nested_line_is_a_located_drop_in_grade_select_tokenize(tmp_path, capsys, strict, tiny_tokenizer_dir):
    graded = tmp_path / "graded.jsonl"
    graded.write_bytes(lines(graded_rows(2)) + DEEP + lines(graded_rows(3)[2:]))
    flag = ["--strict"] if strict else []
    out = tmp_path / "out.jsonl"
    code = run_cli("grade", "--in", graded, "--out", out, "--no-progress", *flag)
    err = capsys.readouterr()
    if strict:
        assert code == 2 and f"{graded}:3" in err.err and "nested too deeply" in err.err
    else:
        assert code == 0 and "invalid_json: 1" in err.out and f"{graded}:3" in err.out
        assert len(out.read_text().splitlines()) == 3
    code = run_cli("select", "--in", graded, "--out", tmp_path / "sft.jsonl", "graded=false", *flag)
    err = capsys.readouterr()
    assert (code, f"{graded}:3" in (err.err if strict else err.out)) == (2 if strict else 0, True)
    sft = tmp_path / "sft_in.jsonl"
    sft.write_bytes(lines(sft_rows(2)) + DEEP + lines(sft_rows(3)[2:]))
    code = run_cli("tokenize", "--in", sft, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "tok",
                   "--workers", "1", "--no-progress", *flag)
    err = capsys.readouterr()
    if strict:
        assert code == 2 and f"{sft}:3: invalid_json" in err.err
    else:
        assert code == 0 and "3 records" in err.out and f"{sft}:3" in err.out


def test_truncated_gzip_keeps_what_was_read_and_writes_the_report(tmp_path, capsys):
    rows = graded_rows(50)
    path = truncated_gz(tmp_path / "graded.jsonl.gz", rows)
    assert run_cli("grade", "--in", path, "--out", tmp_path / "g.jsonl", "--no-progress") == 0
    out = capsys.readouterr().out
    graded = (tmp_path / "g.jsonl").read_text().splitlines()
    assert len(graded) == 50 and "truncated_gzip: 1" in out
    report = json.loads((tmp_path / "g.report.json").read_text())
    assert report["dropped_input"]["by_reason"] == {"truncated_gzip": 1}
    assert run_cli("select", "--in", path, "--out", tmp_path / "sft.jsonl", "graded=false") == 0
    report = json.loads((tmp_path / "sft.report.json").read_text())
    assert report["dropped"]["bad_input:truncated_gzip"] == 1 and report["records_in"] == 51
    assert run_cli("grade", "--in", path, "--out", tmp_path / "g2.jsonl", "--strict", "--no-progress") == 2
    assert "graded.jsonl.gz:51" in capsys.readouterr().err


def test_tokenize_reads_what_formats_reads(tmp_path, capsys, tiny_tokenizer_dir):
    """.jsonl.gz, Parquet, JSON and a UTF-8 BOM: the same rows out as from plain JSONL."""
    rows = sft_rows(5)
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(lines(rows))
    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(lines(rows)))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines(rows))
    parquet = str(tmp_path / "in.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    as_json = tmp_path / "in.json"
    as_json.write_text(json.dumps(rows))

    def ids(path):
        cfg = tk.TokenizeConfig(inputs=(str(path),), tokenizer=tiny_tokenizer_dir, out=str(tmp_path / ("out-" + os.path.basename(str(path)))), workers=1)
        m = tk.tokenize(cfg, progress=False)
        assert m["drops"]["total"] == 0, (path, m["drops"])
        from lt_jax.data.source import TokenizedSource

        src = TokenizedSource(cfg.out)
        return [r["input_ids"].tolist() for r in src.read_batch(range(len(src)))]

    want = ids(plain)
    assert len(want) == 5
    for path in (gz, bom, parquet, as_json):
        assert ids(path) == want, path


def test_bom_keeps_the_first_row_in_grade_and_distill(tmp_path, capsys):
    graded = tmp_path / "graded.jsonl"
    graded.write_bytes(b"\xef\xbb\xbf" + lines(graded_rows(3)))
    assert run_cli("grade", "--in", graded, "--out", tmp_path / "g.jsonl", "--no-progress") == 0
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 3
    problems = tmp_path / "p.jsonl.gz"
    problems.write_bytes(gzip.compress(b"\xef\xbb\xbf" + lines([{"id": i, "problem": f"q{i}"} for i in range(3)])))
    assert [p.id for p in distill.read_problems(str(problems))] == ["0", "1", "2"]
    parquet = str(tmp_path / "p.parquet")
    pq.write_table(pa.Table.from_pylist([{"id": "a", "problem": "x"}]), parquet)
    assert [p.text for p in distill.read_problems(parquet)] == ["x"]


def test_select_and_tokenize_print_where_rows_were_dropped(tmp_path, capsys, tiny_tokenizer_dir):
    graded = tmp_path / "graded.jsonl"
    graded.write_bytes(lines(graded_rows(2)) + b"{oops\n" + lines(graded_rows(3)[2:]))
    assert run_cli("select", "--in", graded, "--out", tmp_path / "sft.jsonl", "graded=false") == 0
    assert f"{graded}:3: invalid JSON" in capsys.readouterr().out
    sft = tmp_path / "sft_in.jsonl"
    sft.write_bytes(lines(sft_rows(1)) + b'{"id": "x"}\n')
    assert run_cli("tokenize", "--in", sft, "--tokenizer", tiny_tokenizer_dir, "--out", tmp_path / "tok",
                   "--workers", "1", "--no-progress") == 0
    assert f"{sft}:2: " in capsys.readouterr().out


def test_grade_with_a_missing_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "graded.jsonl"
    assert run_cli("grade", "--in", tmp_path / "missing.jsonl", "--out", out, "--no-progress") == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_malformed_200_from_the_teacher_is_retried(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(lines([{"id": f"q{i}", "problem": f"Compute {i}."} for i in range(4)]))
    with FaultyTeacher(fault_rate=1.0, max_faults=1, faults=("malformed",)) as teacher:
        cfg = distill.DistillConfig(input=str(tmp_path / "p.jsonl"), output=str(tmp_path / "r.jsonl"), base_url=teacher.url,
                                    model=teacher.model, n=1, seed=0, timeout_s=30, max_retries=2,
                                    backoff_initial_s=0.01, backoff_max_s=0.02, progress=False)
        summary = asyncio.run(distill.distill_async(cfg))
        assert teacher.injected["malformed"] == 4
    assert summary["failed"] == 0 and summary["retries"] == 4


def test_an_answer_in_a_second_thinking_block_is_still_thinking(tmp_path, capsys):
    """Everything up to the last </think> is thinking: a boxed answer there is not graded as the answer."""
    rows = graded_rows(2)
    rows[0]["response"] = "<think>a</think><think>\\boxed{0}</think>"
    rows[1]["response"] = "<think>a</think><think>b</think>The answer is \\boxed{2}."
    path = tmp_path / "responses.jsonl"
    path.write_bytes(lines(rows))
    assert run_cli("grade", "--in", path, "--out", tmp_path / "g.jsonl", "--no-progress") == 0
    graded = {r["problem_id"]: r for r in map(json.loads, (tmp_path / "g.jsonl").read_text().splitlines())}
    assert graded["p0"]["verdict"] is False and graded["p1"]["verdict"] is True
