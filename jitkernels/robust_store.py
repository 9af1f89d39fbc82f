"""UpdateStore: a round's k updates, buffered for the robust aggregators that cannot stream.

Byzantine-robust statistics (coordinate median, trimmed mean, Krum, Bulyan) need every update of a round at once.
Flower and FedML stack them with numpy (``np.asarray(list_of_layers)``: a k x model copy, then sort copies); this
store keeps one pre-sized slab of ``k_max x N`` values instead, filled row by row as updates are admitted, which the
kernels of :mod:`jitkernels.robust_coord` read in place. Memory: the rows used (N * itemsize bytes each) and nothing
per update beyond a 1 MB conversion chunk.

Slab dtype: float32 (default), float16, or bfloat16 held as its uint16 bits (numpy has no bfloat16; the kernels
widen the bits exactly, so the slab needs no ml_dtypes). An update is converted as it is copied, with
round-to-nearest-even: float64 -> bfloat16 goes through float32 with round-to-odd, so it is rounded once, correctly.
Leaves may be float64, float32, float16, bfloat16 or integers (counters such as BatchNorm's num_batches_tracked:
converted like numpy's cast, exact in float32 up to 2**24; what the aggregate does with them is the caller's rule).

Memory layout (the "lazy rows" choice): the slab is one anonymous ``mmap`` of k_max rows with MAP_NORESERVE. The
kernel commits a page when it is first written, so the resident memory is the rows used (rounded up to a page),
nothing is ever copied to grow, and :meth:`rows` is always one contiguous [k, N] view. Reserving address space
costs nothing (and MAP_NORESERVE keeps k_max x N out of the overcommit accounting). Rows >= k are never read: they
hold zeros, or what an earlier round (:meth:`clear` with ``release=False``), a dropped row (:meth:`truncate`) or a
rejected add left there, since every add writes its whole row.
First-touch page faults are most of an add's cost (see :meth:`clear` with ``release=False`` to keep the pages from
one round to the next). Transparent huge pages were measured slower here (compaction), so none are requested.

Budget: ``budget_bytes`` bounds the bytes of the rows used in memory (k * N * itemsize). An update that would pass
it either spills the slab (``over_budget="spill"``: the k rows are copied into a sparse ``numpy.memmap`` file of k_max
rows in ``spill_dir``, the memory is released, and the slab lives in the file from then on; the file is removed by
:meth:`close` / garbage collection, or left behind by a crash) or is refused with :class:`BudgetExceeded`
(``over_budget="refuse"``), before anything is written.

Admission, in this order, each before anything is written: party id (str or int; a repeat raises
:class:`~jitkernels.errors.DuplicateParty`), room (:class:`StoreFull` past k_max), layout (leaf count, shapes,
sizes summing to N, float dtypes: :class:`~jitkernels.errors.LayoutMismatch` naming the party and the leaf),
budget. Then one pass copies the leaves (read in place) into the next row, chunk by chunk, and checks each converted
chunk: a non-finite input value raises :class:`~jitkernels.errors.NonFiniteUpdate`, a finite one that overflows the
slab dtype (1e5 in float16, 1e39 from float64) :class:`~jitkernels.errors.ValueOutOfRange`, both naming the party and
the leaf: a rejected add leaves the store bit-identical (its rows, parties and layout; the free row it wrote into
is not part of it).

Files: :meth:`save` writes the k rows, the parties (in row order), the layout and the configuration as safetensors
with a SHA-256 checksum (:func:`jitkernels.state.checked_bytes`), atomically (:func:`jitkernels.state.atomic_write`);
:meth:`load` verifies it (:class:`~jitkernels.errors.CorruptState` if truncated or altered). Nothing is pickled.
Saving after each add makes a restart lose nothing. Both hold one serialized copy of the rows in memory while they
run (safetensors' bytes), so a save or load of a k-row store peaks at twice the rows.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
import tempfile
import weakref

import numpy as np

from .device import DeviceLeaf, array_module, device_leaf, is_device_array, to_host
from .dtypes import Quantized, bf16_bits_to_float32, bfloat16, dtype_name, is_torch_tensor, torch_to_numpy
from .errors import (AggregationError, CorruptState, DuplicateParty, IncompatibleStates, LayoutMismatch,
                     NonFiniteUpdate, ValueOutOfRange)
from .state import atomic_write, check_format, checked_bytes, checked_writer, read_checked
from .parties import check_party

FORMAT = "jitkernels.updatestore"
VERSION = 1
SLAB_DTYPES = ("float32", "float16", "bfloat16")
INPUT_DTYPES = ("float64", "float32", "float16", "bfloat16")
CHUNK = 1 << 18  # elements converted and checked per step (1 MB of float32): cache-sized temporaries
DEVICE_CHUNK = 1 << 24  # the same on the GPU: each chunk's check waits for the device, so fewer, larger ones
_STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}
_FINITE_MAX = {"float32": float(np.finfo(np.float32).max), "float16": float(np.finfo(np.float16).max),
               "bfloat16": 3.3895313892515355e38}


class StoreFull(AggregationError, RuntimeError):
    """The store already holds k_max updates."""

    def __init__(self, party, k_max: int):
        self.party, self.k_max = party, k_max
        super().__init__(f"party {party!r}: the update store is full ({k_max} rows, its k_max)")


class BudgetExceeded(AggregationError, MemoryError):
    """Admitting the update would pass the store's memory budget, and the store refuses rather than spill."""

    def __init__(self, party, need: int, budget: int,
                 hint: str = "over_budget='refuse'; use 'spill' with a spill_dir to go to disk"):
        self.party, self.need, self.budget = party, need, budget
        super().__init__(f"party {party!r}: its row would bring the update store to {need} bytes, over its budget "
                         f"of {budget} bytes ({hint})")


