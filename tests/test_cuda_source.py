"""The CUDA source compiles, without a GPU, with the two compilers a GPU machine uses.

* nvcc, for sm_80 and sm_90, with ``-Xptxas -warn-spills``: every kernel the backend may launch (the same name
  list, ``cuda_source.kernel_names()``), instantiated by taking its address.
* NVRTC (``nvidia-cuda-nvrtc`` + ``cuda-bindings`` from PyPI; NVRTC needs no device), through the very function the
  backend compiles with, and every name must resolve to a lowered name.

The kernels' element-wise math is csrc/jk_math.h, shared with the C++ backend whose tests check it against numpy;
the host emulation (test_gpu_shim.py) runs these kernels' grids against numpy too.
"""

import shutil
import subprocess

import pytest

from jitkernels.backends import cuda_source

NVCC = shutil.which("nvcc")


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


@pytest.mark.parametrize("arch", ["compute_90", "sm_80"])
def test_cuda_kernels_compile_with_nvrtc_as_the_backend_does(arch, nvrtc):
    """The backend's own compile function (the one CupyRuntime calls), so the exact source, options and names.
    The PTX must hold no flush-to-zero and no fused multiply-add: either would break bit-exactness with numpy
    (CuPy's RawModule would add -ftz=true, which is why the backend compiles with NVRTC itself). The one exception
    is the Gram kernel's explicit fma (a reduction held to a tolerance, not to numpy's bits)."""
    image, lowered = cuda_source.compile_nvrtc(arch)
    assert set(lowered) == set(cuda_source.kernel_names()) and all(v.startswith("_Z") for v in lowered.values())
    if arch.startswith("compute_"):
        ptx = bytes(image).decode()
        entries = ptx.split(".entry ")[1:]
        assert len(entries) == len(lowered) and ".ftz" not in ptx
        fused = {e.split("(", 1)[0] for e in entries if "fma.rn" in e}
        assert fused == {lowered[n] for n in lowered if "gram_tiles" in n}
        assert "fma.rn.f32" not in ptx
        assert "mul.rn.f32" in ptx and "add.rn.f32" in ptx  # rounded separately, as numpy does
    else:
        assert bytes(image[:4]) == b"\x7fELF"  # a cubin


