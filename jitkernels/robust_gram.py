r"""Byzantine-robust aggregation from the Gram matrix of a round's buffered updates: Krum / Multi-Krum, Bulyan,
geometric median (RFA), norm bounding and centered clipping.

Input: a [k, N] slab of float32 or float64 updates with contiguous rows (rows = parties, in arrival order), e.g.
``UpdateStore.rows()`` (an :class:`~jitkernels.robust_store.UpdateStore` is accepted as is, with its parties), plus
optional ``party_ids`` and weights (sample counts).

Why a Gram matrix. Every distance-based rule here needs only inner products between updates. Flower and FedML
compute each pairwise distance from the data (Flower: ``_compute_distances``, k^2 full-length differences, i.e.
about 2k^2 N values read, and Bulyan repeats that theta times). Here the slab is read once into

.. math::  G_{ij} = (x_i - r) \cdot (x_j - r), \qquad d_{ij} = \lVert x_i - x_j \rVert^2 = G_{ii} + G_{jj} - 2 G_{ij}

(r: a per-coordinate reference, see :func:`gram`), after which Krum's scores, Bulyan's iterated selection, the
Weiszfeld iterations of the geometric median and centered clipping's iterations all run in k-space (O(k^2) work per
step, no data read). The aggregate is then one weighted sum over the slab (or over the selected rows).

Passes over the slab (reads of k N itemsize bytes; "rows" = only the rows named are read):

========================  =============================================================================
gram                      1 (2 only when the automatic reference row proves to be an outlier: see gram)
krum (Multi-Krum, m)      1 + m rows
bulyan                    1 + theta rows (the coordinate step reads the theta selected rows once)
geometric_median          2 (Gram + final weighted sum), whatever the iteration count
norm_bound                2, or 1 with ``norms`` given (e.g. the admission pass's norms)
centered_clipping         2 (+ the center vector read twice), whatever ``iters``
========================  =============================================================================

Outputs are float32 for a float32 slab (float64 for float64), computed in float64. Every function returns a
:class:`RobustResult` whose ``coef`` says how much each party contributed (``aggregate = base + sum_i coef_i (x_i -
base)``), which is what an FL server logs to explain a round.

Backends: ``"numpy"`` (BLAS ``dsyrk`` over float64 tiles: the specification), ``"numba"`` (one fused,
cache-blocked kernel) and ``"cupy"`` (a slab in GPU memory: :class:`~jitkernels.robust_store.DeviceUpdateStore`,
CuPy arrays, torch CUDA tensors; the Gram by one fused kernel up to ``cupy_backend.GRAM_MAX_K`` rows, else, as the
other passes, the numpy path's operations in tiles of ~256 MB of float64, the Gram's products by cuBLAS).
``backend=None`` honors ``JITKERNELS_BACKEND``, else: cupy for a slab in GPU memory, numba when importable, numpy.
A slab stays where it is (a host slab with "cupy", or a device slab with a CPU backend, raises TypeError), and a
backend named explicitly always runs or raises :class:`~jitkernels.errors.BackendUnavailable`.
The k-space steps (scores, selections, iterations) run on the host whatever the backend: k x k numbers. Results
are where the slab is.
"""

from __future__ import annotations

import functools
import math
import time
from typing import NamedTuple

import numpy as np

from . import backends as _backends
from .device import array_module, device_leaf, is_device_array, to_host
from .dtypes import dtype_name, native
from .algorithms import _count
from .errors import (BackendUnavailable, DuplicateParty, EmptyAggregate, InvalidWeight, NonFiniteUpdate,
                     TooFewUpdates, ValueOutOfRange)
from .robust_coord import check_strides
from .threads import get_num_threads

from . import _numba
from ._numba import keeps_threads, numba

if numba is not None:
    from numba import njit, prange

    from .robust_coord import _apply_network  # the coordinate kernels' comparator loop over buffer rows

BACKENDS = ("numpy", "numba", "cupy")
BLOCK = 1 << 16  # columns per tile (numba: per parallel work item); see gram()
DEVICE_TILE = 1 << 25  # values per float64 tile on the GPU (256 MB): few, large cuBLAS calls
DEVICE_PART = 1 << 13  # columns per part of a GPU tile's products (see _sumsq)
PILOT = 4096  # columns sampled to choose the automatic reference row
REDO_RATIO = 1e6  # automatic reference: second pass when its median distance exceeds the best row's by this factor
SMALL_CALL = 1 << 17  # values (k * N) below which kernels run on one thread

MODE_NONE, MODE_ROW, MODE_VECTOR = 0, 1, 2


class Gram(NamedTuple):
    r"""The Gram matrix of a slab's rows, centered at a per-coordinate reference r.

    ``G``: float64 [k, k], :math:`G_{ij} = (x_i - r)\cdot(x_j - r)`; ``sqnorms``: float64 [k], the *uncentered*
    :math:`\lVert x_i \rVert^2` (norm bounding reads them); ``reference``: the row index r was taken from, ``"vector"``
    (a given vector), or None (uncentered); ``passes``: reads of the slab it took."""

    G: np.ndarray
    sqnorms: np.ndarray
    reference: object
    passes: int

    def distances(self) -> np.ndarray:
        """Squared pairwise distances :math:`d_{ij} = G_{ii} + G_{jj} - 2G_{ij}`, negatives (rounding) clamped to 0,
        diagonal exactly 0: float64 [k, k]."""
        return sq_distances(self.G)


class RobustResult(NamedTuple):
    """``aggregate``: [N], float32 for a float32 slab (float64 for float64), computed in float64.
    ``selected``: int64 row indices the rule kept (Krum: by increasing score; Bulyan: in pick order; the others: all
    rows). ``parties``: their party ids (None without ids). ``coef``: float64 [k] with ``aggregate = base + sum_i
    coef[i] * (x_i - base)`` (base = 0, or the center of centered clipping); None for Bulyan (per coordinate).
    ``info``: scores, iterations, objective, passes over the slab."""

    aggregate: np.ndarray
    selected: np.ndarray
    parties: tuple | None
    coef: np.ndarray | None
    info: dict


# --- inputs ---------------------------------------------------------------------------------------------------------
def _slab(X, party_ids=None):
    """(rows [k, N] as stored (copied only where its byte order is not the machine's; a CuPy view of a slab in GPU
    memory), parties tuple or None)."""
    name = None
    if hasattr(X, "rows") and hasattr(X, "parties") and not isinstance(X, np.ndarray):  # an UpdateStore
        rows = X.rows()
        if party_ids is None:
            party_ids = X.parties
    elif is_device_array(X):
        leaf = device_leaf(X)  # (a bf16 one as its uint16 bits: named by its dtype below)
        rows, name = leaf.array, dtype_name(leaf.dtype)
    else:
        rows = native(np.asarray(X))  # (a big-endian slab was refused as "not float32")
    if rows.ndim != 2:
        raise ValueError(f"expected a [k, N] slab of updates, got shape {rows.shape}")
    if rows.dtype not in (np.float32, np.float64):
        raise TypeError(f"the Gram kernels read float32 or float64 slabs, got {name or dtype_name(rows.dtype)} (keep "
                        f"the updates of distance-based rules in a float32 UpdateStore)")
    if rows.shape[0] == 0:
        raise ValueError("no updates: the slab has zero rows")
    check_strides(rows)
    parties = None
    if party_ids is not None:
        parties = tuple(party_ids)
        if len(parties) != rows.shape[0]:
            raise ValueError(f"{len(parties)} party ids for {rows.shape[0]} rows")
        seen = set()
        for p in parties:
            if p in seen:
                raise DuplicateParty(p, "this round's slab")
            seen.add(p)
    return rows, parties


def _party(parties, i):
    return parties[i] if parties is not None else int(i)


def _weights(weights, k, parties, allow_zero=False) -> np.ndarray:
    """float64 [k]: the weights (sample counts), each finite and > 0 (>= 0 with ``allow_zero``), or ones."""
    if weights is None:
        return np.ones(k)
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != k:
        raise ValueError(f"{w.shape[0]} weights for {k} rows")
    for i, x in enumerate(w):
        if not (math.isfinite(x) and (x > 0 or (allow_zero and x == 0))):
            raise InvalidWeight(_party(parties, i), weights[i])
    with np.errstate(over="ignore"):
        total = w.sum()
    if not math.isfinite(total):  # the rules use w / sum(w): scaled first where the sum overflows (weights 1e308)
        w = w / w.max()
    return w


