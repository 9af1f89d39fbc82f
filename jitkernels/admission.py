"""Admission: an update is validated once, on arrival, by one stats pass.

The pass reads every leaf once and yields, per update, the count of non-finite values (per leaf, to name it), the
L2 norm and the max-abs (float64). A rejected update never reaches the accumulator, so a rejection leaves the state
bit-identical; folding admitted updates later does not read them again for validation. This is the design's answer
to "a NaN found half-way through an in-place fold cannot be undone".

An admitted update holds its leaves **in place** (zero-copy): the caller must not mutate them until they are folded.
Pass ``copy=True`` (copy-on-admit) when the caller's buffers are reused.
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import backends
from .batch import ABSENT, build_groups, dtype_code, leaf_entry, stack_entries
from .dtypes import Quantized, acc_dtype_name
from .device import DeviceLeaf, aligned as device_aligned, place, to_host
from .errors import InvalidWeight, LayoutMismatch, NonFiniteUpdate, ValueOutOfRange, shown
from .layout import Layout
from .parties import anonymous_party, check_party, per_update, real_value
from .state import BINNED_INT_HEADROOM

try:
    from . import _core
except ImportError:  # pragma: no cover - the numba and numpy backends run without the extension
    _core = None

HEADROOM = 2.0 ** -20
"""An update's ``weight * max|x|`` may use at most this fraction of the accumulator's range, so that about a million
such updates can be summed without overflow."""


@dataclass(eq=False)
class Admitted:
    """A validated update, ready to fold: its leaves (in place), weight, party and admission stats."""

    party: object
    weight: float
    leaves: list
    entries: np.ndarray = field(repr=False)  # int64[L, 4]: code, address, scale address, block (batch.leaf_entry)
    layout_fingerprint: str
    norm: float
    maxabs: float
    nbytes: int
    against_base: object = False  # its norms are deltas against a base (an Aggregator marks which one)
    on_device: bool = False  # its leaves are in GPU memory (CuPy arrays / torch CUDA tensors)
    info: dict = field(default_factory=dict)  # per-update values the algorithm reads (steps, staleness), checked
    worst_leaf: int = -1  # the leaf that holds maxabs (named when a fold weight takes it past the headroom)
    sig: bytes | None = field(default=None, repr=False)  # signature's value, once known

    @property
    def signature(self) -> bytes:
        """The dtype code of every leaf, as bytes (batch.leaf_entry): updates of one signature fold through the same
        groups. Known at admission for an update of plain numpy arrays (the layout's codes); else taken once here."""
        if self.sig is None:
            self.sig = self.entries[:, 0].tobytes()
        return self.sig

    @property
    def present(self) -> np.ndarray:
        """Mask of the layout's leaves this update carries (all of them unless it is partial)."""
        return self.entries[:, 0] != ABSENT


def check_weight(weight, party) -> float:
    """A weight as a float: a real number (:func:`~jitkernels.parties.real_value`), finite, > 0. A positive int,
    Fraction or Decimal that float64 cannot hold (10**400, Fraction(1, 10**400)) is a valid weight out of range:
    ValueOutOfRange, as one the accumulator cannot hold."""
    w = real_value(weight)
    if w is None or not (math.isfinite(w) and w > 0):
        if (w is None or w == 0 or math.isinf(w)) and exact_positive(weight):
            raise ValueOutOfRange(f"party {party!r}: weight {shown(weight)} is > 0 but outside what a "
                                  "float64 holds (weights are floats)", party=party, value=weight)
        raise InvalidWeight(party, weight)
    return w


def exact_positive(x) -> bool:
    """An exact number (an int, a Fraction, a finite Decimal) > 0: one whose float may overflow or round to 0 (not a
    numpy scalar: its integers fit a float64, and a timedelta64 is one of them)."""
    if isinstance(x, (bool, np.generic)) or not isinstance(x, (numbers.Rational, decimal.Decimal)):
        return False
    return (x.is_finite() if isinstance(x, decimal.Decimal) else True) and x > 0


def _flatten(layout, update, party, partial: bool) -> list:
    leaves = layout.flatten(update, party=party, partial=partial)
    if partial and leaves and all(a is None for a in leaves):
        raise LayoutMismatch("a partial update must carry at least one leaf; this one carries none", party=party)
    return leaves


def _copy_leaf(a):
    if a is None:
        return None
    if isinstance(a, Quantized):
        return Quantized(a.values.copy(), a.scale.copy(), a.block)
    if isinstance(a, DeviceLeaf):
        return DeviceLeaf(a.array.copy(), a.dtype)
    return a.copy()


def _on_device(leaves, party) -> bool:
    dev = [isinstance(a, DeviceLeaf) or (isinstance(a, Quantized) and a.on_device) for a in leaves if a is not None]
    if any(dev) and not all(dev):
        raise LayoutMismatch("mixes GPU arrays and host arrays; send one update from one place", party=party)
    return bool(dev) and dev[0]


def leaf_entries(layout, leaves_list) -> tuple:
    """Per update, its int64[L, 4] table entries (batch.leaf_entry of each leaf), and its signature where it is known
    without reading the table (else None; see Admitted.signature). An update whose leaves are all numpy arrays
    (flatten checked their dtypes against the layout) gets the layout's codes and the addresses from one C++ call:
    the per-leaf path cost ~2 us a leaf, a fifth of a small update's admission."""
    L = len(layout.leaves)
    plain = [_core is not None and all(type(a) is np.ndarray for a in leaves) for leaves in leaves_list]
    n = sum(plain)
    if n:  # one table for all of them: the layout's codes, and every address from one C++ call
        tab = np.zeros((n, L, 4), np.int64)
        tab[:, :, 0] = _layout_codes(layout)
        tab[:, :, 1] = _core.leaf_addresses([a for leaves, ok in zip(leaves_list, plain) if ok for a in leaves]
                                            ).reshape(n, L)
        rows = iter(tab)
    sig = _layout_codes(layout).tobytes()
    return ([next(rows) if ok else np.array([leaf_entry(a) for a in leaves], np.int64).reshape(L, 4)
             for leaves, ok in zip(leaves_list, plain)], [sig if ok else None for ok in plain])


def _layout_codes(layout) -> np.ndarray:
    """batch.dtype_code of each leaf's dtype, cached on the layout."""
    codes = layout.__dict__.get("_entry_codes")
    if codes is None:
        codes = layout.__dict__["_entry_codes"] = np.array([dtype_code(leaf.dtype) for leaf in layout.leaves], np.int64)
    return codes


def batch_stats(layout, leaves_list, *, base=None, host_base=None, backend="auto", acc_dtype="float32",
                on_device=None, entries=None):
    """Per leaf and update ([L, k] arrays): non-finite count, sum of squares, max |x| (x = u, or u - base).

    Updates are validated where they are: device-resident ones by the GPU backend (against ``base``), host ones by
    a CPU backend (against ``host_base``, the base's host copy when the base lives on the GPU): checking host bytes
    on the host spares them a trip over PCIe that the fold would repeat. Each side reads a base where it lives: a
    base on the other side is copied over (jk.admit of device updates with a host base handed the GPU kernel a host
    address)."""
    k = len(leaves_list)
    L = len(layout.leaves)
    entries = leaf_entries(layout, leaves_list)[0] if entries is None else entries
    host_base = base if host_base is None else host_base
    stats = None
    if on_device is None or not any(on_device):  # the usual case: every update on the host, no columns to gather
        sides = [(False, np.arange(k))]
    else:
        on_device = np.asarray(on_device, bool)
        sides = [(dev, np.flatnonzero(on_device == dev)) for dev in (False, True)]
    for dev, cols in sides:
        if cols.size == 0:
            continue
        # (copied over only for a side that has updates; a device base as it is: no copy)
        side_base = None if host_base is None else place(base, True) if dev else to_host(host_base)
        every = cols.size == k
        one = k == 1 and not dev  # a submit's admission: its signature's groups, re-pointed (see _OneStats)
        table = stack_entries(entries)[:, 0] if one else None  # (a list of tables, or one stacked table)
        groups = _OneStats.take(layout, table, leaves_list[0]) if one else build_groups(
            layout, entries if every else [entries[j] for j in cols],
            leaves_list if every else [leaves_list[j] for j in cols], np.ones(cols.size),
            device=np.ones(cols.size, bool) if dev else None)[0]
        try:
            for name, g in groups.items():
                mod = backends.get("cupy") if dev else backends.choose("auto" if backend == "cupy" else backend, name)
                got = mod.stats(side_base, g, acc_dtype)
                if every and len(groups) == 1 and len(g.leaf_ids) == L:  # one group, every leaf in order: the answer
                    return (entries, *got)
                if stats is None:
                    stats = np.zeros((L, k), np.int64), np.zeros((L, k)), np.zeros((L, k))
                add_stats(stats, g.leaf_ids if every else np.ix_(g.leaf_ids, cols), *got)
        finally:
            if one:
                _OneStats.give_back(layout, table, groups)
    if stats is None:
        stats = np.zeros((L, k), np.int64), np.zeros((L, k)), np.zeros((L, k))
    return (entries, *stats)


class _OneStats:
    """Stats groups for one host update, built once per signature (the dtype code of every leaf) and re-pointed at
    each update (batch.Group.repoint), as the aggregator's per-update fold does: building them was a third of a
    small update's admission. A caller takes a signature's groups out of the layout's cache and gives them back
    after its call, so threads admitting at once never share one (a second thread builds its own)."""

    @staticmethod
    def _cache(layout) -> dict:
        return layout.__dict__.setdefault("_one_stats", {})

    @classmethod
    def take(cls, layout, entries, leaves) -> dict:
        groups = cls._cache(layout).pop(entries[:, 0].tobytes(), None)
        if groups is None:
            groups = build_groups(layout, entries[:, None], [leaves], np.ones(1))[0]
        for g in groups.values():
            g.repoint(entries, 1.0, leaves)
        return groups

    @classmethod
    def give_back(cls, layout, entries, groups) -> None:
        for g in groups.values():
            g.release()
        cache = cls._cache(layout)
        if len(cache) > 64:  # (signatures: mixes of dtypes and absent leaves; a server sees a few)
            cache.clear()
        cache[entries[:, 0].tobytes()] = groups


def add_stats(stats, rows, nf, ss, mx) -> None:
    """Add one group's per-(leaf, update) stats into the [L, k] arrays (a leaf is in one group: rows are distinct)."""
    nonfinite, sumsq, maxabs = stats
    nonfinite[rows] += nf
    sumsq[rows] += ss
    maxabs[rows] = np.maximum(maxabs[rows], mx)


@dataclass
class Prepared:
    """Updates checked for everything but their values: weights, parties, layouts, where they live."""

    weights: list
    parties: list
    leaves: list
    entries: list
    signatures: list  # leaf_entries': each update's signature where known (else None)
    on_device: list


def prepare(updates, layout, *, weights=None, parties=None, backend="auto", copy=False, partial=False) -> Prepared:
    """The checks of admission that need no pass over the values (weights, layout, placement)."""
    if not isinstance(layout, Layout):
        raise TypeError(f"admission needs the aggregator's Layout (agg.layout), got {type(layout).__name__}")
    if isinstance(updates, dict) or not hasattr(updates, "__len__"):
        raise TypeError(f"expected a list of updates, got {type(updates).__name__} (one update: fold/admit)")
    k = len(updates)
    weights = [1.0] * k if weights is None else per_update(weights, k, "weights")
    parties = per_update(parties, k, "parties")
    # (an id the state could not save, or None twice, was admitted and then failed later)
    parties = [anonymous_party() if p is None else check_party(p) for p in parties]
    ws = [check_weight(w, p) for w, p in zip(weights, parties)]
    leaves_list = [_flatten(layout, u, p, partial) for u, p in zip(updates, parties)]
    if copy:
        leaves_list = [[_copy_leaf(a) for a in leaves] for leaves in leaves_list]
    on_device = [_on_device(leaves, p) for leaves, p in zip(leaves_list, parties)]
    if any(on_device) and backend not in ("auto", "cupy"):
        p = parties[on_device.index(True)]
        raise LayoutMismatch(f"the update is in GPU memory; backend {backend!r} reads host memory (use 'cupy')",
                             party=p)
    return Prepared(ws, parties, leaves_list, *leaf_entries(layout, leaves_list), on_device)


def worst_leaf(u, layout) -> tuple:
    """(name, "leaf 'name' ") of the leaf holding an admitted update's max |x|, or (None, "") where none is known,
    for the errors that name it."""
    name = layout.leaves[u.worst_leaf].name if u.worst_leaf >= 0 else None
    return name, "" if name is None else f"leaf {name!r} "


def check_fold_weight(u, w: float, bound: float, layout, acc_dtype, what: str) -> None:
    """The weight a fold multiplies ``u`` by (the algorithm's: FedBuff's staleness weight, FedNova's w / steps), as
    the fold checks it: ``w * max|x| <= bound`` (``what`` names the bound) and a weight the accumulator holds."""
    if not w * u.maxabs <= bound:
        name, leaf = worst_leaf(u, layout)
        raise ValueOutOfRange(f"party {u.party!r}: {leaf}has |x| = {u.maxabs:.6g}, which times fold weight "
                              f"{w:.6g} exceeds {bound:.6g} ({what})", party=u.party, leaf=name, value=u.maxabs)
    check_weight_range(w, u.party, acc_dtype, "fold weight")


_WIDER = {"float32": "; acc_dtype='float64' takes more"}  # (the hint, where there is a wider accumulator)


def check_weight_range(w: float, party, acc_dtype, what: str = "weight") -> None:
    """Weights are rounded to the accumulator's dtype in the kernels: one below its smallest normal number rounds to 0
    or loses bits, one above its headroom makes inf (times an all-zero update, NaN). Refused by name, as
    ValueOutOfRange (the weight itself is valid: the accumulator cannot hold it)."""
    lo, hi = weight_range(acc_dtype)
    if not lo <= w <= hi:
        raise ValueOutOfRange(f"party {party!r}: {what} {w:.6g} is outside what the {acc_dtype} accumulator holds "
                              f"([{lo:.6g}, {hi:.6g}]{_WIDER.get(np.dtype(acc_dtype).name, '')})", party=party, value=w)


@functools.cache
def weight_range(acc_dtype) -> tuple:
    """(smallest normal number, headroom) of the accumulator's dtype: the weights it holds."""
    return float(np.finfo(np.dtype(acc_dtype)).tiny), headroom(acc_dtype)


@functools.cache
def largest(acc_dtype) -> float:
    """The accumulator dtype's largest value (cached: np.finfo costs a per-update fold 0.7 us)."""
    return float(np.finfo(np.dtype(acc_dtype)).max)


@functools.cache
def headroom(acc_dtype) -> float:
    """The largest ``weight * max|x|`` a fold may add: the accumulator's range, less room for 2^20 such terms."""
    return float(np.finfo(np.dtype(acc_dtype)).max) * HEADROOM


FIRST_CHUNK = 1 << 20  # elements a time that _first_nonfinite reads


def _first_nonfinite(a) -> dict:
    """{index, value} of a leaf's first NaN or inf in flat (C) order, or {} if it finds none: read in chunks of
    FIRST_CHUNK elements on the host, stopping at the first (an all-NaN update of a large model had made float64
    copies of the whole leaf, 4-8x its size, on the way to its refusal). int8: the first element of the first block
    whose scale is not finite (its values are), q * scale."""
    if isinstance(a, Quantized):
        s = to_host(a.scale).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(s))
        if not bad.size:
            return {}
        i = int(bad[0]) * a.block
        with np.errstate(invalid="ignore"):  # (0 * inf)
            return {"index": i, "value": float(np.float64(to_host(a.values).reshape(-1)[i]) * np.float64(s[bad[0]]))}
    if isinstance(a, DeviceLeaf):  # (C-contiguous, its dtype's bits: bf16 as uint16, viewed on the host)
        flat, view = a.array.reshape(-1), a.dtype
    else:  # (a transposed or strided leaf is copied once, in its own dtype, to read it in C order)
        flat, view = np.ascontiguousarray(np.asarray(a)).reshape(-1), None
    for start in range(0, flat.size, FIRST_CHUNK):
        chunk = to_host(flat[start:start + FIRST_CHUNK])
        chunk = chunk if view is None else chunk.view(view)
        hit = np.flatnonzero(~np.isfinite(chunk))
        if hit.size:
            return {"index": start + int(hit[0]), "value": float(chunk[hit[0]])}
    return {}


