"""Loading a Hugging Face tokenizer from a folder, local or gs://: one function for every stage."""

from __future__ import annotations

from lt_jax import storage


def load_tokenizer(path: str):
    """A transformers tokenizer from a folder (local or gs://; a remote folder is copied locally first)."""
    from transformers import AutoTokenizer  # 1-2.5 s (it imports torch when installed): only when one loads

    return AutoTokenizer.from_pretrained(storage.local_folder(path, prefix="lt_jax_tok_"))
