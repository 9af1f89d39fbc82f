"""FoldState: a partial aggregate, and its safe, versioned, checksummed, atomically written file format.

A state holds the flat accumulator (float32 or float64, never the input dtype), the per-leaf total weight (float64;
leaves that partial updates leave out get less), the party -> weight record of everything folded in (an audit, and
what makes double counting detectable; the weight is the update's mass, what it adds to the divisor), the per-party
values the algorithm read (FedNova's steps, FedBuff's staleness), the layout, the algorithm and its parameters, the
base for delta folds, a server optimizer's moments, and the count of rounds that finalize closed.

File format (version 3): a safetensors file (tensors ``acc``, ``leaf_weight``, optionally ``base``, ``lo``, ``opt_m``,
``opt_v``) whose metadata holds ``format``, ``version``, the JSON of layout / algorithm / parties / info / absent, the
rounds closed so far (``round``), whether this one is (``closed``) and whether a finalize released its model
(``released``, written only where one did), and ``checksum``: SHA-256 over every tensor's
name, dtype, shape and bytes and over the other metadata, verified on load (safetensors itself has none). Nothing is
ever unpickled. Saving writes a temp file (exclusive create), fsyncs it, renames it over the target and fsyncs the
directory, so a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import stat
import tempfile
import threading

import numpy as np

from .device import on_gpu_of, place, to_host, zeros
from .dtypes import acc_dtype_name
from .errors import CorruptState, IncompatibleStates, OverlappingParties, TornState, ValueOutOfRange
from .layout import Layout
from .parties import check_party

FORMAT = "jitkernels.foldstate"
VERSION = 3
SUPPORTED_VERSIONS = (1, 2, 3)  # version 1: no info, no optimizer state; 2: no absent-leaf record
# Deterministic mode's capacities (csrc/jk_math.h binned_step): the high part holds multiples of 2^(b-23) below
# 2^(b+30), exact for 2^30 terms of |w * x| <= 2^b; a batch's low part stays in the fast kernel's biased range
# (csrc/kernels.h fold_binned_rows) for 2^18 terms, so larger batches are folded in chunks of that many.
BINNED_MAX_UPDATES = 2 ** 30
BINNED_BATCH = 2 ** 18
BINNED_INT_HEADROOM = 2.0 ** 10  # integer leaves' terms may be this many times the bound (Aggregator._check_int_bound)
BINNED_MAX_UPDATES_INT = 2 ** 20  # ... so a state that sums them holds this many updates


def weight_sum(weights) -> float:
    """The exactly rounded sum of positive weights (``math.fsum``), inf past float64's range: fsum raised a bare
    OverflowError there (2^20 updates at the largest weight admitted), from finalize, ``total_weight`` and repr,
    where the range check names the leaf whose total weight the accumulator cannot hold."""
    try:
        return math.fsum(weights)
    except OverflowError:
        return math.inf


class FoldState:
    """A partial aggregate. Merge two with :meth:`merge` (associative, commutative, refuses shared parties)."""

    def __init__(self, layout: Layout, *, algorithm: dict, acc_dtype: str = "float32", acc=None, leaf_weight=None,
                 parties=None, base=None, lo=None, on_device: bool = False, info=None, opt=None,
                 round: int = 0, closed: bool = False, scalars=None, store=None, absent=None, peak=None,
                 released: bool = False):
        self.layout = layout
        # held while the state's file is built and written: an Aggregator puts its own lock here, so that folds
        # from other threads cannot change the arrays between the checksum and the write (nor tear them)
        self.guard = self._own_guard = threading.RLock()
        self.algorithm = dict(algorithm)
        self.acc_dtype = acc_dtype_name(acc_dtype)
        self.acc = zeros(layout.size, self.acc_dtype, on_device) if acc is None else acc
        self.leaf_weight = np.zeros(len(layout), np.float64) if leaf_weight is None else leaf_weight
        self.parties: dict = {} if parties is None else dict(parties)
        self.info: dict = {} if info is None else {p: dict(v) for p, v in info.items()}
        # deterministic mode with partial updates: party -> the leaf indices its update lacked (parties with whole
        # updates are not listed), from which each leaf's total weight is summed exactly (exact_leaf_weights)
        self.absent: dict = {} if absent is None else {p: tuple(int(i) for i in v) for p, v in absent.items()}
        self.base = base
        # the largest |x| any folded update brought (admission's max-abs of u, or of u - base): from it finalize
        # knows when a mean cannot pass its output dtype's range and skips reading the output for inf. NaN where
        # not known (a state from a file or made with its arrays): finalize then checks.
        self.peak = (0.0 if acc is None and not self.parties else math.nan) if peak is None else float(peak)
        # server optimizers' moments {"m": acc-sized, "v": acc-sized or absent}; ``round``: rounds closed so far.
        # A round is closed when finalize changed the state in place (a server step moved the base, or DP noise
        # went into the accumulator): nothing more may be folded or merged into it, and finalize again returns
        # the same result.
        self.opt: dict | None = None if opt is None else dict(opt)
        self.round = int(round)
        self.scalars: dict = {} if scalars is None else {k: float(v) for k, v in scalars.items()}  # e.g. clip_norm
        # buffered (robust) rules: the round's updates, one row per party (jitkernels.robust_store.UpdateStore)
        self.store = store
        self.closed = bool(closed)
        # a finalize released this round's model (see Aggregator.reset: the next round of a rule that steps from its
        # base starts from it)
        self.released = bool(released)
        # why a fold failed part-way into this state (it holds part of a batch: see errors.TornState), else None;
        # never saved: such a state is refused by every use until reset
        self.torn: str | None = None
        self.torn_model = False  # a server step stopped part-way: the model and moments, not only the sums, are torn
        # deterministic mode: acc is the high part of a binned sum and lo the low part (see csrc/jk_math.h)
        if self.deterministic:
            if self.acc_dtype != "float64":
                raise ValueError("deterministic states accumulate in float64")
            self.lo = zeros(layout.size, np.float64, on_device) if lo is None else lo
        elif lo is not None:
            raise ValueError("only deterministic states have a low part")
        else:
            self.lo = None
        if self.acc.shape != (layout.size,) or self.acc.dtype != np.dtype(self.acc_dtype):
            raise ValueError(f"accumulator must be {self.acc_dtype}[{layout.size}], got "
                             f"{self.acc.dtype}{self.acc.shape}")
        # every array the kernels index by the layout: a wrong shape would be read out of bounds
        for name, arr, dt, n in (("base", self.base, self.acc_dtype, layout.size),
                                 ("lo", self.lo, "float64", layout.size),
                                 ("leaf_weight", self.leaf_weight, "float64", len(layout))):
            if arr is not None and (arr.shape != (n,) or arr.dtype != np.dtype(dt)):
                raise ValueError(f"{name} must be {dt}[{n}], got {arr.dtype}{arr.shape}")
        for k, arr in (self.opt or {}).items():
            if k not in ("m", "v"):
                raise ValueError(f"optimizer state {k!r} is none of a server optimizer's ('m', 'v')")
            if arr.shape != (layout.size,) or arr.dtype != np.dtype(self.acc_dtype):
                raise ValueError(f"optimizer state {k!r} must be {self.acc_dtype}[{layout.size}], got "
                                 f"{arr.dtype}{arr.shape}")

    @property
    def on_device(self) -> bool:
        """The accumulators live in GPU memory (the cupy backend's states)."""
        return not isinstance(self.acc, np.ndarray)

    def __getstate__(self):  # (copy.deepcopy; files never pickle: see save)
        return {k: v for k, v in self.__dict__.items() if k not in ("guard", "_own_guard")}

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.guard = self._own_guard = threading.RLock()

    def to(self, on_device: bool) -> "FoldState":
        """Move the arrays (accumulators and base) to GPU memory or back, in place; returns self."""
        if on_device != self.on_device:
            self.acc = place(self.acc, on_device)
            self.lo = None if self.lo is None else place(self.lo, on_device)
            self.base = None if self.base is None else place(self.base, on_device)
            if self.opt is not None:
                self.opt = {k: place(a, on_device) for k, a in self.opt.items()}
            self.__dict__.pop("_host_base", None)
            if self.store is not None:  # a GPU aggregator keeps its rows in GPU memory (robust_store.store_class)
                self.store = self.store.placed(on_device)
        return self

    @property
    def held(self) -> bool:
        """Whether an Aggregator holds this state (its lock is the state's guard)."""
        return self.guard is not self._own_guard

    def host_base(self):
        """The base in host memory (cached: admission of host updates computes their delta stats on the CPU)."""
        if self.base is None or isinstance(self.base, np.ndarray):
            return self.base
        hb = self.__dict__.get("_host_base")
        if hb is None or hb[0] is not self.base:
            hb = self.__dict__["_host_base"] = (self.base, to_host(self.base))
        return hb[1]

    @property
    def deterministic(self) -> bool:
        return self.algorithm.get("deterministic") is not None

    @property
    def bound_log2(self) -> int:
        return int(self.algorithm["deterministic"])

    def value(self) -> np.ndarray:
        """The accumulated sums as one float64/float32 array (hi + lo, correctly rounded, in deterministic mode;
        the two read under the guard, so that no fold lands between them)."""
        with self.guard:
            return self.acc + self.lo if self.deterministic else self.acc

    # --- summary -----------------------------------------------------------------------------------------------
    @property
    def binned_capacity(self) -> int:
        """Deterministic mode: the updates this state may hold and stay exact: 2^30, or 2^20 when it sums integer
        leaves (whose terms may reach 2^10 x the bound)."""
        sums_ints = self.algorithm.get("int_leaves", "mean") == "mean" and \
            any(not leaf.is_float for leaf in self.layout.leaves)
        return BINNED_MAX_UPDATES_INT if sums_ints else BINNED_MAX_UPDATES

    def check_binned_room(self, more: int) -> None:
        """Deterministic mode: refuse ``more`` updates (a batch, a merged state) past :attr:`binned_capacity`."""
        if self.count + more > self.binned_capacity:
            raise ValueOutOfRange(f"this deterministic state holds at most {self.binned_capacity} updates (its high "
                                  f"part's sums stay exact up to there): {self.count} + {more}")

    def exact_leaf_weights(self) -> np.ndarray:
        """Deterministic mode: each leaf's total weight, the exactly rounded sum (``math.fsum``) of the masses of the
        parties whose updates carried it (so any order, batching and merge tree gives the same divisor)."""
        if not self.absent:
            return np.full(len(self.layout), self.total_weight)
        by_pattern: dict = {}  # the leaves an update lacked -> the masses of the parties that sent such updates
        for p, m in self.parties.items():
            by_pattern.setdefault(self.absent.get(p, ()), []).append(m)
        return np.array([weight_sum(m for pattern, ms in by_pattern.items() if i not in pattern for m in ms)
                         for i in range(len(self.layout))])

    @property
    def count(self) -> int:
        return len(self.parties)

    @property
    def total_weight(self) -> float:
        """Sum of the fold weights of every party (exactly rounded, whatever the fold order)."""
        return weight_sum(self.parties.values())

    def __repr__(self):
        return (f"FoldState({self.algorithm.get('name')}, {self.count} parties, weight {self.total_weight:g}, "
                f"{self.acc_dtype}[{self.layout.size}])")

    def next_round(self, *, base=None, store=None) -> "FoldState":
        """An empty state that continues this one: its layout, algorithm and mode, its model (or ``base``), server
        moments, round counter and scalars. With a server optimizer the model and moments are copied (its step moves
        them in place, which must not reach the other state); folds touch neither."""
        if self.torn_model:  # (its model and moments were stepped in part: nothing may continue them)
            raise TornState(self.torn)
        own = self.opt is not None
        with on_gpu_of(self.acc):  # (the next round's arrays on this state's GPU, whichever is current)
            if base is None:
                base = self.base.copy() if own and self.base is not None else self.base
            return FoldState(self.layout, algorithm=self.algorithm, acc_dtype=self.acc_dtype,
                             on_device=self.on_device, base=base, round=self.round, scalars=self.scalars, store=store,
                             opt={k: a.copy() for k, a in self.opt.items()} if own else None)

    def copy(self) -> "FoldState":
        """A snapshot, taken under the guard (save and merge hold it too): one taken while another thread folded
        recorded parties whose sums were not in its accumulator, or the reverse. A GPU state's copy is made on its
        GPU, whichever is current."""
        with self.guard, on_gpu_of(self.acc):
            new = FoldState(self.layout, algorithm=self.algorithm, acc_dtype=self.acc_dtype, acc=self.acc.copy(),
                            leaf_weight=self.leaf_weight.copy(), parties=self.parties,
                            base=None if self.base is None else self.base.copy(),
                            lo=None if self.lo is None else self.lo.copy(), info=self.info,
                            opt=None if self.opt is None else {k: a.copy() for k, a in self.opt.items()},
                            round=self.round, closed=self.closed, released=self.released, scalars=self.scalars,
                            store=None if self.store is None else self.store.copy(), absent=self.absent,
                            peak=self.peak)
            new.torn, new.torn_model = self.torn, self.torn_model
        return new

    def same_bits(self, other: "FoldState") -> bool:
        """True when both states hold bit-identical accumulators, weights, parties and bases."""
        def eq(a, b):
            if a is None or b is None:
                return a is None and b is None
            a, b = to_host(a), to_host(b)
            return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return (self.layout == other.layout and self.algorithm == other.algorithm and eq(self.acc, other.acc)
                and eq(self.leaf_weight, other.leaf_weight) and self.parties == other.parties
                and eq(self.base, other.base) and eq(self.lo, other.lo) and self.info == other.info
                and self.absent == other.absent
                and (self.opt is None) == (other.opt is None) and self.round == other.round
                and self.closed == other.closed and self.released == other.released
                and self.scalars == other.scalars
                and (self.store is None) == (other.store is None)
                and (self.store is None or (self.store.parties == other.store.parties
                                            and eq(self.store.rows(), other.store.rows())))
                and (self.opt is None or (self.opt.keys() == other.opt.keys()
                                          and all(eq(self.opt[k], other.opt[k]) for k in self.opt))))

    # --- merge -------------------------------------------------------------------------------------------------
    def check_mergeable(self, other: "FoldState") -> None:
        self.check_whole()
        other.check_whole()
        if self.layout != other.layout:
            raise IncompatibleStates("states have different layouts "
                                     f"({self.layout.fingerprint} vs {other.layout.fingerprint})")
        if algorithm_rule(self.algorithm) != algorithm_rule(other.algorithm):
            raise IncompatibleStates(f"states use different algorithms: {self.algorithm} vs {other.algorithm}")
        if self.acc_dtype != other.acc_dtype:
            raise IncompatibleStates(f"accumulators differ: {self.acc_dtype} vs {other.acc_dtype}")
        if self.closed or other.closed:
            raise IncompatibleStates("finalize closed the round of one of the states (a server step or DP noise)")
        if self.round != other.round:
            raise IncompatibleStates(f"states are at different rounds ({self.round} vs {other.round})")
        if (self.store is None) != (other.store is None):  # (a robust rule's state from a file without its store:
            # merged into one with a store it raised AttributeError; the other way its rows were dropped unseen)
            raise IncompatibleStates("one state keeps the round's updates (a robust rule's store), the other has none")
        if self.scalars != other.scalars:
            raise IncompatibleStates(f"states carry different server values: {self.scalars} vs {other.scalars}")
        if (self.base is None) != (other.base is None) or (
                self.base is not None and self.base is not other.base
                and not np.array_equal(to_host(self.base), to_host(other.base))):
            raise IncompatibleStates("states fold deltas against different bases")
        if self.opt and other.opt:  # both carry a server optimizer's moments (a worker's partial state has none)
            for k in self.opt.keys() | other.opt.keys():
                a, b = self.opt.get(k), other.opt.get(k)
                if a is None or b is None or (a is not b and not np.array_equal(to_host(a), to_host(b))):
                    raise IncompatibleStates(f"states carry different server optimizer moments ({k!r})")
        shared = self.parties.keys() & other.parties.keys()
        if shared:
            raise OverlappingParties(shared)
        if self.deterministic:
            self.check_binned_room(other.count)

    def merge(self, other: "FoldState") -> "FoldState":
        """A new state holding both aggregates: accumulators and weights add; parties are the union."""
        with guarded(self, other):
            self.check_mergeable(other)
            out = self.copy()
            out.merge_into(other, checked=True)
        return out

    def merge_into(self, other: "FoldState", *, checked: bool = False) -> None:
        """Merge ``other`` into this state in place (checks first: a refused merge changes nothing). ``other`` may
        live on the other side of the PCIe bus; its arrays are moved to this state's. Both states' guards are held:
        an aggregator folding into either must not tear what is merged (an update's values without its weight)."""
        with guarded(self, other):
            self._merge_into(other, checked)

    def _merge_into(self, other: "FoldState", checked: bool) -> None:
        if not checked:
            self.check_mergeable(other)
        if other.on_device != self.on_device:
            other = other.copy().to(self.on_device)
        rows = None if self.store is None else len(self.store.parties)
        try:
            self._add(other)
        except BaseException as e:  # (the accumulator took the other's sums first: a retry would add them twice)
            if rows is not None and len(self.store.parties) == rows and isinstance(e, Exception):
                raise  # (the store refused the rows, before anything was written)
            self.tear("a merge", e, "the state holds part of the other state: reset() and merge again, or load the "
                      "last saved state")
            raise

    def _add(self, other: "FoldState") -> None:
        """The writes of a merge (checked, ``other`` on this state's side of the bus). A robust rule's store first:
        it refuses all or nothing (StoreFull, a shared party), before anything else is written."""
        if self.store is not None:
            self.store.extend(other.store)
        if self.algorithm.get("int_leaves") == "max":
            for i, leaf in enumerate(self.layout.leaves):
                sl = slice(leaf.offset, leaf.offset + leaf.size)
                if leaf.is_float:
                    self.acc[sl] += other.acc[sl]
                elif other.leaf_weight[i] > 0:
                    self.acc[sl] = np.maximum(self.acc[sl], other.acc[sl]) if self.leaf_weight[i] > 0 else other.acc[sl]
        else:
            self.acc += other.acc
        if self.deterministic:  # both parts add exactly; the carry keeps lo small
            from .backends.numpy_ref import binned_carry, binned_constants
            self.lo += other.lo
            binned_carry(self.acc, self.lo, binned_constants(self.bound_log2)[0])
        self.leaf_weight += other.leaf_weight
        self.peak = max(self.peak, other.peak) if not math.isnan(other.peak) else math.nan  # (NaN: not known)
        self.parties.update(other.parties)
        self.info.update(other.info)
        self.absent.update(other.absent)

    # --- files -------------------------------------------------------------------------------------------------
    def _tensors(self) -> dict:
        t = {"acc": to_host(self.acc), "leaf_weight": self.leaf_weight}
        if self.base is not None:
            t["base"] = to_host(self.base)
        if self.lo is not None:
            t["lo"] = to_host(self.lo)
        for k, a in (self.opt or {}).items():
            t[f"opt_{k}"] = to_host(a)
        if self.store is not None:
            t["store_rows"] = np.ascontiguousarray(to_host(self.store.rows()))
        if self.absent:  # per party, in the parties record's order: its pattern in absent_patterns, or -1
            index = {pat: i for i, pat in enumerate(self._absent_patterns())}
            t["absent_index"] = np.array([index.get(self.absent.get(p), -1) for p in self.parties], np.int32)
        return t

    def _absent_patterns(self) -> list:
        """The distinct sets of leaves that partial updates lacked (a LoRA round has one or a few, whatever the
        number of parties: listing each party's would outgrow safetensors' 100 MB header)."""
        return sorted(set(self.absent.values()))

    def tear(self, what: str, error, held: str = "the state holds part of it: reset() and fold the round again, or "
             "load the last saved state") -> None:
        """``what`` stopped at ``error`` after it had written part of itself into this state: doing it again would
        count that part twice. Torn: refused by every use until reset (errors.TornState)."""
        self.torn = f"{what} failed part-way ({type(error).__name__}: {error}); {held}"

    def check_whole(self) -> None:
        """TornState where a fold failed part-way into this state."""
        if self.torn is not None:
            raise TornState(self.torn)

    def _metadata(self) -> dict:
        self.check_whole()  # (a saved torn state would be taken for a whole one at its load)
        return {
            "format": FORMAT,
            "version": str(VERSION if self.absent else 2),  # version 2 readers read every state without the record
            "layout": json.dumps(self.layout.to_json(), sort_keys=True),
            "algorithm": json.dumps(self.algorithm, sort_keys=True),
            "acc_dtype": self.acc_dtype,
            "parties": json.dumps([[p, w] for p, w in self.parties.items()]),
            "info": json.dumps([[p, v] for p, v in self.info.items()], sort_keys=True),
            **({"absent_patterns": json.dumps([list(p) for p in self._absent_patterns()])} if self.absent else {}),
            "round": str(self.round),
            "scalars": json.dumps(self.scalars, sort_keys=True),
            **({} if self.store is None else {"store": json.dumps(self.store.describe())}),
            "closed": "1" if self.closed else "0",
            **({"released": "1"} if self.released else {}),  # (absent from older files, and from most states)
        }

    def to_bytes(self) -> bytes:
        """The file's bytes (safetensors with the checksummed metadata)."""
        with self.guard:
            return checked_bytes(self._tensors(), self._metadata())

    def writer(self):
        """``write(path)`` of the file :meth:`to_bytes` returns, for :func:`atomic_write` (no bytes built first). It
        reads the live arrays when called: the caller keeps folds out until then (:meth:`save` does)."""
        return checked_writer(self._tensors(), self._metadata())

    def save(self, path, *, on_step=None) -> None:
        """Write atomically: temp file (exclusive create) -> fsync -> rename -> fsync the directory. A state that an
        Aggregator holds is written under that aggregator's lock: its folds from other threads wait for the write."""
        with self.guard:
            atomic_write(os.fspath(path), self.writer(), on_step=on_step)

    @classmethod
    def load(cls, path) -> "FoldState":
        """Load and verify a saved state; :class:`CorruptState` if it is truncated, altered or of an unknown version."""
        path = os.fspath(path)
        return cls._from_checked(*read_checked(path, what="state file"), path)

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "<bytes>") -> "FoldState":
        """A state from :meth:`to_bytes` (e.g. a partial fold sent back by a Ray worker), verified as :meth:`load`."""
        return cls._from_checked(*read_checked_bytes(data, what="state"), where)

    @classmethod
    def _from_checked(cls, tensors, meta, path) -> "FoldState":
        check_format(path, meta, FORMAT, SUPPORTED_VERSIONS, "jitkernels fold state")
        try:
            layout = Layout.from_json(json.loads(meta["layout"]))
            algorithm = json.loads(meta["algorithm"])
            pairs = json.loads(meta["parties"])
            parties = {check_party(p): float(w) for p, w in pairs}
            if len(parties) != len(pairs):
                raise ValueError("a party is listed twice")
            info = {check_party(p): {k: float(x) for k, x in v.items()} for p, v in json.loads(meta.get("info", "[]"))}
            absent = _absent_from(tensors, meta, list(parties), len(layout), algorithm)
            opt = {k[4:]: np.array(a) for k, a in tensors.items() if k.startswith("opt_")}
            state = cls(layout, algorithm=algorithm, acc_dtype=meta["acc_dtype"], acc=np.array(tensors["acc"]),
                       leaf_weight=np.array(tensors["leaf_weight"]), parties=parties,
                       base=np.array(tensors["base"]) if "base" in tensors else None,
                       lo=np.array(tensors["lo"]) if "lo" in tensors else None, info=info, opt=opt or None,
                       round=int(meta.get("round", "0")), closed=meta.get("closed", "0") == "1",
                       released=meta.get("released", "0") == "1",
                       scalars=json.loads(meta.get("scalars", "{}")),
                       store=_store_from(tensors, meta, layout), absent=absent)
            # the record must agree with the per-leaf weights folded beside it (they differ only by rounding)
            if absent and not np.allclose(state.exact_leaf_weights(), state.leaf_weight, rtol=1e-9, atol=0.0):
                raise ValueError("the absent-leaf record disagrees with the per-leaf weights")
            _check_values(state)
            if state.deterministic:  # one representation per sum (jk::binned_carry): a state saved before
                # 2026-11-28 may hold a tie's other form, which DP noise, added to the high part, rounded otherwise
                from .backends.numpy_ref import binned_carry, binned_constants
                binned_carry(state.acc, state.lo, binned_constants(state.bound_log2)[0])
            return state
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError, RecursionError, MemoryError,
                OSError, SyntaxError) as e:  # (SyntaxError: np.dtype of a long digit string)
            raise CorruptState(f"{path}: inconsistent state ({type(e).__name__}: {str(e)[:300]})") from e


