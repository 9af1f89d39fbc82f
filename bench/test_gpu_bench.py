"""pytest-benchmark cases of the GPU-versus-CPU fusion comparison (jitkernels.gpu_benchmark holds the methods and
writes the full report: ``python -m jitkernels.gpu_benchmark --json r.json --plot r.png``).

Device-resident float32 and bfloat16 updates, N = JK_GPU_BENCH_N (default 25M), k = 10: the fused kernel against
unfused CuPy, torch ``add_`` and ``_foreach_add_``. Skipped, with the reason, without a GPU (the CPU backends' cases
are bench/test_fold_bench.py's).
"""

import os

import pytest

import jitkernels as jk
from jitkernels import gpu_benchmark as gb

REASON = jk.available_backends()["cupy"]
pytestmark = pytest.mark.skipif(REASON is not True, reason=f"GPU backend unavailable: {REASON}")
N = int(float(os.environ.get("JK_GPU_BENCH_N", 25e6)))
K = 10


@pytest.fixture(scope="module", params=gb.DTYPES)
def case(request):
    ups, w = gb._model(N, 10, request.param, K, 0)
    return request.param, ups, w


def _sync():
    import torch
    torch.cuda.synchronize()


def _run(benchmark, fn, setup=None, nbytes=0):
    def go():
        fn()
        _sync()
    benchmark.pedantic(go, setup=setup, rounds=7, warmup_rounds=1)
    benchmark.extra_info["useful_bytes"] = nbytes


def _bytes(dtype):
    return K * N * (2 if dtype == "bfloat16" else 4) + 8 * N


def test_fused(benchmark, case):
    dtype, ups, w = case
    benchmark.group = f"gpu fold {dtype}"
    agg = jk.Aggregator(ups[0])
    adm = agg.admit_many(ups, w, list(range(K)))
    _run(benchmark, lambda: agg.fold_many(adm), setup=lambda: agg.reset(reuse=True), nbytes=_bytes(dtype))


def test_cupy_unfused(benchmark, case):
    import cupy as cp
    dtype, ups, w = case
    benchmark.group = f"gpu fold {dtype}"
    views = [{n: gb._torch_bits(t) for n, t in u.items()} for u in ups]
    acc = {n: cp.zeros(t.numel(), cp.float32) for n, t in ups[0].items()}
    _run(benchmark, lambda: gb._unfused_cupy(acc, views, w, lambda x: x), nbytes=_bytes(dtype))


def test_torch_add(benchmark, case):
    import torch
    dtype, ups, w = case
    benchmark.group = f"gpu fold {dtype}"
    acc = {n: torch.zeros(t.numel(), device="cuda") for n, t in ups[0].items()}

    def fold():
        for u, wj in zip(ups, w):
            for n, a in acc.items():
                a.add_(u[n], alpha=float(wj))
    _run(benchmark, fold, nbytes=_bytes(dtype))


def test_torch_foreach(benchmark, case):
    import torch
    dtype, ups, w = case
    benchmark.group = f"gpu fold {dtype}"
    names = list(ups[0])
    acc = [torch.zeros(ups[0][n].numel(), device="cuda") for n in names]
    _run(benchmark, lambda: [torch._foreach_add_(acc, [u[n] for n in names], alpha=float(wj))
                             for u, wj in zip(ups, w)], nbytes=_bytes(dtype))
