"""Aggregator: the user-facing object. Admits updates, folds them through a backend, merges, saves, finalizes.

Concurrency: ``fold``/``fold_many``/``merge``/``finalize`` on one Aggregator may be called from several threads. The
admission stats pass runs outside the lock (it only reads the update); the party check and the fold run under it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import threading
from typing import NamedTuple

import ml_dtypes
import numpy as np

from . import admission
from . import algorithms as _algorithms
from . import backends
from .admission import Admitted, admit_many
from .batch import address, build_groups, build_out_groups, plan_of, stack_entries
from .device import DeviceLeaf, array_module, empty_leaf, gpu_of, place, to_host
from .dtypes import Quantized, np_dtype
from .backends import numpy_ref
from .errors import (BackendUnavailable, CorruptState, DuplicateParty, EmptyAggregate, LayoutMismatch, NonFiniteUpdate,
                     InvalidUpdateInfo, RoundClosed, TornState, ValueOutOfRange)
from .layout import Layout
from . import state as state_module
from .parties import anonymous_party, check_party, per_update
from .state import FoldState

INT_RULES = ("mean", "max")

_INF_BITS = {"float16": (np.int16, np.uint16, 0x7C00, 0xFC00), "bfloat16": (np.int16, np.uint16, 0x7F80, 0xFF80),
             "float32": (np.int32, np.uint32, 0x7F800000, 0xFF800000),
             "float64": (np.int64, np.uint64, 0x7FF0000000000000, 0xFFF0000000000000)}
"""Per output dtype: the integer views of its bits, and the first bits of inf/NaN, positive and negative (see
_overflowed)."""


def _overflowed(out) -> bool:
    """Whether a float output holds inf or NaN: exponent all ones,
    from pos_inf up as signed integers (positive) or from neg_inf up as unsigned ones (negative). Two integer maxima
    find them without a temporary the size of the output, read as the output's own dtype."""
    bits = _INF_BITS.get(np.dtype(out.dtype).name)
    if bits is None:
        return False
    checked = admission.finite_maxabs(out)
    if checked is not None:
        return checked[0] > 0
    signed, unsigned, pos_inf, neg_inf = bits
    u = (out.array if isinstance(out, DeviceLeaf) else out).view(unsigned)
    return u.size > 0 and (int(u.view(signed).max()) >= pos_inf or int(u.max()) >= neg_inf)


@functools.cache
def _largest(dtype: str) -> float:
    return float(ml_dtypes.finfo(np_dtype(dtype)).max)  # (numpy's finfo has no bfloat16)


def _beyond(leaf, reach: float, where: str = "") -> ValueOutOfRange:
    top = _largest(leaf.dtype)
    return ValueOutOfRange(f"leaf {leaf.name!r}: the result reaches |{reach:.6g}|, beyond {leaf.dtype}'s {top:.6g}"
                           f"{where}", leaf=leaf.name, value=reach)


class _OneUpdate(NamedTuple):
    """What Aggregator._fold_one keeps between calls, for updates of one signature."""

    sig: bytes  # the update's dtype codes, one per leaf (batch.leaf_entry)
    bound: float  # Aggregator._fold_bound()
    groups: list | None  # the batch path's groups for one such update, re-pointed per call (None: the batch path)
    int_rows: tuple  # its integer leaves (folded on the host)
    mods: list  # the backend module of each group, once resolved


