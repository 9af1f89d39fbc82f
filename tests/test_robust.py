"""Robust rules through the Aggregator: buffered updates, finalize by the rule, all or nothing on rejection, saved
and merged with the state; against plain numpy and Flower's strategies."""

import numpy as np
import pytest

import jitkernels as jk
from jitkernels import robust as R
from jitkernels.robust_store import BudgetExceeded

from strategies import robust_rules


def _model(rng):
    return {"w": rng.standard_normal((30, 20)).astype(np.float32), "b": rng.standard_normal(20).astype(np.float32),
            "n": np.array(7, np.int64)}


def _ups(rng, base, k, scale=0.1):
    return [{n: (a + scale * rng.standard_normal(a.shape)).astype(a.dtype) if a.dtype.kind == "f"
             else np.array(int(rng.integers(0, 100)), a.dtype) for n, a in base.items()} for _ in range(k)]


def _stack(ups, name):
    return np.stack([u[name].astype(np.float64) for u in ups])


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_median_and_trimmed_mean_through_the_aggregator(k):
    rng = np.random.default_rng(k)
    base = _model(rng)
    ups = _ups(rng, base, k)
    ups[-1]["w"][0, 0] = 3e38  # an adversarial coordinate: the median ignores it (k >= 3)
    for alg, ref in ((R.FedMedian(), lambda x: np.median(x, axis=0)),
                     (R.FedTrimmedAvg(beta=0.2), lambda x: np.sort(x, 0)[int(0.2 * k):k - int(0.2 * k)].mean(0))):
        agg = jk.Aggregator(base, alg)
        agg.fold_many(ups, list(range(1, k + 1)), list(range(k)))
        got = agg.finalize()
        for n in ("w", "b"):
            np.testing.assert_allclose(got[n], ref(_stack(ups, n)).astype(np.float32), rtol=1e-6, atol=1e-7)
        assert got["n"].dtype == np.int64 and got["n"] == np.rint(ref(_stack(ups, "n")))


@pytest.mark.parametrize("rule", list(robust_rules()))
def test_quantized_updates_are_buffered_as_their_dequantized_values(rule):
    """int8-quantized updates go into the store as fl32(q) * fl32(scale), the values the streaming fold adds: the
    rule gives the bits it gives over those float32 updates. (The store read a Quantized leaf as an array of
    objects and refused it: "dtype object is neither a float dtype ...".)"""
    rng = np.random.default_rng(4)
    tmpl = {"w": np.zeros((20, 9), np.float32), "b": np.zeros(9, np.float32)}
    ups = [{n: jk.Quantized.quantize(rng.standard_normal(a.shape).astype(np.float32), block=block)
            for (n, a), block in zip(tmpl.items(), (32, None))} for _ in range(9)]
    w = rng.uniform(1.0, 20.0, 9)
    base = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in tmpl.items()}  # (centered clipping's)
    got, want = (jk.Aggregator(tmpl, robust_rules()[rule](), base=base) for _ in range(2))
    got.fold_many(ups, w, parties=list(range(9)))
    want.fold_many([{n: q.dequantize("float32") for n, q in u.items()} for u in ups], w, parties=list(range(9)))
    for n, a in got.finalize().items():
        assert a.tobytes() == want.finalize()[n].tobytes(), n


@pytest.mark.parametrize("rule", list(robust_rules()) + ["median_f16"])
def test_quantized_updates_past_the_slab_range_are_refused_by_name(rule):
    """q * scale past the slab dtype's range (finite int8 values, a finite scale) is refused at arrival, naming the
    party and leaf, with nothing stored: it went into a float32 slab as inf, and the Gram rules then failed the
    whole round at finalize."""
    make = (lambda: R.FedMedian(slab_dtype="float16")) if rule == "median_f16" else robust_rules()[rule]
    tmpl = {"c": np.zeros(4, np.float32)}
    agg = jk.Aggregator(tmpl, make(), base=tmpl)
    for p in range(6):
        agg.fold({"c": np.full(4, 1.0 + p / 100, np.float32)}, weight=1, party=p)
    before = agg.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="party 'attacker': leaf 'c'"):
        agg.fold({"c": jk.Quantized(np.full(4, 127, np.int8), 1e37)}, weight=1, party="attacker")
    assert agg.state.same_bits(before) and len(agg.state.store) == 6