@contextlib.contextmanager
def guarded(*states):
    """Hold the guards of ``states`` (an aggregator's lock, for its state), in one order whatever the call's: two
    threads merging two states into each other must not each hold one guard and wait for the other."""
    with contextlib.ExitStack() as stack:
        for guard in sorted({id(s.guard): s.guard for s in states}.values(), key=id):
            stack.enter_context(guard)
        yield


def check_empty_sums(st: "FoldState") -> None:
    """A state with no parties holds zero sums (ValueError else): a fold into an empty state relies on them (a
    rejected first batch is undone by zeroing again; the C++ deterministic fold writes an empty state's sums without
    reading them, where numpy's and numba's added to a hand-made state's)."""
    if not st.parties and (st.leaf_weight.any() or any(to_host(a).any() for a in (st.acc, st.lo) if a is not None)):
        raise ValueError("a state with no parties holds non-zero sums")


def _check_values(st: "FoldState") -> None:
    """What a checksum cannot vouch for (anyone can compute one): the values a fold could have made. Arrays of the
    layout's size and finite; party weights finite and >= 0, and per leaf none or from the lightest party's to
    their sum (a leaf weight of 1e-30 gave a 2e30 model; a robust rule's weights are its own: only not NaN nor
    negative), and a leaf of weight 0 summing nothing; a round in [0, 2^32) and finite server values; a known integer
    rule and deterministic bound; a robust store of the state's parties.
    (The algorithm itself is rebuilt by from_state: a user's own algorithm class loads and merges as before.)"""
    n, L = st.layout.size, len(st.layout)
    for name, a in (("acc", st.acc), ("lo", st.lo), ("base", st.base), *((f"opt_{k}", v) for k, v in
                                                                          (st.opt or {}).items())):
        if a is not None and (a.shape != (n,) or a.dtype != np.dtype(st.acc_dtype) or not np.isfinite(a).all()):
            raise ValueError(f"{name} is not {n} finite {st.acc_dtype} values")
    if st.opt and "v" in st.opt and (to_host(st.opt["v"]) < 0).any():  # (Adam's, Yogi's and Adagrad's steps divide
        # by its square root: a negative one made the model NaN at the next finalize, and blamed the next parties)
        raise ValueError("opt_v, a second moment, holds negative values")
    w = np.fromiter(st.parties.values(), np.float64, len(st.parties))
    if not (np.isfinite(w).all() and (w >= 0).all()):  # (Krum's Flower variant takes masses of 0)
        raise ValueError("a party's weight is not a finite number >= 0")
    lw = st.leaf_weight
    if lw.shape != (L,) or lw.dtype != np.float64 or np.isnan(lw).any() or (lw < 0).any():
        raise ValueError(f"the per-leaf weights {lw[:4]} are not {L} numbers >= 0")
    check_empty_sums(st)
    if st.store is None:  # a sum: a leaf's weight sums the parties that carried it (partial updates), none or more
        total = weight_sum(w)
        if not math.isfinite(total):
            raise ValueError(f"the parties' weights sum to {total}, past float64's range")
        lightest = float(w[w > 0].min()) if (w > 0).any() else 0.0
        if not np.isfinite(lw).all() or ((lw != 0) & ((lw < lightest * (1 - 1e-9)) | (lw > total * (1 + 1e-9)))).any():
            raise ValueError(f"the per-leaf weights {lw[:4]} do not fit the parties' weights (total {total:.6g})")
        for i in np.flatnonzero(lw == 0):  # a leaf nobody carried sums nothing (finalize divided its sums by the
            leaf = st.layout.leaves[i]  # total weight instead: a model 3x off)
            if any(to_host(a[leaf.offset:leaf.offset + leaf.size]).any() for a in (st.acc, st.lo) if a is not None):
                raise ValueError(f"leaf {leaf.name!r} has a weight of 0 and non-zero sums")
    # (rounds key DP noise as 32-bit counters: 2^64 loaded, then finalize raised a bare ValueError)
    if not 0 <= st.round < 2 ** 32:
        raise ValueError(f"round {st.round} is outside [0, 2^32)")
    bad = next((k for k, v in st.scalars.items() if not (isinstance(v, (int, float)) and math.isfinite(v))), None)
    if bad is not None:  # (which one: the message named the round too, and every scalar)
        raise ValueError(f"server value {bad!r} = {st.scalars[bad]!r} is not a finite number")
    if st.algorithm.get("int_leaves", "mean") not in ("mean", "max"):
        raise ValueError(f"int_leaves {st.algorithm.get('int_leaves')!r} is neither 'mean' nor 'max'")
    bound = st.algorithm.get("deterministic")
    if bound is not None and not (type(bound) is int and -960 <= bound <= 960):
        raise ValueError(f"deterministic bound 2^{bound!r} outside [2^-960, 2^960]")
    if st.store is not None and set(st.store.parties) != set(st.parties):
        raise ValueError("the robust store holds other parties than the state's record")


