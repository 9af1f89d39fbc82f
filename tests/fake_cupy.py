"""A numpy-backed stand-in for CuPy, so that the GPU backend runs end to end without a GPU.

With :func:`installed`, ``import cupy`` gives this module: its ``ndarray`` holds a numpy array but is not one (the
package tells host from device memory by ``isinstance(x, numpy.ndarray)``), and refuses implicit conversion to
numpy, as CuPy does, so a device array that reaches host code raises instead of being read there. The kernels are
csrc/cuda/kernels.cu under the host emulation, launched through :class:`DeviceRuntime` (gpu_shim's runtime, whose
streams replay lazily in random dependency-respecting orders; its device memory made of these arrays). Every array
operation first drains the compute stream, as CuPy's operations are ordered after the kernels on the current stream.

What it cannot check: real CUDA (NVRTC builds, memory faults, DLPack with torch, timing). test_gpu.py runs there.
"""

from __future__ import annotations

import contextlib
import sys
import time
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

import gpu_shim

_rt = None  # the runtime whose compute stream array operations are ordered after


def _sync() -> None:
    if _rt is not None:
        _rt.default.synchronize()


def _unwrap(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic):  # CuPy's reductions and scalar indexing give 0-d arrays
        return ndarray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _no_host_arrays(args) -> None:
    for a in args:
        if isinstance(a, np.ndarray) and a.ndim > 0:  # (CuPy takes numpy scalars and 0-d arrays)
            raise TypeError("a numpy array mixed with a CuPy array (CuPy refuses host arrays in device operations)")
        if isinstance(a, (list, tuple)):
            _no_host_arrays(a)


# What CuPy's ndarray has of numpy's (read through to the numpy array). numpy's __array_interface__, ctypes and
# the like are not among them: numpy would read a fake array through those, as CuPy's arrays cannot be read.
_ATTRIBUTES = frozenset("""
    shape dtype size ndim nbytes itemsize strides base real imag
    astype view reshape ravel flatten copy fill sum max min mean prod any all argmax argmin cumsum dot transpose
    swapaxes squeeze take repeat clip round conj nonzero item tolist diagonal trace var std
""".split())


class _Flags:
    """CuPy's flags: three, read-only."""

    def __init__(self, a):
        self.c_contiguous, self.f_contiguous, self.owndata = (a.flags.c_contiguous, a.flags.f_contiguous,
                                                              a.flags.owndata)


class _Memory:
    def __init__(self, a):
        self.ptr = a.ctypes.data if a.size else 0


class ndarray(NDArrayOperatorsMixin):
    """A device array: numpy memory behind CuPy's interface (the parts the package uses)."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = a

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a "
                        "NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _no_host_arrays(inputs)
        _sync()
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        r = getattr(ufunc, method)(*_unwrap(inputs), **kwargs)
        return out[0] if out is not None and len(out) == 1 else _wrap(r)

    def __array_function__(self, func, types_, args, kwargs):
        _no_host_arrays(args)
        _sync()
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    @property
    def data(self):
        return _Memory(self._a)

    @property
    def device(self):
        return _Device(0)

    def set(self, arr, stream=None):
        """A host-to-device copy into this array."""
        _sync()
        self._a[...] = arr

    def get(self, stream=None, order="C", out=None):
        _sync()
        if out is None:
            return self._a.copy()
        if not (isinstance(out, np.ndarray) and out.shape == self._a.shape and out.dtype == self._a.dtype and
                out.flags.c_contiguous):  # (CuPy's conditions on out)
            raise ValueError("fake_cupy: get(out=) needs a C-contiguous numpy array of the same shape and dtype")
        out[...] = self._a
        return out

    def __getattr__(self, name):
        if name not in _ATTRIBUTES:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} (fake_cupy: not one of CuPy's)")
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                _sync()
                return _wrap(attr(*_unwrap(args), **_unwrap(kwargs)))
            return method
        return _wrap(attr) if isinstance(attr, np.ndarray) else attr

    @property
    def T(self):
        return ndarray(self._a.T)

    @property
    def flags(self):
        return _Flags(self._a)

    def sort(self, axis=-1):
        _sync()
        self._a.sort(axis=axis)

    def argsort(self, axis=-1):
        _sync()
        return ndarray(self._a.argsort(axis=axis))

    def __getitem__(self, key):
        _sync()
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        _sync()
        self._a[_unwrap(key)] = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        _sync()
        return (_wrap(v) for v in self._a)

    def __bool__(self):
        _sync()
        return bool(self._a)

    def __float__(self):
        _sync()
        return float(self._a)

    def __int__(self):
        _sync()
        return int(self._a)

    def __repr__(self):
        return f"fake_cupy.{self._a!r}"


def _fn(f):
    def call(*args, **kwargs):
        _no_host_arrays(args)
        _sync()
        return _wrap(f(*_unwrap(args), **_unwrap(kwargs)))
    return call


def asarray(a, dtype=None, order=None):
    """CuPy's asarray: a device array as it is (or converted), host data uploaded (a copy)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    _sync()
    h = np.array(_unwrap(a), dtype=dtype, order=order or "K", copy=True)
    if h.dtype.kind in "OUSMm":  # (not "V": ml_dtypes' bfloat16, which CuPy 14 takes)
        raise ValueError(f"Unsupported dtype {h.dtype}")
    return ndarray(gpu_shim.aligned_copy(h) if h.flags.c_contiguous else h)


