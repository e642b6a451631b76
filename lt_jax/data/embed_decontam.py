"""Embedding decontamination: problems whose embedding is within cosine `threshold` of an eval item.

DeepDistill adds this to exact and n-gram matching: near duplicates under an embedding model
(bge-m3 in the paper) with cosine similarity > 0.9 are removed. Any encoder folder transformers can
load (AutoModel + its tokenizer; local or gs://) works: bge-m3 pools the [CLS] state (`pooling:
cls`), sentence-transformers models such as all-MiniLM average the tokens (`pooling: mean`). The
encoder runs with PyTorch (install torch; the CPU build is enough for eval-set sized indexes).
Benchmark items are embedded once; problems are embedded in batches and compared by one matrix
product per batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Literal, Sequence

import numpy as np

from lt_jax import storage
from lt_jax.data.dedup import BenchItem


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    path: str
    pooling: Literal["cls", "mean"] = "cls"
    batch_size: int = 32
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 2:
            raise ValueError("embedder batch_size must be >= 1 and max_length >= 2")


class Embedder:
    """Unit-norm sentence embeddings from a transformers encoder folder."""

    def __init__(self, cfg: EmbedderConfig):
        try:
            import torch  # noqa: F401  (optional: a test extra, not a dependency)
        except ImportError:
            raise ImportError("embedding decontamination runs the encoder with PyTorch: pip install torch") from None
        from transformers import AutoModel, AutoTokenizer  # with torch, only for embedding decontamination

        self.cfg = cfg
        local = storage.local_folder(cfg.path, prefix="lt_jax_embed_")
        self.tokenizer = AutoTokenizer.from_pretrained(local)
        self.model = AutoModel.from_pretrained(local).eval()

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 rows of unit length."""
        import torch  # optional: a test extra, not a dependency

        out = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = self.tokenizer(list(texts[start : start + self.cfg.batch_size]), padding=True, truncation=True,
                                   max_length=self.cfg.max_length, return_tensors="pt")
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            if self.cfg.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


class EmbeddingIndex:
    """Eval items' embeddings; `hits` finds the problems within `threshold` cosine of any of them."""

    def __init__(self, items: Iterable[BenchItem], embedder: Any, threshold: float = 0.9):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"embedding decontamination threshold must be in (0, 1], got {threshold}")
        self.items = list(items)
        self.embedder, self.threshold = embedder, threshold
        self.matrix = embedder.encode([it.text for it in self.items])

    def hits(self, texts: dict[str, str], batch: int = 1024) -> dict[str, dict[str, Any]]:
        """{problem id: {benchmark, item, kind: "embedding", similarity}} for problems above the threshold."""
        out: dict[str, dict[str, Any]] = {}
        pids = list(texts)
        for start in range(0, len(pids), batch):
            chunk = pids[start : start + batch]
            sims = self.embedder.encode([texts[p] for p in chunk]) @ self.matrix.T
            best = sims.argmax(axis=1)
            for row, pid in enumerate(chunk):
                sim = float(sims[row, best[row]])
                if sim > self.threshold:
                    it = self.items[best[row]]
                    out[pid] = {"benchmark": it.benchmark, "item": it.item, "kind": "embedding", "ngram": None,
                                "similarity": round(sim, 4)}
        return out
