"""What the harness evaluates: anything that turns chat prompts into n completions each.

`Generator.generate(prompts, n, params, seeds=None) -> list[list[Completion]]` is the whole
interface, so the harness runs the same way over a stand-in in tests, this project's sampler on a
checkpoint (`SamplerGenerator`), or any OpenAI-compatible endpoint (`OpenAIGenerator`: vLLM,
SGLang, `lt-jax serve`, hosted APIs). `seeds` gives one base seed per prompt, so sample j of a
problem gets the same seed whichever batch it lands in (a resumed eval reproduces a fresh one).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, Callable, Iterator, Protocol, Sequence, TypeVar

import openai

from lt_jax.sample import generate as gen
from lt_jax.sample.engine import Engine

from lt_jax.sampling import SamplingParams, derive_seed

Message = dict[str, str]
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str  # final text; may hold inline <think>...</think>
    num_tokens: int  # generated tokens, thinking included
    finish_reason: str  # "stop" | "length" | "error" | whatever the backend says
    reasoning: str | None = None  # thinking returned separately (DeepSeek-style reasoning_content)
    error: str | None = None  # set when the request was rejected (finish_reason "error")


@dataclasses.dataclass(frozen=True)
class SamplingConfig(SamplingParams):
    """The shared `lt_jax.sampling.SamplingParams` with the long-CoT papers' protocol as defaults
    (the `sampling:` section of an eval config). The number of samples is the eval's
    `num_samples`, so `n` stays 1 here."""

    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        if self.n != 1:
            raise ValueError(f"SamplingConfig.n must be 1 (set num_samples instead), got {self.n}")
        if self.seed is None:
            raise ValueError("SamplingConfig.seed must be set (eval samples are seeded per problem)")
        if self.logprobs is not None:
            raise ValueError("SamplingConfig.logprobs must be unset: eval records no logprobs")


class Generator(Protocol):
    name: str

    def generate(
        self, prompts: list[list[Message]], n: int, params: SamplingConfig, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        """n completions for each chat prompt, in prompt order."""
        ...


def seed_for(base: int, key: str) -> int:
    """A stable 31-bit seed for (base seed, item id), independent of batch composition."""
    return derive_seed(base, key)


def endpoint_extras(params: SamplingParams) -> dict[str, Any]:
    """The set fields the OpenAI API lacks, as the vLLM / SGLang / lt-jax serve body extensions."""
    extra = {name: getattr(params, name) for name in ("top_k", "min_p", "min_tokens", "ignore_eos")
             if getattr(params, name)}
    if params.repetition_penalty != 1:
        extra["repetition_penalty"] = params.repetition_penalty
    if params.stop_token_ids:
        extra["stop_token_ids"] = list(params.stop_token_ids)
    if not params.skip_special_tokens:
        extra["skip_special_tokens"] = False
    return extra


def whitespace_tokens(text: str) -> int:
    """Token count fallback when a backend reports none (whitespace split: an approximation)."""
    return len(text.split())


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints


class EndpointError(RuntimeError):
    """The endpoint stayed unreachable or failing after retries; rerunning resumes the eval."""


@dataclasses.dataclass(frozen=True)
class EndpointConfig:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key (servers without auth: unset)
    concurrency: int = 16
    timeout_s: float = 1800.0  # per request; a 32k-token answer can take many minutes
    max_retries: int = 5  # the openai client's own backoff on 429 / 5xx / connection errors

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ValueError("endpoint needs base_url and model")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


class OpenAIChat:
    """A thread-pooled chat-completions client; one request per sample (exact per-sample usage)."""

    def __init__(self, cfg: EndpointConfig):
        self.cfg = cfg
        self._openai = openai
        self.client = openai.OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,
        )

    def complete(self, messages: list[Message], params: SamplingConfig, seed: int | None) -> Completion:
        """One completion; a request the server rejects (4xx other than 429) is returned as an error."""
        kwargs: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_new_tokens,
        }
        if seed is not None:
            kwargs["seed"] = seed
        if params.stop:
            kwargs["stop"] = list(params.stop)
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's own parameters
            if getattr(params, name):
                kwargs[name] = getattr(params, name)
        extra = endpoint_extras(params)
        if extra:
            kwargs["extra_body"] = extra
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except (self._openai.BadRequestError, self._openai.UnprocessableEntityError) as e:
            # e.g. prompt longer than the context: a result for this sample, not an outage
            return Completion("", 0, "error", error=f"{type(e).__name__}: {e}")
        except self._openai.OpenAIError as e:
            raise EndpointError(f"{self.cfg.base_url} ({self.cfg.model}): {type(e).__name__}: {e}") from e
        return _to_completion(resp)

    def map(self, fn: Callable[[T], R], jobs: Sequence[T]) -> list[R]:
        """fn over jobs with `concurrency` threads, results in job order; the first error propagates."""
        with concurrent.futures.ThreadPoolExecutor(self.cfg.concurrency) as pool:
            return list(pool.map(fn, jobs))


def _to_completion(resp: Any) -> Completion:
    choice = resp.choices[0]
    msg = choice.message
    text = msg.content or ""
    extra = getattr(msg, "model_extra", None) or {}
    reasoning = getattr(msg, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning")
    usage = getattr(resp, "usage", None)
    if usage is not None and usage.completion_tokens is not None:
        tokens = int(usage.completion_tokens)
    else:
        tokens = whitespace_tokens(text) + whitespace_tokens(reasoning or "")
    return Completion(text, tokens, choice.finish_reason or "stop", reasoning=reasoning or None)


class OpenAIGenerator:
    """Evaluates a served model through its OpenAI-compatible chat endpoint (chat template server-side)."""

    def __init__(self, cfg: EndpointConfig, name: str | None = None):
        self.chat = OpenAIChat(cfg)
        self.name = name or cfg.model

    def generate(
        self, prompts: list[list[Message]], n: int, params: SamplingConfig, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]

        def one(job: tuple[int, int]) -> Completion:
            i, j = job
            return self.chat.complete(prompts[i], params, None if seeds is None else seeds[i] + j)

        flat = self.chat.map(one, jobs)
        return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


# ---------------------------------------------------------------------------------------------
# This project's sampler on a checkpoint


class SamplerGenerator:
    """This project's generation engine (`lt_jax.sample.engine`) on a loaded model.

    `generate_stream` submits every prompt x n samples as one stream of requests to a continuous-
    batching engine and yields each prompt's completions as its last sample finishes (the harness
    writes that problem's record then). Prompt i's samples are seeded by seeds[i] alone, so the
    batching never changes them. A prompt that does not fit the context gets "error" completions.
    The tokenizer's chat template renders the prompts; EOS ids come from `eos_ids` (tokenizer +
    model config + generation_config.json when loaded by `load_from_args`).
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, eos_ids: Sequence[int] | None = None,
                 mesh: Any = None, sampler_config: Any = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.eos_ids, self.mesh, self.sampler_config = eos_ids, mesh, sampler_config
        self._engine = None

    def engine(self):
        """The engine, built once (its compiled steps are reused across benchmarks)."""
        if self._engine is None:
            self._engine = Engine(self.model, gen.engine_config(self.sampler_config), self.mesh,
                                  gen.make_decoder(self.tokenizer, True))
        return self._engine

    def generate(
        self, prompts: list[list[Message]], n: int, params: SamplingConfig, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        out: list = [None] * len(prompts)
        for i, comps in self.generate_stream(prompts, n, params, seeds):
            out[i] = comps
        return out

    def generate_stream(self, prompts: list[list[Message]], n: int, params: SamplingConfig,
                        seeds: Sequence[int] | None = None) -> Iterator[tuple[int, list[Completion]]]:
        """(prompt index, its n completions) as each prompt's last sample finishes."""
        sp = SamplingParams(**{f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams)
                               if f.name != "n"}, n=n)
        engine = self.engine()
        eos = tuple(self.eos_ids) if self.eos_ids is not None else gen.eos_token_ids(self.model, self.tokenizer)
        waiting: dict[int, int] = {}
        for i, prompt in enumerate(prompts):
            _, ids = gen.encode_prompt(self.tokenizer, prompt)
            base = seeds[i] if seeds is not None else gen.prompt_seed(params.seed, i)
            try:
                waiting[engine.submit(ids, gen.row_specs(sp, base, gen.stop_ids(sp, eos)))] = i
            except ValueError as e:  # this problem alone cannot run (too long): an error, not a crash
                yield i, [Completion("", 0, "error", error=str(e))] * n
        while waiting:
            for u in engine.step():
                if u.finish_reason is None or u.request not in waiting or not engine.finished(u.request):
                    continue
                samples = [gen.to_sample(engine.decode, r) for r in engine.pop(u.request)]
                yield waiting.pop(u.request), [Completion(s.text, s.num_tokens, s.finish_reason) for s in samples]
