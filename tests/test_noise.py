"""DP Gaussian noise (jitkernels/noise.py, csrc/jk_noise.h): one function z(seed, round, leaf, i), bit for bit.

* Philox4x32-10 against Random123's published known-answer vectors, on numpy, numba and C++.
* numpy (the reference), numba and C++ (g++ -ffp-contract=off, at -O2 and at -O3 with AVX2+FMA) give the same bits
  for random (seed, round, leaf, start, n); splitting [start, start + n) or changing numba's thread count does not
  change them; add_noise rounds the same way on both Python backends.
* jk_log and sin/cos(2 pi u) are within 1 ulp of an 80-bit long double reference (measured: log 0.82 ulp, sin and
  cos 0.79 ulp). numpy's float64 np.log agrees to 1 ulp; np.sin(2 * np.pi * u) is off by millions of ulp near the
  zeros of sin and cos, because 2 * np.pi * u is rounded before reduction (our reduction, in turns, is exact).
* The samples look normal (mean, variance, fourth moment, tails, Kolmogorov-Smirnov, pair and stream correlations).
* The header compiles for CUDA (nvcc, sm_80; NVRTC when cuda-bindings is installed) with no fused multiply-add.
"""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels import noise

CSRC = Path(__file__).resolve().parents[1] / "csrc"
GXX = shutil.which("g++")
NVCC = shutil.which("nvcc")
HAS_NUMBA = noise.numba_available() is True
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason=f"numba: {noise.numba_available()}")

# Random123 kat_vectors, philox4x32_10: (counter, key, expected output)
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# ------------------------------------------------------------------------------------------------------------------
# C++: a tiny extern "C" wrapper of jk_noise.h, loaded with ctypes

WRAPPER = r"""
#include "jk_noise.h"
extern "C" {
void jkn_philox(const uint32_t* ctr, const uint32_t* key, uint32_t* out) {
  jk::u32x4 c = {{ctr[0], ctr[1], ctr[2], ctr[3]}};
  jk::u32x4 r = jk::philox4x32_10(c, key[0], key[1]);
  for (int j = 0; j < 4; ++j) out[j] = r.v[j];
}
void jkn_gaussian(unsigned long long seed, uint32_t round, uint32_t leaf, unsigned long long start,
                  long long n, double* out) {
  for (long long j = 0; j < n; ++j) out[j] = jk::gaussian(seed, round, leaf, start + (unsigned long long)j);
}
// The same through gaussian_pair, as a bulk kernel would: one Philox block per two elements.
void jkn_gaussian_pairs(unsigned long long seed, uint32_t round, uint32_t leaf, unsigned long long start,
                        long long n, double* out) {
  for (long long j = 0; j < n;) {
    const unsigned long long i = start + (unsigned long long)j;
    double z[2];
    jk::gaussian_pair(seed, round, leaf, i >> 1, &z[0], &z[1]);
    for (unsigned e = (unsigned)(i & 1u); e < 2 && j < n; ++e, ++j) out[j] = z[e];
  }
}
void jkn_log(const double* x, double* y, long long n) { for (long long j = 0; j < n; ++j) y[j] = jk::jk_log(x[j]); }
void jkn_sincos(const double* u, double* s, double* c, long long n) {
  for (long long j = 0; j < n; ++j) jk::jk_sincos_2pi(u[j], &s[j], &c[j]);
}
}
"""

def _cpu_has(*flags) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(fl in have for fl in flags)


# an FMA-capable ISA named explicitly, not the build machine's own: with -ffp-contract=off it must give the same bits
CXX_VARIANTS = {"O2": ["-O2"], **({"O3-avx2-fma": ["-O3", "-mavx2", "-mfma"]} if _cpu_has("avx2", "fma") else {})}


