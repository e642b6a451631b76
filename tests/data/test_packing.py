"""Packing as pure functions: plans never split an example, rows are laid out right, drops are counted."""

from __future__ import annotations

import numpy as np
import pytest

from lt_jax.data import packing


def rows_of(plan):
    return [plan.row(r).tolist() for r in range(plan.num_rows)]


@pytest.mark.parametrize("method", ["best_fit", "first_fit"])
def test_plan_places_every_fitting_example_once_and_within_seq_len(method):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 120, size=500)
    lengths[[3, 77]] = [200, 129]  # too long for 128
    order = rng.permutation(len(lengths))
    plan = packing.plan_packing(lengths, order, 128, window=50, method=method)
    placed = [i for row in rows_of(plan) for i in row]
    assert sorted(placed) == sorted(set(range(500)) - {3, 77})  # each once, none split or lost
    assert all(lengths[row].sum() <= 128 for row in rows_of(plan))
    assert plan.dropped == 2 and plan.truncated == 0 and plan.num_examples == 500
    assert plan.packed_tokens == lengths[placed].sum()
    assert plan.fill == pytest.approx(lengths[placed].sum() / (plan.num_rows * 128))


def test_best_fit_packs_tighter_than_first_fit_and_windows_stay_local():
    rng = np.random.default_rng(1)
    lengths = rng.integers(10, 200, size=2000)
    order = rng.permutation(2000)
    best = packing.plan_packing(lengths, order, 256, window=200, method="best_fit")
    first = packing.plan_packing(lengths, order, 256, window=200, method="first_fit")
    assert best.num_rows < first.num_rows and best.fill > 0.95
    # a window's examples only share rows with examples of the same window
    position = {int(i): k for k, i in enumerate(order)}
    for row in rows_of(best):
        assert len({position[i] // 200 for i in row}) == 1


def test_first_fit_keeps_arrival_order_within_rows():
    plan = packing.plan_packing(np.array([5, 4, 3, 6, 2]), np.arange(5), 10, method="first_fit")
    assert rows_of(plan) == [[0, 1], [2, 3], [4]]


def test_best_fit_chooses_the_tightest_row():
    # sorted longest first: 7 opens row0, 6 opens row1, 4 fits only row1 (room 4), 3 goes to row0 (room 3)
    plan = packing.plan_packing(np.array([3, 7, 4, 6]), np.arange(4), 10, method="best_fit")
    assert rows_of(plan) == [[1, 0], [3, 2]]


def test_overlength_truncate_and_empty_records_are_counted():
    lengths = np.array([10, 30, 0, 12, 40])
    plan = packing.plan_packing(lengths, np.arange(5), 16, overlength="truncate")
    placed = sorted(i for row in rows_of(plan) for i in row)
    assert placed == [0, 1, 3, 4] and plan.truncated == 2 and plan.dropped == 0 and plan.empty == 1
    assert plan.packed_tokens == 10 + 16 + 12 + 16


def test_pack_row_layout():
    a = {"input_ids": np.array([5, 6, 7]), "loss_mask": np.array([0, 1, 1])}
    b = {"input_ids": np.array([8, 9]), "loss_mask": np.array([1, 1])}
    row = packing.pack_row([a, b], 8, pad_id=3)
    assert row["input_ids"].tolist() == [5, 6, 7, 8, 9, 3, 3, 3]
    assert row["loss_mask"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="exceed seq_len 4"):
        packing.pack_row([a, b], 4)


def test_pack_row_truncates_a_single_long_example_and_batches_pad_empty_rows():
    long = {"input_ids": np.arange(1, 11), "loss_mask": np.ones(10)}
    batch = packing.pack_rows([[long], []], 6)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [0] * 6]
    assert batch["segment_ids"].tolist() == [[1] * 6, [0] * 6]
    assert batch["positions"][0].tolist() == list(range(6))


def test_take_rows_reorders_and_recounts():
    lengths = np.array([4, 4, 4, 4])
    plan = packing.plan_packing(lengths, np.arange(4), 8, method="first_fit")
    assert rows_of(plan) == [[0, 1], [2, 3]]
    sub = plan.take_rows(np.array([1]), lengths)
    assert rows_of(sub) == [[2, 3]] and sub.packed_tokens == 8


@pytest.mark.parametrize("method", ["best_fit", "first_fit"])
def test_max_docs_caps_examples_per_row_and_counts_the_rows_it_closed(method):
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 9, size=400)  # short documents: ~30 would fit in a row of 128
    order = rng.permutation(len(lengths))
    free = packing.plan_packing(lengths, order, 128, window=100, method=method)
    capped = packing.plan_packing(lengths, order, 128, window=100, method=method, max_docs=7)
    assert max(len(r) for r in rows_of(free)) > 7 and free.capped_rows == 0
    assert max(len(r) for r in rows_of(capped)) == 7
    assert sorted(i for r in rows_of(capped) for i in r) == list(range(400))  # nothing lost to the cap
    closed_with_room = sum(1 for r in rows_of(capped) if len(r) == 7 and lengths[r].sum() < 128)
    assert capped.capped_rows == closed_with_room > 0
    with pytest.raises(ValueError, match="max_docs must be >= 1"):
        packing.plan_packing(lengths, order, 128, max_docs=0)


def test_segment_count_check_names_the_row_and_the_setting():
    seg = np.array([[1, 1, 2, 3, 0, 0], [1, 2, 3, 4, 5, 0]], np.int32)
    np.testing.assert_array_equal(packing.count_runs(seg), [4, 6])
    packing.check_segment_count(seg, 6)
    with pytest.raises(ValueError, match=r"shards/x: batch 3: row 1 holds 6 segments .*max_segments is 5 \(1 rows over\)"):
        packing.check_segment_count(seg, 5, "shards/x: batch 3")