def _host_values(a) -> np.ndarray:
    """A leaf's values as flat float64 in host memory (int8 dequantized, a device leaf copied over): for the rare
    paths that look at values themselves."""
    if isinstance(a, Quantized):
        return to_host(a.dequantize("float64")).reshape(-1)
    if isinstance(a, DeviceLeaf):
        return to_host(a.array).view(a.dtype).astype(np.float64).reshape(-1)
    return np.asarray(a, np.float64).reshape(-1)


def check(prep: Prepared, layout, stats, *, acc_dtype="float32", bound=None, against_base=False,
          fold_weights=None, base_max=0.0, clipped=False) -> list:
    """Admitted updates from their stats ([L, k] non-finite counts, sums of squares, max-abs), or the error of the
    first bad one (in order). ``bound`` (deterministic mode) caps ``weight * max|x|``; with ``fold_weights`` (the
    algorithm's, e.g. FedNova's w / steps) the headroom is checked against those too, which the fold multiplies by.
    ``clipped``: the fold scales each update by a factor its norm decides (clipping rules), so ``weight * max|x|``
    bounds nothing it folds: the caller checks the headroom with the fold weights, once the norms are known. The
    weights must be ones the accumulator holds (:func:`check_weight_range`), unless ``bound`` is inf (buffered
    rules). Stats ``against_base`` are of ``u - base``: ``max|u - base| + base_max`` (``max|base|``) bounds the
    ``|u|`` the kernels read into the accumulator's dtype."""
    nonfinite, sumsq, maxabs = stats
    limit = headroom(acc_dtype) if bound is None else float(bound)
    # each value too must be one the accumulator's dtype holds: the kernels read x as A(x) before weighing it, so a
    # float64 leaf's 1e39 (or an int8 value times its scale) with a small weight passed the headroom and folded inf
    cap = largest(acc_dtype) - (float(base_max) if against_base else 0.0)
    raw = prep.weights
    fold = raw if fold_weights is None else [float(w) for w in fold_weights]
    # the larger of the weight and the fold weight: admission without the aggregator checks the weight, the fold
    # the fold weight (FedNova's w / steps), so the fused pass checks both, or its verdict depended on the path
    scale = [0.0] * len(raw) if clipped else raw if fold_weights is None else [max(f, r) for f, r in zip(fold, raw)]
    # weights the accumulator holds (the kernels round them to its dtype); buffered rules (limit inf) sum nothing
    lo, hi = weight_range(acc_dtype) if limit != math.inf else (0.0, math.inf)
    if len(scale) == 1:  # one update (a submit): Python floats, a third of the numpy calls' time
        peak = [float(maxabs.max(initial=0.0))]
        worst = [int(maxabs.argmax()) if maxabs.size else -1]
        bad = [bool(nonfinite.any()) or not scale[0] * peak[0] <= limit or not peak[0] <= cap
               or not lo <= raw[0] <= hi or not lo <= fold[0] <= hi]
        # the sum over leaves in the order the batch path's row sum takes (pairwise): the same bits
        norms = [math.sqrt(float(sumsq.sum()))]
    else:  # every update at once (a Python loop of numpy calls per update was most of admitting small updates)
        peak = maxabs.max(axis=0, initial=0.0)
        worst = maxabs.argmax(axis=0).tolist() if maxabs.size else [-1] * len(scale)
        with np.errstate(over="ignore", invalid="ignore"):  # an inf or NaN product is refused below, by name
            bad = (nonfinite.any(axis=0) | ~(np.asarray(scale, np.float64) * peak <= limit) | ~(peak <= cap)).tolist()
        bad = [b or not lo <= r <= hi or not lo <= f <= hi for b, r, f in zip(bad, raw, fold)]
        norms = np.sqrt(np.ascontiguousarray(sumsq.T).sum(axis=1)).tolist()
        peak = peak.tolist()
    if True in bad:  # the first bad update in order raises, non-finite before out of range, as one by one
        j = bad.index(True)
        party = prep.parties[j]
        leaf = np.flatnonzero(nonfinite[:, j])
        if leaf.size:  # (the stats pass counts them; the error names the first, found on this path only)
            r = int(leaf[0])
            raise NonFiniteUpdate(party, layout.leaves[r].name, int(nonfinite[r, j]),
                                  **_first_nonfinite(prep.leaves[j][r]))
        if not peak[j] <= cap:
            where = f" as its delta against a base of max |{base_max:.6g}|" if against_base and base_max else ""
            raise ValueOutOfRange(f"party {party!r}: leaf {layout.leaves[worst[j]].name!r} has |x| = {peak[j]:.6g}"
                                  f"{where}, past the {acc_dtype} accumulator's range "
                                  f"({largest(acc_dtype):.6g}{_WIDER.get(np.dtype(acc_dtype).name, '')})",
                                  party=party, leaf=layout.leaves[worst[j]].name, value=peak[j])
        if scale[j] * peak[j] <= limit:  # (its values are in range: its weight is not)
            check_weight_range(raw[j], party, acc_dtype)
            check_weight_range(fold[j], party, acc_dtype, "fold weight")
        what = f"the {acc_dtype} accumulator's headroom" if bound is None else "the deterministic bound"
        raise ValueOutOfRange(
            f"party {party!r}: leaf {layout.leaves[worst[j]].name!r} has |x| = {peak[j]:.6g}, "
            f"which times {'weight' if scale[j] == prep.weights[j] else 'fold weight'} {scale[j]:.6g} exceeds "
            f"{limit:.6g} ({what})", party=party, leaf=layout.leaves[worst[j]].name, value=peak[j])
    fp = layout.fingerprint
    return [Admitted(party, w, leaves, entries, fp, norm, mx, sum(a.nbytes for a in leaves if a is not None),
                     against_base, dev, worst_leaf=wl, sig=sig)
            for party, w, leaves, entries, norm, mx, dev, wl, sig in zip(
                prep.parties, prep.weights, prep.leaves, prep.entries, norms, peak, prep.on_device, worst,
                prep.signatures)]


