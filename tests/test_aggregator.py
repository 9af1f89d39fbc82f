"""The user-facing API: containers and array types in and out, dtypes, partial updates, bases, integer leaves."""

import collections
import json
import math
import gc
import pickle
import weakref

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jitkernels as jk
from jitkernels.dtypes import bfloat16, np_dtype

from strategies import CPU_BACKENDS, leaf_shapes, make_values, seeds


def _ref_mean(ups, ws):
    return sum(np.float64(w) * u.astype(np.float64) for u, w in zip(ups, ws)) / sum(ws)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quickstart_api(backend, tmp_path):
    rng = np.random.default_rng(1)
    template = {"conv": {"w": np.zeros((4, 3, 3), np.float32), "b": np.zeros(4, np.float32)},
                "fc": np.zeros((10, 5), np.float32)}
    ups = [{"conv": {"w": rng.standard_normal((4, 3, 3)).astype(np.float32),
                     "b": rng.standard_normal(4).astype(np.float32)},
            "fc": rng.standard_normal((10, 5)).astype(np.float32)} for _ in range(6)]
    ws = [10, 20, 5, 1, 7, 3]
    agg = jk.Aggregator(template, algorithm="fedavg", backend=backend, acc_dtype="float32")
    agg.fold(ups[0], weight=ws[0], party="hospital-0")
    u = jk.admit(ups[1], agg.layout, weight=ws[1], party="p1")
    agg.fold_many([u])
    agg.fold_many(ups[2:4], ws[2:4], parties=["p2", "p3"])
    other = jk.Aggregator(template, backend=backend)
    other.fold_many(ups[4:], ws[4:], parties=["p4", "p5"])
    agg.merge(other)
    path = tmp_path / "state.jks"
    agg.state.save(path)
    agg2 = jk.Aggregator.from_state(jk.FoldState.load(path), backend=backend)
    res = agg2.finalize()
    assert set(res) == {"conv", "fc"} and set(res["conv"]) == {"w", "b"}
    assert res["fc"].dtype == np.float32 and res["fc"].shape == (10, 5)
    np.testing.assert_allclose(res["fc"], _ref_mean([x["fc"] for x in ups], ws), rtol=1e-5, atol=1e-6)
    assert agg2.count == 6 and agg2.total_weight == sum(ws)
    assert sorted(agg2.state.parties) == sorted(["hospital-0", "p1", "p2", "p3", "p4", "p5"])


@pytest.mark.parametrize("container", ["list", "tuple", "array"])
def test_containers(container, backend="cpp"):
    rng = np.random.default_rng(2)
    arrs = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,), ()]]
    wrap = {"list": list, "tuple": tuple, "array": lambda a: a[0]}[container]
    agg = jk.Aggregator(wrap(arrs))
    agg.fold(wrap(arrs), weight=2.0, party="a")
    agg.fold(wrap([2 * a for a in arrs]), weight=2.0, party="b")
    out = agg.finalize()
    if container == "array":
        assert isinstance(out, np.ndarray)
        np.testing.assert_allclose(out, 1.5 * arrs[0], rtol=1e-6)
    else:
        assert type(out) is (list if container == "list" else tuple)
        for o, a in zip(out, arrs):
            np.testing.assert_allclose(o, 1.5 * a, rtol=1e-6)


@pytest.mark.parametrize("many", [False, True])
def test_an_update_admitted_against_a_base_is_measured_again_where_none_is(many):
    """Stats of u - b say nothing of u: two updates of 3e38 admitted against a base of 3e38 (max |u - b| = 0) were
    folded as u by an aggregator without a base, past the headroom check, into an inf accumulator that finalize
    returned. They are measured again and refused, as the same updates folded raw are."""
    t = {"a": np.zeros(4, np.float32)}
    big = {"a": np.full(4, 3e38, np.float32)}
    adm = [jk.admit(big, jk.Layout.from_template(t), weight=1.0, party=p, base=big["a"]) for p in ("p0", "p1")]
    assert adm[0].maxabs == 0.0
    agg = jk.Aggregator(t)
    with pytest.raises(jk.ValueOutOfRange, match="headroom"):
        agg.fold_many(adm) if many else agg.fold(adm[0])
    assert agg.count == 0 and not agg.state.acc.any()


@pytest.mark.parametrize("alg", [jk.algorithms.FedAvgM(lr=30.0), jk.algorithms.FedBuff(server_lr=30.0)])
def test_a_float64_model_stepped_or_amplified_past_its_range_is_refused(alg):
    """A server step (FedAvgM) or an amplified mean (FedBuff's server_lr > 1) can take a float64 model past float64's
    range: the float32 model was refused by name, the float64 one returned inf (its outputs went unread)."""
    top = float(np.finfo(np.float64).max)
    t = {"w": np.zeros(4, np.float64)}
    base = {"w": np.full(4, top * (1 - 1e-7))}
    agg = jk.Aggregator(t, alg, base=base, acc_dtype="float64")
    agg.fold({"w": base["w"] + top * 1e-7}, 1.0, "p", **({"staleness": 0} if alg.name == "fedbuff" else {}))
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'w'.*float64"):
        agg.finalize()


_Params = collections.namedtuple("_Params", "weight bias")


def test_ordered_dicts_and_namedtuples_come_back_as_they_went_in():
    """torch's state_dict() is an OrderedDict; a namedtuple template gives named fields: the result is of the
    template's own container types at every level (they came back as a dict and a plain tuple, and ``.weight`` was
    an AttributeError). A state from a file rebuilds plain ones: files keep no Python types."""
    sd = torch.nn.Linear(3, 2).state_dict()
    tmpl = {"net": sd, "extra": [_Params(np.zeros(2, np.float32), np.zeros(1, np.float32))]}
    agg = jk.Aggregator(tmpl)
    agg.fold({"net": {k: v + 1 for k, v in sd.items()},
              "extra": [(np.ones(2, np.float32), np.full(1, 3, np.float32))]}, 1.0, "a")
    out = agg.finalize()
    assert type(out) is dict and type(out["net"]) is collections.OrderedDict and list(out["net"]) == list(sd)
    assert type(out["extra"][0]) is _Params and out["extra"][0].bias[0] == 3
    torch.testing.assert_close(out["net"]["weight"], sd["weight"] + 1)
    solo = jk.Aggregator(_Params(np.zeros(2, np.float32), np.zeros(1, np.float32)))
    solo.fold(_Params(np.ones(2, np.float32), np.ones(1, np.float32)), 1.0, "a")
    assert solo.finalize().weight.tolist() == [1.0, 1.0]
    loaded = jk.Aggregator.from_state(jk.FoldState.from_bytes(agg.state.to_bytes())).finalize()
    assert type(loaded["net"]) is dict and type(loaded["extra"][0]) is tuple


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_in_and_out(dtype):
    torch.manual_seed(0)
    sd = {"w": torch.randn(8, 4, dtype=dtype), "b": torch.randn(8, dtype=dtype),
          "bn.num_batches_tracked": torch.tensor(10, dtype=torch.int64)}
    agg = jk.Aggregator(sd)
    ups = [{k: (v + i if v.is_floating_point() else v + i) for k, v in sd.items()} for i in range(3)]
    for i, u in enumerate(ups):
        agg.fold(u, weight=1.0, party=i)
    out = agg.finalize()
    assert isinstance(out["w"], torch.Tensor) and out["w"].dtype == dtype
    ref = torch.stack([u["w"].double() for u in ups]).mean(0)
    tol = {torch.float16: 1e-2, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(out["w"].double(), ref, rtol=tol, atol=tol)
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 11


def test_torch_tensors_are_read_in_place():
    t = torch.arange(6, dtype=torch.float32)
    agg = jk.Aggregator({"x": t})
    u = agg.admit({"x": t}, 1.0, "a")
    assert u.leaves[0].__array_interface__["data"][0] == t.data_ptr()


def test_non_contiguous_and_byteswapped_leaves():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    strided = base[:, ::2]  # (4, 3) view with strides
    assert not strided.flags.c_contiguous
    swapped = np.ascontiguousarray(strided).astype(">f4")
    agg = jk.Aggregator({"x": np.zeros((4, 3), np.float32)}, backend="cpp")
    agg.fold({"x": strided}, party="a")
    agg.fold({"x": swapped}, party="b")
    np.testing.assert_array_equal(agg.finalize()["x"], strided)
    tstrided = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, ::2]
    agg2 = jk.Aggregator({"x": tstrided})
    agg2.fold({"x": tstrided}, party="t")
    np.testing.assert_array_equal(agg2.finalize()["x"].numpy(), tstrided.numpy())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("in_dtype", ["float32", "float16", "bfloat16", "float64"])
def test_half_inputs_accumulate_wide(backend, in_dtype):
    """fp16 would overflow at 65504 if accumulated in the input dtype; the accumulator never is the input dtype."""
    dt = bfloat16 if in_dtype == "bfloat16" else np.dtype(in_dtype)
    x = np.full(5, 60000.0).astype(dt)
    agg = jk.Aggregator({"x": x}, backend="auto" if (backend == "numba" and in_dtype == "float16") else backend)
    agg.fold_many([{"x": x}] * 8, [1000.0] * 8, parties=list(range(8)))
    out = agg.finalize()["x"]
    assert out.dtype == dt
    np.testing.assert_allclose(out.astype(np.float64), x.astype(np.float64), rtol=1e-3)


@pytest.mark.parametrize("block", [None, 16])
def test_quantized_updates(block):
    rng = np.random.default_rng(3)
    tmpl = {"a": np.zeros(100, np.float32), "b": np.zeros((7, 7), np.float16)}
    raw = [{k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in tmpl.items()} for _ in range(4)]
    q = [{k: jk.Quantized.quantize(v.astype(np.float32), block=block) for k, v in u.items()} for u in raw]
    agg = jk.Aggregator(tmpl, backend="cpp")
    agg.fold_many(q, [1, 2, 3, 4], parties=list("abcd"))
    out = agg.finalize()
    deq = [{k: v.dequantize() for k, v in u.items()} for u in q]
    np.testing.assert_allclose(out["a"], _ref_mean([d["a"] for d in deq], [1, 2, 3, 4]), rtol=1e-5, atol=1e-6)
    assert out["b"].dtype == np.float16


def test_quantized_scales_from_torch_tensors_are_read_as_values():
    """Scales given as torch tensors, bfloat16 ones included, are their values (numpy could not read a bf16
    tensor: an unnamed TypeError)."""
    torch = pytest.importorskip("torch")
    q = np.array([1, 2, 3, 4], np.int8)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        got = jk.Quantized(torch.from_numpy(q), torch.tensor([1.0, 0.5], dtype=dt), 2)
        assert got.dequantize().tolist() == [1.0, 2.0, 1.5, 2.0], dt


def test_mixed_raw_and_quantized_batch():
    rng = np.random.default_rng(4)
    x = [rng.standard_normal(50).astype(np.float32) for _ in range(3)]
    agg = jk.Aggregator(np.zeros(50, np.float32), backend="cpp")
    agg.fold_many([x[0], jk.Quantized.quantize(x[1]), x[2]], [1, 1, 1], parties=[0, 1, 2])
    want = (x[0] + jk.Quantized.quantize(x[1]).dequantize() + x[2]) / 3
    np.testing.assert_allclose(agg.finalize(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "numba", "numpy"])
def test_mixed_batch_checks_every_dtype_group(backend):
    """A leaf that one update sends raw and another quantized is in two dtype groups: a NaN in the quantized one is
    found even though the raw group alone covers every leaf."""
    x = np.ones(50, np.float32)
    bad = jk.Quantized.quantize(x)
    bad.scale[0] = np.nan
    agg = jk.Aggregator(np.zeros(50, np.float32), backend=backend)
    with pytest.raises(jk.NonFiniteUpdate, match="p1"):
        agg.admit_many([x, bad], [1, 1], parties=["p0", "p1"])
    with pytest.raises(jk.NonFiniteUpdate, match="p1"):
        agg.fold_many([x, bad], [1, 1], parties=["p0", "p1"])
    assert agg.state.count == 0


def test_partial_updates_use_per_leaf_weights():
    tmpl = {"base": np.zeros(4, np.float32), "lora": np.zeros(2, np.float32)}
    agg = jk.Aggregator(tmpl, partial=True)
    agg.fold({"base": np.ones(4, np.float32), "lora": np.full(2, 3.0, np.float32)}, weight=1, party="a")
    agg.fold({"base": np.full(4, 3.0, np.float32)}, weight=1, party="b")  # no lora
    out = agg.finalize()
    np.testing.assert_array_equal(out["base"], np.full(4, 2.0))
    np.testing.assert_array_equal(out["lora"], np.full(2, 3.0))  # only a carried it
    strict = jk.Aggregator(tmpl)
    with pytest.raises(jk.LayoutMismatch, match="lora"):
        strict.fold({"base": np.ones(4, np.float32)}, party="x")
    # admitted elsewhere as partial: the strict aggregator names the first update lacking a leaf, and folds none
    whole = jk.admit({"base": np.ones(4, np.float32), "lora": np.ones(2, np.float32)}, strict.layout, party="y")
    part = jk.admit({"base": np.ones(4, np.float32)}, strict.layout, party="z", partial=True)
    with pytest.raises(jk.LayoutMismatch, match="party 'z', leaf 'lora'") as e:
        strict.fold_many([whole, part])
    assert (e.value.party, e.value.leaf) == ("z", "lora") and strict.state.count == 0


def test_leaf_nobody_sent_needs_a_base():
    tmpl = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    agg = jk.Aggregator(tmpl, partial=True)
    agg.fold({"a": np.ones(2, np.float32)}, party="p")
    with pytest.raises(jk.EmptyAggregate, match="'b'"):
        agg.finalize()
    with_base = jk.Aggregator(tmpl, partial=True, base={"a": np.zeros(2, np.float32), "b": np.full(2, 5.0, np.float32)})
    with_base.fold({"a": np.ones(2, np.float32)}, party="p")
    np.testing.assert_array_equal(with_base.finalize()["b"], [5.0, 5.0])  # unchanged global value


def test_delta_fold_against_base():
    rng = np.random.default_rng(5)
    base = (rng.standard_normal(1000) * 100).astype(np.float32)
    deltas = [(rng.standard_normal(1000) * 1e-4).astype(np.float32) for _ in range(4)]
    agg = jk.Aggregator(base, base=base, backend="cpp")
    agg.fold_many([base + d for d in deltas], [1, 1, 1, 1], parties=list("abcd"))
    delta = agg.finalize(output="delta")
    want = np.mean([(base + d).astype(np.float64) - base for d in deltas], axis=0)
    np.testing.assert_allclose(delta, want, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(agg.finalize(), base + want, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint8])
