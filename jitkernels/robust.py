r"""Byzantine-robust aggregation through ``jk.Aggregator(template, algorithm=...)``.

Robust rules cannot stream: they need all of a round's updates. These algorithms are *buffered*: admitted updates
are copied into an :class:`~jitkernels.robust_store.UpdateStore` (a k x N slab, float32 or the input's half type,
under a byte budget, spilling to a memory-mapped file or refusing as configured) instead of being folded, and
finalize runs the rule's kernels over the slab (:mod:`jitkernels.robust_coord` for coordinate-wise rules,
:mod:`jitkernels.robust_gram` for distance-based ones). The slab saves and loads with the fold state, so a restart
loses nothing. Peak memory: the slab + O(tile), not k copies of the model.

Each class holds one rule; its docstring states the math, the paper and the passes over the slab. Rules aggregate
the updates as sent (models or deltas alike: coordinate-wise and distance-based rules commute with a shift by the
base), and return the rule's value in the updates' own terms, with ``base=`` too: a model for models, a delta for
deltas (the base is not added).
"""

from __future__ import annotations

import math

import numpy as np

from .algorithms import FedAvg, _count, _positive, number
from . import robust_store as _store

# the rules' store and its errors, where the rules are (``from jitkernels import robust as R; R.BudgetExceeded``)
BudgetExceeded, DeviceUpdateStore, SpillFailed, StoreFull, UpdateStore = (
    _store.BudgetExceeded, _store.DeviceUpdateStore, _store.SpillFailed, _store.StoreFull, _store.UpdateStore)


_GRAM_SLABS = ("float32",)
"""The slabs the Gram rules read through an Aggregator: the store holds float32 or half slabs, and the Gram kernels
take float32 (or float64 arrays, called directly)."""


class _Buffered(FedAvg):
    """Shared by buffered rules: the store's configuration, and the hooks the Aggregator calls."""

    buffered = True
    slab_dtypes = None  # the slab dtypes the rule's kernels read (None: every one the store offers)

    def __init__(self, *, k_max: int = 4096, slab_dtype: str = "float32", budget_bytes: int | None = None,
                 over_budget: str = "refuse", spill_dir=None, weighted: bool = True):
        super().__init__(weighted=weighted)
        if over_budget not in ("refuse", "spill"):
            raise ValueError(f"over_budget must be 'refuse' or 'spill', got {over_budget!r}")
        if self.slab_dtypes is not None and str(slab_dtype) not in self.slab_dtypes:  # not at finalize, after a round
            raise ValueError(f"{type(self).__name__} reads {' or '.join(self.slab_dtypes)} slabs (its distances "
                             f"come from the Gram kernels), not {slab_dtype}")
        # (2.9 rows became 2, True one, "8" eight; a budget of True one byte)
        self.k_max, self.slab_dtype = _count("k_max", k_max), str(slab_dtype)
        budget_bytes = None if budget_bytes is None else _count("budget_bytes", budget_bytes, 0)
        self.budget_bytes, self.over_budget, self.spill_dir = budget_bytes, over_budget, spill_dir

    def new_store(self, layout, on_device: bool = False):
        """The round's store: in GPU memory for a GPU aggregator (``on_device``), unless it may spill to disk
        (:func:`~jitkernels.robust_store.store_class`)."""
        from .robust_store import store_class

        return store_class(on_device, self.over_budget)(
            layout.size, self.k_max, dtype=self.slab_dtype, budget_bytes=self.budget_bytes,
            over_budget=self.over_budget, spill_dir=self.spill_dir, shapes=[leaf.shape for leaf in layout.leaves])

    def aggregate(self, store, weights: np.ndarray, base=None, backend: str = "auto") -> np.ndarray:
        """The rule over the store's k rows (``weights``: the parties' masses, in row order; ``base``: the flat
        global model, for rules centered at it; ``backend``: the host kernels' backend, as the Aggregator's): float[N].
        """
        raise NotImplementedError

    def params(self) -> dict:
        # the budget and its rule are saved with the state; the spill directory is this machine's (from_state takes
        # it again: Aggregator.from_state(..., spill_dir=))
        return {**super().params(), "k_max": self.k_max, "slab_dtype": self.slab_dtype,
                "budget_bytes": self.budget_bytes, "over_budget": self.over_budget}


class FedMedian(_Buffered):
    r"""Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates"; Flower's ``FedMedian``).

    .. math::  x_i = \operatorname{median}_j u_{j,i}

    with the two middle values of an even k averaged as ``0.5 a + 0.5 b`` in float64 (no overflow for adversarial
    values; Flower's ``np.median`` of float32 returns inf for two 3e38). Unweighted. One pass over the slab: k x N
    reads, N writes, in cache-blocked tiles with a sorting network per tile (``robust_coord``).
    """

    uses_weights = False  # the rule ignores the parties' weights (Flower's too)

    name = "fedmedian"

    def aggregate(self, store, weights, base=None, backend="auto"):
        from .robust_coord import coordinate_median

        return coordinate_median(store, backend=backend)