def admit_many(updates, layout, *, weights=None, parties=None, infos=None, base=None, backend="auto",
               acc_dtype=None, copy=False, partial=False, bound=None, host_base=None, base_max=None,
               clipped=False) -> list:
    """Admit k updates with one stats call per input dtype. Raises on the first bad update, check by check: parties,
    weights, infos and layouts over the whole batch first, then the stats' findings (non-finite, range) in order;
    nothing is returned (so nothing is folded) unless all pass. ``infos``: per update, a dict of the values the
    algorithm reads (``{"steps": 40}`` for FedNova), or None; the aggregator that folds it checks them against its
    algorithm. ``bound`` (deterministic mode) caps ``weight * max|x|``. ``acc_dtype``: the accumulator's, whose
    headroom is checked (default: the layout's, as an Aggregator's). Updates in GPU memory need ``backend`` "cupy"
    (or "auto" with the GPU backend available). ``base_max``: ``max|base|``, if the caller keeps it (else a pass over
    the base). ``clipped``: see :func:`check` (an Aggregator of a clipping rule)."""
    prep = prepare(updates, layout, weights=weights, parties=parties, backend=backend, copy=copy, partial=partial)
    infos = info_dicts(infos, prep.parties)
    # (after prepare, which refuses what is not a Layout)
    acc_dtype = acc_dtype_name(acc_dtype or layout.default_acc_dtype)
    for b, what in ((base, "base"), (host_base, "host_base")):
        _check_flat_base(b, layout, acc_dtype, what)
    _, *stats = batch_stats(layout, prep.leaves, base=base, host_base=host_base, backend=backend,
                            acc_dtype=acc_dtype, on_device=prep.on_device, entries=prep.entries)
    if base is not None and base_max is None:
        base_max = abs_max(base)
    admitted = check(prep, layout, stats, acc_dtype=acc_dtype, bound=bound, against_base=base is not None,
                     base_max=base_max or 0.0, clipped=clipped)
    rescale_norms(admitted, layout, base if host_base is None else host_base)
    for a, i in zip(admitted, infos):
        a.info = i
    return admitted


