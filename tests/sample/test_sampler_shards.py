"""The sampler's batch shards: the product of the mesh axes its cache batch is split over."""

from __future__ import annotations

import jax
import numpy as np

from lt_jax.model import sharding as shd
from lt_jax.sample import sampler as smp


def test_batch_shards_are_the_cache_batch_axes_the_mesh_has():
    assert smp._batch_shards(None) == 1
    assert smp._batch_shards(shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))) == 4
    assert smp._batch_shards(shd.make_mesh(shd.MeshConfig(data=1, fsdp=-1, tensor=2))) == 4
    # A mesh without fsdp (built by hand): the cache batch is split over `data` alone.
    assert smp._batch_shards(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))) == 2
    assert smp._batch_shards(jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))) == 1
