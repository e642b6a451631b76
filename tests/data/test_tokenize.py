"""Tokenize: chat templates -> ids and assistant-only masks (checked token by token), shards,
manifest, drop accounting, over-length policy, determinism across worker counts, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from lt_jax.data import tokenize as tk
from lt_jax.data.source import TokenizedSource

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Llama 3's pre-tokenizer regex, so the tiny tokenizer splits text the way Llama 3 does.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


def strip_generation(template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def build_llama3_tokenizer(folder: str, template: str = LLAMA3_TEMPLATE) -> str:
    """A tiny byte-level BPE with Llama 3's special tokens and a Llama-3-style chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    corpus = ["system user assistant", "Let me think step by step.\n\nFirst, 12 + 30 = 42.", "What is the answer?",
              "<think>\nreasoning here\n</think>\n\nThe answer is 42.", "You are a careful math tutor."]
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<|end_of_text|>"
    )
    fast.chat_template = template
    fast.save_pretrained(folder)
    return folder


def qwen_variant(src: str, folder: str, template: str) -> str:
    """A copy of the real Qwen2.5 tokenizer with another chat template."""
    os.makedirs(folder, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), os.path.join(folder, name))
    with open(os.path.join(folder, "chat_template.jinja"), "w") as f:
        f.write(template)
    return folder


def expected_encoding(tok, pieces: list[tuple[str, int]]) -> tuple[list[int], list[int]]:
    """Encodes template pieces one by one: (text, 1 if the assistant writes it)."""
    ids, mask = [], []
    for text, m in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        mask += [m] * len(piece)
    return ids, mask


def write_jsonl(path: str, records: list) -> str:
    with open(path, "wb") as f:
        for r in records:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return str(path)


def conversation(i: int, turns: int = 1, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"What is {i} + {t}?"})
        steps = " ".join(f"{i} plus {k} is {i + k}." for k in range(3 + (i * 7 + t) % 40))
        msgs.append({"role": "assistant", "content": f"<think>\n{steps}\n</think>\n\nThe answer is \\boxed{{{i + t}}}."})
    return {"id": f"rec-{i}", "messages": msgs, "meta": {"i": i}}


def run(tmp_path, tokenizer_dir, records, name="out", **kw) -> tuple[dict, str]:
    path = write_jsonl(str(tmp_path / f"{name}.jsonl"), records)
    out = str(tmp_path / name)
    cfg = tk.TokenizeConfig(inputs=(path,), tokenizer=tokenizer_dir, out=out, **{"workers": 1, **kw})
    return tk.tokenize(cfg, progress=False), out


def read_all(out: str) -> list[dict]:
    src = TokenizedSource(out)
    return src.read_batch(range(len(src)))


def tree_bytes(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


# ---------------------------------------------------------------------------------------------
# Masks, token by token


def test_qwen_think_mask_token_by_token(tmp_path, qwen_tokenizer_dir):
    rec = conversation(3)
    manifest, out = run(tmp_path, qwen_tokenizer_dir, [rec])
    assert manifest["tokenizer"]["mask_method"] == "generation"
    (got,) = read_all(out)
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
    pieces = [
        (QWEN_SYSTEM + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", 0),
        (answer + "<|im_end|>", 1),
        ("\n", 0),
    ]
    ids, mask = expected_encoding(tok, pieces)
    own = tok(tok.apply_chat_template(rec["messages"], tokenize=False), add_special_tokens=False)["input_ids"]
    assert got["input_ids"].tolist() == own == ids
    assert got["loss_mask"].tolist() == mask
    assert tok.convert_ids_to_tokens(int(got["input_ids"][-2])) == "<|im_end|>" and got["loss_mask"][-2] == 1
    assert tok.decode(got["input_ids"][-1:]) == "\n" and got["loss_mask"][-1] == 0
    assert manifest["num_loss_tokens"] == sum(mask)


def llama3_pieces(messages: list[dict]) -> list[tuple[str, int]]:
    pieces = [("<|begin_of_text|>", 0)]
    for m in messages:
        pieces.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0))
        pieces.append((m["content"].strip() + "<|eot_id|>", int(m["role"] == "assistant")))
    return pieces