@pytest.mark.parametrize("rule,want", [("mean", 15), ("max", 20)])
def test_integer_leaf_rules(rule, want, dtype, backend):
    """Integer leaves of every width follow the rule, one by one and in a batch: an int8 array is an integer leaf,
    not the int8 group's quantized values (it was folded as one, without scales: a SIGFPE in the C++ kernel)."""
    tmpl = {"w": np.zeros(2, np.float32), "n": np.zeros(3, dtype)}
    ups = [{"w": np.ones(2, np.float32), "n": np.full(3, v, dtype)} for v in (10, 20)]
    agg = jk.Aggregator(tmpl, int_leaves=rule, backend=backend)
    for p, u in zip("ab", ups):
        agg.fold(u, party=p)
    batch = jk.Aggregator(tmpl, int_leaves=rule, backend=backend)
    batch.fold_many(ups, parties=["a", "b"])
    for out in (agg.finalize(), batch.finalize()):
        assert out["n"].dtype == dtype and out["n"].tolist() == [want] * 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_integer_leaf_beyond_the_accumulators_headroom_is_refused_on_every_path(backend):
    """Counters are summed as mass * x in the accumulator: a term past its headroom is refused by name (it made the
    sum inf and the result INT64_MIN), one by one, in a batch, and in the fused admission of a first batch (C++),
    and the state stays as it was."""
    t = {"w": np.zeros(2, np.float32), "n": np.zeros((), np.int64)}
    good = {"w": np.ones(2, np.float32), "n": np.array(5, np.int64)}
    big = {"w": np.ones(2, np.float32), "n": np.array(2 ** 62, np.int64)}
    for fold in (lambda a: a.fold(big, weight=1e20, party="big"),
                 lambda a: a.fold(a.admit(big, 1e20, "big")),
                 lambda a: a.fold_many([good, big], [1.0, 1e20], parties=["g", "big"]),
                 lambda a: a.fold_many(a.admit_many([good, big], [1.0, 1e20], ["g", "big"]))):
        for first in (False, True):  # into an empty state (the fused pass) and into one that holds an update
            agg = jk.Aggregator(t, backend=backend)
            if not first:
                agg.fold(good, party="before")
            kept = agg.state.copy()
            with pytest.raises(jk.ValueOutOfRange, match="'big'.*leaf 'n'.*float32 accumulator's headroom"):
                fold(agg)
            assert agg.state.same_bits(kept)
    ok = jk.Aggregator(t, backend=backend, acc_dtype="float64")  # within a float64 accumulator's headroom
    ok.fold(big, weight=1e20, party="big")
    assert int(ok.finalize()["n"]) == 2 ** 62
    # on arrival: admission refused nothing here, so a scheduler acknowledged the update and its round then failed
    # for every party (deterministic: 5,000 samples x a BatchNorm counter of 300,000 is past 2^30)
    with pytest.raises(jk.ValueOutOfRange, match="'big'.*leaf 'n'"):
        jk.Aggregator(t, backend=backend).admit(big, 1e20, "big")
    det = jk.Aggregator(t, backend=backend, deterministic=True)
    with pytest.raises(jk.ValueOutOfRange, match="'bn'.*leaf 'n'.*deterministic bound"):
        det.admit({"w": np.ones(2, np.float32), "n": np.array(300_000, np.int64)}, 5000, "bn")
    unweighted = jk.Aggregator(t, jk.algorithms.FedAvg(weighted=False), backend=backend, deterministic=True)
    unweighted.fold(unweighted.admit({"w": np.ones(2, np.float32), "n": np.array(300_000, np.int64)}, 5000, "bn"))
    assert int(unweighted.finalize()["n"]) == 300_000  # mass 1: held by its mass, not the raw weight (review)
    maxrule = jk.Aggregator(t, backend=backend, int_leaves="max")  # not summed: nothing to hold
    maxrule.fold(maxrule.admit(big, 1e20, "big"))
    assert int(maxrule.finalize()["n"]) == 2 ** 62


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_finite_update_whose_value_overflows_is_out_of_range_not_non_finite(backend):
    """A finite update whose delta against the base (or whose q * scale) is past float32's range is refused as out
    of range on every backend (C++ forms it in float32, where it is inf: it was called non-finite); an update that
    holds an inf (or a non-finite scale) is non-finite on every backend."""
    t = {"w": np.zeros(2, np.float32)}
    cases = [({"w": np.array([3e38, 0], np.float32)}, {"w": np.array([-3e38, 0], np.float32)}, jk.ValueOutOfRange),
             ({"w": np.array([np.inf, 0], np.float32)}, {"w": np.zeros(2, np.float32)}, jk.NonFiniteUpdate),
             ({"w": jk.Quantized(np.array([127, 1], np.int8), np.float32(3e38))}, None, jk.ValueOutOfRange),
             ({"w": jk.Quantized(np.array([127, 1], np.int8), np.float32(np.inf))}, None, jk.NonFiniteUpdate)]
    for update, base, error in cases:
        agg = jk.Aggregator(t, backend=backend, base=base)
        for fold in (lambda: agg.fold(update, party="p"), lambda: agg.fold_many([update], parties=["p"])):
            with pytest.raises(error, match="'p'.*leaf 'w'"):
                fold()
        assert agg.state.count == 0 and not agg.state.acc.any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_value_out_of_range_names_its_party_leaf_and_value_as_fields(backend):
    """ValueOutOfRange carries what it names (``party``, ``leaf``, ``value``) as fields, as NonFiniteUpdate does: a
    server that quarantines a party reads them, not the message. It carried them in its message only."""
    t = {"a": np.zeros(2, np.float32), "w": np.zeros(2, np.float32)}
    big = {"a": np.zeros(2, np.float32), "w": np.array([3e38, 0], np.float32)}
    agg = jk.Aggregator(t, backend=backend, base={"a": np.zeros(2, np.float32), "w": np.array([-3e38, 0], np.float32)})
    for fold in (lambda: agg.fold(big, party="p"), lambda: agg.fold_many([big], parties=["p"])):
        with pytest.raises(jk.ValueOutOfRange) as e:
            fold()
        # (6e38; inf on cpp, whose float32 admission stats measure the delta in float32)
        assert (e.value.party, e.value.leaf) == ("p", "w") and e.value.value > 3.4e38
    agg = jk.Aggregator(t, backend=backend)
    for weight in (1e-300, 10 ** 400):
        with pytest.raises(jk.ValueOutOfRange) as e:
            agg.fold(big, weight, party=7)
        assert (e.value.party, e.value.leaf, e.value.value) == (7, None, weight)
    top = np.array([6e4, 0], np.float16)
    f16 = jk.Aggregator({"h": np.zeros(2, np.float16)}, base={"h": top})  # (numba runs no float16)
    f16.fold({"h": -top}, party="x")
    with pytest.raises(jk.ValueOutOfRange) as e:  # a mean delta past float16's 65504: the leaf and its reach
        f16.finalize("delta")
    assert (e.value.party, e.value.leaf) == (None, "h") and e.value.value == pytest.approx(1.2e5, rel=1e-3)
    assert pickle.loads(pickle.dumps(e.value)).__dict__ == e.value.__dict__


@pytest.mark.parametrize("dtype", [np.complex64, np.longdouble, np.dtype("U3"), np.dtype("datetime64[s]")])
def test_a_template_leaf_of_an_unsupported_dtype_is_refused_by_name(dtype):
    """Leaves are float, integer or bool. A complex leaf was taken as an integer one (its imaginary part dropped,
    its mean rounded), as was an extended-precision float."""
    with pytest.raises(TypeError, match="template leaf 'b' has dtype"):
        jk.Aggregator({"a": np.zeros(2, np.float32), "b": np.zeros(2, dtype)})
    jk.Aggregator({"a": np.zeros(2, np.float32), "b": np.zeros(2, bool), "c": np.zeros(1, np.uint16)})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_result_beyond_its_dtypes_range_is_refused_by_name(dtype, backend):
    """A float64 accumulator (an int8 update whose scale takes it past float32's range) or a server step can take a
    result beyond its output dtype: refused naming the leaf, not handed on as inf; a result in range passes."""
    if backend == "numba" and dtype == "float16":
        pytest.skip("numba does not run float16")
    t = {"ok": np.zeros(3, np_dtype(dtype)), "w": np.zeros(2, np_dtype(dtype))}
    agg = jk.Aggregator(t, acc_dtype="float64", backend=backend)
    agg.fold({"ok": np.ones(3, np_dtype(dtype)), "w": jk.Quantized(np.array([127, 1], np.int8), np.float32(3e38))},
             party="p")
    with pytest.raises(jk.ValueOutOfRange, match=f"leaf 'w'.*3.81e\\+40.*beyond {dtype}'s"):
        agg.finalize()
    top = float(ml_dtypes.finfo(np_dtype(dtype)).max)
    base = {"ok": np.zeros(3, np_dtype(dtype)), "w": np.full(2, top / 2, np_dtype(dtype))}
    stepped = jk.Aggregator(t, jk.algorithms.FedAvgM(lr=30.0), acc_dtype="float64", backend=backend, base=base)
    stepped.fold({"ok": np.ones(3, np_dtype(dtype)), "w": np.full(2, top, np_dtype(dtype))}, party="p")
    with pytest.raises(jk.ValueOutOfRange, match=f"leaf 'w'.*beyond {dtype}'s.*state.base"):
        stepped.finalize()
    fine = jk.Aggregator(t, acc_dtype="float64", backend=backend)
    fine.fold({"ok": np.ones(3, np_dtype(dtype)), "w": np.full(2, top, np_dtype(dtype))}, party="p")
    assert np.isfinite(fine.finalize()["w"].astype(np.float64)).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("path", ["fused", "per_update", "loaded"])
def test_a_float32_mean_of_float32_values_past_the_range_is_refused(backend, path, tmp_path):
    """Each weight is rounded to float32 on its own and the divisor as their sum, so a mean of values at float32's
    largest can round past it: three of them at weight 0.7 x 2^-21 made inf, returned as the model. Refused by name on
    every fold path, and after a state's round trip through a file (which does not carry the folded values' peak)."""
    top = np.finfo(np.float32).max
    agg = jk.Aggregator(np.zeros(4, np.float32), backend=backend)
    ups = [np.full(4, top, np.float32)] * 3
    w = 0.7 * 2.0 ** -21
    if path == "fused":
        agg.fold_many(ups, [w] * 3, parties=[0, 1, 2])
    else:
        for j, u in enumerate(ups):
            agg.fold(u, weight=w, party=j)
    if path == "loaded":
        agg.state.save(tmp_path / "s.jks")
        agg = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / "s.jks"), backend=backend)
        assert np.isnan(agg.state.peak)
    with pytest.raises(jk.ValueOutOfRange, match="beyond float32's"):
        agg.finalize()


def test_finalize_reads_its_outputs_for_inf_only_where_the_mean_could_pass_their_range(monkeypatch):
    """The check reads each output once more: skipped where the folded values' peak keeps the mean inside the
    dtype's range (a float16 model of values below 65504), made where it does not, and always after a merge with a
    state of unknown peak."""
    import jitkernels.aggregator as ag

    reads = []
    real = ag._overflowed
    monkeypatch.setattr(ag, "_overflowed", lambda out: reads.append(out.dtype.name) or real(out))
    t = {"h": np.zeros(3, np.float16), "f": np.zeros(3, np.float32)}
    agg = jk.Aggregator(t, backend="cpp")
    agg.fold_many([{"h": np.full(3, 2.0, np.float16), "f": np.ones(3, np.float32)}] * 2, parties=["a", "b"])
    agg.finalize()
    assert reads == [] and agg.state.peak == 2.0
    near = jk.Aggregator(t, backend="cpp")
    near.fold({"h": np.full(3, 65504.0, np.float16), "f": np.ones(3, np.float32)}, party="c")
    near.finalize()
    assert reads == ["float16"]  # within (k + 4) ulp of float16's largest: checked (and in range)
    reads.clear()
    other = jk.FoldState.from_bytes(near.state.to_bytes())  # (a partial aggregate from a worker: peak not known)
    agg.merge(other)
    assert np.isnan(agg.state.peak)
    agg.finalize()
    assert sorted(reads) == ["float16", "float32"]


def test_a_delta_of_updates_admitted_without_the_base_is_checked_for_its_range():
    """jk.admit measures u, not u - base, and the fold lets such an update be where max|u| + max|base| keeps it within
    the headroom: the folded values' peak was then that of u, and finalize(output="delta") of a float16 leaf (base
    -60000, u 60000) returned inf unread. Such an update leaves the peak unknown, so the output is read."""
    tmpl = {"w": np.zeros(4, np.float16)}
    agg = jk.Aggregator(tmpl, base={"w": np.full(4, -60000, np.float16)})
    agg.fold(jk.admit({"w": np.full(4, 60000, np.float16)}, agg.layout, party="p"))
    assert np.isnan(agg.state.peak)
    with pytest.raises(jk.ValueOutOfRange, match="120000.*beyond float16's"):
        agg.finalize(output="delta")
    fused = jk.Aggregator({"w": np.zeros(4, np.float32)}, backend="cpp", base={"w": np.ones(4, np.float32)})
    fused.fold_many([{"w": np.full(4, 3.0, np.float32)}], parties=["p"])  # (admitted and folded in one pass)
    assert fused.state.peak == 2.0  # measured against the base: known


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_leaves_take_the_threaded_finiteness_check_with_the_same_refusals(backend):
    """Leaves of 64K elements or more are checked in one pass on the kernel threads (admission.finite_maxabs: a
    base's finiteness and max |x|, a finalized output's overflow) where numpy took two single-threaded reductions
    each: the same refusals, naming the same leaf and value, as the numpy path of small leaves."""
    n = 70_000
    zeros = {"a": np.zeros(n, np.float32), "b": np.zeros(n, np.float32)}
    base = {"a": np.zeros(n, np.float32), "b": np.zeros(n, np.float32)}
    base["b"][n - 3] = np.nan
    with pytest.raises(jk.NonFiniteUpdate, match="'<base>'.*leaf 'b'.*1 non-finite"):
        jk.Aggregator(zeros, backend=backend, base=base)
    base["b"][n - 3] = -3e38  # max |base| 3e38 (the range cap: 3.4e38 less it) ...
    agg = jk.Aggregator(zeros, backend=backend, base=base, acc_dtype="float64")
    big = {"a": np.zeros(n, np.float32), "b": np.zeros(n, np.float32)}
    big["b"][n - 3] = 3e38  # ... and a delta of 6e38, which float64 holds: its float32 delta output does not
    agg.fold(big, party="p")
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'b'.*6e\\+38.*beyond float32"):
        agg.finalize(output="delta")
    np.testing.assert_array_equal(agg.finalize()["b"], big["b"])  # (the model itself is in range)


def test_a_large_bases_max_is_taken_in_its_finiteness_pass(monkeypatch):
    """A base given to the constructor or to reset() was read once for its finiteness and again for its max |x|
    (admission's range cap): the one threaded pass gives both, and the second pass is not made."""
    from jitkernels import admission

    n = 70_000
    base = {"w": np.full(n, -2.0, np.float32)}
    calls = []
    real = admission.abs_max
    monkeypatch.setattr(admission, "abs_max", lambda a: calls.append(a) or real(a))
    agg = jk.Aggregator({"w": np.zeros(n, np.float32)}, backend="numpy", base=base)
    assert agg._base_max() == 2.0
    agg.reset(base={"w": np.full(n, 3.0, np.float32)})
    assert agg._base_max() == 3.0 and agg._range_cap() == admission.largest("float32") - 3.0
    agg.fold({"w": np.ones(n, np.float32)}, party="p")
    np.testing.assert_array_equal(agg.finalize()["w"], np.ones(n, np.float32))
    small = jk.Aggregator({"w": np.zeros(4, np.float32)}, backend="numpy", base={"w": np.full(4, 5.0, np.float32)})
    assert small._base_max() == 5.0  # (a small base: numpy's reductions, as before)
    expected = 0 if jk.available_backends()["cpp"] is True else 2
    assert len(calls) == expected + 1


def test_unweighted_fedavg_ignores_weights():
    agg = jk.Aggregator(np.zeros(2, np.float32), algorithm="fedavg_unweighted")
    agg.fold(np.array([1.0, 1.0], np.float32), weight=100, party="a")
    agg.fold(np.array([3.0, 3.0], np.float32), weight=1, party="b")
    np.testing.assert_array_equal(agg.finalize(), [2.0, 2.0])


def test_copy_on_admit_protects_against_mutation():
    x = np.ones(4, np.float32)
    agg = jk.Aggregator(x, copy=True)
    u = agg.admit(x, 1.0, "a")
    x[:] = 100.0  # the caller reuses its buffer before the fold
    agg.fold_many([u])
    np.testing.assert_array_equal(agg.finalize(), np.ones(4))


def test_reset_starts_next_round():
    agg = jk.Aggregator(np.zeros(2, np.float32))
    agg.fold(np.ones(2, np.float32), party="a")
    done = agg.reset()
    assert done.count == 1 and agg.count == 0
    agg.fold(np.full(2, 4.0, np.float32), party="a")  # the same party may report again next round
    np.testing.assert_array_equal(agg.finalize(), [4.0, 4.0])


