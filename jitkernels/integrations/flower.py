"""Flower (flwr) integration: zero-copy views of the parameters Flower ships.

Flower serializes each array with ``np.save(..., allow_pickle=False)`` (``flwr.common.ndarray_to_bytes``), and its
``parameters_to_ndarrays`` copies every byte back out through ``np.load``: at 25M parameters x 10 parties that copy
costs more than a fused fold of the same updates. :func:`ndarrays_from_parameters` reads the ``.npy`` header (a
Python literal, parsed by numpy's ``read_array_header`` with ``ast.literal_eval``; never unpickled) and returns
read-only ``np.frombuffer`` views into the received bytes, which the fold kernels read in place.
"""

from __future__ import annotations

import functools
import io

import numpy as np

from ..errors import LayoutMismatch

_MAGIC = b"\x93NUMPY"


def ndarray_view(buf: bytes, *, party=None, index: int | None = None) -> np.ndarray:
    """A read-only view of the array serialized in ``buf`` (``.npy`` format, versions 1-3), without copying.

    Raises :class:`~jitkernels.errors.LayoutMismatch` (naming the party and the array's index) for anything else:
    a truncated buffer, an object dtype (which would need unpickling), a bad header."""
    where = f"array {index}" if index is not None else None
    mv = memoryview(buf)
    if bytes(mv[:6]) != _MAGIC or len(mv) < 10:
        raise LayoutMismatch("not a .npy serialized array", leaf=where, party=party)
    major = mv[6]
    hlen_size = 2 if major == 1 else 4
    if len(mv) < 8 + hlen_size:
        raise LayoutMismatch("truncated .npy header", leaf=where, party=party)
    start = 8 + hlen_size + int.from_bytes(mv[8:8 + hlen_size], "little")
    shape, fortran, dtype = _header(bytes(mv[:start]), where, party)
    if dtype.hasobject:
        raise LayoutMismatch("object arrays are refused (they would need unpickling)", leaf=where, party=party)
    count = int(np.prod(shape, dtype=np.int64))
    if len(mv) - start != count * dtype.itemsize:
        raise LayoutMismatch(f"{len(mv) - start} data bytes for {dtype}{tuple(shape)} ({count * dtype.itemsize})",
                             leaf=where, party=party)
    flat = np.frombuffer(buf, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C")


@functools.lru_cache(maxsize=4096)
def _parse_header(head: bytes) -> tuple:
    # the parties of a job send the same few headers: parsing one (ast.literal_eval) costs ~40 us, a lookup ~0.2 us
    f = io.BytesIO(head[8:])
    fmt = np.lib.format
    return fmt.read_array_header_1_0(f) if head[6] == 1 else fmt.read_array_header_2_0(f)


def _header(head: bytes, where, party) -> tuple:
    try:
        return _parse_header(head)
    except (ValueError, SyntaxError) as e:
        raise LayoutMismatch(f"bad .npy header ({e})", leaf=where, party=party) from None


def ndarrays_from_parameters(parameters, *, party=None) -> list:
    """Zero-copy views of a ``flwr.common.Parameters``' tensors (numpy.ndarray serialization)."""
    if getattr(parameters, "tensor_type", "numpy.ndarray") != "numpy.ndarray":
        raise LayoutMismatch(f"tensor_type {parameters.tensor_type!r}; expected 'numpy.ndarray'", party=party)
    return [ndarray_view(t, party=party, index=i) for i, t in enumerate(parameters.tensors)]
