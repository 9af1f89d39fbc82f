"""The CUDA source is compiled by nvcc here (no GPU needed) for sm_80 and sm_90, with the flags the backend uses.

The kernels' element-wise math is csrc/jk_math.h, which the C++ backend shares and the other tests check against
numpy; this test checks that the CUDA side of the header and the launch code compile, without register spills.
"""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "kernels.cu")
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_cuda_kernels_compile_without_spills(tmp_path, arch):
    cmd = [NVCC, "--fmad=false", "-std=c++17", "-DJK_INSTANTIATE_ALL", "-Xptxas", "-warn-spills",
           "-Werror", "all-warnings", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", SOURCE,
           "-o", str(tmp_path / "kernels.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr
