"""The GPU backend (CuPy): the fused fold, admission stats and finalize of csrc/cuda/kernels.cu.

The accumulator lives in GPU memory. Updates already there (CuPy arrays, torch CUDA tensors) are read in place
through the group's pointer table. Updates in host memory (the usual case: they come off the network) are staged:
the group's work items are cut into *stages* of at most ``SLOT_BYTES`` of host data, and each stage goes

    host gather into pinned slot s (CPU)  ->  H2D copy into device slot s (copy stream)  ->  fused fold (compute)

over a ring of ``DEPTH`` slots, so that gathering stage i+2 and copying stage i+1 overlap the fold of stage i.
Updates whose memory is already pinned skip the gather: the copy engine reads them directly. A stage's pointer table
points host columns at their bytes in the device slot (``slot + offset - start * itemsize``, so the kernels index
with the leaf's own coordinates) and device columns at the updates themselves, so every element still sees its k
updates in batch order, as the reference does, whatever mix of host and device updates a batch holds.

Stream order: stage i's fold waits for its copy (event); the copy into a slot waits for the fold that last read it;
the CPU refills a pinned slot only after the copy that last read it is done. Every call returns with its work done
(the compute stream synchronized), so the caller may reuse or free the updates it folded.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..batch import CHUNK, group_segments, pack_segments, segment_table, work_items
from ..dtypes import Quantized
from ..errors import BackendUnavailable
from . import cuda_source
from .numpy_ref import binned_constants

NAME = "cupy"
DTYPES = ("float64", "float32", "float16", "bfloat16", "int8")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}

SLOT_BYTES = 64 << 20
"""Host bytes per stage (pinned and device slot size): big enough that a copy runs at the link's speed."""
DEPTH = 3
"""Slots in the ring: gather, copy and fold of three consecutive stages in flight."""
ALIGN = 32
"""Staged copies start on 32-byte boundaries in the slot, so that the fold kernel's quad loads apply to them."""
GATHER_PIECE = 8 << 20
"""Pageable-to-pinned gathers are split into pieces of this size across a few host threads."""
TABLE_BLOCK = 64 << 10
"""Smallest pinned block of the kernel-table ring (a fold's tables: a few KiB; blocks grow to fit)."""
TABLE_DEPTH = 4
"""Blocks in the kernel-table ring: a block is refilled once the copy that last read it is done."""

_runtime = None
_owned: dict = {}  # (class, device) -> its one object for the current runtime (_Stager, _TableRing): see _of_runtime
_lock = threading.Lock()


def _make_runtime():
    try:
        import cupy
    except ImportError:
        raise BackendUnavailable("cupy is not installed (pip install 'jitkernels[gpu]')") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # driver missing or broken
        raise BackendUnavailable(f"no usable CUDA device ({type(e).__name__}: {e})") from None
    if n == 0:
        raise BackendUnavailable("no CUDA device")
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        raise BackendUnavailable("cuda-bindings is not installed: the kernels are compiled with NVRTC directly, "
                                 "since CuPy's compiler forces -ftz=true (pip install 'jitkernels[gpu]')") from None
    # cuda-bindings loads libnvrtc at its first call, and the kernels include cuda_fp16.h: both checked here, so
    # that a machine without them says so now ("auto" then runs on the CPU) instead of failing at the first fold
    try:
        nvrtc.nvrtcVersion()
        cuda_source.include_dirs()
    except Exception as e:
        raise BackendUnavailable(f"NVRTC cannot compile the kernels here ({type(e).__name__}: {e}; pip install "
                                 f"'jitkernels[gpu]' brings libnvrtc and the CUDA headers)") from None
    from .gpu_runtime import CupyRuntime

    return CupyRuntime()


