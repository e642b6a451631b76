"""lt_jax.model.moe: routing and the grouped expert FFN against a dense reference and torch."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from lt_jax.model import moe

T, H, I, E, K = 12, 8, 6, 4, 2


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(T, H)).astype(np.float32), rng.normal(size=(E, H, I)).astype(np.float32) * 0.3,
            rng.normal(size=(E, H, I)).astype(np.float32) * 0.3, rng.normal(size=(E, I, H)).astype(np.float32) * 0.3)


def _dense_reference(x, weights, experts, wg, wu, wd, kept=None):
    """Every expert on every token, then the routed ones picked: what the grouped path must equal."""
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    per_expert = np.einsum("eti,eih->eth", silu(np.einsum("th,ehi->eti", x, wg)) * np.einsum("th,ehi->eti", x, wu), wd)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            if kept is None or kept[t, j]:
                out[t] += weights[t, j] * per_expert[experts[t, j], t]
    return out


def test_route_matches_torch_topk_and_norm():
    torch = pytest.importorskip("torch")
    logits = np.random.default_rng(1).normal(size=(T, E)).astype(np.float32)
    for norm in (False, True):
        w, e = moe.route(jnp.asarray(logits), K, norm)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1, dtype=torch.float)
        tw, te = torch.topk(probs, K, dim=-1)
        if norm:
            tw = tw / tw.sum(-1, keepdim=True)
        np.testing.assert_array_equal(np.asarray(e), te.numpy())
        np.testing.assert_allclose(np.asarray(w), tw.numpy(), rtol=1e-6)


def test_router_ties_go_to_the_lower_expert_index():
    torch = pytest.importorskip("torch")
    logits = np.zeros((3, E), np.float32)  # all tied
    logits[1, [1, 3]] = 2.0  # a tie between experts 1 and 3 at the top
    logits[2, [0, 2]] = -1.0  # experts 1 and 3 tied for both slots
    _, e = moe.route(jnp.asarray(logits), K, False)
    _, te = torch.topk(torch.softmax(torch.from_numpy(logits), -1), K, dim=-1)
    np.testing.assert_array_equal(np.asarray(e), [[0, 1], [1, 3], [1, 3]])
    # torch.topk agrees on two-way ties; among four equal values its CPU kernel returns [2, 3]
    # (its tie order is unspecified), so exact ties of many experts are where the two may differ.
    np.testing.assert_array_equal(np.asarray(e)[1:], te.numpy()[1:])


@pytest.mark.parametrize("case", ["random", "one_expert", "idle_expert"])
def test_experts_ffn_equals_dense_reference(case):
    x, wg, wu, wd = _weights()
    logits = np.random.default_rng(2).normal(size=(T, E)).astype(np.float32)
    if case == "one_expert":  # every token's first slot goes to expert 2
        logits[:, 2] += 50.0
    if case == "idle_expert":  # expert 0 receives nothing
        logits[:, 0] -= 50.0
    weights, experts = moe.route(jnp.asarray(logits), K, True)
    counts = np.bincount(np.asarray(experts).ravel(), minlength=E)
    if case == "one_expert":
        assert counts[2] == T
    if case == "idle_expert":
        assert counts[0] == 0
    got = moe.experts_ffn(jnp.asarray(x), weights, experts, jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd))
    want = _dense_reference(x, np.asarray(weights), np.asarray(experts), wg, wu, wd)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert int(moe.dropped_slots(experts, E, None)) == 0


def test_experts_ffn_gradients_equal_dense_reference():
    x, wg, wu, wd = _weights(3)
    weights, experts = moe.route(jnp.asarray(np.random.default_rng(4).normal(size=(T, E)), jnp.float32), K, False)

    def dense(x, wg, wu, wd):
        h = jax.nn.silu(jnp.einsum("th,ehi->eti", x, wg)) * jnp.einsum("th,ehi->eti", x, wu)
        per = jnp.einsum("eti,eih->eth", h, wd)  # [E, T, H]
        picked = jnp.take_along_axis(jnp.swapaxes(per, 0, 1), experts[:, :, None], axis=1)  # [T, k, H]
        return jnp.sum(jnp.einsum("tkh,tk->th", picked, weights) ** 2)

    grouped = lambda *a: jnp.sum(moe.experts_ffn(a[0], weights, experts, *a[1:]) ** 2)  # noqa: E731
    args = tuple(jnp.asarray(a) for a in (x, wg, wu, wd))
    for g, d in zip(jax.grad(grouped, argnums=(0, 1, 2, 3))(*args), jax.grad(dense, argnums=(0, 1, 2, 3))(*args)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(d), rtol=1e-4, atol=1e-5)


def test_capacity_factor_drops_over_capacity_slots_in_token_order():
    x, wg, wu, wd = _weights(5)
    logits = np.random.default_rng(6).normal(size=(T, E)).astype(np.float32)
    logits[:, 1] += 50.0  # every token's first slot: expert 1, far over capacity
    weights, experts = moe.route(jnp.asarray(logits), K, True)
    cap = moe.capacity(T * K, E, 1.0)  # 6 slots per expert
    ex = np.asarray(experts)
    kept = np.zeros(ex.shape, bool)
    seen = np.zeros(E, int)
    for t in range(T):
        for j in range(K):
            kept[t, j] = seen[ex[t, j]] < cap
            seen[ex[t, j]] += 1
    assert (~kept).sum() > 0
    got = moe.experts_ffn(jnp.asarray(x), weights, experts, jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd),
                          capacity_factor=1.0)
    want = _dense_reference(x, np.asarray(weights), ex, wg, wu, wd, kept)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    assert int(moe.dropped_slots(experts, E, 1.0)) == int((~kept).sum())
    # A factor large enough for the worst expert drops nothing and equals dropless.
    big = moe.experts_ffn(jnp.asarray(x), weights, experts, jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd),
                          capacity_factor=float(E))
    np.testing.assert_allclose(np.asarray(big), _dense_reference(x, np.asarray(weights), ex, wg, wu, wd), atol=1e-5)


def test_invalid_tokens_take_no_capacity_and_give_zero():
    x, wg, wu, wd = _weights(7)
    weights, experts = moe.route(jnp.asarray(np.random.default_rng(8).normal(size=(T, E)), jnp.float32), K, True)
    valid = np.arange(T) < T - 3
    got = moe.experts_ffn(jnp.asarray(x), weights, experts, jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd),
                          valid=jnp.asarray(valid))
    want = _dense_reference(x, np.asarray(weights), np.asarray(experts), wg, wu, wd)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert not np.asarray(got)[~valid].any()


def test_load_balancing_loss_matches_transformers_function():
    torch = pytest.importorskip("torch")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    rng = np.random.default_rng(9)
    layers = [rng.normal(size=(2 * 5, E)).astype(np.float32) for _ in range(3)]
    mask = np.ones((2, 5), np.int64)
    mask[1, 3:] = 0
    want = load_balancing_loss_func(tuple(torch.from_numpy(g) for g in layers), E, K, torch.from_numpy(mask))
    total = None
    for g in layers:
        _, e = moe.route(jnp.asarray(g), K, False)
        s = moe.router_stats(jnp.asarray(g), e, jnp.asarray(mask.reshape(-1) > 0))
        total = s if total is None else jax.tree.map(jnp.add, total, s)
    np.testing.assert_allclose(float(moe.load_balancing_loss(total)), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(moe.expert_load(total))), 1.0, rtol=1e-6)
