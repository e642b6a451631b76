"""`lt-jax tokenize`: chat-format JSONL -> token shards with an assistant-only loss mask.

Input rows are ``{"id": str, "messages": [{"role", "content"}, ...], "meta": {...}}``, read by
``formats.read_rows`` like every other stage (JSONL, .jsonl.gz, JSON, Parquet, a leading BOM). Each
conversation is rendered with the tokenizer's own chat template and the rendered text is encoded
as is (``add_special_tokens=False``: the template already holds BOS and the like), so training sees
exactly what the template renders, including any reformatting of earlier turns. The loss mask is 1
on what the assistant writes, its content and its end-of-turn token, and 0 on system and user
turns, role headers, the generation prompt and separators after the end-of-turn token. Two ways:

* ``generation`` (used when the template has ``{% generation %}`` blocks): transformers'
  ``apply_chat_template(..., return_assistant_tokens_mask=True)``; the template says what to train on.
* ``prefix`` (any other template): for assistant turn j, render ``messages[:j]`` with the
  generation prompt; that text must be a prefix of the full rendering (else the record is dropped
  as ``template_not_prefix_stable``), and the turn starts where it ends. The turn ends after the
  template's end-of-turn token, found once by rendering a probe conversation and taking the
  special token that follows the probe's content (``<|im_end|>``, ``<|eot_id|>``, ...); a template
  with no such token ends the turn where ``messages[:j+1]`` ends, minus trailing whitespace.
  Character spans become token masks through the tokenizer's offsets: a token is trained on when
  it starts inside a span.

Sharding is by input row: shard i holds what survives of input rows
[i * records_per_shard, (i + 1) * records_per_shard) counted across the inputs in order, so its
content does not depend on the worker count, and a rerun can skip finished shards without
re-tokenizing anything before them. Each shard is written by one worker process and committed by
its marker (see shards.py); a rerun checks a finished shard's input hash and settings, skips it,
and redoes unfinished ones. manifest.json is written last, and only from committed shard markers,
so a killed and resumed run writes byte-identical shards and manifest.

Nothing is dropped silently. Each dropped row is counted under a reason (the reader's invalid_utf8,
invalid_json, not_an_object, truncated_gzip, ...; missing_messages, bad_field, no_assistant_turn, special_token_in_content,
template_error, template_not_prefix_stable, overlength, no_loss_tokens) and listed with file and
line in drops.jsonl; ``strict`` raises on the first one instead. Over-length records
(> max_length tokens) are dropped or, with ``overlength="truncate"``, cut to their first max_length
tokens (and dropped as no_loss_tokens if no assistant token survives). The manifest records
counts, the length histogram, fingerprints of tokenizer.json and of the chat template, the
sources with their sha256, the policy and the drops; the tokenizer files are copied to
OUT/tokenizer so that export can ship the template the model was trained with.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import tempfile
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from lt_jax import storage
from lt_jax.config import ConfigError
from lt_jax.data import formats
from lt_jax.data import shards as shards_lib
from lt_jax.data.jsonl import DropLog

ROLES = ("system", "user", "assistant", "tool")
# Record-length histogram bins: [0, 256), [256, 512), ..., [65536, 131072), [131072, inf).
HIST_EDGES = [0] + [2**k for k in range(8, 18)]
DROP_EXAMPLES_PER_REASON = 5


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """Settings of one tokenize run; those that shape the output are fingerprinted into every shard."""

    inputs: tuple[str, ...]
    tokenizer: str
    out: str
    max_length: int = 32768
    overlength: Literal["drop", "truncate"] = "drop"
    workers: int = 0  # 0: one per CPU core
    records_per_shard: int = 1000
    mask_method: Literal["auto", "generation", "prefix"] = "auto"
    strict: bool = False  # raise on the first bad input line instead of counting it
    inner_chunk: int = shards_lib.DEFAULT_INNER_CHUNK

    def __post_init__(self):
        if not self.inputs:
            raise ConfigError("inputs: give at least one JSONL file")
        if self.max_length < 1:
            raise ConfigError(f"max_length: must be >= 1, got {self.max_length}")
        if self.overlength not in ("drop", "truncate"):
            raise ConfigError(f"overlength: {self.overlength!r}; allowed: 'drop', 'truncate'")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0 (0 = all cores), got {self.workers}")
        if self.records_per_shard < 1:
            raise ConfigError(f"records_per_shard: must be >= 1, got {self.records_per_shard}")
        if self.mask_method not in ("auto", "generation", "prefix"):
            raise ConfigError(f"mask_method: {self.mask_method!r}; allowed: 'auto', 'generation', 'prefix'")
        if self.inner_chunk < 1:
            raise ConfigError(f"inner_chunk: must be >= 1, got {self.inner_chunk}")


class RecordError(ValueError):
    """One input record cannot be used; `reason` is the drop-count key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class InputError(ValueError):
    """A bad input line in strict mode, or input that changed under a resumed run."""


