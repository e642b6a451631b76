"""`lt-jax perplexity`: query+answer perplexity under a reference model, for DeepDistill's filter.

    lt-jax perplexity --in graded.jsonl --out scored.jsonl --model HF_DIR [--seq-len 4096] [--batch-rows 8]
    lt-jax select --in scored.jsonl --out sft.jsonl max_perplexity=20

The model is loaded with `lt_jax.load_hf` straight into its shardings on the mesh (`mesh.*` as in
training), so scoring scales with the cluster that trains. Texts (the query, a blank line, the final
answer after the thinking) are tokenized, cut to `seq_len`, packed several to a row (segment ids
keep them apart, positions restart per text) and scored `batch_rows` rows per step with one jitted
forward; perplexity = exp(mean next-token negative log-likelihood over the text's tokens after the
first). Output rows are the input rows plus `perplexity` and `perplexity_tokens`, written in input
order and flushed per record: a rerun cuts a torn last line and skips the records already written.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterator, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lt_jax import storage
from lt_jax.data import formats, jsonl
from lt_jax.data.packing import pack_rows, plan_packing
from lt_jax.data.tokenizers import load_tokenizer
from lt_jax.model import hf
from lt_jax.model import sharding as shd
from lt_jax.model.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class PerplexityConfig:
    model: str = ""
    tokenizer: str | None = None  # default: the model folder
    seq_len: int = 4096
    batch_rows: int = 8
    chunk_records: int = 512  # records tokenized, packed and scored together
    text: Literal["query_answer", "query_response"] = "query_answer"
    dtype: str = "float32"
    mesh: MeshConfig = MeshConfig(data=-1, fsdp=1)
    layout: str = "auto"
    fields: dict[str, str] = dataclasses.field(default_factory=dict)
    policy: Literal["skip", "strict"] = "skip"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("perplexity needs model: a Hugging Face folder (local or gs://) to score with")
        if self.seq_len < 2 or self.batch_rows < 1 or self.chunk_records < 1:
            raise ValueError("seq_len must be >= 2, batch_rows and chunk_records >= 1")


def record_text(rec: formats.Record, which: str) -> str:
    """What is scored: the query and the final answer (or the whole response with its thinking)."""
    answer = rec.answer if which == "query_answer" else rec.assistant_text()
    return f"{rec.problem}\n\n{answer}"


class Scorer:
    """A loaded model and tokenizer with one compiled step: packed rows -> per-token NLL."""

    def __init__(self, cfg: PerplexityConfig):
        self.cfg = cfg
        self.mesh = shd.make_mesh(cfg.mesh)
        with jax.set_mesh(self.mesh):
            model = hf.load_hf(cfg.model, mesh=self.mesh, dtype=cfg.dtype)
        self.graphdef, self.state = nnx.split(model)
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.batch_sharding = shd.logical_to_sharding(("act_batch", None), self.mesh)
        self.rows_multiple = shd.axes_size(self.mesh, self.batch_sharding.spec[0])
        self._step = jax.jit(_token_nll, static_argnums=0)

    def nll_rows(self, ids: np.ndarray, seg: np.ndarray, pos: np.ndarray) -> np.ndarray:
        pad = (-len(ids)) % self.rows_multiple
        if pad:
            ids, seg, pos = (np.concatenate([a, np.zeros((pad, a.shape[1]), a.dtype)]) for a in (ids, seg, pos))
        with jax.set_mesh(self.mesh):
            args = [jax.device_put(a, self.batch_sharding) for a in (ids, seg, pos)]
            out = self._step(self.graphdef, self.state, *args)
        return np.asarray(out)[: len(ids) - pad]

    def score(self, texts: list[str]) -> list[tuple[float | None, int]]:
        """(perplexity, scored tokens) per text; (None, 0) for a text of fewer than 2 tokens."""
        seq = self.cfg.seq_len
        toks = [np.asarray(self.tokenizer(t, add_special_tokens=False)["input_ids"][:seq], np.int32) for t in texts]
        lengths = np.array([len(t) for t in toks])
        plan = plan_packing(lengths, np.arange(len(toks)), seq, overlength="truncate")
        sums, counts = np.zeros(len(toks)), np.zeros(len(toks), np.int64)
        rows = [plan.row(r) for r in range(plan.num_rows)]
        for start in range(0, len(rows), self.cfg.batch_rows):
            batch = rows[start : start + self.cfg.batch_rows]
            packed = pack_rows([[{"input_ids": toks[i], "loss_mask": np.ones_like(toks[i])} for i in row] for row in batch], seq)
            nll = self.nll_rows(packed["input_ids"], packed["segment_ids"], packed["positions"])
            for b, row in enumerate(batch):
                seg = packed["segment_ids"][b, 1:]
                for k, i in enumerate(row, start=1):
                    mask = (seg == k) & (packed["positions"][b, 1:] > 0)
                    sums[i] += nll[b][mask].sum()
                    counts[i] += int(mask.sum())
        return [(float(math.exp(s / c)) if c else None, int(c)) for s, c in zip(sums, counts)]


def _token_nll(graphdef, state, ids, seg, pos):
    """NLL of each next token [B, S-1]; 0 where the next token starts a new text or is padding."""
    logits = nnx.merge(graphdef, state)(ids, positions=pos, segment_ids=seg)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return jnp.where(same, nll, 0.0)


def _records(cfg: PerplexityConfig, path: str, skip: int, drops: jsonl.DropLog) -> Iterator[formats.Record]:
    for i, rec in enumerate(formats.read_records(path, layout=cfg.layout, fields=cfg.fields, policy=cfg.policy, drops=drops)):
        if i >= skip:
            yield rec


def _chunks(it: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for x in it:
        chunk.append(x)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def score_file(in_path: str, out_path: str, cfg: PerplexityConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Scores every record of `in_path` into `out_path`, resuming after the records already there."""
    start = time.time()
    done = 0
    if storage.exists(out_path):
        jsonl.repair_tail(out_path)
        done = sum(1 for _ in jsonl.read_jsonl(out_path))
    scorer = scorer or Scorer(cfg)
    drops = jsonl.DropLog()
    scored = tokens = 0
    with jsonl.JsonlWriter(out_path, resume=True) as writer:
        for chunk in _chunks(_records(cfg, in_path, done, drops), cfg.chunk_records):
            results = scorer.score([record_text(r, cfg.text) for r in chunk])
            for rec, (ppl, n) in zip(chunk, results):
                writer.write({**(rec.raw or {}), "perplexity": ppl, "perplexity_tokens": n})
                scored += 1
                tokens += n
    seconds = time.time() - start
    return {"input": in_path, "output": out_path, "already_scored": done, "scored": scored, "tokens": tokens,
            "bad_input_rows": drops.total, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / max(seconds, 1e-9), 1)}