class SpillFailed(AggregationError, OSError):
    """The spill directory has no room (or no file) for the rows: the store is as it was before the call."""

    def __init__(self, party, spill_dir, err: OSError):
        self.party, self.spill_dir = party, spill_dir
        super().__init__(err.errno, f"party {party!r}: the update store cannot hold its rows in {spill_dir!r}: "
                                    f"{err.strerror or err}")


# Python's mmap module only exports MAP_NORESERVE from 3.13 on; its value is 0x4000 on every Linux architecture.
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def _anonymous(nbytes: int) -> np.ndarray:
    """nbytes of zeroed memory whose pages are committed on first write (no swap reservation)."""
    if nbytes == 0:
        return np.zeros(0, np.uint8)
    try:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)
    except (AttributeError, OSError, ValueError):  # not POSIX: calloc commits lazily on most systems too
        return np.zeros(nbytes, np.uint8)


# --- conversion to the slab dtype (chunk by chunk) -----------------------------------------------------------------
def _f32_to_bf16_bits(f: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (inf stays inf; a finite value may round up to inf)."""
    u = f.view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16).astype(np.uint16)


def _f64_to_f32_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd (truncate, then set the last bit if inexact): rounding that result once more
    to bfloat16 (8 bits) is then the correctly rounded float64 -> bfloat16."""
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    back = f.astype(np.float64)
    u = f.view(np.uint32)
    u -= (np.abs(back) > np.abs(x)).astype(np.uint32)  # rounded away from zero: one step back (sign-magnitude)
    u |= (back != x).astype(np.uint32)
    return f


def _convert_into(dst, src, src_name: str, slab: str) -> None:
    """dst (slab storage) <- src (one chunk of a leaf), converted with round-to-nearest-even. numpy or CuPy arrays
    (the same operations either way); a host chunk into a device slab is uploaded first."""
    if src_name == "bfloat16":  # ml_dtypes bfloat16 (or its bits): take the bits, widen exactly
        src = src.view(np.uint16)
    xp = array_module(dst)
    if xp is not np:
        src = xp.asarray(src)
    if src_name == "bfloat16":
        if slab == "bfloat16":
            dst[...] = src
            return
        src, src_name = bf16_bits_to_float32(src), "float32"
    if slab == "bfloat16":
        if src.dtype.kind in "iu":  # integers: exact in float64 up to 2**53, then rounded once (via round-to-odd)
            f = _f64_to_f32_odd(src.astype(np.float64))
        elif src_name == "float64":
            f = _f64_to_f32_odd(src)
        else:
            f = src.astype(np.float32, copy=False)  # float16 -> float32 is exact
        dst[...] = _f32_to_bf16_bits(f)
    else:
        with np.errstate(over="ignore"):
            dst[...] = src.astype(dst.dtype, copy=False)


def _bad_count(x, slab: str) -> int:
    """Non-finite values in a chunk of slab storage (numpy or CuPy)."""
    xp = array_module(x)
    if slab == "bfloat16":
        return int(xp.count_nonzero((x & np.uint16(0x7F80)) == np.uint16(0x7F80)))
    return int(x.size - xp.count_nonzero(xp.isfinite(x)))


def _nonfinite_in(leaf, name: str) -> int:
    """Non-finite values in one input leaf (chunked: no leaf-sized temporary)."""
    n = 0
    for a in range(0, leaf.size, CHUNK):
        c = leaf[a:a + CHUNK]
        xp = array_module(c)
        if name == "bfloat16":
            n += int(xp.count_nonzero((c.view(np.uint16) & np.uint16(0x7F80)) == np.uint16(0x7F80)))
        else:
            n += int(c.size - xp.count_nonzero(xp.isfinite(c)))
    return n


class _Dequantized:
    """A :class:`Quantized` leaf read as float64, chunk by chunk: ``fl64(q) * fl64(scale)``, exact (8 x 24 bits),
    so that the store's conversion rounds it once, to the bits of the streaming fold's ``fl32(q) * fl32(scale)`` in a
    float32 slab, and refuses a value past the slab's range by name. Chunks, not the whole leaf: its float64 form
    would be 8 bytes per element, beside the store's chunk-sized temporaries."""

    dtype = np.dtype(np.float64)

    def __init__(self, q: Quantized):
        self.q = q
        self.shape, self.size, self.ndim = tuple(q.values.shape), int(q.values.size), q.values.ndim

    def reshape(self, *shape):  # (the store's flat view of a leaf)
        return self

    def __getitem__(self, s: slice):
        return self.q.dequantize("float64", s.start or 0, s.stop)


def _check_values(leaves, party, slab: str, xp=np) -> None:
    """Raise NonFiniteUpdate / ValueOutOfRange if a leaf, converted to the slab dtype, holds non-finite values
    (converted through a chunk-sized temporary, in ``xp``'s memory; nothing is written)."""
    tmp = xp.empty(CHUNK, _STORAGE[slab])
    for name, flat, dn, _ in leaves:
        over = 0
        for a in range(0, flat.size, CHUNK):
            src = flat[a:a + CHUNK]
            t = tmp[:src.size]
            _convert_into(t, src, dn, slab)
            over += _bad_count(t, slab)
        if over:
            bad_in = _nonfinite_in(flat, dn)
            if bad_in:
                raise NonFiniteUpdate(party, name, bad_in)
            raise ValueOutOfRange(f"party {party!r}: leaf {name!r} holds {over} value(s) that round beyond the "
                                  f"{slab} range (largest finite {_FINITE_MAX[slab]:.6g})", party=party, leaf=name)


class UpdateStore:
    """A k_max x N slab holding a round's updates, one row per admitted party (module docstring).

    >>> store = UpdateStore(n=model_size, k_max=64, budget_bytes=2 << 30, over_budget="spill", spill_dir="/scratch")
    >>> store.add(update_leaves, party="hospital-3")      # doctest: +SKIP
    >>> from jitkernels.robust_coord import coordinate_median
    >>> store.unflatten(coordinate_median(store))           # doctest: +SKIP

    ``shapes``: the leaf shapes of the layout (a list of tuples), or None to take them from the first update given as
    leaves. A flat 1-D array of N values is always accepted in place of the leaves.

    Not thread-safe: admit from one thread (or under a lock); the kernels may then read :meth:`rows` from any thread.
    """

    on_device = False
    chunk = CHUNK

    def __init__(self, n: int, k_max: int, *, dtype: str = "float32", budget_bytes: int | None = None,
                 over_budget: str = "refuse", spill_dir=None, shapes=None):
        self.n = int(n)
        self.k_max = int(k_max)
        if self.n < 0 or self.k_max < 1:
            raise ValueError(f"need n >= 0 and k_max >= 1, got n={n}, k_max={k_max}")
        dtype = dtype_name(dtype) if not isinstance(dtype, str) else dtype
        if dtype not in SLAB_DTYPES:
            raise ValueError(f"slab dtype must be one of {SLAB_DTYPES}, got {dtype!r}")
        self.dtype = dtype
        self._set_budget(budget_bytes, over_budget, spill_dir)
        if shapes is not None and not all(isinstance(s, (list, tuple)) and all(
                isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in s) for s in shapes):
            raise ValueError(f"shapes must be lists of dimensions >= 0, got {shapes!r}")
        self.shapes = None if shapes is None else tuple(tuple(int(d) for d in s) for s in shapes)
        if self.shapes is not None and sum(math.prod(s) for s in self.shapes) != self.n:
            raise ValueError(f"shapes {self.shapes} do not hold n={self.n} values")
        self._parties: list = []
        self._index: dict = {}
        # the leaf names of the first update given as a dict: later dicts are read in their order (a party whose
        # dict listed the same leaves in another order had them stored in each other's place)
        self.names: tuple | None = None
        self._slab = None  # [k_max, n] storage: an anonymous mapping or a file-backed memmap
        self.spill_path = None
        self._spilled_rows = 0  # rows of the spill file whose blocks are reserved (see _reserve)
        self._finalizer = None
        self._allocate()

    def _set_budget(self, budget_bytes, over_budget, spill_dir) -> None:
        if over_budget not in ("spill", "refuse"):
            raise ValueError(f"over_budget must be 'spill' or 'refuse', got {over_budget!r}")
        if over_budget == "spill" and spill_dir is None and budget_bytes is not None:
            raise ValueError("over_budget='spill' needs a spill_dir")
        if budget_bytes is not None and int(budget_bytes) < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = None if budget_bytes is None else int(budget_bytes)
        self.over_budget = over_budget
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)

    def set_budget(self, budget_bytes=None, over_budget: str = "refuse", spill_dir=None) -> None:
        """Bound a store that has rows already (one loaded with its fold state: the budget and the spill directory
        are this machine's): later rows follow the new rule, and a spilling store whose rows pass the budget now
        goes to disk at once. A refusing store keeps the rows it has."""
        self._set_budget(budget_bytes, over_budget, spill_dir)
        if (self.budget_bytes is not None and not self.spilled and self.over_budget == "spill"
                and self.nbytes > self.budget_bytes):
            self._spill(self.k, self._parties[-1])

    # --- storage ---------------------------------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return _STORAGE[self.dtype].itemsize

    @property
    def row_bytes(self) -> int:
        return self.n * self.itemsize

    def _allocate(self):
        self._slab = _anonymous(self.k_max * self.row_bytes).view(_STORAGE[self.dtype]).reshape(self.k_max, self.n)
        self.closed = False

    def _reserve(self, k: int, party=None) -> None:
        """Room for k rows in the slab: the host slab has all k_max from the start (committed as written); a
        spilled one has the file's blocks for them allocated before any is written through the mapping, where a
        full disk is a SIGBUS that kills the process, not an error (SpillFailed here instead)."""
        if self.spill_path is None or k <= self._spilled_rows:
            return
        try:
            fd = os.open(self.spill_path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, k * self.row_bytes)
            finally:
                os.close(fd)
        except OSError as e:
            raise SpillFailed(party, self.spill_dir, e) from None
        self._spilled_rows = k

    def _stored(self, rows):
        """Rows given to :meth:`_append` (host or device) as this slab's assignments take them."""
        return to_host(rows)

    def _spill(self, rows: int, party):
        """Move the slab into a sparse file of k_max rows in spill_dir, the blocks of ``rows`` rows reserved (the
        rows in use and those about to be added); the memory is released. SpillFailed leaves the slab in memory."""
        try:
            os.makedirs(self.spill_dir, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="jk-updates-", suffix=".slab", dir=self.spill_dir)
        except OSError as e:
            raise SpillFailed(party, self.spill_dir, e) from None
        os.close(fd)
        try:
            mm = np.memmap(path, dtype=_STORAGE[self.dtype], mode="w+", shape=(self.k_max, max(self.n, 1)))
            self.spill_path, self._spilled_rows = path, 0
            self._reserve(rows, party)
        except BaseException as e:
            self.spill_path = None
            os.unlink(path)
            if isinstance(e, OSError) and not isinstance(e, SpillFailed):
                raise SpillFailed(party, self.spill_dir, e) from None
            raise
        mm = mm[:, :self.n]
        for r in range(len(self._parties)):  # row by row: no k-row temporary
            mm[r] = self._slab[r]
        self._slab = mm
        self._finalizer = weakref.finalize(self, _remove, path)

    @property
    def spilled(self) -> bool:
        """The slab lives in a file (spill_path) rather than memory."""
        return self.spill_path is not None

    @property
    def k(self) -> int:
        return len(self._parties)

    def __len__(self) -> int:
        return len(self._parties)

    def __contains__(self, party) -> bool:
        return party in self._index

    @property
    def parties(self) -> tuple:
        """Party ids in row order."""
        return tuple(self._parties)

    def row_of(self, party) -> int:
        return self._index[party]

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in use (what the budget bounds)."""
        return self.k * self.row_bytes

    def rows(self) -> np.ndarray:
        """The [k, N] read-only view of the filled rows, as stored (uint16 bits for bfloat16). No copy."""
        v = self._slab[:self.k]
        v = v.view(np.ndarray) if isinstance(v, np.memmap) else v[...]
        v.flags.writeable = False
        return v

    def row(self, i: int) -> np.ndarray:
        """Row i widened to float32 (a copy; exact)."""
        from .robust_coord import CODES, widen

        if not 0 <= i < self.k:
            raise IndexError(f"row {i} of {self.k}")
        return widen(self._slab[i], CODES[self.dtype])

    def unflatten(self, flat: np.ndarray) -> list:
        """Split a flat [N] array (an aggregate) into the layout's leaves (views)."""
        flat = flat if hasattr(flat, "reshape") else np.asarray(flat)
        if flat.shape != (self.n,):
            raise ValueError(f"expected a flat array of {self.n} values, got shape {flat.shape}")
        if self.shapes is None:
            return [flat]
        out, o = [], 0
        for s in self.shapes:
            size = int(np.prod(s))
            out.append(flat[o:o + size].reshape(s))
            o += size
        return out

    def __repr__(self):
        where = f"spilled to {self.spill_path}" if self.spilled else "in GPU memory" if self.on_device else "in memory"
        return f"UpdateStore({self.k}/{self.k_max} rows of {self.dtype}[{self.n}], {where})"

    # --- admission -------------------------------------------------------------------------------------------------
    def _leaves(self, update, party) -> list:
        """[(name, flat numpy view, dtype name, shape)] of an update, validated against the layout."""
        if isinstance(update, dict):
            if self.names is not None and len(update) == len(self.names) and tuple(update) != self.names:
                if set(update) != set(self.names):  # (another count of leaves: the checks below name it)
                    odd = sorted(set(update).symmetric_difference(self.names), key=str)[:3]
                    raise LayoutMismatch(f"leaves {odd} differ from the store's {list(self.names)[:6]}", party=party)
                update = {name: update[name] for name in self.names}
            items = list(update.items())
        elif isinstance(update, (list, tuple)):
            items = [(str(i), a) for i, a in enumerate(update)]
        else:
            items = [("0", update)]
        leaves = []
        for name, a in items:
            a, dn = self._array(a)
            if dn not in INPUT_DTYPES and a.dtype.kind not in "iu":
                raise LayoutMismatch(f"dtype {dn} is neither a float dtype ({', '.join(INPUT_DTYPES)}) nor an "
                                     f"integer one", leaf=name, party=party)
            leaves.append((name, a, dn))
        flat_form = len(leaves) == 1 and leaves[0][1].ndim == 1 and leaves[0][1].size == self.n
        if self.shapes is not None and not flat_form:  # leaf by leaf first: the error names the leaf
            if len(leaves) != len(self.shapes):
                raise LayoutMismatch(f"{len(leaves)} leaves; the layout has {len(self.shapes)}", party=party)
            for (name, a, _), s in zip(leaves, self.shapes):
                if a.shape != s:
                    raise LayoutMismatch(f"shape {a.shape}; the layout's is {s}", leaf=name, party=party)
        total = sum(a.size for _, a, _ in leaves)
        if total != self.n:
            raise LayoutMismatch(f"the update holds {total} values; the store's rows hold {self.n}", party=party)
        # (name, flat view, dtype name, shape); reshape copies only a non-contiguous leaf
        return [(name, a.reshape(-1), dn, a.shape) for name, a, dn in leaves]

    def _array(self, a) -> tuple:
        """(array, dtype name) of one leaf as add reads it: a host array (torch CPU tensors viewed as numpy); a leaf
        in GPU memory is refused by name, the caller copies it (a GPU aggregator keeps a DeviceUpdateStore)."""
        if isinstance(a, DeviceLeaf) or is_device_array(a) or (isinstance(a, Quantized) and a.on_device):
            raise TypeError("a leaf in GPU memory for a host update store: copy it to the host, or keep the updates "
                            "in a DeviceUpdateStore")
        if isinstance(a, Quantized):
            return _Dequantized(a), "float64"
        if is_torch_tensor(a):
            a = torch_to_numpy(a)
        a = np.asarray(a)
        return a, dtype_name(a.dtype)

    def check_room(self, k: int, party=None) -> None:
        """Raise what adding rows up to k in all would raise for room: StoreFull past k_max, BudgetExceeded past the
        budget when the store refuses (a spilling store has room up to k_max). Lets a batch be all or nothing."""
        if k > self.k_max:
            raise StoreFull(party, self.k_max)
        need = k * self.row_bytes
        if (self.budget_bytes is not None and not self.spilled and need > self.budget_bytes
                and self.over_budget == "refuse"):
            raise BudgetExceeded(party, need, self.budget_bytes)

    def _spills_at(self, k: int) -> bool:
        """Whether k rows in all move this store to disk (a spilling one: a refusing one keeps rows it has)."""
        return (self.over_budget == "spill" and self.budget_bytes is not None and not self.spilled
                and k * self.row_bytes > self.budget_bytes)

    def _make_room(self, k: int, party) -> None:
        """check_room, then spill if k rows pass the budget of a spilling store."""
        self.check_room(k, party)
        if self._spills_at(k):
            self._spill(k, party)

    def add_many(self, updates, parties, *, finite: bool = False) -> None:
        """:meth:`add` each update, all or nothing: room is checked for the whole batch first, a batch that moves
        the store to disk has every update's values checked before (a refused one must not leave the slab in a
        file), and a row refused partway takes the batch's rows back out."""
        if not parties:
            return
        k0, names = len(self._parties), self.names
        for j, p in enumerate(parties):  # the first row past the room names its party and the store's size then
            self.check_room(k0 + j + 1, party=p)
        spilled_here = self._spills_at(k0 + len(parties))
        if spilled_here:  # values first, then the file with every row of the batch reserved (one SpillFailed, before)
            for u, p in zip(updates, parties):
                _check_values(self._leaves(u, p), p, self.dtype)
            self._spill(k0 + len(parties), parties[0])
        try:
            for u, p in zip(updates, parties):
                self.add(u, p, finite=finite)
        except BaseException:
            self.truncate(k0)
            self.names = names
            if spilled_here:  # (its k0 rows were within the budget, in memory)
                self._unspill()
            raise

    def _unspill(self) -> None:
        """Bring a slab that spilled back into memory (its rows within the budget), the file removed."""
        mm = self._slab
        self._allocate()
        for r in range(len(self._parties)):
            self._slab[r] = mm[r]
        del mm
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.spill_path, self._spilled_rows = None, 0

    def add(self, update, party, *, finite: bool = False) -> int:
        """Copy an update (one array, a list of leaves, or a dict of leaves) into the next free row; its row index.

        Raises, leaving the store bit-identical: DuplicateParty, StoreFull, LayoutMismatch, BudgetExceeded,
        NonFiniteUpdate, ValueOutOfRange (module docstring). Reads each leaf once, in place. ``finite``: the values
        are known finite (an admitted update: admission counted them); leaves that the slab's dtype holds exactly
        (the same dtype, or float16/bfloat16 into float32) then skip the per-chunk check of the converted values, a
        second pass over the row (``clear(release=False)`` and a 25M x 10 float32 fill on 2 vCPUs: 164-171 ->
        137-140 ms)."""
        party = check_party(party)
        if self.closed:
            raise ValueError("the update store was closed (its slab is released): clear() makes a new one")
        if party in self._index:
            raise DuplicateParty(party, "this update store")
        k = len(self._parties)
        if k >= self.k_max:
            raise StoreFull(party, self.k_max)
        leaves = self._leaves(update, party)
        self.check_room(k + 1, party)
        if self._spills_at(k + 1):
            _check_values(leaves, party, self.dtype)  # a dry run: a rejected update must not move the slab
            self._spill(k + 1, party)
        self._reserve(k + 1, party)
        row = self._slab[k]
        off = 0
        for name, flat, dn, _ in leaves:
            exact = finite and (dn == self.dtype or (self.dtype == "float32" and dn in ("float16", "bfloat16")))
            for a in range(0, flat.size, self.chunk):
                src = flat[a:a + self.chunk]
                dst = row[off + a:off + a + src.size]
                _convert_into(dst, src, dn, self.dtype)
                if not exact and _bad_count(dst, self.dtype):
                    _check_values([(name, flat, dn, None)], party, self.dtype, array_module(row))
                    raise AssertionError("unreachable: a bad chunk must fail the check")  # pragma: no cover
            off += flat.size
        self._parties.append(party)
        self._index[party] = k
        if self.shapes is None and not (len(leaves) == 1 and len(leaves[0][3]) == 1):
            self.shapes = tuple(shape for _, _, _, shape in leaves)
        if self.names is None and isinstance(update, dict):
            self.names = tuple(update)
        return k

    def clear(self, *, release: bool = True) -> None:
        """Empty the store for the next round (configuration and layout kept).

        ``release=True`` returns the memory (or removes the spill file); views from rows() keep the old memory alive
        until they are dropped. ``release=False`` keeps the pages, and the old rows in them until the next round's
        adds overwrite them (nothing reads a row past k, and each add writes its whole row, so nothing is zeroed):
        the next round's rows are then already resident, which makes an add several times faster than writing into
        fresh pages (first-touch page faults dominate an add: ~70 ms vs ~12 ms for 100 MB here)."""
        if release or self._slab is None:
            self.close()
            self._allocate()
        self._parties, self._index = [], {}

    def truncate(self, k: int) -> None:
        """Drop the rows from ``k`` on (free again; their values stay until overwritten): undoes the adds of a
        batch that failed partway."""
        if k < len(self._parties):
            for p in self._parties[k:]:
                del self._index[p]
            del self._parties[k:]

    def close(self) -> None:
        """Release the slab (and remove the spill file). The store is empty afterwards."""
        self._slab = array_module(self._slab).zeros((0, self.n), _STORAGE[self.dtype])
        self._parties, self._index = [], {}
        self.closed = True
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self.spill_path, self._spilled_rows = None, 0

    # --- whole stores ----------------------------------------------------------------------------------------------
    def describe(self) -> dict:
        """JSON-able ``k_max``, ``dtype``, ``parties`` (row order) and ``names`` (the dict updates' leaf order, or
        None): with the rows, what :meth:`from_rows` needs. The budget and spill directory are this machine's and are
        not included."""
        return {"k_max": self.k_max, "dtype": self.dtype, "parties": list(self._parties), "names": self._saved_names()}

    def _saved_names(self):
        """The leaf names as a file keeps them (JSON: str or int keys), else None (kept in memory only)."""
        keep = self.names is not None and all(type(n) in (str, int) for n in self.names)
        return list(self.names) if keep else None

    @classmethod
    def from_rows(cls, rows, *, k_max: int, dtype: str, parties, shapes=None, budget_bytes=None,
                  over_budget: str = "refuse", spill_dir=None, names=None) -> "UpdateStore":
        """A store holding ``rows`` ([k, N] as stored: float32, float16, or uint16 / bfloat16 for bfloat16) for
        ``parties`` (k ids, row order); ``names``: the leaf order of dict updates, where the rows came from dicts.
        ValueError / TypeError if they are inconsistent or hold non-finite values; BudgetExceeded where the rows
        pass a refusing budget. The rows are copied in, one at a time."""
        if names is not None and not (isinstance(names, (list, tuple)) and all(type(n) in (str, int) for n in names)
                                      and len(set(names)) == len(names)):
            raise ValueError(f"names must be distinct leaf names (str or int keys), got {names!r}")
        rows = rows if is_device_array(rows) else np.asarray(rows)
        if dtype == "bfloat16" and rows.dtype == bfloat16:
            rows = rows.view(np.uint16)  # ml_dtypes bfloat16 (other rows are refused below, not read as its bits)
        if not isinstance(parties, (list, tuple)):
            raise ValueError(f"parties must be a list of ids, got {type(parties).__name__}")
        parties = [check_party(p) for p in parties]
        if rows.ndim != 2:
            raise ValueError(f"rows must be [k, N], got shape {rows.shape}")
        store = cls(rows.shape[1], k_max, dtype=dtype, budget_bytes=budget_bytes, over_budget=over_budget,
                    spill_dir=spill_dir, shapes=shapes)
        k = len(parties)
        if k > store.k_max:
            raise ValueError(f"{k} rows for a store of k_max {store.k_max}")
        if rows.dtype != _STORAGE[store.dtype] or rows.shape[0] != k or len(set(parties)) != k:
            raise ValueError(f"{rows.dtype}{rows.shape} rows for {k} distinct parties in a {store.dtype} store")
        for r in range(k):
            if _bad_count(rows[r], store.dtype):
                raise ValueError(f"row {r} (party {parties[r]!r}) holds non-finite values")
        store._append(rows, parties)
        store.names = None if names is None else tuple(names)
        return store

    def _append(self, rows, parties) -> None:
        """Append checked rows (as stored) for new parties: room first (all or nothing), then row by row."""
        if self.closed:
            raise ValueError("the update store was closed (its slab is released): clear() makes a new one")
        k = len(self._parties)
        if parties:
            self._make_room(k + len(parties), parties[-1])
            self._reserve(k + len(parties), parties[-1])
        for r, p in enumerate(parties):
            self._slab[k + r] = self._stored(rows[r])
        self._parties.extend(parties)
        self._index.update({p: k + r for r, p in enumerate(parties)})

    def copy(self) -> "UpdateStore":
        """An independent store with the same rows, parties and configuration (a spilled store spills again)."""
        return self._copy_as(type(self))

    def placed(self, on_device: bool) -> "UpdateStore":
        """This store where an aggregator in GPU memory (``on_device``) or in host memory keeps it
        (:func:`store_class`): itself when it is there already, else a copy of the other kind."""
        kind = store_class(on_device, self.over_budget)
        return self if type(self) is kind else self._copy_as(kind)

    def _copy_as(self, kind) -> "UpdateStore":
        return _rebuilt(kind, *self._parts())

    def _parts(self) -> tuple:
        return self.rows(), self.describe(), self.shapes, self.budget_bytes, self.over_budget, self.spill_dir, self.names

    def __reduce__(self):
        # (copy.deepcopy and pickle, of an aggregator or a Flower strategy holding one: the rows in use, rebuilt as
        # copy() does; by default the whole k_max x N reservation was copied, 1.5 GB for 3 rows of 100k, and a
        # spilled store's copy wrote into the original's file)
        return _rebuilt, (type(self), *self._parts())

    def extend(self, other: "UpdateStore") -> None:
        """Append another store's rows and parties (merging two partial states): all or nothing. Raises
        IncompatibleStates (other size or dtype), DuplicateParty, StoreFull, BudgetExceeded."""
        if other.n != self.n or other.dtype != self.dtype:
            raise IncompatibleStates(f"update stores differ: {other.dtype}[{other.n}] into {self.dtype}[{self.n}]")
        if self.names is not None and other.names is not None and self.names != other.names:
            raise IncompatibleStates(f"update stores hold their leaves in other orders: {list(other.names)[:6]} "
                                     f"into {list(self.names)[:6]}")
        shared = [p for p in other.parties if p in self._index]
        if shared:
            raise DuplicateParty(shared[0], "this update store")
        self._append(other.rows(), list(other.parties))
        self.names = self.names or other.names

    def _metadata(self) -> dict:
        return {
            "format": FORMAT, "version": str(VERSION), "n": str(self.n), "k_max": str(self.k_max),
            "dtype": self.dtype, "parties": json.dumps(self._parties),
            "names": json.dumps(self._saved_names()),
            "shapes": json.dumps(None if self.shapes is None else [list(s) for s in self.shapes]),
            "budget_bytes": json.dumps(self.budget_bytes), "over_budget": self.over_budget,
            "spill_dir": json.dumps(self.spill_dir),
        }

    def _file(self) -> tuple:
        return {"rows": np.ascontiguousarray(to_host(self.rows()))}, self._metadata()

    def to_bytes(self) -> bytes:
        return checked_bytes(*self._file())

    def save(self, path, *, on_step=None) -> None:
        """Write the k rows and the configuration atomically (temp file, fsync, rename, fsync the directory)."""
        atomic_write(os.fspath(path), checked_writer(*self._file()), on_step=on_step)

    _UNSET = object()

    @classmethod
    def load(cls, path, *, budget_bytes=_UNSET, over_budget=None, spill_dir=None) -> "UpdateStore":
        """Load and verify a saved store (CorruptState if truncated, altered, inconsistent or of another version).
        The budget and its rule come from the file unless given; a spill directory only from the caller (the file's
        is recorded, never used: a store file is not trusted to choose where this process writes), and without one
        the rule is to refuse. Rows that pass the budget spill or raise BudgetExceeded as add would: a store that
        spilled needs ``spill_dir`` here (or ``budget_bytes=None``, to hold it in memory)."""
        if over_budget == "spill" and spill_dir is None:  # (the caller's mistake, not a corrupt file)
            raise ValueError("over_budget='spill' needs a spill_dir")
        path = os.fspath(path)
        tensors, meta = read_checked(path, what="update store file")
        check_format(path, meta, FORMAT, (VERSION,), "jitkernels update store")
        try:
            rows = tensors["rows"]
            if rows.ndim != 2 or rows.shape[1] != int(meta["n"]):
                raise ValueError(f"rows of shape {rows.shape} for n={meta['n']}")
            return cls.from_rows(
                rows, k_max=int(meta["k_max"]), dtype=meta["dtype"], parties=json.loads(meta["parties"]),
                shapes=json.loads(meta["shapes"]), names=json.loads(meta.get("names", "null")),  # (older: none)
                budget_bytes=json.loads(meta["budget_bytes"]) if budget_bytes is cls._UNSET else budget_bytes,
                over_budget=over_budget or (meta["over_budget"] if spill_dir is not None else "refuse"),
                spill_dir=spill_dir)
        except BudgetExceeded as e:  # (a MemoryError: the rows pass the budget given, as an add would)
            if over_budget is None and spill_dir is None and meta.get("over_budget") == "spill":
                raise BudgetExceeded(e.party, e.need, e.budget, "the store was saved with over_budget='spill': load "
                                     "it with a spill_dir, or with budget_bytes=None to hold it in memory") from None
            raise
        except (KeyError, ValueError, TypeError, OverflowError, MemoryError, OSError, RecursionError) as e:
            raise CorruptState(f"{path}: inconsistent update store ({type(e).__name__}: {str(e)[:300]})") from e


