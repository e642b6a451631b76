"""`lt_jax.generate`: text in, text out, over the KV-cache sampler (`lt-jax sample` is lt_jax.sample.cli).

    model = lt_jax.load_hf("Qwen2.5-1.5B-Instruct")          # or load_model(checkpoint=...)
    tok = transformers.AutoTokenizer.from_pretrained("Qwen2.5-1.5B-Instruct")
    out = lt_jax.generate(model, tok, [[{"role": "user", "content": "1+1?"}]],
                          SamplingParams(n=4, temperature=0.6, top_p=0.95, max_new_tokens=2048))
    out[0].samples[0].text, out[0].samples[0].finish_reason

Prompts are strings (tokenized as is, with the tokenizer's special tokens such as BOS) or chat
conversations (rendered with the tokenizer's chat template and `add_generation_prompt=True`).
All prompts of one call go to the generation engine together (continuous batching over a paged KV
cache); the n samples of a prompt share its prefill.

"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence, Union

from lt_jax.data.tokenizers import load_tokenizer  # noqa: F401  (re-exported beside load_model)
from lt_jax.model.checkpoint_io import load_model_checkpoint
from lt_jax.model.hf import generation_config_eos, load_hf  # noqa: F401  (generation_config_eos re-exported)
from lt_jax.sample import sampler as smp
from lt_jax.sample.detokenize import final_text
from lt_jax.sample.engine import Engine, EngineConfig
from lt_jax.sample.sampler import SamplerConfig
from lt_jax.sampling import SamplingParams, derive_seed  # noqa: F401  (re-exported: lt_jax.generate's params)

log = logging.getLogger(__name__)

Message = dict[str, str]
Prompt = Union[str, Sequence[Message]]


@dataclasses.dataclass(frozen=True)
class Sample:
    text: str
    token_ids: tuple[int, ...]  # generated tokens, including the EOS / stop token that ended it
    finish_reason: str  # "stop" (EOS, stop token or stop string) | "length" (max_new_tokens)
    stop_reason: Any = None  # the stop token id or stop string, when finish_reason is "stop"
    # With SamplingParams.logprobs: per generated token (logprob, ((token id, logprob), ...) top-N),
    # from softmax(logits / temperature) before top-k / top-p truncation (temperature 0: 1).
    logprobs: Optional[tuple] = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    prompt: str  # the prompt text as the model saw it (chat template applied)
    prompt_token_ids: tuple[int, ...]
    samples: tuple[Sample, ...]

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]


def encode_prompt(tokenizer, prompt: Prompt) -> tuple[str, list[int]]:
    """(text, ids) of one prompt: a string as is, a conversation through the chat template."""
    if isinstance(prompt, str):
        return prompt, list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = list(prompt)
    if not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ValueError("a chat prompt must be a list of {'role': ..., 'content': ...} messages")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this tokenizer has no chat template; pass prompts as strings")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already wrote any BOS, so no special tokens are added again.
    return text, list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The tokenizer's EOS and every EOS id of the model config (a base model and its chat template
    often disagree: <|endoftext|> vs <|im_end|>; Llama 3.1 lists three; generation stops at all).
    `load_hf` folds generation_config.json's list into the model config."""
    ids = [getattr(tokenizer, "eos_token_id", None), *model.config.eos_token_ids]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def _normalise_prompts(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and isinstance(prompts[0], dict):  # one conversation
        return [prompts]
    return prompts


def prompt_seed(seed: int, prompt: int) -> int:
    """Seed of prompt number `prompt` of a call seeded `seed`: the seed itself for the first, a hash
    for the others, so several prompts under one seed draw different streams (and a one-prompt call
    equals a server request with the same seed)."""
    return seed if prompt == 0 else derive_seed(seed, f"prompt{prompt}")


def stop_ids(params: SamplingParams, eos: Sequence[int]) -> tuple[int, ...]:
    """The token ids that end a row: the EOS ids (none with `ignore_eos`), then `stop_token_ids`."""
    return tuple(dict.fromkeys((() if params.ignore_eos else tuple(eos)) + tuple(params.stop_token_ids)))


def row_specs(params: SamplingParams, base_seed: int, ends: Sequence[int]) -> list:
    """The n samples of one prompt as sampler rows (sample j seeded row_seed(base_seed, j))."""
    return [smp.RowSpec(prompt=0, seed=smp.row_seed(base_seed, j), temperature=params.temperature,
                        top_p=params.top_p, top_k=params.top_k, max_new_tokens=params.max_new_tokens,
                        stop_token_ids=tuple(ends), stop=params.stop, logprobs=params.logprobs,
                        min_p=params.min_p, min_tokens=params.min_tokens,
                        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                        repetition_penalty=params.repetition_penalty)
            for j in range(params.n)]


def engine_config(config) -> Any:
    """An EngineConfig from None, an EngineConfig, or a lockstep SamplerConfig (its chunk size)."""
    if config is None:
        return EngineConfig()
    if isinstance(config, SamplerConfig):
        return EngineConfig(decode_steps=config.chunk_size)
    return config


def generate(
    model,
    tokenizer,
    prompts: Union[Prompt, Sequence[Prompt]],
    params: Optional[SamplingParams] = None,
    *,
    seeds: Optional[Sequence[int]] = None,
    eos_ids: Optional[Sequence[int]] = None,
    mesh=None,
    config=None,
    engine=None,
) -> list[GenerationResult]:
    """Samples `params.n` continuations of every prompt through the generation engine
    (`lt_jax.sample.engine`: continuous batching over a paged KV cache); results in prompt order.

    seeds: one seed per prompt (default: `prompt_seed(params.seed, i)`, so each prompt draws its own
    stream); sample j of a prompt seeded s is the same whatever else runs. eos_ids: override the EOS
    ids (default: `eos_token_ids(model, tokenizer)`). A prompt whose length plus max_new_tokens
    exceeds the context is refused (ValueError naming the prompt) before anything runs.
    config: an EngineConfig (slots, pages); engine: reuse a built Engine (its config wins).
    """
    params = params or SamplingParams()
    prompts = _normalise_prompts(prompts)
    if not prompts:
        return []
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    ends = stop_ids(params, eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer))
    base = derive_seed(None) if params.seed is None else params.seed
    decode = make_decoder(tokenizer, params.skip_special_tokens)
    engine = engine or Engine(model, engine_config(config), mesh, decode)
    engine.decode = decode
    specs = [row_specs(params, seeds[i] if seeds is not None else prompt_seed(base, i), ends)
             for i in range(len(prompts))]
    for i, ((_, ids), rows) in enumerate(zip(encoded, specs)):
        try:
            engine.check(ids, rows)
        except ValueError as e:
            raise ValueError(f"generate: prompt {i}: {e}") from None
    results = engine.run([ids for _, ids in encoded], specs)
    return [GenerationResult(text, tuple(ids), tuple(to_sample(decode, r) for r in res))
            for (text, ids), res in zip(encoded, results)]