def info_dicts(infos, parties) -> list:
    """Each update's info as a dict of its own (``infos``: a Mapping or None per update), refused by party where
    one is no Mapping (a string failed inside the algorithm, unnamed). Copies: what folds is what was admitted,
    whatever the caller does with its dicts after."""
    infos = per_update(infos, len(parties), "infos")
    for j, (i, p) in enumerate(zip(infos, parties)):
        if i is not None and not isinstance(i, Mapping):
            raise TypeError(f"infos[{j}] (party {p!r}) is a {type(i).__name__}: each is a dict of the per-update "
                            f"values the algorithm reads, e.g. {{'steps': 40}}")
    return [dict(i) if i else {} for i in infos]


NORM_SMALLEST_MAXABS = 2.0 ** -480
"""max |x| below which the stats kernels' float64 sum of squares may lose its largest terms to underflow (their
squares, below 2^-960, near float64's subnormals at 2^-1022); an overflowed sum shows as an inf norm."""


def rescale_norms(admitted, layout, base) -> None:
    """The L2 norm of an update whose sum of squares left float64's range, taken again on the host, scaled by its
    max |x|: ``s sqrt(sum (x / s)^2)`` (what BLAS's dnrm2 does). A finite float64 update past |x| ~ 1.3e154 had an inf
    norm (clipping rules then folded it at weight C / inf = 0, refused as "fold weight 0"), one below ~1e-162 a norm
    of 0. Only such updates pay the extra pass; a NaN norm (the fused path's, which reads none) stays."""
    for u in admitted:
        if not (u.maxabs > 0 and (math.isinf(u.norm) or u.maxabs < NORM_SMALLEST_MAXABS)):
            continue
        s, total = u.maxabs, 0.0
        for i, a in enumerate(u.leaves):
            leaf = layout.leaves[i]
            if a is None or not leaf.size or i in layout.int_leaves:  # (the stats measure float leaves)
                continue
            x = _host_values(a)
            if base is not None:
                x = x - to_host(base[leaf.offset:leaf.offset + leaf.size]).astype(np.float64)
            total += float(np.sum(np.square(x / s)))
        u.norm = s * math.sqrt(total)