def test_finalize_packs_small_output_leaves_into_shared_allocations(monkeypatch):
    """Fresh outputs under 4 MB share allocations of at most PACK_BYTES, each leaf on a 64-byte boundary and apart
    from the others (one allocation each made a model of many small leaves fault a page per 4 KB written); larger
    ones own theirs. The values are the same either way."""
    from jitkernels import aggregator as agg_mod

    monkeypatch.setattr(agg_mod, "PACK_BYTES", 1 << 12)  # (small packs: several of them here)
    rng = np.random.default_rng(21)
    tmpl = {"a": np.zeros(300, np.float32), "b": np.zeros((7, 5), np.float16), "c": np.zeros(0, np.float32),
            "d": np.zeros(1500, ml_dtypes.bfloat16), "e": np.zeros(1 << 20, np.float32), "f": np.zeros((), np.float64)}
    agg = jk.Aggregator(tmpl, backend="numpy")
    ups = [{n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in tmpl.items()} for _ in range(3)]
    agg.fold_many(ups, [1.0, 2.0, 3.0], ["p", "q", "r"])
    out = agg.finalize()
    want = {n: sum(w * u[n].astype(np.float64) for w, u in zip((1, 2, 3), ups)) / 6 for n in tmpl}
    for n in tmpl:
        assert out[n].dtype == tmpl[n].dtype and out[n].shape == tmpl[n].shape and out[n].flags.writeable
        np.testing.assert_allclose(out[n].astype(np.float64), want[n], rtol=1e-2)
        assert n == "e" or out[n].ctypes.data % 64 == 0  # ("e" is numpy's own allocation: 16-byte aligned)
    assert out["e"].flags.owndata  # (4 MB: its own allocation, in huge pages)
    assert out["a"].base is out["b"].base and out["d"].base is not out["a"].base  # (3000 bytes more: the next pack)
    for x, y in ((out["a"], out["b"]), (out["b"], out["f"]), (out["a"], out["d"])):
        assert not np.shares_memory(x, y)


def test_finalize_into_given_outputs():
    tmpl = {"a": np.zeros(5, np.float32), "b": np.zeros((2, 2), np.float16)}
    agg = jk.Aggregator(tmpl)
    agg.fold({"a": np.ones(5, np.float32), "b": np.ones((2, 2), np.float16)}, party="x")
    out = {"a": np.full(5, 9, np.float32), "b": np.full((2, 2), 9, np.float16)}
    res = agg.finalize(out=out)
    assert res is out and np.all(out["a"] == 1) and np.all(out["b"] == 1)
    with pytest.raises(jk.LayoutMismatch, match="'b'"):
        agg.finalize(out={"a": np.zeros(5, np.float32), "b": np.zeros((2, 2), np.float32)})
    t = torch.zeros(5)
    agg2 = jk.Aggregator(t)
    agg2.fold(torch.ones(5), party=1)
    agg2.finalize(out=t)
    assert torch.equal(t, torch.ones(5))
    with pytest.raises(jk.LayoutMismatch, match="C-contiguous"):
        agg.finalize(out={"a": np.zeros(10, np.float32)[::2], "b": np.zeros((2, 2), np.float16)})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_leaves_that_share_memory_are_refused(backend):
    """Each backend writes the outputs in its own order: out=[buf, buf] gave one leaf's mean on numpy and the other's
    on cpp and numba. Overlapping outputs are refused by name, before anything is written; a numpy scalar (which
    np.asarray copies, losing the result) is refused as an output leaf."""
    agg = jk.Aggregator([np.zeros(4, np.float32), np.zeros(4, np.float32)], backend=backend)
    agg.fold([np.ones(4, np.float32), np.full(4, 2.0, np.float32)], party="p")
    buf = np.full(8, 7.0, np.float32)
    for out in ([buf[:4], buf[:4]], [buf[:4], buf[2:6]], [buf[4:], buf[1:5]]):
        with pytest.raises(jk.LayoutMismatch, match="shares memory with out leaf '1'"):
            agg.finalize(out=out)
        assert (buf == 7.0).all()
    agg.finalize(out=[buf[:4], buf[4:]])  # adjacent, not overlapping
    np.testing.assert_array_equal(buf, [1] * 4 + [2] * 4)
    scalar = jk.Aggregator({"s": np.zeros((), np.float32)}, backend=backend)
    scalar.fold({"s": np.ones((), np.float32)}, party="p")
    with pytest.raises(jk.LayoutMismatch, match="numpy scalar float32"):
        scalar.finalize(out={"s": np.float32(-1)})
    out = {"s": np.zeros((), np.float32)}
    assert scalar.finalize(out=out)["s"] == 1.0


def test_admitted_updates_refuse_a_weight_party_or_info_given_beside_them():
    """An admitted update carries the weight and party it was admitted with: a weight given again was dropped
    silently (a mean of 5 where 1 was meant). Refused on fold and fold_many, the state unchanged."""
    agg = jk.Aggregator(np.zeros(2, np.float32))
    u = agg.admit(np.ones(2, np.float32), weight=1.0, party="a")
    before = agg.state.copy()
    for call in (lambda: agg.fold(u, weight=9.0), lambda: agg.fold(u, party="renamed"),
                 lambda: agg.fold(u, steps=3), lambda: agg.fold_many([u], weights=[9.0]),
                 lambda: agg.fold_many([u], parties=["renamed"]), lambda: agg.fold_many([u], infos=[{}])):
        with pytest.raises(TypeError, match="carry their own"):
            call()
        assert agg.state.same_bits(before)
    agg.fold(u)
    assert agg.state.parties == {"a": 1.0}


def test_an_info_that_is_not_a_dict_is_refused_by_name():
    agg = jk.Aggregator(np.zeros(2, np.float32), jk.algorithms.FedNova(), base=np.zeros(2, np.float32))
    with pytest.raises(TypeError, match=r"infos\[1\] \(party 'b'\) is a str"):
        agg.fold_many([np.ones(2, np.float32)] * 2, parties=["a", "b"], infos=[{"steps": 2}, "steps=3"])
    assert agg.count == 0


def test_leaves_of_one_name_are_refused():
    """{"a.b": x, "a": {"b": y}} named two leaves 'a.b': a robust rule's store (keyed by name) kept one, and blamed
    every party for the other."""
    with pytest.raises(TypeError, match="two leaves are named 'a.b'"):
        jk.Aggregator({"a.b": np.zeros(2, np.float32), "a": {"b": np.zeros(2, np.float32)}})


def test_leaf_entries_fast_path_equals_the_per_leaf_one():
    """admission.leaf_entries takes the layout's codes and one C++ call for numpy leaves: the same table as
    batch.leaf_entry leaf by leaf (empty, integer and bfloat16 leaves included), and the signature the table's codes
    give; other leaves take the per-leaf path, their signature left to Admitted.signature."""
    from jitkernels import admission
    from jitkernels.batch import leaf_entry

    tmpl = {"a": np.zeros((3, 4), np.float32), "e": np.zeros(0, np.float32), "n": np.zeros(2, np.int64),
            "b": np.zeros(5, jk.bfloat16), "h": np.zeros(6, np.float16)}
    lay = jk.Aggregator(tmpl, backend="numpy").layout
    upd = {k: np.ones_like(v) for k, v in tmpl.items()}
    leaves = lay.flatten(upd)
    (fast,), (sig,) = admission.leaf_entries(lay, [leaves])
    slow = np.array([leaf_entry(a) for a in leaves], np.int64).reshape(len(leaves), 4)
    assert fast.tobytes() == slow.tobytes()
    assert sig == slow[:, 0].tobytes() == jk.admit(upd, lay).signature
    q = jk.Quantized.quantize(np.ones((3, 4), np.float32))
    mixed = lay.flatten({**upd, "a": q})
    (got,), (sig,) = admission.leaf_entries(lay, [mixed])
    assert got[0, 0] == leaf_entry(q)[0] and got[0, 2] != 0  # the int8 code and its scales' address
    assert sig is None and jk.admit({**upd, "a": q}, lay).signature == got[:, 0].tobytes()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_float64_array_is_not_taken_for_a_bfloat16_leaf(backend):
    """A flat dict's fast path compared the leaf dtype with None for bf16 leaves, which numpy took as float64: a
    float64 array passed, its bytes read as bf16."""
    agg = jk.Aggregator({"w": np.zeros(4, bfloat16)}, backend=backend)
    with pytest.raises(jk.LayoutMismatch, match="leaf 'w'.*float64.*bfloat16"):
        agg.fold({"w": np.arange(4, dtype=np.float64)}, party="p")
    assert agg.state.count == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_quantized_values_from_a_strided_view(backend):
    """The kernels read int8 values from their first byte on: a strided view is made contiguous by Quantized."""
    q = np.arange(32, dtype=np.int8)[::2]
    agg = jk.Aggregator({"w": np.zeros(16, np.float32)}, backend=backend)
    agg.fold({"w": jk.Quantized(q, np.float32(1.0))}, party="p")
    np.testing.assert_array_equal(agg.finalize()["w"], q.astype(np.float32))
    with pytest.raises(TypeError, match="block must be an integer"):
        jk.Quantized(q, np.ones(2, np.float32), block=8.5)


def test_per_update_lists_of_another_length_are_refused():
    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, backend="numpy")
    ups = [{"w": np.ones(4, np.float32)}] * 3
    with pytest.raises(ValueError, match="3 updates but 1 infos"):
        agg.fold_many(ups, [1, 2, 3], ["a", "b", "c"], infos=[{}])
    assert agg.state.count == 0
    # an empty batch too: weights given for updates that are missing are an error, not nothing to do
    with pytest.raises(ValueError, match="0 updates but 2 weights"):
        agg.fold_many([], weights=[1, 2])
    with pytest.raises(TypeError, match="parties is a list"):
        agg.fold_many([], parties="ab")
    agg.fold_many([], weights=[], parties=None)  # (nothing given, nothing to do)


def test_anonymous_parties_of_two_aggregators_merge():
    """Updates folded without a party id get ids unique across aggregators (a per-aggregator counter made two
    workers' anonymous updates collide on merge)."""
    t = {"w": np.zeros(4, np.float32)}
    a, b = jk.Aggregator(t, backend="numpy"), jk.Aggregator(t, backend="numpy")
    a.fold({"w": np.ones(4, np.float32)})
    b.fold({"w": np.full(4, 3.0, np.float32)})
    a.merge(b)
    assert a.state.count == 2 and np.array_equal(a.finalize()["w"], np.full(4, 2.0))


def test_clipping_measures_an_update_admitted_in_an_earlier_round_against_the_new_base():
    """An Admitted carries norms measured against the base of its round: after reset(base=...) they are taken again
    (DP clipping used the stale norm: a delta of norm 200 went in at clip_norm 1)."""
    t = {"w": np.zeros(4, np.float32)}
    agg = jk.Aggregator(t, jk.algorithms.DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0, seed=0),
                        base={"w": np.zeros(4, np.float32)})
    adm = agg.admit({"w": np.full(4, 0.1, np.float32)}, 1.0, "late")
    agg.fold({"w": np.full(4, 0.1, np.float32)}, 1.0, "p0")
    agg.finalize()
    agg.reset(base={"w": np.full(4, -100.0, np.float32)})
    agg.fold(adm)
    assert np.linalg.norm(agg.finalize()["w"] + 100.0) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_an_update_admitted_without_the_base_is_checked_against_it_when_folded(backend):
    """jk.admit(update, agg.layout) measures |u|; folded into an aggregator with a base, what is summed is u - base,
    whose max |x| the headroom check must see: base 3e38 and u 0, folded twice, made the accumulator -inf (the
    round could not be undone). The fold measures such updates against its base first, one at a time or in a batch."""
    base = {"w": np.full(4, 3.0e38, np.float32)}
    zero = {"w": np.zeros(4, np.float32)}
    for fold in (lambda agg, us: agg.fold(us[0]), lambda agg, us: agg.fold_many(us)):
        agg = jk.Aggregator(base, base=base, backend=backend)
        us = [jk.admit(zero, agg.layout, weight=1.0, party=f"p{i}") for i in range(2)]
        # (its delta, 3e38, plus max|base| is past float32's range too: refused for either, as the first it meets)
        with pytest.raises(jk.ValueOutOfRange, match="'p0'.*(headroom|range)"):
            fold(agg, us)
        assert agg.state.count == 0 and not agg.state.acc.any()
    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, base={"w": np.ones(4, np.float32)}, backend=backend)
    agg.fold_many([jk.admit({"w": np.full(4, 3.0, np.float32)}, agg.layout, party=p) for p in "ab"])
    np.testing.assert_array_equal(agg.finalize()["w"], np.full(4, 3.0, np.float32))


def test_an_update_measured_against_an_old_base_is_measured_again(monkeypatch):
    """max|u| + max|base| bounds max|u - base| only for stats of u itself: an update admitted against the previous
    round's base carries max|u - old base|, which bounds nothing (base 1e36, u 1e36: maxabs 0; after reset(base=0)
    the fold skipped its check and the accumulator went inf: found in review)."""
    big = {"w": np.full(4, 1e36, np.float32)}
    agg = jk.Aggregator(big, base=big, backend="numpy")
    adm = agg.admit_many([big, big], [1000.0] * 2, ["a", "b"])
    assert adm[0].maxabs == 0
    agg.reset(base={"w": np.zeros(4, np.float32)})
    with pytest.raises(jk.ValueOutOfRange, match="'a'"):
        agg.fold_many(adm)
    assert not agg.state.acc.any()


def test_updates_admitted_without_the_base_are_measured_again_only_where_needed(monkeypatch):
    """max|u| + max|base| bounds max|u - base|: where that keeps a summing rule within the headroom, the fold does not
    read the update again (measuring every one made a scheduler's FedAvg-with-base fold 3x as long); clipping rules,
    which read the norm, measure all of them."""
    import jitkernels.aggregator as A

    calls = []
    real = A.admission.batch_stats
    monkeypatch.setattr(A.admission, "batch_stats", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    base = {"w": np.full(64, 2.0, np.float32)}
    ups = [{"w": np.full(64, float(i), np.float32)} for i in range(3)]
    for alg, measured in (("fedavg", 0), (jk.algorithms.DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0), 1)):
        calls.clear()
        agg = jk.Aggregator(base, alg, base=base, backend="numpy")
        adm = [jk.admit(u, agg.layout, party=i) for i, u in enumerate(ups)]  # (jk.admit: no batch_stats patch)
        calls.clear()
        agg.fold_many(adm)
        assert len(calls) == measured
        ref = jk.Aggregator(base, alg, base=base, backend="numpy")
        ref.fold_many(ref.admit_many(ups, parties=list(range(3))))
        np.testing.assert_array_equal(agg.finalize()["w"], ref.finalize()["w"])


def test_a_rejection_found_by_the_fold_leaves_the_state_as_it_was():
    """Refusals the fold finds (a backend that cannot run a leaf's dtype, a fold weight that would overflow the
    accumulator, a leaf missing from an Admitted, a value the robust store's dtype cannot hold) come before any
    bit of the state changes."""
    t = {"a": np.zeros(4, np.float32), "h": np.zeros(4, np.float16)}
    agg = jk.Aggregator(t, backend="numba")
    adm = jk.admit({"a": np.ones(4, np.float32), "h": np.ones(4, np.float16)}, agg.layout, party="p")
    with pytest.raises(jk.BackendUnavailable, match="float16"):
        agg.fold(adm)
    assert not agg.state.acc.any() and agg.state.count == 0

    nova = jk.Aggregator({"w": np.zeros(4, np.float32)}, "fednova", base={"w": np.zeros(4, np.float32)})
    nova.fold({"w": np.ones(4, np.float32)}, 10.0, "good", steps=5)
    before = nova.state.acc.copy()
    with pytest.raises(jk.ValueOutOfRange, match="'evil'.*fold weight"):
        nova.fold({"w": np.full(4, 100.0, np.float32)}, 10.0, "evil", steps=1e-40)
    assert nova.state.acc.tobytes() == before.tobytes() and nova.state.count == 1

    two = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    whole = jk.Aggregator(two, backend="numpy")
    with pytest.raises(jk.LayoutMismatch, match="leaf 'b'"):
        whole.fold(jk.admit({"a": np.ones(2, np.float32)}, whole.layout, party="p", partial=True))
    assert whole.state.count == 0

    from jitkernels.robust import FedMedian
    med = jk.Aggregator({"w": np.zeros(4, np.float32)}, FedMedian(slab_dtype="float16"))
    with pytest.raises(jk.ValueOutOfRange, match="'b'"):
        med.fold_many([{"w": np.ones(4, np.float32)}, {"w": np.full(4, 1e5, np.float32)}], [1, 1], ["a", "b"])
    assert med.state.store.parties == () and med.state.count == 0
    med.fold({"w": np.ones(4, np.float32)}, 1.0, "a")  # "a" is not left half-recorded
    assert med.state.store.parties == ("a",)


