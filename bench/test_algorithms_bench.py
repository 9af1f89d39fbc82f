"""pytest-benchmark suites over the calls of :mod:`jitkernels.algorithms_benchmark`: the robust rules on a filled
update store against Flower's functions (and the Gram step against numpy's SSYRK), and a whole Flower round, FitRes
in to new Parameters out, by our strategies and by Flower's.

Run ``pytest bench/test_algorithms_bench.py --benchmark-only`` (Flower needed: ``pip install -e '.[flower]'``). Each
benchmark's ``extra_info`` holds the bytes its method moves, the probe bandwidth measured between its rounds, the
fraction of roofline and the peak resident-set growth of one call (``rss_peak_bytes``; ours is the output plus a tile,
Flower's stacks its inputs). ``python -m jitkernels.algorithms_benchmark --robust`` prints the same as one table.
"""

import pytest

import jitkernels as jk
from jitkernels import algorithms_benchmark as ab
from jitkernels import benchmark as jb

pytest.importorskip("flwr", reason="the peers are Flower's: pip install -e '.[flower]'")

AVAILABLE = [b for b in ("cpp", "numba") if jk.available_backends().get(b) is True]
ROBUST = [("median", b) for b in ("cpp", "numba")] + [("median: Flower", "flwr")] + [
    ("trimmed mean 0.2", b) for b in ("cpp", "numba")] + [("trimmed mean 0.2: Flower", "flwr")] + [
    ("gram", "numba"), ("gram: SSYRK", "blas"), ("krum", "numba"), ("krum: Flower", "flwr"),
    ("geometric median", "numba")]
ROUNDS = [(f"{alg}{peer}", b) for alg in ("FedAdam", "FedAvg") for peer, b in (("", "cpp"), (": Flower", "flwr"))]


@pytest.fixture(scope="module")
def robust(workload):
    with ab.robust_cases(workload, AVAILABLE) as cases:
        yield {(c.key, c.backend): c for c in cases}


@pytest.fixture(scope="module")
def rounds(workload):
    if "cpp" not in AVAILABLE:
        pytest.skip("the rounds run our strategies on the C++ backend, which is not built")
    return {(c.key, c.backend): c for c in ab.round_cases(workload, "cpp")}


def _run(benchmark, measure, cases, key, backend, group):
    benchmark.group = group
    case = cases.get((key, backend))
    if case is None:
        pytest.skip(f"backend {backend}: not available here")
    traced, rss = jb.peak_memory(case.fn)
    benchmark.extra_info.update(traced_peak_bytes=traced, rss_peak_bytes=rss)
    measure(case.fn, case.nbytes, rounds=3 if case.peer else 5)


@pytest.mark.parametrize(("key", "backend"), ROBUST, ids=[f"{k}-{b}" for k, b in ROBUST])
def test_robust(benchmark, measure, robust, key, backend):
    """A robust rule over the k x N float32 slab (filled once, untimed): bytes are the slab read once (+ the output
    for the coordinate rules; the geometric median's passes times the slab)."""
    _run(benchmark, measure, robust, key, backend, f"robust: {key.split(':')[0]}")


@pytest.mark.parametrize(("key", "backend"), ROUNDS, ids=[f"{k}-{b}" for k, b in ROUNDS])
def test_flower_round(benchmark, measure, rounds, key, backend):
    """A Flower round, FitRes in -> new Parameters out (every call a new round of the same strategy)."""
    _run(benchmark, measure, rounds, key, backend, f"Flower round: {key.split(':')[0]}")
