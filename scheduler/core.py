"""JITScheduler: decides when each job's aggregation runs, and on which aggregator slot.

Event-driven: arrivals, timers and task completions are callbacks on a clock (real or virtual), run one at a time,
so the policy code is the same in the runtime and in the simulator. This module uses only jitkernels' public API;
the state directory and the executors also use its file format (``jitkernels.state``) and device leaves.

Lifecycle of a round: it opens (at the job's start, or when the previous round's model is ready); updates arrive and
are admitted (validated) in ``submit``'s caller and buffered; the policy says when to deploy an aggregator; once
deployed, the buffered updates are folded in one fused batch and later ones as they come; membership is fixed at the
quorum (the first q arrivals); the model is finalized; the deployment is released (eager keeps it).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import collections
import dataclasses
import functools
import heapq
import itertools
import json
import logging
import threading
import math
import types
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

import jitkernels as jk

from . import policies as _policies
from .clock import RealClock
from .cost import CostModel
from .durable import Crashed, StateDir, same_leaves
from .executors import LocalExecutor, ModelExecutor, Task, check_nice
from .predictor import Predictor, warm as _warm_predictor

log = logging.getLogger("jitkernels.scheduler")
DETERMINISTIC_BOUND = 2.0 ** 20  # jitkernels' default bound on weight * |x| for deterministic jobs
TAKE_BACKS = 2  # times a job's deployment may be taken back in a round before it stops taking others' (_request_slot)
SEARCH_MAX = 8  # idle deployments re-planned per search for a slot to take back (_request_slot): more than any
# shipped workload's slots, so their runs weigh every one
RETRY_MIN_S = 0.01  # a waiting quorum looks for a slot again at most this often (hysteresis and start-up may be 0:
# the retry was at now, for ever, and a virtual clock's time stood still)


MIN_CHECKPOINT_BYTES = 64 << 20
"""The default checkpoint interval's floor (update bytes folded): a checkpoint is a state file and a manifest, each
fsync'ed with its directory; a 100k-parameter model checkpointed every 4 updates spent more on those than on folding.
What it costs: a recovery may replay up to 64 MiB of update files (a file each: ~0.3 ms per file here, so ~5 s for
16K updates of 4 KB, well under a second for 400 KB ones)."""

DURABLE = Future()
DURABLE.set_result(True)
"""The acknowledgement's future when there is nothing (more) to persist: one shared, finished future (a finished
future never changes, and making one per update was a tenth of a large simulation's time)."""
_NO_IDS = types.MappingProxyType({})  # the update ids of a round nothing was acknowledged for (read only)


MAX_SLOTS = 100_000  # (list(range(10**30)) raised OverflowError at construction)


class SchedulerError(jk.AggregationError):
    """Base of the scheduler's own errors."""


class UnknownJob(SchedulerError, KeyError):
    pass


class UnknownParty(SchedulerError, ValueError):
    pass


class LateUpdate(SchedulerError, ValueError):
    """An update for a round whose membership is already fixed (late rule 'reject')."""


class QuorumUnreachable(SchedulerError, RuntimeError):
    """A round cannot reach its quorum (parties gone, or its deadline passed)."""


class Backpressure(SchedulerError, RuntimeError):
    """Buffered bytes are over budget and cannot be folded fast enough (overflow rule 'raise')."""


class RoundForgotten(SchedulerError, LookupError):
    """A finished round older than the last ``keep_rounds``: its result is no longer held."""


class NoSuchRound(SchedulerError, LookupError):
    """A round the job does not have (before its first or after its last), or, for a job without a round count, more
    than ``keep_rounds`` ahead of the open one: it would be held until it opens, and a stray number for ever."""


class SchedulerClosed(SchedulerError, RuntimeError):
    """The scheduler was closed: no more updates, and rounds still open resolve with this error."""


class JobRemoved(SchedulerError, RuntimeError):
    """The job was removed (:meth:`JITScheduler.remove_job`) before the round finished."""


class InvalidJob(SchedulerError, ValueError):
    """A job definition the scheduler cannot run as given (a quorum its parties cannot meet, an unknown rule)."""


@dataclass
class Job:
    """One FL job. ``template`` (a pytree) makes real aggregation; without it the job is modelled by sizes only
    (``model_elems``, ``update_bytes``), as the simulator does. Algorithms that fold deltas against the global model
    (FedNova, SCAFFOLD, centered clipping) take the template as round 0's model and the last round's result after
    it; a FedBuff job keeps no model: its parties send deltas against the model they trained from, and a round's
    result is the server's step, which the caller adds to its model."""

    id: str  # or an int (numpy integers normalized), as party ids
    template: object = None
    parties: list = field(default_factory=list)
    quorum: float = 1.0  # a fraction of the parties (float <= 1) or a count (int)
    algorithm: object = "fedavg"
    deadline_s: float | None = None  # per round, from its start
    priority: int = 0  # tie-breaker between equal laxities (higher first)
    rounds: int | None = None  # the job ends after this many rounds (eager releases then)
    first_round: int = 0
    model_elems: int | None = None
    update_bytes: int | None = None
    backend: str = "auto"
    acc_dtype: str | None = None  # None: float64 for a template with a float64 leaf, else float32 (as Aggregator)
    late: str = "reject"  # or "next_round": fold into the next round with weight * late_weight
    late_weight: float = 0.5
    unreachable: str = "error"  # or "partial": finalize what is there
    prior_response_s: float | None = None  # predictor prior before any response is seen
    deterministic: bool = False  # jitkernels' deterministic mode: bit-identical whatever the batching (and recovery)

    def after_last(self, number: int) -> bool:
        """Round ``number`` comes after the job's last (never, without a round count)."""
        return self.rounds is not None and number >= self.first_round + self.rounds

    def quorum_count(self) -> int:
        n = len(self.parties)
        q = self.quorum
        if isinstance(q, float) and q <= 1.0:
            return max(1, math.ceil(q * n - 1e-9))
        return int(q)

    def check(self) -> None:
        """:class:`InvalidJob` naming what is wrong: a quorum that is neither a fraction in (0, 1] nor a count of 1
        to len(parties) (a round would wait for ever, or refuse every update), an unknown late or unreachable rule,
        a late weight outside (0, 1] (a negative one subtracted the update), party ids that are not str or int or
        repeat, a deadline or prior that is not a finite number > 0, bad round counts, sizes or priority. Party ids
        and counts are normalized (numpy integers as ints). The job id too must be a str or an int, as party ids:
        it names the state directory's files as JSON (a tuple came back from the manifest as a list, and no
        generation of the directory verified again, for every job in it)."""
        try:
            self.id = jk.parties.check_party(self.id)  # (the rule of party ids)
        except jk.InvalidParty:
            raise InvalidJob(f"job ids must be str or int, got {type(self.id).__name__} {self.id!r}") from None
        if isinstance(self.parties, (str, bytes)) or not hasattr(self.parties, "__iter__"):  # ("p0p1" was 4 parties,
            # "listed twice")
            raise InvalidJob(f"job {self.id!r}: parties must be a list of party ids, got "
                             f"{type(self.parties).__name__} {jk.errors.shown(self.parties)}")
        try:
            self.parties = list(self.parties)
        except TypeError as e:  # (a 0-d numpy array has __iter__ and refuses it)
            raise InvalidJob(f"job {self.id!r}: parties must be a list of party ids ({e})") from None
        try:
            self.deterministic = jk.algorithms.flag("deterministic", self.deterministic)  # ("no" was truthy)
        except TypeError as e:
            raise InvalidJob(f"job {self.id!r}: {e}") from None
        q, n = self.quorum, len(self.parties)
        if n == 0:  # (any quorum of no parties: every round failed, "only 0 parties left")
            raise InvalidJob(f"job {self.id!r}: it has no parties")
        fraction = isinstance(q, float) and 0.0 < q <= 1.0
        count = (isinstance(q, (int, np.integer)) and not isinstance(q, bool)
                 or isinstance(q, float) and q.is_integer()) and 1 <= q <= n  # (a TOML count may read as 5.0)
        if not (fraction or count):
            raise InvalidJob(f"job {self.id!r}: quorum {q!r} is neither a fraction in (0, 1] nor a count of 1 to "
                             f"{n} (its parties)")
        if self.late not in ("reject", "next_round"):
            raise InvalidJob(f"job {self.id!r}: late must be 'reject' or 'next_round', got {self.late!r}")
        if self.unreachable not in ("error", "partial"):
            raise InvalidJob(f"job {self.id!r}: unreachable must be 'error' or 'partial', got {self.unreachable!r}")
        try:  # a staleness weight: at most 1 (the checks at submit held the weight sent, which it only lowers)
            if not jk.check_weight(self.late_weight, f"<job {self.id!r} late_weight>") <= 1.0:
                raise jk.InvalidWeight(None, self.late_weight)
        except (jk.InvalidWeight, jk.ValueOutOfRange):  # (Fraction(1, 10**400): out of float64's range)
            raise InvalidJob(f"job {self.id!r}: late_weight must be a number in (0, 1], got "
                             f"{self.late_weight!r}") from None
        try:  # (as ints and strs: a float id went into the manifest's predictor rows, which recovery then refused)
            self.parties = [jk.parties.check_party(p) for p in self.parties]
        except jk.InvalidParty as e:
            raise InvalidJob(f"job {self.id!r}: {e}") from None
        if len(set(self.parties)) != n:
            raise InvalidJob(f"job {self.id!r}: a party is listed twice (its quorum could never be met)")
        # a NaN deadline stopped the clock thread's waits (every job's events), one <= 0 failed rounds in a hot loop
        for name, v, lo in (("deadline_s", self.deadline_s, 0.0), ("prior_response_s", self.prior_response_s, 0.0)):
            if v is not None and not (_real(v) and math.isfinite(v) and v > lo):
                raise InvalidJob(f"job {self.id!r}: {name} must be None or a finite number of seconds > 0, got {v!r}")
        for name, v, lo, optional in (("rounds", self.rounds, 1, True), ("first_round", self.first_round, 0, False),
                                      ("model_elems", self.model_elems, 1, True),
                                      ("update_bytes", self.update_bytes, 1, True)):
            if not (v is None and optional or _whole(v) and v >= lo):
                raise InvalidJob(f"job {self.id!r}: {name} must be {'None or ' if optional else ''}an integer >= "
                                 f"{lo}, got {v!r}")
            if v is not None:
                setattr(self, name, int(v))  # (a numpy integer round number reached the manifest's JSON: TypeError)
        if not (_real(self.priority) and math.isfinite(self.priority)):
            raise InvalidJob(f"job {self.id!r}: priority must be a finite number, got {self.priority!r}")


def _real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _round_number(job_id, number) -> int:
    """A round number as an int (numpy integers too), else :class:`NoSuchRound` (a float or a string compared as
    one, or failed as a bare TypeError)."""
    if isinstance(number, (int, np.integer)) and not isinstance(number, bool):
        return int(number)
    raise NoSuchRound(f"job {job_id!r}: a round number is an int, got {number!r}")


def _update_id(update_id):
    """An update id as it is stored with the update, as JSON: None, a str or an int (numpy integers as ints), else
    TypeError. (A UUID failed every durable write; a tuple came back from the file as a list, and a resend after a
    restart was refused as another update.)"""
    try:
        return None if update_id is None else jk.parties.check_party(update_id)  # (the rule of party ids)
    except jk.InvalidParty:
        raise TypeError(f"update_id must be None, a str or an int, got {type(update_id).__name__} "
                        f"{update_id!r}") from None


def _round_future() -> Future:
    """A round's future. ``result()`` hands the same one to every caller, so it is marked running: one caller's
    ``cancel()`` (asyncio.wait_for's timeout cancels the future it waits on) returns False instead of cancelling it
    for all; a cancelled one made the round's resolution raise InvalidStateError, and the job stopped for good."""
    fut = Future()
    fut.set_running_or_notify_cancel()
    return fut


@dataclass
class Ack:
    """``durable`` resolves once the update is on disk (at once without a state directory). ``duplicate``: the same
    update (same ``update_id``) was acknowledged before, e.g. a resend after a crash; it is not counted again."""

    job: str
    round: int  # the round the update counts for: the next one with room for a late update (late="next_round")
    party: object
    accepted: bool
    durable: Future
    duplicate: bool = False


def _relay(src: Future, dst: Future) -> None:
    """``dst`` takes ``src``'s outcome once it has one."""
    def done(f):
        e = f.exception()
        if e is None:
            dst.set_result(f.result())
        else:
            dst.set_exception(e)
    src.add_done_callback(done)


@dataclass
class _Spilled:
    """An update accepted over the byte budget with overflow='spill': only its file holds it until it is folded."""

    round: int
    party: object
    weight: float
    durable: Future
    info: dict = field(default_factory=dict)
    item: object = None  # the admitted update, held while its write runs (the writer holds its arrays then anyway),
    # and kept if the write failed: the fold takes it from memory (one failed write failed the whole round)


def _written(sp: _Spilled, durable: Future) -> None:
    """A spilled update's write is done: only its file holds it now, unless the write failed."""
    if not durable.cancelled() and durable.exception() is None:
        sp.item = None


@dataclass
class _Round:
    number: int
    start: float
    quorum: int
    members: list = field(default_factory=list)  # first q arrivals, in order
    arrived: set = field(default_factory=set)
    arrived_flags: object = None  # bool per expected party (the job's order): the pending set as a vector op
    pending: list = field(default_factory=list)  # admitted (or modelled) updates not yet folded
    pending_bytes: int = 0
    folded: int = 0
    quorum_time: float | None = None
    last_arrival: float | None = None
    ready_time: float | None = None
    aggregator: object = None
    future: Future = field(default_factory=_round_future)
    timer: object = None
    plan_t: float | None = None  # the deploy time last planned (inf: unknown): what laxity is measured from
    since_plan: int = 0  # arrivals since the deploy time was last planned
    quantile_s: float | None = None  # the quorum time's quantile at the last plan (s since the round's start)
    taken_back: int = 0  # times its idle deployment was taken back at another job's planned time (_request_slot)
    deadline_timer: object = None
    done: bool = False
    admitted: int = 0  # updates acknowledged for the round: membership is decided at submit, the first q
    acked: set = field(default_factory=set)  # their parties (carried ones too), arrived or still queued
    durable: dict = field(default_factory=dict)  # party -> its update's Ack.durable, for a resend's Ack
    carried: set = field(default_factory=set)  # parties whose late update for the round before counts here
    carried_out: dict = field(default_factory=dict)  # party -> the round its late update for this one counts in
    unobserved: set = field(default_factory=set)  # parties whose arrival is no response time (carried, replayed)
    late_observed: set = field(default_factory=set)  # parties whose late answer the predictor has learnt
    missed: bool = False  # its deadline passed before its quorum (counted once in the metrics)
    opened_wall: float | None = None  # the clock's wall time when it opened (checkpoints record it: _resume)

    def take_carried(self, party) -> None:
        """``party``'s late update for the round before counts here: not as this round's answer, nor its time."""
        self.carried.add(party)
        self.unobserved.add(party)


