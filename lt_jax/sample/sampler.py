"""KV-cache sampling on the mesh: a jitted prefill and a jitted decode loop, per-row sampling params.

Layout of a batch. Prompts are *left*-padded to one bucketed length P+1, with segment id 0 on the
padding and per-row positions 0..len-1 on the tokens, so every row's last prompt token sits in
slot P and all rows write their next token into the same cache slot (the model's KVCache has one
write index). Padding slots never match a real token's segment id, so they are invisible.

Prefill (one device call) runs the first P tokens as self-attention into a P-slot cache (the
fused training kernels apply since q_len == kv_len; the discarded logits are dead code, so the LM
head never runs over the prompt), then the last token as one decode step, which gives each prompt's
next-token logits. Only then are the cache rows gathered to the sampling rows (`row_src`): the
n samples of a prompt share its one prefill and receive copies of its cache. The cache is padded
to `cache_len` = bucket(P + max_new_tokens) and sharded by the `cache_*` logical rules (batch over
data/fsdp, KV heads over tensor).

Decode runs `chunk_size` steps per device call inside `lax.while_loop` (no Python per token); the
loop exits early once every row is done. A row is done on device when it samples an EOS / stop
token id or reaches its `max_new_tokens`. Stop *strings* are matched on the host between chunks
(`detokenize.TextStream`); the next chunk is dispatched before the host reads the current one, so
that work overlaps the device, and a row stopped by a string is masked from the chunk after.

Randomness: row r's token t is drawn with key fold_in(key(seed_r), t), where seed_r depends only
on the request's seed and the sample index, so a seeded request gives the same tokens whatever
batch it lands in and however the steps are chunked.

Buckets: batch rows round up to a power of two (and to the batch-shard count), prompt and cache
lengths to at most 1/buckets_per_octave above the need, so repeated calls reuse compiled code.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lt_jax.model import sharding as shd
from lt_jax.model import transformer as tfm
from lt_jax.sampling import derive_seed
from lt_jax.sample.hosts import to_host
from lt_jax.sample.penalties import penalized
from lt_jax.sample.rows import NO_TOKEN, RowParams, finished, row_params
from lt_jax.sample.detokenize import Decode, TextStream

log = logging.getLogger(__name__)

_CACHE_AXES = ("cache_layers", "cache_batch", "cache_seq", "cache_kv_heads", "cache_head_dim")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Knobs of the decode loop (not of the distribution: those are per row, see RowSpec)."""

    chunk_size: int = 64  # decode steps per device call; stop strings are checked between calls
    buckets_per_octave: int = 8  # prompt/cache lengths padded to <= 1/8 above the need
    min_prompt_bucket: int = 16
    pad_id: int = 0
    cache_dtype: Optional[str] = None  # default: the model's compute dtype

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.buckets_per_octave < 1 or self.buckets_per_octave & (self.buckets_per_octave - 1):
            raise ValueError(f"buckets_per_octave must be a power of two, got {self.buckets_per_octave}")
        if self.min_prompt_bucket < 1:
            raise ValueError(f"min_prompt_bucket must be >= 1, got {self.min_prompt_bucket}")


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One sequence to sample: which prompt it continues and how. temperature 0 is greedy;
    top_k 0 and top_p 1 are off; `seed` is a row seed (see `row_seed`)."""

    prompt: int
    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: Optional[int] = None  # engine only: per token, the chosen token's logprob and the top-N
    min_tokens: int = 0  # engine only: stop token ids cannot be drawn before this many tokens
    min_p: float = 0.0  # engine only: drop tokens below min_p x the top token's probability
    presence_penalty: float = 0.0  # engine only, the three penalties: see lt_jax.sampling.SamplingParams
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclasses.dataclass
class RowResult:
    tokens: list[int]
    finish_reason: Optional[str] = None  # "stop" | "length"; None while running
    stop_reason: object = None  # the stop token id or stop string that ended the row
    stream: Optional[TextStream] = None  # text state, when tracked
    logprobs: Optional[list] = None  # per token (logprob, ((id, logprob), ...) top-N), when asked


class RowUpdate(NamedTuple):
    """New tokens of row `row` from one device call; `finish_reason` set on its last update."""

    row: int
    tokens: list[int]
    finish_reason: Optional[str]


def row_seed(seed: Optional[int], index: int) -> int:
    """Seed of sample `index` of a request seeded `seed` (`lt_jax.sampling.derive_seed`)."""
    return derive_seed(seed, index)


def bucket(n: int, minimum: int = 1, per_octave: int = 8, align: int = 1) -> int:
    """`n` rounded up to a compile bucket: >= minimum, a multiple of `align`, and at most
    1/per_octave above n (step 2^(floor(log2 n)) / per_octave)."""
    n = max(int(n), minimum, 1)
    shift = max(0, n.bit_length() - 1 - (per_octave.bit_length() - 1))
    step = max(1 << shift, align)
    return -(-n // step) * step


def batch_bucket(n: int, shards: int) -> int:
    """Batch rows: the next power of two, and a multiple of the batch-shard count."""
    p = 1 << max(0, (max(n, 1) - 1).bit_length())
    return -(-max(p, shards) // shards) * shards


# ---------------------------------------------------------------------------------------------
# Sampling math (pure)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sorted logits with the tokens outside top-k, then outside top-p, set to -inf, their token ids).

    logits [R, V] already temperature-scaled; top_k [R] (0 = off); top_p [R] in (0, 1]. Same order as
    transformers: top-k first, then top-p on the renormalised survivors; a token is kept while the
    mass of the tokens ranked above it is below top_p, so the most likely token always survives.
    """
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1, stable=True)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    keep = jnp.arange(vocab)[None, :] < k[:, None]
    ranked = jnp.where(keep, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_above < top_p[:, None]
    return jnp.where(keep, ranked, -jnp.inf), order


def sample_from_logits(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_p: jax.Array, top_k: jax.Array,
    *, mode: str = "filtered",
) -> jax.Array:
    """Next tokens [R] int32 from logits [R, V]: greedy where temperature == 0, else a draw from
    softmax(logits / temperature) restricted by top-k / top-p. `keys` [R] are typed PRNG keys.
    mode (static) trims work the batch does not need: "greedy" (every row has temperature 0),
    "sample" (no row uses top-k / top-p: no sort), "filtered" (the general case)."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    scaled = logits / t[:, None]
    if mode == "filtered":
        ranked, order = filter_logits(scaled, top_k, top_p)
        pick = jax.vmap(jax.random.categorical)(keys, ranked)
        drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0]
    elif mode == "sample":
        drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    else:
        raise ValueError(f"sample_from_logits: mode must be greedy, sample or filtered, got {mode!r}")
    return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)


def constrain_logits(logits, count, temperature, stop_ids, min_tokens, min_p):
    """Logits [R, V] with the stop token ids masked while count < min_tokens, and (min-p) every
    token whose probability after temperature is below min_p x the top token's masked. min_p 0
    and min_tokens 0 change nothing."""
    vocab = jnp.arange(logits.shape[-1])
    is_stop = jnp.any(vocab[None, None, :] == stop_ids[:, :, None], axis=1)  # [R, V]
    logits = jnp.where(is_stop & (count < min_tokens)[:, None], -jnp.inf, logits)
    t = jnp.where(temperature > 0, temperature, 1.0)
    gap = (logits - jnp.max(logits, axis=-1, keepdims=True)) / t[:, None]  # log(p / p_max)
    low = (min_p > 0)[:, None] & (gap < jnp.log(jnp.maximum(min_p, 1e-30))[:, None])
    return jnp.where(low, -jnp.inf, logits)


def token_logprobs(logits, temperature, chosen, top_n: int):
    """(chosen token's logprob [R], top-N ids [R, N], their logprobs [R, N]) from the distribution
    the token was drawn from: softmax(logits / temperature) after temperature and before top-k /
    top-p truncation (what OpenAI and vLLM report); greedy rows (temperature 0) use temperature 1."""
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32) / t[:, None], axis=-1)
    chosen_lp = jnp.take_along_axis(lp, jnp.maximum(chosen, 0)[:, None], axis=-1)[:, 0]
    if top_n == 0:
        empty = jnp.zeros((logits.shape[0], 0))
        return chosen_lp, empty.astype(jnp.int32), empty
    top_lp, top_ids = jax.lax.top_k(lp, top_n)
    return chosen_lp, top_ids.astype(jnp.int32), top_lp


def logprob_rows(lp, top_ids, top_lp, n: int) -> list:
    """Host copies of one slot's first n tokens' (logprob, ((id, logprob), ...))."""
    return [(float(lp[k]), tuple(zip(map(int, top_ids[k]), map(float, top_lp[k])))) for k in range(n)]


def sampling_mode(rows: Sequence["RowSpec"]) -> str:
    """The cheapest `sample_from_logits` mode that serves every row."""
    if all(r.temperature == 0 for r in rows):
        return "greedy"
    if any(r.temperature > 0 and (r.top_k > 0 or r.top_p < 1) for r in rows):
        return "filtered"
    return "sample"


def step_keys(seeds: jax.Array, counts: jax.Array) -> jax.Array:
    """Keys [R] for drawing token number `counts[r]` of row r."""
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)


# ---------------------------------------------------------------------------------------------
# Device functions


class DecodeState(NamedTuple):
    cache: tfm.KVCache
    token: jax.Array  # [R] the last sampled token, fed at the next step
    position: jax.Array  # [R] its position
    count: jax.Array  # [R] tokens generated so far
    done: jax.Array  # [R] bool


def _constrain_state(state: DecodeState) -> DecodeState:
    """Pins the carry's shardings so prefill and every decode call agree (no recompiles)."""
    c = state.cache
    kv = functools.partial(shd.shard_activation, logical_axes=_CACHE_AXES)
    ids = functools.partial(shd.shard_activation, logical_axes=("cache_batch", "cache_seq"))
    row = functools.partial(shd.shard_activation, logical_axes=("cache_batch",))
    cache = tfm.KVCache(kv(c.k), kv(c.v), ids(c.segment_ids), ids(c.positions), c.index)
    return DecodeState(cache, row(state.token), row(state.position), row(state.count), row(state.done))


def _pad_cache(cache: tfm.KVCache, length: int) -> tfm.KVCache:
    extra = length - cache.k.shape[2]
    kv = ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0))
    ids = ((0, 0), (0, extra))
    return tfm.KVCache(jnp.pad(cache.k, kv), jnp.pad(cache.v, kv), jnp.pad(cache.segment_ids, ids),
                       jnp.pad(cache.positions, ids), cache.index)


