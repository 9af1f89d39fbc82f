"""A CPU stand-in for the CUDA runtime, to test the GPU backend's orchestration without a GPU.

``HostRuntime`` implements the interface of jitkernels/backends/gpu_runtime.py. Its kernels are csrc/cuda/kernels.cu
itself, compiled by g++ with the host emulation (csrc/cuda/emulate.h: each grid runs as loops over the same index
math) for exactly the kernel names the backend hands NVRTC. Its streams are lazy queues: copies and launches wait
until a host synchronization needs them, then run in a random order that respects only stream order and event
waits, as a GPU may. A missing wait in the backend (a slot refilled before the fold that reads it, a fold that
runs before its copy) then reads the wrong bytes, and the result differs from the numpy reference.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
from collections import deque

import numpy as np

from jitkernels.backends import cuda_source

_LIB: dict = {}  # defines -> library
DEVICE_ALIGN = 256  # cudaMalloc's alignment (CuPy's pool keeps it): the kernels' vector paths test their pointers


def aligned_empty(shape, dtype, align: int = DEVICE_ALIGN) -> np.ndarray:
    """An uninitialized array whose data starts on an ``align``-byte boundary, as device memory does. numpy's own
    start 16 bytes past a 32-byte boundary from ~128 KB up, and the float64 accumulator's quad path (32-byte loads)
    never ran in the emulation."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n * dtype.itemsize + align, np.uint8)
    skip = -raw.ctypes.data % align
    return raw[skip:skip + n * dtype.itemsize].view(dtype).reshape(shape)


def aligned_copy(a) -> np.ndarray:
    a = np.asarray(a)
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _build(stem: str, src: str, deps) -> ctypes.CDLL:
    """g++ of ``src`` under the host emulation into a shared library, cached by the hash of the source and of the
    csrc/ files ``deps`` it includes."""
    text = src + "".join(open(os.path.join(cuda_source.source_dir(), p)).read() for p in deps)
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    d = os.path.join(tempfile.gettempdir(), "jitkernels-emulation")
    os.makedirs(d, exist_ok=True)
    lib = os.path.join(d, f"{stem}-{key}.so")
    if not os.path.exists(lib):
        cpp = os.path.join(d, f"{stem}-{key}.cpp")
        with open(cpp, "w") as f:
            f.write(src)
        tmp = f"{lib}.{os.getpid()}"
        # -ffp-contract=off as for the C++ backend: the emulation must round as the GPU does with --fmad=false
        subprocess.run(["g++", "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-w", cpp, "-o", tmp],
                       check=True)
        os.replace(tmp, lib)
    return ctypes.CDLL(lib)


def emulation_library(defines=()):
    """Build (once per ``defines``, cached by source hash) the shared library of emulated kernels; ``defines``:
    (macro, value) pairs, kernels.cu's tuning macros."""
    lib = _LIB.get(defines)
    if lib is not None:
        return lib
    names = cuda_source.kernel_names()
    cases = "\n".join(f"    case {i}: jk_emu::launch(&{n}, grid, block, args); break;" for i, n in enumerate(names))
    macros = "".join(f"#define {m} {v}\n" for m, v in defines)
    src = (f"#define JK_HOST_EMULATION\n{macros}{cuda_source.instantiation_source(names)}\n"
           "thread_local jk_dim3 blockIdx, threadIdx, blockDim;\n"
           'extern "C" int jk_launch(int id, unsigned grid, unsigned block, void** args) {\n'
           f"  switch (id) {{\n{cases}\n    default: return -1;\n  }}\n  return 0;\n}}\n")
    lib = _LIB[defines] = _build("emu", src, ("jk_math.h", "jk_noise.h", "jk_secagg.h", "cuda/kernels.cu",
                                              "cuda/emulate.h"))
    lib.jk_launch.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return lib


_GENERATED: dict = {}


def generated_library(name: str, body: str):
    """A generated kernel (cuda_source.robust_kernel) under the host emulation, built once per source."""
    lib = _GENERATED.get(body)
    if lib is None:
        d = cuda_source.source_dir()
        src = ("#define JK_HOST_EMULATION\n"
               f'#include "{os.path.join(d, "cuda", "emulate.h")}"\n#include "{os.path.join(d, "jk_math.h")}"\n'
               f"{body}thread_local jk_dim3 blockIdx, threadIdx, blockDim;\n"
               'extern "C" int jk_launch(unsigned grid, unsigned block, void** args) {\n'
               f"  jk_emu::launch(&{name}, grid, block, args);\n  return 0;\n}}\n")
        lib = _GENERATED[body] = _build("gen", src, ("jk_math.h", "cuda/emulate.h"))
        lib.jk_launch.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
    return lib


