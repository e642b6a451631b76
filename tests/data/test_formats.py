"""Reading distilled data in every published layout, remapped fields, Parquet, gs://, bad input."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lt_jax import storage
from lt_jax.data import formats, jsonl
from lt_jax.data.jsonl import DataError, DropLog


def _write_rows(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)

OPENAI_INLINE = {
    "id": "o1",
    "messages": [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is \\boxed{5}."},
    ],
    "answer": "5",
}
OPENAI_SEPARATE = {
    "messages": [
        {"role": "user", "content": "What is 7*6?"},
        {"role": "assistant", "content": "It is \\boxed{42}.", "reasoning_content": "7*6 = 42."},
    ]
}
OPENTHOUGHTS = {
    "system": "Your role as an assistant involves thoroughly exploring questions.",
    "conversations": [
        {"from": "user", "value": "Find x if x+1=3."},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nSubtract 1.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n$x=\\boxed{2}$\n\n<|end_of_solution|>"},
    ],
}
SHAREGPT = {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
S1K = {
    "question": "Compute 1+1.",
    "solution": "2",
    "thinking_trajectories": ["One plus one.", "That is two."],
    "attempt": "The answer is $\\boxed{2}$.",
    "cot_type": "math",
}
LIMO = {"question": "Compute 2+2.", "solution": "Adding, we get 4. So \\boxed{4}.", "answer": "4"}
AM_PER_MESSAGE = {
    "messages": [
        {"role": "user", "content": "Compute 3+3.", "info": {"source": "am_math", "reference_answer": "6", "think_content": None, "answer_content": None}},
        {
            "role": "assistant",
            "content": "<think>\nthree and three\n</think>\n<answer>\nSix: \\boxed{6}\n</answer>",
            "info": {"source": "am_math", "reference_answer": "6", "think_content": "three and three", "answer_content": "Six: \\boxed{6}", "verify_score": 1.0},
        },
    ]
}
AM_TOP_INFO = {
    "messages": [
        {"role": "user", "content": "Compute 4+4."},
        {"role": "assistant", "content": "<think>\nfour and four\n</think>\n<answer>\n\\boxed{8}\n</answer>"},
    ],
    "info": {"answer": "8", "verify_score": 0.95, "source": "deepdistill"},
}
RESPONSE = {
    "problem_id": "p1", "sample_index": 2, "prompt": "Compute 5+5.", "response": "<think>\nten\n</think>\n\n\\boxed{10}",
    "reasoning_content": None, "reference_answer": "10", "finish_reason": "stop", "status": "ok", "error": None, "teacher": "t",
}


def _one(tmp_path, row, **kw) -> formats.Record:
    path = _write_rows(tmp_path / "x.jsonl", [row])
    recs = list(formats.read_records(path, policy="strict", **kw))
    assert len(recs) == 1
    return recs[0]


@pytest.mark.parametrize(
    "row, layout, problem, thinking, answer, reference",
    [
        (OPENAI_INLINE, "openai", "What is 2+3?", "2 plus 3 is 5.", "The answer is \\boxed{5}.", "5"),
        (OPENAI_SEPARATE, "openai", "What is 7*6?", "7*6 = 42.", "It is \\boxed{42}.", None),
        (OPENTHOUGHTS, "sharegpt", "Find x if x+1=3.", "Subtract 1.", "$x=\\boxed{2}$", None),
        (SHAREGPT, "sharegpt", "Hi?", None, "Hello.", None),
        (S1K, "problem_solution", "Compute 1+1.", "One plus one.\n\nThat is two.", "The answer is $\\boxed{2}$.", "2"),
        (LIMO, "problem_solution", "Compute 2+2.", None, "Adding, we get 4. So \\boxed{4}.", "4"),
        (AM_PER_MESSAGE, "am", "Compute 3+3.", "three and three", "Six: \\boxed{6}", "6"),
        (AM_TOP_INFO, "am", "Compute 4+4.", "four and four", "\\boxed{8}", "8"),
        (RESPONSE, "responses", "Compute 5+5.", "ten", "\\boxed{10}", "10"),
    ],
)
def test_layouts_detected_and_normalised(tmp_path, row, layout, problem, thinking, answer, reference):
    assert formats.detect_layout(row) == layout
    rec = _one(tmp_path, row)
    assert (rec.problem, rec.thinking, rec.answer, rec.reference) == (problem, thinking, answer, reference)
    assert _one(tmp_path, row, layout=layout) == rec  # forcing the detected layout changes nothing


def test_system_turns_and_sft_row(tmp_path):
    rec = _one(tmp_path, OPENTHOUGHTS)
    assert rec.messages[0] == {"role": "system", "content": OPENTHOUGHTS["system"]}
    sft = _one(tmp_path, OPENAI_INLINE).to_sft({"source": "x"})
    assert sft["id"] == "o1"
    assert [m["role"] for m in sft["messages"]] == ["system", "user", "assistant"]
    assert sft["messages"][-1]["content"] == "<think>\n2 plus 3 is 5.\n</think>\n\nThe answer is \\boxed{5}."
    assert sft["meta"]["source"] == "x"
    am = _one(tmp_path, AM_TOP_INFO)
    assert am.meta["verify_score"] == 0.95 and am.source == "deepdistill"


def test_multi_turn_keeps_only_last_thinking(tmp_path):
    row = {"messages": [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>t1</think>a1"},
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>t2</think>a2"},
    ]}
    rec = _one(tmp_path, row)
    assert [m["content"] for m in rec.messages] == ["q1", "a1", "q2", "a2"]
    assert rec.thinking == "t2" and rec.problem == "q2"


def test_remapped_fields(tmp_path):
    row = {"qid": 17, "question_text": "What is 9-4?", "gen": "<think>nine minus four</think>\n\\boxed{5}", "meta": {"gold": 5}}
    assert formats.detect_layout(row) is None
    fields = formats.parse_fields(["id=qid", "problem=question_text", "response=gen", "reference=meta.gold"])
    rec = _one(tmp_path, row, fields=fields)
    assert (rec.id, rec.problem, rec.thinking, rec.answer, rec.reference) == ("17", "What is 9-4?", "nine minus four", "\\boxed{5}", "5")
    with pytest.raises(ValueError, match="unknown field 'prob'"):
        formats.parse_fields(["prob=question"])
    # A mapped field that is absent is an error naming the source key.
    with pytest.raises(DataError, match=r"x.jsonl:1: question_text: required field is missing"):
        _one(tmp_path, {"gen": "a", "other": 1}, fields=fields, layout="problem_solution")


def test_json_list_data_key_and_jsonl_named_json(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([LIMO, S1K]))
    (tmp_path / "b.json").write_text(json.dumps({"data": [LIMO], "version": 1}))
    (tmp_path / "c.json").write_text(json.dumps(LIMO) + "\n" + json.dumps(LIMO) + "\n")
    assert [r.reference for r in formats.read_records(str(tmp_path / "a.json"))] == ["4", "2"]
    assert len(list(formats.read_records(str(tmp_path / "b.json")))) == 1
    assert len(list(formats.read_records(str(tmp_path / "c.json")))) == 2
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps(LIMO) + "\n")
    assert [r.reference for r in formats.read_records(str(tmp_path / "d.jsonl.gz"), policy="strict")] == ["4"]


def _parquet_bytes(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_parquet_local_and_folder(tmp_path):
    rows = [dict(OPENAI_INLINE, id=f"o{i}") for i in range(5)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part-0.parquet").write_bytes(_parquet_bytes(rows[:3]))
    (tmp_path / "d" / "part-1.parquet").write_bytes(_parquet_bytes(rows[3:]))
    (tmp_path / "d" / "README.md").write_text("not data")
    recs = list(formats.read_records(str(tmp_path / "d" / "part-0.parquet"), policy="strict"))
    assert [r.id for r in recs] == ["o0", "o1", "o2"] and recs[1].line == 2
    assert [r.id for r in formats.read_records(str(tmp_path / "d"))] == [f"o{i}" for i in range(5)]
    assert recs[0].thinking == "2 plus 3 is 5."


def test_gcs_parquet_and_jsonl(gcs_bucket):
    pq_path = f"{gcs_bucket}/data/train.parquet"
    storage.write_bytes(pq_path, _parquet_bytes([LIMO, dict(LIMO, answer="5")]))
    assert [r.reference for r in formats.read_records(pq_path, policy="strict")] == ["4", "5"]
    jl = f"{gcs_bucket}/data/responses.jsonl"
    storage.write_text(jl, json.dumps(RESPONSE) + "\n")
    (rec,) = formats.read_records(jl, policy="strict")
    assert rec.id == "p1#2" and rec.file == jl


BAD_CASES = [
    # (good row layout, bytes of the second line, reason, message fragment)
    (OPENAI_INLINE, b'{"messages": [{"role": "user", "content": "q"}, {"role": "assis', "invalid_json", r"bad.jsonl:2: invalid JSON.*truncated"),
    (RESPONSE, json.dumps(dict(RESPONSE, sample_index="three")).encode() + b"\n", "wrong_type", r"bad.jsonl:2: sample_index: expected an int"),
    (OPENAI_INLINE, json.dumps({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}).encode() + b"\n", "wrong_type", r"bad.jsonl:2: messages\[0\].content: expected a string"),
    (OPENAI_INLINE, json.dumps({"messages": [{"role": "user", "content": "only a question"}]}).encode() + b"\n", "no_assistant_turn", r"bad.jsonl:2: messages: no assistant turn"),
    (LIMO, b'{"question": "caf\xe9", "solution": "x"}\n', "invalid_utf8", r"bad.jsonl:2: invalid UTF-8"),
]


@pytest.mark.parametrize("good, bad, reason, message", BAD_CASES, ids=[c[2] + str(i) for i, c in enumerate(BAD_CASES)])
def test_bad_input_skip_counts_and_strict_names_line(tmp_path, good, bad, reason, message):
    good_before, good_after = dict(good, id="before"), dict(good, id="after")
    if "problem_id" in good:
        good_before, good_after = dict(good, problem_id="before"), dict(good, problem_id="after")
    torn = reason == "invalid_json"  # a torn line can only be the last one
    path = str(tmp_path / "bad.jsonl")
    with open(path, "wb") as f:
        f.write((json.dumps(good_before) + "\n").encode())
        f.write(bad)
        if not torn:
            f.write((json.dumps(good_after) + "\n").encode())
    drops = DropLog()
    ids = [r.id.split("#")[0] for r in formats.read_records(path, drops=drops)]
    assert ids == (["before"] if torn else ["before", "after"])
    assert drops.counts == {reason: 1}
    assert any("bad.jsonl:2" in e for e in drops.examples[reason])
    kept = []
    with pytest.raises(DataError, match=message) as info:
        for rec in formats.read_records(path, policy="strict"):
            kept.append(rec.id.split("#")[0])
    assert kept == ["before"] and info.value.line == 2


def test_unknown_layout_counted(tmp_path):
    path = _write_rows(tmp_path / "u.jsonl", [{"foo": 1}, LIMO])
    drops = DropLog()
    assert len(list(formats.read_records(path, drops=drops))) == 1
    assert drops.counts == {"unknown_layout": 1}


@pytest.mark.parametrize(
    "text, thinking, answer",
    [
        ("<think>a</think>b", "a", "b"),
        ("a</think>\n\nb", "a", "b"),  # template opened <think> in the prompt
        ("<think>cut off mid thought \\boxed{3}", "cut off mid thought \\boxed{3}", ""),
        ("plain answer", None, "plain answer"),
        ("<|begin_of_thought|>t<|end_of_thought|><|begin_of_solution|>s<|end_of_solution|>", "t", "s"),
        ("<think>t</think>\n<answer>\nx\n</answer>", "t", "x"),
        # everything up to the last closing tag is thinking: the answer is what follows it
        ("<think>a</think><think>\\boxed{42}</think>", "a</think><think>\\boxed{42}", ""),
        ("<think>a</think>b<think>c</think>d", "a</think>b<think>c", "d"),
    ],
)
def test_split_thinking(text, thinking, answer):
    assert formats.split_thinking(text) == (thinking, answer)
    from lt_jax.sample import openai_api

    assert openai_api.split_think(text) == (thinking, answer)  # the server splits by the same rule


def test_writer_resume_repairs_torn_tail(tmp_path):
    path = str(tmp_path / "out.jsonl")
    with jsonl.JsonlWriter(path) as w:
        for i in range(3):
            w.write({"i": i})
    with open(path, "ab") as f:
        f.write(b'{"i": 3, "tor')  # killed mid-write
    with jsonl.JsonlWriter(path, resume=True) as w:
        w.write({"i": 3})
    assert [r["i"] for _, r in jsonl.read_jsonl(path, policy="strict")] == [0, 1, 2, 3]
    with jsonl.JsonlWriter(path) as w:  # without resume the file is replaced
        w.write({"i": 9})
    assert [r["i"] for _, r in jsonl.read_jsonl(path, policy="strict")] == [9]


def test_writer_gcs_resume(gcs_bucket):
    path = f"{gcs_bucket}/out/graded.jsonl"
    with jsonl.JsonlWriter(path) as w:
        w.write({"i": 0})
    with jsonl.JsonlWriter(path, resume=True) as w:
        w.write({"i": 1})
    assert [r["i"] for _, r in jsonl.read_jsonl(path, policy="strict")] == [0, 1]


def test_the_math_prompt_is_one_text_for_distill_the_synthetic_teacher_and_eval():
    from lt_jax.data import distill, synthetic
    from lt_jax.eval import harness

    rendered = {distill.DEFAULT_TEMPLATE.format(problem="Compute 2 + 3."),
                synthetic.DEFAULT_PROMPT.format(problem="Compute 2 + 3."),
                harness.MATH_INSTRUCTION.replace("{problem}", "Compute 2 + 3.")}
    assert rendered == {"Compute 2 + 3.\nPlease reason step by step, and put your final answer within \\boxed{}."}