def _check_flat_base(base, layout, acc_dtype, what: str) -> None:
    """``base`` as the stats kernels read it: the flat model, C-contiguous, of the layout's size, in the accumulator
    dtype, as an Aggregator's state holds it (jk.admit's was not checked: a short one was read past its end by the
    C++ kernel, a strided one as if contiguous, each backend giving other stats)."""
    if base is None:
        return
    dtype, shape, flags = (getattr(base, a, None) for a in ("dtype", "shape", "flags"))
    want = f"the flat model in the accumulator dtype ({acc_dtype}[{layout.size}]; Aggregator(..., base=model) " \
           "flattens a model)"
    if dtype is None or shape is None or flags is None:
        raise TypeError(f"{what} must be {want}, got a {type(base).__name__}")
    on_alignment = device_aligned(base)
    if np.dtype(dtype) != np.dtype(acc_dtype) or tuple(shape) != (layout.size,) or not flags.c_contiguous or \
            not on_alignment:
        raise ValueError(f"{what} must be {want}, C-contiguous and aligned; got {np.dtype(dtype)}{list(shape)}"
                         + ("" if flags.c_contiguous else ", strided") + ("" if on_alignment else ", misaligned"))


def finite_maxabs(a) -> tuple | None:
    """(non-finite values, max |x| of the finite ones) of a host float32/float64 C-contiguous array of 64K elements or
    more, in one pass on the kernel threads (the C++ extension's); None for another array, or without the extension
    (numpy's reductions are single-threaded: max and min of 100 MB of float32 took 5.1 ms here, isfinite 4.0 ms,
    this 1.7 ms)."""
    if type(a) is not np.ndarray or a.size < _THREADED_CHECK or a.dtype not in _CHECKED or not a.flags.c_contiguous:
        return None
    cpp = _cpp()
    return None if cpp is None else cpp.finite_maxabs(a)


