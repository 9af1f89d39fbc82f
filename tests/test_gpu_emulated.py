"""test_gpu.py's tests without a GPU: CuPy replaced by fake_cupy (numpy memory behind CuPy's interface), the kernels
by the host emulation of csrc/cuda/kernels.cu, CUDA streams by gpu_shim's lazily replayed queues. What these cover
is the GPU backend's Python: dispatch from the Aggregator, device leaves and results, the staging ring, the device
update store and the robust rules' device paths. test_gpu.py on a GPU covers what only CUDA can show."""

import shutil

import pytest

import fake_cupy
import test_gpu

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")

NOT_HERE = {"test_torch_cuda_tensors_in_and_out": "torch CUDA tensors (DLPack) need a GPU",
            "test_subnormal_inputs_bit_exact": "runs the GPU in a subprocess, which the fake CuPy does not reach"}


@pytest.fixture(autouse=True, scope="module")
def _fake_cupy():
    with fake_cupy.installed():
        yield


for _name in dir(test_gpu):
    if _name.startswith("test_"):
        _test = getattr(test_gpu, _name)
        globals()[_name] = pytest.mark.skip(reason=NOT_HERE[_name])(_test) if _name in NOT_HERE else _test
