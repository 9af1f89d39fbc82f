"""The CUDA source of the GPU backend: where it is, which kernels it instantiates, and how it is compiled.

One list of kernel names (NVRTC name expressions) serves the three compilers that see ``csrc/cuda/kernels.cu``:
NVRTC through CuPy (the backend), nvcc (a test compiles the same names for sm_80 and sm_90) and g++ (the host
emulation runs the same kernels' grids as loops on the CPU). ``--fmad=false`` keeps multiply-adds in two roundings,
as numpy does, and ``--ftz=false`` keeps subnormals; without them the GPU would not match the reference bit for bit.
"""

from __future__ import annotations

import glob
import os
from functools import lru_cache

C_TYPES = {"float64": "double", "float32": "float", "float16": "jk::f16", "bfloat16": "jk::bf16", "int8": "int8_t"}
ACC_TYPES = ("float32", "float64")
IN_TYPES = ("float64", "float32", "float16", "bfloat16", "int8")
OUT_TYPES = ("float64", "float32", "float16", "bfloat16")

NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
"""IEEE rounding, no contraction, subnormals kept. We call NVRTC ourselves (:func:`compile_nvrtc`) rather than
through ``cupy.RawModule``: CuPy appends ``-ftz=true`` to every compile (cupy/cuda/compiler.py,
``_compile_with_cache_cuda``), which flushed subnormal inputs and sums to zero on an H100 and broke bit-exactness."""

BLOCK = 256
"""Threads per block: every kernel runs one block per work item (batch.CHUNK elements)."""


def _b(x: bool) -> str:
    return "true" if x else "false"


def fold_name(acc: str, in_dtype: str, base: bool) -> str:
    return f"jkcuda::fold_rows<{C_TYPES[acc]}, {C_TYPES[in_dtype]}, {_b(base)}, {_b(in_dtype == 'int8')}>"


def binned_name(in_dtype: str, base: bool) -> str:
    return f"jkcuda::fold_binned_rows<{C_TYPES[in_dtype]}, {_b(base)}, {_b(in_dtype == 'int8')}>"


def stats_name(acc: str, in_dtype: str, base: bool) -> str:
    return f"jkcuda::stats_rows<{C_TYPES[acc]}, {C_TYPES[in_dtype]}, {_b(base)}, {_b(in_dtype == 'int8')}>"


def finalize_name(acc: str, out_dtype: str, base: bool) -> str:
    return f"jkcuda::finalize_rows<{C_TYPES[acc]}, {C_TYPES[out_dtype]}, {_b(base)}>"


def step_name(acc: str, out_dtype: str) -> str:
    return f"jkcuda::step_rows<{C_TYPES[acc]}, {C_TYPES[out_dtype]}>"


def noise_name(acc: str) -> str:
    return f"jkcuda::add_noise_rows<{C_TYPES[acc]}>"


SECAGG_C_TYPES = {"uint32": "unsigned int", "uint64": "unsigned long long"}


def modsum_name(acc: str) -> str:
    return f"jkcuda::modsum_rows<{SECAGG_C_TYPES[acc]}>"


GRAM_TILES = (4, 8)
"""Rows per group (T) of the Gram kernel's pair tiles: T^2 + T float64 accumulators per thread."""


def gram_name(in_dtype: str, ref_dtype: str, tile: int) -> str:
    return f"jkcuda::gram_tiles<{C_TYPES[in_dtype]}, {C_TYPES[ref_dtype]}, {tile}>"


def combine_name(in_dtype: str, base_dtype: str) -> str:
    return f"jkcuda::combine_rows<{C_TYPES[in_dtype]}, {C_TYPES[base_dtype]}>"


@lru_cache(maxsize=None)
def kernel_names() -> tuple:
    """Every kernel the backend may launch, compiled together once per device."""
    names = []
    for base in (False, True):
        for t in IN_TYPES:
            names += [fold_name(a, t, base) for a in ACC_TYPES]
            names.append(binned_name(t, base))
            names += [stats_name(a, t, base) for a in ACC_TYPES]
        for o in OUT_TYPES:
            names += [finalize_name(a, o, base) for a in ACC_TYPES]
    names += [step_name(a, o) for a in ACC_TYPES for o in OUT_TYPES]
    names += [noise_name(a) for a in ACC_TYPES]
    names += [modsum_name(a) for a in SECAGG_C_TYPES]
    names += [gram_name(x, r, t) for x in ACC_TYPES for r in ACC_TYPES for t in GRAM_TILES]
    names += [combine_name(x, b) for x in ACC_TYPES for b in ACC_TYPES]
    return tuple(names)


ROBUST_MAX_K = 128
"""Largest k of the generated robust kernels: the k values of a coordinate live in one thread's registers (255 per
thread), and the unrolled network grows as k log^2 k."""
BULYAN_MAX_K = 64
"""Largest theta of the generated Bulyan kernel (mode 2): its full sort and float64 window spilled at 128 (sm_80)."""


