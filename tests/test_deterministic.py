"""Deterministic mode: bit-identical results for any order, batching, merge tree, thread count and backend."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jitkernels as jk

from strategies import CPU_BACKENDS, leaf_shapes, make_update, seeds


def _updates(seed, shapes, k, dtype):
    rng = np.random.default_rng(seed)
    tmpl = make_update(rng, shapes, dtype)
    tmpl["steps"] = np.array(0, np.int64)
    ups = []
    for j in range(k):
        u = make_update(rng, shapes, dtype, scale=float(rng.choice([1e-3, 1.0, 30.0])))
        u["steps"] = np.array(int(rng.integers(0, 1000)), np.int64)
        ups.append(u)
    return tmpl, ups, list(rng.uniform(0.5, 5000.0, k))


def _run(tmpl, ups, ws, order, cuts, merge_order, backend, threads):
    """Fold in `order`, as parts split at `cuts` (each part folded one-by-one or batched), merged in `merge_order`."""
    old = jk.set_num_threads(threads)
    try:
        parts = [order[i:j] for i, j in zip([0] + cuts, cuts + [len(order)])]
        states = []
        for n, part in enumerate(parts):
            a = jk.Aggregator(tmpl, deterministic=True, backend=backend)
            if n % 2:
                a.fold_many([ups[i] for i in part], [ws[i] for i in part], parties=list(part))
            else:
                for i in part:
                    a.fold(ups[i], weight=ws[i], party=i)
            states.append(a.state)
        acc = states[merge_order[0]]
        for i in merge_order[1:]:
            acc = acc.merge(states[i])
        return jk.Aggregator.from_state(acc, backend=backend).finalize()
    finally:
        jk.set_num_threads(old)


def _bits(tree):
    return {k: np.asarray(v).tobytes() for k, v in tree.items()}


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
@given(seed=seeds, shapes=leaf_shapes(max_leaves=3, max_size=2000), k=st.integers(2, 9), data=st.data())
def test_bit_identical_under_any_order_tree_backend_and_threads(dtype, seed, shapes, k, data):
    tmpl, ups, ws = _updates(seed, shapes, k, dtype)
    want = _bits(_run(tmpl, ups, ws, list(range(k)), [], [0], "numpy", 1))
    order = data.draw(st.permutations(range(k)))
    cuts = sorted(data.draw(st.lists(st.integers(1, k - 1), max_size=3, unique=True)))
    merge_order = data.draw(st.permutations(range(len(cuts) + 1)))
    backend = data.draw(st.sampled_from(CPU_BACKENDS))
    threads = data.draw(st.sampled_from([1, 2, 3]))
    got = _bits(_run(tmpl, ups, ws, order, cuts, merge_order, backend, threads))
    assert got == want


@given(seed=seeds, k=st.integers(1, 20))
def test_deterministic_result_is_accurate(seed, k):
    rng = np.random.default_rng(seed)
    ups = [(rng.standard_normal(500) * rng.choice([1e-4, 1.0, 50.0])).astype(np.float32) for _ in range(k)]
    ws = rng.uniform(1, 1e4, k)
    agg = jk.Aggregator(np.zeros(500, np.float32), deterministic=True, acc_dtype="float64", bound=2.0 ** 24)
    agg.fold_many(ups, ws, parties=list(range(k)))
    exact = sum(np.float64(w) * u.astype(np.float64) for u, w in zip(ups, ws)) / ws.sum()
    out = agg.finalize()
    # fold error <= k * 2^-57 * bound per element (/ W), then the float32 output rounding
    tol = k * 2.0 ** (24 - 57) / ws.sum() + np.finfo(np.float32).eps * np.abs(exact)
    assert np.all(np.abs(out - exact) <= tol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ties_on_the_grid_round_away_from_zero(backend, dtype):
    """Halfway between two points of the fine grid (ulp(s2) = 2^(b-56)), a term rounds away from zero, on every
    backend (csrc/jk_math.h binned_step): with bound 1 and weight 1, t = (m + 1/2) * 2^-56 sums to (m + 1) * 2^-56.
    Vector kernels that add the terms into biased accumulators must keep that rule, and 17 values exercise both the
    register blocks of 16 elements and the scalar tail."""
    m = np.array([0, 2, 5, 7, 0, 2, 5, 7, 1, 3, 1, 3, 4, 6, 8, 10, 9], np.float64)
    sign = np.where(np.arange(m.size) % 2, -1.0, 1.0)
    x = (sign * (m + 0.5) * 2.0 ** -56).astype(dtype)
    agg = jk.Aggregator(np.zeros(m.size, dtype), deterministic=True, bound=1.0, backend=backend)
    agg.fold(x, weight=1.0, party="p")
    st_ = agg.state
    assert np.array_equal(st_.acc + st_.lo, sign * (m + 1) * 2.0 ** -56)


def test_bound_is_enforced_at_admission_and_state_unchanged():
    agg = jk.Aggregator(np.zeros(4, np.float32), deterministic=True, bound=1000.0)
    agg.fold(np.full(4, 1.0, np.float32), weight=10.0, party="ok")
    before = agg.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="deterministic bound"):
        agg.fold(np.full(4, 30.0, np.float32), weight=100.0, party="big")  # 3000 > 1024
    assert agg.state.same_bits(before)
    u = jk.admit(np.full(4, 30.0, np.float32), agg.layout, weight=100.0, party="elsewhere")
    with pytest.raises(jk.ValueOutOfRange):
        agg.fold_many([u])  # admitted without the bound: checked again before folding
    assert agg.state.same_bits(before)


def test_options_that_deterministic_mode_refuses():
    with pytest.raises(ValueError, match="float64"):
        jk.Aggregator(np.zeros(2, np.float32), deterministic=True, acc_dtype="float32")


def _partial_updates(seed, k):
    """k updates of a three-leaf model (and a counter), each but the first lacking a random subset of the leaves."""
    rng = np.random.default_rng(seed)
    tmpl = {"a": np.zeros(40, np.float32), "b": np.zeros(3, np.float32), "c": np.zeros(7, np.float32),
            "n": np.array(0, np.int64)}
    ups = []
    for j in range(k):
        keep = [name for name in tmpl if j == 0 or rng.random() < 0.6] or ["a"]
        ups.append({name: (rng.standard_normal(tmpl[name].shape) * rng.choice([1e-3, 1.0])).astype(np.float32)
                    if name != "n" else np.array(int(rng.integers(0, 100))) for name in keep})
    return tmpl, ups, list(rng.uniform(0.5, 500.0, k))


@given(seed=seeds, k=st.integers(2, 9), data=st.data())
def test_partial_updates_bit_identical_under_any_order_tree_backend_and_threads(seed, k, data):
    """Partial updates (LoRA, FedBN: some leaves left out) in deterministic mode: each leaf is divided by the exact
    sum of its carriers' masses, so order, batching, merge tree, backend and threads give the same bits, and the
    result is each leaf's weighted mean over its carriers."""
    tmpl, ups, ws = _partial_updates(seed, k)

    def run(order, cuts, merge_order, backend, threads):
        old = jk.set_num_threads(threads)
        try:
            parts = [order[i:j] for i, j in zip([0] + cuts, cuts + [len(order)])]
            states = []
            for n, part in enumerate(parts):
                a = jk.Aggregator(tmpl, deterministic=True, partial=True, backend=backend)
                if n % 2:
                    a.fold_many([ups[i] for i in part], [ws[i] for i in part], parties=list(part))
                else:
                    for i in part:
                        a.fold(ups[i], weight=ws[i], party=i)
                states.append(a.state)
            acc = states[merge_order[0]]
            for i in merge_order[1:]:
                acc = acc.merge(states[i])
            return jk.Aggregator.from_state(acc, backend=backend, partial=True).finalize()
        finally:
            jk.set_num_threads(old)

    want = run(list(range(k)), [], [0], "numpy", 1)
    order = data.draw(st.permutations(range(k)))
    cuts = sorted(data.draw(st.lists(st.integers(1, k - 1), max_size=3, unique=True)))
    merge_order = data.draw(st.permutations(range(len(cuts) + 1)))
    got = run(order, cuts, merge_order, data.draw(st.sampled_from(CPU_BACKENDS)), data.draw(st.sampled_from([1, 2])))
    assert _bits(got) == _bits(want)
    for name in ("a", "b", "c"):
        carriers = [j for j in range(k) if name in ups[j]]
        mean = sum(ws[j] * ups[j][name].astype(np.float64) for j in carriers) / math.fsum(ws[j] for j in carriers)
        assert np.allclose(want[name], mean, rtol=1e-6, atol=1e-9)