def make_decoder(tokenizer, skip_special_tokens: bool):
    """ids -> text with the tokenizer (the sampler's host side only needs this function)."""
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def to_sample(decode, res) -> Sample:
    """A finished sampler row as a Sample: text without the stop token / stop string."""
    ended_by_token = res.finish_reason == "stop" and isinstance(res.stop_reason, int)
    text = final_text(decode, res.tokens, res.stream, drop_last=ended_by_token)
    logprobs = None if res.logprobs is None else tuple(res.logprobs)
    return Sample(text, tuple(res.tokens), res.finish_reason, res.stop_reason, logprobs)


# ---------------------------------------------------------------------------------------------
# Loading (shared with the server's model backend and eval)


def load_model(checkpoint: Optional[str] = None, hf: Optional[str] = None, *, step: Optional[int] = None,
               mesh=None, dtype: Optional[str] = None):
    """A Transformer from an lt_jax checkpoint or a Hugging Face folder (local or gs://), sharded
    over `mesh`. dtype sets the parameter and compute dtype (e.g. "bfloat16" to halve memory)."""
    if (checkpoint is None) == (hf is None):
        raise ValueError("load_model: give exactly one of checkpoint= or hf=")
    if hf is not None:
        return load_hf(hf, mesh=mesh, dtype=dtype)
    overrides = {"param_dtype": dtype, "compute_dtype": dtype} if dtype else {}
    return load_model_checkpoint(checkpoint, step=step, mesh=mesh, **overrides)
