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
