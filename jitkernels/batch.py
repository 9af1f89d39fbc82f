"""Pointer tables: how k updates' leaves reach a kernel without being copied (apex's multi_tensor_apply idea).

A :class:`Group` holds, for the leaves of one input dtype, a table ``ptr[row, j]`` of the addresses of update j's
leaf (0 where update j lacks it), its fold weight ``w[row, j]`` (and for int8, the address of its scales and their
block size), the leaf's offset and length in the flat accumulator, and a list of work items ``(row, start, len)``
that cut every leaf into cache-sized chunks. Compiled backends parallelize over work items; within an item they run
updates in order, so each element sees the same operations in the same order on every backend and thread count.

Groups of one batch run in the fixed order of :data:`GROUP_ORDER`: a leaf that some updates send quantized and
others raw is folded raw-first, then quantized, in batch order within each.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np

from .device import DeviceLeaf
from .dtypes import Quantized, dtype_name, is_float_name

GROUP_ORDER = ("float64", "float32", "float16", "bfloat16", "int8")
CODE = {name: i for i, name in enumerate(GROUP_ORDER)}
INT_CODE = -1  # integer leaves: folded on the host (see Aggregator's int_leaves rule)
ABSENT = -2

CHUNK = 8192
"""Elements per work item: one accumulator chunk (32 KiB fp32) stays in L1/L2 while k updates stream through it."""

MANY_UPDATES = 16
TILE = 65536
"""Past MANY_UPDATES updates, kernels walk each thread's share of the work items in tiles of TILE elements,
update-major (:func:`walk`, which both compiled backends take as data; csrc/kernels.h ``walk_blocks`` says why)."""


def dtype_code(name: str) -> int:
    """The group code of a leaf of dtype ``name``: its float group, else INT_CODE. An int8 array is an integer
    leaf: only a :class:`Quantized` leaf (int8 values with scales) is folded by the int8 group."""
    return CODE[name] if is_float_name(name) else INT_CODE


def leaf_entry(a):
    """(code, data address, scale address, block) of one flattened leaf."""
    if a is None:
        return ABSENT, 0, 0, 0
    if isinstance(a, Quantized):
        return CODE["int8"], address(a.values), address(a.scale), a.block
    return dtype_code(dtype_name(a.dtype)), address(a), 0, 0


def address(a) -> int:
    """The first byte of a host array or device leaf (0 if it is empty): what the kernels are given."""
    if isinstance(a, DeviceLeaf):
        return a.ptr
    if not isinstance(a, np.ndarray):  # a device Quantized leaf's values or scales (CuPy arrays)
        return int(a.data.ptr) if a.size else 0
    return a.__array_interface__["data"][0] if a.size else 0


def work_items(n: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """(row, start, len) chunks covering rows of lengths ``n``; empty rows get none."""
    n = np.asarray(n, dtype=np.int64)
    counts = -(-n // chunk)
    rows = np.repeat(np.arange(n.size, dtype=np.int64), counts)
    first = np.cumsum(counts) - counts
    start = (np.arange(rows.size, dtype=np.int64) - np.repeat(first, counts)) * chunk
    length = np.minimum(chunk, n[rows] - start)
    return np.ascontiguousarray(np.stack([rows, start, length], axis=1))


def threads_for(g, nthreads: int) -> int:
    """One thread for small calls: waking a thread pool costs tens of microseconds, more than folding ~256K
    elements on one core."""
    return 1 if g.elements * g.k < SMALL_CALL else nthreads


SMALL_CALL = 1 << 18


@dataclass
class Group:
    """Leaves of one input dtype across k updates, as tables for the compiled kernels and arrays for numpy."""

    in_dtype: str
    leaf_ids: np.ndarray  # int64[R]: layout leaf index of each row
    off: np.ndarray  # int64[R]: offset of the leaf in the flat accumulator
    n: np.ndarray  # int64[R]: elements
    ptr: np.ndarray  # int64[R, k]: leaf address, 0 = absent
    w: np.ndarray  # float64[R, k]: fold weight (0 where absent)
    scale_ptr: np.ndarray  # int64[R, k]: int8 only
    block: np.ndarray  # int64[R, k]: int8 only
    leaves: list = field(repr=False)  # [k]: each update's flattened leaves; keeps them alive during the call
    mask: np.ndarray | None = field(repr=False)  # bool[R, k]: update j carries row i (None: every update, every row)
    work: np.ndarray  # int64[m, 3]
    device: np.ndarray | None = None  # bool[k]: update j is in GPU memory (None: all on the host)
    elements: int = 0  # sum of n: the elements of one update's rows
    row_starts: np.ndarray | None = None  # first work item of each row (None: one item per row, in row order)
    plan: _GroupPlan | None = field(default=None, repr=False)  # what it was built from (caches its walks, ...)

    @cached_property  # read several times a call (threads_for, walk) by a per-update fold that reuses its group
    def k(self) -> int:
        return self.ptr.shape[1]

    def columns(self, j0: int, j1: int) -> "Group":
        """The same rows for updates j0:j1 alone (deterministic mode folds a very large batch in parts)."""
        def cut(a):
            return None if a is None else np.ascontiguousarray(a[..., j0:j1])
        return replace(self, ptr=cut(self.ptr), w=cut(self.w), scale_ptr=cut(self.scale_ptr), block=cut(self.block),
                       leaves=self.leaves[j0:j1], mask=cut(self.mask), device=cut(self.device), plan=None)

    def repoint(self, entries: np.ndarray, weight: float, leaves: list) -> None:
        """Rewrite a one-update group in place for another update of the same signature (the same dtype in every
        leaf, so the same plan): its address tables from ``entries`` (the update's int64[L, 4] table), its weight,
        its leaves. A per-update fold reuses its group: building one costs more than folding a small update."""
        e = entries if self.plan.every_row else entries[self.leaf_ids]
        self.ptr[:, 0] = e[:, 1]
        if self.in_dtype == "int8":  # the other dtypes' scale and block entries are 0
            self.scale_ptr[:, 0] = e[:, 2]
            self.block[:, 0] = e[:, 3]
        self.w.fill(weight)
        self.leaves = [leaves]
        self.__dict__.pop("arrays", None)

    def release(self) -> None:
        """Drop the update a reused group points at (its leaves would stay alive until the next fold)."""
        self.ptr.fill(0)
        self.leaves = []
        self.__dict__.pop("arrays", None)

    @cached_property
    def arrays(self) -> list:
        """[R][k]: the leaves themselves (None = absent), for the backends that take arrays rather than addresses
        (built on first use: a compiled fold of 100 small updates would spend more on this list than on its call)."""
        rows = self.leaf_ids.tolist()
        if self.mask is None:
            return [[lv[r] for lv in self.leaves] for r in rows]
        return [[lv[r] if m else None for lv, m in zip(self.leaves, mrow)]
                for r, mrow in zip(rows, self.mask.tolist())]


def stack_entries(entries) -> np.ndarray:
    """int64[L, k, 4]: the k updates' leaf tables (``leaf_entry`` rows) side by side (a stacked table passes as is)."""
    if isinstance(entries, np.ndarray):
        return entries
    if len(entries) == 1:
        return entries[0][:, None, :]  # a view
    return np.array(entries).transpose(1, 0, 2)  # one C-level copy: np.stack costs twice as much on 100 small tables


def build_groups(layout, entries, leaves, weights, chunk: int = CHUNK, device=None, plan=None):
    """Group k updates' leaves by input dtype.

    ``entries``: the updates' int64[L, 4] tables from :func:`leaf_entry`, or :func:`stack_entries` of them;
    ``leaves[j]`` update j's flattened leaves; ``weights`` the k fold weights; ``device`` (bool[k] or None) which
    updates are in GPU memory; ``plan``: :func:`plan_of` the same tables, if the caller has it. Returns
    ``{in_dtype: Group}`` in :data:`GROUP_ORDER`, the rows of integer leaves ``[(leaf_id, [arrays])]`` for the host,
    and the plan (its ``carried``: float64[L, k], 1 where update j carries leaf i).
    """
    tab = stack_entries(entries)
    w = np.asarray(weights, dtype=np.float64)
    plan = plan_of(layout, tab, chunk) if plan is None else plan
    groups = {}
    for p in plan.groups:
        # [4, R, k]: code, address, scale address and block tables of the group's rows, each contiguous; a copy
        # always (one leaf's transposed table is already contiguous, and Group.repoint writes into its group's)
        sub = np.array((tab if p.every_row else tab.take(p.rows, axis=0)).transpose(2, 0, 1), order="C")
        wt = np.empty(sub.shape[1:])
        wt[...] = w
        if p.mask is None:  # every update carries every row of the group (the usual case): nothing to mask
            ptr, sptr, blk = sub[1], sub[2], sub[3]
        else:
            ptr, sptr, blk = np.where(p.mask, sub[1], 0), np.where(p.mask, sub[2], 0), np.where(p.mask, sub[3], 1)
            wt[~p.mask] = 0.0
        groups[p.name] = Group(p.name, p.rows, p.off, p.n, ptr, wt, sptr, blk, leaves, p.mask, p.work, device,
                               p.elements, p.row_starts, p)
    int_rows = [(r, [lv[r] for lv, c in zip(leaves, tab[r, :, 0].tolist()) if c == INT_CODE]) for r in plan.int_rows]
    return groups, int_rows, plan


@dataclass(frozen=True)
class _GroupPlan:
    """The part of a Group that depends only on which updates carry which leaves in which dtype (see _plan)."""

    name: str
    rows: np.ndarray
    mask: np.ndarray | None  # None: every update carries every row
    off: np.ndarray
    n: np.ndarray
    work: np.ndarray
    elements: int
    row_starts: np.ndarray | None
    every_row: bool  # rows are all the layout's leaves, in order
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # tables derived from it: walk(), ...


@dataclass(frozen=True)
class _Plan:
    """A batch shape's groups, integer-leaf rows, carried matrix (float64[L, k]) and absent mask (bool[L, k], None
    when every update carries every leaf)."""

    groups: list
    int_rows: list
    carried: np.ndarray
    absent: np.ndarray | None


def plan_of(layout, tab, chunk: int = CHUNK) -> _Plan:
    """Which rows (leaves) each input dtype group of the batch ``tab`` (:func:`stack_entries`) has, with their masks,
    offsets, lengths and work items: a function of the code matrix only, so it is cached per layout (a server sends
    the same kinds of batches again and again; rebuilding this was most of a small fold's fixed cost)."""
    codes = tab[:, :, 0]
    cache = layout.__dict__.setdefault("_plan_cache", {})
    key = (codes.shape, codes.tobytes(), chunk)
    hit = cache.get(key)
    if hit is not None:
        return hit
    groups = []
    present = set(np.unique(codes).tolist())
    for name in GROUP_ORDER:
        c = CODE[name]
        if c not in present:
            continue
        match = codes == c
        rows = np.flatnonzero(match.any(axis=1))
        n = layout.sizes[rows]
        mask = match[rows]
        work = work_items(n, chunk)
        one_per_row = work.shape[0] == len(rows) and np.array_equal(work[:, 0], np.arange(len(rows)))
        starts = None if one_per_row else np.flatnonzero(np.r_[True, work[1:, 0] != work[:-1, 0]])
        groups.append(_GroupPlan(name, rows, None if mask.all() else mask, layout.offsets[rows], n, work,
                                 int(n.sum()), starts, len(rows) == len(codes)))
    int_rows = [] if INT_CODE not in present else np.flatnonzero((codes == INT_CODE).any(axis=1)).tolist()
    if len(cache) > 256:
        cache.clear()
    absent = codes == ABSENT
    cache[key] = plan = _Plan(groups, int_rows, (~absent).astype(np.float64), absent if absent.any() else None)
    return plan


def walk(g: Group, nthreads: int) -> tuple:
    """(share, tiles): the order in which the kernels visit a group's work items, as data (numba's kernels and
    csrc/kernels.h ``walk_blocks`` take it; one rule for both). Thread t walks the tiles share[t]:share[t+1]; a
    tile is the run of work items tiles[i, 0]:tiles[i, 1], visited update-major (every item of the tile for update
    j, then for j + 1; the plain fold takes four updates side by side), so an update whose leaves lie next to each other
    in memory is read in one long run. Few updates (k <= MANY_UPDATES): one item per tile and threads take equal
    counts of items. Many: threads take the items whose first element falls in their equal share of the elements,
    and a tile is the items whose first element falls in the same TILE-element window of the share. Cached on the
    group's plan."""
    many = g.k > MANY_UPDATES
    return _cached(g, (many, nthreads), _walk, g.work, many, nthreads)


def _cached(g: Group, key, make, *args):
    """``make(*args)``, cached on the group's plan under ``key`` (computed afresh for a group built without a plan;
    no closure: a per-update fold asks for its walk every call)."""
    if g.plan is None:
        return make(*args)
    hit = g.plan.cache.get(key)
    if hit is None:
        hit = g.plan.cache[key] = make(*args)
    return hit


def _walk(work, many: bool, T: int) -> tuple:
    m = work.shape[0]
    if m == 0:
        return np.zeros(T + 1, np.int64), np.zeros((0, 2), np.int64)
    if not many:
        items = np.arange(m + 1, dtype=np.int64)
        return (m * np.arange(T + 1, dtype=np.int64)) // T, np.ascontiguousarray(np.stack([items[:-1], items[1:]], 1))
    lens = work[:, 2]
    total = int(lens.sum())
    start = np.cumsum(lens) - lens
    lo = (total * np.arange(T + 1, dtype=np.int64)) // T
    thread = np.searchsorted(lo, start, side="right") - 1
    window = thread * (total // TILE + 1) + (start - lo[thread]) // TILE
    first = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
    tiles = np.ascontiguousarray(np.stack([first, np.r_[first[1:], m]], 1).astype(np.int64))
    return np.searchsorted(thread[first], np.arange(T + 1)).astype(np.int64), tiles


def segment_table(work: np.ndarray) -> np.ndarray:
    """The GPU kernels' work table (csrc/cuda/kernels.cu ``item_of``) of work items ``work`` [m, 3]: a segment per
    run of items that continue one another in one row (:func:`pack_segments`). Every item but a segment's last must
    hold ``chunk`` = the longest item's elements, as :func:`work_items` cuts rows (checked: a table that broke it
    would send blocks to the wrong elements)."""
    m = work.shape[0]
    if m == 0:
        return pack_segments(*np.zeros((4, 0), np.int64), 1)  # nothing to launch
    r, s, n = work[:, 0], work[:, 1], work[:, 2]
    first = np.flatnonzero(np.r_[True, (r[1:] != r[:-1]) | (s[1:] != s[:-1] + n[:-1])])
    chunk = int(n.max())
    inner = np.ones(m, bool)
    inner[np.r_[first[1:] - 1, m - 1]] = False  # each segment's last item may be shorter
    if (n[inner] != chunk).any():
        raise ValueError(f"work items are not cut in chunks of {chunk} elements: no segment table")
    return pack_segments(r[first], s[first], np.add.reduceat(n, first), first, chunk)


def pack_segments(rows, starts, lens, first, chunk: int) -> np.ndarray:
    """int64 [nseg, chunk, then (row, start, len, first item) per segment]: segment i covers elements
    [start, start + len) of its row in items of ``chunk`` elements, numbered from ``first``. A kernel block finds
    its item by a search over the segments: the table grows with the rows, not with the items."""
    tab = np.empty(2 + 4 * len(rows), np.int64)
    tab[0], tab[1] = len(rows), chunk
    tab[2:].reshape(-1, 4)[:] = np.stack([rows, starts, lens, first], axis=1)
    return tab


def group_segments(g: Group) -> np.ndarray:
    """:func:`segment_table` of a group's work items, cached on its plan."""
    return _cached(g, "segments", segment_table, g.work)


def rows_from_items(g: Group, nonfinite, sumsq, maxabs):
    """Per-work-item stats [m, k] summed (max for max-abs) into per-row stats [R, k], in item order."""
    R, k = g.ptr.shape
    if g.work.shape[0] == 0:
        return np.zeros((R, k), np.int64), np.zeros((R, k)), np.zeros((R, k))
    if g.row_starts is None:
        return nonfinite, sumsq, maxabs  # one work item per row (every leaf fits in a chunk): nothing to combine
    starts = g.row_starts
    rows = g.work[starts, 0]
    out = [np.zeros((R, k), np.int64), np.zeros((R, k)), np.zeros((R, k))]
    out[0][rows] = np.add.reduceat(nonfinite, starts, axis=0)
    out[1][rows] = np.add.reduceat(sumsq, starts, axis=0)
    out[2][rows] = np.maximum.reduceat(maxabs, starts, axis=0)
    return tuple(out)


@dataclass
class OutGroup:
    """Finalize targets of one output dtype: accumulator rows and where their results go."""

    out_dtype: str
    off: np.ndarray  # int64[R]
    n: np.ndarray  # int64[R]
    total_w: np.ndarray  # float64[R]: the divisor of each row
    ptr: np.ndarray  # int64[R]: output addresses
    outs: list  # [R] output arrays
    work: np.ndarray  # int64[m, 3]


def build_out_groups(layout, leaf_ids, outs, total_w, chunk: int = CHUNK):
    by = {}
    for lid, out in zip(leaf_ids, outs):
        by.setdefault(dtype_name(out.dtype), []).append((lid, out))
    groups = []
    for name, items in by.items():
        ids = np.array([lid for lid, _ in items], dtype=np.int64)
        n = np.array([layout.leaves[i].size for i in ids], dtype=np.int64)
        groups.append(OutGroup(
            out_dtype=name,
            off=np.array([layout.leaves[i].offset for i in ids], dtype=np.int64),
            n=n,
            total_w=np.asarray(total_w, dtype=np.float64)[ids],
            ptr=np.array([address(o) for _, o in items], dtype=np.int64),
            outs=[o for _, o in items],
            work=work_items(n, chunk),
        ))
    return groups
