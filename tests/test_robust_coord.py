"""Robust coordinate statistics (jitkernels.robust_coord) and the update store they read (jitkernels.robust_store).

Oracles: np.median / np.sort in float64 (the plain-numpy statement of the spec), Flower's aggregate_median and
aggregate_trimmed_avg (on well-separated values, within a tolerance), and ml_dtypes / numpy casts for the store's
conversions. Every backend (numpy reference, numba tile and register kernels, the C++ header through a ctypes
wrapper, both of its ISAs and both of its paths) must equal the float64 oracle to the bit.

The C++ wrapper is compiled once (two translation units in parallel, ~10-15 s) and kept in pytest's cache, keyed by
the sources and flags; numba's register kernels compile once per (k, dtype, statistic) (~1 s each) and are kept in
the user's cache. Warm, this file runs in well under 30 s.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels import robust_coord as rc
from jitkernels.robust_store import CHUNK, BudgetExceeded, DeviceUpdateStore, StoreFull, UpdateStore, store_class

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CODE = {"float32": rc.F32, "float16": rc.F16, "bfloat16": rc.BF16}


# --- oracles and data -------------------------------------------------------------------------------------------------
def to_storage(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> the slab's storage (float32, float16 bits, bfloat16 bits; RNE)."""
    if dtype == "float32":
        return np.ascontiguousarray(x32, np.float32)
    if dtype == "float16":
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(x32.astype(np.float16)).view(np.uint16)
    return np.ascontiguousarray(x32.astype(jk.bfloat16)).view(np.uint16)


def widened(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return stored.astype(np.float64)
    if dtype == "float16":
        return stored.view(np.float16).astype(np.float64)
    return stored.view(jk.bfloat16).astype(np.float64)


def ref_median(x64: np.ndarray) -> np.ndarray:
    """np.median in float64 ((a+b)/2, exact halving), +0.0 (canonical zero), rounded once to float32."""
    return (np.median(x64, axis=0) + 0.0).astype(np.float32)


def ref_trimmed(x64: np.ndarray, beta: float) -> np.ndarray:
    """Sort, cut int(beta*k) from each end, add the rest in ascending order from +0.0 in float64, divide, round."""
    k = x64.shape[0]
    c = int(beta * k)
    s = np.sort(x64, axis=0)
    acc = np.zeros(x64.shape[1])
    for r in range(c, k - c):
        acc = acc + s[r]
    return (acc / (k - 2 * c)).astype(np.float32)


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


PATTERNS = ("normal", "ties", "huge", "colluding", "signflip", "zeros")


def make_rows(k: int, n: int, pattern: str, seed: int) -> np.ndarray:
    """k x n float32 rows of an awkward kind: ties, +-3e38, colluding duplicates, sign flips, signed zeros."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((k, n)).astype(np.float32)
    if pattern == "ties":
        x = rng.integers(-2, 3, (k, n)).astype(np.float32)
    elif pattern == "huge":  # adversaries at the edge of float32: the even-k midpoint must not overflow
        big = np.float32(3.4e38)
        x[rng.random((k, n)) < 0.5] = big
        x[rng.random((k, n)) < 0.3] = -big
        x[rng.random((k, n)) < 0.1] = np.float32(3e38)
    elif pattern == "colluding":  # a block of identical Byzantine rows
        bad = rng.standard_normal(n).astype(np.float32) * 1e6
        x[: rng.integers(0, k + 1)] = bad
    elif pattern == "signflip":
        h = k // 2
        x[:h] = -x[k - h:]
    elif pattern == "zeros":
        x = np.where(rng.random((k, n)) < 0.5, np.float32(-0.0), np.float32(0.0))
        x[rng.random((k, n)) < 0.2] = 1.0
    return np.ascontiguousarray(x)


# --- the C++ header through ctypes ------------------------------------------------------------------------------------
_TU = {
    "base": '#include "jk_robust_coord.h"\n#define NS jkrc\n#define SUFFIX base\n',
    "avx2": ('#include "jk_robust_coord.h"\n#pragma GCC push_options\n#pragma GCC target("avx2,f16c")\n'
             "#define JK_RC_AVX2 1\nnamespace avx2 {\n#undef JK_ROBUST_COORD_BODY\n#include \"jk_robust_coord.h\"\n}\n"
             "#pragma GCC pop_options\n#define NS avx2::jkrc\n#define SUFFIX avx2\n"),
}
_EXPORTS = r'''
#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)
extern "C" int CAT(jk_rc_median, SUFFIX)(const void* x, int code, long long k, long long n, long long ld, float* out,
                                          long long tile, int nthreads) {
  return NS::median_code(x, code, k, n, ld, out, tile, nthreads);
}
extern "C" int CAT(jk_rc_trimmed, SUFFIX)(const void* x, int code, long long k, long long n, long long ld,
                                           long long lo, long long hi, float* out, long long tile, int nthreads) {
  return NS::trimmed_mean_code(x, code, k, n, ld, lo, hi, out, tile, nthreads);
}
extern "C" long long CAT(jk_rc_network, SUFFIX)(long long k, long long r_lo, long long r_hi, int* i, int* j,
                                                  long long cap, long long* fused) {
  const NS::Network net = NS::network(k, r_lo, r_hi);
  for (size_t c = 0; c < net.i.size() && (long long)c < cap; ++c) { i[c] = net.i[c]; j[c] = net.j[c]; }
  *fused = net.fused;
  return (long long)net.i.size();
}
'''
FLAGS = ["-O2", "-std=c++17", "-ffp-contract=off", "-fopenmp", "-fPIC"]


@pytest.fixture(scope="session")
def cpp(request):
    """{"base": (median, trimmed, network), "avx2": ...} from the header, compiled with g++ (skipped without it)."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the C++ header is not tested")
    h = hashlib.sha256()
    for name in ("jk_robust_coord.h", "jk_math.h"):
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(f.read())
    isas = ["base", "avx2"] if platform_x86() else ["base"]
    h.update(repr((FLAGS, _EXPORTS, [_TU[i] for i in isas])).encode())
    d = os.path.join(tempfile.gettempdir(), "jitkernels-robust-coord")  # cached by source hash, as gpu_shim's
    os.makedirs(d, exist_ok=True)
    lib = os.path.join(d, f"jkrc_{h.hexdigest()[:16]}.so")
    if not os.path.exists(lib):
        procs, objs = [], []
        for isa in isas:
            src, obj = os.path.join(d, f"{isa}.cpp"), os.path.join(d, f"{isa}.{os.getpid()}.o")
            with open(src, "w") as f:
                f.write(_TU[isa] + _EXPORTS)
            procs.append(subprocess.Popen([gxx, *FLAGS, "-I", CSRC, "-c", src, "-o", obj],
                                          stderr=subprocess.PIPE, text=True))
            objs.append(obj)
        for p in procs:
            _, err = p.communicate()
            assert p.returncode == 0, f"g++ failed:\n{err[-4000:]}"
        tmp = f"{lib}.{os.getpid()}.tmp"
        subprocess.run([gxx, "-shared", "-fopenmp", *objs, "-o", tmp], check=True)
        os.replace(tmp, lib)
        for obj in objs:
            os.unlink(obj)
    L = ctypes.CDLL(lib)
    c_ll, c_p = ctypes.c_longlong, ctypes.c_void_p
    out = {}
    for isa in isas:
        med, tri, net = (getattr(L, f"jk_rc_{f}_{isa}") for f in ("median", "trimmed", "network"))
        med.argtypes = [c_p, ctypes.c_int, c_ll, c_ll, c_ll, c_p, c_ll, ctypes.c_int]
        tri.argtypes = [c_p, ctypes.c_int, c_ll, c_ll, c_ll, c_ll, c_ll, c_p, c_ll, ctypes.c_int]
        net.argtypes = [c_ll, c_ll, c_ll, c_p, c_p, c_ll, c_p]
        med.restype = tri.restype = ctypes.c_int
        net.restype = c_ll
        out[isa] = (med, tri, net)
    return out


def platform_x86() -> bool:
    import platform
    return platform.machine() in ("x86_64", "AMD64")