def test_partial_deterministic_state_round_trip(tmp_path):
    tmpl, ups, ws = _partial_updates(3, 6)
    a = jk.Aggregator(tmpl, deterministic=True, partial=True)
    a.fold_many(ups, ws, parties=list(range(6)))
    assert a.state.absent  # some update lacked some leaf
    a.state.save(tmp_path / "p.jks")
    loaded = jk.FoldState.load(tmp_path / "p.jks")
    assert loaded.same_bits(a.state) and loaded.absent == a.state.absent
    assert _bits(jk.Aggregator.from_state(loaded, partial=True).finalize()) == _bits(a.finalize())


def test_deterministic_state_round_trip_and_merge_refusal(tmp_path):
    a = jk.Aggregator(np.zeros(3, np.float32), deterministic=True)
    a.fold(np.ones(3, np.float32), party=1)
    a.state.save(tmp_path / "d.jks")
    loaded = jk.FoldState.load(tmp_path / "d.jks")
    assert loaded.same_bits(a.state) and loaded.deterministic
    plain = jk.Aggregator(np.zeros(3, np.float32), acc_dtype="float64")
    plain.fold(np.ones(3, np.float32), party=2)
    with pytest.raises(jk.IncompatibleStates):
        loaded.merge(plain.state)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batches_over_the_kernel_limit_fold_in_parts_with_the_same_bits(backend, monkeypatch):
    """A batch larger than state.BINNED_BATCH is folded in parts (the fast kernel's low part would leave its range);
    the result is the one-batch result, bit for bit. The limit is lowered to 3 here to run it on 10 updates."""
    tmpl, ups, ws = _updates(7, [(40,), (3,)], 10, "float32")
    want = _bits(_run(tmpl, ups, ws, list(range(10)), [], [0], backend, 2))
    monkeypatch.setattr(jk.state, "BINNED_BATCH", 3)
    agg = jk.Aggregator(tmpl, deterministic=True, backend=backend)
    agg.fold_many(ups, ws, parties=list(range(10)))
    assert _bits(agg.finalize()) == want