def test_a_quantized_update_is_stored_through_chunk_sized_temporaries():
    """A quantized leaf is dequantized chunk by chunk as the store converts it: its float64 form (8 bytes an element)
    is never whole in memory (it was: 24 bytes an element of temporaries)."""
    import tracemalloc

    from jitkernels.robust_store import CHUNK, UpdateStore

    n = 8 * CHUNK
    store = UpdateStore(n, 2)
    q = jk.Quantized(np.ones(n, np.int8), np.full(n // 64, 0.5, np.float32), 64)
    tracemalloc.start()
    try:
        store.add({"c": q}, party=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 8 * CHUNK, peak  # a few chunks of float64 (and their int64 block indices), not the leaf's
    assert np.all(store.row(0) == 0.5)


def test_a_rejected_batch_leaves_store_and_state_bit_identical(tmp_path):
    rng = np.random.default_rng(1)
    base = _model(rng)
    row = sum(a.size for a in base.values()) * 4
    agg = jk.Aggregator(base, R.FedMedian(budget_bytes=3 * row))
    agg.fold_many(_ups(rng, base, 2), parties=["a", "b"])
    before = agg.state.copy()
    bad = _ups(rng, base, 2)
    bad[1]["b"][3] = np.nan
    with pytest.raises(jk.NonFiniteUpdate, match="'d'"):
        agg.fold_many(bad, parties=["c", "d"])
    with pytest.raises(jk.AggregationError, match="budget"):  # two more rows would pass the budget: neither lands
        agg.fold_many(_ups(rng, base, 2), parties=["c", "d"])
    assert agg.state.same_bits(before)
    agg.fold(_ups(rng, base, 1)[0], party="c")
    assert agg.state.count == 3


def test_buffered_state_saves_loads_and_merges(tmp_path):
    rng = np.random.default_rng(2)
    base = _model(rng)
    ups = _ups(rng, base, 7)
    whole = jk.Aggregator(base, R.FedMedian())
    whole.fold_many(ups, parties=list(range(7)))
    left, right = jk.Aggregator(base, R.FedMedian()), jk.Aggregator(base, R.FedMedian())
    left.fold_many(ups[:3], parties=[0, 1, 2])
    left.state.save(tmp_path / "m.jks")
    left = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "m.jks"))
    right.fold_many(ups[3:], parties=[3, 4, 5, 6])
    left.merge(right)
    a, b = whole.finalize(), left.finalize()
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)  # the median does not depend on row order
    left.reset(reuse=True)
    assert left.state.count == 0 and len(left.state.store) == 0