def cpp_median(fns, stored, dtype, tile=0, nthreads=1):
    k, n = stored.shape
    out = np.empty(n, np.float32)
    assert fns[0](stored.ctypes.data, CODE[dtype], k, n, n, out.ctypes.data, tile, nthreads) == 0
    return out


def cpp_trimmed(fns, stored, dtype, beta, tile=0, nthreads=1):
    k, n = stored.shape
    c = rc.trim_count(k, beta)
    out = np.empty(n, np.float32)
    assert fns[1](stored.ctypes.data, CODE[dtype], k, n, n, c, k - c, out.ctypes.data, tile, nthreads) == 0
    return out


# --- every backend against the float64 oracle, bit for bit ------------------------------------------------------------
@settings(max_examples=60)
@given(k=st.integers(1, 60), n=st.integers(1, 70), pattern=st.sampled_from(PATTERNS), seed=st.integers(0, 2 ** 32 - 1),
       dtype=st.sampled_from(["float32", "float32", "float16", "bfloat16"]),
       beta=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.45, 0.49]), tile=st.integers(1, 40))
@example(k=1, n=9, pattern="normal", seed=0, dtype="float32", beta=0.0, tile=4)
@example(k=2, n=33, pattern="huge", seed=1, dtype="float32", beta=0.0, tile=8)
@example(k=60, n=70, pattern="colluding", seed=2, dtype="float32", beta=0.49, tile=16)
def test_backends_equal_the_float64_oracle_bit_for_bit(cpp, k, n, pattern, seed, dtype, beta, tile):
    x32 = make_rows(k, n, pattern, seed)
    stored = to_storage(x32, dtype)
    if dtype != "float32" and not np.isfinite(widened(stored, dtype)).all():
        stored = to_storage(np.clip(x32, -6e4, 6e4), dtype)  # a float16 slab cannot hold 3e38 (the store refuses)
    x64 = widened(stored, dtype)
    med, tm = ref_median(x64), ref_trimmed(x64, beta)
    assert np.isfinite(med).all() and np.isfinite(tm).all()  # +-3.4e38 never overflow the midpoint or the mean
    arg = stored if dtype != "bfloat16" else stored.view(jk.bfloat16)
    if dtype == "float16":
        arg = stored.view(np.float16)
    results = {
        "numpy": (rc.coordinate_median(arg, backend="numpy"), rc.trimmed_mean(arg, beta, backend="numpy")),
        "numba-tile": (rc.coordinate_median(arg, backend="numba", tile=tile),
                       rc.trimmed_mean(arg, beta, backend="numba", tile=tile)),
    }
    for isa, fns in cpp.items():
        results[f"cpp-{isa}-reg"] = (cpp_median(fns, stored, dtype), cpp_trimmed(fns, stored, dtype, beta))
        results[f"cpp-{isa}-tile"] = (cpp_median(fns, stored, dtype, tile, 2),
                                      cpp_trimmed(fns, stored, dtype, beta, tile, 2))
    for name, (m, t) in results.items():
        assert same_bits(m, med), (name, "median")
        assert same_bits(t, tm), (name, "trimmed mean")


NUMBA_REG = [(k, "float32") for k in (1, 2, 7, 10, 50)] + [(10, "float16"), (10, "bfloat16"), (64, "bfloat16")]


@pytest.mark.parametrize("k,dtype", NUMBA_REG)
def test_numba_register_kernels(k, dtype):
    """The generated per-k kernels (k <= NUMBA_REG_MAX_K), on enough coordinates to run on several threads."""
    n = 20011  # k * n >= SMALL_CALL for k >= 10: the threaded path
    for pattern in ("normal", "ties", "huge", "zeros"):
        x32 = make_rows(k, n, pattern, k)
        if dtype != "float32":  # +-3.4e38 round to inf in bfloat16 (the store refuses them); float16 tops at 65504
            x32 = np.clip(x32, -6e4, 6e4) if dtype == "float16" else np.clip(x32, -3e38, 3e38)
        stored = to_storage(x32, dtype)
        x64 = widened(stored, dtype)
        arg = stored.view(np.float16) if dtype == "float16" else stored
        kw = {"dtype": "bfloat16"} if dtype == "bfloat16" else {}
        assert same_bits(rc.coordinate_median(arg, backend="numba", **kw), ref_median(x64)), pattern
        for beta in (0.0, 0.2):
            assert same_bits(rc.trimmed_mean(arg, beta, backend="numba", **kw), ref_trimmed(x64, beta)), pattern


@pytest.mark.parametrize("k", [10, 50])
def test_numba_register_kernels_read_rows_with_a_stride(k):
    """A column block of a wider slab (rows contiguous, the row stride larger, an unaligned start): the generated
    kernels index rows through their strides, prefetches included."""
    wide = make_rows(k, 5000, "ties", k)
    x = wide[:, 7:4007]
    x64 = x.astype(np.float64)
    assert same_bits(rc.coordinate_median(x, backend="numba"), ref_median(x64))
    assert same_bits(rc.trimmed_mean(x, 0.2, backend="numba"), ref_trimmed(x64, 0.2))


def test_auto_takes_numba_from_16_to_64_rows():
    """backend="auto": cpp below AUTO_NUMBA_FROM_K rows (both at memory speed, no compile step), numba's generated
    kernels from there to NUMBA_REG_MAX_K, cpp's tile path beyond."""
    if rc.available_backends()["numba"] is not True or rc.available_backends()["cpp"] is not True:
        pytest.skip("needs numba and the C++ extension")
    def pick(k):
        return rc._pick("auto", k, np.zeros((k, 1), np.float32))
    assert pick(rc.AUTO_NUMBA_FROM_K - 1) is rc._REGISTRY["cpp"]
    assert pick(rc.AUTO_NUMBA_FROM_K) is rc._REGISTRY["numba"]
    assert pick(rc.NUMBA_REG_MAX_K) is rc._REGISTRY["numba"]
    assert pick(rc.NUMBA_REG_MAX_K + 1) is rc._REGISTRY["cpp"]


@pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("k", [1, 2, 5, 10, 33, 50])
def test_cuda_kernels_in_the_host_emulation(k, dtype):
    """The generated CUDA kernels (cuda_source.robust_kernel, jk_math.h's order2 / median_mid), run by the GPU
    backend's launch code on the CPU shim (each grid as loops): the numpy reference's bits, on rows with a stride
    and a ragged last block."""
    import gpu_shim
    from jitkernels.backends import cupy_backend

    n, ld = 700, 709
    for pattern in ("normal", "ties", "huge", "zeros"):
        x32 = make_rows(k, ld, pattern, k)
        if dtype != "float32":
            x32 = np.clip(x32, -6e4, 6e4) if dtype == "float16" else np.clip(x32, -3e38, 3e38)
        wide = to_storage(x32, dtype)
        stored = wide[:, :n]
        x64 = widened(np.ascontiguousarray(stored), dtype)
        rows = stored.view(np.uint16) if stored.dtype != np.float32 else stored
        with cupy_backend.use_runtime(gpu_shim.HostRuntime(k)):
            med = np.empty(n, np.float32)
            cupy_backend.robust_coord(rows, rc.CODES[dtype], 0, 0, 0, med)
            c = rc.trim_count(k, 0.2)
            tri = np.empty(n, np.float32)
            cupy_backend.robust_coord(rows, rc.CODES[dtype], 1, c, k - c, tri)
        assert same_bits(med, ref_median(x64)), pattern
        assert same_bits(tri, ref_trimmed(x64, 0.2)), pattern


def test_device_and_host_slabs_stay_where_they_are():
    """backend="cupy" reads GPU slabs only (a host slab is refused, not copied behind the caller's back), and says
    why it cannot run where there is no GPU."""
    host = np.zeros((3, 4), np.float32)
    if rc.available_backends()["cupy"] is True:
        with pytest.raises(TypeError, match="host memory but the backend is 'cupy'"):
            rc.coordinate_median(host, backend="cupy")
    else:
        with pytest.raises(jk.BackendUnavailable, match="cupy"):
            rc.coordinate_median(host, backend="cupy")


