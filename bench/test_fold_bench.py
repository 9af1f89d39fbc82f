"""pytest-benchmark suites over the functions of :mod:`jitkernels.benchmark`: backend x input dtype for the fused
fold, the per-update fold and the admission stats pass, and the peers on the same float32 updates.

Run ``pytest bench/ --benchmark-only`` (add ``--benchmark-json=out.json`` to keep the numbers). Each benchmark's
``extra_info`` holds the bytes its method moves, the probe bandwidth measured between its rounds and the fraction of
roofline; groups compare like with like. ``python -m jitkernels.benchmark`` prints the same measurements as one table.
"""

import pytest

import jitkernels as jk
from jitkernels import benchmark as jb

AVAILABLE = jk.available_backends()
ACC_BYTES = 2 * jb.ACC_ITEMSIZE  # the float32 accumulator, read and written


def _prepare(workload, backend, dtype):
    """(aggregator, admitted updates, a function clearing the aggregator in place between rounds)."""
    if AVAILABLE.get(backend) is not True:
        pytest.skip(f"backend {backend}: {AVAILABLE.get(backend)}")
    try:
        agg, adm = jb.prepare(workload, backend, dtype)
    except jk.BackendUnavailable as e:
        pytest.skip(str(e))
    return agg, adm, lambda: agg.reset(reuse=True)


backend_x_dtype = pytest.mark.parametrize(("backend", "dtype"),
                                          [(b, d) for b in jb.BACKENDS for d in jb.DTYPES])


@backend_x_dtype
def test_fold_many(benchmark, measure, workload, backend, dtype):
    """``fold_many`` of k admitted updates into a reset aggregator: k*N*itemsize + 8N bytes."""
    benchmark.group = "fold_many"
    agg, adm, clear = _prepare(workload, backend, dtype)
    measure(lambda: jb.fold_many(agg, adm), workload.update_bytes(dtype) + ACC_BYTES * workload.n, setup=clear)


@backend_x_dtype
def test_fold_each(benchmark, measure, workload, backend, dtype):
    """k calls ``fold(admitted)``: k*(N*itemsize + 8N) bytes."""
    benchmark.group = "fold (one call per update)"
    agg, adm, clear = _prepare(workload, backend, dtype)
    measure(lambda: jb.fold_each(agg, adm), workload.update_bytes(dtype) + workload.k * ACC_BYTES * workload.n,
            setup=clear)


@pytest.mark.parametrize("backend", jb.BACKENDS)
def test_fold_many_deterministic(benchmark, measure, workload, backend):
    """``fold_many`` in deterministic mode (float32 updates): k*N*4 + 32N bytes (two float64 sums, read and
    written; on cpp, which does not read an empty state's, 16N); compare with the fold_many group's float32 row."""
    benchmark.group = "fold_many deterministic"
    if AVAILABLE.get(backend) is not True:
        pytest.skip(f"backend {backend}: {AVAILABLE.get(backend)}")
    agg, adm = jb.prepare(workload, backend, "float32", deterministic=True)
    acc_bytes = (16 if backend == "cpp" else 32) * workload.n
    measure(lambda: jb.fold_many(agg, adm), workload.update_bytes("float32") + acc_bytes,
            setup=lambda: agg.reset(reuse=True))


@backend_x_dtype
def test_admit_many(benchmark, measure, workload, backend, dtype):
    """The admission stats pass over k raw updates: k*N*itemsize bytes."""
    benchmark.group = "admit_many"
    agg, _, _ = _prepare(workload, backend, dtype)
    measure(lambda: jb.admit(agg, workload, dtype), workload.update_bytes(dtype))


@pytest.mark.parametrize("backend", jb.BACKENDS)
def test_fold_many_finalize(benchmark, measure, workload, backend):
    """jitkernels' average (reset + fold_many + finalize) on float32, in the peers' group."""
    benchmark.group = "peers (float32)"
    agg, adm, _ = _prepare(workload, backend, "float32")
    # zeroing (4N), the fold (ACC_BYTES N), finalize (the accumulator read, a float32 output written: 8N)
    measure(lambda: jb.fold_many_finalize(agg, adm),
            workload.update_bytes("float32") + (ACC_BYTES + jb.ACC_ITEMSIZE + jb.ACC_ITEMSIZE + 4) * workload.n)


@pytest.mark.parametrize("peer", jb.PEERS, ids=[p.name for p in jb.PEERS])
def test_peer(benchmark, measure, workload, peer):
    """A peer's real library call on the same float32 updates; bytes are the fused fold's (the job's minimum)."""
    benchmark.group = "peers (float32)"
    if not jb.installed(peer.package):
        pytest.skip(f"{peer.package} is not installed")
    args = peer.prepare(workload)
    measure(lambda: peer.run(*args), workload.update_bytes("float32") + ACC_BYTES * workload.n,
            setup=None if peer.clear is None else (lambda: peer.clear(*args)))
