"""Secure-aggregation sums (jitkernels/secagg.py, csrc/jk_secagg.h).

* modsum: numpy (the reference) == numba == C++ (g++ -O2, via ctypes) bit for bit, for random k (0 included), lengths
  (0 and 1 included), b in {8, 16, 20, 32}, uint32 / int32 / int64 / uint64 inputs with values near 2^b - 1 (so the
  sum wraps), uint32 and uint64 accumulators, one leaf or several, work items cut small; and both equal exact
  Python-integer arithmetic.
* SecAggSum: any permutation of the parties and any split into partial sums merged in any tree give the same bits;
  wrong length / dtype / leaves, duplicate parties and values outside [0, 2^b) raise typed errors that name the
  party, and leave the state bit-identical (the fused range check rolls the batch back); save/load round trips,
  and an altered or truncated file raises CorruptState.
* quantize / dequantize against Flower's own functions: bit for bit with the same uniforms (float64 inputs), the
  server's dequantization lines bit for bit, stochastic rounding unbiased; Flower's float32 bias and int32
  overflow shown.
* End to end: k parties quantize, mask pairwise (and privately) mod 2^b; the server sums with SecAggSum, unmasks,
  dequantizes: the average within the stated bound, and equal to Flower's server helpers on the same masked inputs.
* The header compiles for CUDA (nvcc -arch=sm_80; NVRTC when cuda-bindings is installed).
"""

import contextlib
import ctypes
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels import secagg as sa

CSRC = Path(__file__).resolve().parents[1] / "csrc"
GXX = shutil.which("g++")
NVCC = shutil.which("nvcc")
HAS_NUMBA = sa.numba_available() is True
BACKENDS = ["numpy"] + (["numba"] if HAS_NUMBA else []) + (["cpp"] if sa._default_backend() == "cpp" else [])
BITS = (8, 16, 20, 32)
IN_DTYPES = (np.uint32, np.int32, np.int64, np.uint64)

flwr_quant = pytest.importorskip("flwr.common.secure_aggregation.quantization")
flwr_arith = pytest.importorskip("flwr.common.secure_aggregation.ndarrays_arithmetic")


@contextlib.contextmanager
def chunk(n):
    """Cut work items small, so that small vectors span several items (and several threads)."""
    old, sa.CHUNK = sa.CHUNK, n
    try:
        yield
    finally:
        sa.CHUNK = old


def near_max(rng, n, bits, dtype):
    """Values in [0, 2^b) (in range for dtype), half of them within 16 of the top, so that sums wrap."""
    hi = (1 << min(bits, 31)) if np.dtype(dtype) == np.int32 else (1 << bits)
    v = rng.integers(0, hi, n, dtype=np.uint64)
    top = rng.random(n) < 0.5
    v[top] = hi - 1 - rng.integers(0, min(16, hi), int(top.sum()), dtype=np.uint64)
    return v.astype(dtype)


def exact(acc, updates, bits, subtract=False):
    """Python integers: the math, independent of any backend."""
    m = 1 << bits
    tot = [int(x) for x in acc]
    for u in updates:
        flat = np.concatenate([np.asarray(a).reshape(-1) for a in u]) if isinstance(u, list) else u.reshape(-1)
        for i, x in enumerate(flat.tolist()):
            tot[i] = tot[i] - (x % 2 ** 32) if subtract else tot[i] + (x % 2 ** 32)
    return [t % m for t in tot]


@st.composite
def batches(draw, max_k=5, max_n=300):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    bits = draw(st.sampled_from(BITS))
    k = draw(st.integers(0, max_k))
    n = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, max_n)))
    acc_dtype = draw(st.sampled_from(["uint32", "uint64"]))
    # (one dtype for all, half the time: the kernels take four updates of one input kind in one loop)
    dts = [draw(st.sampled_from(IN_DTYPES)) for _ in range(k)] if draw(st.booleans()) else \
        [draw(st.sampled_from(IN_DTYPES))] * k
    split = draw(st.booleans()) and n > 0
    rng = np.random.default_rng(seed)
    sizes = [n]
    if split:  # several leaves (Flower's list of arrays), zero-size ones included
        cuts = np.sort(rng.integers(0, n + 1, draw(st.integers(1, 3))))
        sizes = np.diff(np.concatenate([[0], cuts, [n]])).tolist()
    ups = []
    for dt in dts:
        flat = near_max(rng, n, bits, dt)
        if split and rng.random() < 0.7:
            parts, o = [], 0
            for s in sizes:
                parts.append(flat[o:o + s].copy())
                o += s
            ups.append(parts)
        else:
            ups.append(flat)
    acc0 = near_max(rng, n, bits, np.uint32).astype(acc_dtype)
    return bits, sizes, acc0, ups


