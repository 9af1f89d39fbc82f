"""The GPU backend's orchestration, run without a GPU: the same kernels.cu (host emulation of each grid) behind a
CPU stand-in for the CUDA runtime whose streams replay in random dependency-respecting orders (gpu_shim.py).

Small chunks and small staging slots make every batch cross many stages, passes and slot reuses; updates are a mix
of device-resident, pinned-host and pageable-host columns. Fold and finalize must equal the numpy reference bit for
bit (their per-element order is fixed), the stats within the reduction tolerance of test_kernels.
"""

import shutil

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jitkernels.backends import cupy_backend, numpy_ref
from jitkernels.batch import segment_table, work_items
from jitkernels.dtypes import Quantized, np_dtype
from jitkernels.layout import Layout

from strategies import FLOAT_DTYPES, finalize_outputs, leaf_shapes, make_batch, make_update, seeds

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")
INPUTS = FLOAT_DTYPES + ("int8",)


@pytest.fixture(scope="module")
def gpu_shim():
    import gpu_shim
    gpu_shim.emulation_library()
    return gpu_shim


def _mixed(rng, gpu_shim, k, seed):
    """A runtime with random stream replay, and a random split of the k updates: 0 device, 1 pinned, 2 pageable."""
    return gpu_shim.HostRuntime(seed=seed), rng.integers(0, 3, k)


def _pin(rt, leaves, where):
    for j in np.flatnonzero(where == 1):
        for a in leaves[j]:
            if isinstance(a, Quantized):
                rt.pin(a.values)
                rt.pin(a.scale)
            elif a is not None:
                rt.pin(a)


@pytest.mark.parametrize("in_dtype", INPUTS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(), k=st.integers(1, 6), with_base=st.booleans(),
       chunk=st.sampled_from([64, 300, 8192]), slot_kib=st.sampled_from([8, 40, 1024]),
       block=st.sampled_from([None, 7, 64]), misalign=st.booleans())
def test_fold_staged_bit_exact(gpu_shim, in_dtype, acc_dtype, seed, shapes, k, with_base, chunk, slot_kib, block,
                               misalign):
    rng = np.random.default_rng(seed)
    isz = 1 if in_dtype == "int8" else np_dtype(in_dtype).itemsize
    slot = max(slot_kib << 10, 2 * chunk * isz)
    rt, where = _mixed(rng, gpu_shim, k, seed)
    lay, groups, leaves = make_batch(rng, shapes, in_dtype, k, block=block, chunk=chunk, misalign=misalign,
                                     device=where == 0)
    _pin(rt, leaves, where)
    start = rng.standard_normal(lay.size).astype(acc_dtype)
    base = rng.standard_normal(lay.size).astype(acc_dtype) if with_base else None
    for g in groups.values():
        want, got = start.copy(), start.copy()
        numpy_ref.fold(want, base, g)
        with cupy_backend.use_runtime(rt, slot_bytes=slot):
            cupy_backend.fold(got, base, g)
        assert got.tobytes() == want.tobytes(), f"staged {g.in_dtype} fold differs from numpy"
        assert not any(s.ops for s in rt.streams), "a call returned with work still queued"


@pytest.mark.parametrize("in_dtype", INPUTS)
@given(seed=seeds, shapes=leaf_shapes(), k=st.integers(1, 5), with_base=st.booleans(), bound_log2=st.integers(8, 40))
def test_fold_binned_staged_bit_exact(gpu_shim, in_dtype, seed, shapes, k, with_base, bound_log2):
    rng = np.random.default_rng(seed)
    rt, where = _mixed(rng, gpu_shim, k, seed)
    lay, groups, leaves = make_batch(rng, shapes, in_dtype, k, chunk=128, device=where == 0)
    _pin(rt, leaves, where)
    base = rng.standard_normal(lay.size) if with_base else None
    for g in groups.values():
        want, got = (np.zeros(lay.size), np.zeros(lay.size)), (np.zeros(lay.size), np.zeros(lay.size))
        numpy_ref.fold_binned(*want, base, g, bound_log2)
        with cupy_backend.use_runtime(rt, slot_bytes=4096):
            cupy_backend.fold_binned(*got, base, g, bound_log2)
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()