def test_a_non_finite_base_is_refused_where_it_is_given():
    with pytest.raises(jk.NonFiniteUpdate, match="'<base>'.*leaf 'w'.*1 non-finite"):
        jk.Aggregator({"w": np.zeros(4, np.float32)}, base={"w": np.array([np.nan, 0, 0, 0], np.float32)})
    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, base={"w": np.zeros(4, np.float32)})
    with pytest.raises(jk.NonFiniteUpdate, match="<base>"):
        agg.reset(base={"w": np.full(4, np.inf, np.float32)})


def test_states_with_different_server_moments_do_not_merge():
    t = {"w": np.zeros(4, np.float32)}
    a = jk.Aggregator(t, jk.algorithms.FedAdam(lr=0.1), base=t)
    b = jk.Aggregator(t, jk.algorithms.FedAdam(lr=0.1), base=t)
    b.state.opt["m"][:] = 1.0
    a.fold({"w": np.ones(4, np.float32)}, party="x")
    with pytest.raises(jk.IncompatibleStates, match="moments"):
        a.merge(b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(seed=seeds, shapes=leaf_shapes(max_leaves=4, max_size=500), k=st.integers(2, 6), with_base=st.booleans(),
       data=st.data())
def test_admitted_updates_folded_one_at_a_time_equal_the_batch_bitwise(backend, seed, shapes, k, with_base, data):
    """``fold(admitted)`` (the per-update path, which re-points one set of groups at each update) gives the bits of
    one ``fold_many`` of the same updates, with leaves of several dtypes (several groups, int8 among them), and
    records the same weights and parties. Each leaf keeps its dtype across updates: the batch folds a leaf's raw
    updates before its quantized ones."""
    kinds = ["float32", "bfloat16", "int8"] + (["float16"] if backend != "numba" else [])
    leaf_kind = [data.draw(st.sampled_from(kinds)) for _ in shapes]
    rng = np.random.default_rng(seed)

    def update():
        out = {}
        for i, (s, kind) in enumerate(zip(shapes, leaf_kind)):
            x = make_values(rng, s, "float32")
            out[f"l{i}"] = jk.Quantized.quantize(x) if kind == "int8" else x.astype(np_dtype(kind))
        return out

    tmpl = {f"l{i}": np.zeros(s, np.float32 if kind == "int8" else np_dtype(kind))
            for i, (s, kind) in enumerate(zip(shapes, leaf_kind))}
    base = {n: make_values(rng, a.shape, "float32").astype(a.dtype) for n, a in tmpl.items()} if with_base else None
    # weights with fractions: their sums round, so the per-leaf divisors must be added in one order on both paths
    ups, ws = [update() for _ in range(k)], list(rng.uniform(1, 500, k))
    one = jk.Aggregator(tmpl, backend=backend, base=base)
    batch = jk.Aggregator(tmpl, backend=backend, base=base)
    for j, (u, w) in enumerate(zip(ups, ws)):
        one.fold(one.admit(u, w, f"p{j}"))
    batch.fold_many(batch.admit_many(ups, ws, [f"p{j}" for j in range(k)]))
    assert one.state.acc.tobytes() == batch.state.acc.tobytes()
    assert one.state.leaf_weight.tobytes() == batch.state.leaf_weight.tobytes()
    assert one.state.parties == batch.state.parties


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(seed=seeds, shapes=leaf_shapes(max_leaves=4, max_size=500), k=st.integers(2, 5), with_base=st.booleans(),
       data=st.data())
def test_one_update_admission_gives_the_batchs_stats_bitwise(backend, seed, shapes, k, with_base, data):
    """Admitting one update (a submit: its signature's stats groups re-pointed, the checks on Python floats) gives
    the norm and max-abs that admitting it in a batch gives, to the bit, with leaves of several dtypes, absent
    leaves (partial updates) and integer leaves; and refuses what the batch refuses, naming the same leaf."""
    kinds = ["float32", "bfloat16", "int8", "int32", "absent"] + (["float16"] if backend != "numba" else [])
    rng = np.random.default_rng(seed)
    kind_of = {f"l{i}": data.draw(st.sampled_from(kinds)) for i in range(len(shapes))}
    tmpl = {n: np.zeros(s, np.int32 if kind == "int32" else
                        np.float32 if kind in ("int8", "absent") else np_dtype(kind))
            for (n, kind), s in zip(kind_of.items(), shapes)}

    def update():
        out = {}
        for n, a in tmpl.items():
            x = make_values(rng, a.shape, "float32")
            if kind_of[n] == "int8":
                out[n] = jk.Quantized.quantize(x)
            elif kind_of[n] == "int32":
                out[n] = rng.integers(-5, 5, a.shape).astype(np.int32)
            elif kind_of[n] != "absent" or data.draw(st.booleans()):
                out[n] = x.astype(a.dtype)
        if not out:  # (every leaf may be left out: a partial update must carry one)
            n, a = next(iter(tmpl.items()))
            out[n] = make_values(rng, a.shape, "float32")
        return out

    base = {n: make_values(rng, a.shape, "float32").astype(a.dtype) for n, a in tmpl.items()} if with_base else None
    agg = jk.Aggregator(tmpl, backend=backend, base=base, partial=True)
    ups, ws = [update() for _ in range(k)], list(rng.integers(1, 500, k).astype(float))
    batch = agg.admit_many(ups, ws, list(range(k)))
    for j, (u, w) in enumerate(zip(ups, ws)):
        for _ in range(2):  # the second time through the cached groups
            one = agg.admit(u, w, j)
            assert (one.norm, one.maxabs, one.nbytes) == (batch[j].norm, batch[j].maxabs, batch[j].nbytes)
            assert one.entries.tobytes() == batch[j].entries.tobytes()
    floats = [n for n in tmpl if kind_of[n] not in ("int8", "int32") and ups[0].get(n) is not None
              and ups[0][n].size]
    if floats:
        bad = {**ups[0], floats[-1]: ups[0][floats[-1]].copy()}
        bad[floats[-1]].reshape(-1)[-1] = np.nan
        for call in (lambda: agg.admit(bad, 1.0, "bad"), lambda: agg.admit_many([ups[1], bad], [1.0, 1.0], [1, "bad"])):
            with pytest.raises(jk.NonFiniteUpdate, match=f"'bad'.*leaf '{floats[-1]}'"):
                call()


def test_one_update_admission_from_several_threads_keeps_each_updates_stats():
    """Threads admitting updates of one signature at once each get their own update's stats (a thread takes its
    signature's cached groups out while it uses them)."""
    import threading
    t = {f"l{i}": np.zeros(300, np.float32) for i in range(4)}
    agg = jk.Aggregator(t, backend="cpp")
    ups = [{n: np.full(300, float(j + 1), np.float32) for n in t} for j in range(8)]
    want = [np.sqrt(4 * 300 * (j + 1.0) ** 2) for j in range(8)]
    errors = []

    def admit(j):
        for _ in range(300):
            a = agg.admit(ups[j], 1.0, j)
            if a.maxabs != j + 1 or not np.isclose(a.norm, want[j]):
                errors.append((j, a.maxabs, a.norm))

    threads = [threading.Thread(target=admit, args=(j,)) for j in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_update_fold_follows_each_updates_dtypes(backend):
    """Updates of another signature (a leaf sent quantized after raw ones, and back) fold as the batch path folds
    them, one at a time; the per-update path keeps no update alive after its fold."""
    t = {"a": np.zeros(300, np.float32), "b": np.zeros(5, np.float32)}
    rng = np.random.default_rng(3)
    x = [{"a": make_values(rng, (300,), "float32"), "b": make_values(rng, (5,), "float32")} for _ in range(6)]
    q = jk.Quantized.quantize
    ups = [x[0], {**x[1], "a": q(x[1]["a"])}, x[2], {**x[3], "b": q(x[3]["b"])}, {"a": q(x[4]["a"]), "b": q(x[4]["b"])},
           x[5]]
    one, ref = jk.Aggregator(t, backend=backend), jk.Aggregator(t, backend=backend)
    for j, u in enumerate(ups):
        one.fold(one.admit(u, j + 1.0, j))
        with ref._lock:
            ref._fold_batch([ref.admit(u, j + 1.0, j)])  # the batch path, one update per call
    assert one.state.acc.tobytes() == ref.state.acc.tobytes()
    probe = np.ones(300, np.float32)
    alive = weakref.ref(probe)
    one.fold(one.admit({"a": probe, "b": np.ones(5, np.float32)}, 1.0, "last"))
    del probe
    gc.collect()
    assert alive() is None, "the per-update fold's groups kept the update alive"


def test_per_update_fold_refusals_leave_the_state_as_it_was():
    t = {"w": np.zeros(8, np.float32)}
    agg = jk.Aggregator(t)
    agg.fold(agg.admit({"w": np.ones(8, np.float32)}, 2.0, "a"))
    before = agg.state.copy()
    with pytest.raises(jk.DuplicateParty, match="'a'"):
        agg.fold(agg.admit({"w": np.ones(8, np.float32)}, 1.0, "a"))
    other = jk.Aggregator({"w": np.zeros(9, np.float32)})
    with pytest.raises(jk.LayoutMismatch, match="'b'"):
        agg.fold(other.admit({"w": np.ones(9, np.float32)}, 1.0, "b"))
    # admitted against a float64 accumulator's headroom: too large for this float32 one
    big = jk.admit({"w": np.full(8, 3e37, np.float32)}, agg.layout, weight=100.0, party="c", acc_dtype="float64")
    with pytest.raises(jk.ValueOutOfRange, match="'c': leaf 'w' has .*headroom"):
        agg.fold(big)
    assert agg.state.same_bits(before)
    nova = jk.Aggregator(t, "fednova", base=t)
    nova.fold(nova.admit({"w": np.ones(8, np.float32)}, 10.0, "good", steps=5))
    kept = nova.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="'evil': leaf 'w' has .*fold weight"):
        nova.fold(nova.admit({"w": np.full(8, 100.0, np.float32)}, 10.0, "evil", steps=1e-40))
    assert nova.state.same_bits(kept)
    agg.finalize()
    agg.state.closed = True  # as a server step or DP noise leaves it
    with pytest.raises(jk.RoundClosed):
        agg.fold(agg.admit({"w": np.ones(8, np.float32)}, 1.0, "d"))


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_per_update_fold_takes_integer_leaves(rule):
    """Counters (BatchNorm's num_batches_tracked) ride along the per-update path: folded as the batch path folds
    them, the float leaves through the reused groups."""
    t = {"w": np.zeros(300, np.float32), "n": np.zeros((), np.int64)}
    rng = np.random.default_rng(5)
    ups = [{"w": make_values(rng, (300,), "float32"), "n": np.array(int(rng.integers(0, 50)))} for _ in range(5)]
    one = jk.Aggregator(t, int_leaves=rule)
    batch = jk.Aggregator(t, int_leaves=rule)
    for j, u in enumerate(ups):
        one.fold(one.admit(u, j + 1.0, j))
    assert one._one.groups is not None and one._one.int_rows == (1,)
    batch.fold_many(batch.admit_many(ups, [j + 1.0 for j in range(5)], list(range(5))))
    assert one.state.acc.tobytes() == batch.state.acc.tobytes()
    assert one.finalize()["n"] == batch.finalize()["n"]


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba is not installed")
def test_per_update_fold_refuses_in_the_batch_paths_order():
    """A closed round is refused as such even where the backend could not run the update's dtype: the per-update
    path picks backends after the checks, as the batch path does."""
    t = {"h": np.zeros(4, np.float16)}
    agg = jk.Aggregator(t, backend="numba")
    agg.state.closed = True
    adm = jk.admit({"h": np.ones(4, np.float16)}, agg.layout, party="p", backend="numpy")
    with pytest.raises(jk.RoundClosed):
        agg.fold(adm)
    agg.state.closed = False
    with pytest.raises(jk.BackendUnavailable, match="float16"):
        agg.fold(adm)
    assert agg.state.count == 0 and not agg.state.acc.any()


def test_an_overflowing_fold_weight_is_refused_by_name_under_strict_numpy_errors():
    """fold weight * max|x| may overflow (FedNova's w / steps with tiny steps) or be inf * 0: the batch's vectorized
    headroom check refuses the party by name, without a numpy warning or FloatingPointError on the way."""
    t = {"w": np.zeros(4, np.float32)}
    lay = jk.Layout.from_template(t)
    for vals, steps in (([1.0, 1e10], [1.0, 1e-300]), ([1.0, 0.0], [1.0, 1e-320])):
        agg = jk.Aggregator(t, "fednova", base=t)
        ups = [jk.admit({"w": np.full(4, v, np.float32)}, lay, party=f"p{i}") for i, v in enumerate(vals)]
        for u, s in zip(ups, steps):
            u.info = {"steps": s}
        with np.errstate(all="raise"), pytest.raises(jk.ValueOutOfRange, match="'p1'"):
            agg.fold_many(ups)
        assert agg.state.count == 0


def test_a_result_a_small_divisor_takes_past_float32_is_refused_by_name():
    """FedBuff's server_lr > 1 divides the sum by less than the masses: a float32 accumulator's mean can pass the
    float32 range with no base and no step (it came back inf)."""
    for dtype in ("float32", "bfloat16"):
        t = {"w": np.zeros(4, np_dtype(dtype))}
        agg = jk.Aggregator(t, jk.algorithms.FedBuff(staleness="constant", server_lr=1e7))
        agg.fold({"w": np.full(4, 1e32, np_dtype(dtype))}, party="p", staleness=0)
        with pytest.raises(jk.ValueOutOfRange, match=f"leaf 'w'.*beyond {dtype}'s"):
            agg.finalize()


def test_a_cuda_tensor_where_the_gpu_backend_cannot_run_names_the_reason_party_and_leaf():
    """A torch CUDA tensor with no CuPy installed (a common setup) raised a bare ModuleNotFoundError. Simulated by a
    tensor whose device says cuda, all that jitkernels looks at before going to CuPy."""
    why = jk.available_backends()["cupy"]
    if why is True:
        pytest.skip("the GPU backend runs here")

    class FakeCuda(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

    def cuda_like(a):
        return torch.Tensor._make_subclass(FakeCuda, torch.from_numpy(a))

    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, backend="cpp")
    for call in (lambda: agg.fold({"w": cuda_like(np.ones(4, np.float32))}, 1.0, party="p7"),
                 lambda: jk.admit({"w": cuda_like(np.ones(4, np.float32))}, agg.layout, party="p7")):
        with pytest.raises(jk.BackendUnavailable, match="party 'p7', leaf 'w': the array is in GPU memory"):
            call()
    with pytest.raises(jk.BackendUnavailable, match="leaf 'w'"):
        jk.Aggregator({"w": cuda_like(np.zeros(4, np.float32))})
    assert agg.count == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weights_the_accumulator_cannot_hold_are_refused(backend):
    """Weights are rounded to the accumulator's dtype in the kernels: 1e-46 rounded to 0 (NaN out), 1e39 on an
    all-zero update passed the headroom check (0 * 1e39) and made NaN, and admissible weights whose sum passed
    float32's range made the divisor inf (a mean of 0). Refused by name, the state unchanged."""
    t = {"w": np.zeros(3, np.float32), "n": np.zeros((), np.int64)}
    u = {"w": np.array([1, 2, 3], np.float32), "n": np.int64(7)}
    for w, upd in ((1e-46, u), (1e-40, u), (1e39, {"w": np.zeros(3, np.float32), "n": np.int64(0)})):
        agg = jk.Aggregator(t, backend=backend)
        agg.fold(u, weight=1.0, party="a")
        before = agg.state.acc.copy()
        with pytest.raises(jk.ValueOutOfRange, match="party 'b'.*weight"):
            agg.fold(upd, weight=w, party="b")
        assert agg.state.acc.tobytes() == before.tobytes() and agg.count == 1
        with pytest.raises(jk.ValueOutOfRange):
            jk.admit(upd, agg.layout, weight=w, party="b")
    agg = jk.Aggregator(t, backend=backend, acc_dtype="float64")
    agg.fold(u, weight=1e-46, party="a")  # a float64 accumulator holds it
    assert agg.finalize()["n"] == 7
    # a divisor past the range (as 2^20 updates at the headroom would make): FedBuff divides by its server_lr (one
    # in float32's range, which 7 parties' mass still pushes past it)
    agg = jk.Aggregator({"w": np.zeros(3, np.float32)}, jk.algorithms.FedBuff(server_lr=2e-38), backend=backend)
    agg.fold_many([{"w": np.full(3, 1e-7, np.float32)}] * 7, parties=list(range(7)), infos=[{"staleness": 0}] * 7)
    with pytest.raises(jk.ValueOutOfRange, match="total weight"):
        agg.finalize()


def test_a_partial_update_without_a_leaf_is_refused():
    """It was admitted and counted, and a deterministic state holding it saved but could not be loaded."""
    t = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    agg = jk.Aggregator(t, backend="numpy", deterministic=True, partial=True)
    with pytest.raises(jk.LayoutMismatch, match="at least one leaf"):
        agg.fold({}, weight=2.0, party="empty")
    assert agg.count == 0


def test_admission_checks_party_ids_as_the_aggregator_does(tmp_path):
    """jk.admit took any party: None twice was a DuplicateParty, None, 1.5, tuples, bools and bytes were folded and
    then failed the state's save or load. None is made anonymous; a numpy integer is an int; the rest is refused."""
    t = {"a": np.zeros(3, np.float32)}
    agg = jk.Aggregator(t, backend="cpp")
    for _ in range(2):
        agg.fold(jk.admit({"a": np.ones(3, np.float32)}, agg.layout, weight=2.0))
    assert agg.count == 2 and all(p.startswith("anon-") for p in agg.state.parties)
    assert jk.admit({"a": np.ones(3, np.float32)}, agg.layout, party=np.int64(3)).party == 3
    agg.state.save(tmp_path / "s.jk")
    assert jk.FoldState.load(tmp_path / "s.jk").count == 2
    for p in (1.5, ("site", 3), True, b"x"):
        with pytest.raises(jk.InvalidParty):
            jk.admit({"a": np.ones(3, np.float32)}, agg.layout, party=p)
        with pytest.raises(jk.InvalidParty):
            agg.fold({"a": np.ones(3, np.float32)}, party=p)


@pytest.mark.parametrize("dt", [np.int32, np.uint32, np.int64, np.uint64])
@pytest.mark.parametrize("rule", ["mean", "max"])
def test_integer_leaves_at_their_dtypes_end_do_not_wrap(dt, rule):
    """Every party sent int32's max: the float32 accumulator's rounding made 2^31, which the cast wrapped to int32's
    minimum (uint: 0). The result stays within the dtype (inexact past 2^24 / 2^53, as documented)."""
    v = np.iinfo(dt).max
    for acc in ("float32", "float64"):
        agg = jk.Aggregator({"w": np.zeros(2, np.float32), "n": np.zeros((), dt)}, backend="cpp", acc_dtype=acc,
                            int_leaves=rule)
        agg.fold({"w": np.ones(2, np.float32), "n": dt(v)}, weight=1.0, party="a")
        agg.fold({"w": np.ones(2, np.float32), "n": dt(v)}, weight=3.0, party="b")
        n = int(agg.finalize()["n"])
        assert n > 0 and v - n <= v * 2.0 ** -23


def test_the_fused_first_batch_refuses_what_admission_refuses():
    """FedNova's fold weight is w / steps: the fused pass checked only it, admission only the raw weight, so cpp
    took a batch as a round's first that the other backends (and cpp later in the round) refused."""
    from jitkernels.algorithms import FedNova

    t = {"a": np.zeros(4, np.float32)}
    u = {"a": np.ones(4, np.float32)}
    for b in CPU_BACKENDS:
        for first in (True, False):
            agg = jk.Aggregator(t, FedNova(), backend=b, base=t)
            if not first:
                agg.fold(u, weight=1.0, party="warm", steps=1)
            with pytest.raises(jk.ValueOutOfRange):
                agg.fold_many([u], [1e33], parties=["p"], infos=[{"steps": 100}])


def test_a_delta_of_a_leaf_nobody_sent_is_zero():
    """output="model" kept the base for it, output="delta" raised EmptyAggregate: the two disagreed."""
    t = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    base = {"a": np.ones(3, np.float32), "b": np.full(2, 5.0, np.float32)}
    agg = jk.Aggregator(t, backend="cpp", base=base, partial=True)
    agg.fold({"a": np.full(3, 3.0, np.float32)}, party="p")
    delta, model = agg.finalize(output="delta"), agg.finalize()
    np.testing.assert_array_equal(delta["a"], np.full(3, 2.0, np.float32))
    np.testing.assert_array_equal(delta["b"], np.zeros(2, np.float32))
    np.testing.assert_array_equal(model["b"], base["b"])


def test_a_quantized_base_is_refused_by_name():
    t = {"a": np.zeros(4, np.float32)}
    with pytest.raises(jk.LayoutMismatch, match="leaf 'a' of the base is int8-quantized"):
        jk.Aggregator(t, backend="cpp", base={"a": jk.Quantized.quantize(np.ones(4, np.float32))})


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weight_range_verdicts_do_not_depend_on_the_path(backend):
    """A fold weight out of range was refused alone but folded in a batch (only the headroom's first offender was
    checked), and the fused first batch did not check the raw weight; a batch's errors come in update order. The
    aggregator's admission refuses it on arrival too (since 2026-11-28; it was admitted, then refused by the fold)."""
    from jitkernels.algorithms import FedBuff

    t = {"a": np.zeros(3, np.float32)}
    u = {"a": np.ones(3, np.float32)}
    agg = jk.Aggregator(t, FedBuff(weighted=True), backend=backend)
    agg.fold(u, 1.0, "warm", staleness=0)
    with pytest.raises(jk.ValueOutOfRange, match="'p'.*fold weight"):  # ~3e-39: below float32's normal numbers
        agg.admit(u, 1e-37, "p", staleness=1000)
    for batch in (False, True):
        with pytest.raises(jk.ValueOutOfRange, match="'p'.*fold weight"):
            agg.fold_many([u, u] if batch else [u], [1e-37, 1.0][:1 + batch], ["p", "q"][:1 + batch],
                          [{"staleness": 1000}, {"staleness": 0}][:1 + batch])
        assert agg.count == 1
    for first in (True, False):
        agg = jk.Aggregator(t, backend=backend)
        if not first:
            agg.fold(u, 1.0, "warm")
        with pytest.raises(jk.ValueOutOfRange, match="'p'"):
            agg.fold_many([u], [1e-40], ["p"])
    ups = [u, {"a": np.array([1, np.nan, 2], np.float32)}]
    with pytest.raises(jk.ValueOutOfRange, match="party 'A'"):
        jk.Aggregator(t, backend=backend).fold_many(ups, [1e-40, 1.0], ["A", "B"])


def test_numpy_integer_parties_are_stored_as_ints(tmp_path):
    """check_party takes numpy integers: the secure-aggregation sum and the update store kept the numpy value, and
    their save failed (not JSON serializable)."""
    from jitkernels.robust_store import UpdateStore
    from jitkernels.secagg import SecAggSum

    s = SecAggSum([4], 32)
    s.fold(np.arange(4, dtype=np.uint32), party=np.int64(3))
    s.save(tmp_path / "s.jk")
    st = UpdateStore(4, 4)
    st.add(np.ones(4, np.float32), np.int64(7))
    st.save(tmp_path / "u.jk")
    assert type(st.parties[0]) is int


def test_counters_nobody_sent_keep_their_value_in_every_output():
    """A delta of a leaf nobody sent is 0 for float leaves, but a counter is its value (as a carried counter's is),
    and an uncarried or buffered counter at its dtype's end does not wrap either."""
    from jitkernels import robust as R

    t = {"w": np.zeros(2, np.float32), "n": np.zeros((), np.int32)}
    base = {"w": np.ones(2, np.float32), "n": np.int32(100)}
    a = jk.Aggregator(t, backend="cpp", base=base, partial=True)
    a.fold({"w": np.full(2, 3, np.float32)}, party="a")
    assert a.finalize(output="delta")["n"] == 100 and a.finalize()["n"] == 100
    v = np.iinfo(np.int32).max
    a = jk.Aggregator(t, backend="cpp", base={"w": np.zeros(2, np.float32), "n": np.int32(v)}, partial=True)
    a.fold({"w": np.ones(2, np.float32)}, party="a")
    assert a.finalize()["n"] > 0
    a = jk.Aggregator(t, R.FedMedian(), backend="numpy")
    for p in "abc":
        a.fold({"w": np.ones(2, np.float32), "n": np.int32(v)}, party=p)
    assert a.finalize()["n"] > 0


def test_masked_arrays_and_odd_torch_tensors_are_refused_by_leaf():
    """np.asarray dropped a masked array's mask, so its masked values (1e30 here) were summed; torch tensors numpy
    cannot view (sparse, meta, quantized, float8, a neg-bit view) raised torch's TypeError or RuntimeError."""
    torch = pytest.importorskip("torch")
    agg = jk.Aggregator({"w": np.zeros(4, np.float32)}, backend="numpy")
    masked = np.ma.MaskedArray(np.array([1, 1, 1, 1e30], np.float32), mask=[0, 0, 0, 1])
    with pytest.raises(jk.LayoutMismatch, match="'w'.*masked array"):
        agg.fold({"w": masked}, party="p")
    import warnings

    with warnings.catch_warnings():  # (torch deprecates its quantized tensors)
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    odd = [torch.ones(4).to_sparse(), torch.ones(4, device="meta"), torch.ones(4).to(torch.float8_e4m3fn), quantized,
           torch.ones(4, dtype=torch.complex64).conj().imag]
    tagg = jk.Aggregator({"w": torch.zeros(4)}, backend="numpy")
    for t in odd:
        with pytest.raises(jk.LayoutMismatch, match="party 'p', leaf 'w'"):
            tagg.fold({"w": t}, party="p")
    assert tagg.state.count == 0 and agg.state.count == 0


def test_misused_api_calls_raise_a_type_error_naming_the_argument():
    """merge(None), from_state(None), admit(u, None) and add_job(None) raised AttributeError from deep inside;
    fold_many(one_dict) said "expected a dict, got str" (its keys, taken for updates); parties='ab' became the
    parties 'a' and 'b'; a header nested 100,000 deep in FoldState.from_bytes raised RecursionError."""
    from scheduler import JITScheduler, VirtualClock

    from jitkernels.state import FoldState

    t, u = {"w": np.zeros(4, np.float32)}, {"w": np.ones(4, np.float32)}
    agg = jk.Aggregator(t)
    for call, match in ((lambda: agg.merge(None), "Aggregator or a FoldState"),
                        (lambda: jk.Aggregator.from_state(None), "FoldState"),
                        (lambda: jk.admit(u, None), "Layout"),
                        (lambda: agg.fold_many(u), "list of updates"),
                        (lambda: agg.fold_many([u, u], parties="ab"), "parties is a list"),
                        (lambda: JITScheduler("eager", clock=VirtualClock()).add_job(None), "Job")):
        with pytest.raises(TypeError, match=match):
            call()
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(jk.CorruptState):
        FoldState.from_bytes(len(deep).to_bytes(8, "little") + deep)
    assert agg.state.count == 0


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 2 ** 31 - 1), k=st.integers(3, 12), scale=st.floats(1e-3, 1e3))
def test_norm_scores_are_robust_z_scores_of_the_admission_norms(seed, k, scale):
    """jk.norm_scores: (norm - median) / (1.4826 MAD) of the norms admission measured (of the delta, with a base),
    the same for any common scale of the updates, and a boosted update stands out whatever its size does to a
    mean and standard deviation."""
    rng = np.random.default_rng(seed)
    base = {"w": rng.standard_normal(50).astype(np.float32)}
    agg = jk.Aggregator(base, base=base, backend="numpy")
    deltas = [scale * rng.standard_normal(50) for _ in range(k)]
    deltas.append(1000 * scale * rng.standard_normal(50))  # the boosted one
    ups = [{"w": (base["w"] + d).astype(np.float32)} for d in deltas]
    adm = agg.admit_many(ups, parties=list(range(k + 1)))
    scores = jk.norm_scores(adm)
    norms = np.array([u.norm for u in adm])
    med = np.median(norms)
    mad = 1.4826 * np.median(np.abs(norms - med))
    np.testing.assert_allclose([scores[j] for j in range(k + 1)], (norms - med) / mad, rtol=1e-12)
    assert scores[k] > 20 and max(abs(scores[j]) for j in range(k)) < scores[k]
    assert jk.norm_scores([]) == {}


