"""test_gpu.py's tests without a GPU: CuPy replaced by fake_cupy (numpy memory behind CuPy's interface), the kernels
by the host emulation of csrc/cuda/kernels.cu, CUDA streams by gpu_shim's lazily replayed queues. What these cover
is the GPU backend's Python: dispatch from the Aggregator, device leaves and results, the staging ring, the device
update store and the robust rules' device paths. test_gpu.py on a GPU covers what only CUDA can show."""

import shutil

import pytest

import fake_cupy
import test_gpu

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")

NOT_HERE = {"test_torch_cuda_tensors_in_and_out": "torch CUDA tensors (DLPack) need a GPU",
            "test_subnormal_inputs_bit_exact": "runs the GPU in a subprocess, which the fake CuPy does not reach"}


@pytest.fixture(autouse=True, scope="module")
def _fake_cupy():
    with fake_cupy.installed():
        yield


for _name in dir(test_gpu):
    if _name.startswith("test_"):
        _test = getattr(test_gpu, _name)
        globals()[_name] = pytest.mark.skip(reason=NOT_HERE[_name])(_test) if _name in NOT_HERE else _test


def test_an_aggregator_used_under_another_gpu_is_refused_by_name(monkeypatch):
    """The state lives on the GPU current when the aggregator was made; folds, merges and finalize launched on
    whichever GPU was current at the call, with the accumulator's address on the other one (an illegal address,
    a sticky error that loses the context). Refused, naming both GPUs; the state is untouched."""
    import numpy as np

    import cupy
    import jitkernels as jk
    from jitkernels.backends import cupy_backend

    agg = jk.Aggregator({"w": cupy.zeros(4, dtype=cupy.float32)})
    agg.fold({"w": np.ones(4, np.float32)}, party="a")
    before, other = agg.state.copy(), jk.Aggregator({"w": cupy.zeros(4, dtype=cupy.float32)})
    rt = cupy_backend.runtime()
    monkeypatch.setattr(type(rt), "device_id", lambda self: 1)
    for use in (lambda: agg.fold({"w": np.ones(4, np.float32)}, party="b"),
                lambda: agg.fold_many([{"w": np.ones(4, np.float32)}], [1.0], ["c"]),
                agg.finalize, lambda: agg.merge(other)):
        with pytest.raises(jk.LayoutMismatch, match=r"state is on GPU 0; the current device is GPU 1"):
            use()
    monkeypatch.undo()
    assert agg.state.same_bits(before)
    np.testing.assert_array_equal(agg.finalize()["w"].get(), np.ones(4, np.float32))


@pytest.mark.parametrize("args", [["--placements", "device", "-k", "12"], []], ids=["device_k12", "with_host_rows"])
def test_robust_gpu_benchmark_runs_end_to_end(args, tmp_path, monkeypatch):
    """bench/run_gpu.sh's robust-rule benchmarks (both calls' options, at a tiny size) through the fake: a next GPU
    session should spend its minutes measuring, not finding a script error. (Its timings here mean nothing: the
    emulated kernels run when a stream is drained.)"""
    import functools

    from jitkernels import gpu_benchmark as gb

    monkeypatch.setattr(gb, "probes", functools.partial(gb.probes, reps=1, nbytes=1 << 20))
    md = tmp_path / "robust.md"
    assert gb.main(["--robust", *args, "--sizes", "4000", "--reps", "1", "--gram-columns", "1,2",
                    "--markdown", str(md), "--json", str(tmp_path / "robust.json")]) == 0
    text = md.read_text()
    for row in ("coordinate median", "Gram kernel, 8-row tiles, U=2", "pilot reference row", "weighted sum of the k",
                "geometric median"):
        assert row in text, row