_THREADED_CHECK = 1 << 16
_CHECKED = (np.dtype(np.float32), np.dtype(np.float64))


@functools.cache
def _cpp():
    from .backends import cpp

    return cpp if cpp.available() is True else None


def abs_max(a) -> float:
    """max |a| of a flat host or device array, without a temporary of its size (0 for an empty one; NaN or inf
    where it holds them)."""
    checked = finite_maxabs(a)
    if checked is not None and checked[0] == 0:
        return checked[1]
    return max(float(a.max()), -float(a.min())) if a.size else 0.0


def check_int_terms(admitted, layout, masses, deterministic_bound=None, acc_dtype="float32") -> None:
    """The "mean" rule sums integer leaves (counters) as terms ``t = mass * x`` in the accumulator, which the stats
    pass (over the float leaves) does not measure: ``|t|`` must stay within the accumulator's headroom, as a float
    leaf's must (a counter of 2^62 at weight 1e20 made the sum inf, and the result INT64_MIN). Deterministic mode
    sums them on the float leaves' grids, which stay exact for ``|t|`` up to 2^10 x the bound
    (:data:`state.BINNED_INT_HEADROOM`). ``masses``: the algorithm's, one per update (1 for an unweighted one). Run
    on arrival (an aggregator's and a scheduler job's admission: the fold found them first, when a scheduler had
    acknowledged the update, and its round failed for every party) and again by the fold."""
    if deterministic_bound is None:
        limit, what = headroom(acc_dtype), f"the {acc_dtype} accumulator's headroom"
    else:
        limit, what = deterministic_bound * BINNED_INT_HEADROOM, "2^10 x the deterministic bound, for integer leaves"
    for u, m in zip(admitted, masses):
        for i in layout.int_leaves:
            a = u.leaves[i]
            if a is None or not a.size:
                continue
            t = float(m) * float(np.abs(to_host(a).astype(np.float64)).max())
            if not t <= limit:
                raise ValueOutOfRange(f"party {u.party!r}: leaf {layout.leaves[i].name!r}: mass * max|x| = {t:.6g} "
                                      f"exceeds {limit:.6g} ({what})", party=u.party, leaf=layout.leaves[i].name,
                                      value=t)


