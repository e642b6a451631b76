"""What the OpenAI-compatible server asks of a generator, and the synthetic teacher that answers now.

A backend is a small object the server hands *batches* of requests to (the server gathers
concurrent HTTP requests for a few milliseconds, so a sampler sees one batch, not N calls):

    class Backend(Protocol):
        name: str
        def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...

A backend that can decode incrementally also provides `generate_stream(requests)`, yielding
`StreamEvent`s (text deltas tagged with the request and choice they belong to) as the batch
decodes; the server then streams them as they come. A backend without it is still streamable:
the server runs `generate` and sends the finished text in word-sized chunks.

A backend may also define `validate(request)`, raising ValueError for a request it cannot serve
(a prompt longer than its context, say): the server calls it before queueing and answers 400
with the message, so one bad request never fails a whole batch.

The backend owns the chat template (it comes with its tokenizer): a request carries either a raw
`prompt` (/v1/completions) or chat `messages` (/v1/chat/completions), and the backend renders the
latter itself. Token counts are the backend's own tokenizer's counts.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

from lt_jax.data import synthetic
from lt_jax.sampling import SamplingParams, derive_seed

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True)
class GenRequest:
    """One request's prompt and sampling parameters under their OpenAI names; `n` choices are
    wanted. The fields map onto `lt_jax.sampling.SamplingParams` (`params`), which validates them;
    `max_tokens` None leaves the budget to the backend (up to its context)."""

    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # token-level backends only (the model backend)
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per token (None: no logprobs)
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenRequest needs exactly one of prompt or messages")
        self.params()  # validates every sampling field (the error names it)

    def params(self, max_new_tokens: int | None = None) -> SamplingParams:
        """These parameters as the shared type; the budget is `max_tokens`, else `max_new_tokens`
        (the backend's cap), else 1 (validation only)."""
        budget = self.max_tokens if self.max_tokens is not None else (max_new_tokens or 1)
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=budget, seed=self.seed, stop=tuple(self.stop),
                              stop_token_ids=tuple(self.stop_token_ids), ignore_eos=self.ignore_eos,
                              logprobs=self.logprobs, min_p=self.min_p, min_tokens=self.min_tokens,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty)


@dataclasses.dataclass(frozen=True)
class Choice:
    text: str
    finish_reason: str  # "stop" (natural end or a stop string) | "length" (max_tokens reached)
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class GenResult:
    choices: tuple[Choice, ...]
    prompt_tokens: int


@dataclasses.dataclass(frozen=True)
class StreamEvent:
    """A text delta of choice `choice` of request `request` (an index into the batch).

    The last event of a choice has `finish_reason` set and carries the choice's token count
    and its request's prompt token count (its `text` may be empty).
    """

    request: int
    choice: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    # when asked: per token this event adds (text, logprob, ((text, logprob), ...) alternatives); a
    # choice's logprobs are those of its events in order (a batch backend puts all in the last one)
    logprobs: tuple | None = None


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...


def choice_seed(seed: int | None, choice: int) -> int:
    """Seed of choice `choice` of a request seeded `seed` (fresh entropy when `seed` is None).

    Choices of one request must differ, and the same (seed, choice) must give the same text
    in any process, so this hashes rather than using Python's salted `hash`.
    """
    return derive_seed(seed, choice)


def events_from_results(results: Sequence[GenResult], chunked: Sequence[bool] | None = None
                        ) -> Iterator[StreamEvent]:
    """Finished results as events: one per choice, or (where `chunked[i]`, for a client that asked
    to stream from a non-incremental backend) the text in word-sized chunks first."""
    for r_idx, result in enumerate(results):
        for c_idx, choice in enumerate(result.choices):
            text = choice.text
            if chunked is not None and chunked[r_idx]:
                for chunk in re.findall(r"\s*\S+\s*|\s+", text):
                    yield StreamEvent(r_idx, c_idx, chunk)
                text = ""
            yield StreamEvent(r_idx, c_idx, text, choice.finish_reason, choice.completion_tokens,
                              result.prompt_tokens)


# ---------------------------------------------------------------------------------------------
# The synthetic teacher: a rule-based long-thought teacher (lt_jax.data.synthetic) behind the
# same protocol as a model, so distill, grade and the demo exercise the real HTTP path.

