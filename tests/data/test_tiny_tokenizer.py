from transformers import PreTrainedTokenizerFast

from lt_jax.data import tiny_tokenizer


def test_tiny_tokenizer_masks_assistant_and_keeps_think_whole(tmp_path):
    texts = [f"Compute {a} + {b}.\n<think>\n{a}+{b}={a + b}\n</think>\n\\boxed{{{a + b}}}" for a in range(30) for b in range(7)]
    out = tiny_tokenizer.build_tokenizer(texts, str(tmp_path / "tok"), vocab_size=400)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    assert len(tok) <= 400 + len(tiny_tokenizer.ADDED_TOKENS)
    answer = "<think>\n3+4=7\n</think>\n\n\\boxed{7}"
    msgs = [{"role": "user", "content": "Compute 3 + 4."}, {"role": "assistant", "content": answer}]
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    trained = [i for i, m in zip(ids, mask) if m]
    # Exactly the assistant's content and its end-of-turn token are trained on.
    assert tok.decode(trained) == answer + "<|im_end|>"
    assert trained[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.convert_tokens_to_ids("<think>") in ids and tok.convert_tokens_to_ids("</think>") in ids
    assert mask[-1] == 0  # the newline after <|im_end|> belongs to the template, not the assistant
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n" + tiny_tokenizer.SYSTEM_PROMPT)


def test_digits_and_padding_are_single_tokens_so_trace_lines_align(tmp_path):
    """A digit-by-digit trace needs one token per digit (as Qwen2.5's tokenizer gives) and, for its
    fixed-layout lines, one per '_' pad: then every column line of a task has the same length."""
    import random

    from lt_jax.data import synthetic

    cfg = synthetic.SyntheticConfig(levels=(2, 3, 4), wrong_rate=(0.0, 0.0, 0.0), ops=("add",), num_problems=60, num_heldout=0)
    traces = [synthetic.teacher_response(p["problem"], random.Random(0), cfg)[0] for p in synthetic.make_problems(cfg)]
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer.build_tokenizer(traces * 4, str(tmp_path / "tok"), vocab_size=400))
    assert tok.tokenize("1512") == ["1", "5", "1", "2"] and tok.tokenize("____2") == ["_"] * 4 + ["2"]
    column_lines = [line for t in traces for line in t.splitlines() if ": " in line and "=" in line]
    assert len(column_lines) == 60 * 5  # width max(levels) + 1 = 5 columns for every problem
    assert len({len(tok(line)["input_ids"]) for line in column_lines}) == 1
