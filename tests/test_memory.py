"""Invariant 4: a streaming fold's memory is O(model), not O(k x model) — measured with tracemalloc."""

import tracemalloc

import numpy as np
import pytest

import jitkernels as jk

from strategies import CPU_BACKENDS

N = 2_000_000


def _update(j):
    return {"a": np.full(N // 2, j, np.float32), "b": np.full(N - N // 2, -j, np.float32)}


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "numpy"])  # the reference makes temporaries
def test_streaming_fold_memory_is_one_accumulator(backend):
    agg = jk.Aggregator(_update(0), backend=backend)
    agg.fold(_update(0), party="warm")  # compile / load caches outside the measurement
    agg.reset()
    acc_bytes = agg.state.acc.nbytes
    upd_bytes = 4 * N
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        for j in range(20):
            agg.fold(_update(j), weight=1.0, party=j)  # each update made, admitted, folded, dropped
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    extra = peak - base - upd_bytes  # the update alive at a time is the caller's, not ours
    assert extra <= 0.2 * acc_bytes, f"fold used {extra / acc_bytes:.2f}x the accumulator beyond one update"


def test_fold_many_of_admitted_updates_allocates_no_model_sized_temporaries():
    agg = jk.Aggregator(_update(0), backend="cpp")
    ups = [_update(j) for j in range(5)]
    adm = agg.admit_many(ups, [1.0] * 5, list(range(5)))
    tracemalloc.start()
    try:
        agg.fold_many(adm)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 0.2 * agg.state.acc.nbytes