@pytest.mark.parametrize("generation", [True, False], ids=["generation", "prefix"])
def test_llama3_multi_turn_mask_token_by_token(tmp_path, generation):
    template = LLAMA3_TEMPLATE if generation else strip_generation(LLAMA3_TEMPLATE)
    tok_dir = build_llama3_tokenizer(str(tmp_path / "tok"), template)
    rec = conversation(5, turns=2, system="You are a careful math tutor.")
    manifest, out = run(tmp_path, tok_dir, [rec])
    assert manifest["tokenizer"]["mask_method"] == ("generation" if generation else "prefix")
    assert manifest["tokenizer"]["end_of_turn"] == "<|eot_id|>"
    (got,) = read_all(out)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids, mask = expected_encoding(tok, llama3_pieces(rec["messages"]))
    assert got["input_ids"].tolist() == ids
    assert got["loss_mask"].tolist() == mask
    # Only the two assistant turns are trained on, each through its <|eot_id|>.
    trained = tok.decode(got["input_ids"][got["loss_mask"] == 1])
    assert trained == "".join(m["content"].strip() + "<|eot_id|>" for m in rec["messages"] if m["role"] == "assistant")


def test_prefix_method_without_end_of_turn_token(tmp_path):
    """A plain-text template with no end-of-turn special token: the turn is its rendered content."""
    template = (
        "{%- for m in messages %}{{- m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'assistant:\\n' }}{%- endif %}"
    )
    enc = tk.ChatEncoder(build_llama3_tokenizer(str(tmp_path / "tok"), template))
    assert (enc.method, enc.end_of_turn) == ("prefix", None)
    # Contents end in a letter: Llama 3's split regex glues punctuation to the newlines after it,
    # and such a token (starting inside the turn) would be trained on with them.
    msgs = [{**m, "content": m["content"] + " done"} for m in conversation(2, turns=2)["messages"]]
    pieces = []
    for m in msgs:
        assistant = m["role"] == "assistant"
        pieces += [(f"{m['role']}:\n", 0), (m["content"], int(assistant)), ("\n\n", 0)]
    ids, mask = enc.encode(msgs)
    want_ids, want_mask = expected_encoding(enc.tokenizer, pieces)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask


def test_prefix_method_matches_generation_on_qwen(tmp_path, qwen_tokenizer_dir):
    """The fallback path gives the same mask as the {% generation %} path, multi-turn included."""
    with open(os.path.join(qwen_tokenizer_dir, "chat_template.jinja")) as f:
        template = f.read()
    plain = qwen_variant(qwen_tokenizer_dir, str(tmp_path / "plain"), strip_generation(template))
    records = [conversation(i, turns=1 + i % 3, system="Be brief." if i % 2 else None) for i in range(6)]
    gen_enc, pre_enc = tk.ChatEncoder(qwen_tokenizer_dir), tk.ChatEncoder(plain)
    assert (gen_enc.method, pre_enc.method, pre_enc.end_of_turn) == ("generation", "prefix", "<|im_end|>")
    forced = tk.ChatEncoder(qwen_tokenizer_dir, mask_method="prefix")
    for rec in records:
        ids_g, mask_g = gen_enc.encode(rec["messages"])
        for enc in (pre_enc, forced):
            ids_p, mask_p = enc.encode(rec["messages"])
            assert ids_p.tolist() == ids_g.tolist() and mask_p.tolist() == mask_g.tolist()
        turns = sum(m["role"] == "assistant" for m in rec["messages"])
        # Each assistant turn is one run of ones ending on <|im_end|>.
        starts = np.flatnonzero(np.diff(np.concatenate([[0], mask_g])) == 1)
        assert len(starts) == turns
        assert (ids_g[np.flatnonzero(np.diff(np.concatenate([mask_g, [0]])) == -1)] == 151645).all()


