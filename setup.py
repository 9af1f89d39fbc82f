"""Build the private C++ extension jitkernels._core (pybind11 + OpenMP, with a no-OpenMP fallback).

Portable flags only: nothing tuned to the build host. AVX2/F16C code paths are compiled with a target pragma and
chosen at run time.
-ffp-contract=off keeps the compiler from fusing multiply-adds, which would break bit-exactness against numpy.
"""

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup
from setuptools.command.build_py import build_py

CUDA_DATA = ["jk_math.h", "jk_noise.h", "jk_secagg.h", "cuda/kernels.cu", "cuda/emulate.h"]


class build_py_with_cuda(build_py):
    """Ship the CUDA source as package data (jitkernels/_csrc): the GPU backend compiles it with NVRTC at run time,
    once per device. An editable install reads it from csrc/ instead."""

    def run(self):
        super().run()
        for rel in CUDA_DATA:
            dst = os.path.join(self.build_lib, "jitkernels", "_csrc", rel)
            self.mkpath(os.path.dirname(dst))
            self.copy_file(os.path.join("csrc", rel), dst)


def _openmp_flags():
    """(-fopenmp, -fopenmp) if the compiler links OpenMP code, else no flags (the kernels then run serially)."""
    if os.environ.get("JITKERNELS_NO_OPENMP"):
        return [], []
    # the compiler the build uses, which may come with arguments ("ccache g++": one executable name before)
    cc = shlex.split(os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            ok = subprocess.call([*cc, "-fopenmp", src, "-o", os.path.join(d, "t")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) == 0
        except OSError:  # (no such compiler: the build itself will say so)
            ok = False
    if not ok:
        print("jitkernels: OpenMP not available, building the C++ backend single-threaded", file=sys.stderr)
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


omp_compile, omp_link = _openmp_flags()

ext = Pybind11Extension(
    "jitkernels._core",
    ["csrc/kernels.cpp"],
    include_dirs=["csrc"],
    cxx_std=17,
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd", *omp_compile],
    extra_link_args=omp_link,
    depends=["csrc/jk_math.h", "csrc/jk_noise.h", "csrc/jk_robust_coord.h", "csrc/jk_secagg.h", "csrc/kernels.h"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext, "build_py": build_py_with_cuda})
