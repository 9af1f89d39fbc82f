"""Input dtypes, the bfloat16 bridge between torch and numpy, and quantized (int8 + scale) updates.

numpy has no bfloat16; ``ml_dtypes.bfloat16`` gives it one with the same bits as torch's, so a torch bf16 tensor is
read in place through ``tensor.view(torch.int16).numpy().view(bfloat16)``.
"""

from __future__ import annotations

import contextlib
import operator
import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import BackendUnavailable, InvalidQuantized

bfloat16 = np.dtype(ml_dtypes.bfloat16)

FLOAT_INPUTS = ("float64", "float32", "float16", "bfloat16")
"""Float dtypes a leaf may have. Integer leaves follow the aggregator's ``int_leaves`` rule."""

_NAMES: dict = {}


def native(a: np.ndarray) -> np.ndarray:
    """``a`` in the machine's byte order (a converted copy only where it is not): the kernels read bytes as native
    values."""
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))


def dtype_name(dt) -> str:
    """Canonical name of a numpy dtype ('bfloat16' for ml_dtypes' type). Cached: numpy computes ``dtype.name`` in
    Python, and admission asks for it per leaf (it was a third of a small update's admission time)."""
    try:
        return _NAMES[dt]
    except (KeyError, TypeError):
        pass
    d = np.dtype(dt)
    name = "bfloat16" if d == bfloat16 else d.name
    try:
        _NAMES[dt] = name
    except TypeError:
        pass
    return name


def acc_dtype_name(x) -> str:
    """An accumulator dtype's name, 'float32' or 'float64', else ValueError naming ``x`` (numpy's own "Cannot
    interpret '64' as a data type" named nothing; jk.admit took float16 and blamed the party's weight)."""
    try:
        name = np.dtype(x).name
    except TypeError:
        name = None
    if name not in ("float32", "float64"):
        raise ValueError(f"acc_dtype must be float32 or float64, got {x!r}")
    return name


def np_dtype(name: str) -> np.dtype:
    return bfloat16 if name == "bfloat16" else np.dtype(name)


def is_float_name(name: str) -> bool:
    return name in FLOAT_INPUTS


def is_leaf_dtype_name(name) -> bool:
    """Whether a leaf may have dtype ``name``: a float input, or an integer or bool (the ``int_leaves`` rule). Not
    complex (the imaginary part would be dropped), strings, objects or dates."""
    if name in FLOAT_INPUTS:
        return True
    try:
        return np.dtype(name).kind in "iub"
    except TypeError:
        return False


def bf16_bits_to_float32(bits):
    """float32 values of bfloat16 bits (a uint16 numpy or CuPy array): exact, the bits shifted into the top half."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _values(x) -> tuple:
    """(array, array module) of a Quantized field: a CuPy array for one in GPU memory (a torch CUDA tensor through
    DLPack), else numpy's view of it (torch CPU tensors too). bfloat16, which CuPy holds as its uint16 bits, comes
    back widened to float32 (exact), so that its values, not its bits, are converted."""
    from .device import device_leaf, is_device_array  # (device imports this module)

    if is_device_array(x):
        try:
            import cupy
        except ImportError:
            from .errors import BackendUnavailable

            raise BackendUnavailable("a quantized leaf in GPU memory needs the GPU backend: cupy is not installed "
                                     "(pip install 'jitkernels[gpu]')") from None
        leaf = device_leaf(x)
        return (bf16_bits_to_float32(leaf.array) if leaf.dtype == bfloat16 else leaf.array), cupy
    return (torch_to_numpy(x) if is_torch_tensor(x) else np.asarray(x)), np


def _torch():
    return sys.modules.get("torch")


def is_torch_tensor(x) -> bool:
    torch = _torch()
    return torch is not None and isinstance(x, torch.Tensor)


def torch_to_numpy(t):
    """A numpy view of a CPU tensor's memory (no copy), bf16 included. CUDA tensors are refused here."""
    torch = _torch()
    if t.device.type != "cpu":
        raise TypeError(f"tensor on {t.device}: the CPU backends read host memory" + (
            "; use backend='cupy'" if t.device.type == "cuda" else ""))
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16)
    return t.numpy()


