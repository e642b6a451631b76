"""Robust JSON Lines I/O shared by the data stages: read with counted drops, append resumably.

Readers never stop silently: a line that is not valid UTF-8, not valid JSON (a torn last line from a
killed writer, say) or not a JSON object is either counted in a `DropLog` under a named reason
(policy "skip") or raised as a `DataError` naming file, line and field (policy "strict"). Records read
before a bad line have already been yielded, so a strict run keeps everything it wrote.

Writers append one line per record and flush it, so a killed stage leaves complete lines plus at
most one torn tail, which `repair_tail` cuts off before a resumed run appends again. Object stores
(gs://) cannot append: there the writer stages lines in a local file and uploads the whole object
every `sync_every_s` seconds and on close, so the remote object is always a prefix of whole lines.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tempfile
import time
import zlib
from collections import Counter
from typing import IO, Any, Callable, Iterable, Iterator, Literal

from lt_jax import storage

Policy = Literal["skip", "strict"]
POLICIES = ("skip", "strict")


class DataError(ValueError):
    """Bad input: names the file, the line (or row / item) and the field at fault."""

    def __init__(self, path: str, line: int | None, field: str | None, message: str, reason: str = "invalid"):
        self.path, self.line, self.field, self.reason = path, line, field, reason
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")


@dataclasses.dataclass
class DropLog:
    """Counts dropped records by reason and keeps the first few locations of each, for reports."""

    max_examples: int = 5
    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    # Called with each DataError as it is counted (a stage that keeps every drop in order, e.g. tokenize).
    on_error: Callable[["DataError"], None] | None = dataclasses.field(default=None, repr=False, compare=False)

    def add(self, reason: str, where: str = "", n: int = 1) -> None:
        self.counts[reason] += n
        shown = self.examples.setdefault(reason, [])
        if where and len(shown) < self.max_examples:
            shown.append(where)

    def add_error(self, err: DataError) -> None:
        self.add(err.reason, str(err))
        if self.on_error is not None:
            self.on_error(err)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: "DropLog") -> None:
        for reason, n in other.counts.items():
            self.counts[reason] += n
            for ex in other.examples.get(reason, []):
                if len(self.examples.setdefault(reason, [])) < self.max_examples:
                    self.examples[reason].append(ex)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())), "examples": self.examples}


def check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def handle(err: DataError, policy: str, drops: DropLog | None) -> None:
    """Raises `err` under "strict"; counts it under "skip"."""
    if policy == "strict":
        raise err
    if drops is not None:
        drops.add_error(err)


def dumps(record: dict[str, Any]) -> str:
    """One compact JSON line (UTF-8 kept as is, no trailing newline)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def _open_read(path: str) -> Iterator[IO[bytes]]:
    with storage.open_file(path, "rb") as raw:
        yield gzip.GzipFile(fileobj=raw) if str(path).endswith(".gz") else raw


def read_jsonl(path: str, *, policy: Policy = "skip", drops: DropLog | None = None) -> Iterator[tuple[int, dict]]:
    """Yields (1-based line number, object) for each good line of a JSONL file (local, gs://, .gz).

    Blank lines are skipped without counting. Bad lines are dropped or raised per `policy` with
    reasons "invalid_utf8", "invalid_json" (includes a truncated last line) and "not_an_object".
    """
    check_policy(policy)
    for handle_ in _open_read(path):
        for line_no, raw in _lines(path, handle_, policy, drops):
            if line_no == 1 and raw.startswith(_BOM):  # editors on Windows write one; it is not data
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                handle(DataError(path, line_no, None, f"invalid UTF-8 at byte {e.start}", "invalid_utf8"), policy, drops)
                continue
            try:
                obj = loads(text)
            except json.JSONDecodeError as e:
                tail = "" if raw.endswith(b"\n") else " (truncated last line?)"
                handle(DataError(path, line_no, None, f"invalid JSON: {e.msg} at column {e.colno}{tail}", "invalid_json"), policy, drops)
                continue
            if not isinstance(obj, dict):
                handle(DataError(path, line_no, None, f"expected a JSON object, got {type(obj).__name__}", "not_an_object"), policy, drops)
                continue
            yield line_no, obj


_BOM = b"\xef\xbb\xbf"


def loads(text: str | bytes) -> Any:
    """json.loads that reports nesting too deep for Python's parser as a JSONDecodeError, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to parse", text if isinstance(text, str) else "", 0) from None


def _lines(path: str, f: IO[bytes], policy: Policy, drops: DropLog | None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line); a cut or corrupt .gz stream ends the file as one located drop."""
    line_no = 0
    try:
        for line_no, raw in enumerate(f, start=1):
            yield line_no, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        reason = "truncated_gzip" if isinstance(e, EOFError) else "invalid_gzip"
        handle(DataError(path, line_no + 1, None, f"compressed stream is cut or corrupt ({e}); lines before it kept", reason), policy, drops)


def repair_tail(path: str) -> int:
    """Cuts a torn (newline-less) last line off a local file; returns the bytes removed.

    A remote object written by `JsonlWriter` never has a torn tail, so remote paths return 0.
    """
    if storage.is_remote(path) or not os.path.exists(path):
        return 0
    size = os.path.getsize(path)
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline in chunks; a torn tail is at most one record long.
        pos, chunk = size, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            idx = block.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


class JsonlWriter:
    """Appends JSON lines to a local or gs:// file, flushing each record.

    With `resume=True` an existing file is kept (its torn tail cut off) and appended to; otherwise
    it is replaced. Use as a context manager; `close()` performs the final upload for gs:// paths.
    """

    def __init__(self, path: str, *, resume: bool = False, sync_every_s: float = 30.0):
        self.path = str(path)
        self.remote = storage.is_remote(self.path)
        self.sync_every_s = sync_every_s
        self.count = 0
        self._last_sync = time.monotonic()
        if self.remote:
            fd, self._local = tempfile.mkstemp(suffix=".jsonl", prefix="lt_jax_")
            os.close(fd)
            if resume and storage.exists(self.path):
                with open(self._local, "wb") as f:
                    f.write(storage.read_bytes(self.path))
                repair_tail(self._local)
        else:
            self._local = self.path
            if resume:
                repair_tail(self.path)
            elif os.path.exists(self.path):
                os.remove(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(self._local)), exist_ok=True)
        self._f = open(self._local, "ab")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write((dumps(record) + "\n").encode("utf-8"))
        self._f.flush()
        self.count += 1
        if self.remote and time.monotonic() - self._last_sync > self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Uploads the staged file (gs:// only): the object is replaced whole, so it is never torn."""
        self._f.flush()
        if self.remote:
            storage.copy_local_to(self._local, self.path)
            self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._f.closed:
            return
        self.sync()
        self._f.close()
        if self.remote:
            os.remove(self._local)

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def write_jsonl(path: str, records: Iterable[dict[str, Any]]) -> int:
    """Writes a whole JSONL file atomically (temp file + rename locally; one object upload on gs://)."""
    buf = io.BytesIO()
    n = 0
    for rec in records:
        buf.write((dumps(rec) + "\n").encode("utf-8"))
        n += 1
    if storage.is_remote(path):
        storage.write_bytes(path, buf.getvalue())
        return n
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp_", suffix=".jsonl")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return n


def write_json(path: str, obj: Any) -> None:
    """Writes a JSON document (reports, summaries) to a local or gs:// path."""
    storage.write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
