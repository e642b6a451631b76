"""A small byte-level BPE tokenizer with a ChatML template, trained on a corpus in seconds.

The embedded demo trains a tiny model on CPU, where a 152k-entry vocabulary would dominate the
step time, so it trains its own ~1k-token tokenizer on the synthetic task's text. The folder it
writes is an ordinary Hugging Face tokenizer folder (tokenizer.json, tokenizer_config.json,
chat_template.jinja), read by the same code paths as a real model's tokenizer.
"""

from __future__ import annotations

import itertools
import os
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SYSTEM_PROMPT = "You are a careful assistant."
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Kept whole so thinking boundaries are single tokens, as in real reasoning-model vocabularies.
ADDED_TOKENS = ("<think>", "</think>")


def build_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 1024) -> str:
    """Trains a byte-level BPE on `texts` and saves a Hugging Face tokenizer folder to `out_dir`."""
    tok = Tokenizer(models.BPE())
    # One token per digit, as Qwen2.5's own pre-tokenizer does: a merged "959" would hide the digits
    # that a digit-by-digit trace works with. Underscores (the traces' column padding) stay single
    # too, so every trace line of a task has the same number of tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split("_", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The template's own words are in the corpus so that rendered chats tokenize compactly too.
    boilerplate = [SYSTEM_PROMPT, "system", "user", "assistant"]
    tok.train_from_iterator(itertools.chain(boilerplate * 8, texts), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return out_dir