def available_backends() -> dict:
    """``{name: True or the reason it cannot run here}`` for the Gram kernels."""
    from .backends import cupy_backend

    return {"numpy": True, "numba": _numba.available(), "cupy": cupy_backend.available()}


def gram_backend(backend: str) -> str:
    """The Gram kernels' backend for an aggregator's: the same where they have it (numpy, numba), else auto (the C++
    backend has no Gram kernels; "auto" also follows the slab: cupy for a GPU aggregator's device store, the CPU
    for a host one)."""
    return backend if backend in ("numpy", "numba") else "auto"


def _pick(backend, rows) -> str:
    """The backend for ``backend`` and a slab: auto is cupy for a slab in GPU memory, else numba, else numpy."""
    name = _backends.requested(backend)
    on_device = not isinstance(rows, np.ndarray)
    if name == "auto":
        name = "cupy" if on_device else "numba" if _numba.available() is True else "numpy"
    if name not in BACKENDS:
        raise BackendUnavailable(f"backend {name!r} has no Gram kernels (they run on {', '.join(BACKENDS)})")
    ok = available_backends()[name]
    if ok is not True:
        raise BackendUnavailable(f"backend {name!r} unavailable: {ok}")
    if on_device != (name == "cupy"):
        hint = "use backend='cupy'" if on_device else "upload it (cupy.asarray) first"
        raise TypeError(f"the slab is in {'GPU' if on_device else 'host'} memory but the backend is {name!r}: {hint}")
    return name


# --- the Gram matrix --------------------------------------------------------------------------------------------
def gram(X, *, center=True, block: int | None = None, party_ids=None, backend: str | None = None) -> Gram:
    r"""Gram matrix of the rows of a [k, N] slab, centered, in one pass: :class:`Gram` (G, sqnorms, reference, passes).

    .. math::  G_{ij} = \sum_t (x_{it} - r_t)(x_{jt} - r_t), \qquad s_i = \sum_t x_{it}^2

    **Precision.** Each value is widened to float64 (exact), the reference subtracted in float64 (exact for float32
    data: the difference of two float32 values fits in float64's 53 bits unless their exponents differ by > 29; one
    rounding for float64 data) and the products accumulated in float64 (8 vector lanes x 64-512-column chunks x
    ``block``-column tiles, tile partial sums added in tile order, so the result does not depend on the thread
    count). Float32 products (``sgemm``/``ssyrk``, ``tile @ tile.T`` on float32) would have twice the flop rate but
    carry ~1e-6 relative error per entry (float32 accumulation over a BLAS K-block), which the cancellation below
    multiplies. Float64 costs little: on a 2-core EPYC (Zen 4), measured in one run against numpy's ``X @ X.T``
    (ssyrk) on the same float32 slab, the numba kernel ran at 1.3-1.4x the SSYRK rate for k = 10, N = 25M (the k^2
    work is small; centering and widening dominate) and 0.8-0.9x for k = 50, N = 5M (float64 FMA-bound: 4x4 register
    blocks of row pairs); the numpy path (``dsyrk`` on float64 tiles) at 0.5x and 0.35x. ``bench()`` re-measures.

    **Cancellation.** :math:`d_{ij} = G_{ii} + G_{jj} - 2G_{ij}` subtracts numbers of size :math:`\lVert x_i - r
    \rVert^2` to get one of size :math:`d_{ij}`; the error of the float64 Gram is about :math:`u\,(\lVert x_i - r
    \rVert^2 + \lVert x_j - r\rVert^2)` (u ~ 1e-16 times a small growth factor of the blocked sums), so the relative
    error of :math:`d_{ij}` is about :math:`u\,(d_{ir} + d_{jr}) / d_{ij}`. Uncentered (r = 0) that factor is
    :math:`\lVert x\rVert^2 / d`, e.g. 1e14 for updates 1e4 from the origin and 1e-3 apart: float64 keeps 2 digits
    and float32 none. With r a row of the honest cluster the factor is O(1) and :math:`d_{ij}` keeps ~14 digits.
    Tiny negative results (rounding of near-duplicate rows) are clamped to 0 by :func:`sq_distances`.

    ``center``:

    * ``True`` (default): a row chosen robustly. A pilot reads ``PILOT`` columns spread evenly over N, centers them
      at their coordinate-wise median, and takes the row with the smallest median distance to the others (a
      medoid: not an attacker while fewer than half the rows are). A mean reference would not do: one update of
      norm 1e30 moves the mean 1e30/k away and the honest distances cancel. If the full Gram then shows that the
      chosen row's median distance exceeds the best row's by ``REDO_RATIO`` (an attacker whose deviation hides
      from the pilot's columns), the Gram is recomputed once around the best row (``passes == 2``).
    * an int: that row. * a float array [N]: that vector (e.g. the global model; G is then the Gram of the deltas).
    * ``False`` / None: uncentered, :math:`G = X X^T` (fine for deltas near the origin).

    ``party_ids``: names for errors (a NaN row raises :class:`~jitkernels.errors.NonFiniteUpdate` naming its party).
    ``block``: columns per tile (default 65536: one parallel work item of the numba kernel, whose k x 64-512-column
    float64 chunks stay in L1/L2; the numpy path runs ``dsyrk`` on each float64 tile). Bytes moved: k N itemsize read
    (plus N itemsize for a center vector), nothing written but the k x k result.
    """
    rows, parties = _slab(X, party_ids)
    be = _pick(backend, rows)
    block = int(block or BLOCK)
    if block < 1:
        raise ValueError(f"block must be >= 1 columns, got {block}")
    k, n = rows.shape
    refvec = None
    passes = 1
    if center is True:
        ref = _pilot_reference(rows)
        mode = MODE_ROW
    elif center is False or center is None:
        ref, mode = None, MODE_NONE
    elif isinstance(center, (int, np.integer)) and not isinstance(center, bool):
        ref, mode = int(center), MODE_ROW
        if not 0 <= ref < k:
            raise ValueError(f"center row {ref} is not in [0, {k})")
    else:
        refvec = _vector(center, rows)
        if refvec.shape != (n,) or refvec.dtype not in (np.float32, np.float64):
            raise ValueError(f"center must be True, False, a row index or a float32/float64 vector of shape ({n},)")
        ref, mode = "vector", MODE_VECTOR
    G, sq, _ = _run_gram(be, rows, mode, ref if mode == MODE_ROW else 0, refvec, block, False)
    _check_finite(rows, parties, sq, G)
    if center is True and k > 2:
        med = _median_distances(sq_distances(G))
        best = int(np.argmin(med))
        if best != ref and med[ref] > REDO_RATIO * med[best]:
            ref = best
            G, sq, _ = _run_gram(be, rows, MODE_ROW, ref, None, block, False)
            passes = 2
    return Gram(G, sq, ref, passes)


_build_gram = gram  # the rules' ``gram=`` argument shadows the function's name inside them


def _vector(v, rows):
    """A contiguous vector (a center, a base) where the slab is: uploaded or downloaded once if it is not. (A 0-d
    value stays 0-d, and the caller's shape check refuses it.)"""
    xp = array_module(rows)
    v = xp.asarray(v) if xp is not np else native(np.asarray(to_host(v)))  # (numba refused a big-endian base)
    return xp.ascontiguousarray(v) if v.ndim else v


def sq_distances(G: np.ndarray) -> np.ndarray:
    r"""Squared distances from a (centered) Gram matrix: :math:`d_{ij} = \max(G_{ii} + G_{jj} - 2G_{ij}, 0)`,
    :math:`d_{ii} = 0` exactly. float64 [k, k], symmetric."""
    G = np.asarray(G, dtype=np.float64)
    g = np.diag(G)
    D = (g[:, None] + g[None, :]) - 2.0 * G
    np.maximum(D, 0.0, out=D)
    np.fill_diagonal(D, 0.0)
    return D


def _median_distances(D) -> np.ndarray:
    """Per row, the median of its distances to the other rows."""
    k = D.shape[0]
    off = ~np.eye(k, dtype=bool)
    return np.median(D[off].reshape(k, k - 1), axis=1)