class FedTrimmedAvg(_Buffered):
    r"""Coordinate-wise trimmed mean (Yin et al., 2018; Flower's ``FedTrimmedAvg``).

    .. math::  x_i = \frac{1}{k - 2c} \sum_{r=c}^{k-c-1} u_{(r),i}, \qquad c = \lfloor \beta k \rfloor

    (the :math:`c` largest and smallest values of each coordinate cut, as ``scipy.stats.trim_mean`` and Flower do),
    summed in float64 in ascending order. Unweighted. One pass over the slab.
    """

    uses_weights = False  # the rule ignores the parties' weights (Flower's too)

    name = "fedtrimmedavg"

    def __init__(self, *, beta: float = 0.2, **store):
        super().__init__(**store)
        if not 0 <= number("beta", beta) < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {beta!r}")
        self.beta = float(beta)

    def aggregate(self, store, weights, base=None, backend="auto"):
        from .robust_coord import trimmed_mean

        return trimmed_mean(store, self.beta, backend=backend)

    def params(self) -> dict:
        return {**super().params(), "beta": self.beta}


class Krum(_Buffered):
    r"""Krum and Multi-Krum (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent"; Flower's ``Krum``).

    .. math::  s_i = \sum_{j \in N_i} \lVert u_i - u_j \rVert^2, \quad |N_i| = k - f - 2 \text{ nearest}, \qquad
               x = \frac{\sum_{i \in S} w_i u_i}{\sum_{i \in S} w_i}, \ S = \text{the } m \text{ lowest scores}

    (m = 1: Krum; weights by sample counts as Flower, or uniform with ``weighted=False``; ties to the smallest party
    id, so that the order of arrival and the merge tree do not decide; ``variant="flower"``: to the earlier result).
    Distances come from the k x k Gram matrix of the centered rows, accumulated in float64 in one cache-blocked pass
    (``robust_gram.gram``), then one pass for the weighted sum of the selected rows. ``variant="paper"`` needs
    k >= 2f + 3; ``variant="flower"`` runs wherever Flower's Krum does (any k, m > k keeps all, as the Message
    API's ``select_multikrum``: the legacy ``aggregate_krum`` keeps only the m - k best for k < m < 2k, a slicing
    slip not copied; see :func:`~jitkernels.robust_gram.krum`) and takes a per-update ``mass=`` (>= 0; default: the
    update's weight):
    its weight in the average, so that an update of mass 0 takes part in the scores and weighs nothing, as
    Flower's results with ``num_examples == 0`` (a fold weight must be > 0).
    """

    slab_dtypes = _GRAM_SLABS

    name = "krum"

    def __init__(self, *, f: int, m: int = 1, variant: str = "paper", **store):
        from .robust_gram import KRUM_VARIANTS

        super().__init__(**store)
        if variant not in KRUM_VARIANTS:
            raise ValueError(f"variant must be one of {KRUM_VARIANTS}, got {variant!r}")
        # (f = 2.9 was truncated to 2: a weaker Byzantine bound than asked for)
        self.f, self.m, self.variant = _count("f", f, 0), _count("m", m), variant
        self.info_keys = ("mass",) if variant == "flower" else ()  # what check_info takes, and callers test

    def check_info(self, info, party):
        super().check_info(info, party)  # refuses keys outside info_keys: "mass" for the paper's variant
        return {"mass": _positive(info, "mass", party, allow_zero=True)} if "mass" in info else {}

    def mass(self, u) -> float:
        return u.info.get("mass", u.weight) if self.weighted else 1.0

    def aggregate(self, store, weights, base=None, backend="auto"):
        from .robust_gram import gram_backend, krum

        res = krum(store, self.f, self.m, weights=weights if self.weighted else None, variant=self.variant,
                   backend=gram_backend(backend))
        self.selected = res.parties  # who the last aggregate kept, by increasing score (e.g. to average their metrics)
        return res.aggregate

    def params(self) -> dict:
        return {**super().params(), "f": self.f, "m": self.m, "variant": self.variant}


