import os
import platform

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import jitkernels as jk

# First numba calls compile (or load the cache): no per-example deadline.
settings.register_profile("default", deadline=None, max_examples=40,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=400,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_report_header(config):
    import numba
    from jitkernels import _core
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return [f"jitkernels {jk.__version__}: numpy {np.__version__}, numba {numba.__version__}, "
            f"threads {jk.get_num_threads()}, C++ openmp={_core.openmp} simd={_core.simd}",
            f"cpu: {cpu}; backends: {jk.available_backends()}"]


@pytest.fixture
def nvrtc():
    """cuda_source, where NVRTC can compile here (it needs no GPU: nvidia-cuda-nvrtc + cuda-bindings from PyPI and
    a folder with cuda_fp16.h); else the test skips, saying which is missing."""
    pytest.importorskip("cuda.bindings.nvrtc", reason="NVRTC check needs nvidia-cuda-nvrtc + cuda-bindings")
    from jitkernels.backends import cuda_source
    try:
        cuda_source.include_dirs()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return cuda_source