def test_norm_bounding_clips_each_delta():
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal(500).astype(np.float32)}
    ups = [{"w": (base["w"] + s * rng.standard_normal(500)).astype(np.float32)} for s in (0.01, 0.1, 1.0)]
    agg = jk.Aggregator(base, R.NormBounding(max_norm=1.0, weighted=False), base=base, acc_dtype="float64")
    agg.fold_many(ups, parties=[0, 1, 2])
    x = base["w"].astype(np.float64)
    want = x + sum(min(1.0, 1.0 / np.linalg.norm(u["w"] - x)) * (u["w"] - x) for u in ups) / 3
    np.testing.assert_allclose(agg.finalize()["w"], want.astype(np.float32), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("alg", [R.NormBounding(max_norm=1.0),
                                 jk.algorithms.DPFixedClipping("fedavg", clip_norm=1.0, noise_multiplier=0.0)])
def test_clipping_rules_take_a_huge_update_they_clip(alg):
    """A clipping rule's headroom is its fold weight's (the weight scaled by the clip factor): the weight times
    the unclipped max|x| (1e6 x 1e27, past float32's headroom) refused the attacker's update and, in a batch, the
    honest ones with it, though clipped it adds about 1e4 per coordinate. Folded as its equations say."""
    rng = np.random.default_rng(12)
    n = 10_000
    base = {"w": np.zeros(n, np.float32)}
    ups = [{"w": (0.01 * rng.standard_normal(n)).astype(np.float32)} for _ in range(5)]
    ups.append({"w": np.full(n, 1e27, np.float32)})
    w = [100.0] * 5 + [1e6]
    agg = jk.Aggregator(base, alg, base=base)
    agg.fold_many(ups, w, parties=list(range(6)))
    x = np.stack([u["w"] for u in ups]).astype(np.float64)
    factor = np.minimum(1.0, 1.0 / np.linalg.norm(x, axis=1))
    mass = np.array(w) if getattr(alg, "weighted", True) else np.ones(len(w))
    want = (mass * factor) @ x / mass.sum()
    np.testing.assert_allclose(agg.finalize()["w"], want, rtol=1e-5, atol=1e-9)


def test_robust_rules_refuse_an_integer_leaf_rule_they_would_not_apply():
    """A robust rule gives counters its own value (the median of 1, 2, 100, 3, 4 is 3): int_leaves="max" was taken
    and ignored (3, not 100)."""
    tmpl = {"w": np.zeros(4, np.float32), "n": np.zeros((), np.int64)}
    with pytest.raises(ValueError, match="FedMedian gives integer leaves its own value.*'max'"):
        jk.Aggregator(tmpl, R.FedMedian(), int_leaves="max")
    agg = jk.Aggregator(tmpl, R.FedMedian())
    agg.fold_many([{"w": np.full(4, v, np.float32), "n": np.int64(v)} for v in (1, 2, 100, 3, 4)],
                  parties=list(range(5)))
    assert int(agg.finalize()["n"]) == 3


def test_names_resolve():
    assert isinstance(jk.algorithms.resolve("fedmedian"), R.FedMedian)
    assert isinstance(jk.algorithms.from_params(R.FedTrimmedAvg(beta=0.1).params()), R.FedTrimmedAvg)


@pytest.mark.parametrize("alg", [R.Krum(f=2), R.Krum(f=2, m=3), R.Bulyan(f=2), R.GeometricMedian(),
                                 R.CenteredClipping(tau=2.0, iters=3)])
def test_distance_rules_through_the_aggregator_exclude_attackers(alg):
    """11 parties around the model, 2 colluding attackers far away: each rule stays with the honest cluster."""
    rng = np.random.default_rng(4)
    base = {"w": rng.standard_normal(3000).astype(np.float32)}
    honest = [{"w": (base["w"] + 0.05 * rng.standard_normal(3000)).astype(np.float32)} for _ in range(11)]
    attack = [{"w": (base["w"] + 100.0).astype(np.float32)} for _ in range(2)]
    agg = jk.Aggregator(base, alg, base=base if alg.needs_base else None)
    agg.fold_many(honest[:6] + attack + honest[6:], parties=list(range(13)))
    got = agg.finalize()["w"]
    center = np.mean([u["w"] for u in honest], axis=0)
    assert np.abs(got - center).max() < 0.2
    with pytest.raises(ValueError):
        jk.Aggregator(base, alg, backend="numpy", partial=True)


def test_too_few_updates_for_the_rule_is_a_typed_error():
    rng = np.random.default_rng(5)
    base = {"w": rng.standard_normal(50).astype(np.float32)}
    agg = jk.Aggregator(base, R.Bulyan(f=2))
    agg.fold_many([{"w": rng.standard_normal(50).astype(np.float32)} for _ in range(5)], parties=list(range(5)))
    with pytest.raises(jk.TooFewUpdates, match="Bulyan with f=2 needs at least 11"):
        agg.finalize()


def test_krum_variants_through_the_aggregator(tmp_path):
    """variant='paper' (the default) keeps the paper's k >= 2f + 3 and refuses a mass; variant='flower' runs any k
    and takes a per-update mass >= 0: an update of mass 0 is scored and weighs nothing in the average; Krum returns
    its selected row whatever its mass, a Multi-Krum selection of mass 0 in all raises. The variant is saved."""
    base = {"w": np.zeros(8, np.float32)}
    ups = [{"w": np.full(8, v, np.float32)} for v in (0.0, 1.0, 3.0)]  # scores (one neighbour): 1, 1, 4
    paper = jk.Aggregator(base, R.Krum(f=1))
    paper.fold_many(ups, parties=["a", "b", "c"])
    with pytest.raises(jk.TooFewUpdates, match="Krum with f=1 needs at least 5"):
        paper.finalize()
    with pytest.raises(jk.InvalidUpdateInfo, match="mass"):
        paper.fold(ups[0], party="d", mass=0.0)

    def flower(m, masses):
        agg = jk.Aggregator(base, R.Krum(f=1, m=m, variant="flower"))
        agg.fold_many(ups, parties=["a", "b", "c"], infos=[{"mass": x} for x in masses])
        return agg

    np.testing.assert_array_equal(flower(1, [0.0, 0.0, 0.0]).finalize()["w"], ups[0]["w"])  # the tie to 'a'
    np.testing.assert_array_equal(flower(2, [0.0, 5.0, 1.0]).finalize()["w"], ups[1]["w"])  # a, b: a weighs 0
    np.testing.assert_allclose(flower(3, [0.0, 5.0, 1.0]).finalize()["w"], np.full(8, 8 / 6), rtol=1e-6)
    np.testing.assert_allclose(flower(4, [1.0, 1.0, 1.0]).finalize()["w"], np.full(8, 4 / 3), rtol=1e-6)  # m > k
    with pytest.raises(jk.EmptyAggregate, match="weigh 0"):
        flower(2, [0.0, 0.0, 1.0]).finalize()
    agg = flower(2, [0.0, 5.0, 1.0])
    agg.state.save(tmp_path / "k.jks")
    back = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "k.jks"))
    assert back.algorithm.variant == "flower"
    np.testing.assert_array_equal(back.finalize()["w"], ups[1]["w"])


