"""The jitted train and eval steps: micro-batch accumulation, loss, clipping, the optimizer update.

The state is a `TrainState` of plain pytrees (parameters as the pure dict `nnx.state(model)` gives,
the Optax state, the step, a raw RNG key), so it jits, shards and checkpoints without wrappers.

Accumulation runs inside the step as a `lax.scan` over `grad_accum` micro-batches: one compiled
function, gradients summed in fp32. Micro-batch i takes rows i, i+A, i+2A, ... of the global batch,
so every device keeps feeding its own rows (a contiguous split would put whole micro-batches on a
few devices). The loss is divided by the target count of the whole global batch (loss.py), so the
result equals one pass over all rows up to float summation order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lt_jax.model import moe
from lt_jax.model import sharding as shd
from lt_jax.train import loss as loss_lib


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # pure nested dict of arrays (the model's nnx state)
    opt_state: Any
    rng: jax.Array  # uint32 raw key data, split every step (kept for stochastic features)


@dataclasses.dataclass(frozen=True)
class StepOptions:
    grad_accum: int = 1
    z_loss: float = 0.0
    lm_head_chunk: int = 0  # 0: full logits


# ---------------------------------------------------------------------------------------------
# The loss, with the model split at the LM head (Transformer.hidden_states / Transformer.logits)


def micro_loss_sums(model, batch: dict, options: StepOptions) -> tuple[jax.Array, jax.Array]:
    """(weighted NLL sum, weighted log(Z)^2 sum) of one micro-batch holding `targets`/`weights`."""
    return micro_sums(model, batch, options)[:2]


def micro_sums(model, batch: dict, options: StepOptions):
    """`micro_loss_sums` plus the router statistics of a mixture-of-experts model (else None)."""
    hidden, router = model.hidden_states_and_router_stats(batch["input_ids"], batch["positions"], batch["segment_ids"])
    if options.lm_head_chunk and options.lm_head_chunk < hidden.shape[1]:
        nll, z = loss_lib.chunked_loss_sums(hidden, model.logits, batch["targets"], batch["weights"], options.lm_head_chunk)
    else:
        nll, z = loss_lib.loss_sums(model.logits(hidden), batch["targets"], batch["weights"])
    return nll, z, router


# ---------------------------------------------------------------------------------------------
# Steps


def _with_targets(batch: dict) -> dict:
    targets, weights = loss_lib.shift_targets(batch["input_ids"], batch["loss_mask"], batch["segment_ids"])
    return {"input_ids": batch["input_ids"], "positions": batch["positions"], "segment_ids": batch["segment_ids"],
            "targets": targets, "weights": weights}


def _split_micro(x: jax.Array, accum: int) -> jax.Array:
    """[G, ...] -> [A, G/A, ...] with micro-batch i = rows i, i+A, ... (see module doc)."""
    g = x.shape[0]
    y = jnp.swapaxes(x.reshape(g // accum, accum, *x.shape[1:]), 0, 1)
    return shd.shard_activation(y, (None, "act_batch", "act_seq")[: y.ndim])


def accumulate(fn: Callable, params, batch: dict, accum: int):
    """Sums `fn(params, micro_batch)` (a pytree) over `accum` micro-batches with a scan."""
    if accum == 1:
        return fn(params, batch)
    micro = jax.tree.map(lambda x: _split_micro(x, accum), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)),
                         jax.eval_shape(fn, params, first))

    def body(acc, mb):
        out = fn(params, mb)
        return jax.tree.map(lambda a, o: a + o.astype(a.dtype), acc, out), None

    total, _ = jax.lax.scan(body, zeros, micro)
    return total


def loss_and_grads(params, batch: dict, *, graphdef, options: StepOptions):
    """(grads, sums) of the global-batch loss; sums holds the weighted NLL and z sums and the
    target count. Gradients are of (NLL + z_loss * z) / target count, accumulated in fp32."""
    batch = _with_targets(batch)
    count = jnp.sum(batch["weights"])
    denom = jnp.maximum(count, 1.0)

    def objective(p, mb):
        model = nnx.merge(graphdef, p)
        nll, z, router = micro_sums(model, mb, options)
        loss = (nll + options.z_loss * z) / denom
        if router is not None:  # the load-balancing loss of this micro-batch's real tokens (mean over them)
            loss += model.config.router_aux_loss_coef * moe.load_balancing_loss(router) / options.grad_accum
        return loss, (nll, z, router)

    def grads_and_sums(p, mb):
        (_, (nll, z, router)), grads = jax.value_and_grad(objective, has_aux=True)(p, mb)
        return grads, nll, z, router

    grads, nll, z, router = accumulate(grads_and_sums, params, batch, options.grad_accum)
    sums = {
        "nll": nll, "z": z, "loss_tokens": count,
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        # Causal (query, key) pairs within segments: positions restart at 0 in each segment.
        "attention_pairs": jnp.sum(jnp.where(batch["segment_ids"] > 0, batch["positions"] + 1, 0).astype(jnp.float32)),
    }
    if router is not None:
        sums["router"] = router
    return grads, sums


def train_step(state: TrainState, batch: dict, *, graphdef, optimizer, schedule, options: StepOptions):
    """One optimizer step on a global batch {input_ids, loss_mask, segment_ids, positions} [G, S]."""
    grads, sums = loss_and_grads(state.params, batch, graphdef=graphdef, options=options)
    denom = jnp.maximum(sums["loss_tokens"], 1.0)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = jax.tree.map(lambda new, old: new.astype(old.dtype), params, state.params)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    metrics = {
        "loss": sums["nll"] / denom,
        "z_loss": sums["z"] / denom,
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
        "loss_tokens": sums["loss_tokens"],
        "tokens": sums["tokens"],
        "attention_pairs": sums["attention_pairs"],
    }
    if "router" in sums:  # over the global batch's real tokens and every sparse layer
        metrics.update(moe_aux_loss=moe.load_balancing_loss(sums["router"]),
                       moe_expert_load=moe.expert_load(sums["router"]),
                       moe_dropped=sums["router"].dropped / jnp.maximum(jnp.sum(sums["router"].slots), 1.0))
    return TrainState(state.step + 1, params, opt_state, rng), metrics


def eval_step(params, batch: dict, *, graphdef, options: StepOptions):
    """{"nll_sum", "loss_tokens"} of a batch, accumulated over micro-batches like training."""
    batch = _with_targets(batch)

    def sums(p, mb):
        nll, _ = micro_loss_sums(nnx.merge(graphdef, p), mb, options)
        return {"nll_sum": nll, "loss_tokens": jnp.sum(mb["weights"])}

    return accumulate(sums, params, batch, options.grad_accum)


# ---------------------------------------------------------------------------------------------
# Building the state and the jitted functions


def split_model(model) -> tuple[Any, Any]:
    """(graphdef, pure params dict) of a live or abstract model."""
    graphdef, state = nnx.split(model)
    return graphdef, state.to_pure_dict()


def state_shardings(abstract_params, optimizer, mesh):
    """TrainState of NamedShardings: params as the model's rules say, Adam moments like their
    parameters, scalars replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    replicated = NamedSharding(mesh, PartitionSpec())
    param_sh = jax.tree.map(lambda x: x.sharding, abstract_params)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    return TrainState(replicated, param_sh, opt_sh, replicated)