@pytest.mark.parametrize("in_dtype", INPUTS)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(), k=st.integers(1, 4), with_base=st.booleans(),
       scale=st.sampled_from([1e-30, 1.0, 1e4]), nonfinite=st.sampled_from([None, np.nan, np.inf]))
def test_stats_of_device_updates(gpu_shim, in_dtype, acc_dtype, seed, shapes, k, with_base, scale, nonfinite):
    """(Both accumulators, a non-finite value in any update: the float32 accumulator and update 0 only until
    2026-11-28.)"""
    rng = np.random.default_rng(seed)
    lay, groups, leaves = make_batch(rng, shapes, in_dtype, k, scale=scale, chunk=500, device=np.ones(k, bool))
    if nonfinite is not None and in_dtype != "int8":
        sizable = [a for a in leaves[int(rng.integers(k))] if a.size]
        if sizable:
            a = sizable[int(rng.integers(len(sizable)))]
            a.reshape(-1)[int(rng.integers(a.size))] = nonfinite
    base = rng.standard_normal(lay.size).astype(acc_dtype) if with_base else None
    eps = np.finfo(np.float64).eps
    for g in groups.values():
        nf_ref, ss_ref, mx_ref = numpy_ref.stats(base, g, acc_dtype)
        with cupy_backend.use_runtime(gpu_shim.HostRuntime(seed)):
            nf, ss, mx = cupy_backend.stats(base, g, acc_dtype)
        np.testing.assert_array_equal(nf, nf_ref)
        n = g.n[:, None].astype(np.float64)
        assert np.all(np.abs(ss - ss_ref) <= (n + 8) * eps * ss_ref + 1e-300), (ss, ss_ref)
        assert np.array_equal(mx, mx_ref)  # a max is exact


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=seeds, shapes=leaf_shapes(), with_base=st.booleans(), magnitude=st.sampled_from([1e-3, 1.0, 6e4]))
def test_finalize_bit_exact(gpu_shim, out_dtype, acc_dtype, seed, shapes, with_base, magnitude):
    rng = np.random.default_rng(seed)
    lay = Layout.from_template(make_update(rng, shapes, out_dtype))
    acc = (rng.standard_normal(lay.size) * magnitude).astype(acc_dtype)
    base = rng.standard_normal(lay.size).astype(acc_dtype) if with_base else None
    total_w = rng.uniform(0.5, 50.0, len(lay))
    with cupy_backend.use_runtime(gpu_shim.HostRuntime(seed)):
        got = finalize_outputs(cupy_backend.finalize, lay, acc, base, total_w, out_dtype, chunk=100)
    for a, b in zip(got, finalize_outputs(numpy_ref.finalize, lay, acc, base, total_w, out_dtype)):
        assert a.tobytes() == b.tobytes()


def _staged_run(gpu_shim, rt, seed):
    rng = np.random.default_rng(seed)
    lay, groups, leaves = make_batch(rng, [(5000,), (3000,)], "float32", 4, chunk=256)
    acc = np.zeros(lay.size, np.float32)
    want = acc.copy()
    g = groups["float32"]
    numpy_ref.fold(want, None, g)
    with cupy_backend.use_runtime(rt, slot_bytes=8192):
        cupy_backend.fold(acc, None, g)
    return acc.tobytes() == want.tobytes()


def test_pipeline_overlaps_copies_with_folds(gpu_shim):
    rt = gpu_shim.HostRuntime(seed=1)
    assert _staged_run(gpu_shim, rt, 1)
    assert rt.max_overlap >= 2, "copies of later stages should be queued while a fold is"
    assert sum(kind == "copy" for kind, _ in rt.log) >= 10


def test_shim_catches_a_missing_stream_wait(gpu_shim, monkeypatch):
    """Negative control: drop the copy stream's wait for the fold that last read a slot, and the random replay
    lets a copy overwrite a slot before its fold has read it, in some schedule: the shim can see ordering bugs."""
    real_wait = gpu_shim.Stream.wait

    def wait(self, ev):
        if self.name != "compute":
            return
        real_wait(self, ev)
    monkeypatch.setattr(gpu_shim.Stream, "wait", wait)
    assert not all(_staged_run(gpu_shim, gpu_shim.HostRuntime(seed=s), s) for s in range(20))


