"""A server backend over the KV-cache sampler: `lt-jax serve --checkpoint DIR | --hf DIR`.

The server hands over a batch of requests at a time; every choice of every request becomes one
row of a single sampler call (one prefill for all prompts; the n choices of a request share its
prefill), each row with its request's own temperature / top-p / top-k / max_tokens / stop strings.
Choice j of a request seeded s uses the same row seed as `lt_jax.generate(..., seed=s)` sample j,
so a seeded request is reproducible whatever it is batched with. `generate_stream` emits text
deltas after every decode chunk (`--chunk-size` steps), holding back a possible stop-string prefix.
"""

from __future__ import annotations

import logging
import os
from typing import Iterator, Optional, Sequence

from lt_jax.sample.backends import Choice, GenRequest, GenResult, StreamEvent

log = logging.getLogger(__name__)


def add_backend_arguments(parser) -> None:
    """Flags of the model backend (`--checkpoint/--hf` themselves belong to `lt-jax serve`)."""
    from lt_jax.sample.generate import add_model_arguments

    add_model_arguments(parser, with_source=False)
    parser.add_argument("--max-new-tokens", type=int, default=4096,
                        help="max_tokens of requests that set none (and the cap for those that do)")


def from_args(args) -> "ModelBackend":
    """The backend `lt-jax serve --checkpoint/--hf ...` asks for."""
    from lt_jax.sample.generate import load_from_args

    lm = load_from_args(args)
    return ModelBackend(lm.model, lm.tokenizer, lm.name, eos_ids=lm.eos_ids, mesh=lm.mesh, config=lm.config,
                        max_new_tokens=args.max_new_tokens)


class ModelBackend:
    """`Backend` (lt_jax.sample.backends) over a Transformer and its tokenizer."""

    def __init__(self, model, tokenizer, name: str, *, eos_ids: Optional[Sequence[int]] = None, mesh=None,
                 config=None, max_new_tokens: int = 4096, skip_special_tokens: bool = True):
        from lt_jax.sample import sampler as smp
        from lt_jax.sample.generate import make_decoder, eos_token_ids

        self.name = name
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.eos_ids = tuple(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
        self.context = model.config.max_position_embeddings
        self.sampler = smp.Sampler(model, mesh, config or smp.SamplerConfig())
        self._decode = make_decoder(tokenizer, skip_special_tokens)
        self.batch_sizes: list[int] = []  # rows per sampler call, for tests and /stats

    def _rows(self, requests: Sequence[GenRequest]):
        from lt_jax.sample.generate import encode_prompt
        from lt_jax.sample.sampler import RowSpec, row_seed

        prompts, rows = [], []
        for i, req in enumerate(requests):
            _, ids = encode_prompt(self.tokenizer, req.prompt if req.prompt is not None else list(req.messages))
            room = self.context - len(ids)
            if room < 1:
                raise ValueError(f"request {i}: the prompt has {len(ids)} tokens; the model's context is "
                                 f"{self.context}")
            budget = min(req.max_tokens or self.max_new_tokens, self.max_new_tokens, room)
            entropy = int.from_bytes(os.urandom(4), "little") if req.seed is None else None
            for j in range(req.n):
                seed = row_seed(req.seed, j) if entropy is None else row_seed(entropy, j)
                rows.append(RowSpec(
                    prompt=i, seed=seed, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or 0,
                    max_new_tokens=budget, stop_token_ids=self.eos_ids, stop=tuple(req.stop),
                ))
            prompts.append(ids)
        self.batch_sizes.append(len(rows))
        return prompts, rows

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        prompts, rows = self._rows(requests)
        results = self.sampler.run(prompts, rows, self._decode)
        return self._collect(requests, prompts, results)

    def _collect(self, requests, prompts, results) -> list[GenResult]:
        from lt_jax.sample.generate import to_sample

        out, k = [], 0
        for req, ids in zip(requests, prompts):
            samples = [to_sample(self._decode, results[k + j]) for j in range(req.n)]
            out.append(GenResult(tuple(Choice(s.text, s.finish_reason, s.num_tokens) for s in samples), len(ids)))
            k += req.n
        return out

    def generate_stream(self, requests: list[GenRequest]) -> Iterator[StreamEvent]:
        """Text deltas after every decode chunk; a choice's last event carries its finish reason."""
        from lt_jax.sample.generate import to_sample

        prompts, rows = self._rows(requests)
        where = [(r, j) for r, req in enumerate(requests) for j in range(req.n)]
        results: list = []
        sent = [""] * len(rows)
        for updates in self.sampler.stream(prompts, rows, self._decode, track_text=True, results=results):
            for u in updates:
                res, (r, j) = results[u.row], where[u.row]
                if u.finish_reason is None:
                    delta = res.stream.delta()
                    if delta:
                        sent[u.row] += delta
                        yield StreamEvent(r, j, delta)
                    continue
                text = to_sample(self._decode, res).text
                # The full decode is the truth; the streamed prefix normally matches it exactly.
                rest = text[len(sent[u.row]):] if text.startswith(sent[u.row]) else ""
                yield StreamEvent(r, j, rest, u.finish_reason, len(res.tokens), len(prompts[r]))