# Word/number/punctuation pieces with their leading whitespace: a stand-in tokenizer whose
# pieces concatenate back to the text, so truncating at a piece boundary is a text prefix.
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")


def pieces(text: str) -> list[str]:
    """Splits text into the synthetic backend's tokens (whitespace stays attached)."""
    return _PIECE.findall(text)


def render_chat(messages: Sequence[dict[str, str]]) -> str:
    """The synthetic backend's plain chat template (ends with the assistant turn opened)."""
    turns = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    return "".join(turns) + "<|assistant|>\n"


def _problem_text(request: GenRequest) -> str:
    """What the teacher reads: the last user turn of a chat, or the raw prompt."""
    if request.prompt is not None:
        return request.prompt
    users = [m["content"] for m in request.messages if m.get("role") == "user"]
    return users[-1] if users else ""


def apply_stop_and_limit(text: str, stop: Sequence[str], max_tokens: int | None) -> Choice:
    """Cuts `text` where a decoder would stop: before the first stop string, or at max_tokens."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
    toks = pieces(text)
    if max_tokens is not None and len(toks) > max_tokens:
        return Choice("".join(toks[:max_tokens]), "length", max_tokens)
    return Choice(text, "stop", len(toks))


class SyntheticBackend:
    """Serves `lt_jax.data.synthetic.teacher_response` as a chat/completions model.

    Each choice's text is ``"<think>\\n{thinking}\\n</think>\\n\\n{answer}"``; the server can move
    the thinking into `reasoning_content`. Choice i of a request seeded s is drawn with
    `random.Random(choice_seed(s, i))`, so a seed fixes the text; temperature 0 acts as
    greedy (seed 0 for every choice). top_p/top_k have no meaning for a rule-based teacher.
    A prompt with no recognisable problem gets a short refusal instead of failing the batch.
    """

    def __init__(self, cfg: Any = None, name: str = "synthetic-teacher"):
        self._synthetic = synthetic
        self.cfg = synthetic.SyntheticConfig() if cfg is None else cfg
        self.name = name
        self.batch_sizes: list[int] = []  # sequences per call, for tests and /stats

    def full_text(self, problem_text: str, seed: int) -> str:
        """The complete, untruncated answer for one choice."""
        try:
            thinking, answer = self._synthetic.teacher_response(problem_text, random.Random(seed), self.cfg)
        except ValueError as e:
            thinking, answer = f"I could not find a problem to solve ({e}).", "I can only solve the synthetic problems."
        return f"<think>\n{thinking}\n</think>\n\n{answer}"

    def _choices(self, request: GenRequest) -> list[Choice]:
        problem = _problem_text(request)
        out = []
        for i in range(request.n):
            seed = 0 if request.temperature == 0 else choice_seed(request.seed, i)
            out.append(apply_stop_and_limit(self.full_text(problem, seed), request.stop, request.max_tokens))
        return out

    def validate(self, request: GenRequest) -> None:
        """Token-level parameters mean nothing to a rule-based teacher: refused, not ignored."""
        if (request.stop_token_ids or request.ignore_eos or request.logprobs is not None or request.min_p
                or request.min_tokens or request.params().penalized):
            raise ValueError("stop_token_ids, ignore_eos, logprobs, min_p and min_tokens are not supported by the "
                             "synthetic teacher")

    def _prompt_tokens(self, request: GenRequest) -> int:
        text = request.prompt if request.prompt is not None else render_chat(request.messages)
        return len(pieces(text))

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        self.batch_sizes.append(sum(r.n for r in requests))
        return [GenResult(tuple(self._choices(r)), self._prompt_tokens(r)) for r in requests]

    def generate_stream(self, requests: list[GenRequest]) -> Iterator[StreamEvent]:
        """Yields one piece per live sequence per step, like a batched decoder in lockstep."""
        results = self.generate(requests)
        seqs = [(r, c, pieces(ch.text), ch, res.prompt_tokens)
                for r, res in enumerate(results) for c, ch in enumerate(res.choices)]
        step = 0
        while seqs:
            live = []
            for r, c, toks, ch, p_tokens in seqs:
                if step < len(toks):
                    yield StreamEvent(r, c, toks[step])
                    live.append((r, c, toks, ch, p_tokens))
                else:
                    yield StreamEvent(r, c, "", ch.finish_reason, ch.completion_tokens, p_tokens)
            seqs, step = live, step + 1