@pytest.fixture(scope="session", params=sorted(CXX_VARIANTS))
def cxx(request, tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    d = tmp_path_factory.mktemp(f"jk_noise_{request.param}")
    (d / "wrap.cpp").write_text(WRAPPER)
    so = d / "libjkn.so"
    cmd = [GXX, "-std=c++17", *CXX_VARIANTS[request.param], "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           "-shared", "-fPIC", f"-I{CSRC}", str(d / "wrap.cpp"), "-o", str(so)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lib = ctypes.CDLL(str(so))
    u64, u32, i64, p = ctypes.c_ulonglong, ctypes.c_uint32, ctypes.c_longlong, ctypes.c_void_p
    lib.jkn_philox.argtypes = [p, p, p]
    lib.jkn_gaussian.argtypes = lib.jkn_gaussian_pairs.argtypes = [u64, u32, u32, u64, i64, p]
    lib.jkn_log.argtypes = [p, p, i64]
    lib.jkn_sincos.argtypes = [p, p, p, i64]
    return lib


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def cxx_gaussian(lib, seed, round, leaf, start, n, pairs=False):
    out = np.empty(n, dtype=np.float64)
    (lib.jkn_gaussian_pairs if pairs else lib.jkn_gaussian)(seed, round, leaf, start, n, _ptr(out))
    return out


def bits(a):
    return np.ascontiguousarray(a, dtype=np.float64).view(np.uint64)


# ------------------------------------------------------------------------------------------------------------------
# Philox known answers

@pytest.mark.parametrize("ctr,key,want", KATS)
def test_philox_known_answers_numpy(ctr, key, want):
    assert noise.philox4x32_10(ctr, key).tolist() == list(want)


def test_philox_vectorized_is_columnwise():
    ctr = np.random.default_rng(0).integers(0, 2 ** 32, (4, 50), dtype=np.uint64).astype(np.uint32)
    key = (KATS[2][1][0], KATS[2][1][1])
    got = noise.philox4x32_10(ctr, key)
    assert got.dtype == np.uint32 and got.shape == (4, 50)
    for j in (0, 17, 49):
        assert got[:, j].tolist() == noise.philox4x32_10(ctr[:, j], key).tolist()


@needs_numba
@pytest.mark.parametrize("ctr,key,want", KATS)
def test_philox_known_answers_numba(ctr, key, want):
    got = noise._philox_nb(*(np.uint64(c) for c in ctr), *(np.uint64(k) for k in key))
    assert [int(w) for w in got] == list(want)


@pytest.mark.parametrize("ctr,key,want", KATS)
def test_philox_known_answers_cxx(cxx, ctr, key, want):
    out = np.zeros(4, dtype=np.uint32)
    cxx.jkn_philox(_ptr(np.array(ctr, dtype=np.uint32)), _ptr(np.array(key, dtype=np.uint32)), _ptr(out))
    assert out.tolist() == list(want)


def test_constants_are_fdlibms_and_pi_splits_exactly():
    words = lambda x: f"{np.float64(x).view(np.uint64):016X}"  # noqa: E731
    assert [words(v) for v in noise.LG] == ["3FE5555555555593", "3FD999999997FA04", "3FD2492494229359",
                                            "3FCC71C51D8E78AF", "3FC7466496CB03DE", "3FC39A09D078C69F",
                                            "3FC2F112DF3E5244"]
    assert words(noise.LN2_HI) == "3FE62E42FEE00000" and words(noise.LN2_LO) == "3DEA39EF35793C76"
    assert words(noise.S[0]) == "BFC5555555555549" and words(noise.C[5]) == "BDA8FAE9BE8838D4"
    assert noise.PIO2_HH + noise.PIO2_HL == noise.PIO2_HI
    for half in (noise.PIO2_HH, noise.PIO2_HL):  # 26 significant bits or fewer: products with 26-bit halves exact
        m, _ = math.frexp(half)
        assert (m * 2 ** 26).is_integer()
    from fractions import Fraction
    pi = Fraction("3.14159265358979323846264338327950288419716939937510")
    assert noise.PIO2_HI == float(pi / 2) and noise.PIO2_LO == float(pi / 2 - Fraction(noise.PIO2_HI))
    # the header holds the same literals (written as Python's float.hex prints them)
    header = (CSRC / "jk_noise.h").read_text()
    for v in (*noise.LG, *noise.S, *noise.C, noise.LN2_HI, noise.LN2_LO, noise.PIO2_HI, noise.PIO2_LO,
              noise.PIO2_HH, noise.PIO2_HL):
        assert v.hex().replace("p+", "p") in header, v.hex()


# ------------------------------------------------------------------------------------------------------------------
# Bit-identity across backends, splits and threads

ranges = st.one_of(
    st.tuples(st.integers(0, 64), st.integers(0, 300)),
    st.tuples(st.integers(0, 2 ** 63), st.integers(0, 3000)),
    # ranges that end at the top of the 64-bit counter (start itself stays below 2^64, also when n = 0)
    st.integers(0, 3000).flatmap(lambda n: st.tuples(st.integers(2 ** 64 - n - 3, 2 ** 64 - max(n, 1)), st.just(n))),
)
keys = st.tuples(st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 32 - 1))


@given(key=keys, rng=ranges)
def test_backends_give_identical_bits(cxx, key, rng):
    (seed, rnd, leaf), (start, n) = key, rng
    ref = noise.gaussian(seed, rnd, leaf, start, n)
    assert ref.dtype == np.float64 and ref.shape == (n,) and np.isfinite(ref).all()
    np.testing.assert_array_equal(bits(cxx_gaussian(cxx, seed, rnd, leaf, start, n)), bits(ref))
    np.testing.assert_array_equal(bits(cxx_gaussian(cxx, seed, rnd, leaf, start, n, pairs=True)), bits(ref))
    if HAS_NUMBA:
        np.testing.assert_array_equal(bits(noise.gaussian_numba(seed, rnd, leaf, start, n)), bits(ref))


@given(key=keys, start=st.integers(0, 2 ** 40), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_splitting_the_range_gives_identical_bits(key, start, cuts):
    seed, rnd, leaf = key
    edges = sorted({0, 5000, *cuts})
    whole = noise.gaussian(seed, rnd, leaf, start, 5000)
    pieces = [noise.gaussian(seed, rnd, leaf, start + a, b - a) for a, b in zip(edges, edges[1:])]
    np.testing.assert_array_equal(bits(np.concatenate(pieces)), bits(whole))
    if HAS_NUMBA:
        out = np.empty(5000)
        for a, b in zip(edges, edges[1:]):
            noise.gaussian_numba(seed, rnd, leaf, start + a, b - a, out[a:b])
        np.testing.assert_array_equal(bits(out), bits(whole))


def test_reference_chunking_does_not_change_bits(monkeypatch):
    whole = noise.gaussian(7, 1, 2, 3, 1001)
    monkeypatch.setattr(noise, "_CHUNK", 7)  # odd, so chunks start on both parities
    np.testing.assert_array_equal(bits(noise.gaussian(7, 1, 2, 3, 1001)), bits(whole))


@needs_numba
def test_numba_thread_count_does_not_change_bits():
    import numba
    n, start = 300_001, 12_345_677  # odd start and length: half blocks at both ends, many work items
    old = jk.get_num_threads()
    try:
        got = {}
        for t in (1, 2):
            jk.set_num_threads(t)
            before = numba.get_num_threads()
            got[t] = noise.gaussian_numba(99, 3, 4, start, n)
            assert numba.get_num_threads() == before  # (ran on min(t, numba's pool), then put back)
        np.testing.assert_array_equal(bits(got[1]), bits(got[2]))
        np.testing.assert_array_equal(bits(got[1]), bits(noise.gaussian(99, 3, 4, start, n)))
    finally:
        jk.set_num_threads(old)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(key=keys, start=st.integers(0, 2 ** 62), n=st.integers(0, 3000),
       sigma=st.floats(0, 1e3, allow_nan=False, allow_infinity=False))
def test_add_noise_rounds_the_same_on_every_backend(dtype, key, start, n, sigma):
    seed, rnd, leaf = key
    x = np.random.default_rng(n).standard_normal(n).astype(dtype)
    want = x + (sigma * noise.gaussian(seed, rnd, leaf, start, n)).astype(dtype)  # out + T(sigma * z), in T
    for backend in ("numpy", "numba") if HAS_NUMBA else ("numpy",):
        got = noise.add_noise(x.copy(), sigma, seed, rnd, leaf, start, backend=backend)
        assert got.dtype == dtype
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_bad_arguments_are_rejected_alike():
    bad = [((-1, 0, 0, 0, 1), ValueError), ((2 ** 64, 0, 0, 0, 1), ValueError), ((0, 2 ** 32, 0, 0, 1), ValueError),
           ((0, 0, -1, 0, 1), ValueError), ((0, 0, 0, 2 ** 64 - 1, 2), ValueError), ((0, 0, 0, 0, -1), ValueError),
           ((1.5, 0, 0, 0, 1), TypeError)]
    fns = [noise.gaussian] + ([noise.gaussian_numba] if HAS_NUMBA else [])
    for args, exc in bad:
        for f in fns:
            with pytest.raises(exc):
                f(*args)
    assert noise.gaussian(0, 0, 0, 2 ** 64 - 1, 1).shape == (1,)  # the very last element is fine
    with pytest.raises(TypeError):
        noise.add_noise(np.zeros(4, np.int32), 1.0, 0, 0, 0)
    with pytest.raises(ValueError):
        noise.add_noise(np.zeros((2, 2)), 1.0, 0, 0, 0)
    for s in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            noise.add_noise(np.zeros(4), s, 0, 0, 0)
    with pytest.raises(ValueError):
        noise.add_noise(np.zeros(4), 1.0, 0, 0, 0, backend="cupy")


def test_new_seed_is_a_fresh_64_bit_int():
    a, b = noise.new_seed(), noise.new_seed()
    assert isinstance(a, int) and 0 <= a < 2 ** 64 and a != b


# ------------------------------------------------------------------------------------------------------------------
# Accuracy of jk_log and sin/cos(2 pi u); the same bits in C++ and numba

def _ulps(got, ref_ld):
    """|got - ref| in units of the float64 spacing at ref (ref in long double)."""
    sp = np.spacing(np.abs(ref_ld.astype(np.float64))).astype(np.longdouble)
    return (np.abs(got.astype(np.longdouble) - ref_ld) / sp).astype(np.float64)


long_double = pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63, reason="needs an 80-bit (or wider) long double")


def _log_args(m=200_000):
    rng = np.random.default_rng(1)
    lattice = (rng.integers(0, 2 ** 53, m, dtype=np.uint64) + np.uint64(1)).astype(np.float64) * 2.0 ** -53
    return np.concatenate([lattice, 2.0 ** rng.uniform(-1022, 1023, m), 1 + rng.uniform(-1e-6, 1e-6, m),
                           2.0 ** -np.arange(54.0), [np.sqrt(0.5), np.sqrt(2.0), np.nextafter(1, 0), 1.0]])


def _turns(m=200_000):
    rng = np.random.default_rng(2)
    lattice = rng.integers(0, 2 ** 53, m, dtype=np.uint64).astype(np.float64) * 2.0 ** -53
    near = np.repeat(np.arange(9) / 8.0, m // 40) + rng.uniform(-1e-9, 1e-9, 9 * (m // 40))  # octant edges, zeros
    return np.concatenate([lattice, near, rng.uniform(-1e6, 1e6, m), np.arange(9) / 8.0, [2.0 ** -1074, 1e-300]])


@long_double
def test_log_is_within_one_ulp():
    x = _log_args()
    got = noise.jk_log(x)
    err = _ulps(got, np.log(x.astype(np.longdouble)))
    assert err.max() < 1.0, err.max()  # measured 0.82 ulp
    assert got[-1] == 0.0 and not np.signbit(got[-1])
    vs_numpy = np.abs(got - np.log(x)) / np.spacing(np.abs(np.log(x)))
    assert vs_numpy[x != 1].max() <= 1.0  # both faithful: they differ by at most one ulp


@long_double
def test_sincos_2pi_is_within_one_ulp():
    u = _turns()
    s, c = noise.sincos_2pi(u)
    # reference: the same exact reduction in turns, then long double sin/cos of r * pi/2 (|error| ~ 2^-64)
    pi = np.longdouble("3.14159265358979323846264338327950288")
    t = 4 * u.astype(np.longdouble)
    q = np.rint(t)
    th = (t - q) * (pi / 2)
    n = q.astype(np.int64) & 3
    sn, cs = np.sin(th), np.cos(th)
    ref_s, ref_c = np.choose(n, [sn, cs, -sn, -cs]), np.choose(n, [cs, -sn, -cs, sn])
    assert _ulps(s, ref_s).max() < 1.0 and _ulps(c, ref_c).max() < 1.0  # measured 0.79 / 0.78 ulp
    s4, c4 = noise.sincos_2pi(np.arange(5) / 4.0)  # whole quarter turns are exact
    assert np.array_equal(s4, [0, 1, 0, -1, 0]) and np.array_equal(c4, [1, 0, -1, 0, 1])


def test_log_and_sincos_bits_in_cxx(cxx):
    x, u = _log_args(), _turns()
    y = np.empty_like(x)
    cxx.jkn_log(_ptr(x), _ptr(y), x.size)
    np.testing.assert_array_equal(bits(y), bits(noise.jk_log(x)))
    s, c = np.empty_like(u), np.empty_like(u)
    cxx.jkn_sincos(_ptr(u), _ptr(s), _ptr(c), u.size)
    rs, rc = noise.sincos_2pi(u)
    np.testing.assert_array_equal(bits(s), bits(rs))
    np.testing.assert_array_equal(bits(c), bits(rc))


@needs_numba
def test_log_and_sincos_bits_in_numba():
    from numba import njit

    @njit
    def run(x, u, y, s, c):
        for j in range(x.size):
            y[j] = noise._log_nb(x[j])
        for j in range(u.size):
            s[j], c[j] = noise._sincos_nb(u[j])

    x, u = _log_args(20_000), _turns(20_000)
    y, s, c = np.empty_like(x), np.empty_like(u), np.empty_like(u)
    run(x, u, y, s, c)
    rs, rc = noise.sincos_2pi(u)
    np.testing.assert_array_equal(bits(y), bits(noise.jk_log(x)))
    np.testing.assert_array_equal(bits(s), bits(rs))
    np.testing.assert_array_equal(bits(c), bits(rc))


# ------------------------------------------------------------------------------------------------------------------
# Statistics: tolerances are 6 standard errors (fixed seeds, so the test is deterministic; 6 sigma keeps it from
# depending on which seed was picked)

N_STAT = 1_000_000


@pytest.fixture(scope="module")
def sample():
    f = noise.gaussian_numba if HAS_NUMBA else noise.gaussian
    return f(0x5EED_1234_ABCD_0001, 7, 3, 1, N_STAT)


def _normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2.0)))


