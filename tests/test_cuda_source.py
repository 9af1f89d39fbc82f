"""The CUDA source compiles, without a GPU, with the two compilers a GPU machine uses.

* nvcc, for sm_80 and sm_90, with ``-Xptxas -warn-spills``: every kernel the backend may launch (the same name
  list, ``cuda_source.kernel_names()``), instantiated by taking its address.
* NVRTC (``nvidia-cuda-nvrtc`` + ``cuda-bindings`` from PyPI; NVRTC needs no device), with the exact source text,
  options and name expressions the backend hands CuPy's RawModule, and every name must resolve to a lowered name.

The kernels' element-wise math is csrc/jk_math.h, shared with the C++ backend whose tests check it against numpy;
the host emulation (test_gpu_shim.py) runs these kernels' grids against numpy too.
"""

import glob
import os
import shutil
import subprocess

import pytest

from jitkernels.backends import cuda_source

NVCC = shutil.which("nvcc")


def _cuda_include():
    roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for r in roots:
        if r and os.path.exists(os.path.join(r, "include", "cuda_fp16.h")):
            return os.path.join(r, "include")
    return None


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_with_nvcc_without_spills(tmp_path, arch):
    src = tmp_path / "all_kernels.cu"
    src.write_text(cuda_source.instantiation_source())
    cmd = [NVCC, *cuda_source.NVRTC_OPTIONS, "-Xptxas", "-warn-spills", "-Werror", "all-warnings",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(src), "-o", str(tmp_path / "kernels.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr


def test_cuda_kernels_compile_with_nvrtc_as_the_backend_asks():
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC check needs nvidia-cuda-nvrtc + cuda-bindings")
    inc = _cuda_include()
    if inc is None:
        pytest.skip("no CUDA include folder with cuda_fp16.h (CuPy supplies it on a GPU machine)")
    err, prog = nvrtc.nvrtcCreateProgram(cuda_source.source().encode(), b"kernels.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    names = cuda_source.kernel_names()
    for n in names:
        nvrtc.nvrtcAddNameExpression(prog, n.encode())
    opts = [o.encode() for o in cuda_source.NVRTC_OPTIONS] + [b"--gpu-architecture=compute_90", f"-I{inc}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, log.decode(errors="replace")
    for n in names:
        err, lowered = nvrtc.nvrtcGetLoweredName(prog, n.encode())
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS and lowered, n
    nvrtc.nvrtcDestroyProgram(prog)


def test_the_source_is_self_contained_for_nvrtc():
    text = cuda_source.source()
    assert '#include "../jk_math.h"' not in text and "namespace jk {" in text
    assert set(cuda_source.kernel_names()) and len(set(cuda_source.kernel_names())) == len(cuda_source.kernel_names())