def robust_kernel(k: int, code: int, mode: int, lo: int = 0, hi: int = 0) -> tuple:
    """(name, CUDA source) of the coordinate-wise robust kernel for k rows of input code ``code``
    (jitkernels.robust_coord.CODES): the median (mode 0), the trimmed mean of ranks [lo, hi) (mode 1), or Bulyan's
    coordinate step keeping beta = ``lo`` values (mode 2). Generated per k, as numba's register kernels are, from the
    same network (robust_coord.network, depth-first); the math per coordinate is jk_math.h's (order2, median_mid;
    the trimmed mean sums in float64 in ascending rank order, from +0.0) and, for Bulyan, numba's ``_bulyan_nb``
    (robust_gram): in float64, the median m (0.5 a + 0.5 b for even k), the start of the beta-window closest to m
    counted as the number of s with v[s + beta] - m < m - v[s], the window summed in ascending order from +0.0 with
    the other ranks adding 0.0, divided by beta. One thread per coordinate, ``extern "C"`` (no name lowering):
    ``name(const In* x, long long ld, long long n, float* out)``, row j of the slab at ``x + j*ld``. Reads
    k*itemsize(In) bytes and writes 4 per coordinate; the loads of a row are coalesced across the warp. The source
    needs jk_math.h before it (NVRTC: :func:`header_source` ("jk_math.h"); nvcc and the host emulation include it)."""
    from ..robust_coord import F16, F32, median_ranks, network

    top = BULYAN_MAX_K if mode == 2 else ROBUST_MAX_K
    if not 1 <= k <= top:
        raise ValueError(f"the GPU robust kernels take 1 <= k <= {top} updates here, got {k}")
    r1, r2 = median_ranks(k)
    ci, cj, _ = network(k, r1, r2 + 1, True) if mode == 0 else network(k, lo, hi, True) if mode == 1 else \
        network(k, 0, k, True)
    ctype = "float" if code == F32 else "jk::f16" if code == F16 else "jk::bf16"
    what = "med" if mode == 0 else f"trim{lo}_{hi}" if mode == 1 else f"bulyan{lo}"
    name = f"jk_rc_{what}_k{k}_{ctype.replace('jk::', '')}"
    body = [f'extern "C" __global__ void {name}(const {ctype}* __restrict__ x, long long ld, long long n,',
            "                                  float* __restrict__ out) {",
            "  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
            "  if (i >= n) return;"]
    body += [f"  float v{j} = jk::widen(x[{j} * ld + i]);" for j in range(k)]
    body += [f"  jk::order2(v{a}, v{b});" for a, b in zip(ci.tolist(), cj.tolist())]
    if mode == 0:
        body.append(f"  out[i] = jk::median_mid(v{r1}, v{r2});")
    elif mode == 1:
        body.append("  double s = 0.0;")
        body += [f"  s = s + (double)v{j};" for j in range(lo, hi)]
        body.append(f"  out[i] = (float)(s / {float(hi - lo)!r});")
    else:
        beta = lo
        if not 1 <= beta <= k:
            raise ValueError(f"Bulyan keeps 1 <= beta <= k values, got beta={beta} of k={k}")
        body.append(f"  const double m = (double)v{r1};" if r1 == r2 else
                    f"  const double m = 0.5 * (double)v{r1} + 0.5 * (double)v{r2};")
        body.append("  int c = 0;")
        body += [f"  c += ((double)v{s_ + beta} - m < m - (double)v{s_}) ? 1 : 0;" for s_ in range(k - beta)]
        body.append("  double s = 0.0;")
        body += [f"  s = s + ((c <= {j} && {j} < c + {beta}) ? (double)v{j} : 0.0);" for j in range(k)]
        body.append(f"  out[i] = (float)(s / {float(beta)!r});")
    body.append("}")
    return name, "\n".join(body) + "\n"


