"""The CUDA source of the GPU backend: where it is, which kernels it instantiates, and how it is compiled.

One list of kernel names (NVRTC name expressions) serves the three compilers that see ``csrc/cuda/kernels.cu``:
NVRTC through CuPy (the backend), nvcc (a test compiles the same names for sm_80 and sm_90) and g++ (the host
emulation runs the same kernels' grids as loops on the CPU). ``--fmad=false`` keeps multiply-adds in two roundings,
as numpy does, and ``--ftz=false`` keeps subnormals; without them the GPU would not match the reference bit for bit.
"""

from __future__ import annotations

import os
from functools import lru_cache

C_TYPES = {"float64": "double", "float32": "float", "float16": "jk::f16", "bfloat16": "jk::bf16", "int8": "int8_t"}
ACC_TYPES = ("float32", "float64")
IN_TYPES = ("float64", "float32", "float16", "bfloat16", "int8")
OUT_TYPES = ("float64", "float32", "float16", "bfloat16")

NVRTC_OPTIONS = ("--std=c++17", "--fmad=false", "--ftz=false", "--prec-div=true", "--prec-sqrt=true")
"""Options handed to CuPy's RawModule (it adds the architecture and its include path for cuda_fp16.h): IEEE
rounding, no contraction, subnormals kept (the defaults, spelled out so that no caller-wide setting changes them)."""

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
    return tuple(names)


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
    """The source text handed to NVRTC: kernels.cu, with jk_math.h inlined (NVRTC resolves no relative includes
    from a string, and one self-contained text is what CuPy's cache keys on)."""
    d = source_dir()
    with open(os.path.join(d, "cuda", "kernels.cu")) as f:
        text = f.read()
    with open(os.path.join(d, "jk_math.h")) as f:
        header = f.read()
    inc = '#include "../jk_math.h"'
    if inc not in text:
        raise RuntimeError(f"{kernel_path()} no longer includes {inc}")
    return text.replace(inc, header.replace("#pragma once", ""), 1)


def instantiation_source(names=None) -> str:
    """A translation unit that instantiates ``names`` (default: all) by taking their addresses: what nvcc and g++
    compile in the tests, so that they check exactly the kernels the backend asks NVRTC for."""
    names = kernel_names() if names is None else names
    body = ",\n".join(f"  (void*)&{n}" for n in names)
    return f'#include "{kernel_path()}"\nvoid* jk_kernel_table[] = {{\n{body}\n}};\n'