def test_a_pass_that_fails_midway_ends_its_queued_work_before_raising(gpu_shim, monkeypatch):
    """A launch that fails after earlier stages' copies and folds were queued: the error leaves only once the
    queued work has run (it may still read the caller's updates, which the caller may free on the error)."""
    rt = gpu_shim.HostRuntime(seed=3)
    real, calls = type(rt).launch, []

    def launch(self, name, grid, args, stream):
        calls.append(name)
        if len(calls) == 3:
            raise RuntimeError("launch failed")
        real(self, name, grid, args, stream)
    monkeypatch.setattr(type(rt), "launch", launch)
    with pytest.raises(RuntimeError, match="launch failed"):
        _staged_run(gpu_shim, rt, 3)
    assert len(calls) == 3 and not any(s.ops for s in rt.streams), "work still queued when the error left"


@pytest.mark.parametrize("wait", [True, False], ids=["ring", "negative-control"])
def test_table_ring_refills_a_block_only_after_its_copy(gpu_shim, monkeypatch, wait):
    """More tables queued than the ring has blocks, with no synchronization between them (copies replay lazily):
    each device table holds its own bytes. Without the wait for a block's last copy (the control), a later table
    overwrites the block first."""
    rt = gpu_shim.HostRuntime(seed=0)
    if not wait:
        monkeypatch.setattr(gpu_shim.Event, "synchronize", lambda self: None)
    ring = cupy_backend._TableRing(rt)
    hosts = [np.full(1000 + 300 * i, i, np.int64) for i in range(3 * cupy_backend.TABLE_DEPTH)]
    devs = [ring.upload(h) for h in hosts]  # on the runtime's current stream
    rt.default.synchronize()
    same = [d.view(np.int64).tobytes() == h.tobytes() for d, h in zip(devs, hosts)]
    assert all(same) == wait


def test_slot_too_small_for_a_work_item_is_refused(gpu_shim):
    rng = np.random.default_rng(0)
    _, groups, _ = make_batch(rng, [(5000,)], "float64", 2, chunk=1024)
    with cupy_backend.use_runtime(gpu_shim.HostRuntime(0), slot_bytes=4096):
        with pytest.raises(ValueError, match="cannot hold a work item"):
            cupy_backend.fold(np.zeros(5000, np.float32), None, groups["float64"])


@pytest.mark.parametrize("acc_dtype", ["float32", "float64"])
@given(seed=st.integers(0, 2**64 - 1), rnd=st.integers(0, 2**32 - 1), shapes=leaf_shapes())
def test_dp_noise_kernel_bit_exact(gpu_shim, acc_dtype, seed, rnd, shapes):
    """The CUDA noise kernel (jk_noise.h's Philox + Box-Muller) adds the host's bits, leaf by leaf."""
    from jitkernels import noise

    rng = np.random.default_rng(seed % 2**32)
    lay = Layout.from_template(make_update(rng, shapes, "float32"))
    acc = rng.standard_normal(lay.size).astype(acc_dtype)
    ids = list(range(len(lay)))
    sigmas = rng.uniform(0.01, 10.0, len(lay))
    got = acc.copy()
    with cupy_backend.use_runtime(gpu_shim.HostRuntime(seed % 2**32)):
        cupy_backend.add_noise(got, ids, [l.offset for l in lay.leaves], [l.size for l in lay.leaves], sigmas, seed,
                               rnd)
    want = acc.copy()
    for i, leaf in enumerate(lay.leaves):
        noise.add_noise(want[leaf.offset:leaf.offset + leaf.size], sigmas[i], seed, rnd, i, 0, backend="numpy")
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("acc_dtype", ["uint32", "uint64"])
@given(seed=seeds, sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=4), k=st.integers(0, 5),
       bits=st.sampled_from([1, 7, 16, 31, 32]), subtract=st.booleans(), outlier=st.booleans())