def _absent_from(tensors, meta, parties: list, n_leaves: int, algorithm: dict) -> dict:
    """The absent-leaf record (``absent_patterns`` + ``absent_index``), checked: a pattern is a strictly increasing
    list of leaf indices that leaves at least one leaf; each party has one pattern or -1."""
    if "absent_patterns" not in meta and "absent_index" not in tensors:
        return {}
    if algorithm.get("deterministic") is None:
        raise ValueError("an absent-leaf record in a state that is not deterministic")
    patterns = json.loads(meta["absent_patterns"])
    for pat in patterns:
        if not (isinstance(pat, list) and 0 < len(pat) < n_leaves and all(type(i) is int for i in pat)
                and all(0 <= a < b < n_leaves for a, b in zip(pat, pat[1:])) and 0 <= pat[0]):
            raise ValueError(f"absent-leaf pattern {pat!r} is not a strictly increasing list of leaf indices")
    index = np.asarray(tensors["absent_index"])
    if index.dtype != np.int32 or index.shape != (len(parties),) or (index < -1).any() or \
            (index >= len(patterns)).any():
        raise ValueError("absent_index does not give each party a pattern or -1")
    return {p: tuple(patterns[i]) for p, i in zip(parties, index.tolist()) if i >= 0}


STORE_RESOURCES = ("budget_bytes", "over_budget")
"""Algorithm parameters that bound a robust rule's store on one machine, not the rule: states that differ only in
them merge (a coordinator with a budget merges a worker's partial aggregate without one, or one saved before they
were saved)."""


