"""Device-resident arrays: CuPy arrays and torch CUDA tensors, read in place by the GPU backend.

A :class:`DeviceLeaf` is one leaf in GPU memory: a C-contiguous CuPy view of its bytes (bf16, which CuPy has no
dtype for, is viewed as uint16) and its true dtype. torch tensors come in through DLPack (``cupy.from_dlpack``,
which makes CuPy's current stream wait for the producer's stream), CuPy arrays as they are. Nothing here imports
CuPy unless a device array is actually seen, so ``import jitkernels`` works on machines without it.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import numpy as np

from .dtypes import Quantized, bfloat16, np_dtype


def _cupy():
    return sys.modules.get("cupy")


def is_device_array(x) -> bool:
    """A CuPy array or a torch tensor on a CUDA device."""
    cp = _cupy()
    if cp is not None and isinstance(x, cp.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor) and x.device.type == "cuda"


def gpu_of(x) -> int:
    """The GPU that holds a device array: a CuPy array's device, a torch CUDA tensor's index."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.device.index if x.device.index is not None else torch.cuda.current_device()
    return int(x.device.id)


def on_gpu_of(a):
    """A context under which CuPy works on the GPU that holds ``a``: its allocations and copies go there
    (``ndarray.copy()`` copies onto the current device, which may be another); a no-op for a host array."""
    cp = _cupy()
    return a.device if cp is not None and isinstance(a, cp.ndarray) else contextlib.nullcontext()


def array_module(a):
    """The array module of ``a``: CuPy for a CuPy array, else numpy (``cupy.get_array_module`` without importing
    CuPy where no device array was ever made)."""
    cp = _cupy()
    return cp if cp is not None and isinstance(a, cp.ndarray) else np


@dataclass(frozen=True, eq=False)
class DeviceLeaf:
    """One leaf in GPU memory: ``array`` holds its bytes (C-contiguous; bf16 as uint16), ``dtype`` its dtype."""

    array: object
    dtype: np.dtype

    @property
    def shape(self):
        return tuple(self.array.shape)

    @property
    def size(self) -> int:
        return int(self.array.size)

    @property
    def nbytes(self) -> int:
        return int(self.array.nbytes)

    @property
    def ptr(self) -> int:
        return int(self.array.data.ptr) if self.size else 0


def aligned(a) -> bool:
    """``a``'s data on its elements' alignment, host or GPU (CuPy has no such flag, and a view of a byte buffer at an
    odd offset is not: the kernels read leaves through typed pointers, and a GPU faults on a misaligned load)."""
    flag = getattr(a.flags, "aligned", None)
    return bool(flag) if flag is not None else (not a.size or int(a.data.ptr) % a.itemsize == 0)


def realigned(a):
    """A copy of the C-contiguous ``a`` on its elements' alignment, copied byte by byte: an element-wise copy (CuPy's
    ``copy()``) reads a misaligned array through typed pointers, the load it is meant to avoid."""
    return a.reshape(-1).view(np.uint8).copy().view(a.dtype).reshape(a.shape)


def device_leaf(x, *, copy: bool = True) -> DeviceLeaf:
    """The :class:`DeviceLeaf` of a CuPy array or torch CUDA tensor (a device copy only when it is strided or
    misaligned; ``copy=False``: never, for an output the caller checks)."""
    import cupy as cp

    dtype = None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.is_neg() or x.is_conj():  # (DLPack exports the memory without the lazy negation: read with the wrong
            # sign, where the host path's numpy() refuses such a view)
            raise TypeError("a torch tensor with its negative or conjugate bit set (a lazy view, e.g. z.conj().imag):"
                            " its memory holds other values; resolve_neg() / resolve_conj() it first")
        t = x.detach()
        if t.dtype == torch.bfloat16:
            t, dtype = t.view(torch.int16), bfloat16
        a = cp.from_dlpack(t).reshape(tuple(t.shape))  # a 0-d tensor can come through DLPack as shape (1,)
    else:
        a = x
    if dtype is None:
        dtype = np.dtype(a.dtype)  # (CuPy 14 has bfloat16, as ml_dtypes' type)
    if dtype == bfloat16 and a.dtype != np.uint16:  # its bits: the kernels and copies never compute in it
        a = a.view(np.uint16)
    if copy and not a.flags.c_contiguous:
        a = cp.ascontiguousarray(a)  # (not for 0-d arrays, which it would make 1-d, as numpy's does)
    if copy and not aligned(a):
        a = realigned(a)
    return DeviceLeaf(a, dtype)


def empty_leaf(shape, dtype_name: str) -> DeviceLeaf:
    """An uninitialized device leaf (a finalize output)."""
    import cupy as cp

    dt = np_dtype(dtype_name)
    return DeviceLeaf(cp.empty(shape, np.uint16 if dt == bfloat16 else dt), dt)


def to_host(a):
    """numpy copy of a device array (or the array itself when it is already on the host); a quantized leaf's values
    and scales."""
    if isinstance(a, Quantized):
        return a.to_host()
    if isinstance(a, DeviceLeaf):
        h = a.array.get()
        return h.view(bfloat16) if a.dtype == bfloat16 else h
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a


def place(x, on_device: bool):
    """``x`` in GPU memory (uploaded if needed) or in host memory (downloaded if needed)."""
    if not on_device:
        return to_host(x)
    import cupy as cp

    return cp.asarray(x)


def leaf_to(leaf: DeviceLeaf, array_type: str):
    """A finalized device leaf as the template's array type: torch CUDA or CuPy stay on the device (no copy),
    numpy and torch CPU templates get host arrays."""
    if array_type == "cupy":  # (a bf16 CuPy template: CuPy 14 reads ml_dtypes' bfloat16)
        return leaf.array.view(bfloat16) if leaf.dtype == bfloat16 else leaf.array
    if array_type == "torch_cuda":
        import torch

        if leaf.dtype == bfloat16:  # torch reads int16 through DLPack everywhere; uint16 only in recent releases
            t = torch.from_dlpack(leaf.array.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_dlpack(leaf.array)
        return t.reshape(leaf.shape)  # a 0-d array can come through DLPack as shape (1,)
    h = to_host(leaf)
    if array_type == "torch":
        from .dtypes import numpy_to_torch

        return numpy_to_torch(h)
    return h


def leaf_to_cupy(a: np.ndarray):
    """A host result uploaded for a CuPy template (a CPU backend finalized it)."""
    import cupy as cp

    return cp.asarray(a)


def zeros(n: int, dtype, on_device: bool):
    if not on_device:
        return np.zeros(n, dtype)
    import cupy as cp

    return cp.zeros(n, dtype)
