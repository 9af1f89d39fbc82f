"""Deterministic mode: bit-identical results for any order, batching, merge tree, thread count and backend."""

import json
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


def _run(tmpl, ups, ws, order, cuts, merge_order, backend, threads, partial=False):
    """Fold in `order`, as parts split at `cuts` (each part folded one-by-one or batched), merged in `merge_order`."""
    old = jk.set_num_threads(threads)
    try:
        parts = [order[i:j] for i, j in zip([0] + cuts, cuts + [len(order)])]
        states = []
        for n, part in enumerate(parts):
            a = jk.Aggregator(tmpl, deterministic=True, partial=partial, backend=backend)
            if n % 2:
                a.fold_many([ups[i] for i in part], [ws[i] for i in part], parties=list(part))
            else:
                for i in part:
                    a.fold(ups[i], weight=ws[i], party=i)
            states.append(a.state)
        acc = states[merge_order[0]]
        for i in merge_order[1:]:
            acc = acc.merge(states[i])
        return jk.Aggregator.from_state(acc, backend=backend, partial=partial).finalize()
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_sum_is_held_in_one_way_whatever_the_batching(backend):
    """The carry left a tie in lo at either end (+-unit1/2), so one exact sum was held as (hi, +h) after one batching
    or merge tree and (hi + unit1, -h) after another: the states' bits and saved files differed, and DP noise, added
    to hi, rounded differently, so the released model depended on the tree (found with few-bit values: bf16 clients,
    unit weights). One representation now: the states are the same bits, and so are the released models."""
    import torch

    from jitkernels import algorithms as A

    n, k = 20_000, 4
    ups = [{"w": torch.randn(n, generator=torch.Generator().manual_seed(j)).to(torch.bfloat16).double().numpy()}
           for j in range(k)]
    parties = [f"p{j}" for j in range(k)]
    zero = {"w": np.zeros(n)}

    def agg(noise):
        alg = A.DPFixedClipping(clip_norm=1e6, noise_multiplier=1e-6, seed=11) if noise else "fedavg"
        return jk.Aggregator(zero, alg, base=zero, deterministic=True, backend=backend)
    for noise in (False, True):
        one = agg(noise)
        one.fold_many(ups, [1.0] * k, parties)
        tree = agg(noise)
        for sl in (slice(0, k, 2), slice(1, k, 2)):
            half = agg(noise)
            half.fold_many(ups[sl], [1.0] * len(ups[sl]), parties[sl])
            tree.merge(half)
        assert one.state.same_bits(tree.state)
        assert one.finalize()["w"].tobytes() == tree.finalize()["w"].tobytes()


def test_a_state_saved_with_a_ties_other_form_loads_in_the_one_form():
    """States saved before the carry's one representation may hold a tie as (hi + unit, -unit/2): loaded, they are
    carried into the one form, so that a round resumed from such a file releases the bits an uninterrupted one does
    (DP noise is added to the high part)."""
    from jitkernels.backends.numpy_ref import binned_constants, binned_half
    from jitkernels.state import FoldState, checked_bytes, read_checked_bytes

    agg = jk.Aggregator({"w": np.zeros(8)}, deterministic=True, bound=2.0 ** 10)
    agg.fold_many([{"w": np.full(8, 0.5)}, {"w": np.full(8, 0.25)}], parties=["a", "b"])
    half = binned_half(binned_constants(agg.state.bound_log2)[0])
    tensors, meta = read_checked_bytes(agg.state.to_bytes())
    hi, lo = tensors["acc"].copy(), tensors["lo"].copy()
    lo[:3] = half  # a sum whose low part is the tie, in the one form; then its other form, as the old carry left it
    old_hi, old_lo = hi.copy(), lo.copy()
    old_hi[:3] += 2 * half
    old_lo[:3] = -half
    want = FoldState.from_bytes(checked_bytes({**tensors, "acc": hi, "lo": lo}, meta))
    got = FoldState.from_bytes(checked_bytes({**tensors, "acc": old_hi, "lo": old_lo}, meta))
    assert got.same_bits(want) and not np.array_equal(old_lo, want.lo)


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

    want = _run(tmpl, ups, ws, list(range(k)), [], [0], "numpy", 1, partial=True)
    order = data.draw(st.permutations(range(k)))
    cuts = sorted(data.draw(st.lists(st.integers(1, k - 1), max_size=3, unique=True)))
    merge_order = data.draw(st.permutations(range(len(cuts) + 1)))
    got = _run(tmpl, ups, ws, order, cuts, merge_order, data.draw(st.sampled_from(CPU_BACKENDS)),
               data.draw(st.sampled_from([1, 2])), partial=True)
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
    with pytest.raises(jk.ValueOutOfRange, match="at most 3 updates"):
        a.fold_many([np.ones(2, np.float32)] * 2, [1.0, 1.0], parties=["c", "d"])
    assert a.state.same_bits(before) and a.count == 2
    b = jk.Aggregator(np.zeros(2, np.float32), deterministic=True)
    b.fold_many([np.ones(2, np.float32)] * 2, [1.0, 1.0], parties=["e", "f"])
    with pytest.raises(jk.ValueOutOfRange, match="at most 3 updates"):
        a.merge(b)
    assert a.state.same_bits(before)


