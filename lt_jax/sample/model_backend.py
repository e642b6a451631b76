"""A server backend over the generation engine: `lt-jax serve --checkpoint DIR | --hf DIR`.

Requests join the running batch: the server's engine runner (`server.EngineRunner`) calls
`prepare` off the event loop (tokenize and validate: a ValueError is that request's 400), then
`open` / `step` / `cancel` on its one engine thread, and streams each `step`'s text deltas. The
n choices of a request share its prefill. Choice j of a request seeded s uses the same row seed as
`lt_jax.generate(..., seed=s)` sample j of a one-prompt call, so a seeded request is reproducible
whatever it is batched with. `generate` / `generate_stream` serve a whole batch at once (tools).

Length rule: a request whose prompt plus max_tokens exceeds the context is refused (400); a
request without max_tokens gets what is left of the context, up to `--max-new-tokens`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Optional, Sequence

from lt_jax.sample.backends import Choice, GenRequest, GenResult, StreamEvent
from lt_jax.sample.engine import Engine
from lt_jax.sample.generate import encode_prompt, engine_config, eos_token_ids, make_decoder, row_specs, stop_ids, to_sample
from lt_jax.sampling import derive_seed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A request tokenized and checked, ready for the engine."""

    ids: tuple[int, ...]
    specs: tuple  # one sampler.RowSpec per choice


class ModelBackend:
    """`Backend` (lt_jax.sample.backends) over a Transformer and its tokenizer, through the engine."""

    def __init__(self, model, tokenizer, name: str, *, eos_ids: Optional[Sequence[int]] = None, mesh=None,
                 config=None, max_new_tokens: int = 4096, skip_special_tokens: bool = True):
        self.name = name
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
        self._decode = make_decoder(tokenizer, skip_special_tokens)
        self.engine = Engine(model, engine_config(config), mesh, self._decode)
        self.context = self.engine.config.max_len
        self.vocab_size = model.config.vocab_size
        self.batch_sizes: list[int] = []  # rows per batch call, for tests and /stats
        # engine request id -> (prompt tokens, text sent per choice, choices still running)
        self._open: dict[int, tuple[int, list[str], list[int]]] = {}

    # -- requests one by one (the server's engine runner) ---------------------------------------

    def prepare(self, req: GenRequest) -> Prepared:
        """Tokenizes and checks one request (thread-safe; the server calls it off the event loop).
        Raises ValueError with the reason when it cannot be served."""
        _, ids = encode_prompt(self.tokenizer, req.prompt if req.prompt is not None else list(req.messages))
        room = self.context - len(ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.context}")
        if req.max_tokens is not None and req.max_tokens > min(room, self.max_new_tokens):
            raise ValueError(f"max_tokens {req.max_tokens} is too large: the prompt has {len(ids)} tokens, the "
                             f"context is {self.context} and this server's cap is {self.max_new_tokens}; "
                             f"at most {min(room, self.max_new_tokens)} here")
        params = req.params(min(self.max_new_tokens, room))
        if any(not 0 <= i < self.vocab_size for i in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be token ids below the vocabulary size {self.vocab_size}")
        params = params.replace(min_tokens=min(params.min_tokens, params.max_new_tokens))
        base = derive_seed(None) if params.seed is None else params.seed
        specs = tuple(row_specs(params, base, stop_ids(params, self.eos_ids)))
        self.engine.check(ids, specs)
        return Prepared(tuple(ids), specs)

    def validate(self, req: GenRequest) -> None:
        self.prepare(req)

    def open(self, prepared: Prepared) -> int:
        """Queues a prepared request in the engine (engine thread); returns its id."""
        rid = self.engine.submit(prepared.ids, prepared.specs, track_text=True)
        k = len(prepared.specs)
        self._open[rid] = (len(prepared.ids), [""] * k, [k], [0] * k)  # + logprob entries sent per choice
        return rid

    def cancel(self, rid: int) -> None:
        """Stops a request (its client went away): frees its slots and pages."""
        if rid in self._open:
            self.engine.cancel(rid)
            self.engine.pop(rid)
            del self._open[rid]

    @property
    def busy(self) -> bool:
        return self.engine.busy

    def step(self) -> list[tuple[int, StreamEvent]]:
        """One engine step -> (engine request id, text delta event) pairs; `event.request` is 0."""
        out = []
        for u in self.engine.step():
            prompt_tokens, sent, left, lp_sent = self._open[u.request]
            res = self.engine.results(u.request)[u.index]
            entries = self._logprob_entries(res, lp_sent[u.index], len(u.tokens))  # this update's tokens
            lp_sent[u.index] += len(entries or ())
            if u.finish_reason is None:
                delta = res.stream.delta()
                if delta or entries:
                    sent[u.index] += delta
                    out.append((u.request, StreamEvent(0, u.index, delta, logprobs=entries)))
                continue
            text = to_sample(self._decode, res).text
            # The full decode is the truth; the streamed prefix normally matches it exactly.
            rest = text[len(sent[u.index]):] if text.startswith(sent[u.index]) else ""
            out.append((u.request, StreamEvent(0, u.index, rest, u.finish_reason, len(res.tokens), prompt_tokens,
                                               entries)))
            left[0] -= 1
            if not left[0]:
                self.engine.pop(u.request)
                del self._open[u.request]
        return out

    def _logprob_entries(self, res, start: int, count: int) -> Optional[tuple]:
        """(token text, logprob, ((text, logprob), ...)) of generated tokens start..start+count, when asked."""
        if res.logprobs is None:
            return None
        text = lambda i: self.tokenizer.decode([i])  # noqa: E731
        end = start + count
        return tuple((text(t), lp, tuple((text(a), alp) for a, alp in top))
                     for t, (lp, top) in zip(res.tokens[start:end], res.logprobs[start:end]))

    # -- a whole batch at once ------------------------------------------------------------------

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        texts: dict = {}
        finals: dict = {}
        for ev in self.generate_stream(requests):
            texts[ev.request, ev.choice] = texts.get((ev.request, ev.choice), "") + ev.text
            if ev.finish_reason is not None:
                finals[ev.request, ev.choice] = ev
        out = []
        for r, req in enumerate(requests):
            evs = [finals[r, j] for j in range(req.n)]
            out.append(GenResult(tuple(Choice(texts[r, j], e.finish_reason, e.completion_tokens)
                                       for j, e in enumerate(evs)), evs[0].prompt_tokens))
        return out

    def generate_stream(self, requests: list[GenRequest]) -> Iterator[StreamEvent]:
        """Text deltas as the batch decodes; a choice's last event carries its finish reason."""
        prepared = [self.prepare(r) for r in requests]
        self.batch_sizes.append(sum(len(p.specs) for p in prepared))
        index = {self.open(p): i for i, p in enumerate(prepared)}
        left = len(index)
        while left:
            for rid, ev in self.step():
                yield dataclasses.replace(ev, request=index[rid])
            left = sum(1 for rid in index if rid in self._open)