def test_an_update_on_another_gpu_is_refused_by_name(monkeypatch):
    """The kernels run on the current device: a torch tensor on cuda:1 (or a CuPy array made under Device(1)) went
    into the pointer table of a launch on GPU 0, an illegal address there. Refused, naming the leaf and party."""
    import numpy as np

    import cupy
    import jitkernels as jk

    agg = jk.Aggregator({"w": cupy.zeros(4, dtype=cupy.float32)})
    on_gpu1 = cupy.ones(4, dtype=cupy.float32)
    q = jk.Quantized(cupy.ones(4, dtype=cupy.int8), cupy.ones(1, dtype=cupy.float32))
    monkeypatch.setattr(fake_cupy.ndarray, "device", property(lambda self: fake_cupy._Device(1)))
    with pytest.raises(jk.LayoutMismatch, match=r"party 'p', leaf 'w': the array is on GPU 1; .* GPU 0"):
        agg.fold({"w": on_gpu1}, party="p")
    with pytest.raises(jk.LayoutMismatch, match=r"party 'q', leaf 'w': the array is on GPU 1"):  # int8 values too
        agg.fold({"w": q}, party="q")
    monkeypatch.undo()
    agg.fold({"w": on_gpu1}, party="p")
    np.testing.assert_array_equal(agg.finalize()["w"].get(), np.ones(4, np.float32))


def test_a_torch_cuda_tensor_with_its_negative_bit_is_refused(monkeypatch):
    """torch's DLPack export hands over a lazily negated view's memory without the negation (z.conj().imag holds
    +1..+4 for the values -1..-4): the GPU path folded it with the wrong sign, where the host path refuses such a
    view. Emulated: torch CPU tensors taken as CUDA ones, and a from_dlpack that wraps the export as CuPy's does."""
    import numpy as np
    import torch

    import jitkernels as jk
    from jitkernels import device, layout

    z = torch.complex(torch.zeros(4), torch.arange(1.0, 5.0)).conj().imag
    assert z.is_neg() and np.from_dlpack(z).tolist() == [1.0, 2.0, 3.0, 4.0]
    monkeypatch.setattr(fake_cupy, "from_dlpack", lambda x: fake_cupy.ndarray(np.from_dlpack(x)))
    on_gpu = device.is_device_array
    for mod in (device, layout):
        monkeypatch.setattr(mod, "is_device_array", lambda x: isinstance(x, torch.Tensor) or on_gpu(x))
        monkeypatch.setattr(mod, "gpu_of", lambda x: 0)
    agg = jk.Aggregator({"w": fake_cupy.zeros(4, np.float32)}, backend="cupy")
    with pytest.raises(jk.LayoutMismatch, match="negative or conjugate bit"):
        agg.fold({"w": z}, party="p")
    agg.fold({"w": z.resolve_neg()}, party="p")
    assert agg.finalize()["w"].get().tolist() == [-1.0, -2.0, -3.0, -4.0]


def test_a_device_update_whose_delta_overflows_is_out_of_range():
    """The GPU stats kernel counted a finite update whose float64 delta overflowed as non-finite (NonFiniteUpdate),
    where the CPU backends, and the same update in host memory, say ValueOutOfRange."""
    import numpy as np

    import cupy
    import jitkernels as jk

    x = {"w": cupy.asarray(np.array([1e308, 0.0]))}
    agg = jk.Aggregator(x, base=x)
    for u in ({"w": cupy.asarray(np.array([-1e308, 0.0]))}, {"w": np.array([-1e308, 0.0])}):
        with pytest.raises(jk.ValueOutOfRange, match=r"\|x\| = inf as its delta"):
            agg.fold(u, party="p")
    with pytest.raises(jk.NonFiniteUpdate, match="1 non-finite"):
        agg.fold({"w": cupy.asarray(np.array([np.nan, 0.0]))}, party="p")
    assert agg.state.count == 0


def test_device_leaves_and_scales_off_their_alignment_are_copied():
    """A device leaf viewed at an odd byte offset of a device buffer (no CuPy flag says so) reached the kernels at
    that address, and so did a device Quantized's scales: a misaligned load faults on a GPU. They are copied once."""
    import numpy as np

    import cupy as cp
    import jitkernels as jk
    from jitkernels.layout import _as_array

    buf = cp.zeros(4 * 5 + 1, dtype=np.uint8)
    x = buf[1:].view(np.float32)
    x[...] = cp.asarray(np.arange(5, dtype=np.float32))
    assert x.data.ptr % 4 and x.flags.c_contiguous
    leaf = _as_array(x, "w", "a")
    assert leaf.array.data.ptr % 4 == 0 and np.array_equal(leaf.array.get(), np.arange(5, dtype=np.float32))
    q = jk.Quantized(cp.ones(5, dtype=np.int8), buf[1:5].view(np.float32), block=None)
    assert q.scale.data.ptr % 4 == 0
    agg = jk.Aggregator({"w": cp.zeros(5, dtype=np.float32)})
    agg.fold({"w": x}, party="p")
    np.testing.assert_array_equal(agg.finalize()["w"].get(), np.arange(5, dtype=np.float32))