def _take_rows(cache: tfm.KVCache, rows: jax.Array) -> tfm.KVCache:
    return tfm.KVCache(jnp.take(cache.k, rows, axis=1), jnp.take(cache.v, rows, axis=1),
                       jnp.take(cache.segment_ids, rows, axis=0), jnp.take(cache.positions, rows, axis=0),
                       cache.index)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_len", "cache_dtype", "mode"))
def _prefill(graphdef, params, tokens, positions, segment_ids, row_src, rows: RowParams, *,
             cache_len: int, cache_dtype, mode: str):
    """Prompts [U, P+1] -> (DecodeState for the R rows, their first sampled tokens [R])."""
    model = nnx.merge(graphdef, params)
    u, p1 = tokens.shape
    p = p1 - 1
    cache = tfm.init_cache(model.config, u, p, dtype=cache_dtype)
    cache = cache._replace(k=shd.shard_activation(cache.k, _CACHE_AXES), v=shd.shard_activation(cache.v, _CACHE_AXES))
    _, cache = model(tokens[:, :p], positions[:, :p], segment_ids[:, :p], cache=cache)
    cache = _pad_cache(cache, p1)
    logits, cache = model(tokens[:, p:], positions[:, p:], segment_ids[:, p:], cache=cache)
    cache = _pad_cache(_take_rows(cache, row_src), cache_len)
    logits = jnp.take(logits[:, 0], row_src, axis=0)
    count = jnp.zeros(row_src.shape, jnp.int32)
    first = sample_from_logits(logits, step_keys(rows.seed, count), rows.temperature, rows.top_p, rows.top_k,
                               mode=mode)
    count = count + 1
    done = finished(first, count, rows)
    position = jnp.take(positions[:, p], row_src) + 1
    return _constrain_state(DecodeState(cache, first, position, count, done)), first


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "mode"), donate_argnames=("state",))
def _decode(graphdef, params, state: DecodeState, rows: RowParams, host_done, *, chunk: int, mode: str):
    """Up to `chunk` decode steps -> (state, tokens [R, chunk]); -1 where a row was already done."""
    cache_len = state.cache.k.shape[2]
    state = _constrain_state(state._replace(done=state.done | host_done))
    out = jnp.full((state.token.shape[0], chunk), NO_TOKEN, jnp.int32)

    def cond(carry):
        i, st, _ = carry
        return (i < chunk) & ~jnp.all(st.done) & (st.cache.index < cache_len)

    def body(carry):
        i, st, out = carry
        model = nnx.merge(graphdef, params)
        fed = jnp.where(st.done, 0, st.token)[:, None]
        seg = jnp.ones_like(fed)
        logits, cache = model(fed, st.position[:, None], seg, cache=st.cache)
        nxt = sample_from_logits(logits[:, 0], step_keys(rows.seed, st.count), rows.temperature, rows.top_p,
                                 rows.top_k, mode=mode)
        nxt = jnp.where(st.done, NO_TOKEN, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        count = st.count + (~st.done).astype(jnp.int32)
        done = st.done | finished(nxt, count, rows)
        st = DecodeState(cache, nxt, st.position + 1, count, done)
        return i + 1, _constrain_state(st), out

    _, state, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out))
    return state, out