def algorithm_rule(params: dict) -> dict:
    """An algorithm's parameters less what describes this machine's resources (a store's budget): what two states
    must share to be one computation."""
    return {k: v for k, v in params.items() if k not in STORE_RESOURCES}


def _store_from(tensors, meta, layout):
    if "store" not in meta:
        return None
    from .robust_store import UpdateStore

    d = json.loads(meta["store"])  # what describe() writes, no more: a spill directory or budget is this machine's
    k_max = d["k_max"]  # (a k_max no machine can map fails the slab's reservation: MemoryError, CorruptState here)
    if type(k_max) is not int or k_max < 1:
        raise ValueError(f"store k_max {k_max!r} is not an integer >= 1")
    names, leaves = d.get("names"), [leaf.name for leaf in layout.leaves]
    if names is not None and names != leaves:  # (the aggregator adds its rows by the layout's names: later dicts
        # are read in the store's order, and names swapped put two leaves of one size in each other's place)
        raise ValueError(f"the robust store's leaf names {names[:6]!r} are not the layout's {leaves[:6]!r}")
    return UpdateStore.from_rows(tensors["store_rows"], k_max=k_max, dtype=d["dtype"], parties=d["parties"],
                                 shapes=[leaf.shape for leaf in layout.leaves], names=names)