# ------------------------------------------------------------------------------------------------------------------
# C++: a tiny extern "C" wrapper of jk_secagg.h, loaded with ctypes

WRAPPER = r"""
#include "jk_secagg.h"
extern "C" {
void jks_modsum_u32(uint32_t* acc, const long long* off, const long long* ptr, const long long* code,
                    const long long* work, long long m, long long k, int bits, int subtract, uint8_t* bad,
                    int nthreads) {
  jk::modsum_rows<uint32_t>(acc, off, ptr, code, work, m, k, bits, subtract != 0, bad, nthreads);
}
void jks_modsum_u64(unsigned long long* acc, const long long* off, const long long* ptr, const long long* code,
                    const long long* work, long long m, long long k, int bits, int subtract, uint8_t* bad,
                    int nthreads) {
  jk::modsum_rows<unsigned long long>(acc, off, ptr, code, work, m, k, bits, subtract != 0, bad, nthreads);
}
}
"""


@pytest.fixture(scope="session")
def cxx(tmp_path_factory):
    if GXX is None:
        pytest.skip("g++ is not on PATH")
    d = tmp_path_factory.mktemp("jk_secagg")
    (d / "wrap.cpp").write_text(WRAPPER)
    so = d / "libjks.so"
    cmd = [GXX, "-std=c++17", "-O2", "-fopenmp", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{CSRC}",
           str(d / "wrap.cpp"), "-o", str(so)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lib = ctypes.CDLL(str(so))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
    for f in (lib.jks_modsum_u32, lib.jks_modsum_u64):
        f.argtypes = [p, p, p, p, p, i64, i64, i32, i32, p, i32]
        f.restype = None
    return lib


def cxx_modsum(lib, acc, sizes, ups, bits, subtract=False, nthreads=2):
    """The C++ loop over the same address tables the numba kernel reads; returns bad[k]."""
    plan = sa._Plan(sizes)
    leaves = [sa._leaves_of(u, plan, "") for u in ups]
    ptr, code = sa._tables(leaves, plan)
    work = np.ascontiguousarray(plan.work)
    k = len(ups)
    bad = np.zeros((work.shape[0], k), np.uint8)
    f = lib.jks_modsum_u32 if acc.dtype == np.uint32 else lib.jks_modsum_u64
    c = lambda a: a.ctypes.data if a.size else None  # noqa: E731
    f(c(acc), c(plan.offsets), c(np.ascontiguousarray(ptr)), c(np.ascontiguousarray(code)), c(work),
      work.shape[0], k, bits, int(subtract), c(bad), nthreads)
    return bad.any(axis=0) if work.shape[0] else np.zeros(k, bool)


# ------------------------------------------------------------------------------------------------------------------
# modsum: every backend == the reference == exact integers

@given(batches(), st.booleans())
def test_modsum_backends_bit_identical(batch, subtract):
    bits, sizes, acc0, ups = batch
    want = exact(acc0, ups, bits, subtract)
    with chunk(64):
        for b in BACKENDS:
            acc = acc0.copy()
            assert sa.modsum(acc, ups, bits, subtract=subtract, backend=b) is acc
            assert acc.dtype == acc0.dtype
            assert acc.tolist() == want, b


@given(batches(max_k=9, max_n=400), st.booleans())
def test_modsum_cxx_bit_identical(cxx, batch, subtract):
    bits, sizes, acc0, ups = batch
    acc_np = sa.modsum(acc0.copy(), ups, bits, subtract=subtract, backend="numpy")
    for ch in (64, sa.CHUNK):
        with chunk(ch):
            acc = acc0.copy()
            bad = cxx_modsum(cxx, acc, sizes, ups, bits, subtract)
            assert acc.tobytes() == acc_np.tobytes()
            assert not bad.any()  # every generated value is in range


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt", IN_DTYPES)
def test_range_flags_agree_across_backends(cxx, backend, dt):
    """The fused range check: numpy reference, numba and C++ flag the same updates (value >= 2^b, or < 0)."""
    bits, n = 20, 300
    rng = np.random.default_rng(1)
    ups = [near_max(rng, n, bits, dt) for _ in range(4)]
    big = np.iinfo(dt).max if np.dtype(dt).kind == "u" else (1 << bits)
    ups[1][137] = big
    if np.dtype(dt).kind == "i":
        ups[3][0] = -1
    want = [False, True, False, np.dtype(dt).kind == "i"]
    plan = sa._Plan([n])
    leaves = [sa._leaves_of(u, plan, "") for u in ups]
    with chunk(64):
        plan = sa._Plan([n])
        assert sa._run(np.zeros(n, np.uint32), plan, leaves, bits, False, backend).tolist() == want
        assert cxx_modsum(cxx, np.zeros(n, np.uint32), [n], ups, bits).tolist() == want


def test_int64_inputs_count_mod_2_32():
    """int64 inputs (Flower's masked vectors) are taken mod 2^32: their low word, negatives included."""
    u = np.array([2 ** 32 + 5, -1, 2 ** 40 + 2 ** 32 - 1, 7], np.int64)
    for b in BACKENDS:
        acc = np.zeros(4, np.uint32)
        sa.modsum(acc, [u], 32, backend=b)
        assert acc.tolist() == [5, 2 ** 32 - 1, 2 ** 32 - 1, 7]
        acc = np.zeros(4, np.uint64)
        sa.modsum(acc, [u, u], 8, backend=b)
        assert acc.tolist() == [10, 254, 254, 14]


def test_modsum_rejects_bad_arguments():
    acc = np.zeros(4, np.uint32)
    with pytest.raises(ValueError, match="modulus_bits"):
        sa.modsum(acc, [np.zeros(4, np.uint32)], 33)
    with pytest.raises(TypeError, match="uint32 or uint64"):
        sa.modsum(np.zeros(4, np.int64), [np.zeros(4, np.uint32)], 32)
    with pytest.raises(jk.LayoutMismatch, match="update 1"):
        sa.modsum(acc, [np.zeros(4, np.uint32), np.zeros(3, np.uint32)], 32)
    with pytest.raises(jk.LayoutMismatch, match="dtype float32"):
        sa.modsum(acc, [np.zeros(4, np.float32)], 32)
    with pytest.raises(jk.LayoutMismatch, match="C-contiguous"):
        sa.modsum(acc, [np.zeros(8, np.uint32)[::2]], 32)
    with pytest.raises(ValueError, match="backend"):
        sa.modsum(acc, [], 32, backend="tpu")
    from jitkernels.backends import cupy_backend
    if cupy_backend.available() is not True:
        with pytest.raises(jk.BackendUnavailable, match="cupy"):
            sa.modsum(acc, [], 32, backend="cupy")
    else:
        with pytest.raises(TypeError, match="host memory but the backend is 'cupy'"):
            sa.modsum(acc, [], 32, backend="cupy")


@pytest.mark.skipif(not HAS_NUMBA, reason="numba not importable")
def test_numba_thread_count_does_not_change_bits():
    rng = np.random.default_rng(3)
    n, k = 300_000, 4  # above SMALL_CALL: the pool runs
    ups = [near_max(rng, n, 20, np.uint32) for _ in range(k)]
    outs = []
    for t in (1, 2, 3):
        old = jk.set_num_threads(t)
        try:
            with chunk(4096):
                outs.append(sa.modsum(np.zeros(n, np.uint32), ups, 20, backend="numba").tobytes())
        finally:
            jk.set_num_threads(old)
    assert outs[0] == outs[1] == outs[2]
    assert outs[0] == sa.modsum(np.zeros(n, np.uint32), ups, 20, backend="numpy").tobytes()


# ------------------------------------------------------------------------------------------------------------------
# SecAggSum: order, splits, merges

@given(batches(max_k=6, max_n=200), st.integers(0, 2 ** 32 - 1), st.sampled_from(BACKENDS))
def test_permutation_and_split_merge_invariance(batch, seed, backend):
    bits, sizes, acc0, ups = batch
    rng = np.random.default_rng(seed)
    parties = [f"p{j}" for j in range(len(ups))]
    with chunk(64):
        one = sa.SecAggSum(sizes, bits, acc_dtype=acc0.dtype.name, backend=backend)
        one.fold_many(ups, parties)
        # one by one, in a random order
        perm = rng.permutation(len(ups)).tolist()
        seq = sa.SecAggSum(sizes, bits, acc_dtype=acc0.dtype.name, backend=backend)
        for j in perm:
            seq.fold(ups[j], parties[j])
        # random groups folded into partial states, merged in a random tree
        groups = {}
        for j in perm:
            groups.setdefault(int(rng.integers(0, 3)), []).append(j)
        states = []
        for g in groups.values():
            s = sa.SecAggSum(sizes, bits, acc_dtype=acc0.dtype.name, backend=backend)
            s.fold_many([ups[j] for j in g], [parties[j] for j in g])
            states.append(s)
        states.append(sa.SecAggSum(sizes, bits, acc_dtype=acc0.dtype.name, backend=backend))  # an empty one
        while len(states) > 1:
            i, j = sorted(rng.choice(len(states), 2, replace=False).tolist())
            b_ = states.pop(j)
            a_ = states.pop(i)
            states.append(a_.merge(b_) if rng.random() < 0.5 else b_.merge(a_))
        merged = states[0]
    want = exact(np.zeros(sum(sizes), np.uint64), ups, bits)
    for s in (one, seq, merged):
        assert s.result().tolist() == want
        assert s.result().tobytes() == one.result().tobytes()
        assert sorted(s.parties) == sorted(parties)
    assert [x.tolist() for x in one.leaves()] == [x.tolist() for x in np.split(np.array(want, dtype=np.int64),
                                                                                np.cumsum(sizes)[:-1])]


def test_merge_refuses_shared_parties_and_mismatches():
    a, b = sa.SecAggSum(3, 16), sa.SecAggSum(3, 16)
    a.fold(np.array([1, 2, 3], np.uint32), "x")
    b.fold(np.array([1, 2, 3], np.uint32), "x")
    before = a.copy()
    with pytest.raises(jk.OverlappingParties, match="'x'"):
        a.merge_into(b)
    assert a.same_bits(before)
    with pytest.raises(jk.IncompatibleStates):
        a.merge(sa.SecAggSum(3, 20))
    with pytest.raises(jk.IncompatibleStates):
        a.merge(sa.SecAggSum(3, 16, acc_dtype="uint64"))
    with pytest.raises(jk.IncompatibleStates):
        a.merge(sa.SecAggSum([1, 2], 16))


# ------------------------------------------------------------------------------------------------------------------
# SecAggSum: rejections name the party and leave the state bit-identical

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("acc_dtype", ["uint32", "uint64"])
def test_rejections_name_the_party_and_leave_state_untouched(backend, acc_dtype):
    rng = np.random.default_rng(7)
    bits, sizes = 20, [5, 0, 300]
    n = sum(sizes)
    s = sa.SecAggSum(sizes, bits, acc_dtype=acc_dtype, backend=backend)
    s.fold_many([near_max(rng, n, bits, np.uint32) for _ in range(3)], ["a", "b", "c"])
    good = near_max(rng, n, bits, np.int64)

    def rejected(exc, match, updates, parties):
        before = s.copy()
        with chunk(64), pytest.raises(exc, match=match) as e:
            s.fold_many(updates, parties)
        assert s.same_bits(before), "a rejected batch changed the state"
        return e.value

    e = rejected(jk.LayoutMismatch, "party 'bad'", [good, good[:-1]], ["ok", "bad"])
    assert e.party == "bad"
    rejected(jk.LayoutMismatch, "party 'bad'.*float64", [good, good.astype(np.float64)], ["ok", "bad"])
    # off its elements' alignment (a view at an odd byte offset): C++ read it through typed pointers (UBSan)
    off = np.frombuffer(np.zeros(good.nbytes + 1, np.uint8).data, good.dtype, good.size, offset=1)
    rejected(jk.LayoutMismatch, "party 'bad'.*not C-contiguous and aligned", [good, off], ["ok", "bad"])
    rejected(jk.LayoutMismatch, "party 'bad'.*has 2 arrays", [[good[:5], good[5:]]], ["bad"])
    e = rejected(jk.LayoutMismatch, "party 'bad', leaf '2'", [[good[:5], good[5:5], good[5:-1]]], ["bad"])
    assert e.leaf == "2"
    # the sum's own accumulator as an update, with a value out of range in the batch: the add changed it, and the
    # rollback subtracted other values (a rejected batch left the state changed)
    bad = good.astype(np.uint32)
    bad[7] = 1 << bits
    e = rejected(jk.LayoutMismatch, "party 'self', leaf '0'.*shares memory", [s.acc, bad], ["self", "bad"])
    assert e.party == "self"
    rejected(jk.DuplicateParty, "'b' is already folded", [good], ["b"])
    rejected(jk.DuplicateParty, "'z' is already folded into this batch", [good, good], ["z", "z"])
    rejected(TypeError, "party ids", [good], [True])
    # values outside [0, 2^b): found by the fused pass after the sum was written, then rolled back exactly
    for bad_val, dt in ((1 << bits, np.uint32), (-1, np.int64), (2 ** 40, np.int64), (-3, np.int32)):
        bad = good.astype(dt)
        bad[123] = bad_val
        e = rejected(jk.ValueOutOfRange, f"party 'bad': leaf '2' holds 1 value.*first {bad_val} at index 118",
                     [good, [bad[:5], bad[5:5], bad[5:]], good.astype(np.uint32)], ["ok1", "bad", "ok2"])
        assert (e.party, e.leaf, e.value) == ("bad", "2", bad_val)
    assert s.parties == ("a", "b", "c")
    s.fold_many([good], ["ok"])  # and the state still works
    assert s.count == 4


def test_value_range_uses_the_dtype_value():
    """b = 32: uint32 can hold nothing out of range; int32 negatives and int64 >= 2^32 are out of range."""
    s = sa.SecAggSum(2, 32)
    s.fold(np.array([2 ** 32 - 1, 0], np.uint32), "u32")
    s.fold(np.array([2 ** 32 - 1, 2 ** 31 - 1], np.int64), "i64")
    with pytest.raises(jk.ValueOutOfRange, match="party 'neg'"):
        s.fold(np.array([0, -1], np.int32), "neg")
    with pytest.raises(jk.ValueOutOfRange, match="party 'wide'"):
        s.fold(np.array([2 ** 32, 0], np.int64), "wide")
    assert s.result().tolist() == [2 ** 32 - 2, 2 ** 31 - 1]


# ------------------------------------------------------------------------------------------------------------------
# Files

def test_save_load_round_trip_and_resume(tmp_path):
    rng = np.random.default_rng(11)
    sizes, bits = [1, 40, 7], 24
    ups = [near_max(rng, 48, bits, np.int64) for _ in range(5)]
    whole = sa.SecAggSum(sizes, bits)
    whole.fold_many(ups, [0, "one", 2, "three", 4])
    part = sa.SecAggSum(sizes, bits)
    part.fold_many(ups[:3], [0, "one", 2])
    part.save(tmp_path / "s.safetensors")
    back = sa.SecAggSum.load(tmp_path / "s.safetensors")
    assert back.same_bits(part) and back.parties == (0, "one", 2)
    back.fold_many(ups[3:], ["three", 4])
    assert back.same_bits(whole)
    raw = (tmp_path / "s.safetensors").read_bytes()
    hlen = int.from_bytes(raw[:8], "little")  # safetensors: a JSON header, then raw tensor bytes; no pickle
    assert raw[8:9] == b"{" and len(raw) == 8 + hlen + 48 * 4


def test_corrupted_or_foreign_files_raise_corrupt_state(tmp_path):
    s = sa.SecAggSum(64, 16)
    s.fold(np.arange(64, dtype=np.uint32), "a")
    raw = s.to_bytes()
    p = tmp_path / "s.safetensors"
    for name, data in (("flip", raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:]), ("truncate", raw[:-9]),
                       ("garbage", b"\x00" * 40)):
        p.write_bytes(data)
        with pytest.raises(jk.CorruptState):
            sa.SecAggSum.load(p)
    # a valid checksummed file of another kind, and one whose values exceed 2^b
    from jitkernels.state import checked_bytes
    p.write_bytes(checked_bytes({"acc": np.zeros(3, np.uint32)}, {"format": "something.else", "version": "1"}))
    with pytest.raises(jk.CorruptState, match="not a SecAggSum"):
        sa.SecAggSum.load(p)
    meta = dict(s._metadata(), sizes="[3]")
    p.write_bytes(checked_bytes({"acc": np.array([0, 1, 1 << 16], np.uint32)}, meta))
    with pytest.raises(jk.CorruptState, match="mod 2\\^16"):
        sa.SecAggSum.load(p)
    # sizes that claim 2^43 values (6 GB of work items were built before the length check), or wrap int64's sum
    for sizes in ([1 << 43], [1 << 62] * 4 + [3]):
        p.write_bytes(checked_bytes({"acc": np.zeros(3, np.uint32)}, dict(s._metadata(), sizes=str(sizes))))
        with pytest.raises(jk.CorruptState, match="do not add up"):
            sa.SecAggSum.load(p)
    # parties as a JSON str: its characters were read as parties ("abc": a, b and c)
    p.write_bytes(checked_bytes({"acc": np.zeros(3, np.uint32)}, dict(s._metadata(), sizes="[3]", parties='"abc"')))
    with pytest.raises(jk.CorruptState, match="parties are a str, not a list"):
        sa.SecAggSum.load(p)