def _rebuilt(kind, rows, described, shapes, budget_bytes, over_budget, spill_dir, names) -> "UpdateStore":
    """A store of ``kind`` holding ``rows``, as another was (a spilled one spills again, into a file of its own)."""
    store = kind.from_rows(rows, **described, shapes=shapes, budget_bytes=budget_bytes, over_budget=over_budget,
                           spill_dir=spill_dir)
    store.names = names  # (also names a file could not keep)
    return store


class DeviceUpdateStore(UpdateStore):
    """An :class:`UpdateStore` whose slab is in GPU memory (CuPy): a GPU aggregator's robust rules read it there
    (the coordinate kernels of :mod:`jitkernels.robust_coord` and the Gram rules of :mod:`jitkernels.robust_gram`,
    both on CuPy), and its updates, already on the GPU, are copied into it device to device; host updates are
    uploaded chunk by chunk. Admission, errors, budget and files are the host store's. Two differences:

    * GPU memory is not committed as it is written, so the slab grows: its capacity doubles (the rows copied on the
      device) up to k_max rows, and never past the rows the budget allows.
    * Over its budget it refuses (:class:`BudgetExceeded`): there is no file to spill to. A GPU aggregator whose
      rule says ``over_budget="spill"`` keeps a host store instead (:func:`store_class`).

    Growing holds the old and the new slab for a moment (CuPy cannot grow an allocation in place): up to 3x the
    rows in use, or the budget's rows plus the old capacity with a budget; a device out of memory then raises
    CuPy's OutOfMemoryError and leaves the store as it was. :meth:`rows` is a CuPy array, writable (CuPy has no
    read-only flag: the rules only read it); :meth:`save` and :meth:`to_bytes` copy the rows to the host.
    """

    on_device = True
    chunk = DEVICE_CHUNK
    FIRST_ROWS = 8

    @property
    def xp(self):
        import cupy

        return cupy

    def __init__(self, n: int, k_max: int, *, dtype: str = "float32", budget_bytes: int | None = None,
                 over_budget: str = "refuse", spill_dir=None, shapes=None):
        if over_budget != "refuse":
            raise ValueError("a store in GPU memory refuses updates over its budget (over_budget='refuse'); one "
                             "that spills to disk lives in host memory (UpdateStore)")
        super().__init__(n, k_max, dtype=dtype, budget_bytes=budget_bytes, shapes=shapes)

    def _allocate(self):
        self._slab = self.xp.zeros((0, self.n), _STORAGE[self.dtype])
        self.closed = False

    @classmethod
    def load(cls, path, *, budget_bytes=UpdateStore._UNSET, over_budget=None) -> "UpdateStore":
        """:meth:`UpdateStore.load` into GPU memory: a file saved by a store that spilled loads as a refusing one
        (a store in GPU memory has no file to spill to)."""
        return super().load(path, budget_bytes=budget_bytes, over_budget=over_budget or "refuse")

    def _reserve(self, k: int, party=None) -> None:
        cap = self._slab.shape[0]
        if k <= cap:
            return
        limit = self.k_max
        if self.budget_bytes is not None and self.row_bytes:
            limit = max(k, min(limit, self.budget_bytes // self.row_bytes))
        grown = self.xp.empty((min(limit, max(k, 2 * cap, self.FIRST_ROWS)), self.n), _STORAGE[self.dtype])
        grown[:self.k] = self._slab[:self.k]
        self._slab = grown

    def _stored(self, rows):
        return self.xp.asarray(rows)

    def _array(self, a) -> tuple:
        """A leaf in GPU memory (CuPy, torch CUDA, DeviceLeaf) as its CuPy view, read in place; a host leaf as
        the host store reads it (uploaded chunk by chunk as it is converted)."""
        if isinstance(a, DeviceLeaf) or is_device_array(a):
            leaf = a if isinstance(a, DeviceLeaf) else device_leaf(a)
            return leaf.array, dtype_name(leaf.dtype)
        if isinstance(a, Quantized):  # dequantized on the device: host values and scales go up as they are (1 byte
            # an element, not the 8 of their float64 chunks)
            if not a.on_device:
                a = Quantized(self.xp.asarray(a.values), self.xp.asarray(a.scale), a.block)
            return _Dequantized(a), "float64"
        return super()._array(a)

    def rows(self):
        """The [k, N] CuPy view of the filled rows, as stored (uint16 bits for bfloat16). No copy."""
        return self._slab[:self.k]

    def row(self, i: int) -> np.ndarray:
        """Row i widened to float32, in host memory (a copy; exact)."""
        from .robust_coord import CODES, widen

        if not 0 <= i < self.k:
            raise IndexError(f"row {i} of {self.k}")
        return widen(to_host(self._slab[i]), CODES[self.dtype])


def store_class(on_device: bool, over_budget: str):
    """The store an aggregator keeps a round's updates in: in GPU memory for a GPU aggregator (its updates are
    there, and so are the rules' kernels), unless the rule may spill to disk (``over_budget="spill"``), which only
    a host store does."""
    return DeviceUpdateStore if on_device and over_budget != "spill" else UpdateStore


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
