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


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_a_robust_finalize_into_out_allocates_one_result(rule):
    """The rule's float32 result was cast to each float32 leaf by astype, a copy: finalize(out=) held twice the
    model (the issue asks for the slab + O(tile))."""
    from jitkernels import robust as R

    alg = R.FedMedian() if rule == "median" else R.FedTrimmedAvg(beta=0.2)
    agg = jk.Aggregator(_update(0), alg, backend="cpp")
    agg.fold_many([_update(j) for j in range(5)], parties=list(range(5)))
    out = _update(0)
    agg.finalize(out=out)  # (warm: compile, caches)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        agg.finalize(out=out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base <= 1.2 * 4 * N, f"finalize(out=) took {(peak - base) / (4 * N):.2f}x the model"
    np.testing.assert_array_equal(out["a"], np.full(N // 2, 2.0, np.float32))


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16"])
def test_numba_finalize_into_a_half_type_holds_no_leaf_sized_buffer(out_dtype):
    """numba rounds to half types through numpy: a whole leaf's float32 buffer and the cast's temporary had made a
    finalize of one large leaf take 3x its output; the buffer is now a block, and the cast writes in place."""
    dt = np.dtype(jk.bfloat16 if out_dtype == "bfloat16" else out_dtype)
    template = {"w": np.zeros(N, dt), "b": np.zeros(3, dt)}
    agg = jk.Aggregator(template, backend="numba")
    q = [{k: jk.Quantized(np.full(n, j, np.int8), 1.0) for k, n in (("w", N), ("b", 3))} for j in range(3)]
    agg.fold_many(q, parties=list(range(3)))  # (numba reads no float16 updates; int8 stands in for any float leaf)
    agg.finalize()  # (warm: compile, caches)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        got = agg.finalize()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = N * dt.itemsize
    assert peak - base <= out_bytes + 4 * 1.1 * (1 << 20), f"finalize took {(peak - base) / out_bytes:.2f}x its output"
    np.testing.assert_array_equal(got["w"], np.full(N, 1, dt))
