"""numba, imported once for every module that compiles kernels with it: the module (or why it is missing), the
threading layer that makes concurrent kernel calls safe, and the intrinsics the kernels share.

Kernels may be called from several threads at once only under the ``omp`` or ``tbb`` threading layers
(``workqueue`` aborts), so ``omp`` is asked for unless the user chose a layer.
"""

from __future__ import annotations

import functools
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


_forked_from = None  # the threading layer that had started in the process this one was forked from


def _after_fork_in_child() -> None:
    global _forked_from
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel had run: the child starts a layer of its own
        return
    if layer != "workqueue":
        _forked_from = layer


if numba is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def keeps_threads(fn):
    """``fn``, leaving numba's thread count as it found it: the kernels set it to jitkernels' count (capped at
    numba's pool) for their parallel regions, and numba.set_num_threads is the calling thread's setting for every
    later prange too, the user's own code included (it ran on the count of our last kernel)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        old = _thread_count()
        try:
            return fn(*args, **kwargs)
        finally:
            if _thread_count() != old:
                _set_thread_count(old)
    return call


@functools.cache
def _threads_up() -> None:
    numba.get_num_threads()  # (starts the threading layer, which registers the C functions the compiled calls use)


def _thread_count() -> int:
    _threads_up()
    return int(_compiled_count())


def _set_thread_count(n: int) -> None:
    _threads_up()
    _compiled_set(n)


def use_threads(n: int) -> int:
    """Set numba's thread count for the calling thread's next parallel regions to ``n``, capped at numba's pool
    (NUMBA_NUM_THREADS), and return it. The get and the set are compiled: numba's Python functions take its launch
    lock on every call, ~0.5 and ~0.8 us, five calls a per-update fold (3 of its 13 us fixed cost)."""
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    if _thread_count() != n:
        _set_thread_count(n)
    return n


def available():
    """True, or the reason numba cannot run here: not importable, or this process was forked from one whose numba
    kernels had started an OpenMP (or TBB) thread pool, which is not fork-safe: numba ends a child that runs a
    parallel kernel then ("Terminating: fork() called from a process already using GNU OpenMP")."""
    if numba is None:
        return reason
    if _forked_from is not None:
        return (f"this process was forked from one whose numba kernels had started the {_forked_from!r} threading "
                "layer, which is not fork-safe: use backend='cpp' here, or start worker processes with the 'spawn' "
                "method")
    return True


if numba is not None:

    # numba's thread count, read and set by compiled code. numba's Python get_num_threads / set_num_threads take its
    # launch lock on every call (~0.5 and ~0.8 us; a per-update fold made five such calls), and their jitted
    # overloads call through ctypes pointers, which numba will not cache (a compile in every process). These call
    # the threading layer's C functions by the names numba registers for its own parallel kernels, once the layer
    # is up (_threads_up).
    def _layer_function(name, ret, args):
        def codegen(context, builder, sig, vals):
            fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ret, args), name)
            out = builder.call(fn, list(vals))
            return context.get_dummy_value() if isinstance(ret, ir.VoidType) else out
        return codegen

    @intrinsic
    def _get_num_threads(typingctx):
        return types.int32(), _layer_function("get_num_threads", ir.IntType(32), [])

    @intrinsic
    def _put_num_threads(typingctx, n):
        return types.void(types.int32), _layer_function("set_num_threads", ir.VoidType(), [ir.IntType(32)])

    @numba.njit(cache=True)
    def _compiled_count():
        return _get_num_threads()

    @numba.njit(cache=True)
    def _compiled_set(n):
        _put_num_threads(numba.int32(n))

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

    def _ordered(pick_smaller: bool):
        """min/max of two floats as one compare and one select, with no branch in numba's IR (``x if c else y``
        costs a basic block, and numba's SSA pass is quadratic in blocks: a 330-comparator network took 36 s to
        compile that way). min(a, b) = b if b < a else a; max(a, b) = a if b < a else b: together they return
        the same two values (the same predicate), as std::min/std::max in C++."""

        @intrinsic
        def select(typingctx, a, b):
            if not (isinstance(a, types.Float) and a == b):
                return None

            def codegen(context, builder, sig, args):
                x, y = args
                lt = builder.fcmp_ordered("<", y, x)
                return builder.select(lt, y, x) if pick_smaller else builder.select(lt, x, y)

            return a(a, b), codegen

        return select

    fmin = _ordered(True)
    fmax = _ordered(False)

    @intrinsic
    def prefetch(typingctx, arr, i):
        """Prefetch the cache line of ``arr[i]`` (1-d array, any stride) for reading; no bounds check is needed: a
        prefetch never faults. For kernels that read many rows at once (more streams than the hardware prefetcher
        follows)."""
        if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(i, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            from numba.core import cgutils

            a = context.make_array(sig.args[0])(context, builder, args[0])
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            stride = builder.extract_value(a.strides, 0)
            byte = ir.IntType(8)
            base = builder.bitcast(a.data, byte.as_pointer())
            ptr = builder.gep(base, [builder.mul(idx, stride)])
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ptr.type, i32, i32, i32])
            suffix = "p0" if getattr(ptr.type, "is_opaque", False) else "p0i8"
            fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.prefetch.{suffix}")
            builder.call(fn, [ptr, i32(0), i32(3), i32(1)])  # read, keep in all levels, data cache
            return context.get_dummy_value()

        return types.void(arr, i), codegen