def test_tuning_macros_compile_and_are_checked(nvrtc):
    """The benchmark's variant sweeps compile kernels.cu with other JK_FOLD_* / JK_GRAM_COLUMNS values; a value
    that would make a loop spin (no update, or no column, per step) is refused at compile time."""
    name = cuda_source.fold_name("float32", "bfloat16", False)
    _, lowered = cuda_source.compile_nvrtc("compute_90", [name], defines={"JK_FOLD_UPDATES": 3, "JK_FOLD_QUADS": 1})
    assert list(lowered) == [name]
    with pytest.raises(RuntimeError, match="at least one quad and one update"):
        cuda_source.compile_nvrtc("compute_90", [name], defines={"JK_FOLD_UPDATES": 0})
    gram = [cuda_source.gram_name("float32", "float64", t) for t in cuda_source.GRAM_TILES]
    _, lowered = cuda_source.compile_nvrtc("compute_90", gram, defines={"JK_GRAM_COLUMNS": 2})
    assert set(lowered) == set(gram)
    with pytest.raises(RuntimeError, match="at least one column per step"):
        cuda_source.compile_nvrtc("compute_90", gram, defines={"JK_GRAM_COLUMNS": 0})


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_gram_kernel_with_two_columns_per_step_does_not_spill(tmp_path):
    """JK_GRAM_COLUMNS = 2, the benchmark's next candidate, fits the registers of both tile sizes (sm_90)."""
    names = [cuda_source.gram_name(x, r, t) for x in cuda_source.ACC_TYPES for r in cuda_source.ACC_TYPES
             for t in cuda_source.GRAM_TILES]
    src = tmp_path / "gram.cu"
    src.write_text(cuda_source.instantiation_source(names))
    cmd = [NVCC, *cuda_source.NVRTC_OPTIONS, "-DJK_GRAM_COLUMNS=2", "-Xptxas", "-warn-spills", "-Werror",
           "all-warnings", "-gencode=arch=compute_90,code=sm_90", "-c", str(src), "-o", str(tmp_path / "gram.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr


def test_the_source_is_self_contained_for_nvrtc():
    text = cuda_source.source()
    assert '#include "../jk_math.h"' not in text and "namespace jk {" in text
    assert set(cuda_source.kernel_names()) and len(set(cuda_source.kernel_names())) == len(cuda_source.kernel_names())


ROBUST_CASES = [(10, 1, 0), (50, 1, 1), (50, 3, 0), (cuda_source.ROBUST_MAX_K, 2, 1), (9, 1, 2),
                (cuda_source.BULYAN_MAX_K, 3, 2)]  # (k, code, mode: 0 median, 1 trimmed mean, 2 Bulyan)


def _robust_sources():
    from jitkernels import robust_coord as rc

    for k, code, mode in ROBUST_CASES:
        c = rc.trim_count(k, 0.2)
        yield cuda_source.robust_kernel(k, code, mode, c, k - c)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_generated_robust_kernels_compile_with_nvcc_without_spills(tmp_path, arch):
    """The per-k robust kernels hold k values in registers: up to ROBUST_MAX_K they must not spill."""
    src = tmp_path / "robust.cu"
    body = "".join(b for _, b in _robust_sources())
    src.write_text(f'#include <cuda_fp16.h>\n#include "{cuda_source.source_dir()}/jk_math.h"\n{body}')
    cmd = [NVCC, *cuda_source.NVRTC_OPTIONS, "-Xptxas", "-warn-spills", "-Werror", "all-warnings",
           f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c", str(src), "-o", str(tmp_path / "robust.o")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "spill" not in out.stderr.lower(), out.stderr


def test_generated_robust_kernels_compile_with_nvrtc(nvrtc):
    """The text CupyRuntime.launch_generated hands NVRTC: jk_math.h, then the generated kernel."""
    for name, body in _robust_sources():
        ptx, _ = cuda_source.compile_nvrtc("compute_90", names=(), text=cuda_source.header_source("jk_math.h") + body)
        text = bytes(ptx).decode()
        assert f".entry {name}(" in text and ".ftz" not in text and "fma.rn" not in text


def test_a_machine_that_cannot_compile_the_kernels_has_no_gpu_backend(monkeypatch):
    """cuda-bindings loads libnvrtc at its first call, and the kernels include cuda_fp16.h: a driver-only machine
    (CuPy and a GPU, no NVRTC or headers) reported the backend available, so "auto" chose it, and the first fold
    failed. Both are checked when the backend is asked for, and their absence is the reason it gives."""
    import sys
    import types

    pytest.importorskip("cuda.bindings.nvrtc")
    from jitkernels.backends import cupy_backend

    cupy = types.ModuleType("cupy")  # a CuPy that sees one device
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(cupy_backend, "_runtime", None)

    def no_headers():
        raise FileNotFoundError("no CUDA include folder with cuda_fp16.h (set CUDA_PATH)")

    monkeypatch.setattr(cuda_source, "include_dirs", no_headers)
    why = cupy_backend.available()
    assert isinstance(why, str) and "NVRTC cannot compile the kernels here" in why and "cuda_fp16.h" in why


def test_the_kernel_cache_key_follows_the_cuda_headers(nvrtc, tmp_path, monkeypatch):
    """The cached image is keyed by the headers the source includes too: CUDA headers upgraded under the same NVRTC
    reused an image compiled against the old ones."""
    (tmp_path / "cuda_fp16.h").write_text("// headers of one CUDA release\n")
    monkeypatch.setattr(cuda_source, "include_dirs", lambda: [str(tmp_path)])
    before = cuda_source.cache_key("sm_90")
    assert cuda_source.cache_key("sm_90") == before
    (tmp_path / "cuda_fp16.hpp").write_text("// and its implementation, of another\n")
    assert cuda_source.cache_key("sm_90") != before