def numpy_to_torch(a):
    """The inverse of :func:`torch_to_numpy` (no copy). Imports torch: a state saved from a torch template is
    finalized in a process that may not have imported it yet (a resumed job, a Ray worker)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"the template's leaves were torch tensors, and torch is not installed here ({e}); "
                          "pip install torch, or rebuild the aggregator from a numpy template") from None
    if a.dtype == bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _block(block) -> int | None:
    """A quantization block size: None (per tensor) or an integer > 0 (InvalidQuantized naming it else; True was a
    block of 1)."""
    if block is None:
        return None
    if isinstance(block, (bool, np.bool_)):
        raise InvalidQuantized(f"Quantized: block must be an integer, got {block!r}")
    try:
        block = operator.index(block)
    except TypeError:
        raise InvalidQuantized(f"Quantized: block must be an integer, got {block!r}") from None
    if block <= 0:
        raise InvalidQuantized(f"Quantized: block must be > 0, got {block}")
    return block


@dataclass(frozen=True)
class Quantized:
    """An int8-quantized leaf: ``value = values * scale[block]``, one scale per ``block`` flat elements.

    A scalar ``scale`` (or ``block=None``) is per tensor. Scales are float32. A quantized leaf stands in for any
    float leaf of the layout with the same shape (it is a wire encoding); the kernels dequantize in the accumulator
    dtype as they read: ``x = acc_t(q) * acc_t(scale)``. ``values`` in GPU memory (a CuPy array or a torch CUDA
    tensor) make a device-resident leaf, which the GPU backend reads in place; its scales are then kept in GPU memory
    too (uploaded if given on the host).
    """

    values: np.ndarray
    scale: np.ndarray | float
    block: int | None = None

    def __post_init__(self):
        try:  # (a tensor that numpy cannot read in place, e.g. one with its negative bit set)
            q, xp = _values(self.values)
            s, s_xp = _values(self.scale)
        except BackendUnavailable:  # (GPU values where the GPU backend cannot run: not a malformed leaf)
            raise
        except (TypeError, ValueError, RuntimeError) as e:
            raise InvalidQuantized(f"Quantized: values or scales that cannot be read as arrays ({e})") from None
        if q.dtype != np.int8:
            raise InvalidQuantized(f"Quantized.values must be int8, got {q.dtype}")
        if not q.flags.c_contiguous:  # the kernels read the values from their first byte on, in order
            q = xp.ascontiguousarray(q)  # (not for a 0-d array: it would come back 1-d)
        if xp is np and s_xp is not np:
            raise InvalidQuantized("Quantized: scales in GPU memory for values in host memory")
        if s.dtype.kind not in "fiu" and s.dtype != bfloat16:  # (a complex scale lost its imaginary part, a str one
            # raised a bare ValueError)
            raise InvalidQuantized(f"Quantized: scales must be real numbers, got dtype {s.dtype}")
        # only a float wider than float32 may round to 0 there (the update then counted as zeros) or past its range
        # (then inf: the party's finite update was refused as non-finite); checked where the scales are, then
        # uploaded once (CuPy takes no host bfloat16)
        wide = s.dtype.kind == "f" and s.dtype.itemsize > 4
        with np.errstate(over="ignore") if wide else contextlib.nullcontext():
            s32 = s_xp.asarray(s, dtype=np.float32).reshape(-1)
        if wide:
            given = s.reshape(-1)
            if bool(s_xp.any((s32 == 0) & (given != 0))):
                raise InvalidQuantized("Quantized: a nonzero scale rounds to 0 in float32 (scales are float32)")
            over = s_xp.flatnonzero(s_xp.isinf(s32) & s_xp.isfinite(given))
            if over.size:
                i = int(over[0])
                raise InvalidQuantized(f"Quantized: scale {i} = {float(given[i]):.6g} overflows float32 (scales are "
                                       f"float32, at most {float(np.finfo(np.float32).max):.6g})")
        s = xp.ascontiguousarray(xp.asarray(s32))
        from .device import aligned, realigned  # (device imports this module)

        if not aligned(s):  # (float32 scales viewed at an odd byte offset: the kernels read them typed)
            s = realigned(s)
        n = q.size
        block = _block(self.block)
        if block is None or s.size == 1:
            block = max(n, 1)
            if s.size != 1:
                raise InvalidQuantized(f"Quantized: {s.size} scales given without a block size")
        need = -(-n // block) if n else 1
        if s.size != need:
            raise InvalidQuantized(f"Quantized: {n} values in blocks of {block} need {need} scales, got {s.size}")
        object.__setattr__(self, "values", q)
        object.__setattr__(self, "scale", s)
        object.__setattr__(self, "block", int(block))

    @property
    def on_device(self) -> bool:
        """Whether the values (and so the scales) are in GPU memory."""
        return not isinstance(self.values, np.ndarray)

    def to_host(self) -> "Quantized":
        """This leaf in host memory (itself if it is there)."""
        return Quantized(self.values.get(), self.scale.get(), self.block) if self.on_device else self

    @property
    def shape(self):
        return self.values.shape

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scale.nbytes

    def dequantize(self, dtype="float32", start: int = 0, stop: int | None = None):
        """Reference dequantization, ``acc_t(q[i]) * acc_t(scale[i // block])``: the leaf in its shape, or its flat
        elements [start, stop) (a chunk: no leaf-sized temporaries)."""
        dt = np.dtype(dtype)
        xp = np if not self.on_device else sys.modules["cupy"]  # (made from CuPy arrays: CuPy is imported)
        q = self.values.reshape(-1)
        whole = start == 0 and stop is None
        stop = q.size if stop is None else min(stop, q.size)
        x = q[start:stop].astype(dt) * self.scale[xp.arange(start, stop) // self.block].astype(dt)
        return x.reshape(self.values.shape) if whole else x

    @classmethod
    def quantize(cls, x, block: int | None = None) -> "Quantized":
        """Symmetric int8 quantization of ``x`` (per tensor, or per ``block`` flat elements). Non-finite values (and
        float64 ones past float32's range) are refused with a ValueError: a NaN came out as a finite 0, with a scale
        of 1 for its block, and the corrupt update passed admission."""
        block = _block(block)  # (2.5 failed inside numpy, naming no parameter)
        with np.errstate(over="ignore"):  # (a float64 value past float32's range: inf, refused below)
            x = np.asarray(x, dtype=np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError("Quantized.quantize: the values hold NaN or inf (or float64 values past float32's "
                             "range): an int8 encoding has none")
        flat = x.reshape(-1)
        b = flat.size if block is None else block
        nb = max(-(-flat.size // max(b, 1)), 1)
        pad = np.zeros(nb * max(b, 1), np.float32)
        pad[: flat.size] = flat
        amax = np.abs(pad.reshape(nb, -1)).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(pad.reshape(nb, -1) / scale[:, None]), -127, 127).astype(np.int8)
        return cls(q.reshape(-1)[: flat.size].reshape(x.shape), scale, b if block is not None else None)
