"""numba, imported once for every module that compiles kernels with it: the module (or why it is missing), the
threading layer that makes concurrent kernel calls safe, and the intrinsics the kernels share.

Kernels may be called from several threads at once only under the ``omp`` or ``tbb`` threading layers
(``workqueue`` aborts), so ``omp`` is asked for unless the user chose a layer.
"""

from __future__ import annotations

import os

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError as e:  # pragma: no cover - numba is optional
    numba = None
    reason = f"numba not importable ({e})"
else:
    reason = None
    if "NUMBA_THREADING_LAYER" not in os.environ and numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "omp"


def available():
    """True, or the reason numba cannot run here."""
    return True if numba is not None else reason


if numba is not None:

    @intrinsic
    def typed_ptr(typingctx, addr, witness):
        """Address (int64) -> pointer to ``witness``'s element type (``numba.carray`` then views it)."""
        ptrty = types.CPointer(witness.dtype)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(ptrty))

        return ptrty(types.int64, witness), codegen

    @intrinsic
    def u32_as_f32(typingctx, u):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.uint32), codegen

    @intrinsic
    def f32_bits(typingctx, x):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.uint32(types.float32), codegen

    @intrinsic
    def f64_bits(typingctx, x):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.IntType(64))

        return types.uint64(types.float64), codegen

    @intrinsic
    def bits_f64(typingctx, u):
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], ir.DoubleType())

        return types.float64(types.uint64), codegen
