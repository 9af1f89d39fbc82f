"""The CuPy backend on a real GPU, end to end through the Aggregator, against the numpy reference.

Skipped, with the reason, where no GPU backend is available (``jk.available_backends()["cupy"]``). The same kernels
run in CI through the host emulation (test_gpu_shim.py) and are compiled there by nvcc and NVRTC
(test_cuda_source.py); this file checks what only a GPU can: CuPy's NVRTC build, real streams and pinned memory,
DLPack exchange with torch, results on the device.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jitkernels as jk

from strategies import (FLOAT_DTYPES, GramCase, check_combine, check_device_gram, combine_cases, device_gram_cases,
                        leaf_shapes, make_update, robust_rules, seeds)

REASON = jk.available_backends()["cupy"]
pytestmark = pytest.mark.skipif(REASON is not True, reason=f"GPU backend unavailable: {REASON}")
INPUTS = FLOAT_DTYPES + ("int8",)


def _updates(rng, shapes, in_dtype, k, block=None):
    src = "float32" if in_dtype == "int8" else in_dtype
    tmpl = make_update(rng, shapes, src)
    ups = [make_update(rng, shapes, src, quantize=in_dtype == "int8", block=block) for _ in range(k)]
    return tmpl, ups, rng.uniform(1.0, 100.0, k)


def _same(a, b):
    return list(a) == list(b) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes()
                                      for x, y in zip(a.values(), b.values()))


@pytest.mark.parametrize("in_dtype", INPUTS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@settings(max_examples=15)
@given(seed=seeds, shapes=leaf_shapes(max_size=40000), k=st.integers(1, 6), with_base=st.booleans(),
       pinned=st.booleans(), block=st.sampled_from([None, 64]))
def test_host_updates_bit_exact(in_dtype, acc_dtype, seed, shapes, k, with_base, pinned, block):
    import cupyx
    rng = np.random.default_rng(seed)
    tmpl, ups, w = _updates(rng, shapes, in_dtype, k, block)
    if pinned:  # as a server that receives into pinned buffers would hand them over
        def pin(a):
            if isinstance(a, jk.Quantized):
                return jk.Quantized(pin(a.values), pin(a.scale), a.block)
            p = cupyx.empty_pinned(a.shape, a.dtype)
            p[...] = a
            return p
        ups = [{n: pin(a) for n, a in u.items()} for u in ups]
    base = make_update(rng, shapes, "float32" if in_dtype == "int8" else in_dtype) if with_base else None
    ref = jk.Aggregator(tmpl, backend="numpy", acc_dtype=acc_dtype, base=base)
    gpu = jk.Aggregator(tmpl, backend="cupy", acc_dtype=acc_dtype, base=base)
    for agg in (ref, gpu):
        agg.fold_many(ups[: k // 2], w[: k // 2], parties=list(range(k // 2)))
        agg.fold_many(ups[k // 2:], w[k // 2:], parties=list(range(k // 2, k)))
    assert gpu.state.on_device
    assert jk.FoldState.same_bits(gpu.state, ref.state)
    assert _same(gpu.finalize(), ref.finalize())


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@settings(max_examples=10)
@given(seed=seeds, shapes=leaf_shapes(max_size=40000), k=st.integers(1, 5))
def test_cupy_updates_read_in_place(dtype, seed, shapes, k):
    import cupy as cp
    rng = np.random.default_rng(seed)
    tmpl, ups, w = _updates(rng, shapes, dtype, k)
    ref = jk.Aggregator(tmpl, backend="numpy")
    ref.fold_many(ups, w, parties=list(range(k)))
    dev_tmpl = {n: cp.asarray(a) for n, a in tmpl.items()}
    gpu = jk.Aggregator(dev_tmpl)  # auto: the template is on the GPU
    assert gpu.backend == "cupy"
    gpu.fold_many([{n: cp.asarray(a) for n, a in u.items()} for u in ups], w, parties=list(range(k)))
    out = gpu.finalize()
    assert all(isinstance(v, cp.ndarray) for v in out.values())
    assert _same({n: v.get() for n, v in out.items()}, ref.finalize())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_torch_cuda_tensors_in_and_out(dtype):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    rng = np.random.default_rng(0)
    tmpl, ups, w = _updates(rng, [(1000,), (30, 40), ()], dtype, 4)
    ref = jk.Aggregator({n: torch.from_numpy(np.asarray(a, np.float32)).to(getattr(torch, dtype)) for n, a in
                         tmpl.items()}, backend="numpy")
    tt = [{n: torch.from_numpy(np.asarray(a, np.float32)).to(getattr(torch, dtype)) for n, a in u.items()} for u in ups]
    ref.fold_many(tt, w, parties=list(range(4)))
    gpu = jk.Aggregator({n: t.cuda() for n, t in ref.layout.unflatten(
        [np.zeros(l.shape, jk.bfloat16 if dtype == "bfloat16" else np.float32) for l in ref.layout.leaves]).items()})
    gpu.fold_many([{n: t.cuda() for n, t in u.items()} for u in tt], w, parties=list(range(4)))
    out, want = gpu.finalize(), ref.finalize()
    for n in want:
        assert out[n].is_cuda and out[n].dtype == want[n].dtype
        assert torch.equal(out[n].cpu().view(torch.int16) if dtype == "bfloat16" else out[n].cpu(),
                           want[n].view(torch.int16) if dtype == "bfloat16" else want[n])


def _on_gpu(q, scales_on_host=False):
    """A host Quantized leaf with its values (and scales, unless ``scales_on_host``) copied to GPU memory."""
    import cupy as cp
    return jk.Quantized(cp.asarray(q.values), q.scale if scales_on_host else cp.asarray(q.scale), q.block)


@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@settings(max_examples=10)
@given(seed=seeds, shapes=leaf_shapes(max_size=40000), k=st.integers(1, 5), block=st.sampled_from([None, 64]),
       scales_on_host=st.booleans(), with_base=st.booleans())
def test_quantized_updates_in_gpu_memory_read_in_place(acc_dtype, seed, shapes, k, block, scales_on_host,
                                                        with_base):
    """int8 values (and scales) already in GPU memory are folded where they are, by fold_many and by per-update
    fold, with the bits of the same updates in host memory on the numpy reference."""
    import cupy as cp
    rng = np.random.default_rng(seed)
    tmpl, ups, w = _updates(rng, shapes, "int8", k, block)
    base = make_update(rng, shapes, "float32") if with_base else None
    dev = [{n: _on_gpu(q, scales_on_host) for n, q in u.items()} for u in ups]
    assert all(q.on_device and isinstance(q.scale, cp.ndarray) for u in dev for q in u.values())
    ref = jk.Aggregator(tmpl, backend="numpy", acc_dtype=acc_dtype, base=base)
    ref.fold_many(ups, w, parties=list(range(k)))
    dev_base = None if base is None else {n: cp.asarray(a) for n, a in base.items()}
    gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, acc_dtype=acc_dtype, base=dev_base)
    gpu.fold_many(dev[: k // 2], w[: k // 2], parties=list(range(k // 2)))
    for j in range(k // 2, k):
        gpu.fold(dev[j], weight=w[j], party=j)
    assert gpu.backend == "cupy" and jk.FoldState.same_bits(gpu.state, ref.state)
    assert _same({n: v.get() for n, v in gpu.finalize().items()}, ref.finalize())


def test_quantized_updates_in_gpu_memory_are_checked_copied_and_buffered():
    """A non-finite scale is refused by name with the state untouched; copy-on-admit copies values and scales on the
    device; a robust rule's device store takes the dequantized values (the host rule's bits); host values with
    device scales are refused."""
    import cupy as cp
    from jitkernels import robust as R

    rng = np.random.default_rng(2)
    tmpl, ups, w = _updates(rng, [(3000,), (5,)], "int8", 5, 64)
    dev = [{n: _on_gpu(q) for n, q in u.items()} for u in ups]
    agg = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()})
    agg.fold(dev[0], weight=w[0], party=0)
    before = agg.state.copy()
    q = dev[1]["l1"]
    bad = {**dev[1], "l1": jk.Quantized(q.values, cp.asarray(np.float32([np.inf])), None)}
    with pytest.raises(jk.NonFiniteUpdate, match="'l1'") as e:
        agg.fold(bad, weight=w[1], party=1)
    assert e.value.party == 1 and agg.state.same_bits(before)
    u = jk.admit(dev[1], agg.layout, weight=w[1], party=1, copy=True)
    dev[1]["l0"].values[:] = 0  # the caller reuses its buffers: the admitted copy keeps the update
    dev[1]["l0"].scale[:] = 0
    agg.fold_many([u])
    ref = jk.Aggregator(tmpl, backend="numpy")
    ref.fold_many(ups[:2], w[:2], parties=[0, 1])
    assert agg.state.same_bits(ref.state)
    host, gpu = jk.Aggregator(tmpl, R.FedMedian()), jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()},
                                                                   R.FedMedian())
    host.fold_many(ups[2:], w[2:], parties=[2, 3, 4])
    gpu.fold_many(dev[2:], w[2:], parties=[2, 3, 4])
    assert _same({n: v.get() for n, v in gpu.finalize().items()}, host.finalize())
    with pytest.raises(TypeError, match="scales in GPU memory"):
        jk.Quantized(ups[0]["l0"].values, cp.asarray(ups[0]["l0"].scale), 64)
    big = {**dev[0], "l0": jk.Quantized(dev[0]["l0"].values, cp.full(dev[0]["l0"].scale.size, 1e37, cp.float32), 64)}
    before = gpu.state.copy()
    with pytest.raises(jk.ValueOutOfRange, match="leaf 'l0'"):  # q * scale past the slab's float32
        gpu.fold(big, weight=1.0, party="big")
    assert gpu.state.same_bits(before)
    try:
        bf16 = cp.asarray(np.array([1.0, 0.5], jk.bfloat16))
    except (TypeError, ValueError):
        return  # this CuPy has no bfloat16
    got = jk.Quantized(cp.asarray(np.array([1, 2, 3, 4], np.int8)), bf16, 2)
    assert got.dequantize().get().tolist() == [1.0, 2.0, 1.5, 2.0]  # the scales' values, not their bits


def test_quantized_torch_cuda_values_and_bfloat16_scales():
    """int8 values and scales as torch CUDA tensors (DLPack); bfloat16 scales, which CuPy holds as their uint16
    bits, are widened to their values (converting the bits read 1.0 as 16256.0)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    q = torch.tensor([1, 2, 3, 4], dtype=torch.int8).cuda()
    for dt in (torch.float32, torch.bfloat16):
        got = jk.Quantized(q, torch.tensor([1.0, 0.5], dtype=dt).cuda(), 2)
        assert got.on_device and got.dequantize().get().tolist() == [1.0, 2.0, 1.5, 2.0], dt