def source_dir() -> str:
    """Folder holding ``cuda/kernels.cu`` and ``jk_math.h``: the installed package data, else the source tree."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.exists(os.path.join(d, "cuda", "kernels.cu")):
            return d
    raise FileNotFoundError("CUDA source not found: neither jitkernels/_csrc nor csrc/ holds cuda/kernels.cu")


def kernel_path() -> str:
    return os.path.join(source_dir(), "cuda", "kernels.cu")


def source() -> str:
    """The source text handed to NVRTC: kernels.cu, with the csrc/ headers inlined (NVRTC resolves no
    relative includes from a string, and one self-contained text is what the cubin cache keys on)."""
    d = source_dir()
    with open(os.path.join(d, "cuda", "kernels.cu")) as f:
        text = f.read()
    for name, nested in (("jk_math.h", None), ("jk_noise.h", '#include "jk_math.h"'),
                         ("jk_secagg.h", '#include "jk_math.h"')):
        with open(os.path.join(d, name)) as f:
            header = f.read().replace("#pragma once", "")
        if nested is not None:  # already inlined above
            header = header.replace(nested, "", 1)
        inc = f'#include "../{name}"'
        if inc not in text:
            raise RuntimeError(f"{kernel_path()} no longer includes {inc}")
        text = text.replace(inc, header, 1)
    return text


def instantiation_source(names=None) -> str:
    """A translation unit that instantiates ``names`` (default: all) by taking their addresses: what nvcc and g++
    compile in the tests, so that they check exactly the kernels the backend asks NVRTC for."""
    names = kernel_names() if names is None else names
    body = ",\n".join(f"  (void*)&{n}" for n in names)
    return f'#include "{kernel_path()}"\nvoid* jk_kernel_table[] = {{\n{body}\n}};\n'


def include_dirs() -> list:
    """The first folder that holds cuda_fp16.h (NVRTC's kernels include it): CUDA_PATH / CUDA_HOME, the usual
    install folders, then the headers that pip's CUDA packages ship."""
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    cands = [os.path.join(r, "include") for r in roots if r]
    try:
        import nvidia

        for base in nvidia.__path__:
            cands += sorted(glob.glob(os.path.join(base, "*", "include")), reverse=True)
    except ImportError:
        pass
    for d in cands:
        if os.path.exists(os.path.join(d, "cuda_fp16.h")):
            return [d]
    raise FileNotFoundError("no CUDA include folder with cuda_fp16.h (set CUDA_PATH)")


NVRTC_PRELUDE = ("typedef signed char int8_t;\ntypedef unsigned char uint8_t;\ntypedef unsigned short uint16_t;\n"
                 "typedef unsigned int uint32_t;\n#include <cuda_fp16.h>\n")
"""What a header of csrc/ needs before it under NVRTC (no <stdint.h> there; jk_math.h's f16 math wants cuda_fp16)."""


def header_source(name: str) -> str:
    """A csrc/ header (``jk_noise.h``, ``jk_secagg.h``) as one NVRTC-ready text: the prelude, then the header with
    jk_math.h inlined. Append kernels that use it and hand the text to :func:`compile_nvrtc`."""
    d = source_dir()
    with open(os.path.join(d, "jk_math.h")) as f:
        math_h = f.read().replace("#pragma once", "")
    with open(os.path.join(d, name)) as f:
        text = f.read().replace("#pragma once", "")
    return NVRTC_PRELUDE + text.replace('#include "jk_math.h"', math_h, 1)


def compile_nvrtc(arch: str, names=None, text: str | None = None, defines: dict | None = None) -> tuple:
    """Compile ``text`` (default :func:`source`) with NVRTC (``cuda-bindings``) for ``arch`` ("sm_90": a cubin;
    "compute_90": PTX), with exactly :data:`NVRTC_OPTIONS` (plus ``-Dname=value`` per ``defines``: the kernels'
    tuning macros, which only the benchmark's variant sweep sets). Returns (image bytes, {name expression: lowered
    name})."""
    from cuda.bindings import nvrtc

    names = (kernel_names() if text is None else ()) if names is None else names
    text = source() if text is None else text

    def check(res, what):
        err = res[0] if isinstance(res, tuple) else res
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC {what} failed: {err}")
        return res[1:] if isinstance(res, tuple) and len(res) > 1 else None

    (prog,) = check(nvrtc.nvrtcCreateProgram(text.encode(), b"jitkernels.cu", 0, [], []), "create")
    try:
        for n in names:
            check(nvrtc.nvrtcAddNameExpression(prog, n.encode()), "name expression")
        opts = [o.encode() for o in NVRTC_OPTIONS] + [f"--gpu-architecture={arch}".encode()] + [
            f"-D{m}={v}".encode() for m, v in (defines or {}).items()] + [
            f"-I{d}".encode() for d in include_dirs()]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if res[0] != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC could not compile:\n{log.decode(errors='replace')}")
        if arch.startswith("sm_"):
            (size,) = check(nvrtc.nvrtcGetCUBINSize(prog), "cubin size")
            image = b" " * size
            check(nvrtc.nvrtcGetCUBIN(prog, image), "cubin")
        else:
            (size,) = check(nvrtc.nvrtcGetPTXSize(prog), "ptx size")
            image = b" " * size
            check(nvrtc.nvrtcGetPTX(prog, image), "ptx")
        lowered = {}
        for n in names:
            (low,) = check(nvrtc.nvrtcGetLoweredName(prog, n.encode()), "lowered name")
            lowered[n] = low.decode() if isinstance(low, bytes) else str(low)
        return image, lowered
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def cache_key(arch: str) -> str:
    """Source, options, architecture, NVRTC version and the CUDA headers the source includes: what a compiled image
    depends on (headers upgraded under the same NVRTC reused an image built against the old ones)."""
    import hashlib

    from cuda.bindings import nvrtc

    h = hashlib.sha256(source().encode())
    h.update(repr((NVRTC_OPTIONS, arch, nvrtc.nvrtcVersion()[1:], kernel_names())).encode())
    folder = include_dirs()[0]
    for name in ("cuda_fp16.h", "cuda_fp16.hpp"):  # (what the prelude's #include <cuda_fp16.h> reads)
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:24]