def empty(shape, dtype=np.float64):
    """Device memory, aligned as cudaMalloc's (numpy's own is not: see gpu_shim.aligned_empty)."""
    _sync()
    return ndarray(gpu_shim.aligned_empty(shape, dtype))


def zeros(shape, dtype=np.float64):
    out = empty(shape, dtype)
    out._a[...] = 0
    return out


def ascontiguousarray(a, dtype=None):
    return ndarray(np.ascontiguousarray(_unwrap(asarray(a)), dtype=dtype))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def from_dlpack(x):
    raise TypeError("fake_cupy: no DLPack exchange (torch CUDA tensors need a GPU)")


class _Device:
    """CuPy's device: one (GPU 0) holds every fake array; ``synchronize`` drains every emulated stream."""

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def __enter__(self):  # (CuPy's Device is a context: work on that GPU)
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        if _rt is not None:
            _rt.run_until(lambda: not any(st.ops for st in _rt.streams))


class _Event:
    """A CUDA event timed on the host (emulated kernels run when a stream is drained: a dry run's timings mean
    nothing)."""

    t = 0.0

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass


class _Generator:
    def __init__(self, seed):
        self.g = np.random.default_rng(seed)

    def standard_normal(self, size, dtype=np.float64):
        return ndarray(self.g.standard_normal(size, dtype=dtype))


class _Pool:
    def free_all_blocks(self):
        pass

    def used_bytes(self):
        return 0


cuda = types.SimpleNamespace(
    Device=_Device, Event=_Event, get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3,
    alloc_pinned_memory=lambda n: bytearray(n),
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {
        "name": b"fake_cupy (host emulation)", "multiProcessorCount": 2, "totalGlobalMem": 1 << 30}))
random = types.SimpleNamespace(default_rng=_Generator)


def get_default_memory_pool():
    return _Pool()


def _module_getattr(name):
    """numpy's dtypes as they are, its functions over device arrays."""
    obj = getattr(np, name)
    if isinstance(obj, type) or isinstance(obj, (np.dtype, float, int)):
        return obj
    if callable(obj):
        return _fn(obj)
    raise AttributeError(name)


__getattr__ = _module_getattr


class DeviceRuntime(gpu_shim.HostRuntime):
    """gpu_shim's runtime with device memory made of fake CuPy arrays (pinned host memory stays numpy)."""

    def empty(self, n, dtype):
        return ndarray(super().empty(n, dtype))

    def zeros(self, n, dtype):
        return ndarray(super().zeros(n, dtype))

    def upload(self, a):
        return ndarray(super().upload(a))

    def download(self, a):
        return a.get() if isinstance(a, ndarray) else super().download(a)

    @staticmethod
    def ptr(a) -> int:
        # (CupyRuntime.ptr reads a.data.ptr, which a numpy array lacks: a host array handed to a GPU kernel fails
        # there, and must here, or the emulated kernel reads host memory that a real GPU cannot)
        if not isinstance(a, ndarray):
            raise AttributeError(f"a host {type(a).__name__} handed to a GPU kernel as a device array")
        return a.data.ptr


def _cupyx(rt):
    m = types.ModuleType("cupyx")

    def empty_pinned(shape, dtype=np.float32):
        return rt.pin(np.empty(shape, dtype))
    m.empty_pinned = empty_pinned
    return m


@contextlib.contextmanager
def installed(seed: int = 0, slot_bytes: int | None = None):
    """``import cupy`` gives this module, and the GPU backend runs on a :class:`DeviceRuntime`, inside the block."""
    from jitkernels import backends
    from jitkernels.backends import cupy_backend

    global _rt
    rt = DeviceRuntime(seed)
    saved = {name: sys.modules.get(name) for name in ("cupy", "cupyx")}
    saved_rt, saved_caches = _rt, (dict(backends._available_cache), dict(backends._chosen))
    sys.modules["cupy"], sys.modules["cupyx"] = sys.modules[__name__], _cupyx(rt)
    _rt = rt
    backends._available_cache.clear()
    backends._chosen.clear()
    try:
        with cupy_backend.use_runtime(rt, slot_bytes):
            yield rt
    finally:
        _rt = saved_rt
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        backends._available_cache.clear()
        backends._available_cache.update(saved_caches[0])
        backends._chosen.clear()
        backends._chosen.update(saved_caches[1])