def test_integer_leaves_are_held_to_the_bound():
    """Integer leaves (counters) are summed on the same grids: a counter whose mass * |x| exceeds 2^10 x the bound
    would break the grids' exactness (counters near 2^60 made the sum depend on the arrival order), so it is
    refused, by party and leaf, and the state is unchanged; such a state holds 2^20 updates (a count, so the refusal
    does not depend on order or batching either); within the bound the mean is order-independent."""
    tmpl = {"w": np.zeros(2, np.float32), "n": np.zeros(1, np.int64)}
    agg = jk.Aggregator(tmpl, deterministic=True, bound=2.0 ** 20)
    agg.fold({"w": np.ones(2, np.float32), "n": np.array([1000])}, weight=10.0, party="a")
    before = agg.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="party 'b': leaf 'n'.*2\\^10"):
        agg.fold({"w": np.ones(2, np.float32), "n": np.array([2 ** 31])}, weight=1.0, party="b")
    assert agg.state.same_bits(before) and agg.count == 1
    assert agg.state.binned_capacity == 2 ** 20
    assert jk.Aggregator({"w": np.zeros(2, np.float32)}, deterministic=True).state.binned_capacity == 2 ** 30
    assert jk.Aggregator(tmpl, deterministic=True, int_leaves="max").state.binned_capacity == 2 ** 30
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


@pytest.mark.parametrize("deterministic", [False, True])
def test_int_leaves_max_is_the_max_within_a_batch_too(deterministic):
    """int_leaves="max": a batch's counters 9 then 3 give 9, as one by one (the first carrier of a batch set the leaf
    and every later one of the same batch overwrote it: 3)."""
    tmpl = {"w": np.zeros(2, np.float32), "n": np.zeros(1, np.int64)}
    ups = [{"w": np.ones(2, np.float32), "n": np.array([9])}, {"w": np.ones(2, np.float32), "n": np.array([3])}]
    batch = jk.Aggregator(tmpl, deterministic=deterministic, int_leaves="max")
    batch.fold_many(ups, [1.0, 1.0], parties=["a", "b"])
    one = jk.Aggregator(tmpl, deterministic=deterministic, int_leaves="max")
    for u, p in zip(ups, "ab"):
        one.fold(u, weight=1.0, party=p)
    assert batch.finalize()["n"].item() == one.finalize()["n"].item() == 9
    big = jk.Aggregator(tmpl, deterministic=deterministic, int_leaves="max")
    big.fold({"w": np.ones(2, np.float32), "n": np.array([2 ** 49])}, weight=1.0, party="c")
    batch.merge(big)  # "max" sums nothing: no integer-sum limit applies to the merge
    assert batch.finalize()["n"].item() == 2 ** 49

@pytest.mark.parametrize("damage", ["inf_index", "float_index", "bool_index", "every_leaf", "unsorted", "index_range",
                                    "index_dtype", "index_length", "not_deterministic", "disagrees"])
def test_malformed_absent_records_are_refused(damage):
    """The absent-leaf record is checked on load (with a valid checksum, as a buggy or hostile writer makes it):
    each damage is CorruptState, never a crash or a state that finalizes to something else."""
    from jitkernels.state import checked_bytes

    tmpl, ups, ws = _partial_updates(3, 6)
    a = jk.Aggregator(tmpl, deterministic=True, partial=True)
    a.fold_many(ups, ws, parties=list(range(6)))
    t, m = a.state._tensors(), a.state._metadata()
    pats = json.loads(m["absent_patterns"])
    if damage == "inf_index":
        m["absent_patterns"] = json.dumps(pats).replace(str(pats[0][0]), "Infinity", 1)
    elif damage == "float_index":
        pats[0][0] = pats[0][0] + 0.7
    elif damage == "bool_index":
        pats[0] = [True]
    elif damage == "every_leaf":
        pats[0] = list(range(len(a.layout)))
    elif damage == "unsorted":
        pats[0] = [1, 0]
    elif damage == "index_range":
        t["absent_index"] = t["absent_index"] + 5
    elif damage == "index_dtype":
        t["absent_index"] = t["absent_index"].astype(np.int64)
    elif damage == "index_length":
        t["absent_index"] = t["absent_index"][:-1]
    elif damage == "not_deterministic":
        alg = json.loads(m["algorithm"])
        alg["deterministic"] = None
        m["algorithm"] = json.dumps(alg, sort_keys=True)
    elif damage == "disagrees":
        t["absent_index"] = np.full_like(t["absent_index"], -1)
        t["absent_index"][0] = 0
    if damage in ("float_index", "bool_index", "every_leaf", "unsorted"):
        m["absent_patterns"] = json.dumps(pats)
    with pytest.raises(jk.CorruptState):
        jk.FoldState.from_bytes(checked_bytes(t, m))