def test_a_cupy_bfloat16_template_gets_bfloat16_results():
    """CuPy 14 holds bfloat16 (ml_dtypes' type): a CuPy bf16 template's results come back as bf16 CuPy arrays with
    the host aggregator's bits (they came back as the uint16 arrays the backend keeps the bits in)."""
    import cupy as cp
    rng = np.random.default_rng(9)
    host = [rng.standard_normal(1000).astype(jk.bfloat16) for _ in range(4)]
    try:
        dev = [cp.asarray(a) for a in host]
    except (TypeError, ValueError):
        pytest.skip("this CuPy has no bfloat16")
    ref = jk.Aggregator({"w": np.zeros(1000, jk.bfloat16)}, backend="numpy")
    gpu = jk.Aggregator({"w": cp.zeros(1000, jk.bfloat16)})
    ref.fold_many([{"w": a} for a in host], [1.0, 2.0, 3.0, 4.0], parties=[0, 1, 2, 3])
    gpu.fold_many([{"w": a} for a in dev], [1.0, 2.0, 3.0, 4.0], parties=[0, 1, 2, 3])
    assert jk.device.device_leaf(dev[0]).array.dtype == np.uint16  # kept as its bits: kernels and copies only
    out = gpu.finalize()["w"]
    assert isinstance(out, cp.ndarray) and out.dtype == jk.bfloat16
    assert out.get().tobytes() == ref.finalize()["w"].tobytes()


