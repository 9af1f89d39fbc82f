"""Model-based (stateful) test of JITScheduler on a VirtualClock.

Random sequences of add_job / submit (members, non-members, current/past/future rounds, duplicates, resends, bad
updates) / drop_party / remove_job / clock advances / result() / (durable variant) close + recover, checked against
a reference model of which updates each round folds (README "Scheduler: when to aggregate").

Oracle inputs read from the scheduler: the open round number, a round's ``done`` flag and its (possibly lowered)
quorum (the deadline's timing depends on the cost model; the model checks the lowered quorum separately).
"""

import os
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, initialize

import jitkernels as jk
from scheduler import (BackendCost, CostModel, JITScheduler, Job, LateUpdate, NoSuchRound, QuorumUnreachable,
                       SchedulerClosed, UnknownParty, VirtualClock)
from scheduler.core import JobRemoved, SchedulerError, UnknownJob

COST = CostModel(backends={"cpu": BackendCost(1e6, 0.0)}, startup_s=1.0)
TEMPLATE = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
NONMEMBER = 99
KEEP = 16


def update_of(v):
    return {"a": (np.arange(3) + v).astype(np.float32), "b": np.full(2, -v, np.float32)}


def expected_mean(acc):
    sw = sum(w for _, _, w in acc)
    a = sum(w * (np.arange(3) + v) for _, v, w in acc) / sw
    b = sum(w * np.full(2, -v) for _, v, w in acc) / sw
    return {"a": a, "b": b}


class MRound:
    def __init__(self, q):
        self.q = q
        self.acc = []  # (party, value, weight) acknowledged for this round (counting in it)
        self.outcome = None  # ("result", value) | ("error", type)
        self.checked = False
        self.count_at_deadline = None


class MJob:
    def __init__(self, jid, n, q, deadline, late, late_weight, unreachable, rounds):
        self.jid, self.n, self.q = jid, n, q
        self.deadline, self.late, self.late_weight, self.unreachable, self.rounds = \
            deadline, late, late_weight, unreachable, rounds
        self.parties = list(range(n))
        self.rounds_m = {}
        self.seen = {}  # (counted round, party) -> uid
        self.uids = {}  # (sent round, party, uid) -> counted round
        self.carried_out = {}  # (sent round, party) -> counted round
        self.futs = {}  # round -> future (current scheduler)
        self.calls = {}  # round -> done-callback count for futs[round]
        self.removed = False
        self.dropped = set()
        self.uid_n = 0

    def job(self):
        return Job(self.jid, template={k: v.copy() for k, v in TEMPLATE.items()}, parties=list(self.parties),
                   quorum=self.q, deadline_s=self.deadline, late=self.late, late_weight=self.late_weight,
                   unreachable=self.unreachable, rounds=self.rounds)

    def rnd(self, r):
        if r not in self.rounds_m:
            self.rounds_m[r] = MRound(self.q)
        return self.rounds_m[r]