def norm_scores(admitted) -> dict:
    r"""Anomaly scores from admission's stats, without reading the updates again: each update's L2 norm (of its
    delta, where it was admitted against a base) as a robust z-score against the batch's,

    .. math:: s_j = \frac{\lVert u_j \rVert - \mathrm{median}_i \lVert u_i \rVert}{1.4826\,\mathrm{MAD}}

    (the median absolute deviation scaled to a normal's sigma, so that one outlier cannot hide itself by
    inflating the spread, as it would a mean and standard deviation). {party: score}, in the batch's order. A large
    positive score flags an update far larger than the round's (a boosted or scaled one: clip or drop it before
    folding); with MAD 0 (half the norms equal) the others score +-inf. Moves no model bytes."""
    admitted = list(admitted)  # (read twice below: a generator gave {})
    bad = next(((j, u) for j, u in enumerate(admitted) if not isinstance(u, Admitted)), None)
    if bad is not None:  # (a list of numbers failed on 'int' object has no attribute 'norm')
        raise TypeError(f"norm_scores takes admitted updates (jk.admit, Aggregator.admit); item {bad[0]} is a "
                        f"{type(bad[1]).__name__}")
    norms = np.array([u.norm for u in admitted], np.float64)
    if norms.size == 0:
        return {}
    med = float(np.median(norms))
    mad = 1.4826 * float(np.median(np.abs(norms - med)))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(norms == med, 0.0, (norms - med) / mad)
    return {u.party: float(s) for u, s in zip(admitted, z)}


def admit(update, layout, *, weight=1.0, party=None, info=None, base=None, backend="auto", acc_dtype=None,
          copy=False, partial=False) -> Admitted:
    """Validate one update against ``layout`` (one stats pass) and return it :class:`Admitted`. ``info``: the
    per-update values the algorithm reads (``{"steps": 40}`` for FedNova), checked by the aggregator that folds it.

    Raises :class:`~jitkernels.errors.LayoutMismatch`, :class:`~jitkernels.errors.InvalidWeight`,
    :class:`~jitkernels.errors.NonFiniteUpdate` or :class:`~jitkernels.errors.ValueOutOfRange`, naming the party and
    the leaf. ``base`` (flat, accumulator dtype) makes the stats those of the delta ``u - base``.
    """
    return admit_many([update], layout, weights=[weight], parties=[party], infos=[info], base=base, backend=backend,
                      acc_dtype=acc_dtype, copy=copy, partial=partial)[0]