def test_template_that_rewrites_earlier_turns(tmp_path, qwen_tokenizer_dir):
    """A template that drops <think> from earlier assistant turns: train on what it renders."""
    with open(os.path.join(qwen_tokenizer_dir, "chat_template.jinja")) as f:
        template = f.read()
    rewritten = template.replace(
        "message['content'] + '<|im_end|>'",
        "(message['content'] if loop.last else message['content'].split('</think>')[-1].lstrip('\\n')) + '<|im_end|>'",
    )
    assert rewritten != template
    folder = qwen_variant(qwen_tokenizer_dir, str(tmp_path / "r1"), rewritten)
    rec = conversation(7, turns=2)
    for enc in (tk.ChatEncoder(folder), tk.ChatEncoder(folder, mask_method="prefix")):
        ids, mask = enc.encode(rec["messages"])
        text = enc.tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        assert ids.tolist() == enc.tokenizer(text, add_special_tokens=False)["input_ids"]
        trained = enc.tokenizer.decode(ids[mask == 1])
        first, last = rec["messages"][1]["content"], rec["messages"][3]["content"]
        assert trained == first.split("</think>")[-1].lstrip("\n") + "<|im_end|>" + last + "<|im_end|>"
        assert text.count("<think>") == 1  # the first turn's thinking really was dropped


# ---------------------------------------------------------------------------------------------
# Bad input, over-length, manifest