# ------------------------------------------------------------------------------------------------------------------
# quantize / dequantize against Flower

C, T = 8.0, 2 ** 22  # Flower's SecAgg+ defaults (clipping_range, quantization_range)


def test_quantize_bit_identical_to_flower_with_the_same_uniforms():
    """Flower draws from numpy's global RandomState; a RandomState seeded the same gives ours the same uniforms."""
    rng = np.random.default_rng(5)
    arrays = [rng.normal(0, 4, (17, 3)), np.array(2.5), rng.uniform(-20, 20, 1000), np.array([C, -C, 0.0, 1e-9]),
              np.zeros(0)]
    for c, t in ((C, T), (1.0, 255), (0.5, 2 ** 31 - 1)):
        np.random.seed(1234)
        want = flwr_quant.quantize(arrays, c, t)
        got = sa.quantize(arrays, c, t, seed=np.random.RandomState(1234))
        for w, g, x in zip(want, got, arrays):
            assert g.dtype == np.uint32 and np.shape(g) == np.shape(w)
            # Flower's T + 1 where x' rounds above T at x >= c (capped at T here; see the next test)
            over = (np.clip(np.asarray(x, np.float64), -c, c) + c) * (t / (2 * c)) > t
            assert np.array_equal(np.where(over, np.minimum(np.asarray(w, np.int64), t), np.asarray(w, np.int64)),
                                  g.astype(np.int64))
            assert g.size == 0 or (g.min() >= 0 and g.max() <= t)