def test_dp_does_not_wrap_a_buffered_rule():
    with pytest.raises(ValueError, match="buffered"):
        jk.algorithms.DPFixedClipping(R.FedMedian(), clip_norm=1.0, noise_multiplier=1.0)


def test_robust_delta_output_settings_refused_early_and_closed_stores():
    """finalize("delta") of a robust rule is the rule's model minus the base (it returned the model); settings the
    kernels cannot run (16-bit slabs for distance rules, an infinite tau or eps) are refused when the rule is made,
    not at finalize after a whole round was buffered; a closed store says so."""
    from jitkernels.robust_store import UpdateStore

    base = {"w": np.full(3, 10.0, np.float32)}
    for alg in (R.FedMedian(), R.CenteredClipping(tau=100.0)):
        agg = jk.Aggregator({"w": np.zeros(3, np.float32)}, alg, base=base)
        for j, v in enumerate((11.0, 12.0, 13.0)):
            agg.fold({"w": np.full(3, v, np.float32)}, 1.0, f"p{j}")
        np.testing.assert_allclose(agg.finalize("delta")["w"], agg.finalize()["w"] - 10.0)
    for make in (lambda: R.Krum(f=1, slab_dtype="float16"), lambda: R.GeometricMedian(slab_dtype="bfloat16"),
                 lambda: R.CenteredClipping(tau=float("inf")), lambda: R.GeometricMedian(eps=float("inf"))):
        with pytest.raises(ValueError):
            make()
    store = UpdateStore(3, 4)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.add(np.ones(3, np.float32), "p")
    store.clear()
    assert store.add(np.ones(3, np.float32), "p") == 0