def abstract_state(abstract_params, optimizer, shardings: TrainState) -> TrainState:
    """The TrainState as ShapeDtypeStructs with shardings (restore targets; no memory)."""
    opt = jax.eval_shape(optimizer.init, abstract_params)
    with_sharding = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
    return TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
        jax.tree.map(with_sharding, abstract_params, shardings.params),
        jax.tree.map(with_sharding, opt, shardings.opt_state),
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng),
    )


def init_state(params, optimizer, shardings: TrainState, seed: int) -> TrainState:
    """A fresh TrainState around `params` (already placed in their shardings)."""
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    rng = jax.device_put(jax.random.key_data(jax.random.key(seed)), shardings.rng)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step, params, opt_state, rng)


def jit_train_step(graphdef, optimizer, schedule, options: StepOptions, shardings: TrainState, batch_sharding):
    fn = lambda s, b: train_step(s, b, graphdef=graphdef, optimizer=optimizer, schedule=schedule, options=options)  # noqa: E731
    return jax.jit(fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None), donate_argnums=0)


def jit_eval_step(graphdef, options: StepOptions, param_shardings, batch_sharding):
    fn = lambda p, b: eval_step(p, b, graphdef=graphdef, options=options)  # noqa: E731
    return jax.jit(fn, in_shardings=(param_shardings, batch_sharding))


__all__ = [
    "TrainState", "StepOptions", "loss_and_grads", "train_step", "eval_step",
    "state_shardings", "abstract_state", "init_state", "jit_train_step", "jit_eval_step", "split_model",
]