@pytest.mark.parametrize("path", ["fold_many", "fold"])
@pytest.mark.parametrize("backend", ["cpp", "numpy"])
def test_a_fold_that_fails_part_way_tears_the_state_instead_of_counting_twice(monkeypatch, path, backend):
    """A batch folds one dtype group after another; an error between them (the GPU out of memory at the second
    group's launch, an interrupt) left the first group's leaves in the accumulator and no party recorded, so the
    retry was taken and counted those leaves twice (4.0 where the mean is 2.0). The state is now torn: folds,
    merges, finalize and saves refuse it (TornState) until reset. A compiled host call that fails before writing
    (the first, on cpp) leaves the state as it was."""
    mod = jk.backends.get(backend)
    tmpl = {"a": np.zeros(3, np.float32), "b": np.zeros(3, bfloat16)}
    upd = {"a": np.full(3, 2.0, np.float32), "b": np.full(3, 2.0, bfloat16)}
    real, calls = mod.fold, []

    def failing(nth):
        def fold(acc, base, g):
            calls.append(g.in_dtype)
            if len(calls) == nth:
                raise MemoryError("out of memory (injected)")
            return real(acc, base, g)
        return fold

    for nth, torn in ((2, True), (1, backend == "numpy")):
        agg = jk.Aggregator(tmpl, backend=backend)
        u = jk.admit(upd, agg.layout, weight=1.0, party="p")
        before = agg.state.copy()
        calls.clear()
        monkeypatch.setattr(mod, "fold", failing(nth))
        with pytest.raises(MemoryError):
            agg.fold_many([u]) if path == "fold_many" else agg.fold(u)
        monkeypatch.setattr(mod, "fold", real)
        assert len(set(calls)) == nth  # (the groups: one per dtype)
        if not torn:
            assert agg.state.torn is None and agg.state.same_bits(before)
            agg.fold(u)
            assert agg.finalize()["a"].tolist() == [2.0] * 3
            continue
        for use in (lambda: agg.fold(u), lambda: agg.fold_many([u]), agg.finalize,
                    lambda: agg.merge(jk.Aggregator(tmpl, backend=backend)),
                    lambda: agg.state.save("/nonexistent/never-written.jks")):
            with pytest.raises(jk.TornState, match="failed part-way .*MemoryError"):
                use()
        agg.reset(reuse=True)
        agg.fold(u)
        assert agg.finalize()["a"].tolist() == [2.0] * 3 and agg.state.count == 1


def test_a_float64_model_is_averaged_in_float64_unless_told_otherwise():
    """The default accumulator was float32 whatever the template: one float64 update of pi came back as pi rounded
    to float32, inside a float64 array. A template with a float64 leaf now defaults to a float64 accumulator (as the
    Flower strategies already chose), admission checks that accumulator's headroom, and a scheduler job follows."""
    from scheduler import JITScheduler, Job, VirtualClock

    pi = np.array([1.0, np.pi, 1e-300], np.float64)
    agg = jk.Aggregator({"w": np.zeros(3)})
    assert agg.acc_dtype == "float64"
    agg.fold({"w": pi}, party="a")
    assert agg.finalize()["w"].tobytes() == pi.tobytes()
    assert jk.Aggregator({"a": np.zeros(2, np.float32), "b": np.zeros(2)}).acc_dtype == "float64"
    assert jk.Aggregator({"a": np.zeros(2, np.float32), "n": np.zeros(1, np.int64)}).acc_dtype == "float32"
    assert jk.Aggregator({"w": np.zeros(3)}, acc_dtype="float32").acc_dtype == "float32"  # (named: honored)
    big = {"w": np.full(3, 1e300)}
    jk.admit(big, agg.layout, party="b")  # float64 headroom (float32's refused it)
    with pytest.raises(jk.ValueOutOfRange):
        jk.admit(big, agg.layout, party="b", acc_dtype="float32")
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template={"w": np.zeros(3)}, parties=["a"], quorum=1, rounds=1))
    s.submit("j", 0, "a", {"w": pi})
    s.clock.run()
    assert s.result("j", 0).result(timeout=5)["w"].tobytes() == pi.tobytes()
    s.close()