_CTYPE = {np.dtype(np.uint64): ctypes.c_uint64, np.dtype(np.int64): ctypes.c_int64,
          np.dtype(np.float64): ctypes.c_double, np.dtype(np.int32): ctypes.c_int32,
          np.dtype(np.uint32): ctypes.c_uint32}


class Stream:
    def __init__(self, rt, name):
        self.rt, self.name, self.ops = rt, name, deque()
        self.s = self  # (as CupyRuntime's streams hold CuPy's: what CUDA events record on)
        rt.streams.append(self)

    def wait(self, ev) -> None:
        gen = ev.gen
        self.ops.append(("wait", lambda: ev.done >= gen, None))

    def synchronize(self) -> None:
        self.rt.run_until(lambda: not self.ops)


class Event:
    def __init__(self, rt):
        self.rt, self.gen, self.done = rt, 0, 0

    def record(self, stream) -> None:
        self.gen += 1
        gen = self.gen

        def mark():
            self.done = max(self.done, gen)
        stream.ops.append(("record", None, mark))

    def synchronize(self) -> None:
        gen = self.gen
        self.rt.run_until(lambda: self.done >= gen)


class HostRuntime:
    """The CUDA runtime interface on the CPU: memory is numpy, kernels are emulated, streams replay lazily."""

    name = "host-shim"
    warp_size = 1  # the emulation's warps are one thread (csrc/cuda/emulate.h)
    sm_count = 2

    def device_id(self) -> int:
        """One emulated device."""
        return 0

    def __init__(self, seed: int = 0, defines: dict | None = None):
        self.lib = emulation_library(tuple(sorted((defines or {}).items())))
        self.index = {n: i for i, n in enumerate(cuda_source.kernel_names())}
        self.rng = np.random.default_rng(seed)
        self.streams: list = []
        self.default = Stream(self, "compute")
        self.pinned_ranges: list = []
        self.log: list = []  # (op, stream) in execution order
        self.max_overlap = 0  # most copies queued at once while a launch was queued (pipelining happened)

    # memory
    def empty(self, n, dtype):
        return aligned_empty(n, dtype)

    def zeros(self, n, dtype):
        a = aligned_empty(n, dtype)
        a[...] = 0
        return a

    def upload(self, a):
        return aligned_copy(a)

    def download(self, a):
        self.default.synchronize()
        return np.array(a, copy=True)

    @staticmethod
    def ptr(a) -> int:
        return a.ctypes.data

    def pinned(self, nbytes):
        a = aligned_empty(nbytes, np.uint8, 4096)  # (page-locked memory comes in pages)
        self.pin(a)
        return a

    def pin(self, a):
        """Mark a host array as pinned (as cudaHostRegister would)."""
        self.pinned_ranges.append((a.ctypes.data, a.ctypes.data + a.nbytes, a))
        return a

    def is_pinned(self, addr) -> bool:
        return any(lo <= addr < hi for lo, hi, _ in self.pinned_ranges)

    # streams
    def current_stream(self):
        return self.default

    def stream(self):
        return Stream(self, f"s{len(self.streams)}")

    def event(self):
        return Event(self)

    def h2d_async(self, dst, src, nbytes, stream):
        stream.ops.append(("copy", None, lambda: ctypes.memmove(dst, src, nbytes)))
        self._note_overlap()

    def launch(self, name, grid, args, stream):
        if not grid:
            return
        vals = [_CTYPE[np.asarray(a).dtype](a.item()) for a in args]
        argv = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])
        idx = self.index[name]

        def run():
            rc = self.lib.jk_launch(idx, grid, cuda_source.BLOCK, argv)
            assert rc == 0, name
            del vals[:]
        stream.ops.append(("launch", None, run))
        self._note_overlap()

    def launch_generated(self, name, body, grid, args, stream):
        if not grid:
            return
        lib = generated_library(name, body)
        vals = [_CTYPE[np.asarray(a).dtype](a.item()) for a in args]
        argv = (ctypes.c_void_p * len(vals))(*[ctypes.addressof(v) for v in vals])

        def run():
            assert lib.jk_launch(grid, cuda_source.BLOCK, argv) == 0, name
            del vals[:]
        stream.ops.append(("launch", None, run))
        self._note_overlap()

    def _note_overlap(self):
        copies = sum(op[0] == "copy" for s in self.streams for op in s.ops)
        launches = sum(op[0] == "launch" for s in self.streams for op in s.ops)
        if launches:
            self.max_overlap = max(self.max_overlap, copies)

    # the scheduler: any stream whose head op may run, chosen at random
    def run_until(self, done):
        while not done():
            ready = [s for s in self.streams if s.ops and (s.ops[0][1] is None or s.ops[0][1]())]
            if not ready:
                raise RuntimeError("deadlock: every queued op waits for an event that no stream will record")
            s = ready[self.rng.integers(len(ready))]
            kind, _, fn = s.ops.popleft()
            if fn is not None:
                fn()
            self.log.append((kind, s.name))