def runtime():
    """The runtime the backend launches through (CuPy's, unless a test installed a shim)."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = _make_runtime()
        return _runtime


def available():
    try:
        runtime()
    except BackendUnavailable as e:
        return str(e)
    return True


@contextlib.contextmanager
def use_runtime(rt, slot_bytes: int | None = None):
    """Run the backend on ``rt`` (e.g. the CPU shim) inside the block; ``slot_bytes`` shrinks the stages so that
    small tests cross many of them."""
    global _runtime, _owned, SLOT_BYTES
    saved = _runtime, _owned, SLOT_BYTES
    _runtime, _owned = rt, {}
    SLOT_BYTES = slot_bytes or SLOT_BYTES
    try:
        yield rt
    finally:
        _runtime, _owned, SLOT_BYTES = saved


class _Stager:
    """The ring of pinned and device slots, the copy stream and the gather threads of one runtime."""

    def __init__(self, rt):
        self.rt = rt
        self.lock = threading.Lock()
        self.copy_stream = rt.stream()
        self.pinned = [None] * DEPTH
        self.device = [None] * DEPTH
        self.copied = [None] * DEPTH  # event: slot's last H2D copy done (pinned slot free)
        self.folded = [None] * DEPTH  # event: slot's last fold done (device slot free)
        self.pool = ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 2) // 2)), thread_name_prefix="jk-gather")

    def slot(self, i: int):
        if self.device[i] is None or self.device[i].nbytes < SLOT_BYTES:
            self.pinned[i] = self.rt.pinned(SLOT_BYTES)
            self.device[i] = self.rt.empty(SLOT_BYTES, np.uint8)
            self.copied[i] = self.folded[i] = None  # (a call always ends with every stage folded)
        return self.pinned[i], self.rt.ptr(self.device[i])


def _of_runtime(cls, rt):
    """The one ``cls(rt)`` (staging ring, table ring) of runtime ``rt`` on its current device, made on first use:
    its slots, streams and events belong to the device they were made on (an event recorded on another device's
    stream fails, and a kernel cannot read another device's slots)."""
    with _lock:
        key = (cls, rt.device_id())
        obj = _owned.get(key)
        if obj is None or obj.rt is not rt:
            obj = _owned[key] = cls(rt)
        return obj


class _TableRing:
    """Pinned host blocks that kernel tables go to the device through, as async copies on the launch's stream: a
    pageable upload (``cupy.asarray``) is a synchronous round trip of ~75 us (measured on an H200), more than the
    fold of a few million elements."""

    def __init__(self, rt):
        self.rt = rt
        self.lock = threading.Lock()
        self.next = 0
        self.blocks = [None] * TABLE_DEPTH
        self.copied = [None] * TABLE_DEPTH  # event: the block's last copy done (the block may be refilled)

    def upload(self, host: np.ndarray):
        """Device copy (uint8) of the bytes of contiguous ``host``, ordered on the current stream before what is
        launched there next (the copy's stream is the one whose memory pool the device array comes from)."""
        nb = host.nbytes
        stream = self.rt.current_stream()
        dev = self.rt.empty(max(nb, 1), np.uint8)  # from the pool of the current stream: freed in its order
        with self.lock:
            i = self.next
            self.next = (i + 1) % TABLE_DEPTH
            if self.copied[i] is not None:
                self.copied[i].synchronize()  # (usually long done: TABLE_DEPTH launches ago)
            if self.blocks[i] is None or self.blocks[i].nbytes < nb:
                self.blocks[i] = self.rt.pinned(max(TABLE_BLOCK, 1 << (nb - 1).bit_length()))
            block = self.blocks[i]
            block[:nb] = host.reshape(-1).view(np.uint8)
            self.rt.h2d_async(self.rt.ptr(dev), block.ctypes.data, nb, stream)
            ev = self.copied[i] = self.copied[i] or self.rt.event()
            ev.record(stream)
        return dev


def _tables(rt, *parts) -> tuple:
    """(device array, [address of each part]): the small host tables of one launch (int64, and float64 as its
    bits) in one async upload through the pinned table ring, ordered on the current stream. Keep the array
    alive until the launch has run."""
    flat = [np.ascontiguousarray(x).reshape(-1) for x in parts]
    for x in flat:
        if x.dtype.kind not in "iub" and x.dtype != np.float64:
            raise TypeError(f"kernel tables are int64 or float64, not {x.dtype}")
    host = np.concatenate([x.view(np.int64) if x.dtype == np.float64 else x.astype(np.int64, copy=False)
                           for x in flat])
    dev = _of_runtime(_TableRing, rt).upload(host)
    base, starts = rt.ptr(dev), np.cumsum([0] + [x.size for x in flat[:-1]])
    return dev, [np.uint64(base + 8 * int(o)) for o in starts]


def _addr(rt, a) -> np.uint64:
    return np.uint64(0 if a is None else rt.ptr(a))


def _device_mask(g) -> np.ndarray:
    return np.zeros(g.k, bool) if g.device is None else g.device


# --- fold ---------------------------------------------------------------------------------------------------------
def fold(acc, base, g):
    """acc[i] = acc[i] + A(w_j) * (x_j[i] [- base[i]]), j = 0..k-1, in one pass per stage. Moves, per element,
    k*itemsize(in) bytes in (host updates: once over PCIe, then once from the device slot) + 2*itemsize(A)."""
    rt = runtime()
    name = cuda_source.fold_name(acc.dtype.name, g.in_dtype, base is not None)
    _pipeline(rt, g, name, (_addr(rt, acc), _addr(rt, base)), ())


def fold_binned(hi, lo, base, g, bound_log2, zero=False):
    """Deterministic fold (jk::binned_step per term, jk::binned_carry per stage): bit-identical to the CPU
    (``zero``: see numpy_ref.fold_binned)."""
    rt = runtime()
    s1, s2 = binned_constants(bound_log2)
    name = cuda_source.binned_name(g.in_dtype, base is not None)
    _pipeline(rt, g, name, (_addr(rt, hi), _addr(rt, lo), _addr(rt, base)), (np.float64(s1), np.float64(s2)))


def _pipeline(rt, g, name, head, tail):
    if g.work.shape[0] == 0:
        return
    isz = ITEMSIZE[g.in_dtype]
    dev = _device_mask(g)
    # a stage must hold at least one work item of every host column: split wide batches into passes over columns
    # (consecutive, so each element still sees the updates in batch order)
    per_pass = SLOT_BYTES // (2 * int(g.work[:, 2].max()) * isz)
    if per_pass < 1:
        raise ValueError(f"staging slots of {SLOT_BYTES} bytes cannot hold a work item of {g.in_dtype}")
    passes, start, n_host = [], 0, 0
    for j in range(g.k):
        if not dev[j]:
            if n_host == per_pass:
                passes.append((start, j))
                start, n_host = j, 0
            n_host += 1
    passes.append((start, g.k))
    st = _of_runtime(_Stager, rt)
    compute = rt.current_stream()
    with st.lock:
        for ja, jb in passes:
            try:
                _run_pass(rt, st, compute, g, ja, jb, dev, isz, name, head, tail)  # each ends synchronized
            except BaseException:
                # copies and launches queued before the error may still read the caller's updates and this pass's
                # tables: they end before the error leaves (a CUDA error, sticky, raises again here: the first is
                # the one to see)
                for stream in (st.copy_stream, compute):
                    with contextlib.suppress(Exception):
                        stream.synchronize()
                raise


def _run_pass(rt, st, compute, g, ja, jb, dev, isz, name, head, tail):
    kc = jb - ja
    ptr = g.ptr[:, ja:jb]
    hmask = (~dev[ja:jb])[None, :] & (ptr != 0)  # [R, kc]: host leaves to stage
    sptr = g.scale_ptr[:, ja:jb].copy()
    keep = []  # host arrays that device tables point into must outlive the pass
    staged = bool(hmask.any())
    if g.in_dtype == "int8" and staged:
        sptr = _stage_scales(rt, g, ja, hmask, sptr, keep)
    if not staged:  # every update of the pass is on the device: one launch over the group's own tables
        tabs, (off, p, w, sp, blk, wk) = _tables(rt, g.off, ptr, np.asarray(g.w[:, ja:jb], np.float64), sptr,
                                                 g.block[:, ja:jb], group_segments(g))
        rt.launch(name, g.work.shape[0], head + (off, p, w, sp, blk, np.int64(kc), wk) + tail, compute)
        compute.synchronize()  # the tables may be freed after this
        return
    work = g.work
    r, s, n = work[:, 0], work[:, 1], work[:, 2]
    item_bytes = n * isz * hmask[r].sum(axis=1)
    # items starting in [m*S', (m+1)*S') form stage m: at most S' + one item + alignment padding <= SLOT_BYTES
    slack = min(ALIGN * int(hmask.sum()), SLOT_BYTES // 4)
    stage = (np.cumsum(item_bytes) - item_bytes) // (SLOT_BYTES - int(item_bytes.max()) - slack)
    first = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (stage[1:] != stage[:-1])])  # segments: (row, stage)
    seg_row, seg_s0, seg_stage = r[first], s[first], stage[first]
    seg_len = np.add.reduceat(n, first)
    item_bounds = np.flatnonzero(np.r_[True, stage[1:] != stage[:-1], True])
    seg_bounds = np.searchsorted(seg_stage, stage[item_bounds[:-1]])
    seg_bounds = np.r_[seg_bounds, len(seg_row)]

    chunk = int(n.max())
    parts, plans = [], []
    pinned_cache = {}
    for i in range(len(item_bounds) - 1):
        i0, i1 = item_bounds[i], item_bounds[i + 1]
        s0, s1 = seg_bounds[i], seg_bounds[i + 1]
        rows = seg_row[s0:s1]
        slot = i % DEPTH
        slot_dev = st.slot(slot)[1] if hmask[rows].any() else None
        p_local = ptr[rows].astype(np.int64)  # copy
        gathers, directs, o, pad = [], [], 0, 0
        pend = []
        for q, row in enumerate(rows.tolist()):
            for j in np.flatnonzero(hmask[row]).tolist():
                a0, ln = int(seg_s0[s0 + q]), int(seg_len[s0 + q])
                src = int(ptr[row, j])
                key = (row, j)
                if key not in pinned_cache:
                    pinned_cache[key] = rt.is_pinned(src)
                pend.append((pinned_cache[key], q, row, j, a0, ln, src))
        for pinned_src in (False, True):  # pageable bytes first: they go over in one copy from the pinned slot
            for is_p, q, row, j, a0, ln, src in pend:
                if is_p != pinned_src:
                    continue
                nb = ln * isz
                if pad + ALIGN <= slack:  # start each copy on a vector boundary: the kernel then loads quads
                    aligned = -(-o // ALIGN) * ALIGN
                    pad, o = pad + aligned - o, aligned
                if pinned_src:
                    directs.append((o, src + a0 * isz, nb))
                else:
                    gathers.append((o, _bytes_of(g.arrays[row][ja + j])[a0 * isz:a0 * isz + nb]))
                p_local[q, j] = slot_dev + o - a0 * isz
                o += nb
        # the stage's tables, one row per segment (local row q: the items' starts stay the row's)
        parts += [g.off[rows], p_local, np.asarray(g.w[rows, ja:jb], np.float64), sptr[rows], g.block[rows, ja:jb],
                  pack_segments(np.arange(len(rows)), seg_s0[s0:s1], seg_len[s0:s1], first[s0:s1] - i0, chunk)]
        gathered = max((o_ + v.nbytes for o_, v in gathers), default=0)  # the pinned slot's used span
        plans.append((slot, gathers, directs, gathered, i1 - i0))
        if i < DEPTH:  # its slot's last fold is a past call's: copy now, while the later stages are planned
            _copy_stage(rt, st, *plans[-1][:4])
    tabs, addrs = _tables(rt, *parts)
    keep.append(tabs)
    for i, (slot, gathers, directs, gathered, m) in enumerate(plans):
        if gathers or directs:
            if i >= DEPTH:
                _copy_stage(rt, st, slot, gathers, directs, gathered)
            compute.wait(st.copied[slot])
        off, p, w, sp, blk, wk = addrs[6 * i:6 * i + 6]
        args = head + (off, p, w, sp, blk, np.int64(kc), wk) + tail
        rt.launch(name, m, args, compute)
        if gathers or directs:
            ev = st.folded[slot] = st.folded[slot] or rt.event()
            ev.record(compute)
    compute.synchronize()  # tables and staged scales (keep) may be freed after this
    del keep


def _copy_stage(rt, st, slot, gathers, directs, gathered):
    """A stage's bytes into its device slot on the copy stream, after the slot's previous stage is folded (a stage
    of this call DEPTH stages back, or a past call's, long done); ``st.copied[slot]`` records when they are there.
    The first DEPTH stages are copied as soon as they are planned: planning every stage first kept the copy engine
    idle for the planning's time (~3 ms of host work before the first copy, at 25M bf16 x 10 on this VM's CPU)."""
    if not (gathers or directs):
        return
    pinned, slot_dev = st.slot(slot)
    if gathers and st.copied[slot] is not None:
        st.copied[slot].synchronize()  # the pinned slot's previous contents are on the device
    _gather(st, pinned, gathers)
    if st.folded[slot] is not None:
        st.copy_stream.wait(st.folded[slot])  # the device slot's previous stage is folded
    if gathered:
        rt.h2d_async(slot_dev, pinned.ctypes.data, gathered, st.copy_stream)
    for o, src, nb in directs:
        rt.h2d_async(slot_dev + o, src, nb, st.copy_stream)
    ev = st.copied[slot] = st.copied[slot] or rt.event()
    ev.record(st.copy_stream)


def _bytes_of(a) -> np.ndarray:
    """Flat uint8 view of a host leaf's data (int8 values for a Quantized leaf)."""
    if isinstance(a, Quantized):
        a = a.values
    return a.reshape(-1).view(np.uint8)


def _gather(st, pinned, gathers):
    pieces = []
    for o, src in gathers:
        for p in range(0, src.nbytes, GATHER_PIECE):
            pieces.append((o + p, src[p:p + GATHER_PIECE]))
    if len(pieces) <= 1:
        for o, src in pieces:
            pinned[o:o + src.nbytes] = src
        return
    list(st.pool.map(lambda x: pinned.__setitem__(slice(x[0], x[0] + x[1].nbytes), x[1]), pieces))


def _stage_scales(rt, g, ja, hmask, sptr, keep):
    """Upload the int8 scales of the host leaves (small: one float per block) and point the table at them."""
    rows, cols = np.nonzero(hmask)
    scales = [np.asarray(g.arrays[r][ja + j].scale, np.float32) for r, j in zip(rows.tolist(), cols.tolist())]
    flat = _of_runtime(_TableRing, rt).upload(np.concatenate(scales))
    keep.append(flat)
    base = rt.ptr(flat)
    starts = np.cumsum([0] + [x.size for x in scales[:-1]])
    sptr[rows, cols] = base + 4 * starts
    return sptr


# --- stats --------------------------------------------------------------------------------------------------------
def stats(base, g, acc_dtype):
    """Per (row, update) of device-resident updates: non-finite count, sum of squares and max |x| (float64).
    Host updates are validated where they are, by a CPU backend (see jitkernels.admission)."""
    rt = runtime()
    R, k = g.ptr.shape
    if not _device_mask(g).all():
        raise TypeError("the GPU stats pass reads device-resident updates only")
    A = acc_dtype if base is None else base.dtype.name
    name = cuda_source.stats_name(A, g.in_dtype, base is not None)
    tabs, (off, p, sp, blk, wk) = _tables(rt, g.off, g.ptr, g.scale_ptr, g.block, group_segments(g))
    out = rt.zeros(3 * R * k, np.uint64)  # nonfinite, sumsq bits, maxabs bits
    op = rt.ptr(out)
    compute = rt.current_stream()
    rt.launch(name, g.work.shape[0], (_addr(rt, base), off, p, sp, blk, np.int64(k), wk, np.uint64(op),
                                      np.uint64(op + 8 * R * k), np.uint64(op + 16 * R * k)), compute)
    h = rt.download(out).reshape(3, R, k)  # synchronizes
    return h[0].astype(np.int64), h[1].view(np.float64).copy(), h[2].view(np.float64).copy()


# --- finalize -----------------------------------------------------------------------------------------------------
def finalize(acc, base, og):
    """out = out_t(acc / A(W)) (base + that, with a base). Reads n*itemsize(A) (x2 with base), writes
    n*itemsize(out) bytes of GPU memory; outputs are device arrays."""
    rt = runtime()
    tabs, (off, w, optr, wk) = _tables(rt, og.off, np.asarray(og.total_w, np.float64), og.ptr,
                                       segment_table(og.work))
    compute = rt.current_stream()
    name = cuda_source.finalize_name(acc.dtype.name, og.out_dtype, base is not None)
    rt.launch(name, og.work.shape[0], (_addr(rt, acc), _addr(rt, base), off, w, optr, wk), compute)
    compute.synchronize()


def step(acc, x, m, v, kind, coef, og):
    """The server-optimizer step of numpy_ref.step, one pass over device memory: reads acc, x, m (v), writes x, m
    (v) and out."""
    rt = runtime()
    tabs, (off, w, optr, wk, cf) = _tables(rt, og.off, np.asarray(og.total_w, np.float64), og.ptr,
                                           segment_table(og.work), np.asarray(coef, np.float64))
    compute = rt.current_stream()
    rt.launch(cuda_source.step_name(acc.dtype.name, og.out_dtype), og.work.shape[0],
              (_addr(rt, acc), _addr(rt, x), _addr(rt, m), _addr(rt, v), off, w, optr, wk, cf, np.int32(kind)),
              compute)
    compute.synchronize()


def add_noise(acc, leaf_ids, offsets, sizes, sigmas, seed: int, round: int) -> None:
    """DP noise into the accumulator on the GPU: for each leaf row, ``acc[o + i] += A(sigma * z(seed, round, leaf,
    i))`` with jitkernels.noise's Gaussian (bit-identical to the host's). Reads and writes the rows once."""
    rt = runtime()
    n = np.asarray(sizes, np.int64)
    work = work_items(n, CHUNK)
    if work.shape[0] == 0:
        return
    tabs, (off, sig, leaf, wk) = _tables(rt, np.asarray(offsets, np.int64), np.asarray(sigmas, np.float64),
                                         np.asarray(leaf_ids, np.int64), segment_table(work))
    compute = rt.current_stream()
    rt.launch(cuda_source.noise_name(acc.dtype.name), work.shape[0],
              (_addr(rt, acc), off, sig, leaf, wk, np.uint64(seed), np.uint32(round)), compute)
    compute.synchronize()


def modsum(acc, offsets, ptr, code, sizes, bits: int, subtract: bool) -> np.ndarray:
    """SecAgg's modular sum on the GPU (csrc/cuda/kernels.cu modsum_rows over jk_secagg.h): ``acc <- (acc +/- sum_j
    y_j) mod 2^b`` for every row r (``acc[offsets[r]:][:sizes[r]]``), the updates at the device addresses
    ``ptr[r, j]`` (0: absent) with input codes ``code[r, j]``. Returns bool[k]: update j holds a value outside
    [0, 2^b). Reads k*itemsize(y) + itemsize(acc) and writes itemsize(acc) bytes per element."""
    rt = runtime()
    work = work_items(np.asarray(sizes, np.int64), CHUNK)
    m, k = work.shape[0], ptr.shape[1]
    if m == 0:
        return np.zeros(k, bool)
    # (k = 0 too launches: the kernel's reduction mod 2^b is the call's promise, as on the CPU backends)
    tabs, (off, p, c, wk) = _tables(rt, np.asarray(offsets, np.int64), ptr, code, segment_table(work))
    bad = rt.zeros(m * k, np.uint32)
    compute = rt.current_stream()
    rt.launch(cuda_source.modsum_name(acc.dtype.name), m,
              (_addr(rt, acc), off, p, c, np.int64(k), wk, np.int32(bits), np.int32(bool(subtract)), _addr(rt, bad)),
              compute)
    compute.synchronize()
    return rt.download(bad).reshape(m, k).any(axis=0)


def robust_coord(rows, code: int, mode: int, lo: int, hi: int, out) -> None:
    """Coordinate-wise median (mode 0), trimmed mean of ranks [lo, hi) (mode 1) or Bulyan's step keeping ``lo``
    values (mode 2) of the k rows of a device slab ``rows`` [k, N] (rows contiguous; bf16/f16 as uint16) into the
    device float32[N] ``out``: the generated kernel of cuda_source.robust_kernel, one thread per coordinate. Reads
    k*itemsize and writes 4 bytes per coordinate."""
    rt = runtime()
    k, n = rows.shape
    name, body = cuda_source.robust_kernel(k, code, mode, lo, hi)
    compute = rt.current_stream()
    rt.launch_generated(name, body, -(-n // cuda_source.BLOCK),
                        (_addr(rt, rows), np.int64(rows.strides[0] // rows.itemsize), np.int64(n), _addr(rt, out)),
                        compute)
    compute.synchronize()


GRAM_BLOCKS_PER_SM = 8
"""Blocks of the Gram kernel per multiprocessor (all tiles together): enough that the last wave is a small part."""


GRAM_MAX_K = 64
"""Largest k the Gram kernel takes; above, robust_gram's array path (float64 tiles, batched cuBLAS GEMMs) is as
fast, as the kernel's reads and float64 work grow as k^2 / T. On an H200 (one run, k x N =
250M float32): k = 10, 2.5 ms against the array path's 10.9; k = 50, 6.5 against 10.4; k = 100, 12.2 against
11.4."""


def gram_tile(k: int) -> int:
    """Rows per group of the Gram kernel's pair tiles for k rows. Measured on an H200 (one run, U = 1): k = 10,
    4-row tiles 2.5 ms, 8-row 3.0 (two blocks per multiprocessor hide more latency than fewer re-reads save);
    k = 50, 8.0 and 6.5; k = 100, 16.1 and 12.2. Between 10 and 50 the cut at 16 is not measured."""
    return 4 if k <= 16 else 8


def gram(rows, mode: int, refrow: int, ref, diag_only: bool, tile: int | None = None) -> tuple:
    """(G [k, k] float64, its lower triangle right, or None with ``diag_only``; uncentered sums of squares [k];
    centered [k]) of a device slab ``rows`` [k, n] (float32 or float64, rows contiguous), centered at nothing
    (mode 0), row ``refrow`` (1) or the device vector ``ref`` [n] (2, float32 or float64): csrc/cuda/kernels.cu
    gram_tiles, one pass. Reads each value once per pair tile holding its row (ceil(k / T) tiles, side by side, so
    mostly from L2), and the reference once per tile; host arrays out."""
    from ..device import array_module

    rt = runtime()
    k, n = rows.shape
    T = tile or gram_tile(k)
    groups = -(-k // T)
    ntiles = groups if diag_only else groups * (groups + 1) // 2
    ncb = max(1, min(-(-n // cuda_source.BLOCK), GRAM_BLOCKS_PER_SM * rt.sm_count // ntiles))
    warps = cuda_source.BLOCK // rt.warp_size
    P = T * T + T
    ref_dtype = ref.dtype.name if mode == 2 else rows.dtype.name
    compute = rt.current_stream()
    if n:
        part = rt.empty(ncb * ntiles * warps * P, np.float64)  # every part is written
        rt.launch(cuda_source.gram_name(rows.dtype.name, ref_dtype, T), ncb * ntiles,
                  (_addr(rt, rows), np.int64(rows.strides[0] // rows.itemsize), np.int64(k), np.int64(n),
                   np.int32(mode), np.int64(refrow), _addr(rt, ref if mode == 2 else None), np.int64(ntiles),
                   np.int64(ncb), np.int32(bool(diag_only)), _addr(rt, part)), compute)
        compute.synchronize()
        sums = rt.download(array_module(part).sum(part.reshape(ncb, ntiles, warps, P), axis=(0, 2)))
    else:
        sums = np.zeros((ntiles, P))
    G = np.zeros((groups * T, groups * T))
    sq = np.zeros(groups * T)
    for t in range(ntiles):
        I = t if diag_only else int((math.isqrt(8 * t + 1) - 1) // 2)
        J = t if diag_only else t - I * (I + 1) // 2
        G[I * T:(I + 1) * T, J * T:(J + 1) * T] = sums[t, :T * T].reshape(T, T)
        if I == J:
            sq[I * T:(I + 1) * T] = sums[t, T * T:]
    G = G[:k, :k]
    return (None if diag_only else G), sq[:k], np.diag(G).copy()


def combine(rows, idx, coef, base, out) -> None:
    """``out[c] = b_c + sum_j coef[j] (rows[idx[j], c] - b_c)`` in float64, rounded once to out's dtype (the
    slab's), b = the device vector ``base`` (float32 or float64) or 0: csrc/cuda/kernels.cu combine_rows, one thread
    per column. Reads len(idx) N itemsize (+ N itemsize(base)) and writes N itemsize bytes."""
    rt = runtime()
    n = rows.shape[1]
    if n == 0:
        return
    tabs, (ip, cf) = _tables(rt, np.asarray(idx, np.int64), np.asarray(coef, np.float64))
    compute = rt.current_stream()
    rt.launch(cuda_source.combine_name(rows.dtype.name, rows.dtype.name if base is None else base.dtype.name),
              -(-n // cuda_source.BLOCK),
              (_addr(rt, rows), np.int64(rows.strides[0] // rows.itemsize), ip, cf, np.int64(len(idx)),
               _addr(rt, base), np.int32(base is not None), np.int64(n), _addr(rt, out)), compute)
    compute.synchronize()  # (tabs, the tables, stay alive until the launch has run)


def set_num_threads(n: int) -> None:
    pass