def _cast(values, dtype):
    """Host values in an output dtype; an integer one clamped to its range first: the accumulator's rounding took
    int32's max to 2^31, which the cast wrapped to its minimum (int64's max rounds up to 2^63: the float below)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        hi = float(info.max)
        values = np.clip(np.asarray(values, np.float64), float(info.min),  # (in float32, the bounds round too)
                         hi if hi <= info.max else float(np.nextafter(hi, -np.inf)))
    return values.astype(dtype, copy=False)  # (a robust rule's float32 result into a float32 leaf: no copy)


def _write(out, host_values) -> None:
    """out[...] = host_values, for a host array or a device leaf."""
    if isinstance(out, DeviceLeaf):
        out.array[...] = place(host_values.view(out.array.dtype), True)
    else:
        out[...] = host_values


def _copy_out(src, outs) -> None:
    """Finalized leaves ``src`` (where the state is) into ``outs`` (in the other memory), leaf by leaf: a device
    leaf straight into its host buffer (no host temporary), a host leaf uploaded."""
    for s, o in zip(src, outs):
        if isinstance(s, DeviceLeaf):
            s.array.get(out=o.view(s.array.dtype))
        else:
            _write(o, s)


def _written(layout, outs, buffered: bool) -> int:
    """How many leading outputs a finalize that raised ValueOutOfRange had written: all of them on the streaming
    path (its range check follows the kernels), up to the refused leaf on the buffered one (written leaf by leaf)."""
    if buffered:
        for i, leaf in enumerate(layout.leaves):
            if leaf.is_float and _overflowed(outs[i]):
                return i + 1
    return len(outs)


def _check_records(alg, state: FoldState) -> None:
    """A state from outside (a file, a worker's bytes: a checksum vouches for nothing) holds what ``alg``'s folds
    could have recorded: its server values (``check_scalars``), and each party's per-update record
    (``check_record``). A DP adaptive state without its clip norm raised a bare KeyError at its next fold, one with
    a forged clip norm of 1e308 clipped nothing; a FedNova record without steps raised one at finalize, one with
    steps of -3 made a wrong model), and, with no parties, no sums (state.check_empty_sums)."""
    try:
        state_module.check_empty_sums(state)
    except ValueError as e:
        raise CorruptState(f"the state's {e}") from None
    missing = sorted(alg.initial_scalars().keys() - state.scalars.keys())
    if missing:
        raise CorruptState(f"the state's algorithm {type(alg).__name__} keeps server values {missing}, and the state "
                           "has none of them")
    scalars = getattr(alg, "check_scalars", None)  # (a user's own algorithm class may have neither check)
    try:
        if scalars is not None:
            scalars(state.scalars)
    except ValueError as e:
        raise CorruptState(f"the state's {e}") from None
    check = getattr(alg, "check_record", None)
    for p in state.parties if check is not None else ():
        try:
            check(state.info.get(p) or {}, p)
        except InvalidUpdateInfo as e:
            raise CorruptState(f"the state's record of {e}") from None


class Aggregator:
    """Streaming aggregation of model updates into a :class:`FoldState`.

    Parameters
    ----------
    template : dict | list | tuple | array
        Fixes the layout (leaf names, shapes, dtypes) and the container and array type of the result.
    algorithm : str | algorithm object
        ``"fedavg"`` (weighted by sample count), ``"fedavg_unweighted"``, or an instance from
        :mod:`jitkernels.algorithms` (FedProx, FedNova, FedBuff, and the server optimizers FedAvgM, FedAdam,
        FedYogi, FedAdagrad, which need ``base``, keep their moments in the state and apply their step at
        :meth:`finalize`).
    backend : "auto" | "numpy" | "numba" | "cpp" | "cupy"
        Explicit names are always honored (or fail with the reason); "auto" picks "cupy" when the template is in
        GPU memory (CuPy arrays, torch CUDA tensors), else, per input dtype, cpp > numba > numpy.
        ``JITKERNELS_BACKEND`` sets the default. With "cupy" the accumulator lives in GPU memory; host updates are
        staged through pinned buffers, device updates are read in place, and the result comes back as the
        template's array type (on the device for CuPy / torch CUDA templates).
    acc_dtype : "float32" | "float64"
        Accumulator dtype; never narrower than float32 (fp16/bf16/int8 inputs are widened as they are read). Default:
        float64 where the template has a float64 leaf (a float64 model averaged in float32 came back rounded to
        float32 inside float64 arrays), else float32.
    base : pytree like ``template``, optional
        Fold deltas ``u - base`` (never materialized) and return ``base + average delta``.
    int_leaves : "mean" | "max"
        Rule for integer leaves (e.g. BatchNorm's ``num_batches_tracked``): weighted mean rounded to nearest, or max.
        They are tiny and folded on the host by numpy whatever the backend.
    partial : bool
        Accept updates that carry only some of a dict template's leaves (LoRA, FedBN); each leaf is divided by the
        total weight of the updates that carried it.
    copy : bool
        Copy updates on admission. By default admitted updates are held zero-copy and must not be mutated by the
        caller until folded.
    deterministic : bool
        Bit-identical results for any arrival order, batching, merge tree and thread count: each term ``w * x`` (f64)
        is pre-rounded on two fixed grids into two float64 accumulators whose sums are exact (Demmel & Nguyen,
        ReproBLAS; each grid's halfway remainder rounds away from zero). Limits: every ``weight * |x|`` must be
        <= ``bound`` (rounded up to a power of two, fixed when the job is created; larger updates are rejected at
        admission with ``ValueOutOfRange``); terms are resolved to ``bound * 2^-56`` (absolute); the state holds 16
        bytes per element; at most 2^30 updates per state, 2^20 when it sums integer leaves (``ValueOutOfRange`` past it);
        batches over 2^18 updates are folded in parts (same bits); integer leaves' ``mass * |x|`` up to 2^10 x the
        bound; the total weight, and with ``partial`` each leaf's, is summed exactly (``math.fsum``).
    bound : float
        The deterministic mode's bound on ``weight * |x|`` (default 2^20, e.g. weights up to ~10^5 samples times
        parameters up to ~10).
    """

    def __init__(self, template, algorithm="fedavg", *, backend=None, acc_dtype=None, base=None,
                 int_leaves="mean", partial=False, copy=False, deterministic=False, bound=2.0 ** 20,
                 _state: FoldState | None = None):
        if int_leaves not in INT_RULES:
            raise ValueError(f"int_leaves must be one of {INT_RULES}, got {int_leaves!r}")
        deterministic, partial, copy = (_algorithms.flag(name, v) for name, v in (
            ("deterministic", deterministic), ("partial", partial), ("copy", copy)))
        if deterministic:
            if acc_dtype not in (None, "float64"):
                raise ValueError("deterministic mode accumulates in float64 (two float64 parts)")
            if not (2.0 ** -960 <= bound <= 2.0 ** 960):  # its grids, and 2^30 terms summed on them, stay in float64
                raise ValueError(f"bound must be within [2^-960, 2^960], got {bound!r}")
            acc_dtype = "float64"
        self.algorithm = _algorithms.resolve(algorithm)
        self.partial = partial
        if self.partial and not getattr(self.algorithm, "supports_partial", True):
            raise ValueError(f"{type(self.algorithm).__name__} scales the aggregate by a sum over all of the round's "
                             "parties, which partial updates (leaves carried by only some) would get wrong: "
                             "partial=False")
        self.copy = copy
        self._lock = threading.RLock()
        self._one: _OneUpdate | None = None
        # which base the admission stats of an Admitted were measured against (renewed by reset(), which may change
        # the base): clipping must not use a delta norm taken against another round's model
        self._base_token = object()
        self.layout = _state.layout if _state is not None else (
            template if isinstance(template, Layout) else Layout.from_template(template))
        acc_dtype = acc_dtype or self.layout.default_acc_dtype
        self.backend = backends.requested(backend)
        if self.layout.in_gpu_memory and not backends.is_available("cupy"):
            # a GPU job's state resumed where the GPU backend cannot run: on the CPU backend the caller names, with
            # results as host arrays; never by default (no silent fallback)
            if self.backend in ("auto", "cupy"):
                raise BackendUnavailable(
                    f"the template is in GPU memory and the GPU backend cannot run here "
                    f"({backends.available_backends()['cupy']}); name a CPU backend (backend='cpp') to go on on the "
                    f"CPU, with results as host arrays")
            self.layout = self.layout.on_host()
        if self.backend == "auto" and self.layout.in_gpu_memory:
            self.backend = "cupy"
        if self.backend != "auto":
            # a backend that is not here fails now, with the reason; one that cannot run a dtype, at the first fold
            # of an update of it (a float16 template's updates may come as int8, or never carry that leaf)
            backends.get(self.backend)
        check_layout = getattr(self.algorithm, "check_layout", None)
        if check_layout is not None:  # a template the algorithm cannot run (SCAFFOLD's two trees of the same leaves)
            check_layout(self.layout)
        if _state is not None:
            self._adopt(_state.to(self.on_gpu))
            return
        params = {**self.algorithm.params(), "int_leaves": int_leaves,
                  "deterministic": _log2_up(bound) if deterministic else None}
        flat_base, base_max = (None, None) if base is None else self._flat(base, acc_dtype)
        if self.algorithm.needs_base and base is None:
            raise ValueError(f"{type(self.algorithm).__name__} folds deltas against the global model: pass base=")
        opt = None
        if self.algorithm.kind is not None:
            opt = {"m": place(np.zeros(self.layout.size, acc_dtype), self.on_gpu)}
            if self.algorithm.moments == 2:
                opt["v"] = place(np.full(self.layout.size, self.algorithm.v0(), acc_dtype), self.on_gpu)
        store = None
        if self.buffered:
            if self.partial or deterministic:
                raise ValueError(f"{type(self.algorithm).__name__} buffers the round's updates: no partial updates "
                                 f"or deterministic mode")
            if int_leaves != "mean":  # (taken, and ignored: its counters came back as the rule's value)
                raise ValueError(f"{type(self.algorithm).__name__} gives integer leaves its own value (rounded), as "
                                 f"it gives every leaf: int_leaves={int_leaves!r} would change nothing")
            store = self.algorithm.new_store(self.layout, self.on_gpu)
        self._adopt(FoldState(self.layout, algorithm=params, acc_dtype=acc_dtype, base=flat_base,
                              on_device=self.on_gpu, opt=opt, scalars=self.algorithm.initial_scalars(), store=store))
        if base_max is not None:
            self._bmax = (self._base_token, base_max)

    @classmethod
    def from_state(cls, state: FoldState, *, backend=None, partial=False, copy=False, spill_dir=None) -> "Aggregator":
        """Resume from a (loaded) state: later folds continue it (its algorithm, mode and bound come with it). A
        robust rule's store keeps its byte budget and rule; ``spill_dir``: where it spills on this machine (needed
        when the rule is ``over_budget="spill"`` with a budget). A loaded state is taken over (not copied); one that
        another aggregator holds (``agg.state``) is copied, a snapshot taken under that aggregator's lock, and the two
        go on apart (sharing it, folds through either ran under different locks: a party racing itself through both
        was summed twice and recorded once, and the other's saves were written torn)."""
        if not isinstance(state, FoldState):
            raise TypeError(f"from_state takes a FoldState (FoldState.load(path)), got {type(state).__name__}")
        if state.held:
            state = state.copy()
        if partial and state.store is not None:
            raise ValueError("partial updates are not supported by buffered (robust) rules")
        try:
            alg = _algorithms.from_params(state.algorithm)
        except (ValueError, TypeError, OverflowError) as e:  # (a record from a file that no algorithm could make)
            raise CorruptState(f"the state's algorithm record {state.algorithm} does not rebuild: {e}") from None
        # (a checksummed file can still lack them: a save from another tool, or a worker's partial state)
        if alg.needs_base and state.base is None:
            raise CorruptState(f"the state's algorithm {type(alg).__name__} folds deltas against the global model, "
                               "and the state has no base")
        if getattr(alg, "buffered", False) and state.store is None:
            raise CorruptState(f"the state's algorithm {type(alg).__name__} keeps the round's updates, and the "
                               "state has no store of them")
        _check_records(alg, state)
        if getattr(alg, "buffered", False):
            if alg.over_budget == "spill" and alg.budget_bytes is not None and spill_dir is None:
                raise ValueError(f"the state's {type(alg).__name__} spills past its budget of {alg.budget_bytes} "
                                 f"bytes: give from_state a spill_dir on this machine")
            alg.spill_dir = spill_dir
            if state.store is not None:
                state.store.set_budget(alg.budget_bytes, alg.over_budget, spill_dir)
        return cls(state.layout, alg, backend=backend, partial=partial, copy=copy,
                   int_leaves=state.algorithm.get("int_leaves", "mean"), _state=state)

    def __getstate__(self):
        # (copy.deepcopy and pickle: a Flower strategy copied for a sweep or sent to a Ray task holds one; the lock
        # and the per-update fold's cache of compiled tables are this object's own). The state is snapshotted under
        # the lock: copied after it, as deepcopy and pickle do, a fold from another thread tore the copy (an
        # update's sums without its record). A DP algorithm's copy keys its noise as the original does: by the
        # aggregate it releases (noise.aggregate_key).
        with self._lock:
            d = {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_one", "state", "_base_view")}
            d["state"] = self.state.copy()
        return d

    def __deepcopy__(self, memo):
        """The snapshot's arrays and store are new already: they are not copied again (a deepcopy of the state
        made by ``__getstate__`` held two copies of every array at its peak, 8 GB for a 1B-parameter FedAdam's
        4 GB of moments, base and accumulator); the rest is deep-copied as before."""
        d = self.__getstate__()
        st = d["state"]
        for a in (st.acc, st.lo, st.base, st.leaf_weight, st.store, *(st.opt or {}).values()):
            if a is not None:
                memo[id(a)] = a
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(d, memo))
        return new

    def __setstate__(self, d):
        self.__dict__.update(d)
        self._lock, self._one = threading.RLock(), None
        self.state.guard = self._lock
        # (the live state it named was copied outside the lock, and twice: rebuilt from the snapshot)
        self._base_view = (self.state, self.state.base, self._base_token)

    @property
    def buffered(self) -> bool:
        """The algorithm needs all of a round's updates (robust rules): they are kept in ``state.store``."""
        return getattr(self.algorithm, "buffered", False)

    @property
    def deterministic(self) -> bool:
        return self.state.deterministic

    @property
    def on_gpu(self) -> bool:
        return self.backend == "cupy"

    def _flat(self, tree, acc_dtype) -> tuple:
        """(the base ``tree`` as one flat array of the accumulator's dtype, where the state keeps it; its max |x|
        where the finiteness check measured it, else None): the caller seeds ``_bmax`` with it under the base's token,
        so that no second pass over the base takes it again."""
        leaves = self.layout.flatten(tree, party="<base>")
        for a, leaf in zip(leaves, self.layout.leaves):
            if isinstance(a, Quantized):
                raise LayoutMismatch(f"leaf {leaf.name!r} of the base is int8-quantized: a base (the global model) is "
                                     f"given as plain arrays (Quantized.dequantize())", party="<base>")
        flat = np.concatenate([np.asarray(to_host(a), dtype=acc_dtype).reshape(-1) for a in leaves])
        checked = admission.finite_maxabs(flat)
        bad = ~np.isfinite(flat) if checked is None or checked[0] else None
        if bad is not None and bad.any():  # else every later fold would be blamed on its party
            leaf = self.layout.leaves[int(np.searchsorted([l.offset for l in self.layout.leaves], np.argmax(bad),
                                                          side="right")) - 1]
            raise NonFiniteUpdate("<base>", leaf.name, int(bad[leaf.offset:leaf.offset + leaf.size].sum()))
        return place(flat, self.on_gpu), None if checked is None else checked[1]

    def _adopt(self, st: FoldState) -> None:
        """Make ``st`` this aggregator's state (a plain attribute: the per-update fold reads it several times)."""
        st.guard = self._lock  # its save() and to_bytes() wait for this aggregator's folds from other threads
        self.state = st
        self._base_view = (st, st.base, self._base_token)

    # which base the admission stats of an Admitted were measured against: (state, base, token), one tuple assigned
    # at once, so that admission reads them together without the lock (a save or a fold holds it for long)
    _base_view: tuple = (None, None, None)

    # --- properties ----------------------------------------------------------------------------------------------
    @property
    def acc_dtype(self) -> str:
        return self.state.acc_dtype

    @property
    def count(self) -> int:
        return self.state.count

    @property
    def total_weight(self) -> float:
        return self.state.total_weight

    def __repr__(self):
        return f"Aggregator({self.algorithm!r}, backend={self.backend!r}, {self.state!r})"

    # --- admission and folding -----------------------------------------------------------------------------------
    def admit(self, update, weight=1.0, party=None, **info) -> Admitted:
        """Validate one update for this aggregator (see :func:`jitkernels.admit`); ``info``: the per-update values
        the algorithm reads (``steps=`` for FedNova, ``staleness=`` for FedBuff)."""
        return self.admit_many([update], [weight], [party], [info])[0]

    def admit_many(self, updates, weights=None, parties=None, infos=None) -> list:
        k = len(updates)
        parties, infos = self._parties_and_infos(parties, infos, k)
        st, base, token = self._base_view  # together: a reset(base=) meanwhile must not stamp stats measured
        host_base = None if base is None else st.host_base()  # against the old base with the new base's token
        # a clipping rule's fold weight is the weight scaled by what the norm decides: the headroom is the fold
        # weight's to keep, checked below (the raw weight times the unclipped max|x| refused a large update that
        # the rule clips, and with it the batch: any party could fail a NormBounding round)
        clipped = getattr(self.algorithm, "needs_norms", False) and not self.buffered
        admitted = admit_many(updates, self.layout, weights=weights, parties=parties, base=base,
                              host_base=host_base, backend=self.backend, acc_dtype=self.acc_dtype,
                              copy=self.copy, partial=self.partial,
                              # buffered rules keep values, they do not sum them: no accumulator headroom to keep
                              bound=2.0 ** st.bound_log2 if st.deterministic else (math.inf if self.buffered else None),
                              base_max=self._base_max(base, token), clipped=clipped)
        for a, i in zip(admitted, infos):
            a.info = i
            if a.against_base:
                a.against_base = token
        if not self.buffered:  # the weight the fold multiplies by, where it is not the weight admission checked
            bound = self._fold_bound()  # (FedBuff's is 1 whatever the sample count: admitted here, refused by
            for a in admitted:  # every fold after)
                w = float(self.algorithm.fold_weight(a, st))
                if w != a.weight or clipped:
                    self._check_headroom(a, w, bound)
        self._check_int_bound(admitted)  # on arrival, with the masses the fold will use
        return admitted

    def _parties_and_infos(self, parties, infos, k: int) -> tuple:
        """The batch's party ids (anonymous ones made up, duplicates refused) and its checked info dicts."""
        parties = [anonymous_party() if p is None else check_party(p) for p in per_update(parties, k, "parties")]
        self._check_parties(parties)
        return parties, [self.algorithm.check_info(i, p) for i, p in zip(admission.info_dicts(infos, parties),
                                                                         parties)]

    def _check_parties(self, parties):
        seen = set()
        for p in parties:
            if p in seen:
                raise DuplicateParty(p, "this batch")
            seen.add(p)
            if p in self.state.parties:
                raise DuplicateParty(p)
        self._check_room(parties)

    def _check_room(self, parties) -> None:
        """An algorithm that knows how many parties there are (SCAFFOLD's N) refuses a party past them on arrival
        (the first one past them is named): finalize refused the round, which then could not be finished without
        losing it all (reset)."""
        most = getattr(self.algorithm, "max_parties", None)
        if most is not None and self.state.count + len(parties) > most:
            party = list(parties)[max(0, most - self.state.count)]
            raise ValueOutOfRange(f"party {party!r}: {type(self.algorithm).__name__} was told of {most} parties in "
                                  f"all, and {self.state.count} are folded already (num_parties counts every party)",
                                  party=party)

    def fold(self, update, weight=None, party=None, **info) -> None:
        """Fold one update (raw, or :class:`Admitted`). Raw updates are admitted first (one stats pass); ``weight``
        defaults to 1. ``info``: the per-update values the algorithm reads (``steps=`` for FedNova, ``staleness=``
        for FedBuff). An admitted update brings its own weight, party and values: giving them again is refused."""
        if isinstance(update, Admitted):
            _admitted_alone(weight, party, info or None)
            with self._lock:
                self._fold_admitted([update])
        else:
            self.fold_many([update], [1.0 if weight is None else weight], [party], [info])

    def fold_many(self, updates, weights=None, parties=None, infos=None) -> None:
        """Fold k updates in ONE pass over the accumulator. Items are :class:`Admitted` (weights, parties and info
        come with them) or raw updates with ``weights``, ``parties`` and ``infos`` (dicts). All are checked before
        anything is folded.

        Raw updates into an empty state (a round's first batch, JIT's usual case) on the C++ backend are admitted and
        folded in one pass over them: a rejection then zeroes the accumulator again, which restores its bits."""
        if isinstance(updates, (dict, str, bytes)) or not hasattr(updates, "__iter__"):
            raise TypeError(f"fold_many takes a list of updates, got {type(updates).__name__} (one update: fold)")
        updates = list(updates)
        if not updates:  # nothing to fold, but weights or parties given for updates that are missing are an error
            for values, what in ((weights, "weights"), (parties, "parties"), (infos, "infos")):
                per_update(values, 0, what)
            return
        if all(isinstance(u, Admitted) for u in updates):
            _admitted_alone(weights, parties, infos)
            with self._lock:
                self._fold_admitted(updates)
        elif any(isinstance(u, Admitted) for u in updates):
            raise TypeError("fold_many takes either all admitted updates or all raw ones")
        elif self._fused_admission():
            with self._lock:
                if self._fused_admission():  # re-checked under the lock: another thread may have folded meanwhile
                    self._admit_and_fold(updates, weights, parties, infos)
                    return
            self.fold_many(self.admit_many(updates, weights, parties, infos))
        else:
            admitted = self.admit_many(updates, weights, parties, infos)
            with self._lock:
                self._fold_admitted(admitted)

    def _fused_admission(self) -> bool:
        """Whether raw updates may be admitted and folded in one pass: into an empty state (all zeros, so a rejected
        batch is undone by zeroing), by the C++ kernel, with weights that do not depend on the admission stats."""
        st = self.state
        return (st.count == 0 and not st.closed and st.torn is None and not st.deterministic and not self.on_gpu
                and not self.buffered and self.backend in ("auto", "cpp") and backends.is_available("cpp")
                and not getattr(self.algorithm, "needs_norms", False))

    def _admit_and_fold(self, updates, weights, parties, infos) -> None:
        k = len(updates)
        parties, infos = self._parties_and_infos(parties, infos, k)
        prep = admission.prepare(updates, self.layout, weights=weights, parties=parties, backend=self.backend,
                                 copy=self.copy, partial=self.partial)
        if any(prep.on_device):
            raise LayoutMismatch(f"the update is in GPU memory; this aggregator's backend {self.backend!r} reads "
                                 f"host memory (use backend='cupy')", party=parties[prep.on_device.index(True)])
        st, alg = self.state, self.algorithm
        # provisional admitted updates: the weights hooks read weight and info (needs_norms algorithms never get here)
        prov = [Admitted(p, w, leaves, e, self.layout.fingerprint, math.nan, math.nan, 0, st.base is not None,
                         False, info) for p, w, leaves, e, info in zip(parties, prep.weights, prep.leaves,
                                                                       prep.entries, infos)]
        fold_w = [float(alg.fold_weight(u, st)) for u in prov]
        groups, int_rows, plan = build_groups(self.layout, prep.entries, prep.leaves, fold_w)
        L = len(self.layout)
        # the algorithm reads no norms here (needs_norms ones never get here): the kernel skips the sums of squares
        # (0.87-0.89x the time of this pass at 25M x 10 on 2 vCPUs) and the admitted updates' norms stay NaN
        stats = (np.zeros((L, k), np.int64), np.full((L, k), np.nan), np.zeros((L, k)))
        cpp = backends.get("cpp")
        try:
            for g in groups.values():
                admission.add_stats(stats, g.leaf_ids, *cpp.fold_stats(st.acc, st.base, g, norms=False))
            admitted = admission.check(prep, self.layout, stats, acc_dtype=self.acc_dtype,
                                       against_base=st.base is not None, fold_weights=fold_w,
                                       base_max=self._base_max())
            self._check_int_bound(admitted)
        except BaseException:
            st.acc.fill(0)  # the state was empty: all zeros
            raise
        for a, i in zip(admitted, infos):
            a.info = i
            if a.against_base:  # (measured against this state's base, under the lock)
                a.against_base = self._base_token
        try:
            mass = [float(alg.mass(u)) for u in admitted]
            self._note_peak(admitted, fold_w, mass)
            self._record(admitted, int_rows, plan, mass)
        except BaseException as e:  # (the batch is in the accumulator; its records are not, or not all)
            self.state.tear(f"a fold of {k} update(s)", e)
            raise

    def _check_layout(self, u) -> None:
        fp = self.layout.fingerprint
        if u.layout_fingerprint != fp:
            raise LayoutMismatch(f"admitted against layout {u.layout_fingerprint}, this aggregator's is {fp}",
                                 party=u.party)

    def _check_device(self) -> None:
        """A GPU state is used on the GPU it lives on: the kernels launch on the current device, and there another
        GPU's accumulator is an illegal address (a sticky error that loses the context) or, with peer access, a
        silent crawl over the interconnect. (Updates on another GPU are refused by name at admission.)"""
        if self.on_gpu:
            from .backends import cupy_backend

            gpu, current = gpu_of(self.state.acc), cupy_backend.runtime().device_id()
            if gpu != current:
                raise LayoutMismatch(f"this aggregator's state is on GPU {gpu}; the current device is GPU {current} "
                                     f"(work with it under cupy.cuda.Device({gpu}))")

    def _check_open(self) -> None:
        self._check_device()
        self.state.check_whole()
        if self.state.closed:
            raise RoundClosed("finalize closed this round (a server step or DP noise); reset() to start the next")

    def _fold_bound(self) -> float:
        """The limit on fold weight * max |x|: the accumulator's headroom, or the deterministic bound. (Admission
        checked the raw weight against its own limit: the fold multiplies by the algorithm's weight.)"""
        st = self.state
        return 2.0 ** st.bound_log2 if st.deterministic else admission.headroom(self.acc_dtype)

    def _check_headroom(self, u, w: float, bound: float) -> None:
        cap = self._range_cap()
        if not u.maxabs <= cap:  # (admission's range check, for stats measured again against this base)
            name, leaf = admission.worst_leaf(u, self.layout)
            what = (" as its delta against the base", " less max |base|") if self.state.base is not None else ("", "")
            raise ValueOutOfRange(f"party {u.party!r}: {leaf}has |x| = {u.maxabs:.6g}{what[0]}, past the "
                                  f"{self.acc_dtype} accumulator's range{what[1]} ({cap:.6g})", party=u.party,
                                  leaf=name, value=u.maxabs)
        what = "the deterministic bound" if self.deterministic else f"the {self.acc_dtype} accumulator's headroom"
        admission.check_fold_weight(u, w, bound, self.layout, self.acc_dtype, what)

    def _fold_one(self, u) -> bool:
        """The streaming server's per-update fold: one whole host update into a plain float state, through the batch
        path's groups and kernels. Building a batch's tables and checks for one update cost more than folding a
        100k-element update (12 us a call); here the groups are built once per update signature (the dtype of every
        leaf), re-pointed at each update, and the checks are the batch path's for one update, in its order. Returns
        False (nothing done) where the batch path must run: the GPU backend, partial updates, buffered rules,
        deterministic mode, norms still to measure against the base (a refused signature is remembered too)."""
        st, alg = self.state, self.algorithm
        if u.on_device:
            return False
        self._check_layout(u)
        sig = u.signature
        one = self._one
        if one is None or one.sig != sig:  # (the backend, the rule and the mode are the aggregator's for good)
            one = self._one = self._one_update(u, sig)
        if one.groups is None:
            return False
        if u.party in st.parties:  # (_check_parties for one party)
            raise DuplicateParty(u.party)
        self._check_room((u.party,))
        self._check_open()
        u.info = alg.check_info(u.info, u.party)
        if not self._measured_here(u) and self._stale([u]):
            return False  # its stats against the base (or without one) are to be measured: the batch path does
        w = float(alg.fold_weight(u, st))
        self._check_headroom(u, w, one.bound)
        if one.int_rows:
            self._check_int_bound((u,))
        if len(one.mods) < len(one.groups):  # resolved after the checks, as the batch path does; then kept
            one.mods[:] = [backends.choose(self.backend, g.in_dtype) for g in one.groups]
        done, mod = 0, None
        try:
            for mod, g in zip(one.mods, one.groups):
                g.repoint(u.entries, w, u.leaves)
                try:
                    mod.fold(st.acc, st.base, g)
                    done += 1
                finally:
                    g.release()
            m = float(alg.mass(u))
            self._note_peak((u,), (w,), (m,))
            for lid in one.int_rows:  # as _record: counters take the plain mass-weighted mean (or max), before the
                self._fold_int(lid, [u.leaves[lid]], [m])  # masses
                done += 1
            st.leaf_weight += m  # _record's per-leaf masses, for one whole update
            self._record_party(u, m, alg.derived_info(u, st))
        except BaseException as e:
            if self._may_have_written(e, done, mod):
                self.state.tear("a fold of 1 update", e)
            raise
        return True

    def _stale(self, admitted) -> list:
        """Updates whose stats were taken elsewhere (jk.admit without this base, a scheduler's submit, or before a
        reset changed it), which say nothing of ``u - base``, and which the fold must measure against the base: all of
        them for rules that read the norm (clipping), else only those that ``max|u| + max|base|``, a bound on
        ``max|u - base|``, does not already keep within the headroom (base 3e38 and u 0, folded twice, made -inf;
        measuring every one read each update twice: a scheduler's FedAvg-with-base fold took 3x as long)."""
        st, alg = self.state, self.algorithm
        if self.buffered:
            return []
        stale = [u for u in admitted if not self._measured_here(u)]
        if st.base is None or not stale or getattr(alg, "needs_norms", False):
            return stale  # (no base here: stats of u - b for another base say nothing of u, which folds here)
        bound, bmax, cap = self._fold_bound(), self._base_max(), self._range_cap()
        # (stats of u itself only: one measured against another base bounds nothing here; and u - base must be a
        # value of the accumulator's dtype, whatever the weight)
        return [u for u in stale if u.against_base or not (
                max(u.weight, float(alg.fold_weight(u, st))) * (u.maxabs + bmax) <= bound and u.maxabs <= cap)]

    _bmax: tuple = (None, 0.0)  # (base token, max |base|)

    def _base_max(self, base=None, token=None) -> float:
        """max |base| (0 without one), once per base: what bounds |u| by |u - base| (_stale, admission's range).
        ``base`` and ``token`` as read together from ``_base_view`` (default: now): reset(base=) takes a new token
        before it has set the new base, and the old base's max was kept under the new token."""
        if token is None:
            _, base, token = self._base_view
        if base is None:
            return 0.0
        cached = self._bmax
        if cached[0] is not token:
            cached = self._bmax = (token, admission.abs_max(base))  # (max and min: no temporary)
        return cached[1]

    def _range_cap(self) -> float:
        """The largest max|x| an update's stats may show: the accumulator dtype's largest value, less max|base|
        (stats against a base are of u - base, and the kernels read u, then subtract)."""
        return admission.largest(self.acc_dtype) - self._base_max()

    def _measured_here(self, u) -> bool:
        """``u``'s stats are of what folds here: of ``u - base`` against this state's base, or of ``u`` itself where
        there is none (an update admitted against a base and folded where there is none had the headroom check and
        the peak of its delta: two of 3e38 against a base of 3e38 made an inf accumulator, and finalize returned it)."""
        return u.against_base is self._base_token if self.state.base is not None else not u.against_base

    def _one_update(self, u, sig: bytes) -> "_OneUpdate":
        """_fold_one's groups for updates of ``u``'s signature (``groups`` None: the batch path folds them)."""
        if self.on_gpu or self.buffered or self.state.deterministic:
            return _OneUpdate(sig, 0.0, None, (), [])
        tab = stack_entries([u.entries])
        plan = plan_of(self.layout, tab)
        if plan.absent is not None:
            return _OneUpdate(sig, 0.0, None, (), [])
        groups, _, _ = build_groups(self.layout, tab, [u.leaves], [0.0], plan=plan)
        for g in groups.values():
            g.release()
        return _OneUpdate(sig, self._fold_bound(), list(groups.values()), tuple(plan.int_rows), [])

    def _fold_admitted(self, admitted) -> None:
        if len(admitted) == 1 and self._fold_one(admitted[0]):
            return
        self._fold_batch(admitted)

    def _fold_batch(self, admitted) -> None:
        st, alg = self.state, self.algorithm
        fp = self.layout.fingerprint
        foreign = next((u for u in admitted if u.layout_fingerprint != fp), None)
        if foreign is not None:
            self._check_layout(foreign)
        self._check_parties([u.party for u in admitted])
        tab = stack_entries([u.entries for u in admitted])  # [L, k, 4], once for the checks and the groups
        plan = plan_of(self.layout, tab)
        absent = plan.absent
        if not self.partial and absent is not None:  # an Admitted made elsewhere (jk.admit(..., partial=True))
            j = int(np.flatnonzero(absent.any(axis=0))[0])
            leaf = int(np.flatnonzero(absent[:, j])[0])
            raise LayoutMismatch("the update lacks this leaf and the aggregator takes whole updates (partial=False)",
                                 leaf=self.layout.leaves[leaf].name, party=admitted[j].party)
        self._check_open()
        device = False
        for u in admitted:  # an Admitted made elsewhere (jk.admit) was not checked against this algorithm
            u.info = alg.check_info(u.info, u.party)
            device = device or u.on_device
        on_device = np.array([u.on_device for u in admitted]) if device else None
        if device and not self.on_gpu:
            raise LayoutMismatch(f"the update is in GPU memory; this aggregator's backend {self.backend!r} reads "
                                 f"host memory (use backend='cupy')", party=admitted[int(np.argmax(on_device))].party)
        stale = self._stale(admitted)
        if stale:  # measured into copies: another aggregator (another base) may be folding the caller's Admitted at
            # once, and its stats, written between this one's and their reading, clipped here by another base's norm
            fresh = {id(u): dataclasses.replace(u) for u in stale}
            admitted = [fresh.get(id(u), u) for u in admitted]
            self._norms_against_base(list(fresh.values()))
        fold_w = [float(alg.fold_weight(u, st)) for u in admitted]
        if self.buffered:
            self._buffer(admitted)  # (all or nothing)
            try:
                self._record(admitted, [], plan, [float(alg.mass(u)) for u in admitted])
            except BaseException as e:  # (the store holds the rows; the records not, or not all)
                self.state.tear(f"a fold of {len(admitted)} update(s)", e)
                raise
            return
        groups, int_rows, _ = build_groups(self.layout, tab, [u.leaves for u in admitted], fold_w,
                                           device=on_device, plan=plan)
        deterministic = st.deterministic
        if deterministic:
            st.check_binned_room(len(admitted))
        bound = self._fold_bound()
        fw = np.asarray(fold_w, np.float64)
        lo, hi = admission.weight_range(self.acc_dtype)
        peaks = np.fromiter((u.maxabs for u in admitted), float, len(admitted))
        with np.errstate(over="ignore", invalid="ignore"):  # an inf or NaN product is refused below, by name
            over = ~(fw * peaks <= bound) | ~((lo <= fw) & (fw <= hi)) | ~(peaks <= self._range_cap())
        if over.any():  # the first in order, as one by one
            j = int(np.argmax(over))
            self._check_headroom(admitted[j], fold_w[j], bound)
        self._check_int_bound(admitted)
        mods = {name: backends.choose(self.backend, name) for name in groups}  # all refusals before any fold
        done, mod = 0, None
        try:
            for name, g in groups.items():
                mod = mods[name]
                if deterministic:
                    step = state_module.BINNED_BATCH
                    for j0 in range(0, g.k, step):
                        part = g if g.k <= step else g.columns(j0, j0 + step)
                        # an empty state holds zeros (FoldState.from_bytes refuses one that does not): its first
                        # call writes its sums without reading them
                        mod.fold_binned(st.acc, st.lo, st.base, part, st.bound_log2, zero=not (done or st.count))
                        done += 1
                else:
                    mod.fold(st.acc, st.base, g)
                    done += 1
            mass = [float(alg.mass(u)) for u in admitted]
            self._note_peak(admitted, fold_w, mass)
            done += bool(int_rows)  # (the integer leaves are folded in _record, before the masses and parties)
            self._record(admitted, int_rows, plan, mass)
        except BaseException as e:
            if self._may_have_written(e, done, mod):
                self.state.tear(f"a fold of {len(admitted)} update(s)", e)
            raise

    @staticmethod
    def _may_have_written(error, done: int, mod) -> bool:
        """Whether a batch's writes that stopped at ``error`` after ``done`` calls (one per dtype group, or per
        deterministic part, then the integer leaves and the records) may have changed the state: where a call had
        written, where the failed one may have (the GPU's passes, numpy's leaf after leaf: a compiled host kernel,
        WHOLE_CALLS, writes all of its call or nothing), or where the error is no Exception (an interrupt is raised
        once a compiled call has returned: all of it written). A backend that could not start writes nothing: the
        GPU's kernels that failed to build raise BackendUnavailable before the call's first launch (a first fold on
        a machine whose NVRTC lacked the GPU's architecture tore the state for good)."""
        if done:
            return True
        if isinstance(error, BackendUnavailable):
            return False
        return mod is None or not getattr(mod, "WHOLE_CALLS", False) or not isinstance(error, Exception)


    def _check_int_bound(self, admitted) -> None:
        """:func:`admission.check_int_terms` with this aggregator's masses, accumulator and bound, where integer
        leaves are summed (int_leaves="mean"; buffered rules sum nothing). A state that sums integer leaves in
        deterministic mode then holds 2^20 updates, not 2^30 (:attr:`FoldState.binned_capacity`)."""
        st = self.state
        if not self.layout.int_leaves or self.buffered or st.algorithm.get("int_leaves", "mean") != "mean":
            return
        admission.check_int_terms(admitted, self.layout, [self.algorithm.mass(u) for u in admitted],
                                  2.0 ** st.bound_log2 if st.deterministic else None, self.acc_dtype)

    def _buffer(self, admitted) -> None:
        """Copy a batch into the store, all or nothing (UpdateStore.add_many: room for the whole batch first, a
        row refused partway, a value out of the store dtype's range, takes the batch's rows back out)."""
        store = self.state.store
        names = [leaf.name for leaf in self.layout.leaves]  # so that a refusal names the leaf
        # a GPU aggregator's store is in GPU memory (unless it may spill to disk): device updates go in device to
        # device; a host store takes a copy of them
        store.add_many([dict(zip(names, [to_host(a) for a in u.leaves] if u.on_device and not store.on_device
                                      else u.leaves)) for u in admitted],
                       [u.party for u in admitted], finite=True)  # (admission counted their values)

    def _norms_against_base(self, admitted) -> None:
        """Delta norms for updates admitted without this state's base (jk.admit, a scheduler buffering for a later
        round): clipping needs ||u - base||, so one more stats pass over them."""
        if not admitted:
            return
        st = self.state
        _, _, sumsq, maxabs = admission.batch_stats(
            self.layout, [u.leaves for u in admitted], base=st.base, host_base=st.host_base(), backend=self.backend,
            acc_dtype=self.acc_dtype, on_device=[u.on_device for u in admitted], entries=[u.entries for u in admitted])
        for j, u in enumerate(admitted):
            u.norm, u.maxabs = float(math.sqrt(sumsq[:, j].sum())), float(maxabs[:, j].max())
            u.worst_leaf = int(maxabs[:, j].argmax())
            u.against_base = self._base_token if st.base is not None else False
        admission.rescale_norms(admitted, self.layout, st.host_base())

    def _note_peak(self, admitted, fold_w, mass) -> None:
        """Raise ``state.peak`` to the largest |x| of the folded updates, times fold weight / mass where an algorithm
        folds an update at more than the mass it divides by (FedNova's n / steps with steps < 1): a bound on every
        leaf's mean, so on what finalize writes (see _check_range). (One expression per update, with the masses the
        caller has: this ran three method calls per update, a quarter of a 100-update fold_many's fixed cost.)"""
        st, here = self.state, self._measured_here
        # (NaN where the stats are of u, not of u - base: admitted without the base, which _stale let be; not known)
        xs = [(u.maxabs * max(1.0, fw / m) if m > 0 else math.inf) if here(u) else math.nan
              for u, fw, m in zip(admitted, fold_w, mass)]
        # (terms are >= 0 or NaN, so their sum is NaN exactly where one is, which max() may pass over; max keeps a
        # NaN peak: not known)
        st.peak = math.nan if math.isnan(sum(xs)) else max(st.peak, *xs)

    def _record(self, admitted, int_rows, plan, mass) -> None:
        """After the float fold: integer leaves, per-leaf masses (``mass``, the algorithm's, per update; the batch
        plan's ``carried[i, j]``: update j carries leaf i), the party and info records."""
        st, alg = self.state, self.algorithm
        derived = [alg.derived_info(u, st) for u in admitted]
        # integer leaves (counters) take the plain mass-weighted mean: discounts and clipping are for float deltas
        for lid, arrays in int_rows:
            self._fold_int(lid, arrays, [w for u, w in zip(admitted, mass) if u.leaves[lid] is not None])
        if len(mass) == 1 and plan.absent is None:  # one whole update (a per-update fold)
            st.leaf_weight += mass[0]
        else:  # per leaf, the masses of the updates that carried it, added in batch order as one by one would add
            # them (a matrix product sums in BLAS's order: the divisor, so the result, depended on the batching)
            terms = np.concatenate([st.leaf_weight[:, None], plan.carried * np.asarray(mass)], axis=1)
            with np.errstate(over="ignore"):  # (masses of 1e308, which a buffered rule rescales, sum to inf here)
                st.leaf_weight[:] = np.cumsum(terms, axis=1)[:, -1]
        if st.deterministic and plan.absent is not None:  # for the exact per-leaf sums of the masses
            for j, u in enumerate(admitted):
                lacks = np.flatnonzero(plan.absent[:, j])
                if lacks.size:
                    st.absent[u.party] = tuple(lacks.tolist())
        for u, m, d in zip(admitted, mass, derived):
            self._record_party(u, m, d)

    def _record_party(self, u, mass, derived) -> None:
        self.state.parties[u.party] = mass
        if u.info or derived:
            self.state.info[u.party] = {**u.info, **derived}

    def _fold_int(self, lid, arrays, weights):
        leaf = self.layout.leaves[lid]
        acc = self.state.acc[leaf.offset:leaf.offset + leaf.size]
        A = acc.dtype
        st = self.state
        rule = st.algorithm.get("int_leaves", "mean")
        seen = st.leaf_weight[lid] > 0  # "max": the first carrier ever sets the leaf, later ones (this batch's too) max
        for a, w in zip(arrays, weights):
            x = place(to_host(a).reshape(-1).astype(A), st.on_device)
            if rule == "mean" and st.deterministic:
                s1, s2 = numpy_ref.binned_constants(st.bound_log2)
                lo = st.lo[leaf.offset:leaf.offset + leaf.size]
                numpy_ref.binned_add(acc, lo, np.float64(w) * x, s1, s2)
                numpy_ref.binned_carry(acc, lo, s1)
            elif rule == "mean":
                acc += A.type(w) * x
            elif seen:
                np.maximum(acc, x, out=acc)
            else:
                acc[...] = x
                seen = True

    def merge(self, other) -> None:
        """Merge another Aggregator's or a FoldState's aggregate into this one (refuses shared parties)."""
        if not isinstance(other, (Aggregator, FoldState)):
            raise TypeError(f"merge takes an Aggregator or a FoldState, got {type(other).__name__}")
        # both held (state_module.guarded): a fold into the other aggregator, or into the aggregator whose state
        # ``other`` is, must not tear what is merged; a reset of either must not swap a state out from under it
        with state_module.guarded(self.state, other.state if isinstance(other, Aggregator) else other):
            self._check_device()
            theirs = other.state if isinstance(other, Aggregator) else other
            if isinstance(other, FoldState):  # (a worker's partial state, from bytes: Ray's merge path)
                _check_records(self.algorithm, theirs)
            self._check_room(theirs.parties)
            self.state.merge_into(theirs)

    # --- finalize ------------------------------------------------------------------------------------------------
    def finalize(self, output: str = "model", *, out=None):
        """The aggregate, in the template's container, array type and dtypes.

        ``output="model"``: the average (with a base: ``base + average delta``). ``output="delta"`` (base only): the
        average delta. ``out``: a pytree like the template to write into (and return), e.g. last round's result:
        fresh model-sized outputs cost first-touch page faults, about as much as the fold itself at 25M parameters.
        Outputs in the other memory (host buffers for a GPU aggregator) get the result copied in, one transfer a
        leaf; a mix of host and GPU outputs is refused.
        The state is unchanged; call :meth:`reset` to start the next round. A result beyond its dtype's range (past
        65504 in float16) raises :class:`ValueOutOfRange` naming the leaf; ``out`` then holds what was written (inf
        there).

        Server optimizers (FedAvgM, FedAdam, FedYogi, FedAdagrad) apply their step here, in one fused pass that
        updates the state's model (its base) and moments in place and writes the new model; DP wrappers add their
        noise to the accumulator first. Either way the round is then closed (no more folds or merges; finalize
        again returns the same result) until :meth:`reset`, whose next round starts from the new model.
        """
        if output not in ("model", "delta"):
            raise ValueError(f"output must be 'model' or 'delta', got {output!r}")
        with self._lock:
            self._check_device()
            if out is None:
                result = self.layout.unflatten(self._finalize_into(output, self._outputs(None)))
            else:
                outs = self.layout.flatten(out, party="<out>", writable=True)
                result = out
                if not (outs and all(isinstance(o, DeviceLeaf) != self.on_gpu for o in outs)):
                    self._finalize_into(output, self._outputs(out, outs))
                else:
                    # every output in the other memory (a GPU aggregator finalizing into host buffers, as Flower's
                    # Parameters are): written where the state is, then copied in, one transfer a leaf
                    here = self._outputs(None)
                    try:
                        self._finalize_into(output, here)
                    except ValueOutOfRange:  # out holds what was written, as it would have here
                        _copy_out(here[:_written(self.layout, here, self.buffered)], outs)
                        raise
                    _copy_out(here, outs)
            if output == "model":  # (the model its parties get: reset() starts the next round from it, see there)
                self.state.released = True
            return result

    def _finalize_into(self, output: str, outs: list) -> list:
        """The body of :meth:`finalize` (under the lock), into the output leaves ``outs`` (where the state is)."""
        st, alg = self.state, self.algorithm
        st.check_whole()
        opt = alg.kind is not None
        closing = alg.closes_round and not st.closed  # this call applies the noise / the step
        if opt and output == "delta":
            raise ValueError("server optimizers return the model (output='model')")
        if st.count == 0:
            raise EmptyAggregate("nothing has been folded")
        base = st.base if output == "model" else None
        if output == "delta" and st.base is None:
            raise ValueError("output='delta' needs an aggregator created with a base")
        if self.buffered:  # whole updates, each in a stored row, whatever its mass (Krum's may be 0)
            return self._finalize_buffered(outs, delta=output == "delta")
        missing = [i for i, w in enumerate(st.leaf_weight) if w <= 0]
        if missing and st.base is None:
            raise EmptyAggregate(f"no folded update carried leaf {self.layout.leaves[missing[0]].name!r}")
        float_ids = [i for i, l in enumerate(self.layout.leaves) if l.is_float and st.leaf_weight[i] > 0]
        mod = backends.get(self.backend) if self.backend != "auto" else backends.choose("auto", "float32")
        # deterministic: every leaf is divided by the exactly rounded sum of its carriers' masses
        mass = st.exact_leaf_weights() if st.deterministic else st.leaf_weight
        weights = mass * alg.divisor_scale(st)  # the algorithm's scaling (FedBuff's server lr, FedNova's steps)
        top = np.finfo(np.dtype(self.acc_dtype)).max
        over = [i for i in float_ids if not weights[i] <= top]
        if over:  # the kernels divide by it in the accumulator's dtype: inf, and a mean of 0
            i = over[0]
            scaled = "" if weights[i] == mass[i] else f" (its mass {mass[i]:.6g} scaled by {type(alg).__name__}'s " \
                f"divisor, e.g. 1 / server_lr)"
            raise ValueOutOfRange(f"leaf {self.layout.leaves[i].name!r}: its total weight {weights[i]:.6g}{scaled} is "
                                  f"past the {self.acc_dtype} accumulator's range (use acc_dtype='float64', or smaller "
                                  f"weights)", leaf=self.layout.leaves[i].name, value=float(weights[i]))
        if closing and opt and (st.opt is None or "m" not in st.opt or (alg.moments == 2 and "v" not in st.opt)):
            # (a worker's partial state has none: it is merged into the server's, which steps)
            raise CorruptState(f"{type(alg).__name__} steps with its moments, and this state has none: finalize "
                               "the state it was made to merge into")
        std = alg.noise_std(st)
        noisy = std > 0  # (the accumulator holds noise once this round has closed)
        if closing and noisy:  # keyed by this aggregate's bits, before anything changes (noise.aggregate_key)
            from .noise import aggregate_key

            sums = [a for a in (st.acc, st.lo) if a is not None]  # (the divisor too: FedNova's steps are no mass)
            key = aggregate_key(alg.seed, st.round, sums + [np.asarray(mass, np.float64),
                                                            np.asarray(weights, np.float64), np.float64(std)])
        noised, stepping, stepped = False, False, 0
        try:
            if closing and noisy:  # on the average delta, before that scaling, as the sum is
                noised = True
                self._add_noise(std, mass, float_ids, key)
            acc = st.value()
            for og in build_out_groups(self.layout, float_ids, [outs[i] for i in float_ids], weights):
                if not opt:
                    mod.finalize(acc, base, og)
                elif closing:
                    stepping = True
                    mod.step(acc, st.base, st.opt["m"], st.opt.get("v"), alg.kind, alg.coefficients(st.round + 1),
                             og)
                    stepped += 1
        except BaseException as e:
            # noise added, or leaves stepped (a call that ran, or may have written): a retry would do it again
            model = stepping and self._may_have_written(e, stepped, mod)
            if model:  # (no reset recovers them)
                st.tear("a finalize that closes its round", e, "its model and moments were stepped in part: load the "
                        "last saved state")
                st.torn_model = True
            elif noised:  # (the round keeps its number: folded again, the same aggregate gets the same noise as the
                st.tear("a finalize that closes its round", e)  # leaves this call may have written into out)
            raise
        if closing:  # the noise and the step are in: the round closes even if the algorithm's close raises (a
            # second finalize would add them again)
            try:
                alg.close(st)
            finally:
                st.round += 1
                st.closed = True
                st.__dict__.pop("_host_base", None)  # a step moved the base in place
        # leaves no update carried (and, finalizing a stepped round again, every float leaf), and integer
        # leaves: tiny or rare, finished on the host and written back
        for i in (missing + float_ids if opt and not closing else missing):
            leaf = self.layout.leaves[i]
            if base is None and leaf.is_float:  # output="delta": a leaf nobody sent did not move (the model
                _write(outs[i], np.zeros(leaf.shape, outs[i].dtype))  # keeps the base's)
                continue
            b = to_host(st.base[leaf.offset:leaf.offset + leaf.size])  # (a counter is its value, not a delta)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, by name
                _write(outs[i], _cast(b.reshape(leaf.shape), outs[i].dtype))
        for i, leaf in enumerate(self.layout.leaves):
            if leaf.is_float or st.leaf_weight[i] <= 0:
                continue
            a = to_host(acc[leaf.offset:leaf.offset + leaf.size]).astype(np.float64)
            if st.algorithm.get("int_leaves", "mean") == "mean":  # the plain mass-weighted mean
                a = np.rint(a / mass[i])
            _write(outs[i], _cast(a.reshape(leaf.shape), outs[i].dtype))
            if opt and closing:  # the stepped model carries the counter too (its float leaves moved in place): a
                # later partial round that no party sent it in returned the first round's value from the base
                st.base[leaf.offset:leaf.offset + leaf.size] = place(a.reshape(-1).astype(st.acc_dtype), st.on_device)
        # (a divisor below the masses, FedBuff's server_lr > 1, takes a mean past its values' range; so may noise)
        self._check_range(outs, float_ids, acc, base, weights, stepped=opt,
                          amplified=bool(np.any(weights < mass)) or noisy)
        return outs

    def _check_range(self, outs, float_ids, acc, base, weights, stepped: bool, amplified: bool) -> None:
        """Outputs whose value overflowed the narrowing to their dtype (inf; the accumulator's are finite) are refused
        with the leaf and value, rather than handed on as a model that the next round's updates turn into NaN. The
        outputs are checked as written (an ``out=`` is then left holding them: the kernels write as they go). A
        server optimizer's step has been applied: its model stays in the state's base, in the accumulator dtype, and
        finalizing the closed round again refuses again.

        Reading an output for inf costs a pass over it, so it is skipped where the mean cannot overflow: no base or
        step added, no divisor below the masses (``amplified``), and the folded values' peak (state.peak) below the
        dtype's largest value by more than the rounding of k weighted terms and their division, (k + 4) units of
        float32's last place. (A float32 mean of float32 values can pass float32's range: each weight is rounded on
        its own, the divisor as their sum, and three updates at its largest value made inf.)"""
        bound = self.state.peak * (1.0 + (self.state.count + 4) * 2.0 ** -23)  # (NaN: not known, checked)
        # past 2^20 terms at the headroom the sum itself may have overflowed: the mean of its values no longer bounds it
        wide = base is not None or stepped or amplified or self.state.count * admission.HEADROOM > 1.0
        for i in float_ids:
            leaf = self.layout.leaves[i]
            # (float64 outputs too: a float64 leaf read into a float32 accumulator, past its range with a small delta
            # against the base, was inf once read; a float64 model stepped or given a base near its largest value)
            if (not wide and bound < _largest(leaf.dtype)) or not _overflowed(outs[i]):
                continue
            sl = slice(leaf.offset, leaf.offset + leaf.size)
            if stepped:
                y = to_host(self.state.base[sl])
            else:
                with np.errstate(over="ignore"):  # (the value named may be inf itself: a float64 model's)
                    y = to_host(acc[sl]).astype(np.float64) / float(weights[i])
                    y = y if base is None else to_host(base[sl]) + y
            where = (" (the step was applied and closed the round: the new model is in state.base, "
                     f"{self.acc_dtype})") if stepped else ""
            raise _beyond(leaf, float(np.abs(y).max()), where)

    def _finalize_buffered(self, outs, delta: bool) -> list:
        """A robust rule over the store's rows, written leaf by leaf into the outputs (``delta``: less the base)."""
        st = self.state
        weights = np.array([st.parties[p] for p in st.store.parties], np.float64)
        base = st.base if st.store.on_device else st.host_base()  # where the slab and its kernels are
        # the rule's kernels: this aggregator's backend where it names a CPU one (not JITKERNELS_BACKEND's default);
        # "auto" follows the slab (cupy for a device store)
        flat = self.algorithm.aggregate(st.store, weights, base=base,
                                        backend="auto" if self.backend == "cupy" else self.backend)
        xp = array_module(flat)
        for i, leaf in enumerate(self.layout.leaves):
            v = flat[leaf.offset:leaf.offset + leaf.size]
            if delta and leaf.is_float:  # counters are not deltas: the streaming path returns their mean too
                # in float64 (exact for float32 values, then one rounding to the output): a delta past float32's
                # range is measured, then refused below
                v = v.astype(xp.float64) - base[leaf.offset:leaf.offset + leaf.size]
            if not leaf.is_float:
                v = xp.rint(v)
            o = outs[i]
            if isinstance(o, DeviceLeaf) and xp is not np and o.dtype == v.dtype:  # device to device
                o.array[...] = v.reshape(leaf.shape)
            else:
                with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below, by name
                    _write(o, _cast(to_host(v).reshape(leaf.shape), o.dtype))
            if leaf.is_float and _overflowed(o):  # (a delta of two in-range values may not be)
                raise _beyond(leaf, float(xp.abs(v).max()))
        return outs

    def _add_noise(self, std, weights, leaf_ids, key) -> None:
        """acc += A(std * W_leaf * z) per float leaf, z from jitkernels.noise keyed by (key, round, leaf, index),
        ``key`` the aggregate's (noise.aggregate_key): after the division by W_leaf the average delta carries
        N(0, std^2) noise. Device accumulators get the same bits from the CUDA kernel (csrc/jk_noise.h)."""
        from . import noise

        st = self.state
        sigmas = [std * float(weights[i]) for i in leaf_ids]
        if st.on_device:  # one kernel over every leaf: the same bits, generated where the accumulator lives
            leaves = [self.layout.leaves[i] for i in leaf_ids]
            backends.get("cupy").add_noise(st.acc, leaf_ids, [l.offset for l in leaves], [l.size for l in leaves],
                                           sigmas, key, st.round)
            return
        for i, sigma in zip(leaf_ids, sigmas):
            leaf = self.layout.leaves[i]
            noise.add_noise(st.acc[leaf.offset:leaf.offset + leaf.size], sigma, key, st.round, i, 0)

    def _outputs(self, out, outs=None) -> list:
        """The output leaves: ``out``'s (``outs``, if flattened already; checked to be where the backend writes),
        else fresh ones."""
        if out is None and self.on_gpu:
            return [empty_leaf(l.shape, l.dtype) for l in self.layout.leaves]
        if out is None:
            return host_outputs(self.layout.leaves)
        outs = self.layout.flatten(out, party="<out>", writable=True) if outs is None else outs
        where = [isinstance(o, DeviceLeaf) for o in outs]
        if not all(w == self.on_gpu for w in where):
            bad = self.layout.leaves[[w == self.on_gpu for w in where].index(False)].name
            raise LayoutMismatch(f"out must be in {'GPU' if self.on_gpu else 'host'} memory for backend "
                                 f"{self.backend!r}", leaf=bad, party="<out>")
        _check_disjoint(self.layout, outs)
        return outs

    def reset(self, base=None, *, reuse: bool = False) -> FoldState | None:
        """Start a new round (optionally with a new base).

        Returns the finished round's state. With ``reuse=True`` the accumulator's memory (and a robust rule's slab,
        its rows free again) is reused instead (the old state is gone; returns None): a fresh model-sized buffer costs
        page faults on first touch, measured at 0.2-0.4 ns per byte here, about 2x a fold pass over it.

        Server optimizers carry their model (the base, moved by the last step) and moments into the new round; a
        round that DP closed without a step (DP over FedAvg) carries the model its finalize released (base + the
        noised mean delta), and so does a finalized round of a rule whose model steps from its base (FedNova,
        FedBuff and SCAFFOLD with their base, norm bounding, centered clipping: ``moves_from_base``; the model as
        the state finalizes it now, so with anything folded since that finalize): the next round's deltas are
        measured from the model its parties trained from. A round not finalized keeps its base (for FedAvg and the
        coordinate rules the base does not change the model). A ``base`` given here replaces the model. The
        returned state holds copies of them.
        """
        reuse = _algorithms.flag("reuse", reuse)
        with self._lock:
            old = self.state
            if old.torn_model:
                raise TornState(old.torn)
            carries = old.base is not None and self.algorithm.kind is None and (
                old.closed or old.released and self.algorithm.moves_from_base)
            base_max = None
            if base is not None:
                flat_base, base_max = self._flat(base, old.acc_dtype)
            elif carries and old.torn is not None:  # (a closed round refuses folds before they write: not DP's)
                raise TornState(f"{old.torn}; a finalize released this round's model before, and the torn state "
                                "cannot give it again: reset(base=<that model>) starts the next round from it, as "
                                "its parties have it (reset(base=<the round's base>) to start from the base)")
            elif carries:
                flat_base = self._released_model()
                flat_base = old.base if flat_base is None else flat_base
            else:
                flat_base = old.base
            self._base_token = object()  # (after the base is taken: a refused one leaves admitted updates' marks)
            if base_max is not None:
                self._bmax = (self._base_token, base_max)
            if reuse:
                old.torn = None
                old.acc.fill(0)
                if old.lo is not None:
                    old.lo.fill(0)
                old.leaf_weight.fill(0)
                old.parties.clear()
                old.info.clear()
                old.absent.clear()
                old.peak = 0.0
                old.base = flat_base
                old.__dict__.pop("_host_base", None)  # (an admission during the step may have cached the moving base)
                self._base_view = (old, flat_base, self._base_token)
                old.closed = old.released = False
                if old.store is not None:  # a robust rule's slab too: its rows stay resident (first-touch page faults
                    # made filling a 1 GB slab 0.58 s, against 0.14 s reused); not one spilled to disk, whose later
                    # rounds would stay there
                    old.store.clear(release=old.store.spilled)
                return None
            # (its own base goes as None: next_round copies a model that a step moves in place)
            self._adopt(old.next_round(base=None if flat_base is old.base else flat_base,
                                       store=None if old.store is None else self.algorithm.new_store(self.layout,
                                                                                                     self.on_gpu)))
            old.guard = old._own_guard  # (no longer this aggregator's: from_state takes it over, as a loaded one)
            return old

    def _released_model(self):
        """The model a closed (or finalized) round's finalize released, base + the (noised) mean delta, as its
        parties got it (in the leaves' dtypes: the same finalize again), widened to the accumulator dtype as the
        state's base is (the model before that rounding differed from a float16 one by its rounding, whose norm over
        many coordinates passed the clip norm: a party's small step was clipped to a tenth). None where the closing
        finalize released none: refused, a leaf past its dtype's range (the round closed all the same: its noise is
        spent), which this finalize refuses again (taken as the base, a model no party had trained from, or a reset
        that failed on every call, and a scheduler's next round that never opened). Under the lock."""
        outs = self._outputs(None)
        try:
            self._finalize_into("model", outs)
        except ValueOutOfRange:
            return None
        acc_dtype = self.state.acc_dtype
        return place(np.concatenate([np.asarray(to_host(o), dtype=acc_dtype).reshape(-1) for o in outs]), self.on_gpu)


def _log2_up(x: float) -> int:
    """The exponent of the smallest power of two >= x > 0, exactly (ceil(log2(x)) rounded 2^20 (1 + 2^-52) down to
    2^20: updates within the bound given were refused)."""
    m, e = math.frexp(x)
    return e - 1 if m == 0.5 else e


PACK_BELOW = 4 << 20
"""Output leaves under this many bytes share allocations (numpy madvises huge pages from 4 MB: a smaller array's
first touch faults in 4 KB pages)."""
PACK_BYTES = 64 << 20
"""The most bytes one shared allocation holds: a caller that keeps one small leaf keeps its whole pack alive."""


def host_outputs(leaves) -> list:
    """Fresh host arrays for ``leaves`` (a finalize's outputs). Leaves under PACK_BELOW bytes are packed, each on a
    64-byte boundary, into allocations of up to PACK_BYTES; larger ones get their own (in huge pages). Apart, a
    model of many small leaves paid a 4 KB page fault per 4 KB written: at 25M float32 in 50 leaves (41 of them under
    4 MB) finalize wrote into fresh outputs in 18.8 ms, 6.5 ms into existing ones; packed, a numpy pass over the
    leaves took 21 -> 8.4 ms."""
    outs, pack, used = [None] * len(leaves), [], 0

    def flush():
        buf = np.empty(used + 64, np.uint8)  # (huge pages once it passes 4 MB, as any numpy allocation)
        buf = buf[-buf.ctypes.data % 64:]  # (numpy aligns to 16 bytes)
        for i, o, dt, shape in pack:
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            outs[i] = buf[o:o + n].view(dt).reshape(shape)

    for i, leaf in enumerate(leaves):
        dt = np_dtype(leaf.dtype)
        n = int(np.prod(leaf.shape, dtype=np.int64)) * dt.itemsize
        if n >= PACK_BELOW:
            outs[i] = np.empty(leaf.shape, dt)
            continue
        if used + n > PACK_BYTES:
            flush()
            pack, used = [], 0
        pack.append((i, used, dt, leaf.shape))
        used = -(-(used + n) // 64) * 64
    if pack:
        flush()
    return outs


def _check_disjoint(layout, outs) -> None:
    """Output leaves must not share memory: each backend writes them in its own order, so ``out=[buf, buf]`` gave
    one leaf's mean on numpy and the other's on cpp. They are C-contiguous (flatten(writable=True)), so each spans
    [address, address + nbytes): sorted by address, a leaf that starts before its predecessor ends overlaps it."""
    spans = sorted((address(o), address(o) + o.nbytes, i) for i, o in enumerate(outs) if o.size)
    for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
        if start < end:
            a, b = sorted((i, j))
            raise LayoutMismatch(f"shares memory with out leaf {layout.leaves[b].name!r}: each output leaf needs "
                                 f"its own buffer", leaf=layout.leaves[a].name, party="<out>")


def _admitted_alone(weights, parties, infos) -> None:
    """Admitted updates carry the weight, party and values they were admitted with: others given beside them were
    dropped without a word (a weight of 9 folded as 1)."""
    if weights is None and parties is None and infos is None:  # (the per-update fold's usual case)
        return
    given = [name for name, v in (("weight", weights), ("party", parties), ("info", infos)) if v is not None]
    if given:
        raise TypeError(f"admitted updates carry their own weight, party and info: {', '.join(given)} given beside "
                        f"them (admit again with the values you mean)")