@dataclass
class _Deployment:
    slot: int
    start: float
    ready_at: float
    ready: bool = False
    busy: bool = False


@dataclass
class JobMetrics:
    deployed_s: float = 0.0
    busy_s: float = 0.0
    deployments: int = 0
    rounds: int = 0
    latencies: list = field(default_factory=list)
    misses: int = 0
    peak_bytes: int = 0
    unreachable: int = 0
    partial: int = 0  # of the unreachable rounds, those finalized with what came (Job.unreachable = "partial")

    def summary(self) -> dict:
        lat = np.array(self.latencies) if self.latencies else np.full(1, np.nan)  # no model: no latency, not 0
        return {"deployed_s": self.deployed_s, "busy_s": self.busy_s, "idle_s": self.deployed_s - self.busy_s,
                "deployments": self.deployments, "rounds": self.rounds,
                "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
                "latency_p99_s": float(np.percentile(lat, 99)), "deadline_misses": self.misses,
                "peak_bytes_buffered": self.peak_bytes, "unreachable_rounds": self.unreachable,
                "partial_rounds": self.partial}


class _JobState:
    def __init__(self, job: Job, predictor: Predictor, added: float):
        self.job = job
        self.predictor = predictor
        self.expected = list(job.parties)
        self._index_expected()
        self.rounds: dict = {}
        self.open: _Round | None = None
        # the round that opens once the last one's futures are resolved (see JITScheduler._settling): submits in
        # between take it for the open one, as they did when they waited on the lock until it had opened
        self.opening: int | None = None
        self.deployment: _Deployment | None = None
        self.metrics = JobMetrics()
        self.added = added
        self.finished = False
        self.removed = False  # remove_job: what still runs for it (a fold, a queued arrival) ends without effect
        self.seq = 0  # its place among the scheduler's jobs, in the order they were added (add_job)
        self.removing = False  # remove_job is committing its removal (outside the scheduler's lock)
        self.tombstoned = False  # ... and has committed it: the job's writes and commits refuse themselves
        self.ended: str | None = None  # why the job ended before its last round, if it did
        self.resumed_acc_dtype: str | None = None  # a resumed state's accumulator dtype (see acc_dtype)
        self.layout = jk.Layout.from_template(job.template) if job.template is not None else None
        if self.layout is not None:
            self.model_elems = self.layout.size
            self.update_bytes = job.update_bytes or self.layout.nbytes
        else:
            if job.model_elems is None:
                raise InvalidJob(f"job {job.id!r}: give a template, or model_elems (and update_bytes) to model it")
            self.model_elems = job.model_elems
            self.update_bytes = job.update_bytes or 4 * job.model_elems
        # round -> {party acknowledged: its update id}, for de-duplication (per round: no key tuple made per update,
        # and a forgotten round's go at once)
        self.seen: dict = {}
        self.forgotten: int | None = None  # rounds up to this one are finished and no longer held
        self.fold_bytes = 0  # bytes folded since the last checkpoint
        self.buffered_bytes = 0  # its share of the scheduler's buffered_bytes
        self.spare = None  # an Aggregator to reuse for the next round
        self.restarted = False  # added on a state directory that held it: its open round began before the restart
        # algorithms that close rounds (server optimizers, DP): the finished round's aggregator, whose state (model,
        # moments, round counter, clip norm) the next round continues
        self.carry = None
        # algorithms that fold deltas against the global model and do not close rounds (FedNova, SCAFFOLD, centered
        # clipping): the last round's model, the next round's base (see rebases)
        self.next_base = None

    def _index_expected(self) -> None:
        self.expected_pos = {p: i for i, p in enumerate(self.expected)}
        self.expected_idx = self.predictor.indices(self.expected)  # positions in the predictor's arrays

    def drop_expected(self, party) -> None:
        self.expected.remove(party)
        self._index_expected()
        for rnd in self.rounds.values():
            rnd.arrived_flags = None  # re-derived from the arrived set on next use

    def live(self) -> bool:
        """Its writes and commits go to the state directory (``live=`` of :class:`StateDir`'s commits): neither
        removed nor its removal committed."""
        return not (self.removed or self.tombstoned)

    def flags(self, rnd):
        """rnd.arrived_flags, aligned with ``expected`` (built from the arrived set when missing)."""
        if rnd.arrived_flags is None:
            rnd.arrived_flags = np.fromiter((p in rnd.arrived for p in self.expected), bool, len(self.expected))
        return rnd.arrived_flags

    def mark_arrived(self, rnd, party) -> None:
        rnd.arrived.add(party)
        i = self.expected_pos.get(party)
        if i is not None and rnd.arrived_flags is not None:
            rnd.arrived_flags[i] = True

    def pending(self, rnd) -> tuple:
        """The parties still pending in ``rnd``, as the predictor takes them: (predictor positions of the expected
        parties, which of them have arrived)."""
        return self.expected_idx, self.flags(rnd)

    def admit(self, update, weight, party, info, copy=False):
        """Validate one update for this job, against the bound its aggregator will use, with the per-update values
        its algorithm reads (``info``, checked by the caller: ``steps`` for FedNova, ``staleness`` for FedBuff).
        ``copy``: hold a copy of its arrays (see :meth:`JITScheduler.submit`)."""
        u = jk.admit_many([update], self.layout, weights=[weight], parties=[party], backend=self.job.backend,
                          acc_dtype=self.acc_dtype, bound=self._admit_bound, copy=copy)[0]
        u.info = info
        if self._admit_bound != math.inf and not getattr(self.algorithm, "needs_norms", False):
            # the weight the fold multiplies by too (FedBuff's is 1 whatever the sample count, FedNova's w / steps):
            # an update admitted here and refused by the fold failed its whole round (DP's clip only lowers it)
            w = float(self.algorithm.fold_weight(u, None))
            if w != u.weight:
                bound, what = (jk.admission.headroom(self.acc_dtype), f"the {self.acc_dtype} accumulator's headroom") \
                    if self._admit_bound is None else (self._admit_bound, "the deterministic bound")
                jk.admission.check_fold_weight(u, w, bound, self.layout, self.acc_dtype, what)
        if self.layout.int_leaves and self._admit_bound != math.inf:  # counters, as the job's aggregator sums them
            jk.admission.check_int_terms([u], self.layout, [self.algorithm.mass(u)], self._admit_bound
                                         if self.job.deterministic else None, self.acc_dtype)
        return u

    @functools.cached_property
    def algorithm(self):
        return jk.algorithms.resolve(self.job.algorithm)

    @functools.cached_property
    def _admit_bound(self):
        """Deterministic jobs: their bound; robust rules keep values, they do not sum them: none (as the aggregator
        admits); else the accumulator's headroom (None)."""
        if self.job.deterministic:
            return 2.0 ** math.ceil(math.log2(DETERMINISTIC_BOUND))
        return math.inf if getattr(self.algorithm, "buffered", False) else None

    @property
    def acc_dtype(self) -> str:
        """The accumulator's dtype: the job's, else the template's default, unless the job resumed a state of another
        (saved before float64 templates defaulted to float64): its aggregators go on in it, and submit admits for it."""
        if self.job.deterministic:
            return "float64"
        if self.resumed_acc_dtype:  # (a job that names another goes on in the state's all the same)
            return self.resumed_acc_dtype
        if self.job.acc_dtype or self.layout is None:
            return self.job.acc_dtype or "float32"
        return self.layout.default_acc_dtype

    def new_aggregator(self):
        """A first round's aggregator. Algorithms that fold deltas start from the template as the global model."""
        alg = jk.algorithms.resolve(self.job.algorithm)
        base = (self.job.template if self.next_base is None else self.next_base) if alg.needs_base else None
        return jk.Aggregator(self.job.template, alg, backend=self.job.backend,
                             acc_dtype=self.acc_dtype, deterministic=self.job.deterministic,
                             bound=DETERMINISTIC_BOUND, base=base)

    def from_state(self, state):
        """An aggregator that continues ``state`` (a checkpoint or a carry) with the job's backend, and for a robust
        rule, the spill directory its algorithm names on this machine."""
        spill_dir = getattr(self.algorithm, "spill_dir", None)
        state.layout = self.layout  # (an equal one, checked: its array type is the job's template's, where results go)
        self.resumed_acc_dtype = state.acc_dtype
        return jk.Aggregator.from_state(state, backend=self.job.backend, spill_dir=spill_dir)

    @property
    def carries(self) -> bool:
        """The job's rounds hand state to the next one (see ``carry``)."""
        return self.layout is not None and self.algorithm.closes_round

    @property
    def rebases(self) -> bool:
        """Each round folds deltas against the last round's model, which the job keeps (``next_base``): the state of
        an algorithm that does not close its round does not move its base, and every round had folded against the
        template (FedNova's second round was measured from the first model, not the one its parties trained from)."""
        return self.layout is not None and self.algorithm.needs_base and not self.algorithm.closes_round