def test_secagg_modsum_kernel_bit_exact(gpu_shim, acc_dtype, seed, sizes, k, bits, subtract, outlier):
    """The CUDA modular-sum kernel (jk_secagg.h's math) gives the numpy reference's bits and flags the same
    out-of-range updates, for every input kind (uint32, int32, int64, uint64 words) and row layout; the sums come
    back reduced mod 2^b, from any accumulator, with no updates too (the GPU path returned before reducing)."""
    from jitkernels import secagg as sa

    rng = np.random.default_rng(seed)
    kinds = [np.uint32, np.int32, np.int64, np.uint64]
    hi = 1 << bits
    updates = []
    for j in range(k):
        dt = kinds[int(rng.integers(0, 4))]
        top = min(hi, np.iinfo(dt).max + 1)
        rows = [rng.integers(0, top, n, dtype=np.uint64).astype(dt) for n in sizes]
        if outlier and j == k - 1 and sum(sizes):
            r = int(np.argmax(sizes))
            rows[r][int(rng.integers(0, sizes[r]))] = -1 if np.dtype(dt).kind == "i" else np.iinfo(dt).max
        updates.append(rows)
    acc0 = rng.integers(0, np.iinfo(acc_dtype).max, sum(sizes), dtype=acc_dtype, endpoint=True)
    plan = sa._Plan(sizes)
    leaves = [sa._leaves_of(u, plan) for u in updates]
    want = acc0.copy()
    bad_want = sa._modsum_numpy(want, plan, leaves, bits, subtract)
    got = acc0.copy()
    with cupy_backend.use_runtime(gpu_shim.HostRuntime(seed % 2**32)):
        bad_got = sa._modsum_cupy(got, plan, leaves, bits, subtract)
    assert got.tobytes() == want.tobytes()
    assert bad_got.tolist() == bad_want.tolist()


@given(sizes=st.lists(st.integers(0, 3000), max_size=6), chunk=st.integers(1, 700), cut=st.tuples(
    st.floats(0, 1), st.floats(0, 1)))
def test_segment_table_maps_every_block_to_its_item(sizes, chunk, cut):
    """csrc/cuda/kernels.cu item_of, modelled in numpy, finds every work item from its block index in the segment
    table: of a group (all items) and of a stage (a contiguous run of items, cut anywhere, rows split across it)."""
    work = work_items(np.array(sizes, np.int64), chunk)
    i0, i1 = sorted(int(c * len(work)) for c in cut)
    for items in (work, work[i0:i1]):
        tab = segment_table(items)
        seg, ch, b = tab[2:].reshape(-1, 4), tab[1], np.arange(len(items))
        assert tab[0] == len(seg) <= len(items) and len(seg) <= len(sizes) + 1
        g = np.searchsorted(seg[:, 3], b, side="right") - 1  # the last segment whose first item is <= b
        s = seg[g, 1] + (b - seg[g, 3]) * ch
        got = np.stack([seg[g, 0], s, np.minimum(ch, seg[g, 1] + seg[g, 2] - s)], axis=1)
        assert np.array_equal(got.reshape(-1, 3), items.reshape(-1, 3))


def test_segment_table_refuses_items_not_cut_in_chunks():
    with pytest.raises(ValueError, match="chunks of 7"):
        segment_table(np.array([[0, 0, 5], [0, 5, 7]], np.int64))


def test_emulated_device_memory_is_aligned_as_cuda_allocates_it(gpu_shim):
    """The kernels take their vector paths only on aligned pointers (fold_rows' float64 quads: 32 bytes). Device
    memory is 256-byte aligned; numpy's is 16 bytes from ~128 KB up, and the emulation never ran the float64
    accumulator's quad path."""
    import fake_cupy

    rt = gpu_shim.HostRuntime(seed=0)
    with fake_cupy.installed():
        import cupy
        drt = fake_cupy.DeviceRuntime(seed=0)
        arrays = [rt.empty(n, np.float64) for n in (1, 1000, 1 << 17, 1 << 20)]
        arrays += [rt.zeros(1 << 18, np.float32), rt.upload(np.ones(1 << 18)), rt.pinned(1 << 18)]
        arrays += [drt.zeros(1 << 18, np.float64)._a, drt.upload(np.ones(1 << 17))._a,
                   cupy.asarray(np.ones(1 << 18))._a, cupy.zeros((3, 1 << 16), np.float32)._a,
                   cupy.empty(1 << 18, np.float64)._a]
    assert all(a.ctypes.data % gpu_shim.DEVICE_ALIGN == 0 for a in arrays)
    assert not rt.zeros(1 << 18, np.float64).any() and (rt.upload(np.arange(5.0)) == np.arange(5.0)).all()