def test_a_large_partial_state_saves_its_record_once_per_pattern(tmp_path):
    """500 parties each lacking the same 190 of 200 leaves (a LoRA round): the record is one pattern in the metadata
    and an int32 per party, not 190 indices per party (25,000 such parties outgrew safetensors' header)."""
    tmpl = {f"l{i:03d}": np.zeros(3, np.float32) for i in range(200)}
    a = jk.Aggregator(tmpl, deterministic=True, partial=True)
    carried = [f"l{i:03d}" for i in range(0, 200, 20)]
    a.fold_many([{k: np.ones(3, np.float32) for k in carried}] * 500, [1.0] * 500, parties=list(range(500)))
    a.state.save(tmp_path / "lora.jks")
    meta = a.state._metadata()
    assert len(json.loads(meta["absent_patterns"])) == 1 and len(meta["absent_patterns"]) < 1000
    loaded = jk.FoldState.load(tmp_path / "lora.jks")
    assert loaded.same_bits(a.state) and len(loaded.absent) == 500


def test_a_bound_just_past_a_power_of_two_rounds_up():
    """ceil(log2(bound)) rounded 2^20 (1 + 2^-52) to 2^20 (math.log2 rounds to 20.0): an update within the bound
    given was refused. The bound is rounded up to a power of two, as README says."""
    just = 2.0 ** 20 * (1 + 2.0 ** -52)
    for bound, log2 in ((just, 21), (2.0 ** 20, 20), (2.0 ** 20 * 0.75, 20), (2.0 ** -900 * (1 + 2.0 ** -52), -899)):
        agg = jk.Aggregator({"w": np.zeros(2)}, deterministic=True, bound=bound, backend="numpy")
        assert agg.state.bound_log2 == log2, bound
    agg = jk.Aggregator({"w": np.zeros(2)}, deterministic=True, bound=just, backend="numpy")
    agg.fold({"w": np.array([just, -just])}, party="p")
    assert agg.finalize()["w"].tolist() == [just, -just]


@pytest.mark.parametrize("partial", [False, True])
def test_a_total_weight_past_float64_is_out_of_range_not_a_bare_overflow(partial):
    """math.fsum raises OverflowError where the exact sum leaves float64's range (2^20 updates at the largest
    weight admitted reach it): finalize, total_weight and repr raised it bare. The total is inf, and finalize refuses
    it naming the leaf. (The masses are set directly: a fold of 2^20 updates takes minutes.)"""
    agg = jk.Aggregator({"w": np.zeros(3), "b": np.zeros(2)}, deterministic=True, acc_dtype="float64",
                        partial=partial)
    agg.fold_many([{"w": np.ones(3), "b": np.ones(2)}, {"w": np.ones(3)} if partial else {"w": np.ones(3),
                   "b": np.ones(2)}], parties=["p", "q"])
    agg.state.parties = {"p": 1.7e308, "q": 1.7e308}
    assert agg.state.total_weight == math.inf and "weight inf" in repr(agg.state)
    with pytest.raises(jk.ValueOutOfRange, match="total weight inf") as e:
        agg.finalize()
    assert e.value.leaf in ("w", "b")


def test_fednova_divides_by_its_normalized_steps_when_the_weights_sum_past_float64():
    """FedNova's divisor 1 / sum p_j tau_j, p_j = n_j / sum n: with sum n past float64's range it took every p_j as 0
    (a division by zero); the p_j are then taken from the weights scaled by the largest."""
    from jitkernels import algorithms as A

    st = jk.Aggregator({"w": np.zeros(2)}, A.FedNova(), base={"w": np.zeros(2)}).state
    st.parties, st.info = {"p": 1.5e308, "q": 0.5e308}, {"p": {"steps": 2}, "q": {"steps": 6}}
    assert A.FedNova().divisor_scale(st) == pytest.approx(1 / (0.75 * 2 + 0.25 * 6), rel=1e-15)


@pytest.mark.parametrize("how", ["from_state", "merge"])
def test_a_state_with_no_parties_and_non_zero_sums_is_refused_where_it_enters(how):
    """from_bytes refused such a state; from_state and merge took a hand-made one, and the C++ deterministic fold,
    which writes an empty state's sums without reading them, gave other bits than numpy's and numba's, which added
    to them (found in review)."""
    t = {"w": np.zeros(40, np.float32)}
    empty = jk.Aggregator(t, deterministic=True)
    made = jk.FoldState(empty.layout, algorithm=empty.state.algorithm, acc_dtype="float64", acc=np.full(40, 3.0),
                        lo=np.zeros(40))
    with pytest.raises(jk.CorruptState, match="a state with no parties holds non-zero sums"):
        jk.Aggregator.from_state(made) if how == "from_state" else empty.merge(made)
    assert not empty.state.acc.any() and empty.state.count == 0