def check_format(path, meta: dict, fmt: str, versions, what: str) -> None:
    """:class:`CorruptState` unless a checked file's metadata names format ``fmt`` and one of ``versions``."""
    if meta.get("format") != fmt:
        raise CorruptState(f"{path}: not a {what} (format {meta.get('format')!r})")
    if meta.get("version") not in {str(v) for v in versions}:
        raise CorruptState(f"{path}: format version {meta.get('version')!r}; this build reads "
                           f"{', '.join(map(str, versions))}")


def checked_bytes(tensors: dict, meta: dict) -> bytes:
    """A safetensors file of ``tensors`` whose metadata (``meta``, str -> str) carries their SHA-256 checksum. Two
    saves of one state hold the same tensors, metadata and checksum, but not always the same bytes: safetensors
    writes the metadata from a hash map, in no fixed order (compare what :func:`read_checked_bytes` returns)."""
    from safetensors.numpy import save

    return save(*_with_checksum(tensors, meta))


def checked_writer(tensors: dict, meta: dict):
    """``write(path)``: writes the file :func:`checked_bytes` would return, straight to ``path`` (safetensors'
    ``save_file``), for :func:`atomic_write`. Large states should go this way: ``save`` builds the bytes while
    holding the GIL (up to 22 ms for 32 MB, measured: every other thread of the process, a scheduler's ``submit``
    included, waits that long), ``save_file`` held it at most 4.7 ms for the same write."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    tensors, meta = _with_checksum(tensors, meta)

    def write(path):
        try:
            save_file(tensors, path, metadata=meta)
        except SafetensorError as e:  # (a full disk is safetensors' own error, no OSError: callers that catch
            # OSError for a failed write, the state directory's, missed it; its message names the OS error)
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code.group(1)), f"safetensors could not write {path}: {e}") from None
    return write


def _with_checksum(tensors: dict, meta: dict) -> tuple:
    """(tensors, metadata) to write: the metadata with the checksum, the tensors with the values too long for the
    header (see :data:`META_SPILL`)."""
    tensors, meta = dict(tensors), dict(meta)
    spilled = sorted(k for k, v in meta.items() if len(v) > META_SPILL)
    for k in spilled:
        tensors[SPILLED_PREFIX + k] = np.frombuffer(meta.pop(k).encode(), np.uint8)
    if spilled:
        meta[SPILLED_KEY] = json.dumps(spilled)
    meta["checksum"] = _checksum(tensors, meta)
    return tensors, meta


META_SPILL = 1 << 20
"""Metadata values longer than this (characters) are written as uint8 tensors (``__meta__.<key>``, listed under
``__spilled__``) and put back by the readers: safetensors refuses a header past 100 MB, and a state of many parties
(a million ids of 60 characters, or 1,800 of the longest ids) failed every save with its untyped error."""
SPILLED_PREFIX, SPILLED_KEY = "__meta__.", "__spilled__"


def _unspill(tensors: dict, meta: dict, where: str) -> tuple:
    """(tensors, metadata) as written: the spilled values back in the metadata (verified by the checksum)."""
    try:
        for k in json.loads(meta.pop(SPILLED_KEY, "[]")):
            meta[k] = tensors.pop(SPILLED_PREFIX + k).tobytes().decode()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # (only a forged file: the
        # checksum is unkeyed)
        raise CorruptState(f"{where}: a metadata value written as a tensor cannot be read back ({e})") from e
    return tensors, meta


def read_checked(path: str, what: str = "file") -> tuple:
    """(tensors, metadata without the checksum) of a file written by :func:`checked_bytes`, verified:
    :class:`CorruptState` if it is truncated, altered or not such a file. Nothing is unpickled."""
    from safetensors import SafetensorError, safe_open

    # opened here first, for the OS's own error (FileNotFoundError only for a missing file: safetensors reports every
    # failure to open as one, "too many open files" included, and a resume that starts afresh on FileNotFoundError
    # dropped an intact state); non-blocking, as a FIFO would block the open for ever (holding the GIL)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptState(f"{path}: not a regular file")
        try:
            with safe_open(path, framework="np") as f:
                meta = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError as e:  # it is there (open above): the open failed for another reason
            raise OSError(f"{path}: could not be opened to read ({e}; the file exists)") from e
        except (SafetensorError, ValueError, OSError) as e:
            raise CorruptState(f"{path}: not a readable {what} ({e})") from e
    finally:
        os.close(fd)
    expected = meta.pop("checksum", None)
    if expected is None or _checksum(tensors, meta) != expected:
        raise CorruptState(f"{path}: checksum mismatch (the {what} was altered or damaged)")
    return _unspill(tensors, meta, path)


def read_checked_bytes(data: bytes, what: str = "buffer") -> tuple:
    """:func:`read_checked` of bytes in memory (safetensors' header JSON holds the metadata)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        n = int.from_bytes(bytes(data[:8]), "little")
        meta = dict(json.loads(bytes(data[8:8 + n])).get("__metadata__") or {})
        tensors = load(bytes(data))
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, TypeError, RecursionError) as e:
        raise CorruptState(f"not a readable {what} ({e})") from e
    expected = meta.pop("checksum", None)
    if expected is None or _checksum(tensors, meta) != expected:
        raise CorruptState(f"checksum mismatch (the {what} was altered or damaged)")
    return _unspill(tensors, meta, what)


