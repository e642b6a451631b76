"""Text normalisation, exact and near-duplicate detection, and decontamination against eval sets.

- `normalize` folds what should not make two problems different: Unicode form (NFKC), case,
  whitespace, `$` delimiters, LaTeX spacing ("\\frac {1} {2}" == "\\frac{1}{2}"), spacing commands
  (\\, \\; \\quad ...), \\left / \\right and \\dfrac / \\tfrac.
- `exact_key` hashes the normalised text with all whitespace removed: the exact-match key.
- `tokens` splits normalised text into alphanumeric runs, one token per CJK character and one per
  arithmetic / relation symbol (so "4 + 1" and "4 * 1" differ), so n-grams ignore punctuation,
  braces and other LaTeX syntax.
- `NearDuplicates` is MinHash-LSH (datasketch) over word n-gram shingles; LSH candidates are
  confirmed by the true Jaccard similarity of the shingle sets, so the threshold is exact.
- `Decontaminator` flags a text that matches a benchmark item exactly after normalisation, or
  shares one `ngram`-token window (13 by default, as in GPT-3's decontamination) with it. N-grams
  that occur in `boilerplate_items` or more distinct benchmark texts (instructions such as "Express
  your answer as a common fraction") are ignored, so boilerplate alone never flags a problem; the
  same item loaded twice (a benchmark as .jsonl and .parquet) counts once. An item shorter than
  `ngram` tokens has no window, so it flags a text that contains all of it, in order ("Solve the
  following: " + item); items under `MIN_WHOLE_TOKENS` tokens match only exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import unicodedata
from typing import Any, Iterable, Sequence

from lt_jax import storage
from lt_jax.data import formats

_SPACING = re.compile(r"\\(?:[,;:! ]|(?:quad|qquad|enspace|thinspace|medspace|thickspace)(?![a-zA-Z]))")
_LEFT_RIGHT = re.compile(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])")
_FRAC = re.compile(r"\\[dt]frac(?![a-zA-Z])")
_AROUND = re.compile(r"\s*([{}^_()\[\],=+\-*/])\s*")
_CMD_SPACE = re.compile(r"(\\[a-zA-Z]+)\s+(?=[{\\])")
_WS = re.compile(r"\s+")
# Braces around one character or one command after ^ / _ group nothing: "18^{6}" is "18^6".
_GROUP = re.compile(r"([\^_])\{(\\[a-zA-Z]+|[^{}\\\s])\}")
MIN_WHOLE_TOKENS = 3
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]|[^\W_]+|[-+*/=<>^|%!×÷·≤≥≠]")


def normalize(text: str) -> str:
    """Canonical form of a problem text for comparisons (see the module docstring)."""
    t = unicodedata.normalize("NFKC", text or "").lower()
    t = t.replace("$", " ")
    t = _SPACING.sub(" ", t)
    t = _LEFT_RIGHT.sub("", t)
    t = _FRAC.sub(r"\\frac", t)
    t = _CMD_SPACE.sub(r"\1", t)
    t = _AROUND.sub(r"\1", t)
    t = _GROUP.sub(lambda m: m.group(1) + m.group(2) + (" " if len(m.group(2)) > 1 else ""), t)  # "\\alpha 90" stays two tokens
    return _WS.sub(" ", t).strip()


def exact_key(text: str) -> str:
    """Hash of the normalised text with every space removed."""
    compact = normalize(text).replace(" ", "")
    return hashlib.sha1(compact.encode("utf-8")).hexdigest()


def tokens(text: str) -> list[str]:
    """Alphanumeric runs, single CJK characters and single math symbols of the normalised text."""
    return _TOKEN.findall(normalize(text))


def shingles(toks: Sequence[str], n: int) -> set[str]:
    """Word n-grams; a text shorter than n is one shingle."""
    if len(toks) < n:
        return {" ".join(toks)} if toks else set()
    return {" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)}


def jaccard(a: set, b: set) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def strip_common_affixes(texts: Sequence[str], min_texts: int = 2) -> list[str]:
    """Removes the prefix and suffix every text shares (a prompt template), at word boundaries.

    With fewer than `min_texts` distinct texts nothing is stripped: one text has no template to
    tell apart from its content.
    """
    distinct = sorted(set(texts))
    if len(distinct) < min_texts:
        return list(texts)
    prefix = os.path.commonprefix(distinct)
    suffix = os.path.commonprefix([t[::-1] for t in distinct])[::-1]
    cut = [m.end() for m in _WS.finditer(prefix)]
    prefix = prefix[: cut[-1]] if cut else ""
    first = _WS.search(suffix)
    suffix = suffix[first.start() :] if first else ""
    shortest = min(len(t) for t in distinct)
    if len(prefix) + len(suffix) >= shortest:  # overlapping affixes: keep the prefix only
        suffix = ""
    return [t[len(prefix) : len(t) - len(suffix) if suffix else None] for t in texts]


# ---------------------------------------------------------------------------------------------
# Near duplicates


@dataclasses.dataclass
class NearDuplicates:
    """Incremental near-duplicate finder: `add(key, text)` returns the earlier key it duplicates."""

    threshold: float = 0.85
    ngram: int = 5
    num_perm: int = 128

    def __post_init__(self) -> None:
        from datasketch import MinHashLSH  # 1.3 s (scipy): only selects with dedup_near pay it

        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {self.threshold}")
        self._lsh = MinHashLSH(threshold=self.threshold, num_perm=self.num_perm)
        self._sets: dict[Any, frozenset] = {}

    def add(self, key: Any, text: str) -> tuple[Any, float] | None:
        """Indexes `text` unless it is a near duplicate; then returns (earlier key, Jaccard)."""
        from datasketch import MinHash  # as in __post_init__

        sh = frozenset(shingles(tokens(text), self.ngram))
        if not sh:
            return None
        mh = MinHash(num_perm=self.num_perm)
        mh.update_batch([s.encode("utf-8") for s in sh])
        best = None
        for other in self._lsh.query(mh):
            sim = jaccard(sh, self._sets[other])
            if sim >= self.threshold and (best is None or sim > best[1]):
                best = (other, sim)
        if best is None:
            self._lsh.insert(key, mh)
            self._sets[key] = sh
        return best


# ---------------------------------------------------------------------------------------------
# Decontamination


@dataclasses.dataclass(frozen=True)
class BenchItem:
    benchmark: str
    item: str
    text: str


@dataclasses.dataclass(frozen=True)
class Hit:
    """A contaminated text: what matched, how, and (for n-grams) the shared window."""

    benchmark: str
    item: str
    kind: str  # "exact" | "ngram" | "whole" (a short item found whole inside the text)
    ngram: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TEXT_FIELDS = ("problem", "question", "prompt", "context", "instruction", "query")
ID_FIELDS = ("id", "unique_id", "problem_id", "question_id")


def load_benchmark(spec: str) -> list[BenchItem]:
    """Items of an eval file "PATH" or "PATH:FIELD" (JSONL / JSON / Parquet; a folder: every file).

    Without FIELD, the first of problem, question, prompt, context, instruction, query present in
    a row is used. The benchmark name is "<parent folder>/<file name>".
    """
    path, field = _split_spec(spec)
    items: list[BenchItem] = []
    for file in _bench_files(path):
        name = "/".join(str(file).replace("\\", "/").rstrip("/").split("/")[-2:])
        for line, row in formats.read_rows(file, policy="strict"):
            key = field or next((k for k in TEXT_FIELDS if isinstance(row.get(k), str)), None)
            text = row.get(key) if key else None
            if not isinstance(text, str):
                raise ValueError(f"{file}:{line}: no text field ({field or ', '.join(TEXT_FIELDS)}); pass PATH:FIELD")
            item_id = next((str(row[k]) for k in ID_FIELDS if row.get(k) is not None), f"line {line}")
            items.append(BenchItem(name, item_id, text))
    if not items:
        raise ValueError(f"decontamination set {spec!r} has no items")
    return items


def _split_spec(spec: str) -> tuple[str, str | None]:
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail:  # "gs://b/x.jsonl" splits into ("gs", "//b/..."): not a field
        return head, tail
    return spec, None


def _bench_files(path: str) -> list[str]:
    if not storage.isdir(path):
        return [path]
    found = sorted(storage.filesystem(path).find(str(path)))  # recursive; object stores drop the scheme
    scheme = str(path).split("://", 1)[0] + "://" if storage.is_remote(path) else ""
    return [f if f.startswith(scheme) else scheme + f for f in found if f.endswith(formats.SUFFIXES)]


class Decontaminator:
    """Index of benchmark items; `check(text)` returns a `Hit` or None."""

    def __init__(self, items: Iterable[BenchItem], ngram: int = 13, boilerplate_items: int = 3):
        if ngram < 1:
            raise ValueError(f"decontamination n-gram must be >= 1, got {ngram}")
        self.ngram = ngram
        self.items = list(items)
        self._exact: dict[str, BenchItem] = {}
        self._short: dict[tuple[str, ...], int] = {}
        owners: dict[tuple[str, ...], dict[str, int]] = {}  # n-gram -> {distinct text: first item}
        for i, it in enumerate(self.items):
            key = exact_key(it.text)
            self._exact.setdefault(key, it)
            toks = tokens(it.text)
            if MIN_WHOLE_TOKENS <= len(toks) < ngram:
                self._short.setdefault(tuple(toks), i)
            for g in _windows(toks, ngram):
                owners.setdefault(g, {}).setdefault(key, i)
        limit = boilerplate_items if boilerplate_items > 0 else None
        self._ngrams = {g: min(o.values()) for g, o in owners.items() if limit is None or len(o) < limit}
        self.boilerplate_ngrams = len(owners) - len(self._ngrams)
        self._short_lengths = sorted({len(t) for t in self._short})

    def check(self, *texts: str) -> Hit | None:
        """The first benchmark match of any of `texts` (exact first, then n-gram, then a short item whole)."""
        for text in texts:
            it = self._exact.get(exact_key(text))
            if it is not None:
                return Hit(it.benchmark, it.item, "exact")
        toks = [tokens(text) for text in texts]
        for t in toks:
            for g in _windows(t, self.ngram):
                i = self._ngrams.get(g)
                if i is not None:
                    it = self.items[i]
                    return Hit(it.benchmark, it.item, "ngram", " ".join(g))
        for t in toks:
            for n in self._short_lengths:
                for g in _windows(t, n):
                    i = self._short.get(g)
                    if i is not None:
                        it = self.items[i]
                        return Hit(it.benchmark, it.item, "whole", " ".join(g))
        return None


def _windows(toks: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(toks[i : i + n]) for i in range(len(toks) - n + 1))