def test_a_device_output_off_its_alignment_is_refused():
    """finalize(out=) into a device buffer at an odd byte offset wrote into a private aligned copy: the caller's
    buffer kept its zeros. Refused, as a misaligned host output is."""
    import numpy as np

    import cupy as cp
    import jitkernels as jk

    agg = jk.Aggregator({"w": cp.zeros(5, dtype=np.float32)})
    agg.fold({"w": cp.asarray(np.arange(5, dtype=np.float32))}, party="p")
    out = cp.zeros(4 * 5 + 1, dtype=np.uint8)[1:].view(np.float32)
    with pytest.raises(jk.LayoutMismatch, match="output leaf must be C-contiguous and aligned"):
        agg.finalize(out={"w": out})
    fine = cp.zeros(5, dtype=np.float32)
    agg.finalize(out={"w": fine})
    np.testing.assert_array_equal(fine.get(), np.arange(5, dtype=np.float32))


def test_kernels_that_fail_to_build_leave_the_state_untorn(monkeypatch):
    """The first launch compiles kernels.cu (NVRTC) and writes the kernel cache: a failure there (an architecture
    NVRTC does not know, a cache folder it cannot write) is BackendUnavailable, raised before the call writes
    anything, and leaves the state as it was (it was torn for good: every later fold raised TornState)."""
    import threading
    import types

    import numpy as np

    import cupy
    import jitkernels as jk
    from jitkernels.backends import cupy_backend
    from jitkernels.backends.gpu_runtime import CupyRuntime

    cuda = types.SimpleNamespace(Device=lambda: types.SimpleNamespace(id=0, compute_capability="120"))
    real = object.__new__(CupyRuntime)
    real.cp, real._modules, real._lock, real.defines = types.SimpleNamespace(cuda=cuda), {}, threading.Lock(), {}

    def unwritable(*args):
        raise PermissionError(13, "Permission denied", "/home/u/.cache/jitkernels/cuda")
    monkeypatch.setattr(real, "_load", unwritable)
    with pytest.raises(jk.BackendUnavailable, match=r"sm_120 \(PermissionError.*JITKERNELS_CACHE_DIR"):
        real.module()
    assert real._modules == {}  # (tried again at the next call)

    agg = jk.Aggregator({"w": cupy.zeros(1000, dtype=cupy.float32)}, backend="cupy")
    rt = cupy_backend.runtime()
    monkeypatch.setattr(type(rt), "launch", lambda self, *a: real.module())
    with pytest.raises(jk.BackendUnavailable, match="could not be built"):
        agg.fold({"w": np.ones(1000, np.float32)}, party="a")
    monkeypatch.undo()
    assert not agg.state.torn and agg.state.count == 0
    agg.fold({"w": np.ones(1000, np.float32)}, weight=2, party="a")
    np.testing.assert_array_equal(agg.finalize()["w"].get(), np.ones(1000, np.float32))


def test_a_gpu_states_copies_and_next_round_are_made_on_its_gpu(monkeypatch):
    """CuPy's ndarray.copy() and allocations go to the current device: a snapshot (copy, pickle, deepcopy) or the
    next round's state made while another GPU was current put them on that GPU. They are made under the state's own
    device context."""
    import numpy as np

    import cupy
    import fake_cupy as fc
    import jitkernels as jk

    agg = jk.Aggregator({"w": cupy.zeros(8, dtype=cupy.float32)}, algorithm=jk.algorithms.FedAdam(lr=0.1),
                        base={"w": cupy.zeros(8, dtype=cupy.float32)})
    agg.fold({"w": np.ones(8, np.float32)}, party="a")
    entered = []

    class Held(fc._Device):
        def __enter__(self):
            entered.append(self.id)
            return self

    monkeypatch.setattr(fc.ndarray, "device", property(lambda self: Held(1)))
    agg.state.copy()
    agg.state.next_round()  # (what reset() makes: its base and moments copied, its accumulator new)
    assert entered == [1, 1]