RULES = robust_rules()


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("backend, env", [("cpp", "cupy"), ("auto", "cpp"), ("numba", None), ("numpy", None)])
def test_rules_run_on_the_aggregators_backend_whatever_jitkernels_backend_says(monkeypatch, rule, backend, env):
    """The rules' host kernels follow the aggregator's backend: with JITKERNELS_BACKEND=cupy (a GPU server's setting)
    a host aggregator's rules asked for CuPy kernels at finalize and failed; with cpp, the Gram rules (which have no
    C++ kernels) failed. Coordinate rules give the same bits on every backend; Gram rules agree to rounding."""
    if jk.available_backends()[backend if backend != "auto" else "cpp"] is not True:
        pytest.skip(f"{backend} unavailable")
    rng = np.random.default_rng(1)
    base = {"w": rng.standard_normal((30, 20)).astype(np.float32), "b": rng.standard_normal(20).astype(np.float32)}
    ups = [{n: (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in base.items()} for _ in range(7)]
    w = rng.uniform(1.0, 9.0, len(ups))
    ref = jk.Aggregator(base, RULES[rule](), backend="numpy", base=base)
    ref.fold_many(ups, w, list(range(7)))
    want = ref.finalize()
    if env is None:
        monkeypatch.delenv("JITKERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("JITKERNELS_BACKEND", env)
    agg = jk.Aggregator(base, RULES[rule](), backend=backend, base=base)
    agg.fold_many(ups, w, list(range(7)))
    got = agg.finalize()
    for n in base:
        if rule in ("median", "trimmed"):
            assert got[n].tobytes() == want[n].tobytes()
        else:
            np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("over", ["refuse", "spill"])
def test_a_restored_robust_state_keeps_its_byte_budget(tmp_path, over):
    """The budget and its rule are saved with the state (a restored aggregator took any number of rows); the spill
    directory is this machine's and is given again to from_state."""
    t = {"w": np.zeros(1000, np.float32)}
    row = 4000
    spill = {"spill_dir": tmp_path / "spill"} if over == "spill" else {}
    agg = jk.Aggregator(t, R.FedMedian(budget_bytes=2 * row, over_budget=over, **spill))
    agg.fold_many([{"w": np.full(1000, float(j), np.float32)} for j in range(2)], parties=["a", "b"])
    agg.state.save(tmp_path / "s.jks")
    state = jk.FoldState.load(tmp_path / "s.jks")
    if over == "spill":
        with pytest.raises(ValueError, match="spill_dir"):
            jk.Aggregator.from_state(state)
    back = jk.Aggregator.from_state(state, **spill)
    assert back.state.store.budget_bytes == 2 * row and back.state.store.over_budget == over
    if over == "refuse":
        with pytest.raises(BudgetExceeded, match="party 'c'.*12000 bytes"):
            back.fold({"w": np.ones(1000, np.float32)}, party="c")
        assert len(back.state.store) == 2
    else:
        back.fold({"w": np.ones(1000, np.float32)}, party="c")
        assert back.state.store.spilled and len(back.state.store) == 3
    back.finalize()
    back.reset()  # the next round's store has the budget too
    assert back.state.store.budget_bytes == 2 * row


def test_loading_a_spilled_store_without_a_spill_dir_says_what_to_give(tmp_path):
    """UpdateStore.load of a store saved with over_budget='spill' and rows past its budget, without a spill_dir,
    refuses (the file does not choose where this process writes): its message told the caller to use 'spill' with
    a spill_dir, as if the store had been saved with 'refuse' (found in review)."""
    from jitkernels.robust_store import UpdateStore

    store = UpdateStore(1000, 4, budget_bytes=4000, over_budget="spill", spill_dir=tmp_path)
    for j in range(3):
        store.add([np.full(1000, float(j), np.float32)], f"p{j}")
    assert store.spilled
    store.save(tmp_path / "s.jks")
    with pytest.raises(BudgetExceeded, match="saved with over_budget='spill': load it with a spill_dir"):
        UpdateStore.load(tmp_path / "s.jks")
    assert len(UpdateStore.load(tmp_path / "s.jks", budget_bytes=None)) == 3
    store.close()


def test_a_buffered_delta_beyond_its_dtype_is_refused_and_counters_are_not_deltas():
    t = {"w": np.zeros(4, np.float16), "c": np.zeros(1, np.int8)}
    base = {"w": np.full(4, -60000, np.float16), "c": np.array([-100], np.int8)}
    for alg in (R.FedMedian(slab_dtype="float16"), R.FedTrimmedAvg(beta=0.1), R.Krum(f=0)):
        agg = jk.Aggregator(t, alg, base=base)
        agg.fold_many([{"w": np.full(4, 60000, np.float16), "c": np.array([100], np.int8)} for _ in range(3)],
                      parties=[0, 1, 2])
        with pytest.raises(jk.ValueOutOfRange, match="leaf 'w'.*120000.*float16"):
            agg.finalize(output="delta")
        ok = jk.Aggregator({"c": np.zeros(1, np.int8), "w": np.zeros(4, np.float32)}, alg,
                           base={"c": np.array([-100], np.int8), "w": np.zeros(4, np.float32)})
        ok.fold_many([{"c": np.array([100], np.int8), "w": np.ones(4, np.float32)} for _ in range(3)],
                     parties=[0, 1, 2])
        assert ok.finalize(output="delta")["c"].tolist() == [100]  # the counters' value, as the streaming path


def test_krum_ties_go_to_the_smallest_party_whatever_the_order():
    """Three updates on a line with f = 0: every score ties. The rule's pick depends on the set, not on the arrival
    order or the merge tree (ties went to the earlier row)."""
    t = {"w": np.zeros(1, np.float32)}
    ups = {"a": 0.0, "b": 1.0, "c": 2.0}

    def run(order, m=1):
        agg = jk.Aggregator(t, R.Krum(f=0, m=m))
        agg.fold_many([{"w": np.array([ups[p]], np.float32)} for p in order], parties=list(order))
        return float(agg.finalize()["w"][0])

    assert {run(o) for o in ("abc", "bca", "cab", "cba")} == {0.0}
    assert {run(o, m=2) for o in ("abc", "cba", "bca")} == {0.5}
    left = jk.Aggregator(t, R.Krum(f=0))
    left.fold({"w": np.array([2.0], np.float32)}, party="c")
    right = jk.Aggregator(t, R.Krum(f=0))
    right.fold_many([{"w": np.array([1.0], np.float32)}, {"w": np.array([0.0], np.float32)}], parties=["b", "a"])
    left.merge(right)
    assert float(left.finalize()["w"][0]) == 0.0


@pytest.mark.parametrize("alg", [lambda: R.Krum(f=0, m=3), lambda: R.GeometricMedian(),
                                 lambda: R.CenteredClipping(tau=10.0)], ids=["multikrum", "geomed", "cclip"])
def test_weights_whose_sum_overflows_give_the_scaled_weights_result(alg):
    rng = np.random.default_rng(0)
    t = {"w": np.zeros(3, np.float32)}
    ups = [{"w": rng.standard_normal(3).astype(np.float32)} for _ in range(5)]
    base = t if alg().needs_base else None
    got, want = jk.Aggregator(t, alg(), base=base), jk.Aggregator(t, alg(), base=base)
    got.fold_many(ups, [1e308, 1e308, 1e308, 1.0, 1.0], list(range(5)))
    want.fold_many(ups, [1.0, 1.0, 1.0, 1e-308, 1e-308], list(range(5)))
    np.testing.assert_allclose(got.finalize()["w"], want.finalize()["w"], rtol=1e-6)


@pytest.mark.parametrize("make, what", [
    (lambda: R.Krum(f=2.9), "f must be an integer >= 0"), (lambda: R.Krum(f=True), "f must be an integer >= 0"),
    (lambda: R.Krum(f=1, m=1.7), "m must be"), (lambda: R.Bulyan(f=0.7), "f must be"),
    (lambda: R.CenteredClipping(tau=1.0, iters=1.9), "iters must be"),
    (lambda: R.GeometricMedian(max_iter=2.5), "max_iter must be"),
    (lambda: R.Krum(f=0, slab_dtype="float64"), "reads float32 slabs")])
def test_rule_parameters_are_integers_not_truncated(make, what):
    """Krum(f=2.9) ran as f = 2: a weaker Byzantine bound than asked for."""
    with pytest.raises(ValueError, match=what):
        make()


def test_multikrum_keeping_more_than_the_round_has_is_too_few_updates():
    agg = jk.Aggregator({"w": np.zeros(2, np.float32)}, R.Krum(f=0, m=5))
    agg.fold_many([{"w": np.full(2, float(j), np.float32)} for j in range(3)], parties=[0, 1, 2])
    with pytest.raises(jk.TooFewUpdates, match="m=5"):
        agg.finalize()


def test_a_refused_batch_names_the_first_row_past_the_budget():
    t = {"w": np.zeros(15, np.float32)}  # 60-byte rows, room for 3
    agg = jk.Aggregator(t, R.FedMedian(budget_bytes=180))
    agg.fold_many([{"w": np.ones(15, np.float32)} for _ in range(2)], parties=["a", "b"])
    with pytest.raises(jk.AggregationError, match="party 'd'.*240 bytes"):
        agg.fold_many([{"w": np.ones(15, np.float32)} for _ in range(3)], parties=["c", "d", "e"])
    assert len(agg.state.store) == 2


def test_states_that_differ_only_in_their_store_budget_merge():
    """The budget bounds a machine's store, not the rule: a coordinator with one merges a worker's state without."""
    t = {"w": np.zeros(8, np.float32)}
    coord, worker = jk.Aggregator(t, R.FedMedian(budget_bytes=10 ** 9)), jk.Aggregator(t, R.FedMedian())
    coord.fold_many([{"w": np.full(8, float(j), np.float32)} for j in range(3)], parties=[0, 1, 2])
    worker.fold_many([{"w": np.full(8, float(j), np.float32)} for j in range(3, 6)], parties=[3, 4, 5])
    coord.merge(worker)
    assert len(coord.state.store) == 6 and coord.finalize()["w"][0] == 2.5
    with pytest.raises(jk.IncompatibleStates):  # another rule parameter is another rule
        jk.Aggregator(t, R.FedTrimmedAvg(beta=0.1)).merge(jk.Aggregator(t, R.FedTrimmedAvg(beta=0.2)))


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
@pytest.mark.parametrize("rule", [lambda: R.FedMedian(), lambda: R.FedTrimmedAvg(beta=0.2), lambda: R.Krum(f=1, m=2),
                                  lambda: R.Bulyan(f=1), lambda: R.GeometricMedian(), lambda: R.CenteredClipping(tau=2.0)],
                         ids=["median", "trimmed", "multikrum", "bulyan", "geomedian", "centered"])
def test_reset_reuse_keeps_the_slab_and_gives_the_same_rounds(rule, backend):
    """reset(reuse=True) released a robust rule's slab, so every round's rows paid first-touch page faults (filling a
    1 GB slab took 0.58 s, 0.14 s into resident pages); it keeps it now, rows and all: nothing zeroes the old rows
    (a write pass over the slab), since no rule reads a row past k. The rounds are those of fresh aggregators, with
    fewer updates after more, stale rows of huge values past k, and a rejected update written into one of them."""
    rng = np.random.default_rng(5)
    tmpl = {"a": np.zeros(300, np.float32), "b": np.zeros((4, 5), np.float32)}

    def make(base):
        alg = rule()
        return jk.Aggregator(tmpl, alg, backend=backend, base=base if alg.needs_base else None)
    agg = make(tmpl)
    slab, base = None, tmpl
    for k, scale in ((9, 1e6), (7, 1.0), (8, 1.0)):
        ups = [{n: (scale * rng.standard_normal(v.shape)).astype(np.float32) for n, v in tmpl.items()}
               for _ in range(k)]
        fresh = make(base)  # (centered clipping steps from its base: the next round starts from the released model)
        fresh.fold_many(ups, [1.0] * k, list(range(k)))
        agg.fold_many(ups, [1.0] * k, list(range(k)))
        bad = {n: np.full(v.shape, 1e30, np.float32) for n, v in tmpl.items()}
        bad["b"][2, 3] = np.nan  # refused by the store itself after row k's first leaf was written
        store = agg.state.store
        with pytest.raises(jk.NonFiniteUpdate):
            store.add(bad, "bad")  # (the aggregator's admission would refuse it before the store saw it)
        assert len(store) == k and (store._slab[k, :300] == 1e30).all()  # a half-written row past k
        want, got = fresh.finalize(), agg.finalize()
        for n in tmpl:
            np.testing.assert_array_equal(got[n], want[n])
        base = got
        if slab is not None:
            assert agg.state.store._slab is slab
        agg.reset(reuse=True)
        slab = agg.state.store._slab


def test_reset_reuse_releases_a_slab_that_spilled(tmp_path):
    """A spilled slab kept by reset(reuse=True) stayed on disk for every later round, even rounds within the budget."""
    n = 100_000
    agg = jk.Aggregator({"w": np.zeros(n, np.float32)},
                        R.FedMedian(budget_bytes=3 * 4 * n, over_budget="spill", spill_dir=str(tmp_path), k_max=64),
                        backend="numpy")
    ups = [{"w": np.random.default_rng(j).standard_normal(n).astype(np.float32)} for j in range(8)]
    agg.fold_many(ups, [1.0] * 8, list(range(8)))
    assert agg.state.store.spilled
    agg.finalize()
    agg.reset(reuse=True)
    agg.fold_many(ups[:2], [1.0] * 2, [0, 1])
    assert not agg.state.store.spilled and not list(tmp_path.iterdir())


def test_a_refused_batch_does_not_leave_the_store_on_disk(tmp_path):
    """A batch whose first update moved a spilling store to disk and whose second was refused (a value past the
    float32 slab's range in a float64 model) was taken back out, but the slab stayed in the file. The batch's values
    are checked before it moves the store: refused, the state and the store stay as they were, in memory."""
    agg = jk.Aggregator({"w": np.zeros(100, np.float64)},
                        R.FedMedian(budget_bytes=2 * 400, over_budget="spill", spill_dir=str(tmp_path)))
    agg.fold_many([{"w": np.full(100, float(j))} for j in range(2)], parties=[0, 1])
    before = agg.state.copy()
    bad = np.full(100, 1.0)
    bad[7] = 1e39
    with pytest.raises(jk.ValueOutOfRange, match="party 3: leaf 'w'"):
        agg.fold_many([{"w": np.full(100, 2.0)}, {"w": bad}], parties=[2, 3])
    assert agg.state.same_bits(before) and not agg.state.store.spilled and list(tmp_path.iterdir()) == []
    agg.fold_many([{"w": np.full(100, 2.0)}], parties=[2])
    assert agg.state.store.spilled and agg.finalize()["w"][0] == 1.0


# --- contracts a mutation review found untested (2026-11-28); each test kills its mutant ----------------------------
def test_geometric_median_and_centered_clipping_weigh_the_parties():
    """Both are weighted by sample counts through the Aggregator: a party of weight 10 among two of weight 1 holds
    the weighted geometric median (10 > 1 + 1), and centered clipping without clipping is the weighted mean."""
    x = {"w": np.zeros(2, np.float32)}
    ups = [np.array([0, 0], np.float32), np.array([1, 0], np.float32), np.array([0, 1], np.float32)]
    for alg, want in ((R.GeometricMedian(), [1.0, 0.0]), (R.CenteredClipping(tau=10.0), [10 / 12, 1 / 12])):
        agg = jk.Aggregator(x, alg, base=x)
        for j, (u, w) in enumerate(zip(ups, (1.0, 10.0, 1.0))):
            agg.fold({"w": u}, party=j, weight=w)
        np.testing.assert_allclose(agg.finalize()["w"], want, atol=1e-4)


def test_trimmed_mean_refuses_a_cut_of_half_when_made():
    """beta = 0.5 trims every update: refused at construction, not at finalize after the round was buffered."""
    with pytest.raises(ValueError, match="beta"):
        R.FedTrimmedAvg(beta=0.5)
    assert R.FedTrimmedAvg(beta=0.49).beta == 0.49


def test_a_robust_state_without_its_store_does_not_merge():
    """A robust rule's state from a file without its store (a checksum vouches for nothing): merged into one with a
    store it raised a bare AttributeError; merged the other way, the other state's rows were dropped unseen."""
    from jitkernels.state import FoldState

    t = {"w": np.zeros(10, np.float32)}
    agg = jk.Aggregator(t, R.FedMedian())
    agg.fold_many([{"w": np.ones(10, np.float32)}] * 2, [1.0, 1.0], ["a", "b"])
    bare = FoldState.from_bytes(FoldState(agg.state.layout, algorithm=agg.state.algorithm).to_bytes())
    kept = agg.state.copy()
    with pytest.raises(jk.IncompatibleStates, match="robust rule's store.*the other has none"):
        agg.merge(bare)
    assert agg.state.same_bits(kept)
    with pytest.raises(jk.IncompatibleStates, match="robust rule's store.*the other has none"):
        bare.merge(agg.state)