def _checksum(tensors: dict, meta: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)  # no copy; hashlib drops the GIL on large buffers
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    return h.hexdigest()


def _umask() -> int:
    """The process's umask: from /proc on Linux; elsewhere set and put back (the only way to read it there), to
    0o077 meanwhile, so that a file another thread creates in between is private rather than open."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write(path: str, data, *, on_step=None) -> None:
    """Crash-safe replace of ``path`` by ``data``: a reader sees the old file or the new one, never a mix. ``data``:
    bytes, or a function that writes the file at the path it is given (:func:`checked_writer`).

    Protocol: temp file (exclusive create) -> write -> fsync -> rename over ``path`` -> fsync the directory.
    ``on_step(name)``, if given, is called after each durable step ("tmp_synced", "renamed", "dir_synced"): the
    scheduler's crash tests stop the protocol there. An exception from it propagates without cleanup, as a crash
    would leave things (a temp file, say: the next open collects it)."""
    d = os.path.dirname(os.path.abspath(path))
    # a fresh exclusive name: a pid alone collided with a dead process's leftover (pid 1 again in a container) and
    # with a second thread saving the same path
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    mode = 0o666 & ~_umask()  # a plain open's mode (mkstemp's 0600 is for its own temp files), by either path
    try:
        if callable(data):
            os.close(fd)
            data(tmp)  # (safetensors' writer makes a file of its own mode there)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fchmod(fd, mode)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with os.fdopen(fd, "wb") as f:  # (fchmod inside: one refused (EPERM on vfat, CIFS) leaked the descriptor)
                os.fchmod(f.fileno(), mode)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    if on_step is not None:
        on_step("tmp_synced")
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    if on_step is not None:
        on_step("renamed")
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if on_step is not None:
        on_step("dir_synced")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def is_temp_file(name: str) -> bool:
    """A temp file that :func:`atomic_write` left behind when the process died between create and rename."""
    return name.startswith(".") and name.endswith(".tmp")