def test_quantize_is_unbiased_and_within_one_step():
    x = np.array([-C, -3.3, -1e-7, 0.0, 0.123456789, 5.5, C - 1e-6, C])
    pre = (np.clip(x, -C, C) + C) * (T / (2 * C))
    draws = np.stack([sa.quantize(x, C, T, seed=s) for s in range(4000)]).astype(np.float64)
    assert np.all(np.abs(draws - pre) < 1)
    assert np.all(np.abs(draws.mean(axis=0) - pre) < 5 * 0.5 / np.sqrt(4000))
    a = sa.quantize([x], C, T, seed=np.random.default_rng(9))
    assert np.array_equal(a[0], sa.quantize([x], C, T, seed=9)[0])  # a seed is a Generator's seed


def test_quantize_flower_hazards_fixed():
    # Flower computes x' in float32 for float32 updates: the stochastic rounding then targets a rounded x'
    # (here by 1/8 of a step: x + c in [8, 16) has float32 spacing 2^-20, times T / 2c = 2^18)
    x = np.full(20000, np.float32(5.000299))
    exact_pre = (float(x[0]) + C) * (T / (2 * C))  # x' of that float32 value, in float64
    np.random.seed(0)
    flower_mean = flwr_quant.quantize([x], C, T)[0].astype(np.float64).mean()
    ours_mean = sa.quantize([x], C, T, seed=0)[0].astype(np.float64).mean()
    sd = 0.5 / np.sqrt(x.size)
    assert abs(ours_mean - exact_pre) < 5 * sd
    assert abs(flower_mean - exact_pre) > 0.1  # biased by the float32 rounding of x' (0.125)
    # Flower casts ceil(x') to int32: T >= 2^31 corrupts the top of the range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy: "invalid value encountered in cast"
        big = flwr_quant.quantize([np.array([C])], C, 3 * 2 ** 30)[0]
    assert int(big[0]) == -2 ** 31
    assert int(sa.quantize([np.array([C])], C, 3 * 2 ** 30, seed=0)[0][0]) == 3 * 2 ** 30
    with pytest.raises(jk.NonFiniteUpdate):
        sa.quantize([np.array([0.0, np.nan])], C, T)
    with pytest.raises(ValueError, match="target_range"):
        sa.quantize([np.zeros(2)], C, 2 ** 32)


