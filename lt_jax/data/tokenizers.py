"""Loading a Hugging Face tokenizer from a folder, local or gs://: one function for every stage."""

from __future__ import annotations

from transformers import AutoTokenizer

from lt_jax import storage


def load_tokenizer(path: str):
    """A transformers tokenizer from a folder (local or gs://; a remote folder is copied locally first)."""
    return AutoTokenizer.from_pretrained(storage.local_folder(path, prefix="lt_jax_tok_"))