# ---------------------------------------------------------------------------------------------
# One record


@dataclasses.dataclass(frozen=True)
class ReadDrop:
    """A row the reader could not return (counted in order with the rows around it)."""

    reason: str
    detail: str


def parse_record(raw: bytes | ReadDrop) -> tuple[str | None, list[dict[str, str]]]:
    """Validates one JSONL line; returns (id, messages) or raises RecordError naming the field."""
    if isinstance(raw, ReadDrop):
        raise RecordError(raw.reason, raw.detail)
    if not raw.strip():
        raise RecordError("blank_line", "empty line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError("invalid_utf8", f"byte {e.start}: {e.reason}") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError("invalid_json", f"column {e.colno}: {e.msg} (truncated line?)") from None
    if not isinstance(rec, dict):
        raise RecordError("invalid_json", f"expected an object, got {type(rec).__name__}")
    rid = rec.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise RecordError("bad_field", f"id: expected a string, got {type(rid).__name__}")
    messages = rec.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("missing_messages", "messages: expected a non-empty list")
    clean = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RecordError("bad_field", f"messages[{k}].role: expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise RecordError("bad_field", f"messages[{k}].content: expected a string")
        clean.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise RecordError("no_assistant_turn", "messages: no assistant turn to train on")
    return (None if rid is None else str(rid)), clean


class ChatEncoder:
    """Conversation -> (input_ids int32, loss_mask uint8) with one tokenizer and its chat template."""

    def __init__(self, tokenizer_dir: str, mask_method: str = "auto"):
        # The generic fast class loads tokenizer.json as is (what the manifest fingerprints), and unlike
        # AutoTokenizer it does not pull in torch through transformers' model configs.
        self.tokenizer = tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
        template = tok.chat_template
        if not isinstance(template, str) or not template:
            raise ConfigError(f"{tokenizer_dir}: the tokenizer has no (default) chat template")
        self.chat_template = template
        has_generation = re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None
        if mask_method == "generation" and not has_generation:
            raise ConfigError(f"mask_method: 'generation' needs {{% generation %}} blocks in {tokenizer_dir}'s template")
        self.method = ("generation" if has_generation else "prefix") if mask_method == "auto" else mask_method
        specials = sorted({t.content for t in tok.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
        self.specials = specials
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self.end_of_turn = self._probe_end_of_turn()

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def _probe_end_of_turn(self) -> str | None:
        probe = "lt_jax_probe_7f3a"
        text = self._render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
        pos = text.rfind(probe)
        rest = text[pos + len(probe) :] if pos >= 0 else ""
        return next((s for s in self.specials if rest.startswith(s)), None)

    def encode(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of the rendered conversation and a mask that is 1 on assistant-written tokens."""
        if self._special_re is not None:
            for k, m in enumerate(messages):
                hit = self._special_re.search(m["content"])
                if hit:
                    raise RecordError("special_token_in_content", f"messages[{k}].content contains {hit.group(0)!r}")
        try:
            if self.method == "generation":
                out = self.tokenizer.apply_chat_template(
                    list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                return np.asarray(out["input_ids"], np.int32), np.asarray(out["assistant_masks"], np.uint8)
            return self._encode_by_prefix(messages)
        except RecordError:
            raise
        except Exception as e:  # jinja raise_exception() and friends
            raise RecordError("template_error", f"{type(e).__name__}: {e}") from None

    def assistant_spans(self, messages: Sequence[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of `full` that assistant turns write (the prefix method)."""
        spans = []
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._render(messages[:j], add_generation_prompt=True)
            if not full.startswith(prefix):
                raise RecordError(
                    "template_not_prefix_stable",
                    f"messages[{j}]: rendering the turns before it is not a prefix of the whole conversation; "
                    "add {% generation %} blocks to the chat template",
                )
            start = len(prefix)
            if self.end_of_turn is not None:
                end = full.find(self.end_of_turn, start)
                if end < 0:
                    raise RecordError("template_error", f"messages[{j}]: no {self.end_of_turn!r} after the turn")
                end += len(self.end_of_turn)
            else:
                upto = self._render(messages[: j + 1])
                end = len(upto.rstrip()) if full.startswith(upto) else len(full.rstrip())
            spans.append((start, end))
        return spans

    def _encode_by_prefix(self, messages: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        full = self._render(messages)
        spans = self.assistant_spans(messages, full)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], np.int32)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], np.int64)
        mask = np.zeros(len(ids), np.uint8)
        for a, b in spans:
            mask[(starts >= a) & (starts < b)] = 1
        return ids, mask


# ---------------------------------------------------------------------------------------------
# One shard (runs in a worker process)

_worker_encoder: ChatEncoder | None = None


def _init_worker(tokenizer_dir: str, mask_method: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; workers give the parallelism
    global _worker_encoder
    _worker_encoder = ChatEncoder(tokenizer_dir, mask_method)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    index: int
    lines: list[tuple[int, int, bytes | ReadDrop]]  # (source index, 1-based row number, the row as JSON bytes)
    input_sha256: str


def encode_shard(encoder: ChatEncoder, task: ShardTask, config: TokenizeConfig) -> tuple[list, list, dict]:
    """Encodes a shard's lines; returns (ids, masks, stats) with every drop counted and located."""
    ids, masks, record_ids, drops = [], [], [], []
    truncated = 0
    for src, line_no, raw in task.lines:
        where = f"{config.inputs[src]}:{line_no}"
        try:
            rid, messages = parse_record(raw)
            x, m = encoder.encode(messages)
            if len(x) > config.max_length:
                if config.overlength == "drop":
                    raise RecordError("overlength", f"{len(x)} tokens > max_length {config.max_length}")
                x, m = x[: config.max_length], m[: config.max_length]
                truncated += 1
            if not m.any():
                raise RecordError("no_loss_tokens", "no assistant token left to train on")
        except RecordError as e:
            if config.strict:
                raise InputError(f"{where}: {e.reason}: {e.detail}") from None
            drops.append({"source": config.inputs[src], "line": line_no, "reason": e.reason, "detail": e.detail})
            continue
        ids.append(x)
        masks.append(m)
        record_ids.append(rid)
    lengths = np.array([len(x) for x in ids], np.int64)
    stats = {
        "records": len(ids),
        "lines": len(task.lines),
        "tokens": int(lengths.sum()),
        "loss_tokens": int(sum(int(m.sum()) for m in masks)),
        "longest": int(lengths.max()) if len(ids) else 0,
        "truncated": truncated,
        "length_histogram": np.histogram(lengths, bins=HIST_EDGES + [np.iinfo(np.int64).max])[0].tolist(),
        "drops": drops,
        "ids": record_ids,
        "input_sha256": task.input_sha256,
    }
    return ids, masks, stats


def run_shard(task: ShardTask, config: TokenizeConfig, settings: dict, encoder: ChatEncoder | None = None) -> dict:
    """Encodes, writes and commits one shard; returns its marker."""
    ids, masks, stats = encode_shard(encoder or _worker_encoder, task, config)
    shards_lib.write_shard(shards_lib.shard_dir(config.out, task.index), ids, masks, inner_chunk=config.inner_chunk)
    meta = {"name": shards_lib.shard_name(task.index), "settings": settings, **stats}
    shards_lib.write_marker(config.out, task.index, meta)
    return meta


# ---------------------------------------------------------------------------------------------
# The whole run


def _input_rows(path: str) -> Iterator[tuple[int, bytes | ReadDrop]]:
    """(row number, row as JSON bytes, or the reader's drop) in file order, via the shared reader."""
    pending: list[tuple[int, ReadDrop]] = []
    drops = DropLog(on_error=lambda e: pending.append((e.line or 0, ReadDrop(e.reason, str(e).split(": ", 1)[-1]))))
    for file in formats.list_files(path):
        for line_no, row in formats.read_rows(file, policy="skip", drops=drops):
            yield from pending
            pending.clear()
            yield line_no, json.dumps(row, ensure_ascii=False, default=str).encode("utf-8")
        yield from pending
        pending.clear()


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_chunks(config: TokenizeConfig, sources: list[dict]) -> Iterator[ShardTask]:
    """Streams the inputs once, in order, as shard-sized groups of rows; fills `sources` hashes."""
    batch: list[tuple[int, int, bytes | ReadDrop]] = []
    digest = hashlib.sha256()
    index = count = 0
    for src, path in enumerate(config.inputs):
        count = 0
        for count, (line_no, raw) in enumerate(_input_rows(path), start=1):
            body = raw if isinstance(raw, bytes) else f"drop:{raw.reason}".encode()  # details may say "last line"
            digest.update(f"{src}:{line_no}:{len(body)}:".encode() + body)
            batch.append((src, line_no, raw))
            if len(batch) == config.records_per_shard:
                yield ShardTask(index, batch, digest.hexdigest())
                batch, digest, index = [], hashlib.sha256(), index + 1
        sha = _file_sha256(path) if not storage.isdir(path) else None
        sources.append({"path": path, "sha256": sha, "lines": count})
    if batch:
        yield ShardTask(index, batch, digest.hexdigest())


def _fingerprint(tokenizer_dir: str, encoder: ChatEncoder, config: TokenizeConfig) -> dict:
    tok_json = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.exists(tok_json):
        raise ConfigError(f"{config.tokenizer}: no tokenizer.json (a fast tokenizer is needed for offsets)")
    with open(tok_json, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()
    return {
        "format": shards_lib.FORMAT,
        "tokenizer_sha256": tok_hash,
        "chat_template_sha256": hashlib.sha256(encoder.chat_template.encode()).hexdigest(),
        "mask_method": encoder.method,
        "max_length": config.max_length,
        "overlength": config.overlength,
        "records_per_shard": config.records_per_shard,
        "inner_chunk": config.inner_chunk,
    }


def _reuse_marker(config: TokenizeConfig, task: ShardTask, settings: dict) -> dict | None:
    """The committed marker of `task`'s shard when it can be kept; raises when it belongs elsewhere."""
    meta = shards_lib.read_marker(config.out, task.index)
    if meta is None:
        return None
    where = shards_lib.marker_path(config.out, task.index)
    if meta.get("settings") != settings:
        raise InputError(f"{where}: written with other settings ({meta.get('settings')}); use a new --out or --overwrite")
    if meta.get("input_sha256") != task.input_sha256:
        raise InputError(f"{where}: the input lines of this shard changed since it was written; use --overwrite")
    return meta


def tokenize(
    config: TokenizeConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_shard_done: Callable[[int, dict], None] | None = None,
) -> dict:
    """Runs the whole stage (resuming finished shards) and returns the manifest it wrote."""
    missing = [p for p in config.inputs if not storage.exists(p)]
    if missing:
        raise ConfigError(f"inputs: {', '.join(missing)} not found")
    if overwrite:
        storage.remove(config.out, recursive=True)
    with tempfile.TemporaryDirectory(prefix="lt_jax_tok_") as tmp:
        tok_dir = storage.download_dir(config.tokenizer, tmp)
        encoder = ChatEncoder(tok_dir, config.mask_method)
        settings = _fingerprint(tok_dir, encoder, config)
        committed = shards_lib.committed_shards(config.out)
        total_bytes = sum(storage.filesystem(p).size(p) for p in config.inputs if not storage.isdir(p))
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
        sources: list[dict] = []
        markers: dict[int, dict] = {}

        def done(task: ShardTask, meta: dict) -> None:
            markers[task.index] = meta
            bar.update(sum(len(raw) + 1 for _, _, raw in task.lines if isinstance(raw, bytes)))
            bar.set_postfix(records=sum(m["records"] for m in markers.values()), shards=len(markers))
            if on_shard_done is not None:
                on_shard_done(task.index, meta)

        with _Runner(config, tok_dir, settings, encoder) as runner:
            for task in _read_chunks(config, sources):
                meta = _reuse_marker(config, task, settings) if task.index in committed else None
                if meta is not None:
                    done(task, meta)
                else:
                    runner.submit(task, done)
            runner.drain(done)
        bar.close()
        stale = sorted(committed - set(markers))
        if stale:
            raise InputError(f"{config.out}: shards {stale} do not belong to this input (it has {len(markers)}); use --overwrite")
        manifest = build_manifest(config, settings, encoder, sources, [markers[i] for i in sorted(markers)])
        write_outputs(config, tok_dir, manifest, [markers[i] for i in sorted(markers)])
    return manifest


class _Runner:
    """Runs shard tasks in-process (1 worker) or in a spawn pool with a bounded queue."""

    def __init__(self, config: TokenizeConfig, tok_dir: str, settings: dict, encoder: ChatEncoder):
        self.config, self.settings, self.encoder = config, settings, encoder
        self.workers = config.workers or len(os.sched_getaffinity(0))
        self.pool = None
        if self.workers > 1:
            self.pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=multiprocessing.get_context("spawn"),  # fork after tokenizers/gcsfs threads is unsafe
                initializer=_init_worker,
                initargs=(tok_dir, encoder.method),
            )
        self.pending: dict[cf.Future, ShardTask] = {}

    def submit(self, task: ShardTask, done: Callable) -> None:
        if self.pool is None:
            done(task, run_shard(task, self.config, self.settings, self.encoder))
            return
        while len(self.pending) >= 2 * self.workers:  # bounds the lines held in memory
            self._wait(done)
        self.pending[self.pool.submit(run_shard, task, self.config, self.settings)] = task

    def drain(self, done: Callable) -> None:
        while self.pending:
            self._wait(done)

    def _wait(self, done: Callable) -> None:
        finished, _ = cf.wait(list(self.pending), return_when=cf.FIRST_COMPLETED)
        for fut in sorted(finished, key=lambda f: self.pending[f].index):
            task = self.pending.pop(fut)
            done(task, fut.result())

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def build_manifest(config: TokenizeConfig, settings: dict, encoder: ChatEncoder, sources: list, markers: list) -> dict:
    """Whole-run statistics from the committed shard markers (so a resumed run gives the same bytes)."""
    drops = [d for m in markers for d in m["drops"]]
    by_reason: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    for d in drops:
        by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
        if len(examples.setdefault(d["reason"], [])) < DROP_EXAMPLES_PER_REASON:
            examples[d["reason"]].append(f"{d['source']}:{d['line']}: {d['detail']}")
    hist = np.sum([m["length_histogram"] for m in markers], axis=0).tolist() if markers else []
    tok = encoder.tokenizer
    return {
        "format": shards_lib.FORMAT,
        "num_records": sum(m["records"] for m in markers),
        "num_tokens": sum(m["tokens"] for m in markers),
        "num_loss_tokens": sum(m["loss_tokens"] for m in markers),
        "longest_record": max((m["longest"] for m in markers), default=0),
        "length_histogram": {"edges": HIST_EDGES, "counts": hist, "note": "bin i counts lengths in [edges[i], edges[i+1])"},
        "input_lines": sum(m["lines"] for m in markers),
        "overlength": {"policy": config.overlength, "max_length": config.max_length,
                       "truncated": sum(m["truncated"] for m in markers), "dropped": by_reason.get("overlength", 0)},
        "drops": {"total": len(drops), "by_reason": dict(sorted(by_reason.items())), "examples": dict(sorted(examples.items())),
                  "all": "drops.jsonl"},
        "tokenizer": {"source": config.tokenizer, "copy": "tokenizer", "sha256": settings["tokenizer_sha256"],
                      "chat_template_sha256": settings["chat_template_sha256"], "mask_method": encoder.method,
                      "end_of_turn": encoder.end_of_turn, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
                      "vocab_size": len(tok)},
        "sources": sources,
        "settings": settings,
        "shards": [{k: m[k] for k in ("name", "records", "tokens", "loss_tokens", "lines")} for m in markers],
    }


def write_outputs(config: TokenizeConfig, tok_dir: str, manifest: dict, markers: list) -> None:
    """drops.jsonl and a copy of the tokenizer (for export), then manifest.json last."""
    drops = "".join(json.dumps(d, sort_keys=True) + "\n" for m in markers for d in m["drops"])
    storage.write_text(storage.join(config.out, "drops.jsonl"), drops)
    for name in sorted(os.listdir(tok_dir)):
        if os.path.isfile(os.path.join(tok_dir, name)):
            storage.copy_local_to(os.path.join(tok_dir, name), storage.join(config.out, "tokenizer", name))
    storage.write_text(storage.join(config.out, "manifest.json"), json.dumps(manifest, sort_keys=True, indent=1) + "\n")


__all__ = ["TokenizeConfig", "ChatEncoder", "RecordError", "InputError", "parse_record", "tokenize"]
