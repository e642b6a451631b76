"""Shipped benchmarks (with attribution), user files with a field map, bad input, the sycophancy probe."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lt_jax.eval import benchmarks
from lt_jax.eval.benchmarks import BenchmarkError, load_benchmark

SIZES = {"aime24": 30, "aime25": 30, "math500": 500, "cn_math_2024": 30,
         "chinese_simpleqa": 200, "flames": 200, "diasafety": 200, "sycophancy": 200}


def test_shipped_sets_load_and_carry_their_source():
    assert set(benchmarks.available()) == set(SIZES)
    for name, size in SIZES.items():
        b = load_benchmark(name)
        assert len(b) == size and len({it.id for it in b.items}) == size, name
        assert all(it.problem.strip() for it in b.items)
        if b.kind in ("math", "simpleqa", "sycophancy"):
            assert all(it.answer for it in b.items), name
    for name, spec in benchmarks.BUILTIN.items():
        folder = os.path.dirname(os.path.join(benchmarks.DATA_DIR, spec.path))
        source = open(os.path.join(folder, "SOURCE.txt")).read()
        assert "repo:" in source and "license" in source.lower(), name
    assert load_benchmark("aime24").items[0].answer == "204"
    assert load_benchmark("math500").items[0].meta == {"subject": "Precalculus", "level": 2}


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.environ.get("LT_JAX_SHARED", "/nonexistent"), "data")),
                    reason="LT_JAX_SHARED (the folder the shipped sets were copied from) is not set")
def test_shipped_copies_match_the_shared_originals():
    """Where the originals are at hand (a developer's machine), the shipped copies are byte-identical."""
    shared = os.path.join(os.environ["LT_JAX_SHARED"], "data")
    for name, spec in benchmarks.BUILTIN.items():
        with open(os.path.join(shared, name, os.path.basename(spec.path)), "rb") as a:
            with open(os.path.join(benchmarks.DATA_DIR, spec.path), "rb") as b:
                assert a.read() == b.read(), name


def test_files_with_a_field_map(tmp_path):
    rows = [{"qid": f"q{i}", "question": f"What is {i}+{i}?", "gold": 2 * i} for i in range(4)]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    b = load_benchmark(str(path), fields="problem=question,answer=gold,id=qid")
    assert b.name == "mine" and [it.id for it in b.items] == ["q0", "q1", "q2", "q3"]
    assert b.items[3].answer == "6" and b.items[3].problem == "What is 3+3?"
    named = load_benchmark(f"easy={path}", fields={"problem": "question", "answer": "gold"})
    assert named.name == "easy" and named.items[1].id == "1"  # no id field mapped: the record index
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mine.parquet")
    assert load_benchmark(str(tmp_path / "mine.parquet"), fields="problem=question,answer=gold,id=qid").items == b.items
    (tmp_path / "mine.json").write_text(json.dumps({"data": rows}))
    assert load_benchmark(str(tmp_path / "mine.json"), fields="problem=question,answer=gold,id=qid").items == b.items


def test_gcs_benchmark_file(gcs_bucket):
    from lt_jax import storage

    path = f"{gcs_bucket}/sets/tiny.jsonl"
    storage.write_text(path, '{"problem": "1+1?", "answer": "2"}\n')
    b = load_benchmark(path)
    assert b.name == "tiny" and b.items[0].answer == "2"


@pytest.mark.parametrize(
    "content, fields, message",
    [
        ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answ', None, r"bad\.jsonl:2: invalid JSON"),
        ('{"problem": "a", "answer": "1"}\n{"problem": "", "answer": "2"}\n', None, r"bad\.jsonl:2: field 'problem'"),
        ('{"problem": "a"}\n', None, r"bad\.jsonl:1: field 'answer' is missing"),
        ('{"problem": ["a"], "answer": "1"}\n', None, r"bad\.jsonl:1: field 'problem': expected"),
        ('{"q": "a", "answer": "1", "k": 1}\n{"q": "b", "answer": "1", "k": 1}\n', "problem=q,id=k",
         r"bad\.jsonl:2: field 'k': duplicate id '1'"),
        ('[1, 2]\n', None, r"bad\.jsonl:1: expected a JSON object"),
        ('{"problem": "a", "answer": "1"}\n', "question=problem", r"unknown field 'question'"),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, content, fields, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BenchmarkError, match=message):
        load_benchmark(str(path), fields=fields)


def test_unknown_name_and_bad_utf8(tmp_path):
    with pytest.raises(BenchmarkError, match="not a shipped benchmark"):
        load_benchmark("aime2023")
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"problem": "caf\xe9", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(BenchmarkError, match="latin1.jsonl: not valid UTF-8"):
        load_benchmark(str(path))


def test_sycophancy_probe_has_false_plausible_premises():
    base = load_benchmark("chinese_simpleqa")
    probe = load_benchmark("sycophancy")
    assert [it.id for it in probe.items] == [it.id for it in base.items]
    for orig, it in zip(base.items, probe.items):
        premise = it.meta["premise"]
        assert premise != orig.answer and premise not in orig.answer and orig.answer not in premise
        assert premise in it.problem and orig.problem in it.problem and it.answer == orig.answer
        assert premise.isdigit() == orig.answer.isdigit()  # a year is replaced by a year
    again = benchmarks.sycophancy_benchmark(base, seed=0)
    assert again.items == probe.items  # deterministic
    assert benchmarks.sycophancy_benchmark(base, seed=1).items != probe.items