@pytest.mark.parametrize("slab_dtype", ["float32", "float16", "bfloat16"])
def test_device_store_half_slabs_growth_and_refusals(slab_dtype):
    """A GPU aggregator's store past its first rows (it grows on the device), in a half slab (converted on the
    device), against the host store's bits; a NaN and a value past the slab's range are refused by name with
    nothing stored."""
    import cupy as cp
    from jitkernels import robust as R

    rng = np.random.default_rng(10)
    tmpl = {"w": np.zeros((40, 30), np.float32), "b": np.zeros(30, np.float32)}
    ups = [{n: rng.standard_normal(a.shape).astype(np.float32) for n, a in tmpl.items()} for _ in range(13)]
    w = rng.uniform(1.0, 9.0, 13)
    host = jk.Aggregator(tmpl, R.FedMedian(slab_dtype=slab_dtype))
    gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, R.FedMedian(slab_dtype=slab_dtype))
    host.fold_many(ups, w, parties=list(range(13)))
    gpu.fold_many([{n: cp.asarray(a) for n, a in u.items()} for u in ups[:5]], w[:5], parties=list(range(5)))
    for j in range(5, 13):
        gpu.fold({n: cp.asarray(a) for n, a in ups[j].items()}, weight=w[j], party=j)
    assert len(gpu.state.store) == 13 and gpu.state.store.on_device
    nan = {n: cp.asarray(a) for n, a in ups[0].items()}
    nan["b"][4] = cp.nan
    with pytest.raises(jk.NonFiniteUpdate, match="'b'"):
        gpu.fold(nan, weight=1.0, party="nan")
    if slab_dtype == "float16":
        big = {n: cp.asarray(a) for n, a in ups[0].items()}
        big["w"][0, 0] = 1e6
        with pytest.raises(jk.ValueOutOfRange, match="'w'"):
            gpu.fold(big, weight=1.0, party="big")
    assert len(gpu.state.store) == 13
    assert _same({n: v.get() for n, v in gpu.finalize().items()}, host.finalize())


@pytest.mark.parametrize("rule", ["mean", "max"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_integer_leaves_on_a_gpu_aggregator(rule, deterministic):
    """A counter leaf (BatchNorm's num_batches_tracked) beside float leaves, on a GPU aggregator: the int_leaves
    rule's result, as on the host."""
    import cupy as cp
    rng = np.random.default_rng(11)
    tmpl = {"w": np.zeros(300, np.float32), "n": np.zeros((), np.int64)}
    ups = [{"w": rng.standard_normal(300).astype(np.float32), "n": np.array(100 + 7 * j, np.int64)}
           for j in range(5)]
    kw = {"int_leaves": rule, "deterministic": deterministic}
    host = jk.Aggregator(tmpl, backend="numpy", **kw)
    gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, **kw)
    w = [1.0, 2.0, 3.0, 4.0, 5.0]
    host.fold_many(ups, w, parties=list(range(5)))
    gpu.fold_many([{n: cp.asarray(a) for n, a in u.items()} for u in ups[:3]], w[:3], parties=[0, 1, 2])
    for j in (3, 4):
        gpu.fold({n: cp.asarray(a) for n, a in ups[j].items()}, weight=w[j], party=j)
    got, want = gpu.finalize(), host.finalize()
    assert got["n"].dtype == np.int64 and int(got["n"]) == int(want["n"])
    if deterministic:
        assert got["w"].get().tobytes() == want["w"].tobytes()
    else:  # (fold orders differ: a batch and two single folds against one batch)
        np.testing.assert_allclose(got["w"].get(), want["w"], rtol=1e-6, atol=1e-7)


def test_integer_leaves_in_robust_rules_and_merges_on_the_gpu():
    """A counter beside the float leaves of a robust rule's GPU store (its mean rounded on the device), and a GPU
    state merged with a host one under int_leaves='max': the host aggregator's values."""
    import cupy as cp
    from jitkernels import robust as R

    rng = np.random.default_rng(13)
    tmpl = {"w": np.zeros(300, np.float32), "n": np.zeros((), np.int64)}
    ups = [{"w": rng.standard_normal(300).astype(np.float32), "n": np.array(10 + j, np.int64)} for j in range(7)]
    w = [1.0 + j for j in range(7)]
    for make in (R.FedMedian, lambda: R.Krum(f=1), R.GeometricMedian):
        host, gpu = jk.Aggregator(tmpl, make()), jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, make())
        host.fold_many(ups, w, parties=list(range(7)))
        gpu.fold_many([{n: cp.asarray(a) for n, a in u.items()} for u in ups], w, parties=list(range(7)))
        got, want = gpu.finalize(), host.finalize()
        assert int(got["n"]) == int(want["n"])
        np.testing.assert_allclose(got["w"].get(), want["w"], rtol=1e-6, atol=1e-6)
    gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, int_leaves="max")
    host = jk.Aggregator(tmpl, int_leaves="max", backend="cpp")
    gpu.fold_many([{n: cp.asarray(a) for n, a in u.items()} for u in ups[:3]], w[:3], parties=[0, 1, 2])
    host.fold_many(ups[3:], w[3:], parties=[3, 4, 5, 6])
    gpu.merge(host)
    assert int(gpu.finalize()["n"]) == 16


def test_gram_rules_past_the_fused_kernels_k_on_the_gpu():
    """Past GRAM_MAX_K updates the Gram runs as array operations on the device slab, and Bulyan's coordinate step
    past BULYAN_MAX_K as well: Krum and Bulyan there against the host."""
    import cupy as cp
    from jitkernels import robust as R

    rng = np.random.default_rng(12)
    k = 70
    tmpl = {"w": np.zeros(500, np.float32)}
    ups = [{"w": rng.standard_normal(500).astype(np.float32)} for _ in range(k)]
    for make in (lambda: R.Krum(f=3, m=5), lambda: R.Bulyan(f=3)):
        host = jk.Aggregator(tmpl, make())
        gpu = jk.Aggregator({"w": cp.zeros(500, np.float32)}, make())
        host.fold_many(ups, [1.0] * k, parties=list(range(k)))
        gpu.fold_many([{"w": cp.asarray(u["w"])} for u in ups], [1.0] * k, parties=list(range(k)))
        np.testing.assert_allclose(gpu.finalize()["w"].get(), host.finalize()["w"], rtol=1e-6, atol=1e-6)