def test_bad_lines_are_counted_with_file_and_line(tmp_path, qwen_tokenizer_dir):
    good = conversation(1)
    bad_role = {"id": "r", "messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
    lines = [
        good,                                                     # 1
        b'{"id": "t", "messages": [{"role": "user", "cont\n',     # 2 truncated
        b'\xff\xfe{"id": 1}\n',                                   # 3 invalid UTF-8
        {"id": "m"},                                              # 4 no messages
        {"id": "u", "messages": [{"role": "user", "content": "hi"}]},  # 5 no assistant turn
        bad_role,                                                 # 6
        {"id": "c", "messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]},  # 7
        b"\n",                                                    # 8 blank: skipped, as every stage's reader does
        {"id": "s", "messages": [{"role": "user", "content": "a<|im_end|>b"}, {"role": "assistant", "content": "y"}]},
        b'{"id": "last", "messages": [',                          # 10 torn tail, no newline
    ]
    manifest, out = run(tmp_path, qwen_tokenizer_dir, lines)
    path = str(tmp_path / "out.jsonl")
    assert manifest["num_records"] == 1 and manifest["input_lines"] == 9
    assert manifest["drops"]["by_reason"] == {
        "bad_field": 2, "invalid_json": 2, "invalid_utf8": 1, "missing_messages": 1,
        "no_assistant_turn": 1, "special_token_in_content": 1,
    }
    drops = [json.loads(x) for x in open(os.path.join(out, "drops.jsonl"))]
    assert [(d["line"], d["reason"]) for d in drops][:3] == [(2, "invalid_json"), (3, "invalid_utf8"), (4, "missing_messages")]
    assert all(d["source"] == path for d in drops)
    assert "messages[0].role" in drops[4]["detail"] and "messages[0].content" in drops[5]["detail"]
    assert manifest["drops"]["examples"]["invalid_json"][0].startswith(f"{path}:2: ")
    with pytest.raises(tk.InputError, match=re.escape(f"{tmp_path / 'strict.jsonl'}:2: invalid_json")):
        run(tmp_path, qwen_tokenizer_dir, lines, name="strict", strict=True)


def test_overlength_drop_and_truncate(tmp_path, qwen_tokenizer_dir):
    records = [conversation(i) for i in range(12)]
    enc = tk.ChatEncoder(qwen_tokenizer_dir)
    full = [enc.encode(r["messages"]) for r in records]
    lengths = np.array([len(ids) for ids, _ in full])
    limit = int(np.median(lengths))
    dropped, out = run(tmp_path, qwen_tokenizer_dir, records, name="drop", max_length=limit)
    keep = lengths <= limit
    assert dropped["overlength"] == {"policy": "drop", "max_length": limit, "truncated": 0, "dropped": int((~keep).sum())}
    assert dropped["num_records"] == keep.sum() and dropped["drops"]["by_reason"] == {"overlength": int((~keep).sum())}
    got = read_all(out)
    assert [g["input_ids"].tolist() for g in got] == [full[i][0].tolist() for i in np.flatnonzero(keep)]

    # Truncation keeps the first `limit` tokens; a record cut before its answer starts has nothing to train on.
    truncated, out = run(tmp_path, qwen_tokenizer_dir, records, name="trunc", max_length=limit, overlength="truncate")
    assert truncated["num_records"] == 12 and truncated["overlength"]["truncated"] == int((~keep).sum())
    for g, (ids, mask) in zip(read_all(out), full):
        assert g["input_ids"].tolist() == ids[:limit].tolist() and g["loss_mask"].tolist() == mask[:limit].tolist()
    prompt = int(np.argmax(full[0][1]))  # tokens before the first trained one
    none_left, _ = run(tmp_path, qwen_tokenizer_dir, records[:1], name="none", max_length=prompt, overlength="truncate")
    assert none_left["num_records"] == 0 and none_left["drops"]["by_reason"] == {"no_loss_tokens": 1}
    one_left, out = run(tmp_path, qwen_tokenizer_dir, records[:1], name="one", max_length=prompt + 1, overlength="truncate")
    assert one_left["num_loss_tokens"] == 1 and read_all(out)[0]["loss_mask"].tolist() == [0] * prompt + [1]


def test_manifest_contents(tmp_path, qwen_tokenizer_dir):
    records = [conversation(i) for i in range(9)]
    manifest, out = run(tmp_path, qwen_tokenizer_dir, records, records_per_shard=4)
    got = read_all(out)
    lengths = [len(g["input_ids"]) for g in got]
    assert [s["records"] for s in manifest["shards"]] == [4, 4, 1]
    assert manifest["num_tokens"] == sum(lengths) and manifest["longest_record"] == max(lengths)
    assert manifest["num_loss_tokens"] == sum(int(g["loss_mask"].sum()) for g in got)
    hist = manifest["length_histogram"]
    assert sum(hist["counts"]) == 9
    assert hist["counts"] == np.histogram(lengths, bins=hist["edges"] + [2**62])[0].tolist()
    import hashlib

    tok_hash = hashlib.sha256(open(os.path.join(qwen_tokenizer_dir, "tokenizer.json"), "rb").read()).hexdigest()
    tpl = AutoTokenizer.from_pretrained(qwen_tokenizer_dir).chat_template
    assert manifest["tokenizer"]["sha256"] == tok_hash
    assert manifest["tokenizer"]["chat_template_sha256"] == hashlib.sha256(tpl.encode()).hexdigest()
    src = manifest["sources"][0]
    assert src["sha256"] == hashlib.sha256(open(src["path"], "rb").read()).hexdigest() and src["lines"] == 9
    # The tokenizer travels with the data, so export can keep the training chat template.
    assert AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer")).chat_template == tpl


# ---------------------------------------------------------------------------------------------
# Determinism and resume


@pytest.mark.slow
def test_worker_count_does_not_change_output(tmp_path, qwen_tokenizer_dir):
    records = [conversation(i, turns=1 + i % 2) for i in range(14)] + [b"oops\n"]
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    outs = []
    for workers in (1, 2):
        outs.append(str(tmp_path / f"w{workers}"))
        cfg = tk.TokenizeConfig(inputs=(path,), tokenizer=qwen_tokenizer_dir, out=outs[-1], records_per_shard=3, workers=workers)
        tk.tokenize(cfg, progress=False)
    one, two = tree_bytes(outs[0]), tree_bytes(outs[1])
    assert sorted(k for k in one if re.fullmatch(r"shards/shard-\d+\.json", k)) == [f"shards/shard-0000{i}.json" for i in range(5)]
    assert one == two


class Stop(Exception):
    pass


def test_resume_after_interrupt_is_byte_identical(tmp_path, qwen_tokenizer_dir):
    records = [conversation(i) for i in range(10)] + [b"torn"]
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    def cfg(out: str) -> tk.TokenizeConfig:
        return tk.TokenizeConfig(inputs=(path,), tokenizer=qwen_tokenizer_dir, out=out, records_per_shard=3, workers=1)

    clean = str(tmp_path / "clean")
    tk.tokenize(cfg(clean), progress=False)

    resumed = str(tmp_path / "resumed")
    seen = []

    def stop_after_two(index, meta):
        seen.append(index)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        tk.tokenize(cfg(resumed), progress=False, on_shard_done=stop_after_two)
    assert not os.path.exists(os.path.join(resumed, "manifest.json"))
    # A half-written next shard (arrays but no commit marker) must be redone, not trusted.
    os.makedirs(os.path.join(resumed, "shards", "shard-00002", "tokens"))
    with open(os.path.join(resumed, "shards", "shard-00002", "tokens", "zarr.json"), "w") as f:
        f.write("{garbage")
    redone = []
    tk.tokenize(cfg(resumed), progress=False, on_shard_done=lambda i, m: redone.append(i))
    assert redone == [0, 1, 2, 3]
    assert tree_bytes(resumed) == tree_bytes(clean)
    assert len(TokenizedSource(resumed)) == 10
    ids = [i for k in range(4) for i in json.load(open(os.path.join(resumed, "shards", f"shard-0000{k}.json")))["ids"]]
    assert ids == [f"rec-{i}" for i in range(10)]  # no duplicates, no gaps

    # Changed input or settings are refused instead of mixed in.
    with open(path, "ab") as f:
        f.write(b"\n")  # completes the torn last line: same records, so nothing to redo
    tk.tokenize(cfg(resumed), progress=False, on_shard_done=lambda i, m: None)
    with open(path, "ab") as f:
        f.write((json.dumps(conversation(99)) + "\n").encode())  # a new line lands in the last shard
    with pytest.raises(tk.InputError, match="input lines of this shard changed"):
        tk.tokenize(cfg(resumed), progress=False)
    other = tk.TokenizeConfig(inputs=(path,), tokenizer=qwen_tokenizer_dir, out=resumed, records_per_shard=3, max_length=99)
    with pytest.raises(tk.InputError, match="other settings"):
        tk.tokenize(other, progress=False)
    tk.tokenize(other, progress=False, overwrite=True)


@pytest.mark.slow
def test_killed_process_resumes(tmp_path, qwen_tokenizer_dir):
    """A real SIGKILL of a 2-worker CLI run mid-way, then a rerun: same bytes as an uninterrupted run."""
    records = [conversation(i, turns=2) for i in range(24)]
    path = write_jsonl(str(tmp_path / "in.jsonl"), records)
    killed, clean = str(tmp_path / "killed"), str(tmp_path / "clean")
    code = (
        "import sys, argparse; from lt_jax.data import tokenize_cli as t; p = argparse.ArgumentParser(); "
        "t.add_arguments(p, 'tokenize'); sys.exit(t.run(p.parse_args(sys.argv[1:])))"
    )
    cmd = [sys.executable, "-c", code, "--in", path, "--tokenizer", qwen_tokenizer_dir, "--out", killed,
           "--records-per-shard", "2", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": REPO}, start_new_session=True)
    shards = os.path.join(killed, "shards")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(shards) and sum(n.endswith(".json") for n in os.listdir(shards)) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers
    proc.wait()
    assert not os.path.exists(os.path.join(killed, "manifest.json"))
    left = sorted(n for n in os.listdir(shards) if n.endswith(".json"))
    assert 2 <= len(left) < 12
    redone = []
    def cfg(out: str) -> tk.TokenizeConfig:
        return tk.TokenizeConfig(inputs=(path,), tokenizer=qwen_tokenizer_dir, out=out, records_per_shard=2, workers=1)

    tk.tokenize(cfg(killed), progress=False, on_shard_done=lambda i, m: redone.append(i))
    assert redone == list(range(12))
    tk.tokenize(cfg(clean), progress=False)
    assert tree_bytes(killed) == tree_bytes(clean)