def test_cpp_register_and_tile_paths_on_threads(cpp):
    """Every register instantiation (k = 1..32 for the median, 1..24 for the trimmed mean) and the tile path past
    them, with a ragged tail (n % 8 != 0) and two threads."""
    n = 1003
    for k in list(range(1, 35)) + [47, 64]:
        x32 = make_rows(k, n, "ties" if k % 3 == 0 else "normal", k)
        for dtype in ("float32", "float16", "bfloat16"):
            stored = to_storage(x32, dtype)
            x64 = widened(stored, dtype)
            for fns in cpp.values():
                assert same_bits(cpp_median(fns, stored, dtype, 0, 2), ref_median(x64)), (k, dtype)
                assert same_bits(cpp_trimmed(fns, stored, dtype, 0.2, 0, 2), ref_trimmed(x64, 0.2)), (k, dtype)


def test_cpp_reads_rows_with_a_stride(cpp):
    """Rows of a wider array (row stride ld > n), as a binding may pass a column block of the slab."""
    k, n, ld = 10, 101, 128
    wide = make_rows(k, ld, "normal", 5)
    x64 = wide[:, :n].astype(np.float64)
    for med, tri, _ in cpp.values():
        for tile in (0, 16):
            out = np.empty(n, np.float32)
            assert med(wide.ctypes.data, rc.F32, k, n, ld, out.ctypes.data, tile, 2) == 0
            assert same_bits(out, ref_median(x64))
            assert tri(wide.ctypes.data, rc.F32, k, n, ld, 1, k - 1, out.ctypes.data, tile, 2) == 0
            assert same_bits(out, ref_trimmed(x64, 0.1))
    assert same_bits(rc.coordinate_median(wide[:, :n], backend="numpy"), ref_median(x64))


def test_a_one_column_slab_may_have_any_column_stride():
    """A [k, 1] slab (a column picked out of a wider one: numpy keeps that column stride) is read by every backend;
    the Gram rules' pilot passes such slabs for one-parameter models."""
    X = np.arange(15, dtype=np.float32).reshape(5, 3)[:, [1]]
    assert X.strides[1] != X.itemsize
    for b, ok in rc.available_backends().items():
        if ok is True and b != "cupy":
            assert rc.coordinate_median(X, backend=b).tolist() == [7.0]
            assert rc.trimmed_mean(X, 0.2, backend=b).tolist() == [7.0]