def _ks_pvalue(d, n):
    """Asymptotic Kolmogorov distribution: P(sqrt(n) D > x) = 2 sum_k (-1)^(k-1) exp(-2 k^2 x^2)."""
    x = d * math.sqrt(n)
    return min(1.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * x * x) for k in range(1, 101)))


def test_moments(sample):
    n = sample.size
    assert abs(sample.mean()) < 6 / math.sqrt(n)
    assert abs(sample.var() - 1) < 6 * math.sqrt(2 / n)  # Var(z^2) = 2
    assert abs(np.mean(sample ** 4) - 3) < 6 * math.sqrt(96 / n)  # Var(z^4) = 105 - 9
    assert abs(np.mean(sample ** 3)) < 6 * math.sqrt(15 / n)
    for t in (2.0, 3.0, 4.0):  # two-sided tail frequency, binomial standard error
        p = math.erfc(t / math.sqrt(2))
        assert abs(np.mean(np.abs(sample) > t) - p) < 6 * math.sqrt(p * (1 - p) / n) + 1 / n, t
    assert np.abs(sample).max() < math.sqrt(-2 * math.log(2.0 ** -53))  # the bound the (0, 1] uniform gives


def test_kolmogorov_smirnov(sample):
    x = np.sort(sample)
    cdf = _normal_cdf(x)
    n = x.size
    d = max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n))
    assert _ks_pvalue(d, n) > 1e-4, d