def flower_server_dequantize(summed, k, q_total_ratio=None, c=C, t=T):
    """The last lines of flwr's SecAggPlusWorkflow.unmask_stage, verbatim but for names (they are inline there)."""
    aggregated_vector = flwr_quant.dequantize(summed, c, t)
    offset = -(k - 1) * c
    for vec in aggregated_vector:
        vec += offset
        if q_total_ratio is not None:
            vec *= t / q_total_ratio
    return aggregated_vector


@given(st.integers(0, 2 ** 32 - 1), st.integers(1, 50), st.booleans(), st.sampled_from([(C, T), (1.0, 255),
                                                                                        (3.0, 1000)]))
def test_dequantize_bit_identical_to_flower(seed, k, weighted, ct):
    c, t = ct
    rng = np.random.default_rng(seed)
    sums = [rng.integers(0, k * t + 1, n, dtype=np.int64) for n in (0, 1, 37)]
    sums[2][:2] = [0, k * t]
    q = int(rng.integers(1, k * t + 1)) if weighted else None
    want = flower_server_dequantize([s.copy() for s in sums], k, np.int64(q) if weighted else None, c, t)
    for dt in (np.int64, np.uint32):
        got = sa.dequantize([s.astype(dt) for s in sums], c, t, k, q_total_ratio=q)
        for w, g in zip(want, got):
            assert g.dtype == np.float64 and g.tobytes() == w.tobytes()