class JITScheduler:
    """Deadline-aware scheduler of aggregation work over a few aggregator slots.

    Parameters
    ----------
    policy : "eager" | "lazy" | "jit" | "oracle" | Policy
    slots : aggregators that may be deployed at once (slots x kernel threads <= cores)
    clock : RealClock (default; the executor's, if one is given) or VirtualClock; closed with the scheduler unless
        it was given here
    executor : LocalExecutor (default with a real clock), ModelExecutor (default with a virtual clock), or
        RayExecutor (folds on Ray workers; :mod:`scheduler.executors`)
    cost : CostModel (kernel throughput, per-call cost and deployment start-up)
    alpha : the JIT policy's accepted risk of the quorum arriving before the aggregator is ready
    byte_budget : bytes of buffered (admitted, unfolded) updates: past half of it a partial fold is forced early, and
        at the budget ``submit`` raises :class:`Backpressure` (buffered bytes stay within budget + one update)
    overflow : "raise" or "spill" (needs ``state_dir``): at the budget, "raise" refuses the update with
        :class:`Backpressure`; "spill" accepts it, keeps it only on disk (where the state directory writes every
        update anyway) and reads it back when it is folded, as the budget has room, up to half of it at a time
        (counted as buffered; with no room, one update past the budget, one fold at a time)
    decision_log : the latest decisions kept in ``decisions``
    history : the latest round latencies per job (``metrics()``'s percentiles) and occupancy changes kept (None:
        all, as the simulator keeps; a server running for months would grow them without end)
    hysteresis_s : an idle deployment is taken back only for a job whose laxity is this much smaller
    state_dir : a directory that makes the scheduler crash-safe (see :mod:`scheduler.durable`): every acknowledged
        update is persisted (``Ack.durable``), rounds are checkpointed and their results committed there; a new
        scheduler on the same directory resumes each job as ``add_job`` is called for it (or :meth:`recover`).
    checkpoint_bytes : with a state directory, a round's partial aggregate is committed after a fold once this many
        update bytes were folded since the last commit (default: 4x the accumulator's bytes, at least
        :data:`MIN_CHECKPOINT_BYTES`; 0: after every fold). Acknowledged updates are durable either way; checkpoints
        bound what a recovery replays.
    writer_nice : with a state directory, the nice value of its writer thread (Linux; 0: unchanged). On a machine
        whose cores the folds keep busy, the writer's copying and hashing of each update takes a core from
        ``submit``'s callers: at 19, p99 ``submit`` fell from a median of 2.5 ms to 0.7 ms over six runs on 2 vCPUs,
        but a writer starved while it holds the GIL stalled every thread for up to 90 ms, and durable
        acknowledgements wait for a free core. A choice for oversubscribed machines, not a default.
    fold_nice : the nice value of the local executor's threads (its folds and finalizes) and of the OpenMP threads
        their kernels start (Linux; 0: unchanged; numba's tbb and workqueue layers keep one shared pool, which it
        does not reach). Folds are bulk work: at 19 they give a core to ``submit``'s callers, the writer and the
        event loop as soon as those wake. With a state directory on 2 vCPUs that folds keep busy, p99 ``submit``
        over nine runs went from a median of 1.11 ms (0.54-1.81) to 0.69 ms (0.60-1.19); what remains is the GIL,
        which a fold thread at nice 19 may hold while it waits for a core. Not a default: where other busy work
        shares the process's scheduling group (its cgroup, or its session under autogroup: see sched(7); nice values
        weigh threads only within it), folds at nice 19 get a sliver of a core and their deadlines slip; and a fold
        thread that holds the GIL waits behind every busy thread at nice 0 (the writer hashing a large update).
    """

    def __init__(self, policy="jit", slots: int = 1, *, clock=None, executor=None, cost: CostModel | None = None,
                 alpha: float = 0.05, oracle=None, byte_budget: int | None = None, overflow: str = "raise",
                 hysteresis_s: float = 1.0, decision_log: int = 100_000, state_dir=None, checkpoint_bytes=None,
                 crash_hook=None, keep_rounds: int = 16, writer_nice: int = 0, fold_nice: int = 0,
                 history: int | None = 100_000):
        # the arguments first: a refused construction starts no thread and changes no setting
        if overflow not in ("raise", "spill"):
            raise ValueError(f"overflow must be 'raise' or 'spill', got {overflow!r}")
        if overflow == "spill" and state_dir is None:
            raise ValueError("overflow='spill' needs a state_dir (spilled updates live there)")
        for name, v, lo in (("keep_rounds", keep_rounds, 1), ("decision_log", decision_log, 0)):
            if not (_whole(v) and v >= lo):  # (keep_rounds=1.5 kept 1; None and "x" failed as bare TypeErrors)
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        check_nice(writer_nice, "writer_nice")  # (a bad one broke the writer's pool at its first update)
        check_nice(fold_nice, "fold_nice")
        if not (_whole(slots) and 1 <= slots <= MAX_SLOTS):
            raise ValueError(f"slots must be an integer in [1, {MAX_SLOTS}], got {slots!r}")  # (1.5 ran as 1)
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise ValueError(f"history must be None or an integer >= 1, got {history!r}")
        for name, v in (("byte_budget", byte_budget), ("checkpoint_bytes", checkpoint_bytes)):
            if v is not None and not (_whole(v) and v >= 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v!r}")
        if not (_real(hysteresis_s) and math.isfinite(hysteresis_s) and hysteresis_s >= 0):
            raise ValueError(f"hysteresis_s must be a finite number >= 0, got {hysteresis_s!r}")
        self.policy = _policies.make(policy, alpha=alpha, oracle=oracle)
        if isinstance(self.policy, _policies.JIT):
            # its plans run the predictor's compiled code, which numba loads (or compiles) on first use, 0.4-1.8 s
            # here: in the first add_job that was under the scheduler's lock, with round 0's deadline running
            _warm_predictor()
        self.slots = int(slots)
        self.cost = cost or CostModel()
        self.byte_budget = byte_budget
        self.overflow = overflow
        self.spilled = 0  # updates accepted over the budget and kept on disk only
        self.hysteresis_s = hysteresis_s
        self.jobs: dict = {}
        self.free_slots = list(range(self.slots))
        self.deployed: dict = {}  # job id -> its state, for the jobs holding a slot (the victim search reads these)
        self.waiting: dict = {}  # job id -> laxity at request time
        self._searched: dict = {}  # job id -> latest start when it last looked for a deployment to take back
        self._retries: dict = {}  # job id -> timer of its next search, while its quorum is in and it waits
        self.decisions: deque = deque(maxlen=decision_log)
        self._lock = threading.RLock()
        # a read-back with no room in the budget may go past it by one update, one fold at a time (see
        # _reserve_read_back); the others wait for room or for it
        self._read_back_room = threading.Condition(self._lock)
        self._overdraft = False
        self._closed = False
        self._unresolved: list = []  # (round future, result, error) to resolve once the lock is let go: _settling
        self._commits: list = []  # state-directory commits of rounds' ends, made once the lock is let go: _settling
        # of them, those being made now, by thread (close() waits for other threads' before the directory closes;
        # its own thread's, a crash hook's close() inside one, it cannot wait for)
        self._committing = collections.Counter()
        self._committed = threading.Condition(self._lock)
        self._opening: list = []  # (job state, round) to open once they are resolved
        self._ids = itertools.count()  # jobs in the order they were added (_JobState.seq)
        self._removing: dict = {}  # job id -> a removed job whose running task has not ended yet
        self.buffered_bytes = 0
        self.peak_buffered_bytes = 0
        self._relieving = False
        self.keep_rounds = int(keep_rounds)
        self.checkpoint_bytes = checkpoint_bytes
        # a scheduler handed an executor runs on the executor's clock (both must be one event loop), and closes it
        # unless it was handed the clock too: RayExecutor(RealClock(), ...) inline left a clock thread per scheduler
        missing = [m for m in ("now", "call_at") if not callable(getattr(clock, m, None))]
        if clock is not None and (missing or isinstance(clock, type)):  # (clock="x" failed later on 'str' object
            # has no attribute 'now'; the class VirtualClock, on now() missing 'self', holding the state directory)
            got = f"the class {clock.__name__}" if isinstance(clock, type) else \
                f"{type(clock).__name__} without {missing[0]}()"
            raise TypeError(f"clock must be a clock (scheduler.RealClock(), VirtualClock(): now() and call_at()), "
                            f"got {got}")
        self.clock = clock if clock is not None else executor.clock if executor is not None else RealClock()
        self._own_clock = clock is None  # closed with the scheduler (as a given executor is)
        self.executor = self.store = None
        own_executor = executor is None
        self.history = history
        try:  # the state directory may be locked by another scheduler: what was started here is stopped again
            # (time, deployed aggregators) at changes; first: a clock whose now() fails holds nothing yet
            self.occupancy = deque([(self.clock.now(), 0)], maxlen=history)
            if own_executor:
                executor = LocalExecutor(self.clock, self.slots, nice=fold_nice) \
                    if isinstance(self.clock, RealClock) else ModelExecutor(self.clock)
            self.executor = executor
            self.store = None if state_dir is None else StateDir(state_dir, crash_hook=crash_hook,
                                                                 keep_results=self.keep_rounds,
                                                                 writer_nice=writer_nice)
        except BaseException:  # what was made here is stopped; what the caller gave stays theirs
            if own_executor and self.executor is not None:
                self.executor.close()
            if clock is None and own_executor:
                self.clock.close()
            raise

    @classmethod
    def recover(cls, state_dir, jobs, **kwargs) -> "JITScheduler":
        """A scheduler resumed from ``state_dir``: each job continues from its last committed generation, with the
        acknowledged updates that generation does not cover replayed (the results of finished rounds resolve
        their futures). ``jobs`` are the same :class:`Job` definitions (templates are code, not state); a job of the
        directory may be added later as well."""
        if state_dir is None:  # (it returned a scheduler that had recovered nothing and would persist nothing)
            raise ValueError("recover needs the state_dir the crashed scheduler wrote")
        sched = cls(state_dir=state_dir, **kwargs)
        try:
            for job in jobs:
                sched.add_job(job)
        except BaseException:  # (e.g. a job whose template changed): the directory is let go, for a retry
            sched.close()
            raise
        return sched

    # --- public API ----------------------------------------------------------------------------------------------
    def add_job(self, job: Job) -> None:
        if not isinstance(job, Job):
            raise TypeError(f"add_job takes a Job, got {type(job).__name__}")
        job.check()
        with self._settling():  # (a resumed job's finished rounds resolve their futures)
            if self._closed:
                raise SchedulerClosed(f"job {job.id!r}: the scheduler is closed; job not added (its rounds would "
                                      "never resolve)")
            if job.id in self.jobs:
                raise InvalidJob(f"job {job.id!r} already added")
            if job.id in self._removing:  # (its task would still write to the state directory as the job's)
                raise InvalidJob(f"job {job.id!r} was removed, and a fold or finalize of it is still running: add it "
                                 "again once that ends")
            if self.store is not None and job.template is not None:
                try:
                    self.store.check_ids(job.id, job.parties)
                except ValueError as e:
                    raise InvalidJob(str(e)) from None
            pred = Predictor(prior_s=job.prior_response_s)
            js = _JobState(job, pred, self.clock.now())
            js.seq = next(self._ids)  # (the slot search meets the deployed jobs in this order)
            try:
                js.algorithm  # (an unknown name, or bad arguments: refused here, as the aggregator's refusals below)
            except (ValueError, TypeError, jk.AggregationError) as e:
                raise InvalidJob(f"job {job.id!r}: {e}") from None
            if self.byte_budget is not None and self.overflow == "raise" and js.update_bytes > self.byte_budget:
                raise InvalidJob(f"job {job.id!r}: its updates ({js.update_bytes} bytes) do not fit the byte budget "
                                 f"of {self.byte_budget}: with overflow='raise' every one would be refused")
            unweighted = not getattr(js.algorithm, "uses_weights", True) or not getattr(js.algorithm, "weighted", True)
            if job.late == "next_round" and job.late_weight < 1 and unweighted:
                raise InvalidJob(f"job {job.id!r}: {js.algorithm!r} does not weigh updates, so a late update carried "
                                 f"to the next round would count as a fresh one, not at late_weight "
                                 f"{job.late_weight}: late='reject', or late_weight=1.0")
            if js.layout is not None and js.algorithm.needs_base and job.late == "next_round":
                # (a late update was trained from the round before's model; server optimizers and DP move theirs too)
                raise InvalidJob(f"job {job.id!r}: {type(js.algorithm).__name__} folds each round against the last "
                                 "round's model, and a late update carried to the next round would be measured "
                                 "against the wrong one: late='reject'")
            js.metrics.latencies = deque(maxlen=self.history)
            if js.layout is not None:  # built before anything is committed: a job whose aggregator refuses it
                # (FedMedian in deterministic mode, a backend not here) is InvalidJob, and leaves no entry whose
                # open time a corrected job would inherit (its round 0's deadline ran from the refusal)
                try:
                    first = js.new_aggregator()
                except (ValueError, TypeError, jk.AggregationError) as e:
                    raise InvalidJob(f"job {job.id!r}: {e}") from None
                meta = self.store.jobs.get(job.id, {}) if self.store is not None else {}
                if meta.get("removed") or not meta.keys() & {"results", "state", "carry"}:
                    js.spare = first  # its first round's (from the template; a resumed job starts from its files)
                del first
            if self.store is not None and js.layout is not None:  # (after every check: a refused job commits nothing)
                # new here (or removed before under its id: it starts afresh): its entry, with the time its first
                # round opens (deadlines outlive a restart)
                try:
                    js.restarted = not self.store.commit_new(job.id, job.first_round, self._wall())
                except ValueError as e:  # (acknowledged updates of a run that began at another first round)
                    raise InvalidJob(str(e)) from None
            self.jobs[job.id] = js
            self._log("add_job", js, quorum=job.quorum_count(), parties=len(job.parties))
            try:
                if self.store is not None and js.layout is not None:
                    self._resume(js)
                    self.store.forget_unnamed_result(job.id)  # (not served: the round folds again)
                else:
                    self._open_round(js, job.first_round)
            except BaseException as e:  # not added (a resumed job's files stay as they are)
                refused = type(e).__name__
                del self.jobs[job.id]
                # nor left running: a replayed update refused after its round had opened (a job added again with a
                # lower quorum) left that round's timers and slot to a job no longer listed, which went on
                # committing rounds in the directory (one of them from part of the acknowledged updates)
                self._forget(js, lambda rnd: SchedulerError(f"job {job.id!r} round {rnd.number}: add_job was "
                                                            f"refused ({refused})"), "add_job refused")
                raise

    def submit(self, job_id: str, round: int, party, update=None, weight: float = 1.0, update_id=None, *,
               copy: bool = False, **info) -> Ack:
        """Admit (validate) an update here, in the caller's thread, and hand it to the scheduler. Returns at once:
        folding happens later, on an aggregator slot; with a state directory, ``Ack.durable`` resolves once the
        update is on disk. Bad updates raise their typed error here. A resend of an acknowledged update with the
        same ``update_id`` is acknowledged again (``duplicate=True``, with the round that counts it: for a late
        update, the one it was carried to) and not counted twice; another update from the same party for the same
        round raises :class:`~jitkernels.DuplicateParty`. ``party``: one of the job's (numpy integers as ints);
        ``update_id``: None, a str or an int (TypeError else: it is stored with the update, as JSON). ``info``: the
        per-update values the job's algorithm reads (``steps=`` for FedNova, ``staleness=`` for FedBuff), checked
        here and persisted with the update.

        The scheduler holds the update's arrays as they are (no copy) until its round's future resolves (and, with
        a state directory, until ``Ack.durable`` resolves): a caller that reuses its receive buffers before then
        passes ``copy=True``, which copies them once, here."""
        js = self._job(job_id)
        round = _round_number(job_id, round)
        party = self._party(js, party)
        update_id = _update_id(update_id)
        # a float from here on: a weight float() cannot take (a one-element 2-D array, which admission accepts)
        # raised after the round had counted the update, and the round waited for an arrival that never came
        weight = jk.check_weight(weight, party)
        with self._lock:
            if self._closed:
                raise SchedulerClosed(f"job {job_id!r}: the scheduler is closed; update from {party!r} for round "
                                      f"{round} not taken")
            self._check_live(js)
            counted = self._counted_round(js, round, party, update_id)
            if counted is None:
                rewrite = False
            else:
                ack = self._duplicate(js, counted, party)
                rewrite = (self.store is not None and js.layout is not None and ack.durable.done()
                           and ack.durable.exception() is not None)
                if not rewrite:
                    return ack
                # (read under the lock: other threads add and forget rounds, and a walk of them raised "dictionary
                # changed size during iteration")
                held = js.rounds.get(counted)
                carried = counted != round or (held is not None and party in held.carried)
                origin = next((n for n, r in js.rounds.items() if r.carried_out.get(party) == counted), None)
        if rewrite:  # the original's write failed (e.g. a full disk): the resend is written again, where it counts
            item = js.admit(update, weight, party, js.algorithm.check_info(info, party), copy=copy)
            # (carried: at the late weight, as it was taken, whichever round the resend names)
            late = js.job.late_weight if carried else 1.0
            durable = self._persist(js, counted, party, update_id, float(weight) * late, item, origin)
            with self._lock:
                if counted in js.rounds:  # (a round forgotten meanwhile holds no futures)
                    js.rounds[counted].durable[party] = durable
            return Ack(job_id, counted, party, True, durable, duplicate=True)
        return self._submit(js, round, party, update, weight, update_id, persist=True, info=info, copy=copy)

    @staticmethod
    def _party(js, party):
        """``party`` as the job lists its parties (numpy integers as ints: one reached the state directory's JSON,
        and its update never became durable), else :class:`UnknownParty`."""
        try:
            party = jk.parties.check_party(party)
        except jk.InvalidParty as e:
            raise UnknownParty(f"job {js.job.id!r}: party {party!r} is not one of the job's parties ({e})") from None
        if party not in js.predictor.parties and party not in js.job.parties:
            raise UnknownParty(f"job {js.job.id!r}: party {party!r} is not one of the job's parties")
        return party

    @staticmethod
    def _carried_into(js, number: int) -> dict:
        """{party: the round its late update was sent for} of the late updates that count in round ``number``
        (under the lock)."""
        return {p: n for n, r in js.rounds.items() for p, to in r.carried_out.items() if to == number}

    @staticmethod
    def _counted_round(js, round, party, update_id) -> int | None:
        """The round that counts the update ``update_id`` of ``party`` sent for ``round``, if it was acknowledged
        before, else None: that round or, for a late update carried on (late="next_round"), one of the full rounds
        after it, up to the first with room (the rounds it was carried past stay full), starting from the one that
        round's ``carried_out`` names if it names one. Checking only the round a resend ended on counted it again
        once the round it had been carried to filled up; walking full rounds only, again once a restart reopened the
        round it was sent for with room (its lowered partial quorum, or a member whose write had failed, not on
        disk). What ``js.seen`` holds is restored at a restart (results, failures, checkpoints, replayed files), so
        a resend after one is recognized too."""
        if update_id is None:
            return None
        sent_for = js.rounds.get(round)
        if sent_for is not None and party in sent_for.carried_out:  # (that round's only: a later one's names where
            round = sent_for.carried_out[party]  # the party's update for that later round went)
        while js.seen.get(round, _NO_IDS).get(party) != update_id:
            rnd = js.rounds.get(round)
            if js.job.late != "next_round" or rnd is None or not (rnd.done or rnd.admitted >= rnd.quorum):
                return None
            round += 1
        return round

    def _persist(self, js, round, party, update_id, weight, item, carried_from=None) -> Future:
        """Hand an acknowledged update to the state directory's writer (SchedulerClosed if close() came after the
        caller's check: the writer is shut down). ``carried_from``: the round a late update was sent for (a restart
        then still refuses a second update for that round)."""
        try:
            return self.store.persist_update(js.job.id, round, party, update_id, float(weight), item.leaves,
                                             js.layout.fingerprint, item.info, carried_from,
                                             live=js.live)
        except Exception as e:
            if self._closed and isinstance(e, RuntimeError):
                raise SchedulerClosed(f"job {js.job.id!r}: the scheduler closed while it took the update from "
                                      f"{party!r} for round {round}; not taken") from None
            # a writer that cannot take it (a broken pool): the update is counted already, and its round folds it
            # from memory; its durable future says it is not on disk (it raised here, after the round had counted
            # it: the arrival never came and the round waited for ever), and a resend writes it again
            log.error("job %r round %d: the update of %r could not be handed to the writer: %s", js.job.id, round,
                      party, e)
            failed = Future()
            failed.set_exception(e)
            return failed

    def _duplicate(self, js, round, party) -> Ack:
        """The Ack of a resend: the original's durable future (a failed write shows as failed: resend to retry it),
        or DURABLE for an update recovered from disk."""
        rnd = js.rounds.get(round)
        durable = rnd.durable.get(party, DURABLE) if rnd is not None else DURABLE
        return Ack(js.job.id, round, party, True, durable, duplicate=True)

    def _submit(self, js, round, party, update, weight, update_id, persist, stored=False, info=None,
                copy=False) -> Ack:
        """``stored``: an update replayed from its file after a restart (``update`` is None): it takes no memory
        and no budget, and is read back (and admitted again) when it is folded, as a spilled one is."""
        job_id = js.job.id
        acked_round = round
        info = js.algorithm.check_info(info or {}, party)
        if stored:
            item, nbytes = None, 0
        elif js.layout is not None:
            item = js.admit(update, weight, party, info, copy=copy)
            nbytes = item.nbytes
        else:
            item, nbytes = None, js.update_bytes
        with self._lock:
            if self._closed:  # (submit checked before admitting; close() may have come meanwhile)
                raise SchedulerClosed(f"job {job_id!r}: the scheduler is closed; update from {party!r} for round "
                                      f"{round} not taken")
            self._check_live(js)  # (and remove_job)
            counted = self._counted_round(js, round, party, update_id)  # (again: a resend may have raced this one)
            if counted is not None:
                return self._duplicate(js, counted, party)
            if party in js.seen.get(round, _NO_IDS):
                raise jk.DuplicateParty(party, f"job {job_id!r} round {round}")
            if round not in js.rounds:  # a round the job has not got is that, whether it is over or not
                self._check_round(js, round)
            open_no = None if js.open is None else js.open.number if js.opening is None else js.opening
            if open_no is None or (round < open_no and round not in js.rounds):
                raise LateUpdate(f"job {job_id!r} round {round}: " + (
                    "the job has finished" if open_no is None else f"the round is over (round {open_no} "
                    f"is open)") + f"; update from {party!r} not taken")
            rnd = self._round(js, round)
            if party in rnd.carried_out:  # a second update for a round it answered late: not carried again (once the
                # round the first went to had filled, the second went on to the next, and counted too), nor taken
                # into the round itself where a restart reopened it with room
                raise jk.DuplicateParty(party, f"job {job_id!r} round {round} (its late update for it counts in "
                                               f"round {rnd.carried_out[party]})")
            late_from = None  # the round a late update was sent for (late rule 'next_round': it counts in a later one)
            if rnd.done or rnd.admitted >= rnd.quorum:  # membership is fixed: the first q acknowledged updates
                late_from = rnd
                if js.job.late == "reject":
                    self._observe_late(js, rnd, party)
                    raise LateUpdate(f"job {job_id!r} round {round} is closed (its quorum is in, or it ended); "
                                     f"update from {party!r} rejected (late rule 'reject')")
                if round < open_no - 1:  # over: only the open round's and the one before's are carried (a
                    # rule that does not hang on keep_rounds: a round let go refused what one still held carried)
                    self._observe_late(js, rnd, party)
                    raise LateUpdate(f"job {job_id!r} round {round} is over (round {open_no} is open, and late "
                                     f"updates are carried from the round before it at most); update from {party!r} "
                                     "not taken")
                while rnd.done or rnd.admitted >= rnd.quorum:  # late rule 'next_round': the next round with room
                    round += 1
                    if js.job.after_last(round):
                        self._observe_late(js, late_from, party)
                        raise LateUpdate(f"job {job_id!r} round {round - 1} is closed and it is the job's last; "
                                         f"update from {party!r} not taken (no round to carry it to)")
                    rnd = self._round(js, round)
                if party in js.seen.get(round, _NO_IDS):
                    raise jk.DuplicateParty(party, f"job {job_id!r} round {round} (a late update carried over from "
                                                   f"round {late_from.number})")
                weight = float(weight) * js.job.late_weight
            spill = stored
            # updates for a round not open yet cannot be folded before it opens: they may fill half the budget, so
            # that the open round's updates still find room (they had filled it, and the open round starved)
            early = open_no is not None and round > open_no
            # an update is taken in memory only within the budget (not merely while it has room left: with updates
            # of several sizes that, and one fold's read-back past it, made the budget plus two updates)
            limit = None if self.byte_budget is None else self.byte_budget // 2 if early else self.byte_budget
            if not stored and limit is not None and self.buffered_bytes + nbytes > limit:
                if not self._relieving:
                    self._relieving = True
                    self.clock.call_soon_threadsafe(self._relieve_pressure)
                if self.overflow == "raise" or item is None:
                    why = (f"its {nbytes} bytes are more than the whole budget of {self.byte_budget}: no fold makes "
                           "room for it (the job's update_bytes, which add_job checked, is below its real size; a "
                           "larger byte_budget, or overflow='spill')" if nbytes > self.byte_budget else
                           f"round {round} is not open yet, and updates for later rounds may take half the budget "
                           f"of {self.byte_budget} bytes ({self.buffered_bytes} are buffered); retry "
                           f"once it opens" if early else f"{self.buffered_bytes} bytes are buffered; its {nbytes} "
                           f"would pass the budget of {self.byte_budget}; retry once the forced fold has drained them")
                    raise Backpressure(f"job {job_id!r} round {acked_round}: update from {party!r} not taken: {why}")
                spill = True
            if late_from is not None:  # taken: the predictor learns its answer (once), and it counts in ``round``
                self._observe_late(js, late_from, party)
                rnd.take_carried(party)
                late_from.carried_out[party] = round
                self._log("late_to_next_round", js, round=late_from.number, to=round, party=party)
            if early:  # sent before its round began: no response time, whenever its arrival is taken (it read as 0 s
                rnd.unobserved.add(party)  # when the round opened before its arrival came through)
            js.seen.setdefault(round, {})[party] = update_id
            rnd.admitted += 1
            rnd.acked.add(party)
            if not spill:
                self._buffered(js, nbytes)  # reserved now so that a burst sees its own bytes
            elif not stored:
                self.spilled += 1
            if spill:  # held from before its file exists until it is folded or dropped (under the lock: remove_job
                self.store.hold(job_id, round, party)  # lets holds go)
            writes = persist and self.store is not None and item is not None
            if writes:  # the round knows its durable future from the moment it counts the update: a resend racing
                rnd.durable[party] = durable = Future()  # this submit got DURABLE, "on disk", before the write
            else:
                durable = DURABLE  # nothing to persist (no state directory), or already on disk (a replay)
        if writes:
            try:
                written = self._persist(js, round, party, update_id, weight, item,
                                        None if late_from is None else late_from.number)
            except BaseException as e:  # (closed meanwhile: a resend that raced it waits on this future)
                durable.set_exception(e)
                raise
            _relay(written, durable)
        if spill:  # once written, only the file holds it (the writer thread lets the arrays go then)
            item, nbytes = _Spilled(round, party, float(weight), durable, info, item), 0
            if item.item is not None:
                durable.add_done_callback(functools.partial(_written, item))
        self.clock.call_soon_threadsafe(self._on_arrival, js, round, party, item, nbytes, float(weight))
        return Ack(job_id, round, party, True, durable)

    def result(self, job_id: str, round: int) -> Future:
        """The future model of a round (resolves when it is finalized, or with its error). At least the last
        ``keep_rounds`` finished rounds are held (up to twice as many: older ones go in batches); one let go raises
        :class:`RoundForgotten` (with a state directory, the directory keeps the last ``keep_rounds``)."""
        with self._lock:
            js = self._job(job_id)
            round = _round_number(job_id, round)
            if round < js.job.first_round:  # (never a round: NoSuchRound, not RoundForgotten once rounds went)
                self._check_round(js, round)
            if js.forgotten is not None and round <= js.forgotten and round not in js.rounds:
                raise RoundForgotten(f"job {job_id!r} round {round}: finished, and no longer held (the scheduler "
                                     f"keeps the last {self.keep_rounds} rounds' results: keep_rounds)")
            if round not in js.rounds:
                self._check_round(js, round)
                if self._closed:  # (a round made now would never resolve: close() settled the ones it held)
                    fut = _round_future()
                    fut.set_exception(SchedulerClosed(f"job {job_id!r} round {round}: the scheduler is closed"))
                    return fut
            return self._round(js, round).future

    def drop_party(self, job_id: str, party) -> None:
        """A party left the job: it is no longer expected (a round may become unreachable). A party that is not one
        of the job's raises :class:`UnknownParty`; one dropped already is left as it is."""
        js = self._job(job_id)
        party = self._party(js, party)
        with self._lock:
            if self._closed:
                raise SchedulerClosed(f"job {job_id!r}: the scheduler is closed; party {party!r} not dropped")
            self._check_live(js)  # (removed meanwhile: its drop went into the entry of a job re-added under its id)
            durable = party in js.expected and self.store is not None and js.layout is not None
            if durable:  # (close() waits for it)
                self._committing[threading.get_ident()] += 1
        if durable:  # first, a failed commit changing nothing; outside the lock, whose fsync stalled every submit
            try:  # (of every job, 25-80 ms behind a checkpoint) while a party left
                self.store.commit_dropped(job_id, party, live=js.live)
            finally:
                self._commits_done(1)
        with self._lock:
            self._check_live(js)  # (removed while its drop was committed: nothing was)
            if party in js.expected:
                js.drop_expected(party)
            if not self._closed:
                self.clock.call_soon_threadsafe(self._check_reachable, js)

    def metrics(self) -> dict:
        with self._lock:
            return {jid: self._job_metrics(js) for jid, js in self.jobs.items()}

    def _job_metrics(self, js) -> dict:
        m = js.metrics.summary()
        if js.deployment is not None:  # count the open deployment up to now
            m["deployed_s"] += self.clock.now() - js.deployment.start
            m["idle_s"] = m["deployed_s"] - m["busy_s"]
        return m

    def finish_job(self, job_id: str) -> None:
        """The job's deployment is no longer kept between rounds: released now if idle, and after each round from
        then on (eager's too). The job itself goes on: its rounds still take updates and resolve (a job ends after
        its ``rounds``, or once its parties cannot meet its quorum)."""
        with self._lock:
            js = self._job(job_id)
            js.finished = True
            # only a deployment with nothing to do: one starting up for a round whose quorum is in, released, left
            # the round without an aggregator and nothing to plan one again (it hung); the round's end releases it
            dep, rnd = js.deployment, js.open
            if dep is not None and dep.ready and not dep.busy and (
                    rnd is None or rnd.done or (not rnd.pending and rnd.quorum_time is None)):
                self._release(js, "job finished")

    def remove_job(self, job_id) -> dict:
        """Forget a job, finished or abandoned, and all the scheduler holds for it: rounds still open (and rounds
        updates were sent ahead for) resolve with :class:`JobRemoved` and their buffered updates go; its deployment
        is released (a fold or finalize running now ends first, without effect); the results it holds go (later
        calls naming it raise :class:`UnknownJob`). With a state directory the job leaves the manifest and its files
        are deleted: a restart does not resume it, and a job added again under its id starts afresh. Returns the
        job's last metrics (as :meth:`metrics` gave them)."""
        with self._lock:
            if self._closed:
                raise SchedulerClosed(f"job {job_id!r}: the scheduler is closed; nothing removed")
            js = self._job(job_id)
            if js.removing:
                raise UnknownJob(f"no job {job_id!r} (another call is removing it)")
            js.removing = True
            durable = self.store is not None and js.layout is not None
            if durable:  # (close() waits for it)
                self._committing[threading.get_ident()] += 1
        interrupted = None
        if durable:
            # first, outside the lock (its fsyncs stalled every submit of every job, as drop_party's did): a failed
            # commit leaves the job as it was; once it is made, the job's writes still queued and its commits are
            # skipped (tombstoned: live() is False), and what it wrote before is deleted with the rest. A round that
            # ends meanwhile ends as it would have before the call
            try:
                self.store.remove_job(js.job.id, decided=lambda: setattr(js, "tombstoned", True))
            except BaseException as e:
                if not js.tombstoned:  # nothing committed: the job goes on as it was
                    with self._lock:
                        js.removing = False
                    raise
                # committed, then the deletion could not be queued (the writer refused it: interpreter shutdown):
                # removed all the same (its files go at the directory's next open), or it would take updates that
                # are never written, for a job that a restart drops
                log.warning("job %r removed, but the deletion of its files was not queued (%r)", js.job.id, e)
                if not isinstance(e, Exception):  # (KeyboardInterrupt, SystemExit: raised once the job is removed)
                    interrupted = e
            finally:
                self._commits_done(1)
        with self._settling():
            final = self._job_metrics(js)
            del self.jobs[js.job.id]
            self._forget(js, lambda rnd: JobRemoved(f"job {js.job.id!r} round {rnd.number}: the job was removed "
                                                    "before the round finished"), "job removed")
            if durable:  # (a spilled submit's hold taken before the tombstone, after the writer let holds go)
                self.store.drop_holds(js.job.id)
            self._log("remove_job", js)
        if interrupted is not None:
            raise interrupted
        return final

    def _forget(self, js, error, why: str) -> None:
        """Let go of all the scheduler holds for ``js``, out of ``self.jobs`` now (under the lock; the state
        directory is the caller's): rounds still open resolve with ``error(round)``, its timers, queue place,
        pending updates and buffered bytes go, and its deployment is released (once a task running on it ends)."""
        js.removed = True
        self._leave_queue(js)
        for rnd in js.rounds.values():
            if not rnd.done:
                rnd.done = True
                self._resolve(rnd, error=error(rnd))
            for timer in (rnd.timer, rnd.deadline_timer):
                if timer is not None:
                    timer.cancel()
            self._drop_pending(js, rnd)
        # what else it holds (arrivals still queued, a fold in progress) goes with the job: nothing moves the counts
        # once it is removed
        self.buffered_bytes -= js.buffered_bytes
        js.buffered_bytes = 0
        js.open = js.opening = js.spare = js.carry = js.next_base = None
        js.rounds = {}
        if js.deployment is not None and js.deployment.busy:
            self._removing[js.job.id] = js  # released when its task ends (_done)
        elif js.deployment is not None:
            self._release(js, why)

    def close(self) -> None:
        """Stop: release the deployments, end the executor, clock and state directory. Rounds still open resolve
        with :class:`SchedulerClosed` (nobody waits forever on them), and later submits raise it. Work that was
        running ends without effect on the closed scheduler, except that a finalize whose result was being written
        to the state directory completes the write (as if the process had stopped right after it): a scheduler
        resumed there returns that round's result."""
        try:
            with self._settling():
                self._closed = True
                self.waiting.clear()  # a slot freed below goes to nobody
                for timer in self._retries.values():
                    timer.cancel()
                self._retries.clear()
                for js in self.jobs.values():
                    for rnd in js.rounds.values():
                        if not rnd.done:  # (a done round's future is resolved, or about to be)
                            rnd.done = True
                            self._resolve(rnd, error=SchedulerClosed(
                                f"job {js.job.id!r} round {rnd.number}: the scheduler was closed before the round "
                                "finished"))
                        self._drop_pending(js, rnd)
                    js.buffered_bytes = 0  # (arrivals still queued on the clock, and running folds: no effect)
                    if js.deployment is not None:
                        self._release(js, "scheduler closed")
                for js in self._removing.values():  # (removed while a task ran on its slot: that task's end, after
                    if js.deployment is not None:  # close, returned nothing, and the slot stayed counted as held)
                        self._release(js, "scheduler closed")
                self._removing.clear()
                self.buffered_bytes = 0
        finally:  # a done-callback that raised (KeyboardInterrupt) while its future resolved: stop all the same
            with contextlib.ExitStack() as steps:  # (each step runs whatever the one before raised: the state
                # directory's lock was held for the process's life after an executor that failed to close)
                if self.store is not None:
                    steps.callback(self.store.close)
                    steps.callback(self._wait_commits)  # (before the directory closes: a round's failure, decided
                    # before close, was lost to a closed directory on a clock the caller owns)
                if self._own_clock and hasattr(self.clock, "close"):  # (a VirtualClock has no thread to stop)
                    steps.callback(self.clock.close)
                steps.callback(self._let_go)
                self.executor.close()

    def _commits_done(self, n: int) -> None:
        """This thread's ``n`` commits outside the lock, counted in ``_committing`` under it when they were decided,
        are made (or failed): close() may go on (:meth:`_wait_commits`)."""
        me = threading.get_ident()
        with self._lock:
            self._committing[me] -= n
            if not self._committing[me]:
                del self._committing[me]
            self._committed.notify_all()

    def _wait_commits(self) -> None:
        """Wait until no other thread makes a deferred commit (:meth:`_commit_later`). (This thread's own, where
        close() is called from inside one, cannot end before close() returns: a crash hook's close() hung.)"""
        me = threading.get_ident()
        with self._lock:
            self._committed.wait_for(lambda: not any(n for t, n in self._committing.items() if t != me))

    def _let_go(self) -> None:
        """Once closed, with no task running: the rounds' aggregators (a robust rule's slab, perhaps a spill file),
        spares, carries and bases go; a closed scheduler kept for its metrics or decisions held them all."""
        with self._lock:  # (a remove_job whose removal was committed before close forgets its job after it)
            jobs = list(self.jobs.values())
        for js in jobs:
            for rnd in js.rounds.values():
                rnd.aggregator = None
            js.spare = js.carry = js.next_base = None

    # --- cost ---------------------------------------------------------------------------------------------------
    def work_estimate(self, js: _JobState, rnd: _Round) -> float:
        """Seconds of work left for a round: fold what is not folded yet (in one batch), then finalize."""
        remaining = max(rnd.quorum - rnd.folded, 0)
        priced = self._priced(js)
        return (self.cost.fold_s(remaining * js.update_bytes, remaining, js.model_elems, **priced)
                + self.cost.finalize_s(js.model_elems, **priced))

    def _priced(self, js) -> dict:
        """The job's own cost-model entry and accumulator bytes where they differ from the model's defaults: a GPU
        job's host updates pay the bus, a deterministic job moves 16 bytes per element (both were priced as the
        scheduler-wide backend's float32 job, and JIT deployed them late)."""
        out = {}
        gpu = js.job.backend == "cupy" or js.job.backend == "auto" and js.layout is not None and \
            js.layout.in_gpu_memory  # (as the job's aggregator picks its backend)
        if gpu and "cupy" in self.cost.backends:
            out["backend"] = "cupy"
        if js.job.deterministic or js.acc_dtype != "float32":
            out["acc_itemsize"] = 16 if js.job.deterministic else np.dtype(js.acc_dtype).itemsize
        return out

    # --- internals: rounds ----------------------------------------------------------------------------------------
    def _job(self, job_id) -> _JobState:
        try:
            return self.jobs[job_id]
        except (KeyError, TypeError):  # (an unhashable id is no job's either)
            raise UnknownJob(f"no job {job_id!r}") from None

    def _wall(self) -> float | None:
        """The clock's time that outlives a restart (None for a clock without one, or one that gave no finite
        number: the manifest would not verify)."""
        wall = getattr(self.clock, "wall", None)
        t = None if wall is None else wall()
        return float(t) if _real(t) and math.isfinite(t) else None

    @staticmethod
    def _check_live(js) -> None:
        """UnknownJob for a job removed since the caller looked it up (under the lock), or whose removal is committed
        (remove_job forgets it next: an update taken then was acknowledged and never written)."""
        if not js.live():
            raise UnknownJob(f"no job {js.job.id!r} (it was removed)")

    @contextlib.contextmanager
    def _settling(self):
        """The scheduler's lock, for work that may end rounds (never entered with the lock held). The futures of
        the rounds it ends (:meth:`_resolve`) are resolved once the lock is let go, and only then do their next
        rounds open. Done-callbacks are the caller's code: under the lock, a slow one stalled every submit, and one
        that called close() deadlocked (close waits for the fold threads, which waited for the lock). They still run
        before the next round opens, as they did (the simulator draws that round's arrivals there, for the oracle
        to plan it with)."""
        try:
            with self._lock:
                yield
        finally:
            with self._lock:
                ready, self._unresolved = self._unresolved, []
                opening, self._opening = self._opening, []
                commits, self._commits = self._commits, []
                self._committing[threading.get_ident()] += len(commits)
            try:
                for make in commits:  # (the rounds' ends on disk before their futures resolve, as under the lock)
                    make()
            finally:
                self._commits_done(len(commits))
            interrupted = None  # (a callback's BaseException, re-raised once every future and round is settled)
            for fut, result, error in ready:
                try:
                    if error is None:
                        fut.set_result(result)
                    else:
                        fut.set_exception(error)
                except BaseException as e:
                    interrupted = interrupted or e
            if opening:
                with self._lock:
                    for js, number in opening:
                        # (a done-callback may have closed the scheduler, or removed the job)
                        if not self._closed and not js.removed:
                            self._open_next(js, number)
            if interrupted is not None:
                raise interrupted

    def _resolve(self, rnd, result=None, error=None) -> None:
        """Resolve ``rnd``'s future with ``result`` or ``error`` when the lock is let go (see :meth:`_settling`)."""
        self._unresolved.append((rnd.future, result, error))

    def _check_round(self, js: _JobState, number: int) -> None:
        job = js.job
        if number < job.first_round or job.after_last(number):
            last = "" if job.rounds is None else f" to {job.first_round + job.rounds - 1}"
            raise NoSuchRound(f"job {job.id!r} has no round {number} (its rounds: {job.first_round}{last})")
        if js.ended is not None and js.open is None:  # (its parties fell below its quorum for good, or its model tore)
            raise NoSuchRound(f"job {job.id!r} has ended: {js.ended}; no round {number}")
        if job.rounds is None and js.open is not None and number > js.open.number + self.keep_rounds:
            raise NoSuchRound(f"job {job.id!r} round {number} is more than keep_rounds = {self.keep_rounds} ahead of "
                              f"the open round {js.open.number}")

    def _round(self, js: _JobState, number: int) -> _Round:
        rnd = js.rounds.get(number)
        if rnd is None:  # a future round: its start is set when it opens
            rnd = js.rounds[number] = _Round(number, math.nan, js.job.quorum_count())
        return rnd

    def _open_next(self, js: _JobState, number: int) -> None:
        """Open round ``number`` of a job whose last round ended (under the lock). A round whose aggregator cannot be
        made now (a robust rule's k-update slab, say, with memory short: MemoryError) is tried again a start-up
        later: it stays the job's opening round meanwhile, so its updates are taken as early ones, and the other
        jobs' rounds open as they would. (The error went out of the thread that ended the last round, a fold's or a
        submitter's, and the jobs whose rounds were to open after it in the same batch never opened theirs.)"""
        try:
            self._open_round(js, number)
        except Exception as e:
            if js.opening != number:  # it opened: what failed came after (its plan), and no retry can open it again
                log.exception("job %r: round %d opened, then failed", js.job.id, number)
                return
            retry = max(1.0, self.cost.startup_s)
            log.error("job %r: round %d could not open (%r); trying again in %.3g s", js.job.id, number, e, retry)
            self._log("open_failed", js, round=number, error=repr(e), retry_s=retry)
            self.clock.call_at(self.clock.now() + retry, self._retry_open, js, number)

    def _retry_open(self, js: _JobState, number: int) -> None:
        with self._settling():
            if not self._closed and js.opening == number and self.jobs.get(js.job.id) is js:
                self._open_next(js, number)

    def _open_round(self, js: _JobState, number: int, start: float | None = None,
                    opened: float | None = None) -> None:
        """``start``: the time the round opened before a restart (its deadline and response times run from it), at
        wall time ``opened``."""
        now = self.clock.now()
        rnd = self._round(js, number)
        agg = None
        if js.layout is not None:  # first, as it may fail: the round is not open until it has its aggregator
            if js.carry is not None:  # the next round of a closed one: same model, moments and counters
                js.carry.reset(reuse=True)  # (before it is taken: a retry after a failure here must still have it)
                agg, js.carry = js.carry, None
            elif js.spare is not None:  # last round's accumulator, zeroed: a fresh one costs first-touch page faults
                agg, js.spare = js.spare, None
            else:
                agg = js.new_aggregator()
        rnd.start, rnd.aggregator = now if start is None else min(start, now), agg
        rnd.opened_wall = self._wall() if start is None else opened
        js.open, js.opening = rnd, None
        if js.job.deadline_s is not None:  # (one that passed while the scheduler was down fires at once)
            rnd.deadline_timer = self.clock.call_at(rnd.start + js.job.deadline_s, self._on_deadline, js, rnd)
        self._log("open_round", js, round=number)
        early, rnd.pending = rnd.pending, []
        for party, item, nbytes, weight in early:  # arrivals that came before the round opened
            rnd.unobserved.add(party)  # sent before its round began: no response time (it read as 0 s)
            self._accept(js, rnd, party, item, nbytes, weight, now)
        self._plan(js)
        if len(js.expected) < rnd.quorum:  # parties left since: it can never be reached (drop_party checked then)
            self.clock.call_soon_threadsafe(self._check_reachable, js)

    def _on_arrival(self, js, number, party, item, nbytes, weight) -> None:
        with self._lock:
            if self._closed or js.removed:  # (queued before close or remove_job: its round resolved with their
                return  # error, and they let its bytes go)
            now = self.clock.now()
            rnd = self._round(js, number)
            if rnd.done or (rnd.quorum_time is not None and party not in rnd.arrived):
                # acknowledged for a round that ended before its arrival came through (its deadline or an unreachable
                # quorum failed it): a member, it shares the round's fate as the arrived members do. (It was carried
                # to the next round, where its Ack did not say it counted, and the party's own update was refused.)
                self._buffered(js, -nbytes)
                self._observe_late(js, rnd, party)
                self._log("dropped_with_round", js, round=rnd.number, party=party)
                if isinstance(item, _Spilled):
                    self._release_spilled(js, item)
                return
            if js.open is None or rnd.number != js.open.number:
                rnd.pending.append((party, item, nbytes, weight))  # early: kept until the round opens
                return
            self._accept(js, rnd, party, item, nbytes, weight, now)
            self._plan(js)

    def _accept(self, js, rnd, party, item, nbytes, weight, now) -> None:
        """An arrival joins its open round: a member, its update pending a fold (its bytes stay counted as they were
        at submit: buffered until folded)."""
        js.mark_arrived(rnd, party)
        rnd.members.append(party)
        rnd.pending.append((party, item, nbytes, weight))
        rnd.pending_bytes += nbytes
        if party not in rnd.unobserved:  # a carried update's time and answer belong to the round before; a
            js.predictor.observe(party, now - rnd.start)  # replayed one's arrival is the restart
        rnd.last_arrival = now
        if len(rnd.members) == rnd.quorum:
            rnd.quorum_time = now
            self._log("quorum", js, round=rnd.number, at=now)

    def _buffered(self, js, delta: int) -> None:
        """Bytes of admitted updates held in memory (acknowledged, waiting, or being folded), the scheduler's and
        the job's, and their peaks (the job's was its open round's unfolded bytes: folds in progress and updates
        sent ahead for a later round were left out). After close() (which zeroes them) nothing moves them: a fold
        still running then gave back its bytes, and the counts went negative."""
        if self._closed or js.removed:  # (remove_job let the job's bytes go)
            return
        self.buffered_bytes += delta
        js.buffered_bytes += delta
        if delta > 0:
            self.peak_buffered_bytes = max(self.peak_buffered_bytes, self.buffered_bytes)
            js.metrics.peak_bytes = max(js.metrics.peak_bytes, js.buffered_bytes)

    def _observe_late(self, js, rnd, party) -> None:
        """The predictor learns a late answer's response time: once per round and party (a refused update's
        retries, or a resend, teach it nothing more), not for a replay (its arrival is the restart's time) nor for
        a round that has not started."""
        if math.isnan(rnd.start) or party in rnd.unobserved or party in rnd.late_observed:
            return
        rnd.late_observed.add(party)
        js.predictor.observe_late(party, self.clock.now() - rnd.start, rnd.number)

    def _on_deadline(self, js, rnd) -> None:
        with self._settling():
            # (a quorum acknowledged but still queued as arrivals is in: it finalizes, late)
            if self._closed or rnd.done or rnd.quorum_time is not None or rnd.admitted >= rnd.quorum:
                return
            js.metrics.misses += 1
            rnd.missed = True
            self._unreachable(js, rnd, f"deadline of {js.job.deadline_s}s passed with {len(rnd.members)} of "
                                       f"{rnd.quorum} updates")

    def _check_reachable(self, js) -> None:
        with self._settling():
            rnd = js.open
            if self._closed or rnd is None or rnd.done or rnd.quorum_time is not None:
                return
            # an acknowledged update whose arrival is still queued is in, whether or not its party is still
            # expected (one dropped right after its update was acknowledged, or before a restart replays it)
            queued = [p for p in rnd.acked if p not in rnd.arrived]
            possible = (len(rnd.members) + len(queued) + len(js.expected) - int(np.count_nonzero(js.flags(rnd)))
                        - sum(p in js.expected_pos for p in queued))
            if possible < rnd.quorum:
                self._unreachable(js, rnd, f"only {possible} parties left for a quorum of {rnd.quorum}")

    def _unreachable(self, js, rnd, why) -> None:
        js.metrics.unreachable += 1
        self._log("unreachable", js, round=rnd.number, why=why)
        if js.job.unreachable == "partial" and rnd.admitted:
            js.metrics.partial += 1
            # finalize what was acknowledged, with the updates whose arrivals are still queued (an acknowledged
            # update left out of the partial model was lost without a word)
            rnd.quorum = rnd.admitted
            self._commit_quorum(js, rnd)
            if len(rnd.members) >= rnd.quorum:
                rnd.quorum_time = self.clock.now()
                self._log("quorum", js, round=rnd.number, at=rnd.quorum_time)
            self._plan(js)
            return
        rnd.done = True
        self._drop_pending(js, rnd)
        error = QuorumUnreachable(f"job {js.job.id!r} round {rnd.number}: {why}")
        self._commit_failure(js, rnd, error)
        self._resolve(rnd, error=error)
        self._round_finished(js, rnd)

    def _commit_quorum(self, js, rnd) -> None:
        """With a state directory, record the round's lowered quorum: a restart before its result is committed
        finalizes the round with what is in (where the clock has no wall time, its deadline starts again there).
        (The round ends with what is in either way; unrecorded, a restart waits for its deadline again.)"""
        if self.store is not None and js.layout is not None:
            self._commit_later(js, rnd, "its lowered quorum", self.store.commit_quorum, js.job.id, rnd.number,
                               rnd.quorum)

    def _commit_failure(self, js, rnd, error) -> None:
        """With a state directory, record that the round ended with ``error`` (a restart then moves past it; the
        round has ended in memory either way: unrecorded, a restart reopens it)."""
        if self.store is not None and js.layout is not None:
            self._commit_later(js, rnd, "its failure", self.store.commit_failure, js.job.id, rnd.number, error,
                               predictor=js.predictor.to_json(), opened=self._wall(),
                               update_ids=dict(js.seen.get(rnd.number, _NO_IDS)))

    def _commit_later(self, js, rnd, what: str, commit, *args, **kwargs) -> None:
        """Make a state-directory commit of a round's end (its arguments taken now, under the lock) once the lock is
        let go, before the round's future resolves (see :meth:`_settling`, which every caller is in). Made under
        the lock, its fsync, and any checkpoint holding the directory, stalled every submit of every job (a round
        failing at its deadline held them 25-80 ms behind another job's checkpoints). A job removed meanwhile is
        not written (``live``)."""
        def make():
            try:
                commit(*args, live=js.live, **kwargs)
            except Exception:
                log.exception("job %r round %d: could not record %s in %s", js.job.id, rnd.number, what,
                              self.store.path)
        self._commits.append(make)

    # --- internals: planning and slots ---------------------------------------------------------------------------
    def _plan(self, js) -> None:
        rnd = js.open
        if rnd is None or rnd.done:
            return
        dep = js.deployment
        if dep is not None:
            self._pump(js)
            return
        if rnd.timer is not None or js.job.id in self.waiting:
            # re-plan on arrivals, but in large rounds only every ~2% of the parties: one arrival among
            # thousands barely moves the quantile, and each plan costs O(parties). The same holds while the job
            # waits for a slot (with many jobs queued, re-planning at each of their arrivals dominated the run)
            rnd.since_plan += 1
            if rnd.since_plan < max(1, len(js.expected) // 50) and not self._over_budget(rnd) \
                    and rnd.quorum_time is None:  # the quorum's arrival always re-plans: the round now waits
                return
            if rnd.timer is not None:
                rnd.timer.cancel()
                rnd.timer = None
        rnd.since_plan = 0
        over_budget = self._over_budget(rnd)
        t, inputs = self.policy.deploy_at(self, js, rnd)
        now = self.clock.now()  # (after the policy's own reading: on the real clock, "now" read before it was
        # earlier than the policy's, and a deployment due at once became a timer, leaving its place in the queue)
        rnd.plan_t = math.inf if t is None else t
        if over_budget and (t is None or t > now):
            self._log("buffer_pressure", js, round=rnd.number, buffered=self.buffered_bytes, budget=self.byte_budget)
            t = now
        if t is None or t > now:  # not waiting for a slot now (a slot freed meanwhile was its at once, far early)
            self._leave_queue(js)
        if t is None:
            self._log("wait", js, round=rnd.number, plan=inputs)
            return
        if t > now:
            rnd.timer = self.clock.call_at(t, self._on_timer, js, rnd)
            self._log("deploy_planned", js, round=rnd.number, at=t, plan=inputs)
            return
        self._request_slot(js, laxity=t - now, inputs=inputs)

    def _relieve_pressure(self) -> None:
        """Buffer full: every job holding buffered updates re-plans, which forces their early partial folds (the
        parties being refused may belong to a job with nothing buffered, so its own arrivals cannot do it)."""
        with self._lock:
            self._relieving = False
            if self._closed:
                return
            for js in sorted(self.jobs.values(), key=lambda j: -(j.open.pending_bytes if j.open else 0)):
                if js.deployment is not None:  # a deployed job folds its backlog by itself
                    continue
                if js.job.id in self.waiting and js.open is not None and js.open.pending:
                    # queued for a slot with updates buffered: look for an idle deployment to take back now (its
                    # laxity may not have moved since its last search, and its parties, refused, send nothing new:
                    # the budget stayed full for good)
                    self._searched.pop(js.job.id, None)
                    self._request_slot(js, laxity=self.waiting[js.job.id], inputs={"pressure": True})
                elif js.open is not None and js.open.pending:
                    if js.open.timer is not None:
                        js.open.timer.cancel()
                        js.open.timer = None
                    self._plan(js)

    def _over_budget(self, rnd) -> bool:
        """Buffer pressure: past half the budget, fold early so that arrivals during the fold still fit."""
        return bool(self.byte_budget is not None and self.buffered_bytes > self.byte_budget // 2 and rnd.pending)

    def _on_timer(self, js, rnd) -> None:
        """The planned deploy time has come: deploy. Re-planning here instead would let the conditional quantile
        (which moves later while nothing arrives) postpone the deployment again and again, compounding the risk;
        only an arrival, which is new information, re-plans."""
        with self._lock:
            rnd.timer = None
            if not self._closed and js.open is rnd and not rnd.done and js.deployment is None:
                self._request_slot(js, laxity=0.0, inputs={"timer": True})

    def _laxity(self, js) -> float:
        """Latest start - now, from the job's last plan (re-planned on arrivals). For a deployed job that is the
        latest start it had before it was deployed, start-up included: what taking its slot back would cost."""
        rnd = js.open
        if rnd is None or rnd.done:
            return math.inf
        if js.deployment is not None and (rnd.quorum_time is not None or rnd.pending or js.deployment.busy):
            return -math.inf  # it has work now
        return (math.inf if rnd.plan_t is None else rnd.plan_t) - self.clock.now()

    @staticmethod
    def _urgent(js) -> bool:
        """The open round's quorum is in: every second without an aggregator is added latency."""
        rnd = js.open
        return rnd is not None and not rnd.done and rnd.quorum_time is not None

    def _request_slot(self, js, laxity: float, inputs: dict) -> None:
        if self.free_slots:
            self._deploy(js, self.free_slots.pop(0), laxity, inputs)
            return
        self.waiting[js.job.id] = laxity
        # a job re-plans on its arrivals while it waits: search for a victim again only if its latest start moved
        # earlier by more than the hysteresis (each search re-plans idle deployments: quantiles over their parties),
        # or once its quorum is in (its latency runs from then: it is served first, see _release)
        latest = -math.inf if self._urgent(js) else self.clock.now() + laxity
        # the budget full (the next update is refused): half of it, where early folds start, took back a deployment
        # half a second from its quorum for a job that was not short of memory, a start-up added to its latency
        pressure = self.byte_budget is not None and js.open is not None and js.open.pending and \
            self.buffered_bytes + js.update_bytes > self.byte_budget
        if latest >= self._searched.get(js.job.id, math.inf) - self.hysteresis_s and not pressure:
            return
        self._searched[js.job.id] = latest
        idle = sorted((o for o in self.deployed.values() if o is not js and not o.deployment.busy
                       and o.open is not None and not o.open.pending and o.open.quorum_time is None),
                      key=lambda o: o.seq)  # (ties go to the first added, as when this walked self.jobs)
        first, rest = idle, []
        if len(idle) > SEARCH_MAX:
            # each candidate is re-planned as a redeployment (a quantile over its parties): with hundreds of slots
            # that was most of a run (1,000 jobs on 200 slots: 1.9M quantiles for 2M updates). The SEARCH_MAX
            # planned furthest ahead before they deployed are weighed first (kept in add order: ties go to the
            # first added); the one chosen is still weighed exactly
            top = {id(o) for o in heapq.nlargest(SEARCH_MAX, idle, key=lambda o: -math.inf if o.open.plan_t is None
                                                 else o.open.plan_t)}
            first, rest = [o for o in idle if id(o) in top], [o for o in idle if id(o) not in top]

        def weighed(cands):
            # take back an idle deployment whose job can wait longer, if the gap beats the hysteresis + start-up;
            # its laxity is re-planned now as if it had to redeploy (a quantile, only for those that can wait).
            # Under pressure, memory first: any idle deployment (nothing buffered) yields to a job whose buffered
            # updates must be folded to free the budget; otherwise the idle job's own parties stay blocked by
            # Backpressure. The one that can wait longest, re-planned now (its last plan, from before it deployed,
            # is stale)
            now = self.clock.now()
            after = -math.inf if pressure else now + laxity + self.hysteresis_s + self.cost.startup_s
            return [(t - now, o) for o in cands
                    if (t := self.policy.redeploy_after(self, o, o.open, after)) is not None]
        if not pressure and inputs.get("timer") and js.open is not None and js.open.taken_back >= TAKE_BACKS:
            # its planned deploy time came, and its own idle deployment was taken back at others' planned times
            # TAKE_BACKS times this round: it waits for a free slot (or its quorum, or buffer pressure) to deploy
            # again. Two jobs whose quorums did not come took the slot from each other at every plan, each
            # conditional quantile a little past the other's: a take-back every ~4e-4 x the round's age, for ever
            # (a simulation never ended)
            victims = []
        else:
            victims = weighed(first)
            if not victims and rest and (pressure or self._urgent(js)):
                # its latency runs: the rest too (their plans from before they deployed rank them poorly once
                # their quorums are overdue, and a quorum waited 10 s for a deployment outside the first: review)
                victims = weighed(rest)
        if victims:
            lx, victim = max(victims, key=lambda v: v[0])
            self._log("preempt", victim, for_job=js.job.id, victim_laxity=lx, laxity=laxity, pressure=bool(pressure))
            # under pressure the slot goes to this job, whose buffered updates must be folded: the queue's first (by
            # laxity) often had nothing buffered, became the next idle victim, and deployments thrashed (a 6-job
            # mix on a 40 MB budget: 23,173 oracle deployments in 30 rounds, costing more than lazy)
            self._release(victim, f"preempted by {js.job.id}", to=(js, laxity) if pressure else None)
            if victim.open is not None and not victim.open.done:
                if inputs.get("timer") and not pressure:  # (take-backs for a quorum that is in, or for buffer
                    # room, are not thrash)
                    victim.open.taken_back += 1
                self._plan(victim)  # it plans its redeployment now, not at its next arrival
        else:
            self._log("wait_slot", js, laxity=laxity, waiting=len(self.waiting), plan=inputs)
        # still waiting with its quorum in (no victim, or the freed slot went to a job before it in the queue): the
        # idle deployments' laxities grow as their quorums fail to come, so look again every quarter start-up while
        # this round's latency runs (on cross_silo a 25M job waited 360 s for a slot that a search freed after 300 s)
        if js.job.id in self.waiting and self._urgent(js) and js.job.id not in self._retries:
            self._retries[js.job.id] = self.clock.call_at(
                self.clock.now() + max(self.hysteresis_s, self.cost.startup_s / 4, RETRY_MIN_S), self._retry_slot, js,
                js.open)

    def _retry_slot(self, js, rnd) -> None:
        with self._lock:
            if self._closed or self.jobs.get(js.job.id) is not js:  # (a removed job's: its id may be another's now)
                return
            self._retries.pop(js.job.id, None)
            if js.open is rnd and js.job.id in self.waiting and self._urgent(js) and js.deployment is None:
                self._searched.pop(js.job.id, None)
                self._request_slot(js, laxity=min(0.0, self._laxity(js)), inputs={"retry": True})

    def _leave_queue(self, js) -> None:
        """``js`` no longer waits for a slot: deployed, its round over, or its plan moved later."""
        self.waiting.pop(js.job.id, None)
        self._searched.pop(js.job.id, None)
        retry = self._retries.pop(js.job.id, None)
        if retry is not None:
            retry.cancel()

    def _deploy(self, js, slot: int, laxity: float, inputs: dict) -> None:
        now = self.clock.now()
        self._leave_queue(js)
        dep = js.deployment = _Deployment(slot, now, now + self.cost.startup_s)
        self.deployed[js.job.id] = js
        js.metrics.deployments += 1
        self.occupancy.append((now, self.occupancy[-1][1] + 1))
        self._log("deploy", js, slot=slot, laxity=laxity, plan=inputs)
        self.clock.call_at(dep.ready_at, self._on_ready, js, dep)

    def _on_ready(self, js, dep) -> None:
        with self._lock:
            if not self._closed and js.deployment is dep:
                dep.ready = True
                self._pump(js)

    def _release(self, js, why: str, to=None) -> None:
        """End ``js``'s deployment; the slot goes to ``to`` = (job, laxity) if given, else to the queue's first."""
        dep = js.deployment
        now = self.clock.now()
        js.metrics.deployed_s += now - dep.start
        js.deployment = None
        self.deployed.pop(js.job.id, None)
        self.occupancy.append((now, self.occupancy[-1][1] - 1))
        self._log("release", js, slot=dep.slot, why=why, held_s=now - dep.start)
        if to is not None:
            self._deploy(to[0], dep.slot, to[1], {"preempted_for": True})
            return
        self.free_slots.append(dep.slot)
        if self.waiting:  # jobs whose quorum is in first (their latency runs), then least laxity (now), priority
            cands = [(not self._urgent(self.jobs[j]), self._laxity(self.jobs[j]), -self.jobs[j].job.priority, j)
                     for j in self.waiting]
            _, lx, _, jid = min(cands, key=lambda c: c[:3])  # (ties: the first queued; ids may mix str and int)
            nxt = self.jobs[jid]
            self.waiting.pop(jid)
            if nxt.deployment is None:
                self._deploy(nxt, self.free_slots.pop(0), lx, {"from_queue": True})

    # --- internals: work ---------------------------------------------------------------------------------------
    def _pump(self, js) -> None:
        dep, rnd = js.deployment, js.open
        if dep is None or not dep.ready or dep.busy:
            return
        if rnd is None or rnd.done:
            if not self.policy.keep_between_rounds or js.finished:
                self._release(js, "no open round")
            return
        if rnd.pending and (self.policy.fold_on_arrival or rnd.quorum_time is not None):
            batch, rnd.pending = rnd.pending, []
            nbytes = rnd.pending_bytes  # in memory; spilled (and replayed) updates are read back by the fold
            rnd.pending_bytes = 0
            work = nbytes + js.update_bytes * sum(isinstance(it, _Spilled) for _, it, _, _ in batch)
            est = self.cost.fold_s(work, len(batch), js.model_elems, **self._priced(js))
            fn = None
            if rnd.aggregator is not None:
                # a late update carried to this round comes with its staleness-scaled weight
                items = [it if w == it.weight else dataclasses.replace(it, weight=w) for _, it, _, w in batch]
                fn = functools.partial(self.executor.fold_many, rnd.aggregator, items)
            task = Task("fold", js.job.id, rnd.number, len(batch), nbytes, est, fn)
            if self.store is not None and rnd.aggregator is not None:
                task.fn = functools.partial(self._fold_durably, js, task, rnd.aggregator, items, work,
                                            self._update_ids(js, rnd))
            dep.busy = True
            self._log("fold", js, round=rnd.number, updates=len(batch), bytes=nbytes, est_s=est)
            spilled = [it for _, it, _, _ in batch if isinstance(it, _Spilled)]
            self._run(js, rnd, task, refused=lambda: [self._release_spilled(js, sp) for sp in spilled])
            return
        if rnd.quorum_time is not None and rnd.folded >= rnd.quorum:
            est = self.cost.finalize_s(js.model_elems, **self._priced(js))
            ids = None if self.store is None else self._update_ids(js, rnd)
            fn = None if rnd.aggregator is None else functools.partial(self._finalize, js, rnd.number, rnd.aggregator,
                                                                       ids)
            task = Task("finalize", js.job.id, rnd.number, 0, 0, est, fn)
            dep.busy = True
            self._log("finalize", js, round=rnd.number, est_s=est)
            self._run(js, rnd, task)

    def _run(self, js, rnd, task, refused=None) -> None:
        """Hand ``task`` to the executor; its completion comes back through the clock (``_done``). An executor that
        refuses the task (a custom one, a Ray cluster gone) is that task failing: the deployment stayed busy for
        good, and its round never resolved. ``refused()`` lets go of what the task would have (a fold's spilled
        updates' files, which its own failure path releases)."""
        def done(duration, result, error):
            self._done(js, rnd, task, duration, result, error)

        try:
            self.executor.run(task, done)
        except Exception as e:
            if refused is not None:
                refused()
            self.clock.call_soon_threadsafe(done, 0.0, None, e)

    # --- internals: crash safety (scheduler.durable) --------------------------------------------------------------
    def _update_ids(self, js, rnd) -> dict:
        ids = js.seen.get(rnd.number, _NO_IDS)
        return {p: ids.get(p) for p in rnd.members}

    def _fold_durably(self, js, task, agg, items, nbytes, ids) -> None:
        """A fold task with a state directory: fold the updates in memory, free their bytes, then read back the
        spilled ones from disk as the byte budget has room (:meth:`_reserve_read_back`), and commit the partial
        aggregate once enough was folded (``nbytes``: the update bytes the task folds, spilled ones included). Runs
        on the executor's thread (one task per job at a time), outside the scheduler's lock."""
        spilled = [it for it in items if isinstance(it, _Spilled)]
        in_memory = [it for it in items if not isinstance(it, _Spilled)]
        items.clear()  # this frame holds them now, and lets the folded ones go
        try:
            if in_memory:
                self.executor.fold_many(agg, in_memory)
                in_memory.clear()
            with self._lock:  # folded: their bytes are free (for the read-back, and for arrivals)
                self._buffered(js, -task.nbytes)
                task.nbytes = 0
            i = 0
            while i < len(spilled):
                n, overdraft = self._reserve_read_back(js, len(spilled) - i)
                try:
                    self.executor.fold_many(agg, [self._read_spilled(js, sp) for sp in spilled[i:i + n]])
                finally:
                    with self._lock:
                        self._buffered(js, -n * js.update_bytes)
                        self._overdraft = self._overdraft and not overdraft
                        self._read_back_room.notify_all()
                i += n
        except BaseException:  # the round fails: the files of the spilled updates not read yet are let go
            for sp in spilled:
                self._release_spilled(js, sp)
            raise
        js.fold_bytes += nbytes
        limit = max(4 * agg.state.acc.nbytes, MIN_CHECKPOINT_BYTES) if self.checkpoint_bytes is None else \
            self.checkpoint_bytes
        with self._lock:  # a round that ended meanwhile (its deadline) is not committed: it never finished
            rnd = js.rounds.get(task.round)
            live = rnd is not None and not rnd.done
            carried = self._carried_into(js, task.round)
        if js.fold_bytes >= limit and live:
            try:
                # (with when the round opened: the last result's commit, which recorded it before, came before the
                # round opened, by its futures' callbacks, a retry, or a simulated finalize's time)
                self.store.checkpoint(js.job.id, task.round, agg.state, ids, carried, opened=rnd.opened_wall,
                                      live=js.live)
                js.fold_bytes = 0
            except Crashed:
                raise
            except Exception as e:  # only bounds what a restart replays: the updates are still on disk
                log.warning("job %r round %d: checkpoint failed (%s); the next fold tries again", js.job.id,
                            task.round, e)

    def _reserve_read_back(self, js, remaining: int) -> tuple:
        """(n, overdraft): how many spilled (or replayed) updates a fold reads back next: as many as the byte budget
        has room for now, up to half of it (arrivals meanwhile keep the other half; all of them without a budget).
        With no room for one, one update goes past the budget so that the fold goes on (``overdraft``), but only one
        fold at a time: another waits for room or for that one to be folded, so that the buffered bytes stay within
        the budget plus one update however many slots fold. (Inline executors run one task at a time: they never
        wait here.) The bytes count as buffered until folded, as arrivals' do."""
        with self._lock:
            overdraft = False
            if self.byte_budget is None:
                n = remaining
            else:
                while True:
                    room = min(self.byte_budget // 2, self.byte_budget - self.buffered_bytes)
                    n = min(remaining, room // max(1, js.update_bytes))
                    if n >= 1:
                        break
                    if not self._overdraft:
                        n = 1
                        overdraft = self._overdraft = True
                        break
                    self._read_back_room.wait(timeout=0.01)  # also woken by other folds' releases
            self._buffered(js, n * js.update_bytes)
            return n, overdraft

    def _read_spilled(self, js, sp):
        with self._lock:  # a resend after a failed write wrote the file again: wait for that write
            rnd = js.rounds.get(sp.round)
            durable = rnd.durable.get(sp.party, sp.durable) if rnd is not None else sp.durable
        try:
            self._wait_written(durable)  # the writer thread may still be writing it
        except SchedulerClosed:
            raise
        except Exception as e:
            if sp.item is None:
                raise
            # its write failed: folded from memory (a resend writes it again), at the weight it counts with (a
            # late update's was admitted at the weight sent, before late_weight)
            log.warning("job %r round %d: update of %r folded from memory; its write failed (%s)", js.job.id,
                        sp.round, sp.party, e)
            self._release_spilled(js, sp)
            u, sp.item = sp.item, None  # (the failed future keeps sp through its callback)
            return u if u.weight == sp.weight else dataclasses.replace(u, weight=sp.weight)
        leaves = self.store.load_update(js.job.id, sp.round, sp.party, js.layout)
        self._release_spilled(js, sp)  # folded next: the checkpoint or result covers it
        return js.admit(js.layout.unflatten(leaves), sp.weight, sp.party, sp.info)

    def _wait_written(self, durable) -> None:
        """Wait for an update's write, giving up with SchedulerClosed once the scheduler closes: a close() called from
        an Ack.durable callback holds the writer thread, and waited for this fold, which waited for a write queued
        behind that callback (neither ever returned)."""
        while True:
            try:
                return durable.result(timeout=0.1)
            except concurrent.futures.TimeoutError:  # (the builtin TimeoutError from Python 3.11 on only)
                if self._closed:
                    raise SchedulerClosed("the scheduler closed while a fold waited for a spilled update's write") \
                        from None

    def _release_spilled(self, js, sp) -> None:
        self.store.release(js.job.id, sp.round, sp.party)

    def _drop_pending(self, js, rnd) -> None:
        """A round ended with updates unfolded: their bytes are freed, and spilled ones' files let go. (Updates that
        came before their round opened are counted in the buffered bytes but not in its pending_bytes.)"""
        self._buffered(js, -sum(nbytes for _, _, nbytes, _ in rnd.pending))
        for _, item, _, _ in rnd.pending:
            if isinstance(item, _Spilled):
                self._release_spilled(js, item)
        rnd.pending, rnd.pending_bytes = [], 0

    def _finalize(self, js, number, agg, ids):
        """A finalize task: (the result, the next round's base where the job rebases). The base is a copy (the caller
        owns the result, and may change it before the next round), made before the result is committed: a copy that
        fails (a model-sized allocation) fails the round here and on disk alike (made after the commit, it reported a
        round failed whose result a restart then served). With a state directory the result is committed before the
        round's future resolves."""
        result = agg.finalize()
        nxt = copy.deepcopy(result) if js.rebases and not js.job.after_last(number + 1) else None
        if self.store is None:
            return result, nxt
        with self._lock:
            if self._closed or not js.live():  # the round resolved with SchedulerClosed (a restart reopens it), or
                return result, nxt  # the job is gone (or going: remove_job has committed its removal)
        self.store.commit_result(js.job.id, number, js.layout, js.layout.flatten(result), ids,
                                 carry=agg.state if js.carries else None, predictor=js.predictor.to_json(),
                                 opened=self._wall(), live=js.live)
        js.fold_bytes = 0
        return result, nxt

    def _resume(self, js) -> None:
        """Continue a job from the state directory: finished rounds' results, the open round's committed partial
        aggregate, and the acknowledged updates that it does not cover (replayed as arrivals, which the predictor
        does not learn response times from: it resumes from the models the manifest saved)."""
        st, job = self.store, js.job
        meta = self._serve_unnamed_result(js, st.jobs.get(job.id, {}))
        first = meta.get("round", job.first_round)
        if meta.get("predictor"):  # what the arrivals of committed rounds taught it
            js.predictor.load_json(meta["predictor"])  # (checked as the directory was opened)
        last = max(map(int, meta.get("results", {})), default=None)
        base_lost = None  # why the last model, the next round's base where the job rebases, cannot be read
        for r, rel in meta.get("results", {}).items():
            rnd = self._round(js, int(r))
            rnd.done = True
            try:
                leaves, ids = st.load_result(rel, js.layout, job.id, int(r))
            except (OSError, jk.CorruptState) as e:  # (logged when the directory was opened) this round's answer only
                self._resolve(rnd, error=e if isinstance(e, jk.CorruptState) else jk.CorruptState(
                    f"job {job.id!r} round {r}: its result {rel} cannot be read ({e})"))
                if int(r) == last:
                    base_lost = f"{rel}: {e}"
                continue
            self._resolve(rnd, js.layout.unflatten(leaves))
            js.seen.setdefault(int(r), {}).update(ids)
            if js.rebases and int(r) == last:  # the last model: the next round's base
                js.next_base = js.layout.unflatten([leaf.copy() for leaf in leaves])
        for r, (kind, message) in meta.get("failed", {}).items():  # rounds that ended with an error
            if r in meta.get("results", {}):  # (recorded as failed after its result was committed: it finished)
                continue
            rnd = self._round(js, int(r))
            rnd.done = True
            self._resolve(rnd, error=QuorumUnreachable(message) if kind == "QuorumUnreachable" else
                          SchedulerError(f"job {job.id!r} round {r} failed before the restart: {kind}: {message}"))
            js.seen.setdefault(int(r), {}).update((p, u) for p, u in meta.get("failed_parties", {}).get(r, []))
        ended = [int(r) for key in ("results", "failed") for r in meta.get(key, {})]
        if ended:
            if first <= max(ended):  # (a manifest that names an ended round as open: resume after it)
                log.warning("job %r: the state directory names round %d as open, but round %d ended; resuming at %d",
                            job.id, first, max(ended), max(ended) + 1)
                first, meta = max(ended) + 1, {k: v for k, v in meta.items() if k not in ("state", "parties", "carried")}
        if first > job.first_round:  # rounds before the open one that it does not hold: results let go (keep_rounds),
            js.forgotten = first - 1  # or a round whose end could not be recorded (a full disk)
        for p in meta.get("dropped", []):  # parties that left (drop_party) are not waited for
            if p in js.expected:
                js.drop_expected(p)
        if job.after_last(first):
            js.finished = True
            self._log("resumed", js, round=first, finished=True)
            return
        if js.rebases and base_lost is not None and not meta.get("state"):
            # its rounds fold against the last model: from the template instead, every later model would be wrong
            raise jk.CorruptState(f"job {job.id!r}: round {last}'s result, the model round {first} folds against, "
                                  f"cannot be read ({base_lost}); restore it, or add the job again from a known model "
                                  "in a fresh state directory")
        # everything that may refuse the job is read before its round opens (an open round arms timers and takes
        # a slot, which a refused add_job would leave behind): its states, then its stored updates (replayed from
        # their files, as spilled updates: read back within the byte budget when folded; decoding them all here
        # held every one in memory, and past the budget recovery itself raised Backpressure)
        carry = js.from_state(self._stored_state(js, meta["carry"])) if meta.get("carry") and not meta.get("state") \
            else None
        resumed = js.from_state(self._stored_state(js, meta["state"])) if meta.get("state") else None
        replayed = st.stored_updates(job.id, len(js.layout), js.layout.fingerprint,
                                     [leaf.shape for leaf in js.layout.leaves], functools.partial(self._readmit, js))
        held = {p for p, _ in meta["parties"]} if resumed is not None else set()
        strangers = sorted((held | {u[1] for u in replayed}) - set(job.parties), key=repr)
        if strangers:  # (they filled the quorum and were in the model; the job's own parties were then turned away)
            raise InvalidJob(f"job {job.id!r}: its state directory holds updates of parties it no longer lists "
                             f"({', '.join(map(repr, strangers[:5]))}{' and more' if len(strangers) > 5 else ''}): "
                             "add it with the parties it ran with (drop_party takes one out from the next round on), "
                             "or start it afresh in a new state directory")
        if carry is not None:  # the open round starts from the last round's carry
            js.carry = carry
        wall, opened = self._wall(), meta.get("opened") if meta.get("round", job.first_round) == first else None
        # the round opened before the restart: its deadline and its parties' response times run from then (they
        # restarted with every restart, and a server that kept crashing never failed a round at its deadline)
        self._open_round(js, first, None if wall is None or opened is None else
                         self.clock.now() - max(0.0, wall - opened), opened)
        rnd = js.open
        if js.restarted:  # the round opened before a restart: its arrivals from now on teach no response times
            # (those of parties that tried while the server was down would read the outage as their own: an
            # hour's outage inflated a party's model for many rounds)
            rnd.unobserved.update(job.parties)
        lowered = meta.get("quorum")
        if lowered and lowered[0] == first:  # the partial rule's quorum, set at its deadline before the restart
            rnd.quorum = min(rnd.quorum, lowered[1])
        for p, c in meta.get("carried", []):  # late updates the checkpoint holds: for the rounds they were sent for
            if c in js.rounds:
                js.rounds[c].carried_out[p] = first
        if resumed is not None:
            rnd.aggregator = resumed
            for p, uid in meta["parties"]:
                js.mark_arrived(rnd, p)
                rnd.members.append(p)
                js.seen.setdefault(first, {})[p] = uid
            rnd.folded = rnd.admitted = len(rnd.members)
        for r, n in collections.Counter(u[0] for u in replayed).items():
            # what was acknowledged for a round counts in it, whatever the quorum now (so no replayed update is
            # late): a job added again with a lower quorum closed its round on the first replayed updates and
            # carried the rest to the next round as late ones, or refused the restart (LateUpdate)
            later = self._round(js, r)
            later.quorum = max(later.quorum, later.admitted + n)
        if resumed is not None and rnd.folded >= rnd.quorum:
            rnd.quorum_time = self.clock.now()
        for r, party, uid, weight, info, carried_from in replayed:
            if carried_from in js.rounds:  # (a round whose result is in: a second update for it is refused)
                js.rounds[carried_from].carried_out[party] = r
            self._round(js, r).unobserved.add(party)  # it arrives now, in replay: no response time to learn
            self._submit(js, r, party, None, weight, uid, persist=False, stored=True, info=info)
        self._log("resumed", js, round=first, folded=rnd.folded, replayed=len(replayed),
                  fallbacks=len(st.fallbacks), orphans_removed=st.orphans_removed)
        self._plan(js)

    def _serve_unnamed_result(self, js, meta) -> dict:
        """The job's manifest entry ``meta``; or, where the directory holds the result of the round it names as open
        (:meth:`StateDir.unnamed_result`: a fallback passed over the damaged generation that had finished the round,
        or a crash came between the result's file and its manifest), the entry of a generation committed now that
        names it, as the round's own commit would have: the resume then serves the round as any finished one (its
        future, its update ids for resends, the next round's carry or base, its updates covered). Folded again
        instead, outside deterministic mode its sums could differ in their last bits: a DP round whose model had
        reached its future was released a second time with other noise (twice the privacy cost, and another model
        for a round the server had used). A file that does not verify or match is not served: the round is folded
        again, as before (logged)."""
        found = self.store.unnamed_result(js.job.id)
        if found is None:
            return meta
        rnd, rel, carry_rel = found
        why = self._unservable(js, meta, rnd, rel, carry_rel)
        if why is not None:
            log.warning("job %r round %d: its result %s, which no generation in force names, is not served (%s); the "
                        "round is folded again from its updates", js.job.id, rnd, rel, why)
            return meta  # (let go once add_job has taken the job: a refused one keeps it for the corrected job)
        self.store.commit_unnamed_result(js.job.id, rnd, carry_rel if js.carries else None, self._wall())
        js.spare = None  # (add_job made it, against the template, for a job that had finished no round)
        log.info("job %r round %d: served from %s, which no generation in force named", js.job.id, rnd, rel)
        self._log("served_unnamed_result", js, round=rnd)
        return self.store.jobs[js.job.id]

    def _unservable(self, js, meta, rnd, rel, carry_rel) -> str | None:
        """Why the result file ``rel`` cannot stand for the open round ``rnd``, or None. It must verify (its record
        naming this job and round), and hold the updates the directory holds for the round (the checkpoint's parties
        and the files it does not cover, with their update ids: one it lacks was acknowledged for the round and
        counts in it, as a replay counts it) and none of parties the job does not list; where the job's rounds hand
        on a carry, that file must verify too and be of the same finalize (finalized again, a closed state gives its
        model again: a carry written for the round folded again, and a crash before its result, would continue
        another model than the one served). A file of another layout or a carry of another configuration refuses
        the job, as its named files do; an error of reading (EMFILE) is raised, not taken for damage (a round
        folded again is what serving the file avoids)."""
        if js.carries and carry_rel is None:
            return "the carry its round hands on is missing"
        try:
            leaves, ids = self.store.load_result(rel, js.layout, js.job.id, rnd, unnamed=True)
            carry = self._stored_state(js, carry_rel) if js.carries else None
        except jk.CorruptState as e:
            return str(e)
        held = dict(meta.get("parties", [])) if meta.get("state") else {}
        held.update((p, u) for r, p, u, *_ in self.store.stored_updates(js.job.id, len(js.layout),
                                                                         js.layout.fingerprint) if r == rnd)
        strangers = sorted(set(ids) - set(js.job.parties), key=repr)
        lacked = sorted((p for p, u in held.items() if p not in ids or ids[p] != u), key=repr)
        if strangers:
            return f"it holds updates of parties the job does not list: {strangers[:5]}"
        if lacked:
            return f"it lacks the updates acknowledged for the round of {lacked[:5]}"
        if carry is None:
            return None
        try:  # (the job's backend, not from_state: nothing of the job changes for a file that may be refused)
            again = js.layout.flatten(jk.Aggregator.from_state(carry, backend=js.job.backend).finalize())
        except jk.AggregationError as e:
            return f"its carry {carry_rel} gives no model ({type(e).__name__}: {e})"
        return None if same_leaves(again, leaves) else f"its carry {carry_rel} is of another finalize than the result"

    @staticmethod
    def _readmit(js, leaves, weight, party, info) -> None:
        """A stored update checked as submit checked it (its file is replayed only if this passes): a file written
        before submit kept per-update values (FedNova's steps) cannot be folded, nor can values signed into a file
        by anyone but us. The job resumes without it; the party may resend (an answer)."""
        js.admit(js.layout.unflatten(leaves), weight, party, js.algorithm.check_info(info, party))

    def _stored_state(self, js, rel):
        """A committed state file of the job, refused if it holds another layout (the template changed), or was
        saved by another algorithm or configuration of it (InvalidJob): the job would continue with the file's,
        silently (a DP job restarted with a larger noise_multiplier ran every later round at the old one)."""
        state = self.store.load_state(rel)
        if state.layout.fingerprint != js.layout.fingerprint:
            raise jk.LayoutMismatch(f"job {js.job.id!r}: {rel} holds layout {state.layout.fingerprint}; the job's "
                                    f"layout is {js.layout.fingerprint} (its template changed?)")
        alg = js.algorithm
        try:  # the record rebuilt, as from_state rebuilds it: a parameter added since the file was written takes its
            # default, as the file's algorithm did (a Krum file from before `variant` was "variant None -> 'paper'")
            saved = jk.algorithms.from_params(state.algorithm).params()
        except (ValueError, TypeError, OverflowError):
            return state  # (no algorithm makes that record: from_state refuses it, CorruptState)
        ignore = {"int_leaves", "deterministic"} | (set() if getattr(alg, "seed_given", True) else {"seed"})
        have, want = ({k: v for k, v in json.loads(json.dumps(jk.state.algorithm_rule(p))).items() if k not in ignore}
                      for p in (saved, alg.params()))
        changed = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
        if bool(state.deterministic) != bool(js.job.deterministic):
            changed.append("deterministic")
            have["deterministic"], want["deterministic"] = bool(state.deterministic), bool(js.job.deterministic)
        if changed:
            diff = ", ".join(f"{k} {have.get(k)!r} -> {want.get(k)!r}" for k in changed)
            raise InvalidJob(f"job {js.job.id!r}: {rel} was saved by another configuration of the job ({diff}); a "
                             "restarted job continues its saved state: add it with the configuration it ran with, or "
                             "start it afresh in a new state directory")
        return state

    def _done(self, js, rnd, task, duration, result, error) -> None:
        with self._settling():
            if self._closed:  # a task that was running at close: its round resolved with SchedulerClosed
                return  # (close zeroed the buffered bytes)
            if js.removed:  # a task that was running at remove_job: its slot is free now, and nothing else moves
                self._removing.pop(js.job.id, None)
                if js.deployment is not None:
                    self._release(js, "job removed")
                return
            if js.tombstoned:  # its removal is committed and remove_job forgets it next (its rounds end with
                # JobRemoved, as they would have under the lock): nothing moves; the slot goes then, not busy
                if js.deployment is not None:  # (the task's commit refused itself: a finalize's round would have
                    js.deployment.busy = False  # failed with that RuntimeError, and the next round opened)
                return
            dep = js.deployment
            if dep is not None:
                dep.busy = False
            js.metrics.busy_s += duration
            if task.kind == "fold":
                rnd.folded += task.n_updates
                self._buffered(js, -task.nbytes)
                if error is not None:
                    self._fail(js, rnd, error)
                    return
                if rnd.done:  # its round ended while it ran (a deadline)
                    rnd.aggregator = None  # (this fold was its last use: the round is held for its result only)
                    self._after_ended_round(js)
                    return
            else:
                rnd.done = True
                result, nxt = (None, None) if result is None else result  # (None: no arrays, the simulator's)
                try:
                    self._finalized(js, rnd, duration, nxt, error)
                except Exception:  # (the round resolves as its finalize did, whatever failed here: the clock thread
                    # logged it and went on, and the round's future was left unresolved for good, its job stuck)
                    log.exception("job %r round %d: the bookkeeping after its finalize failed", js.job.id, rnd.number)
                self._resolve(rnd, result, error)
                self._round_finished(js, rnd)
                return
            self._pump(js)

    def _finalized(self, js, rnd, duration, nxt, error) -> None:
        """A round's finalize task is over: the next base (``nxt``, where the job rebases) and the metrics of a
        success, or the failure's record."""
        now = rnd.ready_time = self.clock.now()
        if error is None:  # (a failed finalize made no model: no round, no latency, as a failed fold)
            if nxt is not None:
                js.next_base = nxt
            js.metrics.latencies.append(now - rnd.quorum_time)
            js.metrics.rounds += 1
            if js.job.deadline_s is not None and now > rnd.start + js.job.deadline_s and not rnd.missed:
                js.metrics.misses += 1
            self._log("ready", js, round=rnd.number, latency_s=now - rnd.quorum_time, busy_s=duration)
            return
        self._log("round_failed", js, round=rnd.number, error=repr(error))
        # recorded, so that a restart resolves the round with it; not for a job whose rounds hand state on once the
        # finalize closed the state (stepped, noised) or tore its model: the next round here continues from it (or
        # the job ends), and a restart replays the round from its files (nothing committed covers them). A finalize
        # that failed before it changed the state (an executor error, a torn noise) hands on the last carry, as a
        # restart does from disk: recorded (a restart replayed the round that had failed, released a model for it,
        # and every later round differed from the uninterrupted run's)
        state = None if rnd.aggregator is None else rnd.aggregator.state
        if not js.carries or state is None or not (state.closed or state.torn_model):
            self._commit_failure(js, rnd, error)

    def _fail(self, js, rnd, error) -> None:
        if rnd.done:  # already resolved (e.g. its deadline passed while this fold ran)
            self._log("fold_failed_after_round_end", js, round=rnd.number, error=repr(error))
            rnd.aggregator = None  # (as after a fold that succeeded: the round is held for its result only)
            self._after_ended_round(js)
            return
        rnd.done = True
        self._log("round_failed", js, round=rnd.number, error=repr(error))
        if hasattr(error, "add_note"):  # the error keeps its type; the note says where it happened
            error.add_note(f"while folding job {js.job.id!r} round {rnd.number}")
        self._commit_failure(js, rnd, error)
        self._drop_pending(js, rnd)
        self._resolve(rnd, error=error)
        self._round_finished(js, rnd)

    def _after_ended_round(self, js) -> None:
        """A task of a round that ended while it ran is over: the deployment, which _round_finished could not
        release while busy, is released now unless the policy keeps it (the next round plans its own; held, it sat
        idle until that round's end), else it goes on with the open round's work."""
        if js.deployment is not None and (not self.policy.keep_between_rounds or js.finished):
            self._release(js, "round done")
            self._plan(js)
        else:
            self._pump(js)

    def _round_finished(self, js, rnd) -> None:
        self._leave_queue(js)  # (a round that ended waiting for a slot: the slot went to the ended job later)
        # a server step that stopped part-way tore the model and moments the next round would continue: the job
        # ends here (a restart from a state directory replays the round from its files, which nothing covers)
        torn = rnd.aggregator.state.torn if rnd.aggregator is not None and rnd.aggregator.state.torn_model else None
        busy = js.deployment is not None and js.deployment.busy  # a fold of this round may still be running
        nxt = rnd.number + 1
        # parties left for good (drop_party) below the quorum: a job without a round count ends here (its every
        # later round would fail at once, an endless chain) once no later round holds acknowledged updates (sent
        # ahead by parties that then left: those rounds open and meet their quorum or fail in turn, as a counted
        # job's remaining rounds do)
        last = js.job.after_last(nxt) or torn is not None or (
            js.job.rounds is None and len(js.expected) < js.job.quorum_count()
            and not any(r.acked for n, r in js.rounds.items() if n > rnd.number and not r.done))
        if last:  # no next round: nothing model-sized is kept for one (a server adding jobs grew by each one's)
            js.spare = js.carry = None
            if not busy:
                rnd.aggregator = None
        elif rnd.aggregator is not None and js.carries and busy:
            # failed (deadline) mid-fold: the fold keeps its aggregator, the next round starts from a copy of the
            # server state (folds do not touch it, so it is read without waiting for the fold)
            js.carry = js.from_state(rnd.aggregator.state.next_round())
        elif rnd.aggregator is not None and js.carries:  # finalized or failed, the next round continues its state
            js.carry, rnd.aggregator = rnd.aggregator, None
        elif rnd.aggregator is not None and not busy:  # the result is out (finalize allocates it): recycle it
            if rnd.aggregator.state.store is not None:  # a robust rule's slab (k models) is returned while it waits
                rnd.aggregator.state.store.clear()
            if js.next_base is None:  # the base as it was: a round that failed after its finalize (its result not
                # committed) released no model to its parties, and a plain reset would start the next from it
                rnd.aggregator.state.released = False
            rnd.aggregator.reset(js.next_base, reuse=True)  # (None but where the job rebases: the base as it was)
            js.spare, rnd.aggregator = rnd.aggregator, None
        if rnd.deadline_timer is not None:
            rnd.deadline_timer.cancel()
        if rnd.timer is not None:
            rnd.timer.cancel()
        # (a party whose late update was carried into this round could send none for it, DuplicateParty: it is left
        # out of the round's participation, which it had counted as a miss: parties that answered every round they
        # could drifted to participation 0.5-0.8, and the quorum quantile later)
        js.predictor.close_round(rnd.arrived - rnd.carried, [p for p in js.expected if p not in rnd.carried],
                                 rnd.number)
        self._forget_old_rounds(js, rnd.number)
        if last:
            js.finished = True
            if not js.job.after_last(nxt):
                js.ended = torn or "its remaining parties cannot meet its quorum"
            js.open = None
            js.next_base = None  # (no next round folds against it)
            for later in [r for n, r in js.rounds.items() if n > rnd.number and not r.done]:
                # rounds that will not open (holding no acknowledged update, unless the job tore): answered
                later.done = True
                self._drop_pending(js, later)
                self._resolve(later, error=jk.TornState(
                    f"job {js.job.id!r} round {later.number}: the job ended at round {rnd.number}: {torn}")
                    if torn is not None else QuorumUnreachable(
                    f"job {js.job.id!r} round {later.number}: the job ended at round {rnd.number} (only "
                    f"{len(js.expected)} parties left for a quorum of {js.job.quorum_count()})"))
        if js.deployment is not None and (not self.policy.keep_between_rounds or js.finished):
            if not js.deployment.busy:
                self._release(js, "round done")
        if not last:  # once its future is resolved (see _settling)
            self._opening.append((js, nxt))
            js.opening = nxt

    def _forget_old_rounds(self, js, latest: int) -> None:
        """Drop finished rounds older than the last ``keep_rounds`` (their futures hold whole models: a long job
        would hold every round's), with their de-duplication records (a resend for them is late). In batches, once
        twice as many are held, so that the cost per round stays O(parties)."""
        done = [n for n, r in js.rounds.items() if r.done and n <= latest - self.keep_rounds]
        if len(done) < self.keep_rounds:
            return
        gone = set(done)
        for n in gone:
            del js.rounds[n]
            js.seen.pop(n, None)
        js.forgotten = max(gone) if js.forgotten is None else max(js.forgotten, max(gone))

    def _log(self, event: str, js=None, **inputs) -> None:
        rec = {"t": self.clock.now(), "event": event, "job": js.job.id if js is not None else None, **inputs}
        self.decisions.append(rec)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", rec)