def test_numbers_parties_send_are_real_numbers_and_ids_are_bounded():
    """Weights and per-update values went through float(), which read a 0-d string or bool array, a numpy complex
    (its imaginary part dropped) and a bool tensor as numbers, and let a torch complex tensor's RuntimeError and
    10**400's OverflowError out untyped; an int party id of 5,000 digits or a 100 MB str id was folded, and every
    message and save that printed it then failed. A resumed state whose algorithm record was damaged raised
    AttributeError or OverflowError, not CorruptState."""
    import decimal
    import fractions

    from jitkernels import state as S

    agg = jk.Aggregator({"w": np.zeros(2, np.float32)})
    u = {"w": np.ones(2, np.float32)}
    for w in (np.array("2"), np.array(True), np.complex128(1 + 2j), torch.tensor(True), torch.tensor(1 + 2j),
              np.array(b"7"), np.array([2.0, 3.0]), "2", -10 ** 400, decimal.Decimal("Infinity"),
              np.timedelta64(5), np.timedelta64(7, "D"), np.array([5], "m8"), np.datetime64(5, "s")):
        # (a numpy timedelta64 is a numpy integer: one without a unit was taken as its count, one with a unit
        # refused as out of float64's range)
        with pytest.raises(jk.InvalidWeight):
            agg.fold(u, weight=w, party="p")
    # positive exact numbers a float64 cannot hold: valid weights out of range, as one the accumulator cannot hold
    for w in (10 ** 400, fractions.Fraction(1, 10 ** 400), decimal.Decimal("1e400"), decimal.Decimal("1e-400")):
        with pytest.raises(jk.ValueOutOfRange, match="outside what a float64 holds"):
            agg.fold(u, weight=w, party="p")
    for i, w in enumerate((np.float32(2), np.array(2.0), torch.tensor(2.0), torch.tensor([2.0]), np.int64(3),
                           np.array([2.0]), np.array(3.0, bfloat16), decimal.Decimal("2.5"), fractions.Fraction(1, 2))):
        agg.fold(u, weight=w, party=f"ok{i}")
    nova = jk.Aggregator({"w": np.zeros(2, np.float32)}, "fednova", base={"w": np.zeros(2, np.float32)})
    for steps in (10 ** 400, np.complex128(3), np.array("3"), torch.tensor(True)):
        with pytest.raises(jk.InvalidUpdateInfo, match="steps"):
            nova.fold(u, weight=1.0, party="p", steps=steps)
    assert nova.state.count == 0 and agg.state.count == 9
    for party, got in ((10 ** 5000, "got an int of 16610 bits, outside"), (1 << 64, "got 18446744073709551616, outside"),
                       (-(1 << 63) - 1, "got -9223372036854775809, outside \\[-2\\^63, 2\\^64\\)"),  # ("64 bits")
                       ("x" * ((1 << 16) + 1), "got 65,537 characters")):
        with pytest.raises(jk.InvalidParty, match="at most 65,536 characters or 64-bit ints; " + got):
            agg.fold(u, party=party)
    agg.fold(u, party=(1 << 64) - 1)  # (Flower's node ids are random uint64s)
    st = agg.state
    for record in ({"name": "dp_fedavg_fixed", "algorithm": "x", "clip_norm": 1.0, "noise_multiplier": 1.0},
                   {"name": "fedprox", "mu": 10 ** 400}):
        meta = {**st._metadata(), "algorithm": json.dumps(record)}
        with pytest.raises(jk.CorruptState, match="does not rebuild"):
            jk.Aggregator.from_state(jk.FoldState.from_bytes(S.checked_bytes(st._tensors(), meta)))


def test_the_writes_after_the_kernels_and_those_of_merges_and_steps_tear_the_state_too(monkeypatch):
    """Review of the torn state: an interrupt is raised once a compiled call has returned (all of it written), so a
    Ctrl-C "before any call finished" left the whole batch in the sums, unrecorded; integer leaves are folded after
    the float kernels, in _record; a merge adds the sums before its carry and records; a server optimizer's finalize
    steps one dtype group after another, and DP adds its noise before the outputs. Each failure part-way was retried
    on top of what it had written (a mean of 4 for 2, a leaf stepped twice, the noise twice). Each now tears the
    state; a torn step also refuses reset (the model and moments are torn: load the last saved state)."""
    from jitkernels import state as state_module
    from jitkernels.backends import cpp

    u = {"w": np.full(3, 2.0, np.float32), "n": np.ones(1, np.int64)}
    tmpl = {"w": np.zeros(3, np.float32), "n": np.zeros(1, np.int64)}
    real_fold = cpp.fold

    def interrupted(*a):  # (the call writes in full, then the interrupt is raised)
        real_fold(*a)
        raise KeyboardInterrupt

    def fail(*a, **k):
        raise MemoryError("injected")

    cases = {"interrupt": (cpp, "fold", interrupted), "int_leaf": (jk.Aggregator, "_fold_int", fail)}
    for name, (owner, attr, fn) in cases.items():
        for how in ("fold", "fold_many") + (("fused",) if name == "int_leaf" else ()):  # (fused: fold_stats runs)
            agg = jk.Aggregator(tmpl, backend="cpp")
            items = [u] if how == "fused" else [jk.admit(u, agg.layout, party="p")]
            monkeypatch.setattr(owner, attr, fn)
            with pytest.raises((KeyboardInterrupt, MemoryError)):
                if how == "fold":
                    agg.fold(items[0])
                else:
                    agg.fold_many(items, [1.0], ["p"]) if how == "fused" else agg.fold_many(items)
            monkeypatch.undo()
            with pytest.raises(jk.TornState):
                agg.fold(jk.admit(u, agg.layout, party="p"))

    a = jk.Aggregator({"w": np.zeros(3)}, deterministic=True)
    b = jk.Aggregator({"w": np.zeros(3)}, deterministic=True)
    a.fold({"w": np.ones(3)}, party="x")
    b.fold({"w": np.full(3, 3.0)}, party="y")
    monkeypatch.setattr(state_module.FoldState, "_add", lambda self, other: (self.acc.__iadd__(other.acc), fail()))
    with pytest.raises(MemoryError):
        a.merge(b)
    monkeypatch.undo()
    with pytest.raises(jk.TornState, match="a merge failed part-way"):
        a.merge(b)

    two = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float64)}
    adam = jk.Aggregator(two, jk.algorithms.FedAdam(lr=0.1, tau=1e-3), backend="cpp", base=two)
    adam.fold({"a": np.ones(3, np.float32), "b": np.ones(3)}, 1.0, "p")
    calls = []
    real_step = cpp.step
    monkeypatch.setattr(cpp, "step", lambda *a: calls.append(1) or (fail() if len(calls) == 2 else real_step(*a)))
    with pytest.raises(MemoryError):
        adam.finalize()
    monkeypatch.undo()
    for use in (adam.finalize, adam.reset, adam.state.next_round):
        with pytest.raises(jk.TornState, match="model and moments were stepped in part: load the last saved"):
            use()