def test_dequantize_refuses_more_parties_than_sum_without_wrapping_and_masks_that_did_not_cancel():
    """A wrapped sum lies in [0, kT] like a true one: 1100 parties at T = 2^22 summed mod 2^32 dequantized to -6.99
    for a mean of 7.9, unflagged (the value check this test once made could only see masks that did not cancel)."""
    assert sa.max_parties(T, 32) == 1023
    rng = np.random.default_rng(0)
    k, x = 1100, np.full(4, 7.9)
    q = [sa.quantize(x, C, T, seed=rng) for _ in range(k)]
    s = sa.modsum(np.zeros(4, np.uint32), q, 32)
    with pytest.raises(jk.ValueOutOfRange, match="1100 parties.*wrapped mod 2\\^32.*1023"):
        sa.dequantize(s, C, T, k)
    with pytest.raises(jk.ValueOutOfRange, match="at most 3 "):  # a smaller modulus allows fewer
        sa.dequantize(s, C, T, sa.max_parties(T, 24) + 1, modulus_bits=24)
    np.testing.assert_allclose(sa.dequantize(sa.modsum(np.zeros(4, np.uint32), q[:1023], 32), C, T, 1023) / 1023,
                               x, atol=2 * C / T)
    with pytest.raises(jk.ValueOutOfRange, match="masks did not cancel"):
        sa.dequantize([np.array([0, 3 * T + 1], np.uint32)], C, T, 3)
    assert sa.dequantize(np.array([3 * T], np.uint32), C, T, 3).tolist() == [3 * C]