def test_slabs_whose_rows_repeat_or_run_backwards_are_read_by_every_backend():
    """A row stride of 0 (x[None], np.broadcast_to), a negative one (x[::-1]) or one shorter than a row (rows that
    overlap) was "robust kernel: invalid arguments (code -1)" on C++, the default below 16 rows, where numpy and
    numba took them: such slabs are copied first."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(9).astype(np.float32)
    two = np.stack([x, 2 * x])
    overlapping = np.lib.stride_tricks.as_strided(np.arange(12, dtype=np.float32), (4, 6), (8, 4))
    for slab in (x[None], np.broadcast_to(x, (3, 9)), two[::-1], overlapping):
        want_med = np.median(slab.astype(np.float64), axis=0).astype(np.float32)
        for b, ok in rc.available_backends().items():
            if ok is True and b != "cupy":
                np.testing.assert_array_equal(rc.coordinate_median(slab, backend=b), want_med, err_msg=b)
                np.testing.assert_allclose(rc.trimmed_mean(slab, 0.0, backend=b), slab.astype(np.float64).mean(axis=0),
                                           rtol=1e-6, atol=1e-6, err_msg=b)


def test_cpp_rejects_bad_arguments(cpp):
    x = np.zeros((3, 4), np.float32)
    out = np.empty(4, np.float32)
    med, tri, _ = cpp["base"]
    assert med(x.ctypes.data, 7, 3, 4, 4, out.ctypes.data, 0, 1) == -1  # unknown dtype code
    assert med(x.ctypes.data, 1, 0, 4, 4, out.ctypes.data, 0, 1) == -1  # k = 0
    assert tri(x.ctypes.data, 1, 3, 4, 4, 2, 1, out.ctypes.data, 0, 1) == -1  # lo >= hi


def test_network_sorts_and_matches_cpp(cpp):
    """0-1 principle: a comparator network sorts every input iff it sorts every 0/1 input."""
    for k in range(1, 13):
        x01 = ((np.arange(2 ** k)[None, :] >> np.arange(k)[:, None]) & 1).astype(np.float32)
        want = np.sort(x01, axis=0)
        for depth_first in (False, True):
            for lo, hi in ((0, k), ((k - 1) // 2, k // 2 + 1), (k // 5, k - k // 5)):
                ci, cj, _ = rc.network(k, lo, hi, depth_first)
                x = x01.copy()
                for a, b in zip(ci, cj):
                    x[a], x[b] = np.minimum(x[a], x[b]), np.maximum(x[a], x[b])
                assert (x[lo:hi] == want[lo:hi]).all(), (k, lo, hi, depth_first)
        assert len(rc.network(k, 0, k, True)[0]) == len(rc.network(k, 0, k)[0])
    _, _, net = cpp["base"]
    for k in range(1, 41):
        for lo, hi in ((0, k), (k // 2, k // 2 + 1), ((k - 1) // 2, k // 2 + 1)):
            ci, cj, fused = rc.network(k, lo, hi)
            i, j, f = np.zeros(2048, np.int32), np.zeros(2048, np.int32), ctypes.c_longlong()
            m = net(k, lo, hi, i.ctypes.data, j.ctypes.data, 2048, ctypes.addressof(f))
            assert m == len(ci) and f.value == fused
            assert (i[:m] == ci).all() and (j[:m] == cj).all()


# --- the semantics that matter ----------------------------------------------------------------------------------------
def test_even_k_midpoint_does_not_overflow_where_flower_does():
    from flwr.server.strategy.aggregate import aggregate_median

    big = np.float32(3e38)
    x = np.array([[big, -big, 3.4e38], [big, big, 3.4e38]], np.float32)
    for backend in rc.BACKENDS[:2]:
        assert same_bits(rc.coordinate_median(x, backend=backend), np.array([big, 0.0, 3.4e38], np.float32))
    with np.errstate(over="ignore"):
        flower = aggregate_median([([x[0]], 1), ([x[1]], 1)])[0]
    assert np.isinf(flower[0])  # Flower's np.median on float32 adds the two middle values in float32: inf


def test_zero_results_are_positive_zero():
    x = np.array([[-0.0, -0.0, -0.0], [-0.0, 0.0, -0.0], [-0.0, -0.0, 1.0]], np.float32)
    for backend in rc.BACKENDS[:2]:
        for out in (rc.coordinate_median(x, backend=backend), rc.trimmed_mean(x, 0.4, backend=backend)):
            assert not np.signbit(out[:2]).any()


def test_trim_count_is_flowers():
    for k in range(1, 61):
        for beta in (0.0, 0.1, 0.2, 0.3, 0.49):
            assert rc.trim_count(k, beta) == int(beta * k)
    for beta in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError):
            rc.trim_count(10, beta)


@pytest.mark.parametrize("k", [1, 2, 5, 10, 11, 25])
def test_against_flower(k):
    """Flower's aggregate_median / aggregate_trimmed_avg on the same layers (float32 arithmetic there, float64 here:
    equal within float32 rounding on well-separated values). Ours returns flat float32; unflatten gives the layers."""
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

    rng = np.random.default_rng(k)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    results = [([(rng.permutation(int(np.prod(s))).reshape(s) + 100.0 * j).astype(np.float32) for s in shapes], 10)
               for j in range(k)]
    store = UpdateStore(sum(int(np.prod(s)) for s in shapes), k)
    for j, (layers, _) in enumerate(results):
        store.add(layers, party=f"p{j}")
    ours = store.unflatten(rc.coordinate_median(store))
    for a, b in zip(ours, aggregate_median(results)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for beta in (0.0, 0.1, 0.2, 0.3):
        ours = store.unflatten(rc.trimmed_mean(store, beta))
        for a, b in zip(ours, aggregate_trimmed_avg(results, beta)):
            np.testing.assert_allclose(a, b, rtol=1e-5)


def test_api_errors(monkeypatch):
    x = np.zeros((3, 5), np.float32)
    with pytest.raises(TypeError):
        rc.coordinate_median(np.zeros((3, 5), np.uint16))  # uint16 without saying which 16-bit float
    with pytest.raises(TypeError):
        rc.coordinate_median(x.astype(np.float64))
    with pytest.raises(ValueError):
        rc.coordinate_median(x[0])
    with pytest.raises(jk.EmptyAggregate):
        rc.coordinate_median(np.zeros((0, 5), np.float32))
    with pytest.raises(jk.EmptyAggregate):
        rc.trimmed_mean(UpdateStore(5, 2), 0.1)
    with pytest.raises(ValueError):
        rc.trimmed_mean(x, 0.5)
    with pytest.raises(ValueError):
        rc.coordinate_median(x, out=np.empty(5, np.float64))
    with pytest.raises(jk.BackendUnavailable):
        rc.coordinate_median(x, backend="cupy")
    if rc.available_backends()["cpp"] is not True:  # not bound into jitkernels._core yet: named, it must fail
        with pytest.raises(jk.BackendUnavailable, match="robust_median"):
            rc.coordinate_median(x, backend="cpp")
    monkeypatch.setenv("JITKERNELS_BACKEND", "numpy")
    assert same_bits(rc.coordinate_median(x), np.zeros(5))


# --- the store --------------------------------------------------------------------------------------------------------
def _layers(rng, j=0):
    return [rng.standard_normal((3, 4)).astype(np.float32) + j, rng.standard_normal(5)]


def _snapshot(store: UpdateStore):
    """What a rejected add must leave as it was: rows, parties, layout, where the slab lives (the free row it wrote
    into is not state, nor is a device store's capacity, which may have grown)."""
    return (store.k, store.parties, store.shapes, store.spilled, store.rows().tobytes())


class HostShimDeviceStore(DeviceUpdateStore):
    """DeviceUpdateStore's own logic (growth within k_max and the budget, admission, rejection, whole-store moves)
    run on numpy arrays, as tests/gpu_shim.py runs the GPU backend's orchestration: test_gpu.py runs the real one."""

    xp = np
    chunk = CHUNK  # the device's chunks are 64x larger: with the host's, a rejection falls in a later chunk


def test_store_rows_and_layout():
    rng = np.random.default_rng(0)
    s = UpdateStore(17, 4)
    ups = [_layers(rng, j) for j in range(3)]
    for j, u in enumerate(ups):
        assert s.add(u, party=j) == j
    assert s.shapes == ((3, 4), (5,)) and s.parties == (0, 1, 2) and len(s) == 3 and 1 in s
    flat = np.stack([np.concatenate([a.ravel(), b.ravel().astype(np.float32)]) for a, b in ups])
    assert np.array_equal(s.rows(), flat) and not s.rows().flags.writeable
    s.add(flat[0] * 2, party="flat")  # a flat array of N values is accepted in place of the leaves
    assert [a.shape for a in s.unflatten(np.zeros(17, np.float32))] == [(3, 4), (5,)]
    with pytest.raises(StoreFull, match="'extra'"):
        s.add(flat[0], party="extra")


@pytest.mark.parametrize("release", [True, False])
def test_clear_starts_a_new_round(tmp_path, release):
    s = UpdateStore(5, 3, budget_bytes=20, over_budget="spill", spill_dir=tmp_path)
    s.add(np.ones(5), party="a")
    s.add(np.full(5, 2.0), party="b")  # spills
    s.clear(release=release)
    assert len(s) == 0 and s.rows().shape == (0, 5) and s.spilled == (not release)
    assert len(list(tmp_path.iterdir())) == (0 if release else 1)
    s.add(np.full(5, 3.0), party="a")  # the same party, next round
    assert same_bits(rc.coordinate_median(s), np.full(5, 3.0))


@pytest.mark.parametrize("bad,err", [
    ("nan_late", jk.NonFiniteUpdate), ("inf", jk.NonFiniteUpdate), ("f16_overflow", jk.ValueOutOfRange),
    ("length", jk.LayoutMismatch), ("dtype", jk.LayoutMismatch), ("shape", jk.LayoutMismatch),
    ("duplicate", jk.DuplicateParty), ("budget", BudgetExceeded),
])
@pytest.mark.parametrize("kind", [UpdateStore, HostShimDeviceStore])
def test_rejected_add_names_the_party_and_leaves_the_store_bit_identical(bad, err, kind):
    n = 2 * CHUNK + 5  # the non-finite value sits in the third chunk: two chunks were written, then undone
    s = kind(n, 4, dtype="float16" if bad == "f16_overflow" else "float32", budget_bytes=2 * n * 4)
    good = [np.ones((2, CHUNK), np.float32), np.ones(5, np.float64)]
    s.add(good, party="ok")
    before = _snapshot(s)
    up = [np.ones((2, CHUNK), np.float32), np.ones(5, np.float64)]
    party = "ok" if bad == "duplicate" else "evil"
    if bad == "nan_late":
        up[1][3] = np.nan
    elif bad == "inf":
        up[0][1, -1] = -np.inf
    elif bad == "f16_overflow":
        up[1][4] = 7e4
    elif bad == "length":
        up[1] = np.ones(6)
    elif bad == "dtype":
        up[1] = np.ones(5, np.complex64)
    elif bad == "shape":
        up[0] = up[0].reshape(CHUNK, 2)
    elif bad == "budget":
        s.add(good, party="ok2")
        before = _snapshot(s)
    with pytest.raises(err) as e:
        s.add(up, party=party)
    assert repr(party) in str(e.value)
    if bad in ("nan_late", "f16_overflow", "length", "dtype"):
        assert "'1'" in str(e.value)  # the leaf
    assert _snapshot(s) == before


@pytest.mark.parametrize("kind", [UpdateStore, HostShimDeviceStore])
def test_finite_updates_skip_only_the_checks_that_cannot_fail(kind):
    """add(..., finite=True) (an admitted update, whose values admission counted) writes the same bits without the
    per-chunk check where the slab holds the values exactly; a conversion that can overflow (float32 into float16,
    float64 into float32) is still checked, and refused by name."""
    n = 2 * CHUNK + 5
    rng = np.random.default_rng(1)
    up = [rng.standard_normal((2, CHUNK)).astype(np.float32), rng.standard_normal(5).astype(np.float16)]
    plain, known = kind(n, 2), kind(n, 2)
    plain.add(up, party="p")
    known.add(up, party="p", finite=True)
    assert _snapshot(plain) == _snapshot(known)
    for dtype, bad in (("float16", np.full(5, 7e4, np.float32)), ("float32", np.full(5, 1e300))):
        s = kind(n, 2, dtype=dtype)
        before = _snapshot(s)
        with pytest.raises(jk.ValueOutOfRange, match="'q'"):
            s.add([np.ones((2, CHUNK), np.float32), bad], party="q", finite=True)
        assert _snapshot(s) == before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_device_store_grows_within_k_max_and_its_budget(dtype):
    """A store in GPU memory has no lazy commit: its slab starts empty and doubles (at least FIRST_ROWS), never past
    k_max rows nor the rows its budget allows; rows and errors are the host store's."""
    rng = np.random.default_rng(2)
    n = 17
    ups = [_layers(rng, j) for j in range(20)]
    host = UpdateStore(n, 20, dtype=dtype)
    dev = HostShimDeviceStore(n, 20, dtype=dtype)
    tight = HostShimDeviceStore(n, 20, dtype=dtype, budget_bytes=11 * n * host.itemsize)
    assert dev._slab.shape[0] == 0
    caps = []
    for j, u in enumerate(ups):
        host.add(u, party=j)
        dev.add(u, party=j)
        caps.append(dev._slab.shape[0])
        assert np.array_equal(dev.rows(), host.rows())
        if j < 11:
            tight.add(u, party=j)
            assert tight._slab.shape[0] <= 11
        else:
            with pytest.raises(BudgetExceeded, match=repr(j)):
                tight.add(u, party=j)
    assert sorted(set(caps)) == [8, 16, 20]
    assert np.array_equal(dev.row(3), host.row(3)) and dev.shapes == host.shapes


def test_device_store_moves_whole(tmp_path):
    """clear, truncate, extend from a host store, copy, save and load keep the rows; which kind of store an
    aggregator keeps follows store_class."""
    rng = np.random.default_rng(4)
    ups = [_layers(rng, j) for j in range(6)]
    host = UpdateStore(17, 8)
    dev = HostShimDeviceStore(17, 8)
    for j in range(3):
        host.add(ups[j], party=f"h{j}")
        dev.add(ups[j + 3], party=f"d{j}")
    dev.extend(host)
    assert dev.parties == ("d0", "d1", "d2", "h0", "h1", "h2")
    both = np.concatenate([np.asarray(dev.rows()[:3]), host.rows()])
    assert np.array_equal(dev.rows(), both)
    assert np.array_equal(dev.copy().rows(), both) and type(dev.copy()) is HostShimDeviceStore
    dev.save(tmp_path / "s.jks")
    back = HostShimDeviceStore.load(tmp_path / "s.jks")
    assert back.parties == dev.parties and np.array_equal(back.rows(), both)
    assert np.array_equal(UpdateStore.load(tmp_path / "s.jks").rows(), both)  # the same file, either kind
    dev.truncate(4)
    assert dev.parties == ("d0", "d1", "d2", "h0") and np.array_equal(dev.rows(), both[:4])
    for release in (False, True):
        dev.clear(release=release)
        assert len(dev) == 0 and dev.rows().shape == (0, 17)
    with pytest.raises(ValueError, match="refuses"):
        HostShimDeviceStore(17, 8, budget_bytes=100, over_budget="spill", spill_dir=tmp_path)
    assert store_class(True, "refuse") is DeviceUpdateStore
    assert store_class(True, "spill") is UpdateStore and store_class(False, "refuse") is UpdateStore


def test_store_spills_to_a_file_past_its_budget(tmp_path):
    rng = np.random.default_rng(1)
    n, ups = 17, [_layers(rng, j) for j in range(5)]
    mem = UpdateStore(n, 8)
    disk = UpdateStore(n, 8, budget_bytes=2 * n * 4, over_budget="spill", spill_dir=tmp_path)
    for j, u in enumerate(ups):
        mem.add(u, party=j)
        disk.add(u, party=j)
        assert disk.spilled == (j >= 2)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("jk-updates-") and files[0] == type(files[0])(disk.spill_path)
    assert np.array_equal(mem.rows(), disk.rows())
    assert same_bits(rc.coordinate_median(disk), rc.coordinate_median(mem))
    disk.close()
    assert not list(tmp_path.iterdir()) and len(disk) == 0
    with pytest.raises(ValueError):
        UpdateStore(n, 8, budget_bytes=10, over_budget="spill")  # spilling needs a directory


def test_spill_triggered_by_a_rejected_update_does_not_move_the_slab(tmp_path):
    s = UpdateStore(4, 4, budget_bytes=16, over_budget="spill", spill_dir=tmp_path)
    s.add(np.ones(4), party=0)
    before = _snapshot(s)
    with pytest.raises(jk.NonFiniteUpdate):
        s.add(np.array([1.0, np.nan, 0, 0]), party=1)
    assert _snapshot(s) == before and not s.spilled and not list(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_save_load_and_restart_lose_nothing(tmp_path, dtype):
    rng = np.random.default_rng(2)
    ups = [_layers(rng, j) for j in range(7)]
    whole = UpdateStore(17, 8, dtype=dtype)
    for j, u in enumerate(ups):
        whole.add(u, party=f"p{j}")
    part = UpdateStore(17, 8, dtype=dtype, budget_bytes=10 ** 6)
    path = tmp_path / "store.safetensors"
    for j, u in enumerate(ups[:4]):
        part.add(u, party=f"p{j}")
        part.save(path)  # after every admission: a crash loses nothing
    del part  # "the process dies"
    back = UpdateStore.load(path)
    assert back.parties == ("p0", "p1", "p2", "p3") and back.dtype == dtype and back.shapes == ((3, 4), (5,))
    assert back.budget_bytes == 10 ** 6
    with pytest.raises(jk.DuplicateParty):
        back.add(ups[0], party="p0")
    for j, u in enumerate(ups[4:], start=4):
        back.add(u, party=f"p{j}")
    assert np.array_equal(back.rows(), whole.rows())
    assert same_bits(rc.coordinate_median(back), rc.coordinate_median(whole))
    assert same_bits(rc.trimmed_mean(back, 0.2), rc.trimmed_mean(whole, 0.2))


def test_corrupted_or_truncated_file_is_corrupt_state(tmp_path):
    s = UpdateStore(1000, 4)
    s.add(np.arange(1000, dtype=np.float32), party="a")
    s.add(np.ones(1000, np.float32), party="b")
    path = tmp_path / "s"
    s.save(path)
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[-100] ^= 0x01  # one bit of one value
    (tmp_path / "flip").write_bytes(bytes(flipped))
    (tmp_path / "cut").write_bytes(bytes(data[: len(data) // 2]))
    (tmp_path / "junk").write_bytes(b"not a store at all")
    for name in ("flip", "cut", "junk"):
        with pytest.raises(jk.CorruptState):
            UpdateStore.load(tmp_path / name)
    from jitkernels.state import atomic_write, checked_bytes
    atomic_write(str(tmp_path / "other"), checked_bytes({"rows": np.zeros((1, 3), np.float32)}, {"format": "x"}))
    with pytest.raises(jk.CorruptState, match="not a jitkernels update store"):
        UpdateStore.load(tmp_path / "other")


def test_conversions_round_to_nearest_even():
    """float64/float32/float16/bfloat16 inputs into float16 and bfloat16 slabs: numpy's and ml_dtypes' casts (which
    round once, to nearest even) are the oracles; float64 -> bfloat16 must round once too (through round-to-odd)."""
    rng = np.random.default_rng(3)
    edges = [1 + 2 ** -8, 1 + 3 * 2 ** -9, 1 + 2 ** -8 + 2 ** -40, 1 + 2 ** -8 - 2 ** -40, 3.38e38, -1e-42, 0.0, -0.0]
    x64 = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-30, 30, 5000), edges])
    n = x64.size
    b = UpdateStore(n, 4, dtype="bfloat16")
    b.add(x64, party="f64")
    b.add(x64.astype(np.float32), party="f32")
    b.add(x64.astype(np.float32).astype(jk.bfloat16), party="bf16")
    rows = b.rows()
    # exact reference for f64 -> bf16: the nearer of the two bf16 neighbours, ties to the even one
    down = (x64.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation of RN32 as a first guess
    cand = np.stack([down - 1, down, down + 1]).astype(np.uint16)
    vals = (cand.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    err = np.abs(vals - x64)
    best = err.min(axis=0)
    ties = (err == best) & ((cand & 1) == 0)
    pick = np.where(ties.any(axis=0), np.argmax(ties, axis=0), np.argmin(err, axis=0))
    expect = cand[pick, np.arange(n)]
    normal = np.abs(x64) > 1e-37  # the neighbour search above assumes no sign or subnormal crossing
    assert np.array_equal(rows[0][normal], expect[normal])
    assert list(rows[0][-3:]) == [0x8000, 0, 0x8000]  # -1e-42 rounds to -0.0; signed zeros are kept
    assert np.array_equal(rows[1], x64.astype(np.float32).astype(jk.bfloat16).view(np.uint16))
    assert np.array_equal(rows[2], rows[1])
    h = UpdateStore(6, 2, dtype="float16")
    v = np.array([1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0, 6e-8, -2.5, 1e-9])
    h.add(v, party=0)
    assert np.array_equal(h.rows()[0].view(np.uint16), v.astype(np.float16).view(np.uint16))


def test_copy_extend_describe_from_rows(tmp_path):
    """What FoldState uses: copy (independent), extend (a merge: all or nothing), describe + from_rows (its file)."""
    import json

    rng = np.random.default_rng(4)
    a, b = UpdateStore(17, 5, dtype="bfloat16"), UpdateStore(17, 5, dtype="bfloat16")
    for j in range(3):
        a.add(_layers(rng, j), party=f"a{j}")
    for j in range(2):
        b.add(_layers(rng, j), party=j)
    c = a.copy()
    c.add(_layers(rng), party="only-in-c")
    assert len(a) == 3 and len(c) == 4 and np.array_equal(c.rows()[:3], a.rows())
    back = UpdateStore.from_rows(a.rows(), **json.loads(json.dumps(a.describe())), shapes=a.shapes)
    assert back.parties == a.parties and np.array_equal(back.rows(), a.rows()) and back.dtype == "bfloat16"
    a.extend(b)
    assert a.parties == ("a0", "a1", "a2", 0, 1) and np.array_equal(a.rows()[3:], b.rows())
    before = _snapshot(c)
    with pytest.raises(StoreFull):
        c.extend(b)  # 4 + 2 > 5: nothing is added
    with pytest.raises(jk.DuplicateParty):
        back.extend(a)
    with pytest.raises(jk.IncompatibleStates):
        c.extend(UpdateStore(17, 5))
    assert _snapshot(c) == before
    r = UpdateStore(17, 5, budget_bytes=3 * 17 * 4)
    r.check_room(3)
    with pytest.raises(BudgetExceeded):
        r.check_room(4, party="x")
    with pytest.raises(StoreFull):
        r.check_room(6)
    spill = UpdateStore(17, 5, budget_bytes=17 * 4, over_budget="spill", spill_dir=tmp_path)
    spill.check_room(5)
    spill.extend(UpdateStore.from_rows(np.ones((3, 17), np.float32), k_max=5, dtype="float32", parties=[1, 2, 3]))
    assert spill.spilled and len(spill) == 3
    for bad in (np.full((1, 17), np.inf, np.float32), np.ones((2, 17), np.float32), np.ones((1, 17))):
        with pytest.raises(ValueError):
            UpdateStore.from_rows(bad, k_max=5, dtype="float32", parties=["p"])


def test_store_argument_checks(tmp_path):
    with pytest.raises(ValueError):
        UpdateStore(10, 0)
    with pytest.raises(ValueError):
        UpdateStore(10, 2, dtype="int8")
    with pytest.raises(ValueError):
        UpdateStore(10, 2, over_budget="drop")
    with pytest.raises(ValueError):
        UpdateStore(10, 2, shapes=[(3, 3)])
    s = UpdateStore(3, 2)
    with pytest.raises(TypeError):
        s.add(np.zeros(3), party=1.5)
    with pytest.raises(jk.LayoutMismatch, match="holds 4 values"):
        s.add(np.zeros(4), party=1)
    ints = UpdateStore(4, 3, dtype="bfloat16")  # integer leaves (counters) are converted like numpy's cast
    ints.add([np.array([1, 2, 3], np.int64), np.array(7, np.uint8)], party="i")
    assert np.array_equal(ints.row(0), [1, 2, 3, 7]) and ints.shapes == ((3,), ())
    with pytest.raises(jk.ValueOutOfRange):
        UpdateStore(1, 1, dtype="float16").add(np.array([70000], np.int32), party="big")


# --- memory -----------------------------------------------------------------------------------------------------------
def test_numpy_reference_memory_is_tile_sized():
    k, n = 10, 1_000_000
    s = UpdateStore(n, k)
    base = np.linspace(-1, 1, n, dtype=np.float32)
    for j in range(k):
        s.add(base * (j - 4.5), party=j)
    rc.coordinate_median(s, backend="numpy")
    tracemalloc.start()
    try:
        t0 = tracemalloc.get_traced_memory()[0]
        rc.coordinate_median(s, backend="numpy")
        rc.trimmed_mean(s, 0.1, backend="numpy")
        peak = tracemalloc.get_traced_memory()[1] - t0
    finally:
        tracemalloc.stop()
    slab = k * n * 4
    assert peak < 4 * n + 8 * 2 ** 20, f"{peak / 2 ** 20:.1f} MB traced for a {slab / 2 ** 20:.0f} MB slab"


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _rss_growth(fn):
    """Resident-set high-water growth of fn() (Linux: VmHWM after resetting it through /proc/self/clear_refs)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("cannot reset the resident-set high-water mark here")
    rss0 = _status_kb("VmRSS") * 1024
    fn()
    return _status_kb("VmHWM") * 1024 - rss0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_median_over_a_200mb_store_uses_slab_plus_tiles(cpp):
    k, n = 10, 5_000_000
    s = UpdateStore(n, k)
    base = np.linspace(-1, 1, n, dtype=np.float32)
    for j in range(k):
        s.add(base * np.float32(j - 4.5), party=j)
    del base
    out = np.empty(n, np.float32)
    out[:] = 0  # resident before the measurement: what is left is the kernels' own memory
    rows = s.rows()
    runs = {
        "numba": lambda: rc.coordinate_median(s, backend="numba", out=out),
        "numba-tile": lambda: rc.trimmed_mean(s, 0.1, backend="numba", out=out, tile=1024),
        "cpp": lambda: cpp_median(cpp["base"], rows, "float32", 0, 2),
    }
    for name, fn in runs.items():
        fn()  # warm-up: compile / load caches, start thread pools
        growth = _rss_growth(fn)
        extra = 4 * n if name == "cpp" else 0  # the ctypes helper allocates its own output
        assert growth < extra + 64 * 2 ** 20, f"{name}: {growth / 2 ** 20:.0f} MB over a 200 MB slab"
    assert s.nbytes == k * n * 4


def test_device_store_loads_a_spilling_stores_file(tmp_path):
    """A file saved by a store that spilled loads into GPU memory as a refusing store, not as a corrupt file: rows
    over its budget are refused as an add would refuse them, and fit under another budget."""
    s = UpdateStore(5, 4, budget_bytes=20, over_budget="spill", spill_dir=tmp_path)
    for j in range(3):
        s.add(np.full(5, float(j)), party=j)
    assert s.spilled
    s.save(tmp_path / "s.jks")
    with pytest.raises(BudgetExceeded):
        HostShimDeviceStore.load(tmp_path / "s.jks")
    d = HostShimDeviceStore.load(tmp_path / "s.jks", budget_bytes=None)
    assert d.over_budget == "refuse" and d.parties == (0, 1, 2) and np.array_equal(d.rows(), s.rows())


# --- review fixes (2026-11-28) ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_direct_slab_holding_nan_or_inf_is_refused_naming_its_row(backend, dtype):
    """NaN has no place in an order: a slab with NaN gave [3,4,6] on numpy, [2,1,nan] on numba and [2,4,6] on cpp
    (and another answer with tile=2). Nor has inf a place in a mean: -inf and +inf in the kept ranks made NaN, as
    admission and the Gram rules would refuse them. A slab given directly is read for both first."""
    x = np.array([[1, 1, 5], [2, 3, 6], [3, 4, 7], [9, 9, 9], [0, 0, 0]], np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        x[2, 1] = bad
        slab = to_storage(x, dtype)
        for fn in (lambda: rc.coordinate_median(slab, backend=backend, dtype=dtype),
                   lambda: rc.trimmed_mean(slab, 0.2, backend=backend, dtype=dtype, tile=2)):
            with pytest.raises(jk.NonFiniteUpdate, match="party 2.*1 non-finite"):
                fn()
    x[2, 1] = 4
    assert rc.coordinate_median(to_storage(x, dtype), backend=backend, dtype=dtype)[1] == 3.0


def test_a_store_spilling_to_a_full_disk_refuses_by_name_and_stays_as_it_was(tmp_path, monkeypatch):
    """Rows written through the spill file's mapping where the disk had no room killed the process (SIGBUS, found on a
    1 MiB tmpfs). The file's blocks are allocated before a row is written: no room is SpillFailed naming the party,
    the store as it was (in memory when the spill itself failed), and adds go on once there is room."""
    from jitkernels.robust_store import SpillFailed

    n = 1000
    store = UpdateStore(n, 8, budget_bytes=2 * 4 * n, over_budget="spill", spill_dir=str(tmp_path))
    for p in range(2):
        store.add(np.full(n, p, np.float32), p)
    real = os.posix_fallocate
    full = [True]

    def fallocate(fd, offset, length):
        if full[0]:
            raise OSError(28, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(SpillFailed, match="party 2: .*No space left"):
        store.add(np.full(n, 2, np.float32), 2)
    assert not store.spilled and store.parties == (0, 1) and os.listdir(tmp_path) == []
    full[0] = False
    store.add(np.full(n, 2, np.float32), 2)
    assert store.spilled
    assert os.stat(store.spill_path).st_blocks * 512 >= 3 * 4 * n  # the rows' blocks are allocated
    full[0] = True
    with pytest.raises(SpillFailed, match="party 3"):
        store.add(np.full(n, 3, np.float32), 3)
    assert store.parties == (0, 1, 2) and [float(store.row(i)[0]) for i in range(3)] == [0.0, 1.0, 2.0]


def test_dict_leaves_are_stored_by_name_not_by_position():
    """A party whose dict listed the same leaves in another order had them stored in each other's place."""
    store = UpdateStore(6, 4, shapes=[(3,), (3,)])
    store.add({"a": np.zeros(3, np.float32), "b": np.full(3, 100, np.float32)}, "p")
    store.add({"b": np.full(3, 100, np.float32), "a": np.zeros(3, np.float32)}, "q")
    np.testing.assert_array_equal(store.rows()[1], [0, 0, 0, 100, 100, 100])
    with pytest.raises(jk.LayoutMismatch, match="differ from the store's"):
        store.add({"a": np.zeros(3, np.float32), "c": np.zeros(3, np.float32)}, "r")
    other = UpdateStore(6, 4, shapes=[(3,), (3,)])
    other.add({"b": np.zeros(3, np.float32), "a": np.zeros(3, np.float32)}, "s")
    with pytest.raises(jk.IncompatibleStates, match="other orders"):
        store.extend(other)
    assert store.copy().names == ("a", "b")


def test_from_rows_refuses_rows_of_another_dtype_for_a_bfloat16_store():
    """Any rows were read as bfloat16 bits: float32 [1, 2, 3] became a store of 6 values."""
    with pytest.raises(ValueError, match="bfloat16 store"):
        UpdateStore.from_rows(np.array([[1, 2, 3]], np.float32), k_max=4, dtype="bfloat16", parties=["p"])
    ok = UpdateStore.from_rows(np.array([[1, 2, 3]], jk.bfloat16), k_max=4, dtype="bfloat16", parties=["p"])
    np.testing.assert_array_equal(ok.row(0), [1, 2, 3])


def test_a_batch_that_cannot_spill_leaves_the_store_in_memory(tmp_path, monkeypatch):
    """A batch that moved the store to disk and met a full disk partway (SpillFailed) left it spilled, its file
    behind: the batch's rows are reserved at once before any is added, and a batch refused after its spill brings
    the store back into memory, as it was."""
    from jitkernels.robust_store import SpillFailed

    n = 1000
    store = UpdateStore(n, 16, budget_bytes=2 * 4 * n, over_budget="spill", spill_dir=str(tmp_path))
    store.add(np.zeros(n, np.float32), "p0")
    calls = []

    def fallocate(fd, offset, length):
        calls.append(length)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    with pytest.raises(SpillFailed, match="party 'p1'"):
        store.add_many([np.full(n, j, np.float32) for j in range(1, 6)], [f"p{j}" for j in range(1, 6)])
    assert calls == [6 * 4 * n] and not store.spilled and store.parties == ("p0",) and os.listdir(tmp_path) == []
    monkeypatch.undo()
    bad = np.full(n, 1.0, np.float32)
    bad[3] = np.nan
    with pytest.raises(jk.NonFiniteUpdate):  # refused by the dry run, before any spill
        store.add_many([np.ones(n, np.float32), np.ones(n, np.float32), bad], ["p1", "p2", "p3"])
    assert not store.spilled and os.listdir(tmp_path) == []
    with pytest.raises(jk.DuplicateParty):  # refused partway, after the batch spilled: back in memory
        store.add_many([np.ones(n, np.float32), np.ones(n, np.float32)], ["p1", "p0"])
    assert not store.spilled and store.parties == ("p0",) and os.listdir(tmp_path) == []
    np.testing.assert_array_equal(store.row(0), np.zeros(n, np.float32))


def test_the_leaf_order_of_dict_updates_survives_files_and_copies(tmp_path):
    """A store that read dicts in its first update's order lost that order when saved and loaded (or sent as part of a
    fold state): a dict in another order was then stored swapped."""
    store = UpdateStore(4, 4, shapes=[(2,), (2,)])
    store.add({"b": np.full(2, 1, np.float32), "a": np.full(2, 2, np.float32)}, "p")
    store.save(tmp_path / "s.jks")
    for other in (UpdateStore.load(tmp_path / "s.jks"), store.copy()):
        other.add({"a": np.full(2, 2, np.float32), "b": np.full(2, 1, np.float32)}, "q")
        np.testing.assert_array_equal(other.rows()[1], [1, 1, 2, 2])
    from jitkernels import robust

    agg = jk.Aggregator({"x": np.zeros(2, np.float32), "y": np.zeros(2, np.float32)}, robust.FedMedian())
    agg.fold({"x": np.ones(2, np.float32), "y": np.ones(2, np.float32)}, party="p")
    st = jk.FoldState.from_bytes(agg.state.to_bytes())
    assert st.store.names == ("x", "y")


def test_stores_of_other_keys_still_copy_and_load_and_an_empty_batch_is_nothing(tmp_path):
    """A store fed int keys or a flat one-leaf dict failed copy() and load() once from_rows checked the names (and a
    fix that kept names only for str keys let int-keyed leaves be stored swapped again); add_many of nothing raised
    IndexError on a store over a budget it had been given to refuse past."""
    zero, one = np.zeros(2, np.float32), np.ones(2, np.float32)
    ints = UpdateStore(4, 4, shapes=[(2,), (2,)])
    ints.add({0: zero, 1: one}, "p")
    ints.add({1: one, 0: zero}, "q")
    np.testing.assert_array_equal(ints.rows()[1], [0, 0, 1, 1])
    ints.save(tmp_path / "i.jks")
    for other in (UpdateStore.load(tmp_path / "i.jks"), ints.copy()):
        assert other.names == (0, 1) and other.k == 2
    flat = UpdateStore(4, 4, shapes=[(2,), (2,)])
    flat.add({"w": np.arange(4, dtype=np.float32)}, "p")
    assert flat.copy().k == 1
    with pytest.raises(jk.LayoutMismatch, match="differ from the store's"):
        flat.add({"v": np.arange(4, dtype=np.float32)}, "q")
    named = UpdateStore(4, 4, shapes=[(2,), (2,)])
    named.add({"a": np.zeros(2, np.float32), "b": np.ones(2, np.float32)}, "p")
    named.add({"w": np.arange(4, dtype=np.float32)}, "q")  # the flat form still goes in
    over = UpdateStore(4, 4, budget_bytes=64)
    for j in range(3):
        over.add(np.zeros(4, np.float32), j)
    over.set_budget(16, "refuse")  # (it keeps the rows it has)
    over.add_many([], [])
    assert over.k == 3


@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
def test_a_tile_longer_than_any_slab_gives_the_same_values(backend):
    """tile= beyond the slab (2^40) asked the C++ backend for a k x T buffer inside its parallel region: the
    std::bad_alloc ended the process (numba raised a SystemError). Tiles are taken at most MAX_TILE long, and the
    C++ kernels at most the slab's length: any tile gives the same values."""
    x = np.random.default_rng(5).standard_normal((40, 1000)).astype(np.float32)
    want = rc.coordinate_median(x, backend="numpy")
    assert np.array_equal(rc.coordinate_median(x, backend=backend, tile=2 ** 40), want)
    assert np.array_equal(rc.trimmed_mean(x, 0.1, backend=backend, tile=2 ** 40),
                          rc.trimmed_mean(x, 0.1, backend="numpy"))


def test_a_store_file_does_not_choose_where_the_loader_writes(tmp_path):
    """A store file recorded its spill directory, and load spilled there (creating it): a crafted file made the
    loading process create directories and a sparse file of k_max rows wherever it could write. The directory now
    comes only from the caller; without one the store loads as a refusing one under the file's budget."""
    s = UpdateStore(5, 4, budget_bytes=20, over_budget="spill", spill_dir=tmp_path / "saved_here")
    for j in range(3):
        s.add(np.full(5, float(j)), party=j)
    assert s.spilled
    s.save(tmp_path / "s.jks")
    s.close()
    shutil.rmtree(tmp_path / "saved_here")
    with pytest.raises(BudgetExceeded):
        UpdateStore.load(tmp_path / "s.jks")
    assert not (tmp_path / "saved_here").exists()
    back = UpdateStore.load(tmp_path / "s.jks", spill_dir=tmp_path / "mine")
    assert back.spilled and back.over_budget == "spill" and os.path.dirname(back.spill_path) == str(tmp_path / "mine")
    assert np.array_equal(back.rows(), np.stack([np.full(5, float(j), np.float32) for j in range(3)]))
    assert not (tmp_path / "saved_here").exists()
    back.close()
    with pytest.raises(ValueError, match="needs a spill_dir"):  # (the caller's mistake: it was CorruptState)
        UpdateStore.load(tmp_path / "s.jks", over_budget="spill")
    held = UpdateStore.load(tmp_path / "s.jks", budget_bytes=None)  # in memory
    assert not held.spilled and held.k == 3


@pytest.mark.parametrize("key", ["parties", "shapes", "names", "budget_bytes"])
def test_a_store_file_of_deep_json_is_corrupt_state(tmp_path, key):
    """JSON nested past the parser's limit raised RecursionError out of UpdateStore.load (its checksum is one anyone
    can compute)."""
    from jitkernels.state import atomic_write, checked_bytes, read_checked

    s = UpdateStore(5, 4)
    s.add(np.ones(5, np.float32), party="a")
    s.save(tmp_path / "s.jks")
    tensors, meta = read_checked(str(tmp_path / "s.jks"), what="update store file")
    atomic_write(str(tmp_path / "s.jks"), checked_bytes(tensors, {**meta, key: "[" * 100_000 + "]" * 100_000}))
    with pytest.raises(jk.CorruptState, match="RecursionError"):
        UpdateStore.load(tmp_path / "s.jks")


def test_generated_kernels_are_not_imported_from_a_directory_others_can_write(tmp_path, monkeypatch):
    """A group- or world-writable cache directory is refused (anyone who can write there could plant code the
    next process imports): kernels are then compiled in memory."""
    from jitkernels import robust_coord as rc

    monkeypatch.setenv("JITKERNELS_CACHE_DIR", str(tmp_path))
    (tmp_path / "robust_coord").mkdir(mode=0o700)
    assert rc._cache_dir() == str(tmp_path / "robust_coord")
    os.chmod(tmp_path / "robust_coord", 0o777)
    assert rc._cache_dir() is None
    os.chmod(tmp_path / "robust_coord", 0o720)
    assert rc._cache_dir() is None


def test_generated_kernels_build_once_per_thread_race_and_without_room_in_the_cache(tmp_path, monkeypatch):
    """Threads building one kernel for the first time wrote one temporary file (named by the process id alone) and
    the second os.replace failed with FileNotFoundError (a scheduler finalizing two FedMedian jobs at once); a cache
    that could not be written (a full disk) failed the aggregation and left its temporary file: the kernel is then
    compiled in memory."""
    import threading

    monkeypatch.setenv("JITKERNELS_CACHE_DIR", str(tmp_path))
    d = tmp_path / "robust_coord"
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for k in range(3, 15):  # (building is cheap: numba compiles a kernel at its first call)
        rc._reg_kernel.cache_clear()
        gate, errors = threading.Barrier(8), []

        def build():
            gate.wait()
            try:
                rc._reg_kernel(k, rc.F32, 0, 0, 0)
            except Exception as e:  # noqa: BLE001 (collected for the assertion)
                errors.append(e)

        threads = [threading.Thread(target=build) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and not list(d.glob("*.tmp")) and len(list(d.glob(f"jk_rc_med_k{k}_*.py"))) == 1
    rc._reg_kernel.cache_clear()

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    for f in d.glob("*.py"):
        f.unlink()
    assert rc.coordinate_median(x, backend="numba").tolist() == np.median(x, axis=0).tolist()
    assert not list(d.glob("*.py")) and not list(d.glob("*.tmp"))
    rc._reg_kernel.cache_clear()


def test_the_robust_kernels_keep_one_thread_pool(monkeypatch):
    """A pool per thread count used (models of different sizes use different counts), none ever shut down: with 16
    threads, 52 idle threads stayed."""
    import threading

    x = np.random.default_rng(0).standard_normal((3, max(5 * 4096, rc.SMALL_CALL))).astype(np.float32)
    old = jk.set_num_threads(2)
    try:
        for n in (2, 3, 4, 5):  # (threads = min(kernel threads, n // 4096))
            jk.set_num_threads(n)
            assert rc.coordinate_median(x, backend="numba").tolist() == np.median(x, axis=0).tolist()
    finally:
        jk.set_num_threads(old)
    import gc
    gc.collect()
    import numba
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba runs one thread here (NUMBA_NUM_THREADS): no pool is made")
    workers = rc._pools.get(rc._nice(), (0, None))[0]  # (capped by NUMBA_NUM_THREADS, as every numba path is)
    assert workers >= min(4, numba.config.NUMBA_NUM_THREADS - 1)
    assert sum(t.name.startswith("jk-robust") for t in threading.enumerate()) <= sum(w for w, _ in rc._pools.values())


def test_the_robust_register_path_obeys_numba_num_threads_and_the_callers_nice():
    """The numba register path split its work over Python threads sized by the kernel thread count alone
    (NUMBA_NUM_THREADS=1 ran it on 2), from one pool whose threads took the nice of the thread that first made it:
    a scheduler's niced fold thread (fold_nice) then ran its median on un-niced helpers, or the caller on niced
    ones. Run in a subprocess: NUMBA_NUM_THREADS is read at numba's import."""
    import textwrap
    import threading

    code = textwrap.dedent('''
        import os, threading
        import numpy as np
        import jitkernels as jk
        from jitkernels import robust_coord as rc
        x = np.random.default_rng(0).standard_normal((5, 1 << 17)).astype(np.float32)
        jk.set_num_threads(2)
        rc.coordinate_median(x, backend="numba")
        print("capped", sum(w for w, _ in rc._pools.values()))
    ''')
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "capped 0" in out.stdout
    import numba
    if not hasattr(os, "getpriority") or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("per-thread nice values and two numba threads are needed for the rest")
    x = np.random.default_rng(0).standard_normal((5, 1 << 17)).astype(np.float32)
    old = jk.set_num_threads(2)
    try:  # the caller's pool first: one pool shared by both would then hand the niced thread un-niced helpers
        rc.coordinate_median(x, backend="numba")
    finally:
        jk.set_num_threads(old)
    mine = rc._nice()
    if mine > 16:  # (nice stops at 19)
        pytest.skip(f"the tests run at nice {mine}: a thread cannot be niced further by 3")
    seen = {}

    def niced():
        os.setpriority(os.PRIO_PROCESS, 0, mine + 3)
        old = jk.set_num_threads(2)
        try:
            rc.coordinate_median(x, backend="numba")
        finally:
            jk.set_num_threads(old)
        seen["nice"] = rc._nice()
    t = threading.Thread(target=niced)
    t.start()
    t.join()
    assert seen["nice"] != mine
    for nice in (mine, seen["nice"]):
        pool = rc._pools[nice][1]
        assert {pool.submit(rc._nice).result() for _ in range(4)} == {nice}


@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
@pytest.mark.parametrize("dtype", [">f4", ">f2"])
def test_a_slab_in_the_other_byte_order_is_read_as_its_values(backend, dtype):
    """The kernels read the slab's bytes as native values: a big-endian float32 slab's median came back byte-swapped
    on cpp (9e-44 for 4.0), numba raised a TypingError, and a big-endian float16 one was wrong on every backend."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert rc.coordinate_median(x.astype(dtype), backend=backend).tolist() == [4.0, 5.0, 6.0, 7.0]
    assert rc.trimmed_mean(x.astype(dtype), 0.0, backend=backend).tolist() == [4.0, 5.0, 6.0, 7.0]
