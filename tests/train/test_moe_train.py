"""Training a mixture-of-experts model: the load-balancing loss joins the SFT loss with its
coefficient, only real tokens count, and the trainer logs it with the per-expert load."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lt_jax.config import from_dict
from lt_jax.model import moe
from lt_jax.model import transformer as tfm
from lt_jax.model.config import ModelConfig
from lt_jax.train import step as st
from lt_jax.train import trainer
from lt_jax.train.config import RunConfig

MOE = dict(family="qwen3_moe", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
           num_kv_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           mlp_only_layers=(1,))


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 96, (4, 16)).astype(np.int32)
    seg = np.ones((4, 16), np.int32)
    seg[:, 8:] = 2  # two documents per row
    seg[3, 12:] = 0  # padding
    pos = np.where(seg == 2, np.arange(16) - 8, np.arange(16)).astype(np.int32)
    loss_mask = (rng.random((4, 16)) < 0.7).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "loss_mask": loss_mask}


def test_aux_loss_is_added_with_its_coefficient_and_reaches_the_router():
    from flax import nnx

    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    cfg = ModelConfig(**MOE, router_aux_loss_coef=0.5)
    _, params = st.split_model(tfm.init_model(cfg, seed=1))
    sums, grads = {}, {}
    for coef in (0.0, 0.5):  # same parameters, the coefficient only in the graph's config
        graphdef = nnx.split(tfm.abstract_model(dataclasses.replace(cfg, router_aux_loss_coef=coef)))[0]
        fn = jax.jit(lambda p, b, g=graphdef: st.loss_and_grads(p, b, graphdef=g, options=st.StepOptions()))
        grads[coef], sums[coef] = fn(params, batch)
    assert float(sums[0.5]["router"].tokens) == 2 * float(jnp.sum(batch["segment_ids"] > 0))  # 2 sparse layers

    def aux(p):
        _, s = nnx.merge(graphdef, p).hidden_states_and_router_stats(
            batch["input_ids"], batch["positions"], batch["segment_ids"])
        return 0.5 * moe.load_balancing_loss(s)

    value, want = jax.jit(jax.value_and_grad(aux))(params)
    np.testing.assert_allclose(0.5 * float(moe.load_balancing_loss(sums[0.5]["router"])), float(value), rtol=1e-6)
    # The difference the coefficient makes is exactly the gradient of coef x aux loss.
    diff = jax.tree.map(lambda a, b: a - b, grads[0.5], grads[0.0])
    router = lambda t: t["layers"]["mlp"]["router"]["kernel"]  # noqa: E731
    assert float(jnp.abs(router(want)).max()) > 0
    np.testing.assert_allclose(np.asarray(router(diff)), np.asarray(router(want)), rtol=1e-4, atol=1e-8)


def test_train_steps_lower_the_loss_and_report_expert_load():
    cfg = ModelConfig(**MOE, router_aux_loss_coef=0.01)
    graphdef, params = st.split_model(tfm.init_model(cfg, seed=0))
    optimizer = optax.adam(3e-3)
    state = st.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jnp.zeros((2,), jnp.uint32))
    step = jax.jit(lambda s, b: st.train_step(s, b, graphdef=graphdef, optimizer=optimizer,
                                              schedule=lambda _: 3e-3, options=st.StepOptions(grad_accum=2)))
    batch = {k: jnp.asarray(v) for k, v in _batch(1).items()}
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0]
    load = np.asarray(metrics["moe_expert_load"])
    assert load.shape == (4,) and abs(load.sum() - 1) < 1e-6
    assert float(metrics["moe_aux_loss"]) >= 1.0 - 1e-6  # E * sum f P >= 1, equal only when balanced
    assert float(metrics["moe_dropped"]) == 0.0


@pytest.mark.slow
def test_trainer_logs_the_router_metrics(tiny_data, helpers, tmp_path):
    out = str(tmp_path / "run")
    model = dict(MOE, vocab_size=helpers.TINY_MODEL["vocab_size"], router_aux_loss_coef=0.01, capacity_factor=1.0)
    model["mlp_only_layers"] = list(model["mlp_only_layers"])
    raw = helpers.run_config(out, tiny_data.train, train={"steps": 3}, checkpoint={"every": 100})
    raw["model"] = model
    assert trainer.train(from_dict(RunConfig, raw), printer=lambda *a, **k: None) == 0
    records = helpers.read_metrics(out)
    last = records[3]
    loads = [last[f"moe_load/{e}"] for e in range(4)]
    assert abs(sum(loads) - 1) < 1e-5 and last["moe_load_max"] == max(loads) * 4
    assert last["moe_aux_loss"] >= 1.0 - 1e-6 and 0 <= last["moe_dropped"] < 1