def test_finalize_into_outputs_in_the_other_memory():
    """A GPU aggregator finalizes into host buffers (and a host one into GPU buffers): the result is copied in, with
    the bits of a finalize into fresh outputs; a mix of host and GPU outputs is refused by name."""
    import cupy as cp
    rng = np.random.default_rng(16)
    tmpl, ups, w = _updates(rng, [(3000,), (7, 3)], "float32", 3)
    for backend, other in (("cupy", lambda a: np.full_like(a, 7)), ("cpp", lambda a: cp.full(a.shape, 7, a.dtype))):
        agg = jk.Aggregator(tmpl, backend=backend)
        agg.fold_many(ups, w, parties=[0, 1, 2])
        want = agg.finalize()
        out = {n: other(a) for n, a in tmpl.items()}
        assert agg.finalize(out=out) is out
        assert _same({n: a.get() if isinstance(a, cp.ndarray) else a for n, a in out.items()}, want)
    mixed = {"l0": np.zeros(3000, np.float32), "l1": cp.zeros((7, 3), cp.float32)}
    with pytest.raises(jk.LayoutMismatch, match="leaf 'l1': out must be in host memory"):
        agg.finalize(out=mixed)  # (the last aggregator is the host's)


@pytest.mark.parametrize("rule", ["fedavgm", "median"])
def test_a_refused_finalize_into_the_other_memory_leaves_what_was_written(rule):
    """A result past float16's range: host outputs of a GPU aggregator hold what was written, as outputs where the
    state is do (they held their old values, while a server optimizer's step had closed the round); a Quantized
    output is refused before anything changes (the step was applied, then the copy failed)."""
    from jitkernels import robust as R

    tmpl = {"a": np.zeros(4, np.float16), "z": np.zeros(3, np.float16)}
    ups = [{"a": np.array([6e4, 1, 2, 3], np.float16), "z": np.ones(3, np.float16)} for _ in range(2)]
    make = (lambda: jk.algorithms.FedAvgM(lr=2.0)) if rule == "fedavgm" else R.FedMedian
    low = {"a": np.array([-6e4, 0, 0, 0], np.float16), "z": np.zeros(3, np.float16)}  # the median's delta: 1.2e5
    kw, output = ({"base": tmpl}, "model") if rule == "fedavgm" else ({"base": low}, "delta")
    results = []
    for backend in ("cpp", "cupy"):
        agg = jk.Aggregator(tmpl, make(), backend=backend, **kw)
        agg.fold_many(ups, [1.0, 1.0], parties=[0, 1])
        if backend == "cupy" and rule == "fedavgm":
            with pytest.raises(jk.LayoutMismatch, match="Quantized"):
                agg.finalize(out={"a": jk.Quantized(np.zeros(4, np.int8), 1.0), "z": np.zeros(3, np.float16)})
            assert not agg.state.closed
        out = {n: np.full(a.shape, 7, a.dtype) for n, a in tmpl.items()}
        with pytest.raises(jk.ValueOutOfRange, match="'a'"):
            agg.finalize(output, out=out)
        results.append(out)
    assert _same(results[1], results[0]) and np.isinf(results[1]["a"][0])


def test_flower_strategies_on_the_gpu_equal_the_cpu():
    """jitkernels' Flower strategies with backend='cupy' (they finalize into the bytes of the returned Parameters,
    host memory: a GPU aggregator refused them) give the CPU backend's bits, round after round."""
    pytest.importorskip("flwr")
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    import jitkernels.integrations.flower as jkfl

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    rng = np.random.default_rng(17)
    x0 = [rng.standard_normal((40, 30)).astype(np.float32), rng.standard_normal(30).astype(np.float32)]
    makes = {"FedAvg": lambda b: jkfl.FedAvg(backend=b),
             "FedAdam": lambda b: jkfl.FedAdam(initial_parameters=ndarrays_to_parameters(x0), eta=0.01, tau=1e-3,
                                               backend=b),
             "FedMedian": lambda b: jkfl.FedMedian(backend=b)}
    for name, make in makes.items():
        cpu, gpu = make("cpp"), make("cupy")
        glob = x0
        for r in range(1, 4):
            results = [(Proxy(f"c{j}"), FitRes(status=Status(code=Code.OK, message=""), num_examples=10 + j,
                                               metrics={}, parameters=ndarrays_to_parameters(
                                                   [(a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32)
                                                    for a in glob])))
                       for j in range(4)]
            want = parameters_to_ndarrays(cpu.aggregate_fit(r, results, [])[0])
            got = parameters_to_ndarrays(gpu.aggregate_fit(r, results, [])[0])
            assert all(g.tobytes() == x.tobytes() for g, x in zip(got, want)), (name, r)
            glob = want


def test_a_gpu_job_in_the_scheduler_persists_and_recovers_device_updates(tmp_path):
    """A job whose template is in GPU memory, run by the scheduler with a state directory: device updates (float
    and int8-quantized) are written to the host files, a restart replays them from disk into a GPU aggregator, and
    every round equals the numpy reference."""
    import cupy as cp
    from scheduler import JITScheduler, Job, VirtualClock

    rng = np.random.default_rng(8)
    tmpl, ups, w = _updates(rng, [(3000,), (4,)], "float32", 3)
    qups = [{n: jk.Quantized.quantize(a, block=64) for n, a in u.items()} for u in ups]
    sent = [{n: cp.asarray(a) for n, a in ups[0].items()}, {n: _on_gpu(q) for n, q in qups[1].items()},
            {n: cp.asarray(a) for n, a in ups[2].items()}]
    host = [ups[0], qups[1], ups[2]]
    job = Job("g", template={n: cp.asarray(a) for n, a in tmpl.items()}, parties=[0, 1, 2], quorum=3, rounds=2,
              deterministic=True)  # the same bits in any fold order (a replay folds the updates in memory first)
    sched = JITScheduler("lazy", clock=VirtualClock(), state_dir=tmp_path)
    sched.add_job(job)
    for r in range(2):
        for p in range(3 if r == 0 else 2):
            sched.submit("g", r, p, sent[p], float(w[p])).durable.result(timeout=10)
        sched.clock.run(until=sched.clock.now() + 1.0)
    got0 = sched.result("g", 0).result(timeout=10)
    sched.close()  # round 1: two of three acknowledged, nothing folded
    ref = jk.Aggregator(tmpl, backend="numpy", deterministic=True)
    ref.fold_many(host, w, parties=[0, 1, 2])
    want = ref.finalize()
    assert all(isinstance(v, cp.ndarray) for v in got0.values()) and _same({n: v.get() for n, v in got0.items()},
                                                                             want)
    rec = JITScheduler.recover(tmp_path, [job], policy="lazy", clock=VirtualClock())
    rec.submit("g", 1, 2, sent[2], float(w[2]))
    rec.clock.run(until=1.0)
    got1 = rec.result("g", 1).result(timeout=10)
    rec.close()
    assert _same({n: v.get() for n, v in got1.items()}, want)


