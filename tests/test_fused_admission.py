"""A round's first batch of raw updates into an empty state is admitted and folded in one pass (C++): the same
bits as admission then fold, the same errors, and a rejected batch leaves the state as it was."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels.backends import cpp

from strategies import FLOAT_DTYPES, leaf_shapes, make_batch, make_update, seeds

pytestmark = pytest.mark.skipif(jk.available_backends()["cpp"] is not True, reason="the fused pass is C++")


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = cpp.fold_stats

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)
    monkeypatch.setattr(cpp, "fold_stats", spy)
    return calls


def _ups(rng, shapes, dtype, k):
    src = "float32" if dtype == "int8" else dtype
    return [make_update(rng, shapes, src, quantize=dtype == "int8", block=7) for _ in range(k)]


@given(seed=seeds, shapes=leaf_shapes(), dtype=st.sampled_from(FLOAT_DTYPES + ("int8",)),
       k=st.one_of(st.integers(1, 6), st.integers(17, 24)),  # few updates, and many (csrc/kernels.h for_blocks)
       with_base=st.booleans(), acc_dtype=st.sampled_from(["float32", "float64"]))
def test_fused_pass_gives_the_two_pass_bits(seed, shapes, dtype, k, with_base, acc_dtype):
    rng = np.random.default_rng(seed)
    ups = _ups(rng, shapes, dtype, k)
    src = "float32" if dtype == "int8" else dtype
    tmpl = make_update(rng, shapes, src)
    base = make_update(rng, shapes, src) if with_base else None
    ws = list(rng.uniform(0.5, 50, k))
    fused = jk.Aggregator(tmpl, backend="cpp", base=base, acc_dtype=acc_dtype)
    fused.fold_many(ups, ws, list(range(k)))
    two = jk.Aggregator(tmpl, backend="cpp", base=base, acc_dtype=acc_dtype)
    two.fold_many(two.admit_many(ups, ws, list(range(k))))
    assert fused.state.same_bits(two.state)


@given(seed=seeds, shapes=leaf_shapes(), dtype=st.sampled_from(FLOAT_DTYPES + ("int8",)), k=st.integers(1, 20),
       with_base=st.booleans(), n_bad=st.integers(0, 3))
def test_the_fused_kernel_without_norms_finds_what_the_stats_pass_finds(seed, shapes, dtype, k, with_base, n_bad):
    """fold_stats(norms=False) tests finiteness by sums of x - x instead of the sums of squares: the same non-finite
    counts and max |x| as the stats pass, sums of squares not formed (0), and the fold's bits."""
    rng = np.random.default_rng(seed)
    lay, groups, leaves = make_batch(rng, shapes, dtype, k)
    base = rng.standard_normal(lay.size).astype(np.float32) if with_base else None
    for g in groups.values():
        if g.in_dtype != "int8" and n_bad:  # NaN / inf at random places of random updates
            for _ in range(n_bad):
                r, j = int(rng.integers(len(g.leaf_ids))), int(rng.integers(k))
                a = leaves[j][int(g.leaf_ids[r])]
                if a is not None and a.size:
                    a.reshape(-1)[int(rng.integers(a.size))] = rng.choice([np.nan, np.inf, -np.inf])
        acc, want_acc = np.zeros(lay.size, np.float32), np.zeros(lay.size, np.float32)
        nf, ss, mx = cpp.fold_stats(acc, base, g, norms=False)
        want_nf, want_ss, want_mx = cpp.stats(base, g, "float32")
        cpp.fold(want_acc, base, g)
        assert np.array_equal(nf, want_nf) and np.array_equal(mx, want_mx) and not ss.any()
        if nf.any():  # a batch the aggregator refuses (and zeroes again): which NaN's bits it summed is not specified
            assert np.array_equal(acc, want_acc, equal_nan=True)
        else:
            assert acc.tobytes() == want_acc.tobytes()


def test_only_an_empty_state_takes_the_fused_pass(fused_calls):
    rng = np.random.default_rng(0)
    shapes = [(300,), (20, 7)]
    agg = jk.Aggregator(make_update(rng, shapes, "float32"), backend="cpp")
    agg.fold_many(_ups(rng, shapes, "float32", 3), parties=[0, 1, 2])
    assert len(fused_calls) == 1
    agg.fold_many(_ups(rng, shapes, "float32", 2), parties=[3, 4])  # not empty: admission, then the fold
    assert len(fused_calls) == 1
    agg.reset(reuse=True)
    agg.fold(_ups(rng, shapes, "float32", 1)[0], party=5)
    assert len(fused_calls) == 2
    dp = jk.Aggregator(make_update(rng, shapes, "float32"), jk.algorithms.DPFixedClipping(clip_norm=1.0,
                       noise_multiplier=0.0), backend="cpp", base=make_update(rng, shapes, "float32"))
    dp.fold_many(_ups(rng, shapes, "float32", 2), parties=[0, 1])  # clipping needs the norms before the fold
    assert len(fused_calls) == 2


@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
@pytest.mark.parametrize("with_base", [False, True])
def test_a_rejected_fused_batch_leaves_the_state_bit_identical(fused_calls, bad, with_base):
    rng = np.random.default_rng(1)
    shapes = [(5000,), (40, 30), ()]
    tmpl = make_update(rng, shapes, "float32")
    base = make_update(rng, shapes, "float32") if with_base else None
    agg = jk.Aggregator(tmpl, "fedadam" if with_base else "fedavg", backend="cpp", base=base)
    before = agg.state.copy()
    ups = _ups(rng, shapes, "float32", 4)
    ups[2]["l1"][7, 3] = {"nan": np.nan, "inf": -np.inf, "huge": 3e38}[bad]
    err = jk.ValueOutOfRange if bad == "huge" else jk.NonFiniteUpdate
    with pytest.raises(err, match="party 'p2'.*'l1'"):
        agg.fold_many(ups, [1.0] * 4, ["p0", "p1", "p2", "p3"])
    assert len(fused_calls) == 1
    assert agg.state.same_bits(before)
    good = ups[:2] + ups[3:]
    agg.fold_many(good, [1.0] * 3, ["p0", "p1", "p3"])  # the state is usable: the good ones fold
    assert agg.state.count == 3


def test_the_fused_pass_checks_the_weight_where_the_fold_weight_is_below_it():
    """FedNova folds w / steps: weight 10 x 1e32 is past float32's headroom even where the fold weight 0.1 is not.
    Admission then fold refused it; the fused first batch, checking the fold weight only, took it."""
    t = {"w": np.zeros(4, np.float32)}
    u = {"w": np.full(4, 1e32, np.float32)}
    for fold in (lambda a: a.fold_many([u], [10.0], ["p"], [{"steps": 100}]),
                 lambda a: a.fold(a.admit(u, 10.0, "p", steps=100))):
        agg = jk.Aggregator(t, jk.algorithms.FedNova(), base=t, backend="cpp")
        with pytest.raises(jk.ValueOutOfRange, match="headroom"):
            fold(agg)
        assert agg.state.count == 0