class SchedulerMachine(RuleBasedStateMachine):
    durable = False

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="sm_") if self.durable else None
        self.clk = VirtualClock()
        self.policy = "eager"
        self.sched = None
        self.jobs = {}
        self.next_id = 0
        self.acks = []

    @initialize(policy=st.sampled_from(["eager", "lazy", "jit"]), slots=st.integers(1, 2),
                n=st.integers(1, 4), qf=st.integers(1, 4), deadline=st.sampled_from([None, 2.0, 5.0]),
                late=st.sampled_from(["reject", "next_round"]), lw=st.sampled_from([1.0, 0.5]),
                unreachable=st.sampled_from(["error", "partial"]), rounds=st.sampled_from([None, 2, 4]))
    def init(self, policy, slots, **job):
        self.policy, self.slots = policy, slots
        self.sched = JITScheduler(policy, slots=slots, clock=self.clk, cost=COST, state_dir=self.dir,
                                  checkpoint_bytes=0 if self.durable else None)
        self._add_job(**job)

    def teardown(self):
        try:
            if self.sched is not None:
                self.sched.close()
        finally:
            if self.dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    # ---------------------------------------------------------------------------------------------------------
    def live(self):
        return [m for m in self.jobs.values() if not m.removed]

    def sjs(self, m):
        return self.sched.jobs[m.jid]

    def watch(self, m, r):
        """Get (and count the resolutions of) round r's future."""
        if r in m.futs:
            return m.futs[r]
        try:
            f = self.sched.result(m.jid, r)
        except (NoSuchRound, jk.AggregationError):
            return None
        m.futs[r] = f
        m.calls[r] = 0

        def cb(_f, m=m, r=r):
            m.calls[r] += 1
        f.add_done_callback(cb)
        return f

    @rule(n=st.integers(1, 4), qf=st.integers(1, 4), deadline=st.sampled_from([None, 2.0, 5.0]),
          late=st.sampled_from(["reject", "next_round"]), lw=st.sampled_from([1.0, 0.5]),
          unreachable=st.sampled_from(["error", "partial"]), rounds=st.sampled_from([None, 2, 4]))
    @precondition(lambda self: len(self.live()) < 3)
    def add_job(self, **kw):
        self._add_job(**kw)

    def _add_job(self, n, qf, deadline, late, lw, unreachable, rounds):
        q = min(qf, n)
        jid = f"j{self.next_id}"
        self.next_id += 1
        m = MJob(jid, n, q, deadline, late, lw, unreachable, rounds)
        self.sched.add_job(m.job())
        self.jobs[jid] = m
        self.watch(m, 0)

    def open_no(self, js):
        return None if js.open is None else js.open.number if js.opening is None else js.opening

    def closed(self, js, m, r):
        sr = js.rounds.get(r)
        mr = m.rnd(r)
        done = sr is not None and sr.done
        q = sr.quorum if sr is not None else m.q
        return done or len(mr.acc) >= q

    def predict(self, m, r, p, uid, bad):
        """('dup', round) | ('ok', round, late) | ('err', types)"""
        js = self.sjs(m)
        if p not in m.parties:
            return ("err", (UnknownParty,))
        if uid is not None and (r, p, uid) in m.uids:
            return ("dup", m.uids[(r, p, uid)])
        if bad:
            return ("err", (jk.NonFiniteUpdate, jk.LayoutMismatch))
        job = js.job
        if r < 0 or job.after_last(r):
            return ("err", (NoSuchRound,))
        if r not in js.rounds:
            if js.ended is not None and js.open is None:
                return ("err", (NoSuchRound,))
            if job.rounds is None and js.open is not None and r > js.open.number + KEEP:
                return ("err", (NoSuchRound,))
        if (r, p) in m.seen:
            return ("err", (jk.DuplicateParty,))
        o = self.open_no(js)
        if o is None or (r < o and r not in js.rounds):
            return ("err", (LateUpdate,))
        if (r, p) in m.carried_out:
            return ("err", (jk.DuplicateParty,))
        if self.closed(js, m, r):
            if m.late == "reject" or r < o - 1:
                return ("err", (LateUpdate,))
            r2 = r
            while self.closed(js, m, r2):
                r2 += 1
                if job.after_last(r2):
                    return ("err", (LateUpdate,))
            if (r2, p) in m.seen:
                return ("err", (jk.DuplicateParty,))
            return ("ok", r2, True)
        return ("ok", r, False)

    SUBMIT = dict(ji=st.integers(0, 5), dr=st.sampled_from([0, 0, 0, -1, -1, 1, 2, -2]), p=st.integers(0, 9),
                  v=st.integers(-8, 8), w=st.sampled_from([1.0, 2.0]),
                  kind=st.sampled_from(["good"] * 10 + ["nan", "shape"]),
                  uidmode=st.sampled_from(["none", "new", "new", "resend"]))

    @rule(**SUBMIT)
    @precondition(lambda self: self.live())
    def submit(self, **kw):
        self._submit(**kw)

    @rule(**SUBMIT)
    @precondition(lambda self: self.live())
    def submit_b(self, **kw):
        self._submit(**kw)

    @rule(**SUBMIT)
    @precondition(lambda self: self.live())
    def submit_c(self, **kw):
        self._submit(**kw)

    def _submit(self, ji, dr, p, v, w, kind, uidmode):
        m = self.live()[ji % len(self.live())]
        js = self.sjs(m)
        o = self.open_no(js)
        r = max(0, (o if o is not None else (m.rounds or 1) - 1) + dr)
        p = p % (m.n + 1)
        party = NONMEMBER if p == m.n else p
        upd = update_of(v)
        if kind == "nan":
            upd["a"][1] = np.nan
        elif kind == "shape":
            upd["a"] = np.zeros(4, np.float32)
        if uidmode == "none":
            uid = None
        elif uidmode == "new":
            m.uid_n += 1
            uid = f"u{m.uid_n}"
        else:
            prev = [k for k in m.uids if k[0] == r and k[1] == party]
            if prev:
                uid = prev[0][2]
            else:
                m.uid_n += 1
                uid = f"u{m.uid_n}"
        pred = self.predict(m, r, party, uid, kind != "good")
        try:
            ack = self.sched.submit(m.jid, r, party, upd, weight=w, update_id=uid)
        except Exception as e:
            assert pred[0] == "err", f"predicted {pred}, got {type(e).__name__}: {e}"
            assert isinstance(e, pred[1]), f"predicted {pred}, got {type(e).__name__}: {e}"
            return
        self.acks.append((m, ack))
        assert pred[0] != "err", f"predicted {pred}, got ack {ack}"
        if pred[0] == "dup":
            assert ack.duplicate and ack.round == pred[1], (pred, ack)
            return
        assert not ack.duplicate and ack.round == pred[1], (pred, ack)
        late = pred[2]
        rc = ack.round
        m.rnd(rc).acc.append((party, v, w * (m.late_weight if late else 1.0)))
        m.seen[(rc, party)] = uid
        if uid is not None:
            m.uids[(r, party, uid)] = rc
        if late:
            m.carried_out[(r, party)] = rc
        self.watch(m, rc)

    @rule(ji=st.integers(0, 5), p=st.integers(0, 9), go=st.integers(0, 1))
    @precondition(lambda self: self.live())
    def drop_party(self, ji, p, go):
        if go:
            return
        m = self.live()[ji % len(self.live())]
        p = p % (m.n + 1)
        party = NONMEMBER if p == m.n else p
        if party not in m.parties:
            try:
                self.sched.drop_party(m.jid, party)
            except UnknownParty:
                return
            raise AssertionError("drop_party of a non-member did not raise UnknownParty")
        self.sched.drop_party(m.jid, party)
        m.dropped.add(party)

    @rule(ji=st.integers(0, 5), go=st.integers(0, 3))
    @precondition(lambda self: self.live())
    def remove_job(self, ji, go):
        if go:
            return
        m = self.live()[ji % len(self.live())]
        pending = {r: f for r, f in m.futs.items() if not f.done()}
        self.sched.remove_job(m.jid)
        m.removed = True
        for r, f in pending.items():
            assert f.done() and isinstance(f.exception(), JobRemoved), (r, f)
            m.rnd(r).outcome = ("error", JobRemoved)
            m.rnd(r).checked = True
        for call in (lambda: self.sched.submit(m.jid, 0, 0, update_of(0)), lambda: self.sched.result(m.jid, 0),
                     lambda: self.sched.drop_party(m.jid, 0)):
            try:
                call()
            except UnknownJob:
                pass
            else:
                raise AssertionError("a removed job's id did not raise UnknownJob")
        assert m.jid not in self.sched.metrics()

    @rule(dt=st.sampled_from([0.0, 0.001, 0.3, 1.0, 1.7, 3.0, 10.0]))
    def advance(self, dt):
        self.clk.run(until=self.clk.now() + dt)

    @rule(ji=st.integers(0, 5), dr=st.integers(-1, 3))
    @precondition(lambda self: self.live())
    def ask(self, ji, dr):
        m = self.live()[ji % len(self.live())]
        js = self.sjs(m)
        o = self.open_no(js)
        if o is None:
            return
        self.watch(m, max(0, o + dr))

    @rule(go=st.integers(0, 3))
    @precondition(lambda self: self.durable and self.sched is not None)
    def restart(self, go):
        if go:
            return
        for m_, a in self.acks:
            if not m_.removed:
                a.durable.result(timeout=30)
        self.sched.close()
        for m in self.live():
            for r, f in m.futs.items():
                assert f.done(), (m.jid, r)
                if not m.rnd(r).checked:
                    e = f.exception()
                    if isinstance(e, SchedulerClosed):
                        continue
                self.check_round(m, r, f)
            m.futs, m.calls = {}, {}
        self.acks = []
        jobs = [m.job() for m in self.live()]
        self.sched = JITScheduler.recover(self.dir, jobs, policy=self.policy, slots=self.slots, clock=self.clk,
                                          cost=COST, checkpoint_bytes=0)
        self.clk.run(until=self.clk.now())  # (a resumed job whose parties are below its quorum fails its round here)
        for m in self.live():
            for r in list(m.rounds_m):
                f = self.watch(m, r)
                mr = m.rounds_m[r]
                if f is None or mr.outcome is None or mr.outcome[1] is JobRemoved:
                    continue
                assert f.done(), f"{m.jid} round {r} ended before the restart ({mr.outcome}) but is open after it"
                if mr.outcome[0] == "result":
                    assert f.exception() is None, (m.jid, r, f.exception())
                    for k in TEMPLATE:
                        assert np.array_equal(f.result()[k], mr.outcome[1][k]), (m.jid, r)
                else:
                    assert f.exception() is not None, (m.jid, r, "failed before the restart, a result after")

    # ---------------------------------------------------------------------------------------------------------
    def check_round(self, m, r, f):
        mr = m.rnd(r)
        if mr.checked:
            return
        e = f.exception()
        if e is None:
            res = f.result()
            assert mr.acc, f"{m.jid} round {r} resolved with a result but the model holds no update"
            if len(mr.acc) < m.q:
                assert m.unreachable == "partial", (m.jid, r, mr.acc, m.q)
            else:
                assert len(mr.acc) == m.q, f"{m.jid} round {r}: {len(mr.acc)} acked > quorum {m.q}"
            exp = expected_mean(mr.acc)
            for k in exp:
                assert np.allclose(res[k], exp[k], rtol=1e-5, atol=1e-5), \
                    f"{m.jid} round {r}: got {res}, expected {exp} from {mr.acc}"
            mr.outcome = ("result", res)
        elif isinstance(e, SchedulerClosed):
            return  # (the durable variant checks again after recover)
        else:
            assert isinstance(e, (QuorumUnreachable, SchedulerError)), (m.jid, r, repr(e))
            assert not isinstance(e, JobRemoved) or m.removed
            assert len(mr.acc) < m.q, f"{m.jid} round {r} failed ({e!r}) with {len(mr.acc)} >= quorum {m.q} acked"
            mr.outcome = ("error", type(e))
        mr.checked = True

    @invariant()
    def rounds_consistent(self):
        if self.sched is None:
            return
        for m in self.live():
            for r, f in list(m.futs.items()):
                assert m.calls[r] <= 1
                if f.done():
                    self.check_round(m, r, f)
        for m in self.live():
            js = self.sjs(m)
            for r, sr in js.rounds.items():
                # acknowledged count: the scheduler's admitted matches the model's
                if r in m.rounds_m and not js.rounds[r].done:
                    assert sr.admitted == len(m.rounds_m[r].acc), (m.jid, r, sr.admitted, m.rounds_m[r].acc)

    @invariant()
    def accounting(self):
        if self.sched is None:
            return
        s = self.sched
        assert s.buffered_bytes >= 0, s.buffered_bytes
        assert s.buffered_bytes == sum(js.buffered_bytes for js in s.jobs.values()), \
            (s.buffered_bytes, {j: js.buffered_bytes for j, js in s.jobs.items()})
        for jid, mm in s.metrics().items():
            assert mm["busy_s"] <= mm["deployed_s"] + 1e-9, (jid, mm)
        deployed = sum(js.deployment is not None for js in s.jobs.values()) + len(s._removing)
        assert deployed + len(s.free_slots) == s.slots, (deployed, s.free_slots)
        quiet = not self.clk._soon and all(
            js.deployment is None or not js.deployment.busy for js in s.jobs.values()) and all(
            not r.pending for js in s.jobs.values() for r in js.rounds.values())
        if quiet:
            assert s.buffered_bytes == 0, (s.buffered_bytes, {j: js.buffered_bytes for j, js in s.jobs.items()})


class DurableMachine(SchedulerMachine):
    durable = True


SchedulerMachine.TestCase.settings = settings(max_examples=int(os.environ.get("SM_EXAMPLES", 60)),
                                              stateful_step_count=int(os.environ.get("SM_STEPS", 40)),
                                              deadline=None, suppress_health_check=list(HealthCheck))
DurableMachine.TestCase.settings = settings(max_examples=int(os.environ.get("SM_EXAMPLES", 30)),
                                            stateful_step_count=int(os.environ.get("SM_STEPS", 40)),
                                            deadline=None, suppress_health_check=list(HealthCheck))
TestScheduler = SchedulerMachine.TestCase
TestDurable = DurableMachine.TestCase