def test_what_a_torn_state_review_found_recovers_or_tears_as_it_should(monkeypatch):
    """Review of the torn states: a DP finalize torn after its noise left its round claimed, so the documented
    reset() could never finalize again (its retry now gets the noise of its aggregate); a robust fold interrupted in
    its records kept the store's rows unrecorded and untorn; a robust merge that the store refused (StoreFull,
    before any write) tore an intact state; a server optimizer's finalize that failed before any step (its model's
    float64 sum) refused reset for good."""
    from jitkernels.backends import cpp
    from jitkernels.robust import FedMedian

    def fail(*a, **k):
        raise MemoryError("injected")

    t = {"w": np.zeros(4, np.float32)}
    dp = jk.Aggregator(t, jk.algorithms.DPFixedClipping(clip_norm=10.0, noise_multiplier=0.1, num_sampled=2,
                                                         seed=1), backend="cpp", base=t)
    dp.fold({"w": np.ones(4, np.float32)}, party="a")
    monkeypatch.setattr(cpp, "finalize", fail)
    with pytest.raises(MemoryError):
        dp.finalize()
    monkeypatch.undo()
    # the round keeps its number (2026-11-28: it moved to 1, and the retry below drew other noise than the leaves
    # the failed call may have written: two releases of one aggregate, twice the privacy cost)
    assert dp.state.torn is not None and dp.state.round == 0
    dp.reset()
    dp.fold({"w": np.ones(4, np.float32)}, party="a")
    untorn = jk.Aggregator(t, jk.algorithms.DPFixedClipping(clip_norm=10.0, noise_multiplier=0.1, num_sampled=2,
                                                            seed=1), backend="cpp", base=t)
    untorn.fold({"w": np.ones(4, np.float32)}, party="a")
    assert dp.finalize()["w"].tobytes() == untorn.finalize()["w"].tobytes()

    med = jk.Aggregator(t, FedMedian())
    med.fold({"w": np.ones(4, np.float32)}, party="a")
    monkeypatch.setattr(jk.Aggregator, "_record", lambda self, *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        med.fold({"w": np.ones(4, np.float32)}, party="b")
    monkeypatch.undo()
    with pytest.raises(jk.TornState):
        med.fold({"w": np.ones(4, np.float32)}, party="b")

    full, other = jk.Aggregator(t, FedMedian(k_max=2)), jk.Aggregator(t, FedMedian(k_max=2))
    for p in ("a1", "a2"):
        full.fold({"w": np.ones(4, np.float32)}, party=p)
    other.fold({"w": np.full(4, 3, np.float32)}, party="b1")
    before = full.state.copy()
    with pytest.raises(jk.AggregationError, match="full"):
        full.merge(other)
    assert full.state.torn is None and full.state.same_bits(before)
    assert full.finalize()["w"].tolist() == [1.0] * 4

    adam = jk.Aggregator(t, jk.algorithms.FedAdam(lr=0.1, tau=1e-3), base=t, deterministic=True)
    adam.fold({"w": np.ones(4, np.float32)}, party="a")
    monkeypatch.setattr(jk.FoldState, "value", fail)
    with pytest.raises(MemoryError):
        adam.finalize()
    monkeypatch.undo()
    assert adam.state.torn is None and not adam.state.torn_model
    assert np.isfinite(adam.finalize()["w"]).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_value_past_the_accumulators_range_is_refused_whatever_its_weight(backend):
    """The headroom bounds weight * |x|, but the kernels read x into the accumulator's dtype first: a float64 leaf's
    1e39 (or an int8 value times a scale of 3e38) with a small weight passed it, folded inf, and finalize returned
    inf (numpy and numba; the C++ stats, in float32, refused the quantized one: the backends disagreed)."""
    raw = jk.Aggregator({"w": np.zeros(3)}, backend=backend, acc_dtype="float32")
    q = jk.Aggregator({"w": np.zeros(2, np.float32)}, backend=backend)
    for agg, bad in ((raw, {"w": np.array([1e39, 1.0, 1.0])}),
                     (q, {"w": jk.Quantized(np.array([127, 1], np.int8), np.float32(3e38))})):
        n = agg.layout.leaves[0].size
        for first in (True, False):  # into an empty state (C++'s fused pass) and into one that holds an update
            if not first:
                agg.fold({"w": np.ones(n, agg.layout.leaves[0].dtype)}, party="honest")
            kept = agg.state.copy()
            for fold in (lambda: agg.fold(bad, weight=1e-9, party="x"),
                         lambda: agg.fold_many([bad], [1e-9], parties=["x"]),
                         lambda: agg.admit(bad, 1e-9, "x")):
                with pytest.raises(jk.ValueOutOfRange, match="'x'.*leaf 'w'.*past the float32 accumulator's range"):
                    fold()
                assert agg.state.same_bits(kept)
        assert agg.finalize()["w"].tolist() == [1.0] * n
    ok = jk.Aggregator({"w": np.zeros(3)}, backend=backend, acc_dtype="float64")  # (float64 holds it)
    ok.fold({"w": np.array([1e39, 1.0, 1.0])}, weight=1e-9, party="x")
    assert ok.finalize()["w"][0] == 1e39


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_finalize_reads_the_mean_for_inf_past_the_headrooms_count_of_terms(backend):
    """The headroom keeps 2^20 terms from overflowing the sum; finalize skipped reading the output for inf wherever
    the largest |x| was within range, and past 2^20 updates at the headroom the float32 sum was inf: returned."""
    agg = jk.Aggregator({"w": np.zeros(2, np.float32)}, backend=backend)
    agg.fold({"w": np.ones(2, np.float32)}, party=0)
    st = agg.state
    st.parties.update({p: 1.0 for p in range(1, (1 << 20) + 2)})  # (the record of 2^20 + 2 folds, not their time)
    st.leaf_weight[:] = st.total_weight
    st.acc[:] = np.inf  # what their sum came to
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'w'"):
        agg.finalize()


# --- contracts the mutation review of 2026-11-28 found untested (each fails on code with the mutation it names) ---
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_party_admitted_twice_before_either_fold_is_folded_once(backend):
    """Both admitted while the party was not folded yet (a resend): the per-update fold must refuse the second."""
    agg = jk.Aggregator({"w": np.zeros(8, np.float32)}, backend=backend)
    first = agg.admit({"w": np.ones(8, np.float32)}, 2.0, "a")
    resend = agg.admit({"w": np.full(8, 5.0, np.float32)}, 1.0, "a")
    agg.fold(first)
    kept = agg.state.copy()
    with pytest.raises(jk.DuplicateParty, match="'a'"):
        agg.fold(resend)
    assert agg.state.same_bits(kept) and agg.finalize()["w"].tolist() == [1.0] * 8


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_integer_leaves_max_of_negative_counters_and_mean_rounded_to_nearest(backend):
    t = {"w": np.zeros(2, np.float32), "n": np.zeros(2, np.int64)}
    mx = jk.Aggregator(t, int_leaves="max", backend=backend)  # the first carrier sets the leaf (not max with 0)
    mx.fold({"w": np.ones(2, np.float32), "n": np.array([-5, -7])}, 1.0, "a")
    assert mx.finalize()["n"].tolist() == [-5, -7]
    mean = jk.Aggregator(t, backend=backend)  # (10 * 1 + 19 * 3) / 4 = 16.75: rounded, not floored
    mean.fold_many([{"w": np.ones(2, np.float32), "n": np.array([10, -10])},
                    {"w": np.ones(2, np.float32), "n": np.array([19, -19])}], [1.0, 3.0], ["a", "b"])
    assert mean.finalize()["n"].tolist() == [17, -17]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merged_fednova_states_keep_every_partys_steps(backend):
    """FedNova divides by the parties' steps at finalize: a merge that dropped the other state's info failed."""
    t = {"w": np.zeros(4, np.float32)}
    mk = lambda: jk.Aggregator(t, jk.algorithms.FedNova(), base=t, backend=backend)  # noqa: E731
    a, b, whole = mk(), mk(), mk()
    for agg, u, p, s in ((a, 1.0, "p0", 10), (b, 2.0, "p1", 40), (whole, 1.0, "p0", 10), (whole, 2.0, "p1", 40)):
        agg.fold({"w": np.full(4, u, np.float32)}, 1.0, p, steps=s)
    a.merge(b)
    assert a.state.info == whole.state.info
    np.testing.assert_array_equal(a.finalize()["w"], whole.finalize()["w"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_merge_keeps_the_larger_peak_so_finalize_still_refuses_an_overflow(backend):
    top = np.finfo(np.float32).max
    w = 0.7 * 2.0 ** -21  # three terms of top * w: within the headroom each, their float32 mean past float32's range
    big = jk.Aggregator(np.zeros(4, np.float32), backend=backend)
    big.fold_many([np.full(4, top, np.float32)] * 3, [w] * 3, parties=[0, 1, 2])
    small = jk.Aggregator(np.zeros(4, np.float32), backend=backend)
    small.fold(np.zeros(4, np.float32), weight=1e-30, party="s")
    small.merge(big)
    assert small.state.peak == big.state.peak
    with pytest.raises(jk.ValueOutOfRange, match="beyond float32"):
        small.finalize()


@pytest.mark.parametrize("backend", ["numpy", "cpp"])  # (numba runs no float16)
def test_fednova_below_one_step_is_refused_past_the_output_dtype(backend):
    """steps < 1 folds an update at w / steps > w: the peak that bounds the output is scaled by it."""
    t = {"h": np.zeros(2, np.float16)}
    agg = jk.Aggregator(t, jk.algorithms.FedNova(), base=t, backend=backend)
    agg.fold({"h": np.full(2, 10000, np.float16)}, 1.0, "a", steps=0.01)  # delta 10000 at fold weight 100
    agg.fold({"h": np.zeros(2, np.float16)}, 1.0, "b", steps=1)
    with pytest.raises(jk.ValueOutOfRange, match="beyond float16"):
        agg.finalize(output="delta")


def test_states_of_different_rounds_do_not_merge():
    """A DP worker still at round 0 merged into a round-1 state would mix two rounds' parties under one noise key."""
    t = {"w": np.zeros(4, np.float32)}
    alg = lambda: jk.algorithms.DPFixedClipping(jk.algorithms.FedAvg(), clip_norm=10.0, noise_multiplier=0.5,  # noqa
                                                seed=7)
    a = jk.Aggregator(t, alg(), base=t)
    a.fold({"w": np.ones(4, np.float32)}, 1.0, "p0")
    a.finalize()
    a.reset(base=t)
    a.fold({"w": np.ones(4, np.float32)}, 1.0, "p1")
    b = jk.Aggregator(t, alg(), base=t)
    b.fold({"w": np.ones(4, np.float32)}, 1.0, "p2")
    kept = a.state.copy()
    with pytest.raises(jk.IncompatibleStates, match="different rounds"):
        a.merge(b)
    assert a.state.same_bits(kept)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_deterministic_merge_holds_the_bits_of_one_batch(backend):
    """The merge carries the (hi, lo) pair as a fold does: the merged state, not just its mean, equals one batch's."""
    rng = np.random.default_rng(0)
    ups = [{"w": rng.standard_normal(1000)} for _ in range(6)]
    mk = lambda: jk.Aggregator({"w": np.zeros(1000)}, deterministic=True, bound=2.0 ** 4, acc_dtype="float64",  # noqa
                               backend=backend)
    a, b, whole = mk(), mk(), mk()
    a.fold_many(ups[:3], parties=[0, 1, 2])
    b.fold_many(ups[3:], parties=[3, 4, 5])
    whole.fold_many(ups, parties=list(range(6)))
    assert a.state.merge(b.state).same_bits(whole.state)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_value_past_the_range_is_refused_against_a_base_too(backend):
    """Against a base the stats measure u - base, but the kernels read u into the accumulator's dtype: a float64
    leaf past float32's range whose delta was small passed, the accumulator went inf, and the round was lost (a
    test of 2026-11-27 had it refused at finalize only, the state then unusable)."""
    f32max = float(np.finfo(np.float32).max)
    t = {"w": np.zeros(4)}
    base = {"w": np.full(4, f32max)}
    u = {"w": np.full(4, f32max + 1e32)}  # (read as float32: inf; its delta, 1e32, is within the headroom)
    for fold in (lambda a: a.fold(u, 1.0, party="p"), lambda a: a.fold_many([u], [1.0], ["p"]),
                 lambda a: a.fold(a.admit(u, 1.0, party="p"))):
        agg = jk.Aggregator(t, acc_dtype="float32", base=base, backend=backend)
        with pytest.raises(jk.ValueOutOfRange, match="'p'.*as its delta against a base"):
            fold(agg)
        assert agg.state.count == 0
    ok = jk.Aggregator(t, acc_dtype="float32", base={"w": np.full(4, 1.0)}, backend=backend)
    ok.fold({"w": np.full(4, 3.0)}, 1.0, party="p")  # (a usual base costs nothing)
    assert ok.finalize()["w"].tolist() == [3.0] * 4
    # updates whose stats were taken elsewhere, measured again against this base: admitted against another base
    # (then reset(base=)), or without one (jk.admit); u - base past the range made the accumulator inf
    t32 = {"w": np.zeros(4, np.float32)}
    up, down = {"w": np.full(4, 3e38, np.float32)}, {"w": np.full(4, -3e38, np.float32)}
    stale = jk.Aggregator(t32, base=up, backend=backend)
    admitted = stale.admit(up, 1e-7, party="p")
    stale.reset(base=down)
    elsewhere = jk.Aggregator(t32, base=down, backend=backend)
    for agg, u in ((stale, admitted), (elsewhere, jk.admit(up, elsewhere.layout, weight=1e-7, party="p"))):
        agg.fold({"w": np.full(4, -3e38, np.float32)}, 1.0, party="honest")
        kept = agg.state.copy()
        with pytest.raises(jk.ValueOutOfRange, match="'p'.*as its delta against the base"):
            agg.fold(u)
        assert agg.state.same_bits(kept)
        assert agg.finalize()["w"][0] == np.float32(-3e38)


def test_the_kept_max_of_the_base_is_the_new_bases_after_a_reset():
    """reset(base=) took its new token before it set the new base: an admission in between (lock-free, from a
    scheduler's submit) kept max|old base| under the new token, and valid updates were refused all round."""
    t = {"w": np.zeros(4, np.float32)}
    a = jk.Aggregator(t, base={"w": np.full(4, 3e38, np.float32)})

    class Parties(dict):
        def clear(self):  # (runs inside reset, after its new token, before the new base is set)
            a._base_max()
            super().clear()

    a.state.parties = Parties()
    a.reset(base={"w": np.zeros(4, np.float32)}, reuse=True)
    assert a._base_max() == 0.0
    a.fold(a.admit({"w": np.full(4, 1e38, np.float32)}, 1e-7, party="p"))


@pytest.mark.parametrize("template", [
    {}, {"a": np.zeros(3, np.complex64)}, {"a": np.array([1, None], dtype=object)}, {1: np.zeros(3, np.float32)},
    {"a": jk.Quantized(np.zeros(3, np.int8), 1.0)}, {"a.b": np.zeros(1), "a": {"b": np.zeros(1)}},
    5, None, "model", {"a": 3.0},  # (LayoutMismatch, "expected an array", as if a party's update were bad)
], ids=["empty", "complex", "object", "int key", "quantized", "two names", "int", "none", "str", "float leaf"])
def test_bad_templates_raise_invalid_template(template):
    """A template that describes no model raises the library's typed error (still a TypeError, as before)."""
    with pytest.raises(jk.InvalidTemplate) as e:
        jk.Aggregator(template, backend="numpy")
    assert isinstance(e.value, TypeError) and isinstance(e.value, jk.AggregationError)


@pytest.mark.parametrize("values, scale, block", [
    (np.zeros(3, np.float32), 1.0, None), (np.zeros(4, np.int8), np.ones(2), None),
    (np.zeros(4, np.int8), np.ones(2), 0),
    (np.zeros(4, np.int8), np.ones(3), 2), (np.zeros(4, np.int8), 1.0, "2"),
    # a complex scale lost its imaginary part; a str one raised a bare ValueError, None came back as NonFiniteUpdate
    # at the fold; block=True was a block of 1; a float64 scale of 1e-50 was 0 in float32 (the update all zeros); a
    # tensor with its negative bit raised numpy's RuntimeError
    (np.zeros(4, np.int8), 2 + 1j, None), (np.zeros(4, np.int8), "2", None), (np.zeros(4, np.int8), None, None),
    (np.zeros(4, np.int8), np.ones(4), True), (np.zeros(4, np.int8), 1e-50, None),
    (-torch.zeros(4, dtype=torch.float32).to(torch.int8), torch.complex(torch.zeros(1), torch.ones(1)).conj().imag,
     None),
    # a finite float64 scale past float32's range was inf there: the party's update refused as non-finite
    (np.zeros(4, np.int8), 1e39, None), (np.zeros(4, np.int8), np.array([1.0, -1e39]), 2),
], ids=["float values", "no block", "block 0", "3 scales", "str block", "complex scale", "str scale", "no scale",
        "block True", "scale underflows", "neg-bit scale", "scale overflows", "a block's scale overflows"])
def test_bad_quantized_leaves_raise_invalid_quantized(values, scale, block):
    """A Quantized leaf built from a party's bad bytes is that party's bad update: AggregationError (LayoutMismatch),
    still a TypeError for code that caught the old error."""
    with pytest.raises(jk.InvalidQuantized) as e:
        jk.Quantized(values, scale, block)
    assert isinstance(e.value, (jk.LayoutMismatch, TypeError))
    if np.ndim(scale) == 0 and isinstance(scale, float) and scale > 1e38:  # (it names the scale and its value)
        assert "scale 0 = 1e+39 overflows float32" in str(e.value)
    elif block == 2 and np.ndim(scale) and np.size(scale) == 2 and np.abs(np.asarray(scale)).max() > 1e38:
        assert "scale 1 = -1e+39 overflows float32" in str(e.value)


def test_every_error_pickles_with_its_type_and_fields():
    """A Ray task's error reaches the driver pickled. Exception's pickling calls the class with its message alone:
    NonFiniteUpdate, InvalidWeight, InvalidUpdateInfo, TooFewUpdates and the store's errors could not be rebuilt
    (the driver got Ray's UnserializableException, no AggregationError), DuplicateParty came back with the whole
    message as its party."""
    import errno

    import importlib
    from jitkernels import errors as E, robust_store as RS

    def every(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from every(sub)

    made = {E.NonFiniteUpdate: ("p", "w", 3), E.InvalidWeight: ("p", -1.0), E.DuplicateParty: (7, "this batch"),
            E.InvalidUpdateInfo: ("p", "steps", 0, "must be > 0"), E.TooFewUpdates: ("krum", 3, 1, 5),
            E.OverlappingParties: (["a", "b"],), RS.StoreFull: ("p", 3), RS.BudgetExceeded: ("p", 100, 10),
            RS.SpillFailed: ("p", "/spill", OSError(errno.ENOSPC, "No space left on device"))}
    importlib.import_module("scheduler")  # (its errors are AggregationErrors too)
    classes = set(every(jk.AggregationError))
    assert len(classes) > 25
    for cls in classes:
        e = cls(*made.get(cls, ("what is wrong",)))  # a class with another __init__ belongs in `made`
        e.add_note("while folding job 'j' round 3")
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is cls and str(back) == str(e) and back.args == e.args, cls
        assert back.__dict__ == e.__dict__ and getattr(back, "errno", None) == getattr(e, "errno", None), cls
    assert pickle.loads(pickle.dumps(E.DuplicateParty(7))).party == 7


def test_quantized_leaves_in_gpu_memory_keep_their_host_scales_and_their_errors(monkeypatch):
    """Two slips of the Quantized checks: the rounding check uploaded the host scales without a dtype, which CuPy
    refuses for bfloat16 (GPU values with host bf16 scales raised ValueError), and GPU values where the GPU backend
    cannot run came out as InvalidQuantized, not BackendUnavailable. CuPy stood in for by numpy with its upload
    rule (cupy/_core: numpy.array(obj, dtype), then 'Unsupported dtype' for a type char it lacks)."""
    import types

    from jitkernels import device, dtypes

    gpu = types.SimpleNamespace(any=np.any, ascontiguousarray=np.ascontiguousarray, float32=np.float32)

    def upload(obj, dtype=None):
        a = np.array(obj, dtype=dtype)
        if a.dtype.char not in "?bhilqBHILQefdFD":
            raise ValueError(f"Unsupported dtype {a.dtype}")
        return a

    gpu.asarray = upload
    values = dtypes._values
    monkeypatch.setattr(dtypes, "_values", lambda x: (x, gpu) if isinstance(x, np.ndarray) and x.dtype == np.int8
                        else values(x))
    for scale in (np.array([0.5], bfloat16), np.array([0.5], np.float16), torch.tensor([0.5], dtype=torch.bfloat16)):
        assert jk.Quantized(np.array([1, 2, 3], np.int8), scale).scale.tolist() == [0.5]
    monkeypatch.undo()
    marker = object()
    on_gpu = device.is_device_array
    monkeypatch.setattr(device, "is_device_array", lambda x: x is marker or on_gpu(x))
    if jk.available_backends()["cupy"] is not True:
        monkeypatch.setitem(__import__("sys").modules, "cupy", None)
        with pytest.raises(jk.BackendUnavailable, match="needs the GPU backend"):
            jk.Quantized(marker, 0.5)


@pytest.mark.parametrize("base, error", [
    (np.zeros(1, np.float32), ValueError), (np.zeros(8, np.float32)[::2], ValueError),
    (np.zeros(4, np.float64), ValueError), (np.zeros((2, 2), np.float32), ValueError),
    ({"w": np.zeros(4, np.float32)}, TypeError), ([0.0] * 4, TypeError),
], ids=["short", "strided", "float64", "2-d", "dict", "list"])
def test_jk_admit_checks_its_base(base, error):
    """jk.admit's base (flat, in the accumulator dtype) was not checked: the C++ stats kernel read a short one past
    its end (a 4-float base for a 4M-element layout: 16 MB of other memory), a strided one as if contiguous, and each
    backend gave other stats or another error."""
    layout = jk.Aggregator({"w": np.zeros(4, np.float32)}).layout
    for backend in CPU_BACKENDS:
        with pytest.raises(error, match="the flat model in the accumulator dtype"):
            jk.admit({"w": np.ones(4, np.float32)}, layout, party="p", base=base, backend=backend)
    u = jk.admit({"w": np.ones(4, np.float32)}, layout, party="p", base=np.full(4, 0.5, np.float32))
    assert u.maxabs == 0.5


def test_a_finite_update_whose_delta_overflows_is_out_of_range_on_every_backend():
    """numpy and numba formed u - base in float64 and counted an overflow there as a non-finite value: an honest
    party's finite update was NonFiniteUpdate on them, ValueOutOfRange on cpp. And a float64 accumulator's refusal
    hinted "acc_dtype='float64' takes more"."""
    x = {"w": np.array([1e308, 0.0])}
    for backend in CPU_BACKENDS:
        agg = jk.Aggregator(x, base=x, backend=backend)
        with pytest.raises(jk.ValueOutOfRange, match=r"has \|x\| = inf as its delta") as e:
            agg.fold({"w": np.array([-1e308, 0.0])}, party="p")
        assert "takes more" not in str(e.value) and agg.state.count == 0


def test_quantize_refuses_values_an_int8_encoding_cannot_hold():
    """A NaN came out of Quantized.quantize as a finite 0 (its block's scale 1), and the corrupt update passed
    admission; a float64 value past float32's range likewise."""
    for x in ([np.nan, 1.0, 2.0], [np.inf, 1.0], np.array([1e39, 1.0])):
        with pytest.raises(ValueError, match="NaN or inf"):
            jk.Quantized.quantize(np.asarray(x), block=2)
    assert jk.Quantized.quantize(np.array([1.0, -3.0], np.float32)).values.tolist() == [42, -127]


@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
def test_from_state_of_a_held_state_copies_it_and_leaves_the_first_aggregator_its_lock(backend):
    """from_state(agg.state) took over the live state: folds through either aggregator ran under different locks (a
    party racing itself through both was summed twice, recorded once) and the first one's saves waited on the
    second's lock (torn files). A held state is now copied; a loaded one is still taken over."""
    t = {"w": np.zeros(8, np.float32)}
    a = jk.Aggregator(t, backend=backend)
    a.fold({"w": np.ones(8, np.float32)}, weight=1.0, party="p0")
    b = jk.Aggregator.from_state(a.state, backend=backend)
    assert b.state is not a.state and a.state.guard is a._lock and b.state.guard is b._lock
    b.fold({"w": np.full(8, 3.0, np.float32)}, weight=1.0, party="p1")
    a.fold({"w": np.full(8, 5.0, np.float32)}, weight=1.0, party="p1")  # its own round: p1 is new to it
    assert a.finalize()["w"][0] == 3.0 and b.finalize()["w"][0] == 2.0
    loaded = jk.FoldState.from_bytes(a.state.to_bytes())
    c = jk.Aggregator.from_state(loaded, backend=backend)
    assert c.state is loaded


@pytest.mark.parametrize("backend", ["numpy", "cpp"])
def test_a_fold_measures_an_update_admitted_elsewhere_into_a_copy_not_the_callers_admitted(backend):
    """An update admitted without this aggregator's base is measured against it at the fold; the stats were written
    into the caller's Admitted, which another aggregator (another base) folding it at once then read: it clipped by
    the other base's delta norm (DP, 4 of 10 concurrent runs off by 5% of the model's change)."""
    A = jk.algorithms
    t = {"w": np.zeros(4, np.float32)}
    aggs = [jk.Aggregator(t, A.DPFixedClipping(A.FedAvg(), clip_norm=1.0, noise_multiplier=0.0), base=b,
                          backend=backend) for b in ({"w": np.zeros(4, np.float32)}, {"w": np.full(4, 5.0, np.float32)})]
    u = jk.admit({"w": np.full(4, 2.0, np.float32)}, aggs[0].layout, weight=1.0, party="p")
    before = (u.norm, u.maxabs, u.against_base, u.worst_leaf)
    for agg in aggs:
        agg.fold_many([u])
        assert (u.norm, u.maxabs, u.against_base, u.worst_leaf) == before
    assert np.allclose(aggs[0].finalize()["w"], 0.5) and np.allclose(aggs[1].finalize()["w"], 4.5)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmedian", "fedadam"])
def test_an_aggregator_copies_and_pickles_with_its_own_lock(algorithm):
    """copy.deepcopy and pickle of an Aggregator (inside a Flower strategy copied for a sweep, or sent to a Ray task)
    raised "cannot pickle '_thread.RLock'". A copy takes its own lock and goes on apart from the original."""
    import copy

    z = {"w": np.zeros(3, np.float32)}
    agg = jk.Aggregator(z, algorithm, base=z if algorithm == "fedadam" else None)
    agg.fold({"w": np.ones(3, np.float32)}, party="p")
    for c in (copy.deepcopy(agg), pickle.loads(pickle.dumps(agg))):
        assert c.state.guard is c._lock and c._lock is not agg._lock
        c.fold({"w": np.full(3, 3, np.float32)}, party="q")
        assert (c.state.count, agg.state.count) == (2, 1)
        want = jk.Aggregator(z, algorithm, base=z if algorithm == "fedadam" else None)
        want.fold_many([{"w": np.ones(3, np.float32)}, {"w": np.full(3, 3, np.float32)}], parties=["p", "q"])
        np.testing.assert_array_equal(c.finalize()["w"], want.finalize()["w"])


@pytest.mark.parametrize("algorithm", ["fedadam", "fedmedian"])
def test_a_deepcopy_copies_each_array_once(algorithm):
    """deepcopy took the snapshot of ``__getstate__`` (every array copied under the lock) and deep-copied it again:
    at its peak two copies of the state's arrays (8 GB for a 1B-parameter FedAdam's 4 GB). Now once; the copy's
    arrays and store are its own, and the original's later folds do not reach it."""
    import copy
    import tracemalloc

    n = 2_000_000
    z = {"w": np.zeros(n, np.float32)}
    agg = jk.Aggregator(z, algorithm, base=z if algorithm == "fedadam" else None)
    agg.fold({"w": np.ones(n, np.float32)}, party="p")
    st = agg.state
    arrays = [a for a in (st.acc, st.lo, st.base, st.leaf_weight, *(st.opt or {}).values()) if a is not None]
    tracemalloc.start()
    try:
        twin = copy.deepcopy(agg)
        kept, peak = tracemalloc.get_traced_memory()  # (kept: the copy's arrays)
    finally:
        tracemalloc.stop()
    assert kept >= 4 * n and peak < 1.25 * kept, (peak, kept)
    mine = [a for a in (twin.state.acc, twin.state.base, *(twin.state.opt or {}).values()) if a is not None]
    assert not any(np.shares_memory(a, b) for a in mine for b in arrays)
    assert twin.state.same_bits(agg.state) and twin.state.parties is not agg.state.parties
    agg.fold({"w": np.full(n, 5, np.float32)}, party="q")
    assert (agg.state.count, twin.state.count) == (2, 1)
    twin.fold({"w": np.full(n, 3, np.float32)}, party="q")
    want = jk.Aggregator(z, algorithm, base=z if algorithm == "fedadam" else None)
    want.fold_many([{"w": np.ones(n, np.float32)}, {"w": np.full(n, 3, np.float32)}], parties=["p", "q"])
    np.testing.assert_array_equal(twin.finalize()["w"], want.finalize()["w"])


def _off_alignment(a):
    """``a``'s values in a view one byte past an aligned address (a leaf cut out of a received byte buffer)."""
    buf = np.zeros(a.nbytes + 1, np.uint8)
    out = np.frombuffer(buf.data, a.dtype, a.size, offset=1).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_leaves_off_their_alignment_are_copied_and_outputs_refused(backend):
    """The compiled kernels read leaves through typed pointers: a view at an odd byte offset was undefined behaviour
    there (UBSan: "load of misaligned address"; right on x86, a fault where the compiler or a GPU assumes the
    alignment). Such a leaf is copied once, as a strided one is; an output leaf off its alignment is refused, as a
    strided one is. Quantized scales too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(33).astype(np.float32)
    m = _off_alignment(x)
    lay = jk.Layout.from_template({"w": np.zeros(33, np.float32)})
    u = jk.admit({"w": m}, lay, backend=backend)
    assert u.leaves[0].flags.aligned and np.array_equal(u.leaves[0], x)
    agg = jk.Aggregator({"w": np.zeros(33, np.float32)}, backend=backend)
    agg.fold({"w": m}, party="p")
    agg.fold_many([{"w": m}], parties=["q"])
    np.testing.assert_array_equal(agg.finalize()["w"], x)
    with pytest.raises(jk.LayoutMismatch, match="output leaf must be writeable, C-contiguous, aligned"):
        agg.finalize(out={"w": _off_alignment(np.zeros(33, np.float32))})
    q = jk.Quantized(np.ones(33, np.int8), _off_alignment(np.full(3, 0.5, np.float32)), block=11)
    assert q.scale.flags.aligned and np.array_equal(q.dequantize(), np.full(33, 0.5, np.float32))
    object.__setattr__(q, "scale", _off_alignment(q.scale))  # (as unpickled from out-of-band buffers: no checks)
    assert jk.admit({"w": q}, lay, backend=backend).leaves[0].scale.flags.aligned


def test_a_copy_is_a_snapshot_and_holds_a_robust_stores_rows_only(tmp_path):
    """deepcopy and pickle copied the state after the lock was let go (a fold from another thread tore the copy: an
    update's sums without its record), the whole k_max x N reservation of a robust rule's store (1.5 GB for 3 rows
    of 100k), and a spilled store's copy wrote into the original's file."""
    import copy

    from jitkernels import robust as R

    z = {"w": np.zeros(100_000, np.float32)}
    agg = jk.Aggregator(z, R.FedMedian())
    for p in "abc":
        agg.fold({"w": np.full(100_000, ord(p), np.float32)}, party=p)
    assert agg.__getstate__()["state"] is not agg.state  # (taken under the lock)
    twin = copy.deepcopy(agg)  # (its admission's view of the state named the original's: copied unlocked, twice)
    assert twin._base_view[0] is twin.state
    assert len(pickle.dumps(agg)) < 5 * agg.state.store.rows().nbytes
    spilled = jk.Aggregator(z, R.FedMedian(budget_bytes=1, over_budget="spill", spill_dir=str(tmp_path)))
    spilled.fold({"w": np.ones(100_000, np.float32)}, party="a")
    for c in (copy.deepcopy(spilled), pickle.loads(pickle.dumps(spilled))):
        assert c.state.store.spill_path != spilled.state.store.spill_path
        spilled.reset()  # (the original's file goes)
        c.fold({"w": np.full(100_000, 3, np.float32)}, party="b")
        np.testing.assert_array_equal(c.finalize()["w"], np.full(100_000, 2, np.float32))
        spilled.fold({"w": np.ones(100_000, np.float32)}, party="a")


def test_dp_noise_is_keyed_by_the_aggregate_it_noises(tmp_path):
    """Noise keyed by (seed, round) alone was released twice: by a deep copy or a pickle of an aggregator, a state
    resumed with from_state, a shallow copy of the algorithm, two aggregators of one instance, or two instances given
    one seed. k * (r2 - r1) then gave the difference of the two rounds' sums exactly (the noise cancelled). Noise keyed
    by the aggregate: every second aggregate that differs gets its own noise, and one that does not gets the same
    release (nothing new)."""
    import copy

    from jitkernels import algorithms as A

    z = {"w": np.zeros(64)}
    u1, u2, u3 = ({"w": np.full(64, v)} for v in (0.01, 0.02, 0.05))

    def dp():
        return A.DPFixedClipping(A.FedAvg(), clip_norm=1.0, noise_multiplier=1.0, seed=1234)

    def leaked(r1, r2):  # the two sums' difference read off the releases exactly: the noise cancelled
        return np.allclose(2 * (r2["w"] - r1["w"]), u3["w"] - u2["w"], rtol=0, atol=1e-12)

    def twin(make):  # an aggregator holding u1, and what ``make`` makes of it
        a = jk.Aggregator(z, dp(), base=z)
        a.fold(u1, party="p")
        return a, make(a)

    def two(algorithms):  # two aggregators holding u1, of these algorithms
        pair = tuple(jk.Aggregator(z, alg, base=z) for alg in algorithms)
        for agg in pair:
            agg.fold(u1, party="p")
        return pair

    one = dp()
    pairs = {"deepcopy": twin(copy.deepcopy), "pickle": twin(lambda a: pickle.loads(pickle.dumps(a))),
             "from_state": twin(lambda a: jk.Aggregator.from_state(a.state.copy())),
             "one instance": two((one, one)), "copy.copy": two((one, copy.copy(one))), "one seed": two((dp(), dp()))}
    for how, (a, b) in pairs.items():
        a.fold(u2, party="q")
        b.fold(u3, party="q")
        ra, rb = a.finalize(), b.finalize()
        assert not leaked(ra, rb), how
        np.testing.assert_allclose(ra["w"], (u1["w"] + u2["w"]) / 2, atol=5)  # (noise of std 0.5 on each)
    same = jk.Aggregator(z, dp(), base=z), jk.Aggregator(z, dp(), base=z)
    for agg in same:
        agg.fold(u1, party="p")
        agg.fold(u2, party="q")
    r = [agg.finalize()["w"] for agg in same]
    assert r[0].tobytes() == r[1].tobytes() and not np.allclose(r[0], (u1["w"] + u2["w"]) / 2, atol=1e-3)


def test_switches_are_true_or_false_not_truthy():
    """deterministic="False", partial="no", copy="no", reset(reuse="no") and Job(deterministic="no") switched the
    modes on (a string is truthy); robust rules truncated k_max=2.9 to 2 and took a budget of True as 1 byte; SecAgg
    folded parties "pq" as 'p' and 'q'. Each is refused, naming the parameter."""
    from jitkernels import robust as R
    from jitkernels.secagg import SecAggSum
    from scheduler import InvalidJob, Job

    t = {"w": np.zeros(4, np.float32)}
    for name in ("deterministic", "partial", "copy"):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
            jk.Aggregator(t, **{name: "no"})
    agg = jk.Aggregator(t)
    with pytest.raises(TypeError, match="reuse must be True or False"):
        agg.reset(reuse="no")
    with pytest.raises(InvalidJob, match="deterministic must be True or False"):
        Job("j", template=t, parties=["a"], deterministic="no").check()
    for bad in (2.9, True, "8", 0):
        with pytest.raises(ValueError, match="k_max must be an integer"):
            R.FedMedian(k_max=bad)
    for bad in (True, 1.5, "x"):
        with pytest.raises(ValueError, match="budget_bytes must be an integer"):
            R.FedMedian(budget_bytes=bad)
    s = SecAggSum([4], 32)
    with pytest.raises(TypeError, match="parties is a list"):
        s.fold_many([np.zeros(4, np.uint32)] * 2, "pq")
    assert s.count == 0


def test_an_accumulator_dtype_is_float32_or_float64_everywhere():
    """jk.admit took acc_dtype="float16" and blamed the party ("weight 1 is outside what the float16 accumulator
    holds"); Aggregator(acc_dtype=64) leaked numpy's "Cannot interpret '64' as a data type"."""
    t = {"w": np.zeros(4, np.float32)}
    lay = jk.Aggregator(t).layout
    for bad in ("float16", 64, "u32", "int32"):
        with pytest.raises(ValueError, match="acc_dtype must be float32 or float64"):
            jk.admit({"w": np.ones(4, np.float32)}, lay, acc_dtype=bad)
        with pytest.raises(ValueError, match="acc_dtype must be float32 or float64"):
            jk.Aggregator(t, acc_dtype=bad)
    assert jk.admit({"w": np.ones(4, np.float32)}, lay, acc_dtype=np.float64).weight == 1.0


def test_the_error_audit_leftovers_name_what_is_wrong():
    """Leftovers of the error-message audit of 2026-11-28: an algorithm class in place of an instance failed on
    "params() missing 'self'", a clock that is no clock on "'str' object has no attribute 'now'", a float block
    inside numpy, norm_scores of numbers on "'int' object has no attribute 'norm'", an unknown backend said
    "unavailable: KeyError", and seed=True was the seed 1."""
    from jitkernels import algorithms as A
    from scheduler import JITScheduler

    t = {"w": np.zeros(3, np.float32)}
    with pytest.raises(TypeError, match=r"algorithm FedAvg is a class; pass an instance, FedAvg\(...\)"):
        jk.Aggregator(t, A.FedAvg)
    with pytest.raises(TypeError, match=r"clock must be a clock .* got str without now\(\)"):
        JITScheduler(clock="x")
    from scheduler import VirtualClock

    with pytest.raises(TypeError, match="got the class VirtualClock"):  # (a second review: the class passed, then
        JITScheduler(clock=VirtualClock)  # failed on now() missing 'self', holding its state directory)
    with pytest.raises(jk.InvalidQuantized, match="block must be an integer, got 2.5"):
        jk.Quantized.quantize(np.ones(8, np.float32), block=2.5)
    assert jk.Quantized.quantize(np.ones(8, np.float32), block=np.int64(4)).block == 4
    ok = jk.admit(t, jk.Layout.from_template(t), party="a")
    with pytest.raises(TypeError, match="norm_scores takes admitted updates .* item 1 is a int"):
        jk.norm_scores([ok, 2])
    with pytest.raises(TypeError, match="item 0 is a str"):  # (a dict of them: its keys; it failed on KeyError 0)
        jk.norm_scores({"a": ok})
    assert list(jk.norm_scores(u for u in [ok])) == ["a"]  # (a generator gave {})
    with pytest.raises(jk.BackendUnavailable, match="no backend 'foo'; the backends are numpy, numba, cpp, cupy"):
        jk.backends.get("foo")
    with pytest.raises(TypeError, match="seed must be an integer, got True"):
        A.DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, seed=True)


@pytest.mark.parametrize("backend", ["numpy", "numba", "cpp"])
def test_a_non_finite_update_names_its_first_bad_value(backend):
    """The error named the party, the leaf and how many values were NaN or inf (all the stats pass counts); it now
    names the first of them too, and where it sits (int8: where its non-finite scale's block starts)."""
    t = {"a": np.zeros(4, np.float32), "b": np.zeros((2, 3), np.float32)}
    agg = jk.Aggregator(t, backend=backend)
    bad = {"a": np.ones(4, np.float32), "b": np.array([[1, 2, 3], [np.inf, 5, np.nan]], np.float32)}
    with pytest.raises(jk.NonFiniteUpdate, match=r"party 'p': leaf 'b' holds 2 non-finite value\(s\), the first "
                                                 r"\(inf\) at flat index 3") as e:
        agg.fold(bad, party="p")
    assert (e.value.index, e.value.value, e.value.count) == (3, math.inf, 2)
    with pytest.raises(jk.NonFiniteUpdate, match=r"party 'y': .* the first \(inf\) at flat index 3"):
        agg.fold_many([t, bad], parties=["x", "y"])
    q = jk.Quantized(np.ones(6, np.int8).reshape(2, 3), np.array([1.0, np.nan], np.float32), 4)
    with pytest.raises(jk.NonFiniteUpdate, match=r"leaf 'b' holds 2 non-finite value\(s\), the first \(nan\) at flat "
                                                 r"index 4"):
        agg.fold({"a": np.ones(4, np.float32), "b": q}, party="q")
    assert agg.state.count == 0