def _pilot_reference(rows) -> int:
    """The row with the smallest median (squared) distance to the others over ``PILOT`` evenly spread columns
    centered at their coordinate-wise median; ties to the lower row."""
    k, n = rows.shape
    if k <= 2 or n == 0:
        return 0
    cols = np.unique(np.linspace(0, n - 1, min(n, PILOT)).astype(np.int64))
    S = to_host(rows[:, array_module(rows).asarray(cols)]).astype(np.float64)
    srt = np.sort(S, axis=0)  # the coordinate-wise median (np.median along axis 0 is ~6x slower here)
    S -= 0.5 * srt[(k - 1) // 2] + 0.5 * srt[k // 2]
    with np.errstate(over="ignore", invalid="ignore"):
        D = sq_distances(S @ S.T)
        med = _median_distances(D)
    med = np.where(np.isfinite(med), med, np.inf)
    return int(np.argmin(med))


def _check_finite(rows, parties, sq, G) -> None:
    """NaN/inf in the slab shows in the sums of squares; a finite row whose squares overflow float64 in G."""
    bad = np.flatnonzero(~np.isfinite(sq))
    xp = array_module(rows)
    for i in bad:
        cnt = int(xp.count_nonzero(~xp.isfinite(rows[i])))  # error path only: one more read of that row
        if cnt:
            raise NonFiniteUpdate(_party(parties, i), "<slab row>", cnt)
        raise ValueOutOfRange(f"party {_party(parties, i)!r}: the squared norm of its update overflows float64",
                              party=_party(parties, i))
    if not np.all(np.isfinite(G)):
        i = int(np.flatnonzero(~np.all(np.isfinite(G), axis=1))[0])
        raise ValueOutOfRange(f"party {_party(parties, i)!r}: its inner products overflow float64",
                              party=_party(parties, i))


def _run_gram(be, rows, mode, refrow, refvec, block, diag_only):
    """(G [k, k] symmetric, uncentered sqnorms [k], centered sqnorms [k]); G is None when diag_only. Host arrays.
    Each backend gives G's lower triangle (with the diagonal: csq) right; it is mirrored here, exactly symmetric."""
    if be == "numba":
        G, sq, csq = _gram_numba(rows, mode, refrow, refvec, block, diag_only)
    elif be == "cupy" and rows.shape[0] <= _cupy().GRAM_MAX_K:
        G, sq, csq = _cupy().gram(rows, mode, refrow, refvec, diag_only)
    else:
        G, sq, csq = _gram_xp(rows, mode, refrow, refvec, _tile_columns(be, rows.shape[0], block), diag_only)
    return (None, sq, csq) if G is None else (mirrored(G), sq, np.diag(G).copy())


def mirrored(G):
    """G's lower triangle mirrored above the diagonal: exactly symmetric."""
    return np.tril(G) + np.tril(G, -1).T


def _cupy():
    from .backends import cupy_backend

    return cupy_backend


# --- weighted sums over the slab ------------------------------------------------------------------------------------
def combine(X, coef, *, rows_idx=None, base=None, backend: str | None = None) -> np.ndarray:
    r"""One pass: :math:`y = b + \sum_j c_j (x_{r_j} - b)` (b = 0 without ``base``) in float64, rounded once to the
    slab's dtype. ``rows_idx``: the rows read (default all; Multi-Krum reads only its m). Bytes moved:
    len(rows_idx) N itemsize read (+ N itemsize for base), N itemsize written."""
    rows, _ = _slab(X)
    be = _pick(backend, rows)
    idx = np.arange(rows.shape[0], dtype=np.int64) if rows_idx is None else np.asarray(rows_idx, dtype=np.int64)
    c = np.asarray(coef, dtype=np.float64)
    if c.shape != idx.shape or idx.ndim != 1:
        raise ValueError(f"{c.shape} coefficients for {idx.shape} rows")
    if idx.size and not (0 <= idx.min() and idx.max() < rows.shape[0]):  # (the kernels do not check their reads)
        raise ValueError(f"rows_idx must be in [0, {rows.shape[0]}), got {idx.min()}..{idx.max()}")
    if base is not None:
        base = _vector(base, rows)
        if base.shape != (rows.shape[1],):
            raise ValueError(f"base must have shape ({rows.shape[1]},)")
    out = array_module(rows).empty(rows.shape[1], rows.dtype)
    if be == "numba":
        _combine_numba(rows, idx, c, base, out)
    elif be == "cupy" and (base is None or base.dtype in (np.float32, np.float64)):
        from .backends import cupy_backend

        cupy_backend.combine(rows, idx, c, base, out)
    else:
        _combine_xp(rows, idx, c, base, out, _tile_columns(be, len(idx), BLOCK))
    return out


# --- Krum / Multi-Krum ----------------------------------------------------------------------------------------------
def krum_scores(D: np.ndarray, f: int, active=None) -> np.ndarray:
    r"""Krum scores over the rows ``active`` (default all) of a squared-distance matrix:
    :math:`s_i = \sum` of the :math:`\max(1, n - f - 2)` smallest :math:`d_{ij}`, j in active, j != i (n = |active|;
    at most the n - 1 there are: a lone row scores 0, as in Flower's slice). The row's own index is excluded (not "the
    first after sorting")."""
    return _scores(D, None, f, active)[0]


TIE_RTOL = 1e-12  # Gram rounding allowance: see _scores


def _scores(D, g, f, active=None):
    """(scores, allowance) over the rows ``active`` (positions in ``active`` order). The allowance of row i is
    TIE_RTOL * sum over its chosen neighbours j of (g_i + g_j), g the centered Gram's diagonal: a bound on the
    rounding of its score (|error of d_ij| ~ u (g_i + g_j), u a few 1e-16 times the growth of the blocked sums).
    Zero without g (exact ties only). Each row's distances are sorted (stable) and the s smallest summed in
    ascending order, so equal multisets give equal scores."""
    act = np.arange(D.shape[0]) if active is None else np.asarray(active, dtype=np.int64)
    n = act.shape[0]
    s = min(max(1, n - f - 2), n - 1)
    sub = D[np.ix_(act, act)]
    np.fill_diagonal(sub, np.inf)  # the row itself is excluded by index, not by sorting first
    near = np.argsort(sub, axis=1, kind="stable")[:, :s]
    out = np.take_along_axis(sub, near, axis=1).sum(axis=1)
    err = np.zeros(n) if g is None else TIE_RTOL * (s * g[act] + g[act[near]].sum(axis=1))
    return out, err


def _lowest(scores, err, m, rank=None) -> list:
    """Positions of the m lowest scores, one at a time: among the remaining scores within twice the smaller of the two
    rounding allowances of the minimum (so exact duplicates, whose Gram-derived scores may differ in the last bits
    when BLAS computes their entries by different paths, are ties), the lowest ``rank`` (:func:`party_ranks`), else
    the lowest index. (The sum of the two allowances let a row far from the reference, whose allowance is of the
    size of its squared distance to it, tie with the minimum: two colluding attackers 1e12 away, at an exact score
    1e9 times the honest rows', were picked by Krum and Bulyan.)"""
    left = list(range(len(scores)))
    out = []
    for _ in range(m):
        sc = scores[left]
        j = left[int(np.argmin(sc))]
        ties = [i for i in left if scores[i] <= scores[j] + 2.0 * min(err[i], err[j])]  # `left` is in index order
        pick = ties[0] if rank is None else min(ties, key=rank.__getitem__)
        out.append(pick)
        left.remove(pick)
    return out


def party_ranks(parties) -> list | None:
    """Each row's place in the parties' canonical order (int ids by value, then str ids by value), which breaks
    selection ties: the result then depends on the set of updates, not on their arrival order or merge tree."""
    if parties is None:
        return None
    order = sorted(range(len(parties)), key=lambda i: (1, parties[i]) if isinstance(parties[i], str)
                   else (0, parties[i]))
    rank = [0] * len(parties)
    for r, i in enumerate(order):
        rank[i] = r
    return rank


KRUM_VARIANTS = ("paper", "flower")


def krum(X, f: int, m: int = 1, *, weights=None, variant: str = "paper", party_ids=None, gram: Gram | None = None,
         backend: str | None = None) -> RobustResult:
    r"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, 2017, "Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent").

    .. math::  s_i = \sum_{j \in N_i} \lVert x_i - x_j \rVert^2, \qquad N_i = \text{the } k - f - 2
               \text{ rows closest to } x_i \ (j \ne i)

    The m rows of lowest score are selected, one at a time; ties go to the smallest party id (:func:`party_ranks`:
    the set of updates decides, not their order), or the lower row index without party ids and for
    ``variant="flower"`` (Flower's ``np.argmin`` takes the earlier result). Scores
    within their rounding allowance of the minimum (``TIE_RTOL`` = 1e-12 times the centered norms involved, far
    below any real difference) are ties: exact duplicates have equal scores in exact arithmetic, but BLAS may round
    their Gram entries differently. The aggregate is :math:`\sum_{i \in S} w_i x_i / \sum_{i \in S} w_i` with
    ``weights`` (sample counts: what Flower's ``aggregate_krum`` does through ``aggregate``) or uniform
    (``weights=None``: the paper's Multi-Krum). m = 1 is Krum: the selected row itself, exactly.

    ``variant="paper"`` requires k >= 2f + 3 (the paper's n > 2f + 2), else :class:`TooFewUpdates`, weights > 0 and
    m <= k. ``variant="flower"`` runs wherever Flower's ``aggregate_krum`` and ``select_multikrum`` do, outside the
    guarantee below 2f + 3: any k >= 1 (with :math:`\max(1, k - f - 2)` neighbours, at most the k - 1 there are),
    weights >= 0 (a row of weight 0 takes part in the scores and weighs nothing in the average; Krum returns the
    selected row whatever its weight; a Multi-Krum selection that weighs 0 in all raises :class:`EmptyAggregate`,
    where Flower divides by 0), and m > k keeps all k rows (as ``select_multikrum``'s ``argsort(scores)[:m]``).

    Passes: 1 (the Gram; ``gram=`` reuses one) + m rows for the average. k-space work: O(k^2 log k).
    """
    rows, parties = _slab(X, party_ids)
    k = rows.shape[0]
    f, m = _count("f", f, 0), _count("m", m)
    if variant not in KRUM_VARIANTS:
        raise ValueError(f"variant must be one of {KRUM_VARIANTS}, got {variant!r}")
    flower = variant == "flower"
    if not flower and k < 2 * f + 3:
        raise TooFewUpdates("Krum", k, f, 2 * f + 3)
    if flower:
        m = min(m, k)
    if m > k:  # a round with fewer updates than the rule keeps
        raise TooFewUpdates(f"Multi-Krum keeping m={m}", k, f, max(m, 2 * f + 3))
    w = _weights(weights, k, parties, allow_zero=flower)
    g = gram if gram is not None else _build_gram(rows, party_ids=parties, backend=backend)
    scores, err = _scores(g.distances(), np.diag(g.G), f)
    sel = np.array(_lowest(scores, err, m, None if flower else party_ranks(parties)), dtype=np.int64)
    if m > 1 and not np.sum(w[sel]) > 0:
        raise EmptyAggregate(f"the {m} updates Multi-Krum selected weigh 0 in all")
    coef = np.zeros(k)
    coef[sel] = w[sel] / np.sum(w[sel]) if m > 1 else 1.0
    if m == 1:
        agg = rows[sel[0]].copy()
    else:
        agg = combine(rows, coef[sel], rows_idx=sel, backend=backend)
    info = {"scores": scores, "passes": (g.passes if gram is None else 0) + m / k, "gram_reference": g.reference}
    return RobustResult(agg, sel, _names(parties, sel), coef, info)


def _names(parties, idx):
    return None if parties is None else tuple(parties[i] for i in idx)


# --- Bulyan ---------------------------------------------------------------------------------------------------------
def bulyan_select(D: np.ndarray, f: int, theta: int, g=None, rank=None) -> np.ndarray:
    """Iterated Krum on a distance matrix: theta times, pick the remaining row of lowest Krum score over the
    remaining rows (``max(1, n - f - 2)`` neighbours for n remaining, as Flower), ties to the lowest ``rank``
    (:func:`party_ranks`; without it the lower index), remove it. No data is read: the distances are computed once.
    ``g``: the centered Gram's diagonal, for the rounding allowance of ties (see :func:`krum`); without it only
    exact ties are ties."""
    active = list(range(D.shape[0]))
    picks = []
    for _ in range(theta):
        s, err = _scores(D, g, f, active)
        j = active[_lowest(s, err, 1, None if rank is None else [rank[a] for a in active])[0]]
        picks.append(j)
        active.remove(j)
    return np.array(picks, dtype=np.int64)


def bulyan(X, f: int, *, party_ids=None, gram: Gram | None = None, backend: str | None = None) -> RobustResult:
    r"""Bulyan (El Mhamdi, Guerraoui, Rouault, 2018, "The Hidden Vulnerability of Distributed Learning in
    Byzantium"), as Flower's ``aggregate_bulyan`` with ``aggregate_krum``.

    1. Selection: :math:`\theta = k - 2f` rows by iterated Krum (:func:`bulyan_select`) on the distances of ONE
       Gram matrix (Flower recomputes all k^2 distances from the data for each of the theta picks).
    2. Per coordinate t, over the selected rows: :math:`m_t` = the median (the mean of the two middle values for
       even theta, as ``np.median``), then the mean of the :math:`\beta = \theta - 2f` values closest to
       :math:`m_t`. Ties in :math:`|x - m_t|` go to the smaller value, so the result depends only on the set of
       values (Flower's ``np.argpartition`` leaves them unspecified; the two differ only on exact ties).

    Requires k >= 4f + 3 (the paper's and Flower's condition), else :class:`TooFewUpdates`. Unweighted (as the
    paper and Flower). Passes: 1 (the Gram) + theta rows (the coordinate step: a sorting network across each
    tile's coordinates in the numba kernel, O(theta log^2 theta) vectorized compares per coordinate; a sort on the
    array path; on the GPU a kernel generated per theta, each coordinate's values in registers; all three with
    the same math and bits, which differ from this specification's only in the order of the window's sum and when
    rounded distances tie).
    """
    rows, parties = _slab(X, party_ids)
    k = rows.shape[0]
    f = _count("f", f, 0)
    if k < 4 * f + 3:
        raise TooFewUpdates("Bulyan", k, f, 4 * f + 3)
    theta = k - 2 * f
    beta = theta - 2 * f
    be = _pick(backend, rows)
    g = gram if gram is not None else _build_gram(rows, party_ids=parties, backend=be)
    picks = bulyan_select(g.distances(), f, theta, np.diag(g.G), party_ranks(parties))
    out = array_module(rows).empty(rows.shape[1], rows.dtype)
    idx = np.sort(picks)  # the coordinate step depends only on the set: read the rows in memory order
    if be == "numba":
        _bulyan_numba(rows, idx, beta, out)
    else:
        (_bulyan_cupy if be == "cupy" else _bulyan_xp)(rows, idx, beta, out, _tile_columns(be, theta, 1 << 14))
    info = {"theta": theta, "beta": beta, "passes": (g.passes if gram is None else 0) + theta / k,
            "gram_reference": g.reference}
    return RobustResult(out, picks, _names(parties, picks), None, info)


def bulyan_coordinate(V: np.ndarray, beta: int) -> np.ndarray:
    """The coordinate step on a small [theta, T] block (the specification the kernels follow): float64 [T]."""
    V = np.asarray(V, dtype=np.float64)
    m = np.median(V, axis=0)
    order = np.lexsort((V, np.abs(V - m)), axis=0)[:beta]
    return np.take_along_axis(V, order, axis=0).mean(axis=0)


# --- geometric median (RFA) -----------------------------------------------------------------------------------------
def robust_scale(D: np.ndarray) -> float:
    """A typical distance between rows that fewer than half of the rows can inflate: per row, the lower median of
    its nonzero distances to the others; then the lower median of those over the rows. (A plain median of the
    pairwise distances is not robust: f attackers of k touch f(2k - f - 1)/2 of the k(k-1)/2 pairs, a majority from
    f ~ 0.3k.) 0 when all rows are identical."""
    k = D.shape[0]
    per = []
    for i in range(k):
        d = np.sqrt(np.delete(D[i], i))
        d = np.sort(d[d > 0])
        if d.size:
            per.append(d[(d.size - 1) // 2])
    if not per:
        return 0.0
    per.sort()
    return float(per[(len(per) - 1) // 2])


def geometric_median(X, *, eps: float = 1e-6, max_iter: int = 100, weights=None, nu: float = 1e-6,
                     init: str = "robust", party_ids=None, gram: Gram | None = None,
                     backend: str | None = None) -> RobustResult:
    r"""Weighted geometric median by the smoothed Weiszfeld algorithm (RFA: Pillutla, Kakade, Harchaoui, 2022,
    "Robust Aggregation for Federated Learning"), iterated in k-space.

    .. math::  z^\star = \arg\min_z F(z), \quad F(z) = \sum_i \alpha_i \lVert z - x_i \rVert, \quad
               \alpha_i = w_i / \textstyle\sum_j w_j

    The iterate is held as coefficients, :math:`z = \sum_i a_i x_i` with :math:`\sum_i a_i = 1` (an affine
    combination, so the centered Gram applies unchanged):

    .. math::  \lVert z - x_i \rVert^2 = a^T G a - 2 (G a)_i + G_{ii}, \qquad
               a \leftarrow \frac{\beta}{\sum_j \beta_j}, \quad \beta_i = \frac{\alpha_i}{\max(\nu, \lVert z - x_i
               \rVert)}

    * Smoothing: :math:`\nu` = ``nu`` times :math:`\rho` = :func:`robust_scale` (a typical honest distance while
      fewer than half the rows are attackers; RFA uses an absolute 1e-6), so an iterate on a row does not divide
      by zero.
    * Stopping rule: the step :math:`\lVert z_t - z_{t-1} \rVert = \sqrt{\Delta a^T G \Delta a} \le
      \varepsilon \rho` (``eps``, relative to the same scale), or ``max_iter`` iterations. Not the relative change
      of F: with an attacker 1e30 away, F ~ 1e30 hides honest-scale moves far below float64's resolution, and the
      iteration would stop 1e23 away from the honest cluster.
    * Start (``init``): ``"robust"`` (default): the weighted mean of the ceil(k/2) rows nearest the medoid (the row
      of least F); ``"mean"``: the weighted mean, as RFA. The minimizer is the same (unique for rows not on a
      line); Weiszfeld converges linearly, so a start 1e30/k away (the mean, with one huge attacker) costs ~100
      iterations where the robust start needs a few.

    * A median at a row: Weiszfeld only creeps towards it (steps ~ 1/t). Each time a new row is the nearest to
      the iterate, the exact optimality condition at that row p (weight :math:`\alpha_p` summed over its exact
      duplicates) is tested in k-space, :math:`\lVert \sum_{j \ne p} \alpha_j (x_j - x_p) / \lVert x_j - x_p
      \rVert \rVert \le \alpha_p`; when it holds the median is that row, exactly (``info["at_row"]``).

    Each iteration is O(k^2) flops and reads no data; ``info`` holds the iterations, F, the last step and whether it
    converged. The coefficients are >= 0, so z lies in the convex hull of the rows.

    Passes: 2, whatever the iteration count (RFA's federated version reads every update once per iteration): the
    Gram, then one weighted sum :math:`\sum_i a_i x_i` over the slab.
    """
    rows, parties = _slab(X, party_ids)
    k = rows.shape[0]
    max_iter = _count("max_iter", max_iter, 0)
    if not (eps > 0 and nu > 0):
        raise ValueError("eps and nu must be > 0")
    if init not in ("robust", "mean"):
        raise ValueError(f"init must be 'robust' or 'mean', got {init!r}")
    alpha = _weights(weights, k, parties)
    alpha = alpha / alpha.sum()
    g = gram if gram is not None else _build_gram(rows, party_ids=parties, backend=backend)
    G = g.G
    gd = np.diag(G)
    D = g.distances()
    rho = robust_scale(D)
    a = alpha.copy()
    it, converged, F, step, vertex_of = 0, True, 0.0, 0.0, None
    if rho > 0:  # else all rows are identical: any convex combination is the median
        nu_abs = nu * rho
        if init == "robust":
            med = int(np.argmin(np.sqrt(D) @ alpha))
            near = np.argsort(D[med], kind="stable")[:(k + 1) // 2]
            a = np.zeros(k)
            a[near] = alpha[near] / alpha[near].sum()

        def dist(a):
            v = G @ a
            return np.sqrt(np.maximum(float(a @ v) - 2.0 * v + gd, 0.0))

        same = D <= TIE_RTOL * (gd[:, None] + gd[None, :])
        np.fill_diagonal(same, True)

        def vertex(p):
            """The rows equal to row p if p is the median: |sum_{j != p} alpha_j (x_j - p)/|x_j - p|| <= alpha_p,
            with the inner products from G: (x_j - p).(x_l - p) = G_jl - G_jp - G_lp + G_pp."""
            grp = same[p]
            oth = ~grp
            if not oth.any():
                return grp
            c = alpha[oth] / np.sqrt(D[p, oth])
            gp = G[oth, p]
            H = G[np.ix_(oth, oth)] - gp[:, None] - gp[None, :] + G[p, p]
            return grp if float(c @ H @ c) <= float(alpha[grp].sum()) ** 2 else None

        d = dist(a)
        converged, checked, vertex_of = False, set(), None
        while it < max_iter:
            p = int(np.argmin(d))
            if p not in checked:  # Weiszfeld only creeps towards a median that is a row: test the nearest row
                checked.add(p)
                grp = vertex(p)
                if grp is not None:
                    a = np.where(grp, alpha, 0.0) / alpha[grp].sum()
                    d, step, converged, vertex_of = dist(a), 0.0, True, p
                    break
            b = alpha / np.maximum(d, nu_abs)
            a_new = b / b.sum()
            da = a_new - a
            step = math.sqrt(max(float(da @ (G @ da)), 0.0))
            a = a_new
            d = dist(a)
            it += 1
            if step <= eps * rho:
                converged = True
                break
        F = float(alpha @ d)
    agg = combine(rows, a, backend=backend)
    info = {"iterations": it, "converged": converged, "objective": F, "step": step, "at_row": vertex_of,
            "passes": (g.passes if gram is None else 0) + 1, "gram_reference": g.reference}
    return RobustResult(agg, np.arange(k, dtype=np.int64), parties, a, info)


# --- norm bounding and centered clipping ----------------------------------------------------------------------------
def norm_bound(X, max_norm: float, *, weights=None, norms=None, party_ids=None,
               backend: str | None = None) -> RobustResult:
    r"""Norm bounding (Sun, Kairouz, Suresh, McMahan, 2019, "Can You Really Backdoor Federated Learning?"): clip
    each update (a delta) to norm M, then average.

    .. math::  \Delta = \sum_i \omega_i\, x_i \min\!\left(1, \frac{M}{\lVert x_i \rVert}\right), \qquad
               \omega_i = w_i / \textstyle\sum_j w_j

    Passes: 2 (norms, then the weighted sum); 1 with ``norms`` (the rows' L2 norms, e.g. from admission's stats
    pass or ``gram(...).sqnorms ** 0.5``), which are trusted as given. It is :func:`centered_clipping` with center
    0 and one iteration.
    """
    rows, parties = _slab(X, party_ids)
    k = rows.shape[0]
    M = _positive_float(max_norm, "max_norm")
    if norms is None:
        return centered_clipping(rows, M, None, iters=1, weights=weights, party_ids=parties, backend=backend)
    nrm = np.asarray(norms, dtype=np.float64).reshape(-1)
    if nrm.shape != (k,) or not np.all(np.isfinite(nrm)) or np.any(nrm < 0):
        raise ValueError(f"norms must be {k} finite values >= 0")
    omega = _weights(weights, k, parties)
    omega = omega / omega.sum()
    coef = omega * _clip_factor(nrm, M)
    agg = combine(rows, coef, backend=backend)
    info = {"norms": nrm, "clipped": np.flatnonzero(nrm > M), "passes": 1}
    return RobustResult(agg, np.arange(k, dtype=np.int64), parties, coef, info)


def centered_clipping(X, tau: float, center=None, *, iters: int = 1, weights=None, party_ids=None,
                      backend: str | None = None) -> RobustResult:
    r"""Centered clipping (Karimireddy, He, Jaggi, 2021, "Learning from History for Byzantine Robust
    Optimization"), ``iters`` (L) iterations from the center v (the previous aggregate / momentum; 0 if None):

    .. math::  v_{l+1} = v_l + \sum_i \omega_i\, (x_i - v_l) \min\!\left(1, \frac{\tau}{\lVert x_i - v_l
               \rVert}\right), \qquad \omega_i = w_i / \textstyle\sum_j w_j

    In k-space: :math:`v_l = v_0 + \sum_i b_i (x_i - v_0)` (b starts at 0), so with :math:`H` the Gram matrix of
    the rows centered at :math:`v_0` (:func:`gram` with ``center=v0``),

    .. math::  \lVert x_i - v_l \rVert^2 = H_{ii} - 2 (H b)_i + b^T H b, \qquad
               b \leftarrow b + \textstyle\sum_i \omega_i \gamma_i (e_i - b),\ \gamma_i = \min(1, \tau / \lVert
               x_i - v_l \rVert)

    and the result is one pass :math:`v_0 + \sum_i b_i (x_i - v_0)`, computed in float64 as a delta from v0.
    Passes: 2 for any L (L = 1 needs only the diagonal of H: a norms pass without the k x k products; L > 1 the
    full centered Gram). The data-space iteration reads the slab 2L times. With center None, H is the uncentered
    Gram (deltas near the origin: no cancellation); pass the global model as center for models.
    """
    rows, parties = _slab(X, party_ids)
    k, n = rows.shape
    t = _positive_float(tau, "tau")
    iters = _count("iters", iters, 0)
    if iters < 1:
        raise ValueError("iters must be >= 1")
    be = _pick(backend, rows)
    omega = _weights(weights, k, parties)
    omega = omega / omega.sum()
    if center is None:
        mode, v0 = MODE_NONE, None
    else:
        v0 = _vector(center, rows)
        if v0.shape != (n,) or v0.dtype not in (np.float32, np.float64):
            raise ValueError(f"center must be a float32/float64 vector of shape ({n},)")
        mode = MODE_VECTOR
    G, sq, csq = _run_gram(be, rows, mode, 0, v0, BLOCK, iters == 1)
    _check_finite(rows, parties, sq, G if G is not None else np.zeros((1, 1)))
    if iters == 1:
        coef = omega * _clip_factor(np.sqrt(csq), t)
        H = None
    else:
        H = G
        hd = np.diag(H)
        coef = np.zeros(k)
        for _ in range(iters):
            v = H @ coef
            dist = np.sqrt(np.maximum(hd - 2.0 * v + float(coef @ v), 0.0))
            gam = _clip_factor(dist, t)
            coef = coef + omega * gam - float(omega @ gam) * coef
    agg = combine(rows, coef, base=v0, backend=be)
    dist0 = np.sqrt(csq if H is None else np.diag(H))
    info = {"distances_to_center": dist0, "iterations": iters, "passes": 2}
    return RobustResult(agg, np.arange(k, dtype=np.int64), parties, coef, info)


def _positive_float(x, name) -> float:
    x = float(x)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be finite and > 0, got {x!r}")
    return x


def _clip_factor(norms, M) -> np.ndarray:
    """min(1, M / norm), and 0 where norm == 0 (it multiplies a zero vector there: x_i, or x_i - v)."""
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):  # (M / a tiny norm is inf: a factor of 1)
        return np.minimum(1.0, M / np.where(norms > 0, norms, np.inf))


# --- numpy and CuPy: the same array operations on a host or a device slab --------------------------------------------
def _tile_columns(be: str, rows: int, block: int) -> int:
    """Columns per tile: ``block`` on the host (cache-sized); on the GPU, DEVICE_TILE values' worth of float64."""
    return max(block, DEVICE_TILE // max(rows, 1)) if be == "cupy" else block


def _parts(T, part: int) -> tuple:
    """A [k, w] tile as (its first m columns cut in [m / part, k, part] parts, the rest [k, w - m]); no parts for
    ``part`` 0. A k x w times w x k product with w in the millions is one thread block's work per k x k output
    on a GPU (cuBLAS splits the rows and columns of the output, not the long dimension): in parts it runs as
    m / part batched products, then a sum. The host's BLAS splits any way it likes: there the tile stays whole."""
    k, w = T.shape
    m = w // part * part if part else 0
    head = array_module(T).ascontiguousarray(T[:, :m].reshape(k, m // part, part).transpose(1, 0, 2)) if m else None
    return head, T[:, m:]


def _sumsq(T, part: int):
    """Per row of a float64 tile, the sum of its squares."""
    xp = array_module(T)
    head, rest = _parts(T, part)
    out = xp.zeros(T.shape[0]) if head is None else (head * head).sum(axis=2).sum(axis=0)
    return out + xp.einsum("ij,ij->i", rest, rest) if rest.shape[1] else out  # (no empty einsum on the GPU)


def _syrk(T, part: int):
    """T @ T.T of a float64 tile (dsyrk: numpy detects A @ A.T; cuBLAS batched dgemm over the parts)."""
    xp = array_module(T)
    head, rest = _parts(T, part)
    out = xp.zeros((T.shape[0],) * 2) if head is None else (head @ head.transpose(0, 2, 1)).sum(axis=0)
    return out + rest @ rest.T if rest.shape[1] else out


def _gram_xp(rows, mode, refrow, refvec, block, diag_only):
    xp = array_module(rows)
    part = DEVICE_PART if xp is not np else 0
    k, n = rows.shape
    G = None if diag_only else xp.zeros((k, k))
    sq = xp.zeros(k)
    csq = xp.zeros(k)
    for c0 in range(0, n, block):
        T = rows[:, c0:c0 + block].astype(np.float64)
        sq += _sumsq(T, part)
        if mode == MODE_ROW:
            T -= T[refrow].copy()
        elif mode == MODE_VECTOR:
            T -= refvec[c0:c0 + block]
        if diag_only:
            csq += _sumsq(T, part)
        else:
            G += _syrk(T, part)
    return None if diag_only else to_host(G), to_host(sq), to_host(csq)


def _combine_xp(rows, idx, coef, base, out, block):
    xp = array_module(rows)
    idx, coef = xp.asarray(idx), xp.asarray(coef)
    for c0 in range(0, rows.shape[1], block):
        T = rows[idx, c0:c0 + block].astype(np.float64)
        if base is not None:
            b = base[c0:c0 + block].astype(np.float64)
            out[c0:c0 + block] = (b + coef @ (T - b)).astype(out.dtype)
        else:
            out[c0:c0 + block] = (coef @ T).astype(out.dtype)


def _bulyan_xp(rows, idx, beta, out, block):
    """The coordinate step by whole-tile array operations, with ``_bulyan_nb``'s math (and so its bits): each
    coordinate's theta values sorted along the fast axis, the median m (0.5 a + 0.5 b for even theta), the start
    of the beta-window closest to m counted as the number of s with v[s + beta] - m < m - v[s] (monotone in s; a
    tie keeps the smaller values), the window summed in ascending order from +0.0, the other ranks adding 0.0."""
    xp = array_module(rows)
    idx = xp.asarray(idx)
    theta = int(idx.shape[0])
    lower, upper = (theta - 1) // 2, theta // 2
    for c0 in range(0, rows.shape[1], block):
        V = xp.sort(xp.ascontiguousarray(rows[idx, c0:c0 + block].T).astype(np.float64), axis=1)  # [T, theta]
        m = V[:, upper] if lower == upper else 0.5 * V[:, lower] + 0.5 * V[:, upper]
        start = ((V[:, beta:] - m[:, None]) < (m[:, None] - V[:, :theta - beta])).sum(axis=1)
        acc = xp.zeros(V.shape[0])
        for j in range(theta):  # in rank order, as the kernels add
            acc += xp.where((start <= j) & (j < start + beta), V[:, j], 0.0)
        out[c0:c0 + block] = (acc / beta).astype(out.dtype)


def _bulyan_cupy(rows, idx, beta, out, block):
    """On the GPU: the selected rows gathered tile by tile into a contiguous [theta, T] block, then the generated
    per-theta kernel (cuda_source.robust_kernel, mode 2: one thread per coordinate, the values in registers, the
    same math as _bulyan_nb). float32 slabs and theta <= BULYAN_MAX_K; others take the array path."""
    from .backends import cuda_source, cupy_backend
    from .robust_coord import CODES

    theta = len(idx)
    if rows.dtype != np.float32 or theta > cuda_source.BULYAN_MAX_K:
        return _bulyan_xp(rows, idx, beta, out, block)
    sel = array_module(rows).asarray(idx)
    for c0 in range(0, rows.shape[1], block):
        cupy_backend.robust_coord(rows[sel, c0:c0 + block], CODES["float32"], 2, beta, 0, out[c0:c0 + block])


# --- numba backend --------------------------------------------------------------------------------------------------
def _threads(size) -> int:
    return _numba.use_threads(1 if size < SMALL_CALL else get_num_threads())


def _chunk(kp: int) -> int:
    """Columns per inner chunk: the kp x C float64 buffer near 192 KB (L2), C in [64, 512], a multiple of 8."""
    return int(max(64, min(512, (196608 // (8 * kp)) // 8 * 8)))


@keeps_threads
def _gram_numba(rows, mode, refrow, refvec, block, diag_only):
    if _numba.available() is not True:
        raise BackendUnavailable(f"backend 'numba' unavailable: {_numba.available()}")
    k, n = rows.shape
    kp = (k + 3) // 4 * 4
    # tile partial sums: keep their memory (nsup * kp^2 * 8 bytes) under ~32 MB
    block = max(block, -(-n // max(1, (1 << 22) // (kp * kp))))
    nsup = max(1, -(-n // block))
    part = np.zeros((1, 1, 1) if diag_only else (nsup, kp, kp))
    sq = np.zeros((nsup, k))
    csq = np.zeros((nsup, k))
    ref = refvec if refvec is not None else rows[:1, :0].reshape(0)
    _threads(rows.size)
    if n:
        _gram_nb(rows, mode, refrow, ref, block, _chunk(kp), diag_only, part, sq, csq)
    sq, csq = sq.sum(axis=0), csq.sum(axis=0)
    return None if diag_only else part.sum(axis=0)[:k, :k], sq, csq


@keeps_threads
def _combine_numba(rows, idx, coef, base, out):
    n = rows.shape[1]
    if n == 0:
        return
    nthreads = _threads(idx.shape[0] * n)
    has_base = base is not None
    C = 2048  # a 16 KB float64 accumulator: stays in L1 while the rows stream through
    _combine_nb(rows, idx, coef, has_base, base if has_base else rows[:1, :0].reshape(0), out, C,
                min(-(-n // C), 4 * nthreads))


@keeps_threads
def _bulyan_numba(rows, idx, beta, out):
    n = rows.shape[1]
    if n == 0:
        return
    theta = idx.shape[0]
    nthreads = _threads(theta * n)
    T = int(max(64, min(2048, (16384 // theta) // 64 * 64)))  # the theta x T float64 buffer near 128 KB
    ci, cj = sorting_network(theta)
    _bulyan_nb(rows, idx, beta, ci, cj, out, T, min(-(-n // T), 4 * nthreads))


@functools.lru_cache(maxsize=256)
def sorting_network(n: int) -> tuple:
    """Batcher's odd-even merge sort on n inputs (the power-of-two network with the comparators that touch
    positions >= n dropped): int64 arrays (i, j), i < j, applied in order (min to i, max to j). 19 comparators for
    n = 8, 162 for 28."""
    pairs = []
    p = 1
    while p < n:
        q = p
        while q >= 1:
            for j in range(q % p, n - q, 2 * q):
                for i in range(min(q, n - j - q)):
                    if (i + j) // (2 * p) == (i + j + q) // (2 * p):
                        pairs.append((i + j, i + j + q))
            q //= 2
        p *= 2
    ci = np.array([a for a, _ in pairs], np.int64)
    cj = np.array([b for _, b in pairs], np.int64)
    ci.flags.writeable = cj.flags.writeable = False
    return ci, cj


if numba is not None:

    # fastmath reassoc (vectorized sums) + contract (FMA): the float64 sums are held to a tolerance, not bits, and
    # do not depend on the thread count (fixed tiles, partial sums added in tile order).
    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc", "contract"})
    def _gram_nb(X, mode, refrow, refvec, S, C, diag_only, part, sq, csq):
        """Per tile b of S columns (one parallel work item): per chunk of C columns, widen + center the k rows into
        a float64 buffer (padded to kp = 4 ceil(k/4) rows of zeros), then 4x4 register blocks of row pairs
        (16 accumulators, vectorized over the chunk's columns) add into the tile's lower triangle part[b]."""
        k, n = X.shape
        nsup = sq.shape[0]
        kp = (k + 3) // 4 * 4
        for b in prange(nsup):
            buf = np.zeros((kp, C))
            lo = b * S
            hi = min(n, lo + S)
            for s in range(lo, hi, C):
                w = min(C, hi - s)
                for i in range(k):
                    xi = X[i, s:s + w]
                    bi = buf[i]
                    a = 0.0
                    for t in range(w):
                        x = np.float64(xi[t])
                        a += x * x
                    sq[b, i] += a
                    if mode == 0:
                        for t in range(w):
                            bi[t] = np.float64(xi[t])
                    elif mode == 1:
                        r = X[refrow, s:s + w]
                        for t in range(w):
                            bi[t] = np.float64(xi[t]) - np.float64(r[t])
                    else:
                        r = refvec[s:s + w]
                        for t in range(w):
                            bi[t] = np.float64(xi[t]) - np.float64(r[t])
                    if diag_only:
                        a = 0.0
                        for t in range(w):
                            a += bi[t] * bi[t]
                        csq[b, i] += a
                if diag_only:
                    continue
                G = part[b]
                for ib in range(0, kp, 4):
                    p0 = buf[ib]
                    p1 = buf[ib + 1]
                    p2 = buf[ib + 2]
                    p3 = buf[ib + 3]
                    for jb in range(0, ib + 1, 4):
                        q0 = buf[jb]
                        q1 = buf[jb + 1]
                        q2 = buf[jb + 2]
                        q3 = buf[jb + 3]
                        a00 = a01 = a02 = a03 = 0.0
                        a10 = a11 = a12 = a13 = 0.0
                        a20 = a21 = a22 = a23 = 0.0
                        a30 = a31 = a32 = a33 = 0.0
                        for t in range(w):
                            x0 = p0[t]
                            x1 = p1[t]
                            x2 = p2[t]
                            x3 = p3[t]
                            y0 = q0[t]
                            y1 = q1[t]
                            y2 = q2[t]
                            y3 = q3[t]
                            a00 += x0 * y0
                            a01 += x0 * y1
                            a02 += x0 * y2
                            a03 += x0 * y3
                            a10 += x1 * y0
                            a11 += x1 * y1
                            a12 += x1 * y2
                            a13 += x1 * y3
                            a20 += x2 * y0
                            a21 += x2 * y1
                            a22 += x2 * y2
                            a23 += x2 * y3
                            a30 += x3 * y0
                            a31 += x3 * y1
                            a32 += x3 * y2
                            a33 += x3 * y3
                        G[ib, jb] += a00
                        G[ib, jb + 1] += a01
                        G[ib, jb + 2] += a02
                        G[ib, jb + 3] += a03
                        G[ib + 1, jb] += a10
                        G[ib + 1, jb + 1] += a11
                        G[ib + 1, jb + 2] += a12
                        G[ib + 1, jb + 3] += a13
                        G[ib + 2, jb] += a20
                        G[ib + 2, jb + 1] += a21
                        G[ib + 2, jb + 2] += a22
                        G[ib + 2, jb + 3] += a23
                        G[ib + 3, jb] += a30
                        G[ib + 3, jb + 1] += a31
                        G[ib + 3, jb + 2] += a32
                        G[ib + 3, jb + 3] += a33

    @njit(parallel=True, cache=True, nogil=True, fastmath={"contract"})
    def _combine_nb(X, idx, coef, has_base, base, out, C, nblocks):
        """out[t] = base[t] + sum_j coef[j] (X[idx[j], t] - base[t]) (no base term without has_base): per chunk of C
        columns a float64 accumulator (L1) takes four rows per sweep, then one rounding to out's dtype."""
        n = X.shape[1]
        m = idx.shape[0]
        nch = (n + C - 1) // C
        for blk in prange(nblocks):
            acc = np.empty(C)
            for c in range(blk * nch // nblocks, (blk + 1) * nch // nblocks):
                lo = c * C
                w = min(C, n - lo)
                bb = base[lo:lo + w] if has_base else base[:0]
                for t in range(w):
                    acc[t] = 0.0
                j = 0
                while j < m:
                    if j + 4 <= m:
                        x0 = X[idx[j], lo:lo + w]
                        x1 = X[idx[j + 1], lo:lo + w]
                        x2 = X[idx[j + 2], lo:lo + w]
                        x3 = X[idx[j + 3], lo:lo + w]
                        c0, c1, c2, c3 = coef[j], coef[j + 1], coef[j + 2], coef[j + 3]
                        if has_base:
                            for t in range(w):
                                b = np.float64(bb[t])
                                acc[t] += (c0 * (np.float64(x0[t]) - b) + c1 * (np.float64(x1[t]) - b)
                                           + c2 * (np.float64(x2[t]) - b) + c3 * (np.float64(x3[t]) - b))
                        else:
                            for t in range(w):
                                acc[t] += (c0 * np.float64(x0[t]) + c1 * np.float64(x1[t])
                                           + c2 * np.float64(x2[t]) + c3 * np.float64(x3[t]))
                        j += 4
                    else:
                        xj = X[idx[j], lo:lo + w]
                        cj = coef[j]
                        if has_base:
                            for t in range(w):
                                acc[t] += cj * (np.float64(xj[t]) - np.float64(bb[t]))
                        else:
                            for t in range(w):
                                acc[t] += cj * np.float64(xj[t])
                        j += 1
                o = out[lo:lo + w]
                if has_base:
                    for t in range(w):
                        o[t] = np.float64(bb[t]) + acc[t]
                else:
                    for t in range(w):
                        o[t] = acc[t]


    @njit(parallel=True, cache=True, nogil=True)
    def _bulyan_nb(X, idx, beta, ci, cj, out, T, nblocks):
        """Per tile of T coordinates: the theta selected rows widened to float64 into a theta x T buffer, sorted per
        coordinate by a sorting network (each comparator a vectorized min/max over the T lanes: branch-free); the
        median m (row h, or the mean of rows h-1, h); the start s* of the beta-window closest to m, counted as
        ``sum_{s < theta - beta} [v_{s+beta} - m < m - v_s]`` (the predicate is monotone in s, so the count is where
        the window stops moving right; a tie keeps the smaller value); the window summed in ascending order."""
        theta = idx.shape[0]
        n = X.shape[1]
        h = theta // 2
        ntiles = (n + T - 1) // T
        for blk in prange(nblocks):
            buf = np.empty((theta, T))
            med = np.empty(T)
            cnt = np.empty(T)
            acc = np.empty(T)
            for it in range(blk * ntiles // nblocks, (blk + 1) * ntiles // nblocks):
                c0 = it * T
                ln = min(T, n - c0)
                for a in range(theta):
                    src = X[idx[a], c0:c0 + ln]
                    dst = buf[a]
                    for t in range(ln):
                        dst[t] = np.float64(src[t])
                _apply_network(buf, ci, cj, 0, ln)
                if theta % 2 == 1:
                    rm = buf[h]
                    for t in range(ln):
                        med[t] = rm[t]
                else:
                    r0 = buf[h - 1]
                    r1 = buf[h]
                    for t in range(ln):
                        med[t] = 0.5 * r0[t] + 0.5 * r1[t]
                for t in range(ln):
                    cnt[t] = 0.0
                    acc[t] = 0.0
                for s in range(theta - beta):
                    lo = buf[s]
                    hi = buf[s + beta]
                    for t in range(ln):
                        cnt[t] += 1.0 if hi[t] - med[t] < med[t] - lo[t] else 0.0
                for j in range(theta):
                    r = buf[j]
                    fj = np.float64(j)
                    for t in range(ln):
                        acc[t] += r[t] if (cnt[t] <= fj and fj < cnt[t] + beta) else 0.0
                o = out[c0:c0 + ln]
                for t in range(ln):
                    o[t] = acc[t] / beta


# --- bench ----------------------------------------------------------------------------------------------------------
def bench(shapes=((10, 25_000_000), (50, 5_000_000)), *, repeat: int = 3, flower: bool = True,
          flower_pairs: float = 2e10, seed: int = 0):
    """Time the Gram step against this machine's SSYRK rate (numpy ``X @ X.T`` on the same [k, N] float32 slab,
    which numpy runs as ``cblas_ssyrk``; flops counted as k^2 N, the SYRK-equivalent 2 k^2 N / 2) and the rules
    against Flower's ``aggregate_krum`` / ``aggregate_bulyan`` on the same arrays. Flower's Bulyan recomputes
    sum_n n^2 full-length distances; it runs on the first columns so that this is at most ``flower_pairs`` values
    (ours on the same columns). Prints ratios (absolute times mean little on a shared machine); ``python -m
    jitkernels.robust_gram``. Returns the rows as dicts."""
    import platform

    def best(fn, r=repeat):
        t = math.inf
        for _ in range(r):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    print(f"jitkernels.robust_gram bench: numpy {np.__version__}, numba {getattr(numba, '__version__', None)}, "
          f"threads {get_num_threads()}, {platform.processor() or platform.machine()}")
    rng = np.random.default_rng(seed)
    out = []
    for k, n in shapes:
        X = rng.standard_normal((k, n), dtype=np.float32) * np.float32(1e-2) + np.float32(0.5)
        f = max(0, (k - 3) // 4)
        for fn in (krum, bulyan, geometric_median):  # compile / load the numba cache
            fn(X[:, :4096], 1) if fn is not geometric_median else fn(X[:, :4096])
        flops = float(k) * k * n
        row = {"k": k, "N": n, "f": f}
        t_syrk = best(lambda: X @ X.T)
        t_gram = best(lambda: gram(X, backend="numba"))
        t_gram_np = best(lambda: gram(X, backend="numpy"))
        row.update(ssyrk_gflops=flops / t_syrk / 1e9, gram_gflops=flops / t_gram / 1e9,
                   gram_vs_ssyrk=t_syrk / t_gram, gram_numpy_vs_ssyrk=t_syrk / t_gram_np,
                   gram_read_gbs=X.nbytes / t_gram / 1e9)
        row["krum_s"] = best(lambda: krum(X, f, m=k - f))
        row["bulyan_s"] = best(lambda: bulyan(X, f))
        gm = geometric_median(X)
        row["geomed_s"] = best(lambda: geometric_median(X))
        row.update(geomed_passes=gm.info["passes"], geomed_iterations=gm.info["iterations"],
                   gram_s=t_gram, ssyrk_s=t_syrk)
        if flower:
            from flwr.server.strategy.aggregate import aggregate_bulyan, aggregate_krum
            res = [([X[i]], 1) for i in range(k)]
            row["flower_krum_s"] = best(lambda: aggregate_krum(res, f, k - f), 1)
            row["krum_speedup"] = row["flower_krum_s"] / row["krum_s"]
            pairs = sum(m * m for m in range(k - (k - 2 * f) + 1, k + 1))
            nb = int(min(n, max(4096, flower_pairs // pairs)))
            Xb = np.ascontiguousarray(X[:, :nb])
            resb = [([Xb[i]], 1) for i in range(k)]
            row["flower_bulyan_N"] = nb
            row["flower_bulyan_s"] = best(lambda: aggregate_bulyan(list(resb), f, aggregate_krum, to_keep=0), 1)
            row["bulyan_same_N_s"] = best(lambda: bulyan(Xb, f))
            row["bulyan_speedup"] = row["flower_bulyan_s"] / row["bulyan_same_N_s"]
        print("  " + ", ".join(f"{a}={b:.4g}" if isinstance(b, float) else f"{a}={b}" for a, b in row.items()))
        out.append(row)
    return out


if __name__ == "__main__":  # pragma: no cover
    import argparse

    argparse.ArgumentParser(prog="python -m jitkernels.robust_gram", description=bench.__doc__.split("\n\n")[0]
                            ).parse_args()  # (--help ran the whole benchmark, minutes of it)
    bench()