# ---------------------------------------------------------------------------------------------
# Host loop


def model_mesh(model) -> Optional[jax.sharding.Mesh]:
    """The mesh a model's parameters are sharded over, or None when they live on one device."""
    for _, var in nnx.to_flat_state(nnx.state(model)):
        sharding = getattr(var.get_value(), "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def _batch_shards(mesh) -> int:
    return shd.axes_size(mesh, shd.logical_to_spec(("cache_batch",))[0])


class Plan(NamedTuple):
    """What one generation's decode calls share: per-row params and the sampling mode."""

    rows: RowParams
    mode: str


class Sampler:
    """Generates from a Transformer: `run` (collect) or `stream` (per-chunk updates). One
    generation at a time per instance (the server calls it from a single worker thread)."""

    def __init__(self, model, mesh=None, config: SamplerConfig = SamplerConfig()):
        self.config = config
        self.model_config = model.config
        self.mesh = model_mesh(model) if mesh is None else mesh
        self.graphdef, self.params = nnx.split(model)
        self.stats = {"prefill_calls": 0, "prefill_rows": 0, "decode_calls": 0, "rows": 0, "prefill_s": 0.0,
                      "decode_s": 0.0}
        self.timed = False
        self.last_shapes: dict[str, int] = {}

    def run(self, prompts: Sequence[Sequence[int]], rows: Sequence[RowSpec], decode: Optional[Decode] = None,
            track_text: bool = False) -> list[RowResult]:
        """Samples every row to completion; results in row order."""
        results: list[RowResult] = []
        for _ in self.stream(prompts, rows, decode, track_text, results):
            pass
        return results

    def stream(self, prompts: Sequence[Sequence[int]], rows: Sequence[RowSpec], decode: Optional[Decode] = None,
               track_text: bool = False, results: Optional[list] = None) -> Iterator[list[RowUpdate]]:
        """Yields, after each device call, the new tokens of every row that has some. `results`, when
        given, is filled with one RowResult per row (text state in `.stream` when tracked)."""
        self._check(prompts, rows, decode)
        results = [] if results is None else results
        results.extend(
            RowResult([], stream=TextStream(decode, r.stop) if (r.stop or track_text) else None) for r in rows
        )
        with mesh_context(self.mesh):
            t0 = time.perf_counter()
            state, out, plan = self.prefill(prompts, rows)
            if self.timed:  # benchmarks: separate prefill from decode time (costs one sync)
                jax.block_until_ready(out)
                t1 = time.perf_counter()
                self.stats["prefill_s"] += t1 - t0
            host_done = np.zeros(out.shape[0], bool)
            host_done[len(rows):] = True  # bucket padding rows
            out = out[:, None]
            while True:
                # Dispatch the next chunk before reading this one, so host work overlaps the
                # device. It may turn out unneeded (all rows end in this chunk): when every row is
                # done on device its loop exits at once; only rows ended by stop strings cost steps.
                self.stats["decode_calls"] += 1
                nxt = _decode(self.graphdef, self.params, state, plan.rows, host_done.copy(),
                              chunk=self.config.chunk_size, mode=plan.mode)
                updates = self._consume(to_host(out), rows, results, host_done)
                if updates:
                    yield updates
                if all(r.finish_reason is not None for r in results):
                    break
                state, out = nxt
            if self.timed:
                self.stats["decode_s"] += time.perf_counter() - t1

    def _check(self, prompts, rows, decode):
        if not rows:
            raise ValueError("sampler: no rows to sample")
        for i, r in enumerate(rows):
            if not 0 <= r.prompt < len(prompts):
                raise ValueError(f"sampler: row {i} continues prompt {r.prompt}, but there are {len(prompts)}")
            if r.max_new_tokens < 1:
                raise ValueError(f"sampler: row {i}: max_new_tokens must be >= 1, got {r.max_new_tokens}")
            if r.stop and decode is None:
                raise ValueError("sampler: stop strings need a decode function (a tokenizer)")
            if r.min_tokens or r.min_p or r.logprobs is not None or penalized(r):
                raise ValueError(f"sampler: row {i}: min_tokens, min_p, logprobs and penalties need the engine "
                                 "(lt_jax.sample.engine), not the lockstep sampler")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"sampler: prompt {i} is empty")

    def prefill(self, prompts, rows):
        """Dispatches the prefill of `prompts` for `rows`: (DecodeState, first tokens [rows bucket],
        Plan). Called by `stream`; public for benchmarks. Run it under `mesh_context(self.mesh)`."""
        cfg, shards = self.config, _batch_shards(self.mesh)
        align = 128 if jax.default_backend() == "tpu" else 1  # splash attention blocks
        longest = max(len(p) for p in prompts)
        p = bucket(longest - 1, cfg.min_prompt_bucket, cfg.buckets_per_octave, align)
        most_new = max(r.max_new_tokens for r in rows)
        cache_len = bucket(p + most_new, 1, cfg.buckets_per_octave, align)
        limit = self.model_config.max_position_embeddings
        if longest + most_new > limit:
            log.warning("prompt (%d) + max_new_tokens (%d) exceeds max_position_embeddings (%d)",
                        longest, most_new, limit)
        tokens, positions, segs = _left_pad(prompts, p + 1, batch_bucket(len(prompts), shards), cfg.pad_id)
        n_rows = batch_bucket(len(rows), shards)
        row_src = np.zeros(n_rows, np.int32)
        row_src[: len(rows)] = [r.prompt for r in rows]
        plan = Plan(row_params(rows, n_rows), sampling_mode(rows))
        self.stats["prefill_calls"] += 1
        self.stats["prefill_rows"] += len(prompts)
        self.stats["rows"] += len(rows)
        self.last_shapes = {"prompt_rows": tokens.shape[0], "prompt_len": p + 1, "rows": n_rows, "cache_len": cache_len}
        dtype = None if cfg.cache_dtype is None else jnp.dtype(cfg.cache_dtype)
        state, first = _prefill(self.graphdef, self.params, tokens, positions, segs, row_src, plan.rows,
                                cache_len=cache_len, cache_dtype=dtype, mode=plan.mode)
        return state, first, plan

    def _consume(self, chunk: np.ndarray, rows, results, host_done) -> list[RowUpdate]:
        updates = []
        for r, (spec, res) in enumerate(zip(rows, results)):
            if res.finish_reason is not None:
                continue
            new, reason = advance_row(res, spec, chunk[r])
            if reason is not None:
                host_done[r] = True
            if new or reason is not None:
                updates.append(RowUpdate(r, new, reason))
        return updates