def test_a_clipping_range_whose_quantizer_is_not_finite_is_refused():
    """c = 1e-310 made T / (2c) inf: 0 quantized to T and -c to NaN (cast to uint32 with a warning); c = 1e308 made
    2c inf (all zeros, then NaN), and c = 1e306 summed over 1000 parties an offset of -inf (a true sum gave NaN)."""
    for c in (1e-310, 1e308):
        with pytest.raises(ValueError, match="clipping_range"):
            sa.quantize(np.zeros(3), c, T)
        with pytest.raises(ValueError, match="clipping_range"):
            sa.dequantize(np.zeros(3, np.uint32), c, T, 1)
    sa.quantize(np.zeros(3), 1e306, T)  # one party's values form no k c
    with pytest.raises(ValueError, match="clipping_range"):
        sa.dequantize(np.zeros(3, np.uint32), 1e306, T, 1000)
    with pytest.raises(ValueError, match="clipping_range"):  # S 2c / T reaches 2 k c: a true 1.2e308 came out inf
        sa.dequantize(np.array([1024 * 2], np.uint32), 6e307, 1024, 2)


# ------------------------------------------------------------------------------------------------------------------
# End to end: SecAgg+ with Flower's data layout (a weighting factor, then the quantized leaves)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [32, 27])
def test_end_to_end_secagg_matches_flower(backend, bits):
    """k parties: weight factor q_ratio = round(n_j / max_weight * T), x_j * (q_ratio / T) quantized, private and
    pairwise masks added mod 2^b (pairwise ones cancel in the sum); 64-bit vectors on the wire, as Flower ships. The
    server: SecAggSum over the masked vectors, private masks subtracted (modsum, subtract=True), dequantized.

    Bound: each |q_j - x'_j| < 1, so the sum of the k weighted, clipped updates is within k * 2c/T, and the weighted
    average, divided by Q / T (Q = sum of q_ratio), within 2ck / Q per element (plus float64 rounding)."""
    rng = np.random.default_rng(bits)
    k, shapes, max_weight = 7, [(3, 40), (1,), (257,)], 1000.0
    M = 1 << bits
    assert k < sa.max_parties(T, bits)
    xs = [[rng.uniform(-C, C, s) for s in shapes] for _ in range(k)]
    ns = rng.integers(1, 1000, k)
    q_ratio = [round(n / max_weight * T) for n in ns]
    private = [[rng.integers(0, M, (1,), dtype=np.int64)] + [rng.integers(0, M, s, dtype=np.int64) for s in shapes]
               for _ in range(k)]
    pair = {(i, j): [rng.integers(0, M, (1,), dtype=np.int64)] + [rng.integers(0, M, s, dtype=np.int64)
                                                                  for s in shapes]
            for i in range(k) for j in range(i + 1, k)}
    masked = []
    for j in range(k):
        q = sa.quantize([x * (q_ratio[j] / T) for x in xs[j]], C, T, seed=100 + j)
        vec = [np.array([q_ratio[j]], np.int64)] + [a.astype(np.int64) for a in q]
        vec = flwr_arith.parameters_addition(vec, private[j])
        for (a, b), m in pair.items():
            if j == a:
                vec = flwr_arith.parameters_addition(vec, m)
            elif j == b:
                vec = flwr_arith.parameters_subtraction(vec, m)
        masked.append(flwr_arith.parameters_mod(vec, M))  # int64 in [0, 2^b), Flower's wire form

    # ours
    sizes = [1] + [int(np.prod(s)) for s in shapes]
    with chunk(64):
        s = sa.SecAggSum(sizes, bits, backend=backend)
        s.fold_many(masked[:4], [f"node{j}" for j in range(4)])
        late = sa.SecAggSum(sizes, bits, backend=backend)
        for j in range(4, k):
            late.fold(masked[j], f"node{j}")
        s.merge_into(late)
    total = sa.modsum(s.result(), private, bits, subtract=True, backend=backend)
    leaves = [total[o:o + n] for o, n in zip(np.cumsum([0] + sizes[:-1]), sizes)]
    Q = int(leaves[0][0])
    assert Q == sum(q_ratio)
    ours = sa.dequantize(leaves[1:], C, T, k, q_total_ratio=Q)

    # Flower's server helpers on the same masked vectors (collect_masked_vectors_stage, then unmask_stage)
    agg = None
    for vec in masked:
        agg = vec if agg is None else flwr_arith.parameters_addition(agg, vec)
    agg = flwr_arith.parameters_mod(agg, M)
    for p in private:
        agg = flwr_arith.parameters_subtraction(agg, p)
    agg = flwr_arith.parameters_mod(agg, M)
    q_total, agg = flwr_arith.factor_extract(agg)
    theirs = flower_server_dequantize(agg, k, q_total)

    weights = np.array(q_ratio) / T
    bound = 2 * C * k / Q + 1e-12 * k * C
    for i, shape in enumerate(shapes):
        want = sum(w * xs[j][i] for j, w in enumerate(weights)) / weights.sum()
        got = ours[i].reshape(shape)
        assert got.tobytes() == theirs[i].astype(np.float64).tobytes()
        assert np.abs(got - want).max() < bound, (np.abs(got - want).max(), bound)