class Bulyan(_Buffered):
    r"""Bulyan (El Mhamdi et al., 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium"; Flower's
    ``Bulyan``): :math:`\theta = k - 2f` rows chosen by iterated Krum, then per coordinate the mean of the
    :math:`\beta = \theta - 2f` selected values closest to their median.

    .. math::  S = \text{Krum}^{\theta}(u_1, \dots, u_k), \qquad
               x_t = \frac{1}{\beta} \sum_{i \in B_t} u_{i,t}, \ B_t = \text{the } \beta \text{ rows of } S
               \text{ nearest } \operatorname{median}_{i \in S} u_{i,t}

    (ties in the distance to the median to the smaller value). The iterated Krum runs on one distance matrix (the
    Gram pass), not on the data again; the coordinate step is a sorting network per cache-sized tile over the
    selected rows. Bytes per element: the slab read twice (the Gram, then the theta selected rows), 4 written.
    Unweighted. Needs k >= 4f + 3 (:func:`~jitkernels.robust_gram.bulyan`).
    """

    slab_dtypes = _GRAM_SLABS

    uses_weights = False  # the rule ignores the parties' weights (Flower's too)

    name = "bulyan"

    def __init__(self, *, f: int, **store):
        super().__init__(**store)
        self.f = _count("f", f, 0)

    def aggregate(self, store, weights, base=None, backend="auto"):
        from .robust_gram import bulyan, gram_backend

        return bulyan(store, self.f, backend=gram_backend(backend)).aggregate

    def params(self) -> dict:
        return {**super().params(), "f": self.f}


class GeometricMedian(_Buffered):
    r"""Geometric median by Weiszfeld's iteration, as RFA (Pillutla, Kakade & Harchaoui, 2022, "Robust Aggregation
    for Federated Learning").

    .. math::  x = \arg\min_z \sum_j w_j \lVert z - u_j \rVert_2

    Iterated in k-space from the Gram matrix (:math:`z = \sum_j a_j u_j`, distances from :math:`a^T G a`), stopped
    when a step is below ``eps`` times a robust distance scale or after ``max_iter``; then one weighted sum: two
    passes over the slab whatever the iteration count.
    """

    slab_dtypes = _GRAM_SLABS

    name = "geometric_median"

    def __init__(self, *, eps: float = 1e-6, max_iter: int = 100, **store):
        super().__init__(**store)
        if not (math.isfinite(number("eps", eps)) and eps > 0):
            raise ValueError(f"need eps > 0, got eps={eps!r}")
        self.eps, self.max_iter = float(eps), _count("max_iter", max_iter)

    def aggregate(self, store, weights, base=None, backend="auto"):
        from .robust_gram import geometric_median, gram_backend

        return geometric_median(store, eps=self.eps, max_iter=self.max_iter,
                                weights=weights if self.weighted else None, backend=gram_backend(backend)).aggregate

    def params(self) -> dict:
        return {**super().params(), "eps": self.eps, "max_iter": self.max_iter}


class CenteredClipping(_Buffered):
    r"""Centered clipping (Karimireddy, He & Jaggi, 2021, "Learning from History for Byzantine Robust
    Optimization"), centered at the base (the global model): :math:`v \leftarrow v + \sum_i \omega_i (u_i - v)
    \min(1, \tau / \lVert u_i - v \rVert)`, ``iters`` times, in k-space from the Gram matrix of the rows centered at
    the base: two passes over the slab. Needs the base.
    """

    slab_dtypes = _GRAM_SLABS

    name = "centered_clipping"
    needs_base = True

    def __init__(self, *, tau: float, iters: int = 1, **store):
        super().__init__(**store)
        if not (math.isfinite(number("tau", tau)) and tau > 0):
            raise ValueError(f"need tau > 0, got tau={tau!r}")
        self.tau, self.iters = float(tau), _count("iters", iters)

    def aggregate(self, store, weights, base=None, backend="auto"):
        from .robust_gram import centered_clipping, gram_backend

        return centered_clipping(store, self.tau, base, iters=self.iters,
                                 weights=weights if self.weighted else None, backend=gram_backend(backend)).aggregate

    def params(self) -> dict:
        return {**super().params(), "tau": self.tau, "iters": self.iters}


class NormBounding(FedAvg):
    r"""Norm bounding (Sun et al., 2019, "Can You Really Backdoor Federated Learning?"): each delta clipped to norm
    :math:`M`, then averaged.

    .. math::  x = b + \frac{\sum_j w_j \min(1, M / \lVert u_j - b \rVert_2)(u_j - b)}{\sum_j w_j}

    Streaming, not buffered: the norms come from admission's stats pass and the clip is a scaled fold (the stats
    pass plus the fold pass). Needs the base.
    """

    name = "normbounding"
    needs_base = True
    needs_norms = True

    def __init__(self, *, max_norm: float, weighted: bool = True):
        super().__init__(weighted=weighted)
        if not (math.isfinite(number("max_norm", max_norm)) and max_norm > 0):
            raise ValueError(f"max_norm must be finite and > 0, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def fold_weight(self, u, state) -> float:
        return self.mass(u) * (1.0 if u.norm <= self.max_norm else self.max_norm / u.norm)

    def params(self) -> dict:
        return {**super().params(), "max_norm": self.max_norm}


CLASSES = (FedMedian, FedTrimmedAvg, Krum, Bulyan, GeometricMedian, CenteredClipping, NormBounding)
BY_NAME = ("fedmedian", "fedtrimmedavg")  # the rules that have defaults for every parameter