def advance_row(res: RowResult, spec: RowSpec, chunk_row) -> tuple[list[int], Optional[str]]:
    """Appends a row's new tokens from a device chunk (up to its first stop token id, its budget or
    a stop string completed in them) and ends it when one of those hit: (tokens appended, finish
    reason or None). Shared by the lockstep sampler and the engine."""
    new = _row_tokens(np.asarray(chunk_row), spec, len(res.tokens))
    reason, stop_reason = None, None
    if new and new[-1] in spec.stop_token_ids:
        reason, stop_reason = "stop", new[-1]
    elif len(res.tokens) + len(new) >= spec.max_new_tokens:
        reason = "length"
    if res.stream is not None:
        # A stop token is in the row's tokens but not its text.
        keep = res.stream.push(new[:-1] if stop_reason is not None else new)
        if keep is not None:  # a stop string completed inside this chunk
            new = new[: keep - len(res.tokens)]
            reason, stop_reason = "stop", res.stream.stop_match[0]
    res.tokens.extend(new)
    if reason is not None:
        res.finish_reason, res.stop_reason = reason, stop_reason
    return new, reason


def _row_tokens(chunk_row: np.ndarray, spec: RowSpec, have: int) -> list[int]:
    """The row's real tokens in a chunk: up to its first stop token id or its budget."""
    out = []
    for t in chunk_row:
        t = int(t)
        if t == NO_TOKEN:
            break
        out.append(t)
        if t in spec.stop_token_ids or have + len(out) >= spec.max_new_tokens:
            break
    return out


def _left_pad(prompts, length: int, n_rows: int, pad_id: int):
    tokens = np.full((n_rows, length), pad_id, np.int32)
    positions = np.zeros((n_rows, length), np.int32)
    segs = np.zeros((n_rows, length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, length - n :] = p
        positions[i, length - n :] = np.arange(n)
        segs[i, length - n :] = 1
    return tokens, positions, segs


class mesh_context:
    """`jax.set_mesh(mesh)` when there is a mesh; nothing otherwise."""

    def __init__(self, mesh):
        self._ctx = jax.set_mesh(mesh) if mesh is not None else None

    def __enter__(self):
        return self._ctx.__enter__() if self._ctx is not None else None

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc) if self._ctx is not None else False


def greedy(prompts: Sequence[Sequence[int]], model, max_new_tokens: int, mesh=None,
           config: SamplerConfig = SamplerConfig(), eos: Sequence[int] = ()) -> list[list[int]]:
    """Greedy continuations of token-id prompts (a convenience for parity checks and tools)."""
    rows = [RowSpec(i, temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(eos))
            for i in range(len(prompts))]
    return [r.tokens for r in Sampler(model, mesh, config).run(prompts, rows)]


