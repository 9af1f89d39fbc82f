"""The few CUDA runtime services the GPU backend uses, through CuPy.

The backend talks to the GPU only through this interface (memory, pinned host buffers, streams, events, async
host-to-device copies, kernel launches), so that its orchestration also runs against the test suite's CPU shim
(tests/gpu_shim.py), which executes the same kernels.cu through a host emulation of the grid and replays streams
in a random, dependency-respecting order. Kernel arguments are numpy scalars: ``np.uint64`` for addresses,
``np.int64`` and ``np.float64`` for values.
"""

from __future__ import annotations

import threading

import numpy as np

from ..errors import BackendUnavailable
from . import cuda_source


class CupyRuntime:
    name = "cupy"
    warp_size = 32

    def __init__(self):
        import cupy

        self.cp = cupy
        self._modules = {}
        self._sms = {}
        self._lock = threading.Lock()
        self.defines = {}
        """Tuning macros of kernels.cu (``JK_FOLD_UPDATES``, ...) for the modules this runtime compiles; empty: the
        defaults in the source. Only the benchmark's variant sweep sets them."""

    def device_id(self) -> int:
        """The current device (CuPy's), where this runtime allocates and launches."""
        return int(self.cp.cuda.Device().id)

    @property
    def sm_count(self) -> int:
        """Multiprocessors of the current device."""
        dev = self.device_id()
        n = self._sms.get(dev)
        if n is None:
            n = self._sms[dev] = int(self.cp.cuda.runtime.getDeviceProperties(dev)["multiProcessorCount"])
        return n

    # --- memory -------------------------------------------------------------------------------------------------
    def empty(self, n: int, dtype):
        return self.cp.empty(n, dtype)

    def zeros(self, n: int, dtype):
        return self.cp.zeros(n, dtype)

    def upload(self, a: np.ndarray):
        """Device copy of a small host table, ordered on the current stream (the host buffer may be reused)."""
        return self.cp.asarray(a)

    def download(self, a) -> np.ndarray:
        return a.get()

    @staticmethod
    def ptr(a) -> int:
        return int(a.data.ptr)

    def pinned(self, nbytes: int) -> np.ndarray:
        mem = self.cp.cuda.alloc_pinned_memory(nbytes)
        return np.ndarray((nbytes,), np.uint8, buffer=mem)  # the array keeps the PinnedMemoryPointer alive

    def is_pinned(self, addr: int) -> bool:
        """Host memory the DMA engines can read directly (cudaHostAlloc'd or registered)."""
        try:
            attr = self.cp.cuda.runtime.pointerGetAttributes(addr)
        except self.cp.cuda.runtime.CUDARuntimeError:
            return False
        return attr.type == getattr(self.cp.cuda.runtime, "memoryTypeHost", 1)

    # --- streams and events ---------------------------------------------------------------------------------------
    def current_stream(self):
        return _Stream(self.cp.cuda.get_current_stream())

    def stream(self):
        return _Stream(self.cp.cuda.Stream(non_blocking=True))

    def event(self):
        return _Event(self.cp.cuda.Event(disable_timing=True))

    def h2d_async(self, dst: int, src: int, nbytes: int, stream) -> None:
        self.cp.cuda.runtime.memcpyAsync(dst, src, nbytes, self.cp.cuda.runtime.memcpyHostToDevice,
                                         stream.s.ptr)

    # --- kernels -------------------------------------------------------------------------------------------------
    def module(self):
        """(module, lowered names) of the current device: compiled by NVRTC with our options once per device
        architecture and cached on disk (JITKERNELS_CACHE_DIR, default ~/.cache/jitkernels), loaded once per
        device and process."""
        return self._module("kernels", None)

    def _module(self, tag: str, text):
        """The module of ``text`` (None: kernels.cu with every kernel name) on the current device, compiled once."""
        dev = self.cp.cuda.Device()
        defines = dict(self.defines)  # one snapshot for the key and the compile
        key = (dev.id, tag, tuple(sorted(defines.items())))
        with self._lock:
            mod = self._modules.get(key)
            if mod is None:
                arch = f"sm_{dev.compute_capability}"
                try:
                    mod = self._load(arch, tag, text, defines)
                except Exception as e:  # (before the call's first launch: the aggregator keeps its state untorn)
                    raise BackendUnavailable(
                        f"the CUDA kernels could not be built or loaded for {arch} ({type(e).__name__}: {e}); where "
                        f"the cause is the kernel cache, point JITKERNELS_CACHE_DIR at a writable folder") from e
                self._modules[key] = mod
        return mod

    def _load(self, arch: str, tag: str, text, defines: dict):
        import hashlib
        import json
        import os

        from ..state import atomic_write

        d = os.path.join(os.environ.get("JITKERNELS_CACHE_DIR") or os.path.expanduser("~/.cache/jitkernels"),
                         "cuda")
        os.makedirs(d, exist_ok=True)
        key = hashlib.sha256(((text or "") + cuda_source.cache_key(arch) + repr(sorted(defines.items())))
                             .encode()).hexdigest()[:24]
        stem = os.path.join(d, f"{tag}-{arch}-{key}")
        if not (os.path.exists(stem + ".cubin") and os.path.exists(stem + ".json")):
            image, lowered = cuda_source.compile_nvrtc(arch, names=None if text is None else (), text=text,
                                                       defines=defines)
            atomic_write(stem + ".json", json.dumps(lowered).encode())
            atomic_write(stem + ".cubin", bytes(image))
        with open(stem + ".json") as f:
            lowered = json.load(f)
        return self.cp.RawModule(path=stem + ".cubin"), lowered

    def launch_generated(self, name: str, body: str, grid: int, args: tuple, stream) -> None:
        """Launch ``extern "C"`` kernel ``name`` of a generated source ``body`` (jk_math.h prepended), compiled
        once per device architecture and cached like kernels.cu."""
        if grid:
            mod, _ = self._module(name, cuda_source.header_source("jk_math.h") + body)
            with stream.s:
                mod.get_function(name)((grid,), (cuda_source.BLOCK,), args)

    def launch(self, name: str, grid: int, args: tuple, stream) -> None:
        if grid:
            mod, lowered = self.module()
            fn = mod.get_function(lowered[name])
            with stream.s:  # RawKernel launches on the current stream
                fn((grid,), (cuda_source.BLOCK,), args)


class _Stream:
    def __init__(self, s):
        self.s = s

    def wait(self, ev) -> None:
        self.s.wait_event(ev.e)

    def synchronize(self) -> None:
        self.s.synchronize()


class _Event:
    def __init__(self, e):
        self.e = e

    def record(self, stream) -> None:
        self.e.record(stream.s)

    def synchronize(self) -> None:
        self.e.synchronize()
