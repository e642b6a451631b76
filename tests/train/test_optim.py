"""Schedules, the weight-decay mask, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lt_jax.config import ConfigError, from_dict
from lt_jax.train import optim
from lt_jax.train.config import OptimConfig


def lrs(cfg: OptimConfig, total: int) -> np.ndarray:
    sched = optim.make_schedule(cfg, total)
    return np.array([float(sched(s)) for s in range(total + 1)])


def test_cosine_with_fractional_warmup_to_zero_is_the_deepdistill_schedule():
    cfg = OptimConfig(lr=8e-5, schedule="cosine", warmup_fraction=0.05, min_lr_ratio=0.0)
    lr = lrs(cfg, 200)  # warmup: 10 steps
    assert lr[0] == 0 and lr[5] == pytest.approx(4e-5) and lr[10] == pytest.approx(8e-5)
    mid = 10 + 95  # halfway through the cosine
    assert lr[mid] == pytest.approx(4e-5, rel=1e-4)
    assert lr[200] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(lr[10:]) <= 1e-12)


def test_a_positive_warmup_fraction_warms_up_at_least_one_step():
    cfg = OptimConfig(lr=1.0, schedule="constant", warmup_fraction=0.05)
    assert optim.warmup_steps(cfg, 10) == 1  # 0.05 x 10 rounds to 0
    assert lrs(cfg, 10)[:2].tolist() == [0.0, 1.0]
    assert optim.warmup_steps(OptimConfig(lr=1.0, warmup_fraction=0.0), 10) == 0


def test_floor_linear_constant_and_warmup_in_steps():
    floor = lrs(OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1), 20)
    assert floor[4] == pytest.approx(1.0) and floor[20] == pytest.approx(0.1)
    lin = lrs(OptimConfig(lr=1.0, schedule="linear", warmup_steps=0, min_lr_ratio=0.0), 10)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and lin[10] == pytest.approx(0.0)
    const = lrs(OptimConfig(lr=2.0, schedule="constant", warmup_steps=2), 10)
    assert const.tolist()[:3] == [0.0, 1.0, 2.0] and set(const[2:].tolist()) == {2.0}


def test_warmup_stable_decay():
    lr = lrs(OptimConfig(lr=1.0, schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0), 100)
    assert lr[10] == pytest.approx(1.0) and lr[79] == pytest.approx(1.0) and lr[80] == pytest.approx(1.0)
    assert lr[90] == pytest.approx(0.5) and lr[100] == pytest.approx(0.0)


def test_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="warmup_steps or warmup_fraction, not both"):
        from_dict(OptimConfig, {"warmup_steps": 10, "warmup_fraction": 0.1})
    with pytest.raises(ConfigError, match="schedule"):
        from_dict(OptimConfig, {"schedule": "cosinus"})


PARAMS = {
    "embed": {"embedding": jnp.ones((4, 2))},
    "final_norm": {"scale": jnp.ones((2,))},
    "layers": {"attn": {"q_proj": {"kernel": jnp.ones((1, 2, 2)), "bias": jnp.ones((1, 2))}}},
}


def test_decay_mask_skips_norms_biases_and_optionally_embeddings():
    mask = optim.decay_mask(PARAMS)
    assert mask["final_norm"]["scale"] is False and mask["layers"]["attn"]["q_proj"]["bias"] is False
    assert mask["layers"]["attn"]["q_proj"]["kernel"] is True and mask["embed"]["embedding"] is True
    assert optim.decay_mask(PARAMS, decay_embeddings=False)["embed"]["embedding"] is False


def test_adamw_decays_only_masked_in_parameters():
    cfg = OptimConfig(lr=0.1, schedule="constant", weight_decay=0.5, clip_norm=None)
    opt, _ = optim.make_optimizer(cfg, 10)
    zero = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = opt.update(zero, opt.init(PARAMS), PARAMS)
    new = jax.tree.map(lambda p, u: p + u, PARAMS, updates)
    assert float(new["final_norm"]["scale"][0]) == 1.0
    assert float(new["layers"]["attn"]["q_proj"]["bias"][0, 0]) == 1.0
    assert float(new["layers"]["attn"]["q_proj"]["kernel"][0, 0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)


def test_clipping_scales_gradients_to_the_global_norm():
    # eps = 1 makes Adam's step depend on the gradient's scale, so clipping shows in the update.
    clip = OptimConfig(lr=1.0, schedule="constant", clip_norm=1.0, eps=1.0)
    plain = OptimConfig(lr=1.0, schedule="constant", clip_norm=None, eps=1.0)
    params = {"w": jnp.zeros(2)}
    grads = {"w": jnp.array([30.0, 40.0])}  # global norm 50
    (a, _), (b, _), (c, _) = (
        optim.make_optimizer(clip, 10)[0].update(grads, optim.make_optimizer(clip, 10)[0].init(params), params),
        optim.make_optimizer(plain, 10)[0].update({"w": grads["w"] / 50}, optim.make_optimizer(plain, 10)[0].init(params), params),
        optim.make_optimizer(plain, 10)[0].update(grads, optim.make_optimizer(plain, 10)[0].init(params), params),
    )
    np.testing.assert_allclose(a["w"], b["w"], rtol=1e-6)
    assert not np.allclose(a["w"], c["w"])
