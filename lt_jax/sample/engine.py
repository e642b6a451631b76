"""The generation engine: continuous batching of requests over a paged KV cache.

A fixed number of decode slots and a queue of requests (a prompt and one `RowSpec` per sample).
Every `step` does at most one prefill chunk of the request at the head of the queue (so a long
prompt never stalls decoding for more than one chunk) and one jitted decode chunk of
`decode_steps` steps over every occupied slot. A sample that finishes frees its slot and its
pages at once; the next waiting sample takes the slot at the following step.

The n samples of a request share its prefill: the prompt is run once into pages, the samples
share its full pages (reference counts) and each copies the last, partial one. Pages are taken
as a row grows (before each decode chunk, enough for the chunk) and returned when it ends. When
pages run out, the youngest running sample is preempted: its pages are returned and it is queued
again (first in line) with its prompt plus the tokens it has made, to be prefilled again and
continue where it stopped. Nothing is ever truncated: a request whose prompt plus max_new_tokens
does not fit the context (or the whole page budget) is refused when submitted.

Randomness: token t of a sample is drawn with key fold_in(key(seed), t) (`sampler.step_keys`), so
a seeded sample gives the same tokens whatever else runs, when it was admitted, which slot it got,
how many slots there are, the page size, and whether it was preempted.

All decisions (admission, preemption, finishing) are made by this host loop from the request
operations and the tokens the device returns, so they are identical wherever the same operations
are applied in the same order. On several hosts (`hosts`), requests enter at process 0, which
broadcasts its operations at the start of each step; the other processes replay them (`follow`).
The configuration is `engine_config`'s, the device calls are in `engine_calls`.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lt_jax.sample import engine_calls as calls
from lt_jax.sample import hosts, paged, penalties
from lt_jax.sample import rows as rw
from lt_jax.sample import sampler as smp
from lt_jax.sample.detokenize import Decode, TextStream
from lt_jax.sample.engine_calls import abstract_calls  # noqa: F401 (lt-jax compile --sampler)
from lt_jax.sample.engine_config import STOP_WIDTH, EngineConfig, cache_dtype

log = logging.getLogger(__name__)

class Update(NamedTuple):
    """New tokens of sample `index` of request `request`; `finish_reason` set on its last update."""

    request: int
    index: int
    tokens: list[int]
    finish_reason: Optional[str]


@dataclasses.dataclass
class _Seq:
    request: int
    index: int
    spec: smp.RowSpec
    prompt: list
    result: smp.RowResult
    slot: Optional[int] = None
    pages: list = dataclasses.field(default_factory=list)
    length: int = 0  # tokens in the cache (the next fed token goes to this position)
    admitted: int = -1  # admission order, for picking the youngest to preempt

    @property
    def cap(self) -> int:
        """Most tokens this sample ever holds in the cache (its last token is never fed)."""
        return len(self.prompt) + self.spec.max_new_tokens - 1


@dataclasses.dataclass
class _Job:
    """A prefill: `ids` run into pages, then `seqs` take slots (the n samples of a fresh request,
    or one preempted sample resuming)."""

    ids: list
    seqs: collections.deque
    pages: list = dataclasses.field(default_factory=list)
    done: int = 0  # tokens prefilled so far
    logits: Optional[jax.Array] = None  # [1, V] after the last chunk


class Engine:
    """Continuous batching over a paged KV cache (see the module doc). Not thread-safe: one thread
    calls submit / cancel / step (the server runs it on its backend thread)."""

    def __init__(self, model, config: EngineConfig = EngineConfig(), mesh=None, decode: Optional[Decode] = None):
        self.config = hosts.agree(config.resolve(model.config))  # process 0's page budget everywhere
        self.model_config = model.config
        self.mesh = smp.model_mesh(model) if mesh is None else mesh
        self.graphdef, self.params = nnx.split(model)
        self.decode = decode
        cfg = self.config
        self.width = paged.pages_for(cfg.max_len, cfg.page_size)
        if self.width > cfg.num_pages - 1:
            log.warning("page budget (%d pages of %d) is below one sample at max_len %d; long samples are refused",
                        cfg.num_pages - 1, cfg.page_size, cfg.max_len)
        self.allocator = paged.PageAllocator(cfg.num_pages)
        self.counts = penalties.SlotCounts(cfg.num_slots, model.config.vocab_size)
        with smp.mesh_context(self.mesh):
            self.cache = paged.init_pages(model.config, cfg.num_pages, cfg.page_size, cache_dtype(cfg.cache_dtype))
        self.slots: list[Optional[_Seq]] = [None] * cfg.num_slots
        self.queue: collections.deque[_Job] = collections.deque()  # waiting for prefill
        self.ready: collections.deque[_Job] = collections.deque()  # prefilled, samples waiting for slots
        self.prefilling: Optional[_Job] = None
        self.requests: dict[int, list[_Seq]] = {}
        self._next_request = 0
        self._admissions = 0
        self._stalls = 0
        self.stats = collections.Counter()
        self.inbox = hosts.Inbox() if hosts.several() else None  # multi-host: process 0's operations
        self._awaiting: set[int] = set()  # other processes: ids submitted here, not yet sent by process 0
        self.closed = False

    # -- requests ---------------------------------------------------------------------------------

    def check(self, prompt: Sequence[int], specs: Sequence[smp.RowSpec]) -> None:
        """Raises ValueError when the request cannot be served (before it is queued)."""
        if len(prompt) == 0:
            raise ValueError("the prompt is empty")
        if not specs:
            raise ValueError("a request needs at least one sample")
        cfg = self.config
        for s in specs:
            if s.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
            total = len(prompt) + s.max_new_tokens
            if total > cfg.max_len:
                raise ValueError(f"the prompt has {len(prompt)} tokens and max_new_tokens is {s.max_new_tokens}: "
                                 f"{total} tokens exceed the context of {cfg.max_len}; shorten the prompt or "
                                 f"lower max_new_tokens to {max(cfg.max_len - len(prompt), 0)}")
            if paged.pages_for(total - 1, cfg.page_size) > cfg.num_pages - 1:
                raise ValueError(f"{total} tokens need more pages than the engine's budget "
                                 f"({cfg.num_pages - 1} pages of {cfg.page_size})")
            if not 0 <= s.min_p <= 1 or not 0 <= s.min_tokens <= s.max_new_tokens:
                raise ValueError(f"min_p must be in [0, 1] and min_tokens in [0, max_new_tokens], got "
                                 f"{s.min_p} and {s.min_tokens}")
            if s.logprobs is not None and not 0 <= s.logprobs <= cfg.max_logprobs:
                raise ValueError(f"logprobs must be in [0, {cfg.max_logprobs}] (top alternatives per token), "
                                 f"got {s.logprobs}")
            if s.stop and self.decode is None:
                raise ValueError("stop strings need a decode function (a tokenizer)")

    def submit(self, prompt: Sequence[int], specs: Sequence[smp.RowSpec], *, track_text: bool = False) -> int:
        """Queues a request (one sample per spec); returns its id. Raises ValueError (nothing queued)
        when it cannot be served. On several hosts only process 0's requests run: another process
        that submits the same requests in the same order (every host running one program) gets
        the same ids, and their results once process 0's operations reach it."""
        self.check(prompt, specs)
        rid = self._next_request
        if self.inbox is not None and not self.inbox.primary:
            self._awaiting.add(rid)
            self._next_request += 1
            return rid
        self._open(rid, list(prompt), list(specs), track_text)
        return rid

    def _open(self, rid: int, prompt: list, specs: list, track_text: bool) -> None:
        if self.inbox is not None:
            self.inbox.record("open", rid, prompt, specs, track_text)
        self._next_request = max(self._next_request, rid + 1)
        self._awaiting.discard(rid)
        seqs = [_Seq(rid, j, s, prompt, smp.RowResult(
            [], stream=TextStream(self.decode, s.stop) if (s.stop or track_text) else None))
            for j, s in enumerate(specs)]
        self.requests[rid] = seqs
        self.queue.append(_Job(prompt, collections.deque(seqs)))

    def results(self, rid: int) -> list[smp.RowResult]:
        return [s.result for s in self.requests[rid]]

    def pop(self, rid: int) -> list[smp.RowResult]:
        """The results of a finished request, forgetting it."""
        if self.inbox is not None:
            self.inbox.record("pop", rid)
        return [s.result for s in self.requests.pop(rid)]

    def finished(self, rid: int) -> bool:
        return all(s.result.finish_reason is not None for s in self.requests[rid])

    def cancel(self, rid: int) -> None:
        """Stops a request now: its slots and pages are freed; unfinished samples end "cancelled".
        On several hosts only process 0's cancels count (the others follow them)."""
        if self.inbox is not None:
            if not self.inbox.primary:
                return
            self.inbox.record("cancel", rid)
        self._cancel(rid)

    def _cancel(self, rid: int) -> None:
        seqs = self.requests.get(rid)
        if seqs is None:
            return
        self.stats["cancelled"] += 1
        for s in seqs:
            if s.result.finish_reason is None:
                s.result.finish_reason = "cancelled"
                self._drop(s)
        for jobs in (self.queue, self.ready):
            for job in [j for j in jobs if j.seqs and j.seqs[0].request == rid]:
                jobs.remove(job)
                self.allocator.release(job.pages)
        if self.prefilling is not None and self.prefilling.seqs and self.prefilling.seqs[0].request == rid:
            self.allocator.release(self.prefilling.pages)
            self.prefilling = None

    # -- several hosts ----------------------------------------------------------------------------

    @property
    def lockstep(self) -> bool:
        """Whether several processes run this engine: each step is then taken by all of them
        together, so a server steps it even when idle (the others wait in `follow`)."""
        return self.inbox is not None

    def follow(self) -> None:
        """Processes other than 0: steps in lockstep with process 0 until it calls `close`."""
        while not self.closed:
            self.step()

    def close(self) -> None:
        """Process 0: ends the other processes' `follow` (one exchange, matching their step)."""
        if self.inbox is not None and self.inbox.primary and not self.closed:
            self.inbox.record("close")
            self.inbox.exchange()
        self.closed = True

    def _sync(self) -> None:
        """Every process: process 0's operations since the last step, replayed on the others."""
        for op, *args in self.inbox.exchange():
            if op == "open":
                self._open(*args)
            elif op == "cancel":
                self._cancel(*args)
            elif op == "pop":
                self.requests.pop(args[0], None)
            elif op == "close":
                self.closed = True

    @property
    def busy(self) -> bool:
        return bool(self._awaiting or self.queue or self.ready or self.prefilling or any(self.slots))

    def run(self, prompts: Sequence[Sequence[int]], specs: Sequence[Sequence[smp.RowSpec]],
            track_text: bool = False) -> list[list[smp.RowResult]]:
        """Every request to completion; results per prompt, per sample."""
        rids = [self.submit(p, s, track_text=track_text) for p, s in zip(prompts, specs)]
        while self.busy:
            self.step()
        return [self.pop(r) for r in rids]

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> list[Update]:
        """One round: admit waiting samples into free slots, one prefill chunk, one decode chunk."""
        if self.inbox is not None:
            self._sync()
            if self.closed:
                return []
        before = (self.stats["prefill_calls"], self.stats["decode_calls"], self._admissions)
        with smp.mesh_context(self.mesh):
            updates = self._admit()
            budget = self.config.prefill_chunk  # prompt tokens per step, over as many prompts as fit
            while budget > 0:
                done = self._prefill_step()
                if not done:
                    break
                budget -= done
            updates += self._admit()
            if any(self.slots):
                updates += self._decode_step()
        after = (self.stats["prefill_calls"], self.stats["decode_calls"], self._admissions)
        if self.busy and after == before and not updates:
            self._stalls += 1
            if self._stalls > 2:  # a scheduling bug must fail loudly, never hang a server or an eval
                raise RuntimeError(f"generation engine stalled: {self.describe()}")
        else:
            self._stalls = 0
        return updates

    def describe(self) -> str:
        """The scheduler's state in one line (for errors and logs)."""
        running = sum(s is not None for s in self.slots)
        return (f"{running}/{len(self.slots)} slots running, {len(self.queue)} waiting for prefill, "
                f"{len(self.ready)} prefilled, {self.allocator.available} of {self.config.num_pages - 1} pages free")

    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def _admit(self) -> list[Update]:
        """Samples of prefilled requests into free slots; their first tokens drawn in one call."""
        placed: list[tuple[_Seq, _Job]] = []
        free = self._free_slots()
        while free and self.ready:
            job = self.ready[0]
            seq = job.seqs[0]
            if len(job.seqs) == 1:  # the last sample takes the prompt's pages over: no copy
                seq.pages, seq.length, job.pages = job.pages, len(job.ids), []
            elif not self._take_prompt_pages(seq, job):
                if any(self.slots):
                    break  # no page for its copy: wait for running samples to free some
                # Nothing runs to free a page: this sample takes the prompt's pages over and the
                # others wait to be prefilled again.
                rest = _Job(job.ids, collections.deque(list(job.seqs)[1:]))
                job.seqs = collections.deque([seq])
                self.queue.appendleft(rest)
                self.stats["requeued"] += 1
                continue
            job.seqs.popleft()
            seq.slot = free.pop(0)
            self.slots[seq.slot] = seq
            seq.admitted, self._admissions = self._admissions, self._admissions + 1
            placed.append((seq, job))
            if not job.seqs:
                self.ready.popleft()
                self.allocator.release(job.pages)
                job.pages = []
        if not placed:
            return []
        return self._first_tokens(placed)

    def _take_prompt_pages(self, seq: _Seq, job: _Job) -> bool:
        """Gives `seq` the job's prompt pages: full pages shared, the partial last one copied."""
        p = self.config.page_size
        full, partial = divmod(len(job.ids), p)
        own = []
        if partial:
            own = self.allocator.alloc(1)
            if own is None:
                return False
            self.cache = paged.copy_pages(self.cache, np.asarray([job.pages[full]], np.int32),
                                          np.asarray(own, np.int32))
        self.allocator.share(job.pages[:full])
        seq.pages = job.pages[:full] + own
        seq.length = len(job.ids)
        return True

    def _first_tokens(self, placed) -> list[Update]:
        k = len(placed)
        rows = smp.batch_bucket(k, 1)
        logits = jnp.concatenate([job.logits for _, job in placed] + [placed[0][1].logits] * (rows - k), axis=0)
        specs = [seq.spec for seq, _ in placed]
        params = rw.row_params(specs, rows)
        counts = np.zeros(rows, np.int32)
        counts[:k] = [len(seq.result.tokens) for seq, _ in placed]
        pen = penalties.build([seq for seq, _ in placed], rows, logits.shape[-1])
        drawn = calls.draw(logits, params, counts, rw.row_limits(specs, rows), pen, mode=smp.sampling_mode(specs),
                      top_n=self._top_n(specs), constrained=calls.constrained(specs))
        first, lp, top_ids, top_lp = (hosts.to_host(x)[:, None] for x in drawn)
        updates = []
        for i, (seq, _) in enumerate(placed):
            asked = seq.spec.logprobs is not None
            lps = smp.logprob_rows(lp[i], top_ids[i], top_lp[i], 1) if asked else []
            updates += self._advance(seq, [int(first[i, 0])], lps)
        return updates

    def _top_n(self, specs) -> int:
        """The top-N width of a device call: 0 when no request asks for logprobs (one compile each)."""
        return self.config.max_logprobs if any(s.logprobs is not None for s in specs) else 0

    def _prefill_step(self) -> int:
        """One chunk of the prefill at the head of the queue, started only when a slot waits for it;
        returns the chunk's size (0: nothing to prefill)."""
        if self.prefilling is None:
            if not self.queue or len(self._free_slots()) <= sum(len(j.seqs) for j in self.ready):
                return 0
            job = self.queue[0]
            pages = self.allocator.alloc(paged.pages_for(len(job.ids), self.config.page_size))
            if pages is None:
                if not any(self.slots) and self.ready:
                    self._requeue(self.ready.pop())  # held prompts block the only way forward
                return 0
            self.queue.popleft()
            job.pages, job.done = pages, 0
            self.prefilling = job
        job = self.prefilling
        t0 = time.perf_counter()
        size = min(self.config.prefill_chunk, smp.batch_bucket(len(job.ids) - job.done, 16))
        n = min(size, len(job.ids) - job.done)
        tokens = np.zeros((1, size), np.int32)
        tokens[0, :n] = job.ids[job.done: job.done + n]
        positions = (job.done + np.arange(size, dtype=np.int32))[None]
        valid = (np.arange(size) < n)[None]
        table = self._table([job.pages], 1, self.width)
        self.cache, logits = calls.prefill(self.graphdef, self.params, self.cache, tokens, positions, valid, table,
                                      np.asarray([n - 1], np.int32), attn_impl=self.config.attn_impl)
        job.done += n
        self.stats["prefill_calls"] += 1
        self.stats["prefill_tokens"] += n
        if job.done == len(job.ids):
            job.logits = logits
            self.prefilling = None
            self.ready.append(job)
        self.stats["prefill_s"] += time.perf_counter() - t0
        return size

    def _requeue(self, job: _Job) -> None:
        """A prefilled job gives its pages back and waits to be prefilled again."""
        self.allocator.release(job.pages)
        job.pages, job.logits, job.done = [], None, 0
        self.queue.appendleft(job)
        self.stats["requeued"] += 1

    def _table(self, page_lists, rows: int, width: int) -> np.ndarray:
        table = np.full((rows, width), paged.NULL_PAGE, np.int32)
        for i, pages in enumerate(page_lists):
            table[i, : min(len(pages), width)] = pages[:width]
        return table

    def _reserve(self, steps: int) -> None:
        """Pages for every running sample to grow `steps` tokens; preempts the youngest when short."""
        p = self.config.page_size
        while True:
            running = [s for s in self.slots if s is not None]
            need = {id(s): paged.pages_for(min(s.length + steps, s.cap), p) - len(s.pages) for s in running}
            if sum(max(n, 0) for n in need.values()) <= self.allocator.available:
                break
            if len(running) > 1:
                self._preempt(max(running, key=lambda s: s.admitted))
            elif self.ready:  # prompts held for later samples block the one running sample
                self._requeue(self.ready.pop())
            elif self.prefilling is not None:
                self._requeue(self.prefilling)
                self.prefilling = None
            else:  # `check` makes one sample alone always fit
                raise RuntimeError("page budget below one sample; this is a bug in Engine.check")
        for s in self.slots:
            if s is not None and need[id(s)] > 0:
                s.pages += self.allocator.alloc(need[id(s)])

    def _preempt(self, seq: _Seq) -> None:
        """Returns a running sample's pages; it resumes from its prompt + tokens when pages allow."""
        self.slots[seq.slot] = None
        seq.slot = None
        self.allocator.release(seq.pages)
        seq.pages = []
        self.queue.appendleft(_Job(seq.prompt + seq.result.tokens, collections.deque([seq])))
        self.stats["preempted"] += 1

    def _decode_step(self) -> list[Update]:
        cfg = self.config
        steps = cfg.decode_steps
        self._reserve(steps)
        running = [s for s in self.slots if s is not None]
        if not running:
            return []
        t0 = time.perf_counter()
        n = cfg.num_slots
        width = min(smp.batch_bucket(max(len(s.pages) for s in running), 1), self.width)
        table = self._table([s.pages if s else [] for s in self.slots], n, width)
        token, position, count = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32)
        done = np.ones(n, bool)
        specs = [s.spec if s else None for s in self.slots]
        for i, s in enumerate(self.slots):
            if s is not None:
                token[i], position[i], count[i], done[i] = s.result.tokens[-1], s.length, len(s.result.tokens), False
        params, limits = rw.row_params(specs, n, STOP_WIDTH), rw.row_limits(specs, n)
        specs = [s.spec for s in running]
        pen = self.counts.for_call(self.slots)
        self.cache, out, pen = calls.decode(self.graphdef, self.params, self.cache, token, position, count, done,
                                            table, params, limits, pen, steps=steps, mode=smp.sampling_mode(specs),
                                            attn_impl=cfg.attn_impl, top_n=self._top_n(specs),
                                            constrained=calls.constrained(specs))
        out, lp, top_ids, top_lp = (hosts.to_host(x) for x in out)
        self.stats["decode_calls"] += 1
        updates = []
        for i, s in enumerate(list(self.slots)):
            if s is None:
                continue
            new = [int(t) for t in out[i] if t != rw.NO_TOKEN]
            s.length += len(new)
            asked = s.spec.logprobs is not None
            lps = smp.logprob_rows(lp[i], top_ids[i], top_lp[i], len(new)) if asked else []
            updates += self._advance(s, new, lps)
        self.counts.after_call(pen, self.slots)
        self.stats["decode_s"] += time.perf_counter() - t0
        self.stats["tokens"] += sum(len(u.tokens) for u in updates)
        self.stats["pages_peak"] = max(self.stats["pages_peak"], self.allocator.in_use)
        return updates

    def _advance(self, seq: _Seq, new: list[int], logprobs: list) -> list[Update]:
        """Appends a sample's new tokens (and their logprobs, when asked), ends it on a stop token /
        stop string / its budget."""
        res, spec = seq.result, seq.spec
        new, reason = smp.advance_row(res, spec, np.asarray(new, np.int64))
        if spec.logprobs is not None:
            res.logprobs = (res.logprobs or []) + [(lp, top[: spec.logprobs]) for lp, top in logprobs[: len(new)]]
        if reason is not None:
            self._drop(seq)
        return [Update(seq.request, seq.index, new, reason)] if (new or reason) else []

    def _drop(self, seq: _Seq) -> None:
        """A finished (or cancelled) sample leaves its slot and returns its pages."""
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
        self.allocator.release(seq.pages)
        seq.pages = []
