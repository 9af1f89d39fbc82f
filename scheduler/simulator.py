"""Discrete-event simulation of FL aggregation under each policy, on the scheduler's virtual clock.

The simulator runs the same :class:`~scheduler.JITScheduler` and policy code as the runtime; only the clock (virtual)
and the executor (cost-model time, or measured time of the real kernels with ``real=True``) differ.

Fair comparison:
* common random numbers: each party's response time and availability in round r are drawn from a generator seeded
  by (seed, job, round), relative to the round's start, so every policy sees the same draws; a policy's latency
  shifts later rounds in time, not the draws;
* round membership is fixed at the quorum (the first q arrivals), the same set under every policy while the byte
  budget does not bind (updates refused with Backpressure retry RETRY_S later, and their order then differs by
  policy: the shipped mixed workload's 220 rounds had the same members under all four);
* eager is deployed for the job's whole life, one aggregator per job (it gets as many slots as there are jobs:
  that is how platforms run today); the other policies share the workload's slots; every deployment pays the
  start-up.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import math
import os
import time
import tomllib
from dataclasses import dataclass, field, fields, replace

import numpy as np

from jitkernels.errors import shown

from .clock import VirtualClock
from .core import MAX_SLOTS, Backpressure, JITScheduler, Job, LateUpdate
from .cost import BackendCost, CostModel
from .executors import MeasuredExecutor, ModelExecutor

WORKLOADS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workloads")
POLICIES = ("eager", "lazy", "jit", "oracle")
RETRY_S = 1.0  # a party whose update met Backpressure retries after this long
MAX_SPREAD = 100.0  # jitter_cv past this overflowed the draws (1e200: OverflowError in every policy)
# party_spread is the log-normal sigma of the parties' speeds, exp(N(0, s) - s^2 / 2): from s = 38 every speed
# underflowed to 0, and every response time with it (rho divided by a round time of 0)
MAX_PARTY_SPREAD = 10.0
# sizes past what a run here can finish (10M update events, 1,000 jobs, take about 5 minutes), refused rather than
# run for days or until memory runs out: update events (count x parties x rounds, summed), jobs, parties per job,
# slots, update bytes
MAX_EVENTS, MAX_JOBS, MAX_PARTIES, MAX_UPDATE_BYTES = 10 ** 8, 10 ** 4, 10 ** 7, 10 ** 15
MAX_RESPONSE_S = 1e12  # (s) a response time the quantile search can still bracket, times the run's rounds


@dataclass
class JobSpec:
    """A group of ``count`` identical jobs."""

    name: str = "job"
    count: int = 1
    model_params: int = 10_000_000
    bytes_per_param: int = 4  # of an update on the wire (4: fp32, 2: fp16/bf16, 1: int8)
    parties: int = 10
    quorum: float = 1.0
    rounds: int = 10
    response_s: float = 300.0  # mean response time of a typical party
    jitter_cv: float = 0.1  # round-to-round coefficient of variation of a party's response time
    party_spread: float = 0.3  # log-sd of party speeds (fixed per party)
    intermittent: float = 0.0  # share of parties that answer a round only with probability `availability`
    availability: float = 1.0
    # availability windows: an intermittent party is online for window_open of every window_s seconds (from a phase
    # of its own); a round that opens while it is offline gets its work started when its window opens (0: no windows)
    window_s: float = 0.0
    window_open: float = 1.0
    dropout: float = 0.0  # per-round probability that a party leaves the job for good
    deadline_s: float | None = None
    priority: int = 0


@dataclass
class Workload:
    name: str = "workload"
    seed: int = 0
    slots: int = 2
    startup_s: float = 20.0
    alpha: float = 0.05
    backend: str = "cpu"
    byte_budget: int | None = None
    cost: dict = field(default_factory=lambda: {"cpu": {"throughput_Bps": 2e10, "call_s": 5e-5}})
    acc_itemsize: int = 4  # the accumulator's bytes per element, in the cost model's fold and finalize times
    jobs: list = field(default_factory=list)

    @classmethod
    def from_toml(cls, path) -> "Workload":
        with open(path, "rb") as f:
            try:
                d = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{path}: not TOML: {e}") from None
            except RecursionError:  # (arrays or tables nested past the parser's limit)
                raise ValueError(f"{path}: not a workload (TOML nested too deep)") from None
        known = {f.name for f in fields(JobSpec)}
        jobs = []
        listed = d.pop("jobs", [])
        if not (isinstance(listed, list) and all(isinstance(j, dict) for j in listed)):
            raise ValueError(f"{path}: jobs are tables [[jobs]] (one per group of jobs), got a "
                             f"{type(listed).__name__} (written [jobs]?)")
        for i, j in enumerate(listed):
            unknown = set(j) - known
            if unknown:
                raise ValueError(f"{path}: job {j.get('name', f'#{i + 1}')!r}: unknown job keys {sorted(unknown)}")
            jobs.append(JobSpec(**j))
        wl_known = {f.name for f in fields(cls)}
        unknown = set(d) - wl_known
        if unknown:
            raise ValueError(f"{path}: unknown workload keys {sorted(unknown)}")
        wl = cls(jobs=jobs, **d)
        try:
            wl.check()
        except (ValueError, TypeError) as e:  # (a [cost.cpu] entry with a misspelled key is a TypeError)
            raise ValueError(f"{path}: {e}") from None
        return wl

    def check(self) -> None:
        """ValueError naming the first value a run cannot use (a quorum of 1.5 ran before and reported a 100% saving
        over zero rounds)."""
        if not self.jobs:
            raise ValueError("the workload has no jobs")
        if isinstance(self.byte_budget, float) and self.byte_budget.is_integer():  # (TOML reads 16e9 as a float)
            self.byte_budget = int(self.byte_budget)
        if not (isinstance(self.cost, dict) and all(isinstance(v, dict) for v in self.cost.values())):
            raise ValueError(f"cost is a table per backend ([cost.cpu] throughput_Bps = ..., call_s = ...), got "
                             f"{self.cost!r}")
        for name, value, ok in (("slots", self.slots, _is_int(self.slots) and 1 <= self.slots <= MAX_SLOTS),
                                ("seed", self.seed, _is_int(self.seed) and self.seed >= 0),
                                ("alpha", self.alpha, _is_real(self.alpha) and 0 < self.alpha < 1),
                                ("byte_budget", self.byte_budget, self.byte_budget is None
                                 or _is_int(self.byte_budget) and self.byte_budget > 0)):
            if not ok:  # (a budget of 0 refused every update for ever; slots = 1.5 ran as 1)
                raise ValueError(f"{name} = {shown(value)} is out of range")
        for name, value in (("name", self.name), ("backend", self.backend)):  # (the name names the output files,
            if not isinstance(value, str):  # written after the whole run; backend = [1] was "unhashable type")
                raise ValueError(f"{name} = {shown(value)} is not a string")
        names = [j.name for j in self.jobs]
        bad = next((n for n in names if not isinstance(n, str)), None)
        if bad is not None:  # (5 and "5" both made job ids "5-0")
            raise ValueError(f"job name {bad!r} is not a string")
        if len(set(names)) < len(names):
            raise ValueError(f"job names must be unique, got {names}")
        cm = self.cost_model()  # its own checks: a cost entry for the backend, throughputs > 0, start-up >= 0
        if not cm.startup_s <= MAX_RESPONSE_S:  # (1e308 ran, and the run failed on a NaN response time)
            raise ValueError(f"startup_s = {shown(cm.startup_s)} is past the {MAX_RESPONSE_S:.0e} s a run can time")
        for j in self.jobs:
            for name in ("count", "parties", "rounds", "model_params", "bytes_per_param", "priority"):
                v = getattr(j, name)
                if isinstance(v, float) and v.is_integer():  # (TOML reads 1e6 as a float)
                    setattr(j, name, int(v))
                elif not _is_int(v):
                    raise ValueError(f"job {j.name!r}: {name} = {v!r} is not an integer")
            for name in ("quorum", "response_s", "jitter_cv", "party_spread", "intermittent", "availability",
                         "dropout", "window_s", "window_open") + (("deadline_s",) if j.deadline_s is not None else ()):
                if not (_is_real(getattr(j, name)) and math.isfinite(getattr(j, name))):
                    raise ValueError(f"job {j.name!r}: {name} = {getattr(j, name)!r} is not a finite number")
            for name, ok in (("count", j.count >= 1), ("parties", j.parties >= 1), ("rounds", j.rounds >= 1),
                             ("quorum", 0 < j.quorum <= 1), ("response_s", 0 < j.response_s <= MAX_RESPONSE_S),
                             ("model_params", j.model_params >= 1), ("bytes_per_param", j.bytes_per_param >= 1),
                             ("jitter_cv", 0 <= j.jitter_cv <= MAX_SPREAD),
                             ("party_spread", 0 <= j.party_spread <= MAX_PARTY_SPREAD),
                             ("parties", j.parties <= MAX_PARTIES),
                             ("model_params", j.model_params * j.bytes_per_param <= MAX_UPDATE_BYTES),
                             ("intermittent", 0 <= j.intermittent <= 1), ("availability", 0 < j.availability <= 1),
                             ("dropout", 0 <= j.dropout < 1), ("window_s", j.window_s >= 0),
                             ("window_open", 0 < j.window_open <= 1),
                             ("deadline_s", j.deadline_s is None or j.deadline_s > 0)):
                if not ok:
                    raise ValueError(f"job {j.name!r}: {name} = {shown(getattr(j, name))} is out of range")
            # keys that describe intermittent parties, where the job has none (or windows of no length): the run
            # was the default's, and said nothing
            for name, unused, why in (("availability", j.availability < 1 and j.intermittent == 0, "intermittent = 0"),
                                      ("intermittent", j.intermittent > 0 and j.availability == 1 and j.window_s == 0,
                                       "availability = 1 and window_s = 0"),
                                      ("window_s", j.window_s > 0 and (j.intermittent == 0 or j.window_open == 1),
                                       "intermittent = 0" if j.intermittent == 0 else "window_open = 1"),
                                      ("window_open", j.window_open < 1 and (j.intermittent == 0 or j.window_s == 0),
                                       "intermittent = 0" if j.intermittent == 0 else "window_s = 0")):
                if unused:
                    raise ValueError(f"job {j.name!r}: {name} = {shown(getattr(j, name))} applies to intermittent "
                                     f"parties' availability, and {why}: it would change nothing")
            work = cm.fold_s(j.model_params * j.bytes_per_param * j.parties, j.parties, j.model_params) \
                + cm.finalize_s(j.model_params)
            if not work <= MAX_RESPONSE_S:  # (a call_s of 1e308 or a throughput of 5e-324: NaN response times)
                raise ValueError(f"job {j.name!r}: a round's aggregation takes {work:.3g} s by [cost.{self.backend}] "
                                 f"(throughput_Bps, call_s), past the {MAX_RESPONSE_S:.0e} s a run can time")
            if self.byte_budget is not None and j.model_params * j.bytes_per_param > self.byte_budget:
                raise ValueError(f"job {j.name!r}: one update ({j.model_params * j.bytes_per_param} bytes) is larger "
                                 f"than byte_budget = {self.byte_budget}")
        events, jobs = sum(j.count * j.parties * j.rounds for j in self.jobs), sum(j.count for j in self.jobs)
        if events > MAX_EVENTS or jobs > MAX_JOBS:
            raise ValueError(f"{jobs:.3g} jobs and {events:.3g} update events (count x parties x rounds, summed over "
                             f"the jobs): past the {MAX_JOBS:.0e} jobs and {MAX_EVENTS:.0e} events a run can simulate")

    @classmethod
    def builtin(cls, name: str = "mixed") -> "Workload":
        return cls.from_toml(os.path.join(WORKLOADS, f"{name}.toml"))

    def use_cost(self, cm: CostModel) -> "Workload":
        """Take the kernel figures of a calibrated cost model (``jitagg calibrate``'s file: its backends and which one
        runs); the deployment start-up and the accumulator's bytes per element stay the workload's (a platform's and
        the jobs', not a kernel's: a workload's 16, deterministic mode, ran as the file's 4). Returns self."""
        self.cost = {k: dataclasses.asdict(v) for k, v in cm.backends.items()}
        self.backend = cm.backend
        self.check()
        return self

    def cost_model(self) -> CostModel:
        return CostModel(backends={k: BackendCost(**v) for k, v in self.cost.items()}, startup_s=self.startup_s,
                         backend=self.backend, acc_itemsize=self.acc_itemsize)

    def instances(self):
        """(job id, spec) for every job of every group."""
        for g, spec in enumerate(self.jobs):
            for i in range(spec.count):
                yield f"{spec.name}-{i}", g * 1_000_003 + i, spec


class Arrivals:
    """The draws of one job: fixed party speeds and intermittency, and per-round response times and availability."""

    def __init__(self, seed: int, key: int, spec: JobSpec):
        self.seed, self.key, self.spec = seed, key, spec
        rng = np.random.default_rng([seed, key, 0xFA57])
        n = spec.parties
        self.speed = np.exp(rng.normal(0.0, spec.party_spread, n) - spec.party_spread ** 2 / 2)
        self.intermittent = rng.random(n) < spec.intermittent
        # the round a party leaves (dropout), geometric; > rounds means never
        self.leaves = (rng.geometric(spec.dropout, n) if spec.dropout > 0 else np.full(n, 1 << 30))
        s = math.sqrt(math.log1p(spec.jitter_cv ** 2))
        self._sigma = s
        # (a generator of their own: the draws above, and the figures of workloads without windows, stay as they were)
        self.phase = np.random.default_rng([seed, key, 0x0FF1CE]).random(n) * spec.window_s

    def _draw(self, rng, r: int, shape: tuple = ()):
        """(response times, who answers) of round r for every party, ``shape`` rounds of them: jitter, then
        availability, from ``rng``."""
        spec, size = self.spec, shape + (self.spec.parties,)
        t = spec.response_s * self.speed * np.exp(rng.normal(-self._sigma ** 2 / 2, self._sigma, size))
        answer = (~self.intermittent | (rng.random(size) < spec.availability)) & (self.leaves > r)
        return t, answer

    def round(self, r: int):
        """(party indices that answer, their response times relative to the round's start)."""
        t, answer = self._draw(np.random.default_rng([self.seed, self.key, r]), r)
        idx = np.flatnonzero(answer)
        return idx, t[idx]

    def waits(self, idx, t: float) -> np.ndarray:
        """How long parties ``idx`` wait, from a round opening at (absolute) time ``t``, before they start its work:
        0 where online; an intermittent party outside its availability window waits for the window to open. Absolute
        time, so a policy whose rounds start later meets other windows: the draws (speeds, jitter, phases) are
        common to every policy, the windows they fall in are not."""
        spec = self.spec
        if spec.window_s <= 0 or spec.window_open >= 1:
            return np.zeros(len(idx))
        pos = (t - self.phase[idx]) % spec.window_s
        offline = self.intermittent[idx] & (pos >= spec.window_open * spec.window_s)
        return np.where(offline, spec.window_s - pos, 0.0)

    def mean_quorum_time(self, q: int, draws: int = 20_000) -> float:
        """The expected time of a round's q-th response under this job's model (the round's length, before its
        aggregation), over the draws that reach the quorum (inf if none does): the mean response time only for a
        quorum of one typical party; the slowest of 10 jittered parties answers well after it."""
        rng = np.random.default_rng([self.seed, self.key, 0x51DE])
        t, answer = self._draw(rng, 0, (draws,))
        if self.spec.window_s > 0:  # rounds that open at any point of the window cycle
            t = t + self.waits(np.arange(self.spec.parties), rng.random((draws, 1)) * self.spec.window_s)
        t[~answer] = np.inf
        tq = np.partition(t, q - 1, axis=1)[:, q - 1] if q <= t.shape[1] else np.full(draws, np.inf)
        tq = tq[np.isfinite(tq)]  # (draws whose quorum never answers: such a round ends by its deadline, if any)
        return float(tq.mean()) if tq.size else math.inf

    def quorum_quantile(self, r: int, q: int, alpha: float, draws: int = 20_000) -> float:
        """The alpha-quantile of round r's quorum time (the q-th response) under this job's true model: speeds and
        dropouts as drawn, fresh jitter and availability per draw; inf where the quorum fails more often than alpha.
        What a policy that knew every party's distribution (not the round's draws) would plan on."""
        n = self.spec.parties
        t, answer = self._draw(np.random.default_rng([self.seed, self.key, r, 0xB0D]), r, (draws,))
        t[~answer] = np.inf
        tq = np.partition(t, q - 1, axis=1)[:, q - 1] if q <= n else np.full(draws, np.inf)
        return float(np.quantile(tq, alpha, method="inverted_cdf"))  # an order statistic: no inf - inf


@dataclass
class PolicyResult:
    policy: str
    deployed_s: float
    busy_s: float
    latencies: list
    misses: int
    unreachable: int
    rounds: int
    peak_bytes: int
    occupancy: list  # (t, deployed aggregators)
    makespan_s: float
    events: int
    wall_s: float
    real_busy_s: float | None = None
    per_job: dict = field(default_factory=dict)
    ended: int = 0  # rounds that ended, with a model or an error (a round that cannot end stalls its job)
    partial: int = 0  # unreachable rounds finalized with what came
    members: dict = field(default_factory=dict)  # (job, round) -> the parties whose updates it acknowledged, where
    # simulate(members=True) was asked (an entry per update: 180 MB over 2,000 cross_device rounds)
    model_busy_s: float | None = None  # --real: the cost model's estimate of the busy time measured

    def summary(self) -> dict:
        # no round made a model (every one failed): no latency to report, not a latency of 0
        lat = np.array(self.latencies) if self.latencies else np.full(1, np.nan)
        return {"policy": self.policy, "aggregator_s": self.deployed_s, "busy_s": self.busy_s,
                "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
                "latency_p99_s": float(np.percentile(lat, 99)), "deadline_misses": self.misses,
                "unreachable_rounds": self.unreachable, "partial_rounds": self.partial,
                "rounds_without_model": self.ended - len(self.latencies),
                "rounds": self.rounds, "peak_buffered_bytes": self.peak_bytes,
                "makespan_s": self.makespan_s, "events": self.events,
                "events_per_s": self.events / max(self.wall_s, 1e-9),
                "wall_s": self.wall_s, "real_busy_s": self.real_busy_s, "model_busy_s": self.model_busy_s}


def simulate(workload: Workload, policy: str, *, real: bool = False, progress=None,
             members: bool = False) -> PolicyResult:
    """Run one policy on the workload. ``real=True`` folds real arrays (model sizes scaled down to at most 1M
    parameters, which the jobs are then sized by: the cost model estimates the work that runs) and advances virtual
    time by the kernels' measured time; ``model_busy_s`` is the cost model's estimate of the same work.
    ``members``: record each round's acknowledged parties (``PolicyResult.members``; see :func:`compare`).

    Added latency runs from the time the round's quorum was drawn to arrive (its q-th response; its deadline, where
    that comes first and the round ends with what came) to the model being ready: an update refused for buffer room
    (Backpressure) retries later, and the wait counts."""
    clock = VirtualClock()
    cost = workload.cost_model()
    truth: dict = {}
    executor = MeasuredExecutor(clock) if real else ModelExecutor(clock)
    instances = list(workload.instances())
    # eager is today's platforms: one always-on aggregator per job, so it gets a slot per job
    slots = len(instances) if policy == "eager" else workload.slots
    sched = JITScheduler(policy, slots=slots, clock=clock, executor=executor, cost=cost,
                         alpha=workload.alpha, byte_budget=workload.byte_budget,
                         oracle=lambda jid, r: truth.get((jid, r)), history=None)
    total_rounds = sum(spec.rounds for _, _, spec in instances)
    done_rounds = [0]
    templates = {}
    t0 = time.perf_counter()

    def on_round():
        done_rounds[0] += 1
        if progress is not None:
            progress(done_rounds[0], total_rounds)

    drivers = []
    # one set of party id objects for every job: a dict lookup hashes its key, and with ids of their own the 1,000
    # jobs of a large run read 1,000 copies of each (a cache miss per update); shared, they stay in the cache
    ids = list(range(max((spec.parties for _, _, spec in instances), default=0)))
    for jid, key, spec in instances:
        arrivals = Arrivals(workload.seed, key, spec)
        q = max(1, math.ceil(spec.quorum * spec.parties - 1e-9))
        template, elems, nbytes = None, spec.model_params, spec.model_params * spec.bytes_per_param
        if real:  # the arrays folded (float32), which the job's figures describe
            elems = min(spec.model_params, 1_000_000)
            template, nbytes = templates.setdefault(elems, np.zeros(elems, np.float32)), 4 * elems
            if workload.byte_budget is not None and nbytes > workload.byte_budget:  # (bytes_per_param < 4)
                raise ValueError(f"--real: job {spec.name!r} folds float32 updates of {nbytes} bytes, more than "
                                 f"byte_budget = {workload.byte_budget}; raise the budget for a real run")
        job = Job(jid, template=template, parties=ids[:spec.parties], quorum=q, rounds=spec.rounds,
                  model_elems=elems, update_bytes=nbytes, deadline_s=spec.deadline_s, priority=spec.priority,
                  unreachable="partial", prior_response_s=spec.response_s)  # operators know a job's round time
        driver = _JobDriver(sched, clock, jid, spec, arrivals, q, template, truth, on_round, members, job.parties)
        drivers.append(driver)
        driver.draw(0)  # before add_job, which plans round 0: the oracle knows its quorum time from the start
        sched.add_job(job)
        driver.start(0)

    # The run allocates millions of short-lived objects while the scheduler keeps its history (acknowledged update
    # ids, decisions, per-round records) alive; the cyclic collector's passes over that history made a 10M-update run
    # slow down as it went (16 -> 11 rounds/s on cross_device; 28-29 steady without it). Reference counting frees the
    # loop's garbage; whatever cycles remain are collected when the run returns.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        clock.run()
    finally:
        if gc_was_enabled:
            gc.enable()
    wall = time.perf_counter() - t0
    metrics = sched.metrics()
    deployed, busy, misses, unreachable, rounds = 0.0, 0.0, 0, 0, 0
    for jid, js in sched.jobs.items():
        m = js.metrics
        deployed += metrics[jid]["deployed_s"]
        busy += m.busy_s
        misses += m.misses
        unreachable += m.unreachable
        rounds += m.rounds
    result = PolicyResult(policy, deployed, busy, [x for d in drivers for x in d.latencies], misses, unreachable,
                        rounds, sched.peak_buffered_bytes, list(sched.occupancy), clock.now(), clock.events, wall,
                        real_busy_s=busy if real else None, per_job=metrics, ended=done_rounds[0],
                        partial=sum(js.metrics.partial for js in sched.jobs.values()),
                        members={(d.jid, r): frozenset(m) for d in drivers for r, m in (d.members or {}).items()},
                        model_busy_s=executor.estimated_s if real else None)
    for d in drivers:  # the cycle that held the whole run (round future -> its driver's callback -> the scheduler ->
        d.sched = None  # its rounds): broken, reference counts free it on return, not a full collection afterwards
    return result  # (~1 s per round of 1,000 jobs x 1,000 parties, paid by whatever ran next)


class _JobDriver:
    """Feeds one job's arrivals: when round r opens (its predecessor's model is ready), its draws are scheduled."""

    def __init__(self, sched, clock, jid, spec, arrivals, q, template, truth, on_round, members, parties):
        self.sched, self.clock, self.jid, self.spec = sched, clock, jid, spec
        # the job's party ids, the very objects the scheduler's dicts are keyed by: a lookup matches them by identity
        # without reading the key (in a run of 1,000 jobs, a cache miss per dict an update goes through)
        self.parties = np.empty(len(parties), dtype=object)  # (gathered per round in the draws' order, in C)
        self.parties[:] = parties
        self.arrivals, self.q, self.template, self.truth, self.on_round = arrivals, q, template, truth, on_round
        self.latencies = []  # per round with a model: ready - when its membership was fixed (see simulate)
        self.members = {} if members else None  # round -> the parties acknowledged for it (asked for)

    def draw(self, r: int):
        """Round r's draws (cached for start), and the oracle's truth: when its membership is fixed, at the time its
        quorum arrives or at its deadline where that comes first (a partial round's model is made of what came by
        then), if ever (None: the draws never reach the quorum and no deadline ends the round, or nothing comes
        before the deadline, and the round fails)."""
        if getattr(self, "_drawn", (None,))[0] != r:
            now = self.clock.now()
            idx, resp = self.arrivals.round(r)
            resp = resp + self.arrivals.waits(idx, now)  # (availability windows)
            order = np.argsort(resp, kind="stable")
            fixed = now + float(resp[order[self.q - 1]]) if idx.size >= self.q else None
            if self.spec.deadline_s is not None:
                end = now + self.spec.deadline_s
                if fixed is None or fixed > end:
                    fixed = end if idx.size and now + float(resp[order[0]]) <= end else None
            self.truth[(self.jid, r)] = fixed
            self._drawn = (r, idx, resp, order)
        return self._drawn[1:]

    def start(self, r: int) -> None:
        start = self.clock.now()
        idx, resp, order = self.draw(r)
        # parties that leave the job (dropout) leave at this round's start: a round they make unreachable ends
        # (partially, as the simulated jobs are configured) instead of waiting for them
        for party in np.flatnonzero(self.arrivals.leaves == r).tolist():
            self.sched.drop_party(self.jid, party)
        upd = None if self.template is None else np.full(self.template.shape, float(r), np.float32)
        parties = self.parties[idx[order]].tolist()
        self.clock.call_at_each((start + resp[order]).tolist(), self._submit,
                                list(zip(itertools.repeat(r), parties, itertools.repeat(upd))))
        self.sched.result(self.jid, r).add_done_callback(lambda f: self._done(r, f))

    def _submit(self, r, party, upd) -> None:
        try:
            self.sched.submit(self.jid, r, party, upd, 1.0)
        except Backpressure:  # the party retries later, as a real client would
            self.clock.call_later(RETRY_S, self._submit, r, party, upd)
        except LateUpdate:  # past the quorum: membership is fixed, the update is not needed
            pass
        else:
            if self.members is not None:
                self.members.setdefault(r, []).append(party)

    def _done(self, r: int, fut) -> None:
        fixed = self.truth.get((self.jid, r))  # (when its membership was fixed: see draw)
        if fut.exception() is None and fixed is not None:  # resolved as the model is ready, in virtual time
            self.latencies.append(self.clock.now() - fixed)
        self.on_round()
        if r + 1 < self.spec.rounds:
            self.start(r + 1)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def rho(workload: Workload) -> float:
    """Aggregation work over round duration, averaged over the workload's jobs (from the cost model); a round lasts
    until its quorum's last response (:meth:`Arrivals.mean_quorum_time`)."""
    cost = workload.cost_model()
    work = dur = 0.0
    instances = list(workload.instances())
    for _, key, spec in instances:
        q = max(1, math.ceil(spec.quorum * spec.parties - 1e-9))
        work += spec.rounds * (cost.fold_s(q * spec.model_params * spec.bytes_per_param, q, spec.model_params)
                               + cost.finalize_s(spec.model_params))
        # a draw is a response time per party; the mean over the jobs needs its precision in all, not per job: 2M
        # response times per job drew 2e9 for 1,000 jobs of 1,000 parties, 32 s beside a 4-minute simulation
        draws = max(200, min(2_000_000, 200_000_000 // len(instances)) // spec.parties)
        dur += spec.rounds * Arrivals(workload.seed, key, spec).mean_quorum_time(q, draws)
    return work / dur if dur > 0 else math.inf


def compare(workload: Workload, policies=POLICIES, *, real: bool = False, progress=None,
            members: bool = False) -> dict:
    """Every policy on the same draws; savings and added latencies relative to eager and lazy. ``members``: record
    each round's acknowledged parties in the results (``PolicyResult.members``, to check that every policy's rounds
    had the same; an entry per update, which no reported figure reads: off by default)."""
    results = {p: simulate(workload, p, real=real, progress=(lambda d, t, p=p: progress(p, d, t)) if progress else None,
                           members=members) for p in policies}
    total = sum(spec.rounds for _, _, spec in workload.instances())
    stalled = {p: r.ended for p, r in results.items() if r.ended != total}
    if stalled:  # savings over a run cut short would be eager's idle time, not JIT's merit
        raise ValueError(f"workload {workload.name!r}: rounds ended {stalled} of {total}: a round could not reach "
                         f"its quorum and had no deadline (give the job deadline_s, or a lower quorum)")
    barren = [p for p, r in results.items() if not r.latencies]
    if barren:  # every round failed (deadlines shorter than the responses): a 100% saving over no models
        raise ValueError(f"workload {workload.name!r}: no round made a model under {', '.join(barren)} (every round "
                         f"failed: deadline_s shorter than the responses, or a quorum the parties cannot meet)")
    rows = {p: r.summary() for p, r in results.items()}
    if "eager" in rows:
        e = rows["eager"]
        for p, row in rows.items():
            row["saving_vs_eager"] = 1.0 - row["aggregator_s"] / e["aggregator_s"] if e["aggregator_s"] else 0.0
            row["added_latency_p95_vs_eager_s"] = row["latency_p95_s"] - e["latency_p95_s"]
        if "lazy" in rows and "jit" in rows:
            l, j = rows["lazy"], rows["jit"]
            gap = e["aggregator_s"] - l["aggregator_s"]
            rows["jit"]["capture_of_lazy_saving"] = (e["aggregator_s"] - j["aggregator_s"]) / gap if gap else 1.0
            lgap = l["latency_p95_s"] - e["latency_p95_s"]
            rows["jit"]["latency_share_of_lazy_gap"] = ((j["latency_p95_s"] - e["latency_p95_s"]) / lgap
                                                        if lgap else 0.0)
        if "oracle" in rows and "jit" in rows:
            o = rows["oracle"]
            gap = e["aggregator_s"] - o["aggregator_s"]
            rows["jit"]["capture_of_oracle_saving"] = (e["aggregator_s"] - rows["jit"]["aggregator_s"]) / gap \
                if gap else 1.0
    return {"workload": workload.name, "rho": rho(workload), "policies": rows, "results": results}


def risk_bound(workload: Workload, out: dict, *, draws: int = 20_000) -> float:
    """The share of oracle's saving over eager that a policy knowing every party's response-time distribution
    (not the round's draws) keeps when it deploys each round to be ready at the quorum time's alpha-quantile Q,
    fixed at the round's start: it idles max(0, T_q - Q) longer than oracle in each round, and misses (pays latency,
    not resource) otherwise. A yardstick for JIT's capture of oracle's saving, not a bound on it: JIT learns the
    distributions (which costs) but also re-plans on the round's arrivals (which pays where jitter is large). The
    gap from it to 1 is the price of planning at risk alpha. Single-job workloads (slot contention is not
    modelled); ``out`` is :func:`compare`'s result with eager and oracle."""
    jobs = list(workload.instances())
    if len(jobs) != 1:
        raise ValueError(f"risk_bound models one job; workload {workload.name!r} has {len(jobs)}")
    (_, key, spec), = jobs
    arrivals = Arrivals(workload.seed, key, spec)
    q = max(1, math.ceil(spec.quorum * spec.parties - 1e-9))
    idle = 0.0
    for r in range(spec.rounds):
        resp = np.sort(arrivals.round(r)[1])
        if resp.size >= q:
            idle += max(0.0, float(resp[q - 1]) - arrivals.quorum_quantile(r, q, workload.alpha, draws))
    rows = out["policies"]
    gap = rows["eager"]["aggregator_s"] - rows["oracle"]["aggregator_s"]
    return 1.0 - idle / gap if gap else 1.0


def sweep_workload(rho_target: float, jitter_cv: float, *, seed: int = 3, rounds: int = 20,
                   cost: CostModel | None = None) -> Workload:
    """One job whose rounds are sized so that (aggregation work + start-up) / round duration = rho_target: the share
    of a round that one deployment needs. A round lasts until its quorum's last response, the q-th of the parties'
    (their expected time, :meth:`Arrivals.mean_quorum_time`), not the mean response time it was once sized by: at CV
    0.5 the slowest of 10 answers ~2x later, and the cells of one rho column had rhos that fell with the jitter.
    (The sweep's rho counts the 5 s start-up, which the work alone is about 1/72 of at 25M parameters on the default
    cost figures; :func:`rho` is the work alone.) ``cost``: a calibrated cost model (``jitagg calibrate``), used to
    size the rounds as well as to run them."""
    if not (rho_target > 0 and math.isfinite(rho_target)):
        raise ValueError(f"rho must be a finite number > 0, got {rho_target!r}")
    spec = JobSpec(name="sweep", model_params=25_000_000, parties=10, quorum=1.0, rounds=rounds, jitter_cv=jitter_cv,
                   party_spread=0.2)
    wl = Workload(name=f"rho={rho_target},cv={jitter_cv}", seed=seed, slots=1, startup_s=5.0, jobs=[spec])
    if cost is not None:
        wl.use_cost(cost)
    wl.check()
    cost = wl.cost_model()
    q = spec.parties
    work = (cost.fold_s(q * spec.model_params * 4, q, spec.model_params) + cost.finalize_s(spec.model_params)
            + wl.startup_s)
    spec.response_s = 1.0  # the quorum time scales with the response time: sized at 1 s, then scaled
    spec.response_s = work / rho_target / Arrivals(seed, 0, spec).mean_quorum_time(q)
    if not spec.response_s < MAX_RESPONSE_S:  # (rho = 1e-320 sized rounds of inf seconds: a traceback in the run)
        raise ValueError(f"rho = {rho_target!r} needs rounds of {spec.response_s:.3g} s, past the {MAX_RESPONSE_S:.0e} "
                         "s a run can time")
    return replace(wl, jobs=[spec])