def test_state_capacity_is_enforced(monkeypatch):
    """Past 2^30 updates the high part's sums would lose bits: folds and merges beyond it are refused, unchanged."""
    monkeypatch.setattr(jk.state, "BINNED_MAX_UPDATES", 3)
    a = jk.Aggregator(np.zeros(2, np.float32), deterministic=True)
    a.fold_many([np.ones(2, np.float32)] * 2, [1.0, 1.0], parties=["a", "b"])
    before = a.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="2\\^30"):
        a.fold_many([np.ones(2, np.float32)] * 2, [1.0, 1.0], parties=["c", "d"])
    assert a.state.same_bits(before) and a.count == 2
    b = jk.Aggregator(np.zeros(2, np.float32), deterministic=True)
    b.fold_many([np.ones(2, np.float32)] * 2, [1.0, 1.0], parties=["e", "f"])
    with pytest.raises(jk.ValueOutOfRange, match="2\\^30"):
        a.merge(b)
    assert a.state.same_bits(before)


def test_integer_leaves_are_held_to_the_bound():
    """Integer leaves (counters) are summed on the same grids: a counter whose mass * |x| exceeds the bound would
    make the sum depend on the arrival order (found with counters near 2^60), so it is refused, by party and leaf,
    and the state is unchanged; within the bound the mean is order-independent."""
    tmpl = {"w": np.zeros(2, np.float32), "n": np.zeros(1, np.int64)}
    agg = jk.Aggregator(tmpl, deterministic=True, bound=2.0 ** 20)
    agg.fold({"w": np.ones(2, np.float32), "n": np.array([1000])}, weight=10.0, party="a")
    before = agg.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="party 'b': leaf 'n'.*2\\^10"):
        agg.fold({"w": np.ones(2, np.float32), "n": np.array([2 ** 31])}, weight=1.0, party="b")
    assert agg.state.same_bits(before) and agg.count == 1
    full = jk.Aggregator(tmpl, deterministic=True, bound=2.0 ** 20)
    full.fold({"w": np.ones(2, np.float32), "n": np.array([1000])}, weight=1.0, party="a")
    n = next(leaf for leaf in full.layout.leaves if leaf.name == "n")
    full.state.acc[n.offset] = 2.0 ** 50 - 2.0 ** 21  # stands in for ~2^20 updates of large counters
    kept = full.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="party 'c': leaf 'n'.*exact range"):
        full.fold({"w": np.ones(2, np.float32), "n": np.array([2 ** 22])}, weight=1.0, party="c")
    assert full.state.same_bits(kept)
    other = jk.Aggregator(tmpl, deterministic=True, bound=2.0 ** 20)
    other.fold({"w": np.ones(2, np.float32), "n": np.array([2 ** 22])}, weight=1.0, party="d")
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'n'.*merged"):
        full.merge(other)
    assert full.state.same_bits(kept)
    rng = np.random.default_rng(0)
    ups = [{"w": rng.standard_normal(2).astype(np.float32), "n": np.array([int(rng.integers(0, 5000))])}
           for _ in range(20)]
    ws = list(rng.uniform(1, 100, 20))
    outs = []
    for order in (range(20), reversed(range(20))):
        a = jk.Aggregator(tmpl, deterministic=True, bound=2.0 ** 20)
        for j in order:
            a.fold(ups[j], weight=ws[j], party=j)
        outs.append((a.state.acc.tobytes(), a.state.lo.tobytes(), _bits(a.finalize())))
    assert outs[0] == outs[1]
