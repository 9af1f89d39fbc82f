"""Invariants the design relies on: order, batching and merge-tree independence; rejection leaves state untouched."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels import backends

from strategies import CPU_BACKENDS, leaf_shapes, make_update, seeds


def _mk(seed, shapes, k, dtype="float32"):
    """(template, k updates, weights); int8: float32 template, Quantized updates."""
    rng = np.random.default_rng(seed)
    src = "float32" if dtype == "int8" else dtype
    tmpl = make_update(rng, shapes, src)
    ups = [make_update(rng, shapes, src, quantize=dtype == "int8") for _ in range(k)]
    ws = list(rng.uniform(0.5, 20.0, k))
    return tmpl, ups, ws


def _values(u) -> dict:
    return {n: a.dequantize() if isinstance(a, jk.Quantized) else a for n, a in u.items()}


def _tolerance(ups, ws, acc_dtype="float32"):
    """|error| of a sum of k weighted terms in any order <= ~k * eps * sum |w*x| (per element, then / W)."""
    k = len(ups)
    eps = np.finfo(acc_dtype).eps
    mag = sum(abs(w) * np.abs(np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in _values(u).values()]))
              for u, w in zip(ups, ws))
    return 2 * (k + 1) * eps * mag / sum(ws) + 1e-30


def _flat(tree):
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in tree.values()])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(seed=seeds, shapes=leaf_shapes(max_leaves=4, max_size=500), k=st.integers(2, 7), data=st.data())
def test_one_by_one_equals_one_batch_bitwise(backend, seed, shapes, k, data):
    """Folding one at a time or in one fused batch (in the same order) gives the same bits."""
    tmpl, ups, ws = _mk(seed, shapes, k)
    a = jk.Aggregator(tmpl, backend=backend)
    for j, (u, w) in enumerate(zip(ups, ws)):
        a.fold(u, weight=w, party=j)
    b = jk.Aggregator(tmpl, backend=backend)
    cut = data.draw(st.integers(0, k))
    b.fold_many(ups[:cut], ws[:cut], parties=list(range(cut)))
    b.fold_many(ups[cut:], ws[cut:], parties=list(range(cut, k)))
    assert a.state.acc.tobytes() == b.state.acc.tobytes()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(max_leaves=4, max_size=500), k=st.integers(2, 8), with_base=st.booleans(),
       cancel=st.booleans(), data=st.data())
def test_order_and_merge_tree_independence(backend, acc_dtype, seed, shapes, k, with_base, cancel, data):
    """Any order and merge tree gives the float64 mean within the accumulator's rounding of the terms summed, with
    and without a base (deltas folded against it), in both accumulators, for every input dtype the backend runs
    (int8: Quantized updates of a float32 model). ``cancel``: the second update is the first's negation at the same
    weight, so that sums cancel (the bound scales with sum |w x|, not |sum w x|)."""
    in_dtype = data.draw(st.sampled_from(backends.get(backend).DTYPES), label="in_dtype")
    tmpl, ups, ws = _mk(seed, shapes, k, in_dtype)
    out_dtype = next(iter(tmpl.values())).dtype  # (every leaf's)
    if cancel:
        ups[1], ws[1] = {n: -a if isinstance(a, np.ndarray) else jk.Quantized(a.values, -np.asarray(a.scale), a.block)
                         for n, a in ups[0].items()}, ws[0]
    base = make_update(np.random.default_rng(seed + 1), shapes, out_dtype.name) if with_base else None
    ref = jk.Aggregator(tmpl, backend="numpy", acc_dtype="float64")
    ref.fold_many(ups, ws, parties=list(range(k)))
    want = _flat(ref.finalize())
    if base is None:
        tol = _tolerance(ups, ws, acc_dtype)
    else:  # the deltas are summed; base + mean rounds once in the accumulator, once more to the output dtype
        b = _flat(base)
        tol = _tolerance([{n: np.asarray(a, np.float64) - base[n] for n, a in _values(u).items()} for u in ups], ws,
                         acc_dtype) + 2 * np.finfo(acc_dtype).eps * (np.abs(b) + np.abs(want))
    out = ml_dtypes.finfo(out_dtype)  # (numpy's finfo has no bfloat16)
    tol = tol + float(out.eps) * np.abs(want) + float(out.smallest_subnormal)  # (the output's rounding)
    perm = data.draw(st.permutations(range(k)))
    # random merge tree: split the permuted parties into parts, fold each, merge in random pairs
    cuts = sorted(data.draw(st.lists(st.integers(1, k - 1), max_size=3, unique=True)))
    parts = [perm[i:j] for i, j in zip([0] + cuts, cuts + [k])]
    states = []
    for part in parts:
        a = jk.Aggregator(tmpl, backend=backend, acc_dtype=acc_dtype, base=base)
        a.fold_many([ups[i] for i in part], [ws[i] for i in part], parties=list(part))
        states.append(a.state)
    while len(states) > 1:
        i = data.draw(st.integers(0, len(states) - 2))
        pair = (states[i + 1], states[i]) if data.draw(st.booleans()) else (states[i], states[i + 1])
        states[i:i + 2] = [pair[0].merge(pair[1])]
    got = _flat(jk.Aggregator.from_state(states[0], backend=backend).finalize())
    assert np.all(np.abs(got - want) <= tol)
    assert states[0].count == k and abs(states[0].total_weight - sum(ws)) <= 1e-12 * sum(ws)


@given(seed=seeds, k=st.integers(2, 5))
def test_merge_is_commutative_bitwise_and_associative_within_tolerance(seed, k):
    shapes = [(37,), (5, 3)]
    tmpl, ups, ws = _mk(seed, shapes, 3 * k)
    parts = []
    for i in range(3):
        a = jk.Aggregator(tmpl)
        a.fold_many(ups[i * k:(i + 1) * k], ws[i * k:(i + 1) * k], parties=list(range(i * k, (i + 1) * k)))
        parts.append(a.state)
    x, y, z = parts
    assert x.merge(y).acc.tobytes() == y.merge(x).acc.tobytes()  # fp addition commutes
    left, right = x.merge(y).merge(z), x.merge(y.merge(z))
    assert set(left.parties) == set(right.parties)
    mag = np.abs(x.acc) + np.abs(y.acc) + np.abs(z.acc)
    assert np.all(np.abs(left.acc - right.acc) <= 2 * np.finfo(np.float32).eps * mag)


REJECTIONS = ["nan", "inf", "shape", "dtype", "missing", "extra", "weight0", "weightnan", "weightneg", "weightstr",
              "weightbool", "weighthuge", "dup_state", "dup_batch", "container", "huge"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", REJECTIONS)
@given(seed=seeds, shapes=leaf_shapes(max_leaves=4, max_size=300), k=st.integers(1, 4), data=st.data())
def test_rejection_leaves_state_bit_identical(backend, kind, seed, shapes, k, data):
    tmpl, ups, ws = _mk(seed, shapes, k + 2)
    agg = jk.Aggregator(tmpl, backend=backend)
    agg.fold_many(ups[:2], ws[:2], parties=["a", "b"])
    before = agg.state.copy()
    batch, bw, bp = [dict(u) for u in ups[2:]], ws[2:], [f"p{i}" for i in range(k)]
    j = data.draw(st.integers(0, k - 1))
    names = list(tmpl)
    leaf = data.draw(st.sampled_from(names))
    sized = [n for n in names if batch[j][n].size]
    expected = {"nan": jk.NonFiniteUpdate, "inf": jk.NonFiniteUpdate, "shape": jk.LayoutMismatch,
                "dtype": jk.LayoutMismatch, "missing": jk.LayoutMismatch, "extra": jk.LayoutMismatch,
                "weight0": jk.InvalidWeight, "weightnan": jk.InvalidWeight, "weightneg": jk.InvalidWeight,
                "weightstr": jk.InvalidWeight, "weightbool": jk.InvalidWeight, "weighthuge": jk.ValueOutOfRange,
                "dup_state": jk.DuplicateParty, "dup_batch": jk.DuplicateParty, "container": jk.LayoutMismatch,
                "huge": jk.ValueOutOfRange}[kind]
    if kind in ("nan", "inf", "huge"):
        if not sized:
            return
        leaf = data.draw(st.sampled_from(sized))
        bad = batch[j][leaf].copy()
        bad.reshape(-1)[data.draw(st.integers(0, bad.size - 1))] = {"nan": np.nan, "inf": -np.inf, "huge": 3e38}[kind]
        batch[j][leaf] = bad
        if kind == "huge":
            bw = [1e6] * k
    elif kind == "shape":
        batch[j][leaf] = np.zeros(batch[j][leaf].shape + (2,), np.float32)
    elif kind == "dtype":
        batch[j][leaf] = batch[j][leaf].astype(np.float64)
    elif kind == "missing":
        del batch[j][leaf]
    elif kind == "extra":
        batch[j]["intruder"] = np.zeros(3, np.float32)
        leaf = "intruder"
    elif kind.startswith("weight"):
        bw = list(bw)
        # (float() reads "5" and True, and raises OverflowError on 10**400: a weight float64 cannot hold)
        bw[j] = {"weight0": 0.0, "weightnan": float("nan"), "weightneg": -1.0, "weightstr": "5", "weightbool": True,
                 "weighthuge": 10 ** 400}[kind]
    elif kind == "dup_state":
        bp[j] = "a"
    elif kind == "dup_batch":
        if k < 2:
            return
        bp[j] = bp[(j + 1) % k]
    elif kind == "container":
        batch[j] = list(batch[j].values())
    with pytest.raises(expected) as info:
        agg.fold_many(batch, bw, parties=bp)
    assert isinstance(info.value, jk.AggregationError)
    if kind in ("nan", "inf", "shape", "dtype", "missing", "extra"):
        assert repr(leaf) in str(info.value) and repr(bp[j]) in str(info.value)
    assert agg.state.same_bits(before), "a rejected batch changed the state"
    # and nothing was lost: the good part of the batch still folds
    good = [u for i, u in enumerate(ups[2:]) if i != j]
    agg.fold_many(good, [w for i, w in enumerate(ws[2:]) if i != j], parties=[f"q{i}" for i in range(len(good))])
    assert agg.count == 2 + len(good)
