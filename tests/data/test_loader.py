"""The loader: every record once per epoch, packed faithfully, per-process rows, global arrays, and a
cursor that continues with exactly the batches that would have come next."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import token_data
from lt_jax.data import loader as loader_lib
from lt_jax.data import packing
from lt_jax.data.source import TokenizedSource
from lt_jax.model import sharding as shd

SEQ, BATCH = 128, 4


def options(**kw) -> loader_lib.LoaderOptions:
    return loader_lib.LoaderOptions(**{"seq_len": SEQ, "global_batch": BATCH, "seed": 3, "pack_window": 32, **kw})


def unpack(batch) -> list[tuple[list[int], list[int]]]:
    """The examples of a numpy batch, recovered from segment ids."""
    out = []
    for ids, mask, seg, pos in zip(batch["input_ids"], batch["loss_mask"], batch["segment_ids"], batch["positions"]):
        for k in range(1, int(seg.max()) + 1):
            sel = seg == k
            assert pos[sel].tolist() == list(range(int(sel.sum())))  # positions restart per example
            out.append((ids[sel].tolist(), mask[sel].tolist()))
        assert ids[seg == 0].tolist() == [0] * int((seg == 0).sum())
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_an_epoch_holds_every_record_once_packed_faithfully(random_data):
    source = TokenizedSource(random_data.path)
    loader = loader_lib.Loader(source, options())
    n = loader.batches_in_epoch(0)
    stats = loader.stats(0)
    seen = [(tuple(i), tuple(m)) for b in take(loader, n) for i, m in unpack(b)]
    expected = {(tuple(r[0].tolist()), tuple(r[1].tolist())) for r in random_data.records}
    assert len(seen) == len(set(seen)) and set(seen) <= expected  # no duplicates, nothing altered
    missing = len(expected) - len(seen)
    # only examples in rows past the last full batch may be missing, and they are counted
    assert stats["rows_past_last_batch"] < BATCH and (missing == 0) == (stats["rows_past_last_batch"] == 0)
    assert stats["dropped_overlength"] == 0 and stats["fill"] > 0.9
    # the next epoch is a different shuffle of the same records
    loader2 = loader_lib.Loader(source, options())
    loader2.set_state({**loader2.get_state(), "epoch": 1, "batch": 0})
    first_next_epoch = unpack(next(loader2))
    assert first_next_epoch != unpack(take(loader_lib.Loader(source, options()), 1)[0])


def test_restored_state_continues_with_the_batches_that_would_have_come_next(random_data):
    source = TokenizedSource(random_data.path)
    per_epoch = loader_lib.Loader(source, options()).batches_in_epoch(0)
    straight = loader_lib.Loader(source, options())
    expected = take(straight, per_epoch + 4)  # crosses into epoch 1
    first = loader_lib.Loader(source, options())
    take(first, per_epoch - 2)
    state = first.get_state()
    first.close()
    resumed = loader_lib.Loader(TokenizedSource(random_data.path), options(), state=state)
    for want, got in zip(expected[per_epoch - 2 :], take(resumed, 6)):
        for key in loader_lib.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])
    assert resumed.get_state()["epoch"] == 1


@pytest.mark.slow
def test_worker_processes_give_the_same_stream(random_data):
    source = TokenizedSource(random_data.path)
    plain = take(loader_lib.Loader(source, options()), 5)
    with loader_lib.Loader(source, options(worker_count=2)) as workers:
        got = take(workers, 3)
        state = workers.get_state()
    with loader_lib.Loader(source, options(worker_count=1), state=state) as resumed:
        got += take(resumed, 2)
    for want, have in zip(plain, got):
        np.testing.assert_array_equal(want["input_ids"], have["input_ids"])
        np.testing.assert_array_equal(want["segment_ids"], have["segment_ids"])


def test_state_from_other_data_or_settings_is_refused(random_data, tmp_path):
    source = TokenizedSource(random_data.path)
    state = loader_lib.Loader(source, options()).get_state()
    with pytest.raises(ValueError, match=r"seq_len: 128 -> 64"):
        loader_lib.Loader(source, options(seq_len=64), state=state)
    other = token_data.write_tokenized(str(tmp_path / "other"), token_data.random_records(150, seed=8))
    with pytest.raises(ValueError, match="lengths_sha256"):
        loader_lib.Loader(TokenizedSource(other), options(), state=state)


def test_global_arrays_on_a_mesh_match_the_host_batch(random_data):
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    source = TokenizedSource(random_data.path)
    sharding = loader_lib.batch_sharding(mesh)
    # one process holds every row; devices on the tensor axis hold replicas of the same rows
    assert loader_lib.process_rows(sharding, BATCH, SEQ).tolist() == list(range(BATCH))
    host = next(loader_lib.Loader(source, options()))
    glob = next(loader_lib.Loader(source, options(), sharding=sharding))
    for key in loader_lib.BATCH_KEYS:
        assert glob[key].shape == (BATCH, SEQ) and glob[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(glob[key]), host[key])
        assert glob[key].addressable_shards[0].data.shape == (BATCH // 4, SEQ)


def test_process_rows_follow_the_devices_a_process_addresses():
    """With a fake 'process' owning devices 4..7 of a (data=2, fsdp=2, tensor=2) mesh, its rows are the
    second half of the batch, which is what make_array_from_process_local_data expects."""
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2), devices=jax.devices())
    sharding = loader_lib.batch_sharding(mesh)
    index_map = sharding.devices_indices_map((8, SEQ))
    second_half = {d for d, idx in index_map.items() if (idx[0].start or 0) >= 4}
    assert len(second_half) == 4

    class View:
        def addressable_devices_indices_map(self, shape):
            return {d: i for d, i in sharding.devices_indices_map(shape).items() if d in second_half}

    assert loader_lib.process_rows(View(), 8, SEQ).tolist() == [4, 5, 6, 7]


def test_eval_loader_pads_the_last_batch_instead_of_dropping(random_data):
    source = TokenizedSource(random_data.path)
    opts = dataclasses.replace(options(), shuffle=False, drop_remainder=False, epochs=1)
    loader = loader_lib.Loader(source, opts)
    batches = list(loader)
    examples = sorted((tuple(i), tuple(m)) for b in batches for i, m in unpack(b))
    assert examples == sorted((tuple(r[0].tolist()), tuple(r[1].tolist())) for r in random_data.records)
    assert len(batches) == loader.batches_in_epoch(0) and int(batches[-1]["segment_ids"].max(axis=1).min()) == 0


def test_data_smaller_than_one_batch_is_a_clear_error(random_data):
    source = TokenizedSource(random_data.path)
    with pytest.raises(ValueError, match=r"fewer than one global batch of 500 rows"):
        next(loader_lib.Loader(source, options(global_batch=500)))


def test_max_segments_caps_documents_per_row_and_every_batch_is_checked(random_data):
    """Rows hold at most max_segments - 1 documents (one run is left for padding); the plan counts
    the rows it closed early; each batch is checked on the host against the ceiling."""
    source = TokenizedSource(random_data.path)
    loader = loader_lib.Loader(source, options(max_segments=3, epochs=1))
    runs = [packing.count_runs(b["segment_ids"]) for b in loader]
    assert max(r.max() for r in runs) <= 3 and max(int(b.max()) for b in runs) == 3
    stats = loader.stats(0)
    assert stats["rows_capped_at_max_segments"] > 0
    plain = loader_lib.Loader(source, options(epochs=1))
    assert plain.stats(0)["rows"] < stats["rows"]
    reader = loader_lib._BatchReader(source, plain.plan(0), options(max_segments=2), plain.rows, 0)
    with pytest.raises(ValueError, match="batch 0: row .* holds .* segments .*max_segments is 2"):
        reader[0]
