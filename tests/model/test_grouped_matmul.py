"""The grouped matmul's implementations: the TPU megablox kernel (in Pallas interpret mode here) and
the CPU `tiles` path against `jax.lax.ragged_dot`, forward and gradients, with an empty group and
rows past the groups; and the platform switch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lt_jax.model import grouped_matmul as gm
from lt_jax.model import sharding as shd


def _value_and_grads(impl, lhs, rhs, group_sizes, cotangent):
    def loss(a, b):
        return jnp.sum(gm.grouped_matmul(a, b, group_sizes, impl, interpret=True) * cotangent)

    out = gm.grouped_matmul(lhs, rhs, group_sizes, impl, interpret=True)
    return out, jax.grad(loss, argnums=(0, 1))(lhs, rhs)


@pytest.mark.parametrize("m", [200, 130])  # 200: two row tiles after padding to 256; 130: K, N tiles partial
def test_megablox_in_interpret_mode_and_tiles_equal_ragged_dot(m):
    k, n = (64, 96) if m == 200 else (160, 136)
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (m, k))
    rhs = jax.random.normal(keys[1], (4, k, n))
    cotangent = jax.random.normal(keys[2], (m, n))
    # group 1 is empty; the groups end before the last rows, which must give zeros and zero gradients
    group_sizes = jnp.array([70, 0, 25, 15 if m == 130 else 75], jnp.int32)
    used = int(group_sizes.sum())
    ref, (ref_dl, ref_dr) = _value_and_grads("ragged_dot", lhs, rhs, group_sizes, cotangent)
    for impl in ("megablox", "tiles"):
        out, (dl, dr) = _value_and_grads(impl, lhs, rhs, group_sizes, cotangent)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4, err_msg=impl)
        np.testing.assert_allclose(dl, ref_dl, rtol=1e-5, atol=1e-4, err_msg=impl)
        np.testing.assert_allclose(dr, ref_dr, rtol=1e-5, atol=1e-4, err_msg=impl)
        assert not np.any(out[used:]) and not np.any(dl[used:]), impl  # megablox leaves these uninitialised
        assert not np.any(dr[1]) and np.any(dr[0]), impl


def test_the_switch_picks_megablox_for_tpu_tiles_for_cpu_ragged_dot_for_gpu():
    assert gm.resolve_impl("auto", "tpu") == "megablox"
    assert gm.resolve_impl("auto", "cpu") == "tiles" and gm.resolve_impl("auto", "gpu") == "ragged_dot"
    assert gm.resolve_impl("megablox", "cpu") == "megablox"
    with pytest.raises(ValueError, match="use auto, ragged_dot, megablox or tiles"):
        gm.resolve_impl("cutlass")
    assert gm.target_platform() == "cpu"
    with jax.set_mesh(shd.make_mesh(shd.MeshConfig(fsdp=2), devices=jax.devices()[:2])):
        assert gm.target_platform() == "cpu"  # read from the mesh's devices (TPU under lt-jax compile)
    with pytest.raises(ValueError, match="bfloat16 or float32"):
        gm.grouped_matmul(jnp.ones((8, 4), jnp.float16), jnp.ones((1, 4, 4), jnp.float16),
                          jnp.array([8]), "megablox", interpret=True)


def test_megablox_tiles_fit_the_kernel_constraints():
    # rows: a multiple of 128 up to 512 (M is padded to it); K, N: a dividing tile, else 128 or the whole dim
    assert gm.megablox_tiling(200, 2048, 768) == (256, 512, 256)
    assert gm.megablox_tiling(100_000, 96, 1408) == (512, 96, 128)