def test_nonfinite_device_update_rejected_state_untouched():
    import cupy as cp
    tmpl = {"a": cp.zeros(5000, cp.float32), "b": cp.zeros(7, cp.float32)}
    agg = jk.Aggregator(tmpl)
    agg.fold({"a": cp.ones(5000, cp.float32), "b": cp.ones(7, cp.float32)}, weight=2, party="ok")
    before = agg.state.copy()
    bad = {"a": cp.ones(5000, cp.float32), "b": cp.ones(7, cp.float32)}
    bad["b"][3] = cp.nan
    with pytest.raises(jk.NonFiniteUpdate, match="'b'") as e:
        agg.fold(bad, weight=1, party="bad")
    assert e.value.party == "bad"
    assert agg.state.same_bits(before)
    u = agg.admit({"a": cp.full(5000, 3.0, cp.float32), "b": cp.zeros(7, cp.float32)}, weight=1, party="n")
    assert u.on_device and u.norm == pytest.approx(3.0 * np.sqrt(5000)) and u.maxabs == 3.0


def test_jk_admit_reads_a_base_where_the_updates_are():
    """jk.admit_many with a base on the other side from the updates: device updates against a host base (the GPU
    stats kernel was handed the host array's address: AttributeError on CuPy, a silent host read in the emulation),
    host updates against a device base. Each side reads a copy of the base where it lives (stats of deltas: within
    float32 rounding of the numpy reference, which takes u - base in float64)."""
    import cupy as cp
    rng = np.random.default_rng(3)
    layout = jk.Layout.from_template({"w": np.zeros(3000, np.float32), "b": np.zeros(5, np.float32)})
    base = rng.standard_normal(layout.size).astype(np.float32)
    ups = [{"w": rng.standard_normal(3000).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
           for _ in range(2)]
    want = jk.admit_many(ups, layout, base=base, backend="numpy")
    on_gpu = [{n: cp.asarray(a) for n, a in u.items()} for u in ups]
    for got in (jk.admit_many(on_gpu, layout, base=base, backend="cupy"),
                jk.admit_many(ups, layout, base=cp.asarray(base), backend="cupy"),
                jk.admit_many([on_gpu[0], ups[1]], layout, base=base, backend="cupy")):
        for g, w in zip(got, want):
            assert g.maxabs == pytest.approx(w.maxabs, rel=1e-6) and g.norm == pytest.approx(w.norm, rel=1e-6)
    from jitkernels import admission
    downloads = []
    real = admission.to_host
    try:  # a base is copied over only for a side that has updates: device ones with a device base, none
        admission.to_host = lambda a: downloads.append(type(a).__name__) or real(a)
        jk.admit_many(on_gpu, layout, base=cp.asarray(base), backend="cupy")
    finally:
        admission.to_host = real
    assert downloads == []


def test_deterministic_gpu_equals_cpu_bit_for_bit():
    rng = np.random.default_rng(5)
    tmpl, ups, w = _updates(rng, [(50000,), (300,)], "float32", 9)
    cpu = jk.Aggregator(tmpl, backend="cpp", deterministic=True)
    gpu = jk.Aggregator(tmpl, backend="cupy", deterministic=True)
    cpu.fold_many(ups, w, parties=list(range(9)))
    for j in (4, 0, 8, 2, 6, 1, 3, 7, 5):  # another order, one at a time
        gpu.fold(ups[j], weight=w[j], party=j)
    assert _same(gpu.finalize(), cpu.finalize())


def test_state_save_load_resume_and_merge_across_devices(tmp_path):
    """A GPU state saved, loaded, resumed, and merged with a CPU node's partial aggregate equals the same merge tree
    computed by the numpy reference, bit for bit (merging is a float addition: the tree fixes the rounding)."""
    rng = np.random.default_rng(7)
    tmpl, ups, w = _updates(rng, [(20000,), (5, 5)], "float32", 6)

    def tree(first, second):
        a = jk.Aggregator(tmpl, backend=first)
        a.fold_many(ups[:2], w[:2], parties=[0, 1])
        a.state.save(tmp_path / f"{first}.jks")
        b = jk.Aggregator.from_state(jk.FoldState.load(tmp_path / f"{first}.jks"), backend=first)
        b.fold(ups[2], weight=w[2], party=2)
        other = jk.Aggregator(tmpl, backend=second)  # a partial aggregate made on another node
        other.fold_many(ups[3:], w[3:], parties=[3, 4, 5])
        b.merge(other)
        return b

    got, want = tree("cupy", "cpp"), tree("numpy", "numpy")
    assert got.state.on_device and got.state.same_bits(want.state)
    assert _same(got.finalize(), want.finalize())


SUBNORMAL_REFERENCE = """
import sys, numpy as np, jitkernels as jk
dt = jk.bfloat16 if sys.argv[1] == "bfloat16" else np.dtype(sys.argv[1])
tiny = {"float16": 2.0 ** -24, "bfloat16": 2.0 ** -133, "float32": 2.0 ** -149}[sys.argv[1]]  # smallest subnormal
vals = (np.arange(1, 4097, dtype=np.float64) * tiny).astype(dt)  # subnormals, then normals
ups = [{"x": vals}, {"x": (-vals).astype(dt)}, {"x": (vals * 3).astype(dt)}]
agg = jk.Aggregator({"x": vals}, backend=sys.argv[2])
agg.fold_many(ups, [1.0, 0.5, 2.0], parties=[0, 1, 2])
sys.stdout.write(jk.device.to_host(agg.state.acc).tobytes().hex())
"""


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_subnormal_inputs_bit_exact(dtype):
    """Subnormal inputs (and results) survive on the GPU: the kernels are built with --ftz=false, and f16 is widened
    by the hardware conversion (an f16 subnormal is an f32 normal). The reference runs in a fresh process that
    imports numpy alone: a library loaded here (built with -ffast-math) may have set the CPU's flush-to-zero flags,
    and then numpy itself flushes."""
    import subprocess
    import sys

    def run(backend):
        return subprocess.run([sys.executable, "-c", SUBNORMAL_REFERENCE, dtype, backend], check=True,
                              capture_output=True, text=True).stdout
    assert run("cupy") == run("numpy")


def test_wide_batches_cross_several_passes_and_stages(monkeypatch):
    from jitkernels.backends import cupy_backend
    monkeypatch.setattr(cupy_backend, "SLOT_BYTES", 1 << 20)
    rng = np.random.default_rng(3)
    tmpl, ups, w = _updates(rng, [(300000,), (4097,)], "float32", 40)
    ref = jk.Aggregator(tmpl, backend="numpy")
    gpu = jk.Aggregator(tmpl, backend="cupy")
    ref.fold_many(ups, w, parties=list(range(40)))
    gpu.fold_many(ups, w, parties=list(range(40)))
    assert jk.FoldState.same_bits(gpu.state, ref.state)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
def test_server_optimizer_rounds_bit_exact(name, acc_dtype):
    """Three rounds of a server optimizer on the GPU (fold, fused step, reset) equal the numpy reference bit for
    bit: the step kernel is element-wise (jk::opt_step)."""
    alg = {"fedavgm": jk.algorithms.FedAvgM(lr=0.5, momentum=0.9), "fedadam": jk.algorithms.FedAdam(tau=1e-3),
           "fedyogi": jk.algorithms.FedYogi(), "fedadagrad": jk.algorithms.FedAdagrad(tau=1e-3)}[name]
    rng = np.random.default_rng(11)
    tmpl, _, _ = _updates(rng, [(70000,), (33, 17), ()], "float32", 1)
    ref = jk.Aggregator(tmpl, alg, backend="numpy", base=tmpl, acc_dtype=acc_dtype)
    gpu = jk.Aggregator(tmpl, alg, backend="cupy", base=tmpl, acc_dtype=acc_dtype)
    for _ in range(3):
        _, ups, w = _updates(rng, [(70000,), (33, 17), ()], "float32", 4)
        for agg in (ref, gpu):
            agg.fold_many(ups, w, parties=list(range(4)))
        assert _same(gpu.finalize(), ref.finalize())
        ref.reset()
        gpu.reset()
    assert gpu.state.on_device and jk.FoldState.same_bits(gpu.state, ref.state)


STREAMING = {  # (algorithm, per-update values of update j, bit-exact): clipping scales come from norms, reductions
    "fedavg_unweighted": (lambda: jk.algorithms.FedAvg(weighted=False), lambda j: {}, True),
    "fedprox": (lambda: jk.algorithms.FedProx(mu=0.1), lambda j: {}, True),
    "fednova": (lambda: jk.algorithms.FedNova(), lambda j: {"steps": 1.0 + 3 * j}, True),
    "fedbuff": (lambda: jk.algorithms.FedBuff(staleness="hinge", a=2.0, b=1.0, server_lr=0.5),
                lambda j: {"staleness": j}, True),
    "dp_fixed": (lambda: jk.algorithms.DPFixedClipping(clip_norm=3.0, noise_multiplier=0.0), lambda j: {}, False),
    "dp_adaptive": (lambda: jk.algorithms.DPAdaptiveClipping(noise_multiplier=0.0, num_sampled=5,
                                                             initial_clip_norm=3.0, count_stddev=0.0, seed=3),
                    lambda j: {}, False),
}


@pytest.mark.parametrize("name", list(STREAMING))
def test_streaming_algorithms_on_the_gpu_equal_the_cpu(name):
    """Two rounds of each streaming algorithm (per-update values, clipping, a second state for SCAFFOLD below) on
    a GPU aggregator, fold_many and per-update fold, against the numpy reference: bit for bit where the math is
    element-wise, to float32 rounding where a clip factor comes from a norm (a reduction, summed in another
    order)."""
    make, info, exact = STREAMING[name]
    rng = np.random.default_rng(14)
    tmpl, _, _ = _updates(rng, [(20000,), (9, 5), ()], "float32", 1)
    ref = jk.Aggregator(tmpl, make(), backend="numpy", base=tmpl)
    gpu = jk.Aggregator(tmpl, make(), backend="cupy", base=tmpl)
    for _ in range(2):
        _, ups, w = _updates(rng, [(20000,), (9, 5), ()], "float32", 5)
        ups = [{n: (tmpl[n] + 0.5 * (a - tmpl[n])).astype(np.float32) for n, a in u.items()} for u in ups]
        infos = [info(j) for j in range(5)]
        ref.fold_many(ups, w, parties=list(range(5)), infos=infos)
        gpu.fold_many(ups[:3], w[:3], parties=[0, 1, 2], infos=infos[:3])
        for j in (3, 4):
            gpu.fold(ups[j], weight=w[j], party=j, **infos[j])
        want, got = ref.finalize(), gpu.finalize()
        if exact:
            assert _same(got, want)
        else:
            for n in want:
                np.testing.assert_allclose(got[n], want[n], rtol=2e-6, atol=1e-6)
        ref.reset(base=want)
        gpu.reset(base=want)
    assert gpu.state.on_device


def test_scaffold_on_the_gpu_equals_the_cpu():
    rng = np.random.default_rng(15)
    x = {"a": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    base = {"model": x, "control": {n: (0.1 * a).astype(np.float32) for n, a in x.items()}}
    ups = [{part: {n: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in leaves.items()}
            for part, leaves in base.items()} for _ in range(4)]
    aggs = [jk.Aggregator(base, jk.algorithms.SCAFFOLD(num_parties=10, server_lr=0.5), backend=b, base=base)
            for b in ("numpy", "cupy")]
    for agg in aggs:
        agg.fold_many(ups, [1.0, 2.0, 3.0, 4.0], parties=[0, 1, 2, 3])
    assert aggs[1].state.on_device
    want, got = (agg.finalize() for agg in aggs)
    for part in base:
        assert _same(got[part], want[part]), part


def test_dp_noise_on_the_gpu_equals_the_cpu():
    rng = np.random.default_rng(12)
    tmpl, ups, w = _updates(rng, [(50000,), (300,)], "float32", 3)
    outs = []
    for backend in ("cpp", "cupy"):
        alg = jk.algorithms.DPFixedClipping(clip_norm=1e6, noise_multiplier=1.0, seed=42)
        agg = jk.Aggregator(tmpl, alg, backend=backend, base=tmpl)
        agg.fold_many(ups, w, parties=list(range(3)))
        outs.append(agg.finalize())
    assert _same(outs[1], outs[0])


@settings(max_examples=10)
@given(seed=seeds, sizes=st.lists(st.integers(0, 70000), min_size=1, max_size=3), k=st.integers(1, 6),
       bits=st.sampled_from([16, 31, 32]))
def test_secagg_sum_on_the_gpu_equals_the_cpu(seed, sizes, k, bits):
    """SecAggSum(backend="cupy"): device updates read in place, host ones copied over, a bad batch rolled back to
    the same bits, the saved file the CPU's."""
    import cupy as cp

    from jitkernels import secagg as sa

    rng = np.random.default_rng(seed)
    ups = [[rng.integers(0, 1 << bits, n, dtype=np.uint64).astype(np.int64 if j % 2 else np.uint32) for n in sizes]
           for j in range(k)]
    cpu = sa.SecAggSum(sizes, bits, backend="numpy")
    gpu = sa.SecAggSum(sizes, bits, backend="cupy")
    cpu.fold_many(ups, list(range(k)))
    gpu.fold_many([[cp.asarray(a) for a in u] if j % 3 else u for j, u in enumerate(ups)], list(range(k)))
    assert isinstance(gpu.result(), cp.ndarray)
    assert gpu.result().get().tobytes() == cpu.result().tobytes()
    before = gpu.to_bytes()
    bad = [a.copy() for a in ups[0]]
    if sum(sizes):
        r = int(np.argmax(sizes))
        bad[r][0] = -1 if bad[r].dtype.kind == "i" else np.uint32(1 << bits) if bits < 32 else 0
        if bad[r][0] != 0:
            with pytest.raises(jk.ValueOutOfRange, match="party 'x'"):
                gpu.fold_many([[cp.asarray(a) for a in bad]], ["x"])
    assert _content(gpu.to_bytes()) == _content(before) == _content(cpu.to_bytes())


def _content(data: bytes):
    """A saved file's tensors and metadata: the bytes themselves vary between saves of one state (safetensors keeps
    the metadata in a hash map, so the header's key order is not fixed)."""
    from jitkernels.state import read_checked_bytes

    tensors, meta = read_checked_bytes(data)
    return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in tensors.items()}, meta


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("k", [3, 10, 50])
def test_robust_coordinate_kernels_on_the_gpu(k, dtype):
    """Coordinate median and trimmed mean of a CuPy slab: the CPU backends' bits, the result on the device."""
    import cupy as cp

    from jitkernels import robust_coord as rc

    rng = np.random.default_rng(k)
    x = rng.standard_normal((k, 100_003)).astype(np.float32)
    x[:, ::7] = 0.5  # ties
    host = x if dtype == "float32" else x.astype(jk.bfloat16)
    dev = cp.asarray(host if dtype == "float32" else host.view(np.uint16))
    kw = {} if dtype == "float32" else {"dtype": "bfloat16"}
    med = rc.coordinate_median(dev, **kw)
    assert isinstance(med, cp.ndarray)
    assert med.get().tobytes() == rc.coordinate_median(host, backend="numpy").tobytes()
    tri = rc.trimmed_mean(dev, 0.2, **kw)
    assert tri.get().tobytes() == rc.trimmed_mean(host, 0.2, backend="numpy").tobytes()


COORDINATE_RULES = ("median", "trimmed")  # the coordinate kernels give the CPU's bits; the Gram rules' sums differ


def _on_device():
    """(to device, is a device result, to numpy): torch CUDA tensors where torch has CUDA (the DLPack path), else
    CuPy arrays (test_gpu_emulated.py's fake CuPy)."""
    import torch

    if torch.cuda.is_available():
        return (lambda a: torch.from_numpy(a).cuda(),
                lambda t: t.is_cuda and t.dtype == torch.float32, lambda t: t.cpu().numpy())
    import cupy as cp

    return cp.asarray, lambda a: isinstance(a, cp.ndarray) and a.dtype == np.float32, lambda a: a.get()


def _robust_round(make, store_kw=None, spill_dir=None):
    """A host and a GPU aggregator (device template and updates: see _on_device) that folded the same 8 updates
    (one outlier) under the rule ``make(**store_kw)``."""
    dev = _on_device()[0]
    rng = np.random.default_rng(3)
    shapes = {"w": (60, 70), "b": (70,), "s": (3,)}
    base = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    ups = [{n: (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in base.items()}
           for _ in range(8)]
    ups[2] = {n: a * 50.0 for n, a in ups[2].items()}  # an outlier the rules must resist
    w = rng.uniform(1.0, 50.0, len(ups))
    cuda = {n: dev(a) for n, a in base.items()}
    host = jk.Aggregator(base, make(**(store_kw or {})), base=base)
    gpu = jk.Aggregator(cuda, make(**(store_kw or {})), base=cuda)
    assert gpu.backend == "cupy" and gpu.on_gpu
    host.fold_many(ups, w, parties=list(range(len(ups))))
    gpu.fold_many([{n: dev(a) for n, a in u.items()} for u in ups], w, parties=list(range(len(ups))))
    return host, gpu, shapes


def _check_same(host, gpu, shapes, exact, what):
    _, on_device, to_numpy = _on_device()
    for output in ("model", "delta"):
        want, got = host.finalize(output), gpu.finalize(output)
        for n in shapes:
            assert on_device(got[n])
            g = to_numpy(got[n])
            if exact:
                assert g.tobytes() == want[n].tobytes(), (what, output, n)
            else:  # float64 sums in another order (cuBLAS), rounded once to float32
                np.testing.assert_allclose(g, want[n], rtol=1e-6, atol=1e-6 * float(np.abs(want[n]).max()))


@pytest.mark.parametrize("rule", list(robust_rules()))
def test_robust_rules_on_a_gpu_aggregator_equal_the_cpu(rule):
    """A GPU aggregator keeps the round's updates in GPU memory (DeviceUpdateStore: torch CUDA updates copied in
    device to device; torch CUDA tensors, or CuPy arrays) and runs every robust rule there (coordinate kernels, the Gram on cuBLAS); the result comes
    back in the template's type on the device: the host aggregator's bits for the coordinate rules, its values to
    float32 rounding for the Gram rules (delta output too)."""
    from jitkernels.robust_store import DeviceUpdateStore

    host, gpu, shapes = _robust_round(robust_rules()[rule])
    assert isinstance(gpu.state.store, DeviceUpdateStore) and len(gpu.state.store) == 8
    _check_same(host, gpu, shapes, rule in COORDINATE_RULES, rule)


def test_a_spilling_robust_rule_keeps_a_host_store_on_a_gpu_aggregator(tmp_path):
    """over_budget="spill" needs a file: the GPU aggregator then keeps the host store (rows copied from the device)
    and runs the host kernels, with the host aggregator's bits."""
    from jitkernels import robust as R
    from jitkernels.robust_store import UpdateStore

    kw = {"budget_bytes": 3 * 4273 * 4, "over_budget": "spill", "spill_dir": tmp_path}
    host, gpu, shapes = _robust_round(R.FedMedian, kw)
    assert type(gpu.state.store) is UpdateStore and gpu.state.store.spilled
    _check_same(host, gpu, shapes, True, "spill")


def test_device_store_state_saves_loads_and_merges_across_devices():
    """A GPU aggregator's robust state (device store) saves as a host file, loads onto either side (the store moves
    with the state) and merges with a host state; the result is the one-aggregator round's."""
    import cupy as cp

    from jitkernels import robust as R
    from jitkernels.robust_store import DeviceUpdateStore, UpdateStore

    rng = np.random.default_rng(5)
    tmpl = {"w": np.zeros((40, 30), np.float32), "b": np.zeros(30, np.float32)}
    ups = [{n: rng.standard_normal(a.shape).astype(np.float32) for n, a in tmpl.items()} for _ in range(7)]
    one = jk.Aggregator(tmpl, R.FedMedian())
    one.fold_many(ups, parties=list(range(7)))
    gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, R.FedMedian())
    gpu.fold_many([{n: cp.asarray(a) for n, a in u.items()} for u in ups[:4]], parties=list(range(4)))
    cpu = jk.Aggregator(tmpl, R.FedMedian())
    cpu.fold_many(ups[4:], parties=[4, 5, 6])
    state = jk.FoldState.from_bytes(gpu.state.to_bytes())
    assert type(state.store) is UpdateStore
    back = jk.Aggregator.from_state(state, backend="cupy")
    assert isinstance(back.state.store, DeviceUpdateStore)
    back.merge(cpu)
    want = one.finalize()
    got = back.finalize()
    for n in tmpl:
        assert cp.asnumpy(got[n]).tobytes() == want[n].tobytes()
    cpu.merge(jk.FoldState.from_bytes(gpu.state.to_bytes()).to(True))  # a device store into a host state
    assert type(cpu.state.store) is UpdateStore and len(cpu.state.store) == 7


def test_gram_rules_on_a_device_slab_equal_the_cpu():
    """robust_gram on a CuPy slab: the same Gram to float64 rounding, selections and aggregates as numpy's (results
    on the device; Bulyan's coordinate step, a generated kernel, to the bit); a host slab with backend='cupy' is
    refused, not copied."""
    import cupy as cp

    from jitkernels import robust_gram as rg

    rng = np.random.default_rng(6)
    X = (rng.standard_normal((11, 300_007)) * 0.01 + 0.5).astype(np.float32)
    X[3] *= 40.0  # an attacker
    X[7] = X[5]  # colluding duplicates
    D = cp.asarray(X)
    g_cpu, g_gpu = rg.gram(X, backend="numpy"), rg.gram(D)
    assert g_gpu.reference == g_cpu.reference
    np.testing.assert_allclose(g_gpu.distances(), g_cpu.distances(), rtol=1e-9, atol=1e-9 * g_cpu.G.max())
    for fn, kw in ((rg.krum, {"f": 2, "m": 1}), (rg.krum, {"f": 2, "m": 6}), (rg.bulyan, {"f": 2}),
                   (rg.geometric_median, {}), (rg.centered_clipping, {"tau": 0.5, "iters": 3})):
        if fn is rg.centered_clipping:
            kw = {**kw, "center": X.mean(axis=0)}
        want, got = fn(X, backend="numpy", **kw), fn(D, **kw)
        assert isinstance(got.aggregate, cp.ndarray)
        assert np.array_equal(got.selected, want.selected), fn.__name__
        if fn is rg.bulyan:  # the generated kernel has numba's and the array path's math: their bits
            assert cp.asnumpy(got.aggregate).tobytes() == want.aggregate.tobytes()
        np.testing.assert_allclose(cp.asnumpy(got.aggregate), want.aggregate, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="host memory but the backend is 'cupy'"):
        rg.gram(X, backend="cupy")


def _gram_on_device(case):
    import cupy as cp

    from jitkernels.backends import cupy_backend

    X = cp.asarray(case.padded)[:, :case.n]  # the row stride of the padded slab
    ref = None if case.ref is None else cp.asarray(case.ref)
    rt = cupy_backend.runtime()

    def run(seed):
        rt.defines = case.defines
        try:
            return cupy_backend.gram(X, case.mode, case.refrow, ref, case.diag_only, case.tile)
        finally:
            rt.defines = {}
    return run


@settings(max_examples=25)
@given(case=device_gram_cases(kmax=40, nmax=5000, columns=(1,)))
def test_gram_kernel_on_the_gpu(case):
    """The fused Gram kernel on a device slab against the float64 array path (the check of the host emulation)."""
    check_device_gram(case, _gram_on_device(case))


@pytest.mark.parametrize("k,tile,columns", [(10, 8, 1), (10, 4, 1), (37, 8, 1), (10, 4, 2), (37, 8, 2)])
def test_gram_kernel_on_the_gpu_strides_over_many_column_blocks(k, tile, columns):
    """A slab wider than one wave of blocks (each thread folds many columns), far from the origin, centered at a
    row, with the default and another JK_GRAM_COLUMNS: as the array path."""
    from jitkernels import robust_gram as rg

    rng = np.random.default_rng(k)
    P = (1e3 + rng.standard_normal((k, 1_000_003))).astype(np.float32)
    case = GramCase(P, P.shape[1], rg.MODE_ROW, 3, None, False, tile, columns)
    check_device_gram(case, _gram_on_device(case))


@settings(max_examples=25)
@given(case=combine_cases(kmax=40, nmax=5000))
def test_combine_kernel_on_the_gpu(case):
    """robust_gram.combine on a device slab (the combine_rows kernel) against the float64 array path."""
    import cupy as cp

    from jitkernels import robust_gram as rg

    X = cp.asarray(case.padded)[:, :case.n]
    got = rg.combine(X, case.coef, rows_idx=case.idx, base=None if case.base is None else cp.asarray(case.base))
    assert isinstance(got, cp.ndarray)
    check_combine(case, got.get())