def test_pairs_and_streams_are_uncorrelated(sample):
    # the cosine and sine halves of each Box-Muller pair are independent normals
    bound = 6 / math.sqrt(sample.size // 2)
    assert abs(np.corrcoef(sample[1:-1:2], sample[2::2])[0, 1]) < bound
    assert abs(np.corrcoef(sample[:-1], sample[1:])[0, 1]) < 6 / math.sqrt(sample.size)
    # streams of neighbouring seeds, rounds and leaves, and shifted windows of one stream
    n = 200_000
    f = noise.gaussian_numba if HAS_NUMBA else noise.gaussian
    streams = [f(*key, 0, n) for key in [(1, 0, 0), (2, 0, 0), (1, 1, 0), (1, 0, 1), (1 << 32, 0, 0), (1, 1, 1)]]
    streams.append(f(1, 0, 0, 1, n))  # the same stream one element on
    streams.append(f(1, 0, 0, 2, n))  # ... and one block on
    r = np.corrcoef(np.stack(streams))
    off = r[~np.eye(len(streams), dtype=bool)]
    assert np.abs(off).max() < 6 / math.sqrt(n), np.abs(off).max()
    for i in range(len(streams)):
        for j in range(i):
            assert np.count_nonzero(streams[i] == streams[j]) <= 2  # distinct doubles: equal only by chance


# ------------------------------------------------------------------------------------------------------------------
# CUDA: the header compiles for the device, with separate roundings (no FMA)

KERNEL = r"""
__global__ void jk_noise_fill(double* out, unsigned long long seed, unsigned int round, unsigned int leaf,
                              unsigned long long start, unsigned long long n) {
  const unsigned long long j = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  if (j < n) out[j] = jk::gaussian(seed, round, leaf, start + j);
}
__global__ void jk_noise_add(float* out, double sigma, unsigned long long seed, unsigned int round,
                             unsigned int leaf, unsigned long long start, unsigned long long n) {
  const unsigned long long c = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x + (start >> 1);
  double z[2];
  jk::gaussian_pair(seed, round, leaf, c, &z[0], &z[1]);
  for (int e = 0; e < 2; ++e) {
    const unsigned long long i = 2 * c + e;
    if (i >= start && i - start < n) out[i - start] = out[i - start] + (float)(sigma * z[e]);
  }
}
"""


def _assert_no_contraction(ptx: str):
    assert "fma.rn.f64" not in ptx and "mad.f64" not in ptx
    for op in ("mul", "add", "sub"):  # without .rn, ptxas may fuse a mul and an add itself
        assert f"{op}.f64" not in ptx, op
    assert "mul.rn.f64" in ptx and "div.rn.f64" in ptx and "sqrt.rn.f64" in ptx


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_header_compiles_with_nvcc_without_fma(tmp_path):
    src = tmp_path / "noise.cu"
    src.write_text('#include "jk_noise.h"\n' + KERNEL)
    base = [NVCC, "-std=c++17", "--fmad=false", "-arch=sm_80", f"-I{CSRC}", "-Werror", "all-warnings"]
    out = subprocess.run([*base, "-c", str(src), "-o", str(tmp_path / "noise.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*base, "-ptx", str(src), "-o", str(tmp_path / "noise.ptx")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    _assert_no_contraction((tmp_path / "noise.ptx").read_text())


def test_header_compiles_with_nvrtc_without_fma(nvrtc):
    """NVRTC sees one self-contained text (no <stdint.h>, no relative includes), as the GPU backend builds it."""
    ptx, _ = nvrtc.compile_nvrtc("compute_80", text=nvrtc.header_source("jk_noise.h") + KERNEL)
    _assert_no_contraction(ptx.decode(errors="replace"))