def test_reset_starts_the_next_round_in_place():
    s = sa.SecAggSum(5, 16)
    s.fold(np.arange(5, dtype=np.uint32), party="a")
    acc = s.acc
    s.reset()
    assert s.acc is acc and not s.acc.any() and s.count == 0
    s.fold(np.ones(5, np.uint32), party="a")  # the same party again: a new round
    assert s.result().tolist() == [1] * 5


def test_quantize_stays_within_the_target_range_at_the_clip():
    """At x = +c, (x + c) * T / (2c) can round to just above T (c = 0.7, T = 2^32 - 1): ceil gave T + 1, which the
    uint32 cast wrapped to 0, the clipped maximum turned into the minimum."""
    from jitkernels.secagg import quantize

    for c, T in ((0.7, 2 ** 32 - 1), (1.3, 2 ** 32 - 1), (0.3, 176985557)):
        q = quantize(np.full(200_000, c), c, T, seed=0)
        assert q.min() >= T - 1 and q.max() == T


def test_quantize_caps_plus_c_at_the_target_range():
    """At x = +c, (2c) * (T / 2c) can round just above T: ceil made T + 1, which wraps to 0 at T = 2^32 - 1, for the
    uniforms above ceil - x' (one element in ~2 million at this c: a silent corruption of model-sized updates)."""
    T = 2 ** 32 - 1
    c = 3.1519396508141906
    assert (2 * c) * (T / (2 * c)) > T

    class Highest(np.random.RandomState):  # the uniforms that keep ceil(x'): the rare case, every time
        def random(self, size=None):
            return np.full(size, 1.0 - 2.0 ** -53)

    q = sa.quantize(np.full(1000, c), c, T, seed=Highest(0))
    assert q.dtype == np.uint32 and (q == T).all()


# --- contracts a mutation review found untested (2026-11-28); each test kills its mutant ----------------------------
@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
def test_a_negative_int32_value_is_out_of_range_at_32_bits(backend):
    """An int32 vector's sign counts at b = 32 too: -1 is outside [0, 2^32), on every backend."""
    s = sa.SecAggSum(4, 32, backend=backend)
    with pytest.raises(jk.ValueOutOfRange, match="first -1 at index 1"):
        s.fold(np.array([1, -1, 2, 3], np.int32), party="p")


def test_dequantize_refuses_no_parties_and_a_zero_ratio():
    with pytest.raises(ValueError, match="k"):
        sa.dequantize(np.array([0, 0], np.uint32), 1.0, 10, k=0)
    for ratio in (0, True):  # (True passed as a ratio of 1, where k=True was refused)
        with pytest.raises(ValueError, match="q_total_ratio"):
            sa.dequantize(np.array([0, 0], np.uint32), 1.0, 10, k=1, q_total_ratio=ratio)


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
def test_secagg_reads_array_subclasses_as_plain_arrays_and_refuses_masked_and_swapped_ones(backend):
    """An np.matrix stayed 2-D through reshape(-1): the leaves were sliced from its rows, every leaf past the first
    summed nothing (cpp, numba) or raised a bare ValueError (numpy), and the party counted. A masked array's masked
    words were summed; a big-endian uint32 was "not one of uint32, ...". The state is unchanged by the refusals."""
    y = np.arange(1, 9, dtype=np.uint32)
    s = sa.SecAggSum([3, 5], 32, backend=backend)
    s.fold(np.matrix(y), "p0")
    assert s.result().tolist() == y.tolist() and s.parties == ("p0",)
    with pytest.raises(jk.LayoutMismatch, match="masked"):
        s.fold(np.ma.masked_array(y, mask=[0] * 7 + [1]), "p1")
    with pytest.raises(jk.LayoutMismatch, match="byte-swapped"):
        s.fold(y.astype(">u4"), "p2")
    assert s.result().tolist() == y.tolist() and s.parties == ("p0",)
