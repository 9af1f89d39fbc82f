"""The JIT scheduler on a virtual clock: exact accounting on hand-computed scenarios, policies, slots, errors."""

import math
import random

import numpy as np
import pytest

import jitkernels as jk
from scheduler import (Backpressure, BackendCost, CostModel, InvalidJob, JITScheduler, Job, LateUpdate, NoSuchRound,
                       QuorumUnreachable, SchedulerClosed, UnknownParty, VirtualClock)
from scheduler.executors import ModelExecutor, _call

# fold(n) = (n * 4000 + 8000) / 1e6 s; finalize = 8000 / 1e6 s; start-up 1 s
COST = CostModel(backends={"cpu": BackendCost(1e6, 0.0)}, startup_s=1.0)


def _two_party_round(policy):
    clk = VirtualClock()
    sched = JITScheduler(policy, slots=1, clock=clk, cost=COST, oracle=lambda j, r: 20.0)
    sched.add_job(Job("a", parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(10.0, sched.submit, "a", 0, "p0", None, 1.0)
    clk.call_at(20.0, sched.submit, "a", 0, "p1", None, 1.0)
    clk.run()
    assert sched.result("a", 0).done()
    return sched.metrics()["a"]


@pytest.mark.parametrize("policy,deployed,busy,latency", [
    # lazy: deploy at the quorum (20), ready 21, fold both (0.016), finalize (0.008)
    ("lazy", 1.024, 0.024, 1.024),
    # eager: deployed 0 .. 20.020; folds at 10 and 20 (0.012 each), finalize 0.008
    ("eager", 20.020, 0.032, 0.020),
    # oracle: knows T_q = 20, plans work 0.024 + start-up 1: deploys at 18.976; folds p0 at 19.976, p1 at 20
    ("oracle", 20.020 - 18.976, 0.032, 0.020),
])
def test_hand_computed_accounting(policy, deployed, busy, latency):
    m = _two_party_round(policy)
    assert m["deployed_s"] == pytest.approx(deployed, abs=1e-9)
    assert m["busy_s"] == pytest.approx(busy, abs=1e-9)
    assert m["latency_p50_s"] == pytest.approx(latency, abs=1e-9)
    assert m["deployments"] == 1 and m["rounds"] == 1


def _periodic(policy, *, jitter=0.05, rounds=30, startup=5.0, parties=10, seed=1, quorum=1.0, alpha=0.05,
              own_times=False):
    """Rounds start when the previous model is ready; the parties' response times are 100 * (1 + 0.05 i) * (1 +
    jitter N), party i taking the i-th fastest of them, or (``own_times``) its own."""
    clk = VirtualClock()
    truth = {}
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=startup)
    sched = JITScheduler(policy, slots=1, clock=clk, cost=cost, alpha=alpha, oracle=lambda j, r: truth.get(r))
    ids = list(range(parties))
    job = Job("a", parties=ids, quorum=quorum, rounds=rounds, model_elems=10_000_000, update_bytes=40_000_000)
    sched.add_job(job)
    rng = random.Random(seed)
    q = job.quorum_count()

    def start(r, t0):
        times = [t0 + 100 * (1 + 0.05 * p) * max(0.05, 1 + jitter * rng.gauss(0, 1)) for p in ids]
        times = times if own_times else sorted(times)
        truth[r] = sorted(times)[q - 1]
        for p, t in zip(ids, times):
            clk.call_at(t, send, r, p)

    def send(r, p):
        try:
            sched.submit("a", r, p, None, 1.0)
        except LateUpdate:  # past a quorum below 1: membership is fixed
            pass

    for r in range(rounds):
        sched.result("a", r).add_done_callback(lambda f, r=r: start(r + 1, clk.now()) if r + 1 < rounds else None)
    start(0, 0.0)
    clk.run()
    return sched.metrics()["a"], sched


def test_jit_saves_most_of_lazys_saving_with_little_latency():
    eager, _ = _periodic("eager")
    lazy, _ = _periodic("lazy")
    jit, sched = _periodic("jit")
    oracle, _ = _periodic("oracle")
    saving = (eager["deployed_s"] - jit["deployed_s"]) / (eager["deployed_s"] - lazy["deployed_s"])
    assert saving > 0.85
    assert jit["latency_p50_s"] <= eager["latency_p50_s"] + 1e-9
    assert lazy["latency_p50_s"] > 5.0  # lazy pays the start-up on every round
    assert oracle["deployed_s"] <= jit["deployed_s"]
    # every decision is logged with its inputs
    plans = [d for d in sched.decisions if d["event"] == "deploy_planned"]
    assert plans and {"quantile_s", "work_s", "startup_s", "alpha"} <= set(plans[-1]["plan"])


def test_same_arrivals_for_every_policy_give_same_membership():
    """Common random numbers: the draws depend on the seed, not on the policy's timing, so the members (the first q
    arrivals) are the same. With quorum 1.0 every round's members were all parties and this held for any draws:
    here half the parties, with jitter that reorders them from round to round."""
    rounds = {p: _periodic(p, rounds=5, quorum=0.5, jitter=0.5, own_times=True)[1].jobs["a"].rounds
              for p in ("eager", "lazy", "jit")}
    members = {p: [frozenset(r.members) for r in rs.values()] for p, rs in rounds.items()}
    assert all(len(m) == 5 for ms in members.values() for m in ms)
    assert len(set(members["eager"])) > 1  # the draws choose them
    assert members["eager"] == members["lazy"] == members["jit"]


def test_quorum_fraction_fixes_membership_and_rejects_late():
    clk = VirtualClock()
    sched = JITScheduler("lazy", clock=clk, cost=COST)
    sched.add_job(Job("a", parties=list("abcd"), quorum=0.5, rounds=2, model_elems=1000, update_bytes=4000))
    for t, p in [(1, "a"), (2, "b")]:
        clk.call_at(t, sched.submit, "a", 0, p, None, 1.0)
    clk.run(until=10)
    assert sched.jobs["a"].rounds[0].members == ["a", "b"]
    with pytest.raises(LateUpdate, match="'c'"):
        sched.submit("a", 0, "c", None, 1.0)
    with pytest.raises(UnknownParty):
        sched.submit("a", 1, "zz", None, 1.0)
    with pytest.raises(jk.InvalidWeight):
        sched.submit("a", 1, "a", None, -1.0)


def test_late_updates_can_go_to_the_next_round():
    clk = VirtualClock()
    sched = JITScheduler("lazy", clock=clk, cost=COST)
    sched.add_job(Job("a", parties=list("abc"), quorum=2, rounds=2, model_elems=1000, update_bytes=4000,
                      late="next_round"))
    for t, p in [(1, "a"), (2, "b"), (3, "c")]:
        clk.call_at(t, sched.submit, "a", 0, p, None, 1.0)
    clk.run()
    assert sched.jobs["a"].rounds[1].members == ["c"]
    assert any(d["event"] == "late_to_next_round" for d in sched.decisions)


@pytest.mark.parametrize("policy", ["lazy", "eager"])
def test_a_carried_update_teaches_the_predictor_once(policy):
    """A late update carried to the next round is one answer, to its own round, at its own response time: it used to
    be observed again when the next round took it (at that round's start: a response time of 0, which pulled the
    party's model to ~1e-4 s) and counted as that round's answer too. Nor is the round it went to counted as a
    miss: the party could send nothing for it (its own update is a DuplicateParty there), and parties that answered
    every round they could drifted to participation 0.5-0.8."""
    clk = VirtualClock()
    sched = JITScheduler(policy, clock=clk, cost=COST)
    sched.add_job(Job("a", parties=["fast", "slow"], quorum=1, rounds=3, model_elems=1000, update_bytes=4000,
                      late="next_round"))
    clk.call_at(10.0, sched.submit, "a", 0, "fast", None, 1.0)
    clk.call_at(10.5, sched.submit, "a", 0, "slow", None, 1.0)
    clk.run(until=30.0)
    js = sched.jobs["a"]
    assert js.rounds[1].members == ["slow"]
    m = js.predictor.model("slow")
    assert m.n == 1 and m.mu == pytest.approx(np.log(10.5))
    assert m.rounds == 1 and m.closed_round == 0 and m.participation == 1.0  # round 1 not counted
    sched.close()


def test_membership_is_decided_at_submit_so_an_accepted_update_is_never_dropped():
    """Three submits before the event loop runs, quorum 2: the third is refused at once (it used to be accepted and
    then dropped as late when the loop saw the quorum); under late='next_round' it is acknowledged for round 1, at
    the late weight, and a second update of that party for round 1 is refused rather than counted twice."""
    t = {"w": np.zeros(4, np.float32)}
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=t, parties=list("abc"), quorum=2, rounds=2))
    acks = [s.submit("j", 0, p, {"w": np.full(4, i + 1, np.float32)}) for i, p in enumerate("ab")]
    with pytest.raises(LateUpdate, match="round 0 is closed.*'c'"):
        s.submit("j", 0, "c", {"w": np.ones(4, np.float32)})
    s.clock.run()
    assert all(a.accepted for a in acks) and np.array_equal(s.result("j", 0).result()["w"], np.full(4, 1.5))

    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=t, parties=list("abc"), quorum=2, rounds=2, late="next_round", late_weight=0.5))
    for p in "ab":
        s.submit("j", 0, p, {"w": np.ones(4, np.float32)})
    ack = s.submit("j", 0, "c", {"w": np.full(4, 3.0, np.float32)}, weight=2.0, update_id="c0")
    assert ack.round == 1 and s.jobs["j"].rounds[1].admitted == 1
    assert s.submit("j", 0, "c", {"w": np.full(4, 3.0, np.float32)}, weight=2.0, update_id="c0").duplicate
    with pytest.raises(jk.DuplicateParty, match="round 1"):
        s.submit("j", 1, "c", {"w": np.ones(4, np.float32)})
    s.submit("j", 1, "a", {"w": np.zeros(4, np.float32)}, weight=1.0)
    s.clock.run()
    assert s.jobs["j"].rounds[1].members == ["c", "a"]
    assert np.array_equal(s.result("j", 1).result()["w"], np.full(4, 1.5))  # (1.0 * 3 + 1 * 0) / 2


def test_updates_for_rounds_that_are_over_are_refused():
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template={"w": np.zeros(2, np.float32)}, parties=list("ab"), quorum=1, rounds=2,
                  first_round=5))
    with pytest.raises(NoSuchRound, match="has no round 3 \\(its rounds: 5 to 6\\)"):
        s.submit("j", 3, "a", {"w": np.ones(2, np.float32)})
    s.submit("j", 5, "a", {"w": np.ones(2, np.float32)})
    s.clock.run()
    with pytest.raises(LateUpdate, match="round 5 is closed"):
        s.submit("j", 5, "b", {"w": np.ones(2, np.float32)})
    s.submit("j", 6, "a", {"w": np.ones(2, np.float32)})
    s.clock.run()
    with pytest.raises(LateUpdate, match="the job has finished"):
        s.submit("j", 6, "b", {"w": np.ones(2, np.float32)})
    with pytest.raises(NoSuchRound, match="has no round 7"):
        s.submit("j", 7, "b", {"w": np.ones(2, np.float32)})
    assert s.buffered_bytes == 0


def test_rounds_a_job_does_not_have_are_refused_not_held_for_ever():
    """result() and submit() of a round after the job's last, or far ahead of the open one, used to make a pending
    entry that nothing would ever resolve; a late update carried from the last round went to such a round and was
    acknowledged, then never folded."""
    u = {"w": np.ones(2, np.float32)}
    s = JITScheduler("eager", clock=VirtualClock(), keep_rounds=4)
    s.add_job(Job("j", template={"w": np.zeros(2, np.float32)}, parties=list("ab"), quorum=1, rounds=2,
                  late="next_round"))
    with pytest.raises(NoSuchRound, match="has no round 2 \\(its rounds: 0 to 1\\)"):
        s.result("j", 2)
    with pytest.raises(NoSuchRound, match="has no round -1"):
        s.result("j", -1)
    assert not s.result("j", 1).done()  # the next round is a round like any other
    s.submit("j", 0, "a", u)
    s.submit("j", 1, "a", u)
    with pytest.raises(LateUpdate, match="no round to carry it to"):
        s.submit("j", 1, "b", u)  # round 1's quorum is in, and it is the last
    s.clock.run()
    assert sorted(s.jobs["j"].rounds) == [0, 1] and s.buffered_bytes == 0

    s = JITScheduler("eager", clock=VirtualClock(), keep_rounds=4)
    s.add_job(Job("j", template={"w": np.zeros(2, np.float32)}, parties=list("ab"), quorum=1))
    with pytest.raises(NoSuchRound, match="round 5 is more than keep_rounds = 4 ahead of the open round 0"):
        s.result("j", 5)
    with pytest.raises(NoSuchRound, match="ahead"):
        s.submit("j", 10**9, "a", u)
    s.submit("j", 4, "a", u)  # within reach: held until it opens
    assert sorted(s.jobs["j"].rounds) == [0, 4]
    s.close()


class _FailingFolds(ModelExecutor):
    """Folds that fail after 10 s (e.g. a full disk under the checkpoint)."""

    def fold_many(self, agg, items):
        raise OSError("No space left on device")

    def run(self, task, done):
        _, r, e = _call(task)
        self.clock.call_later(10.0, done, 10.0, r, e)


def test_a_failed_fold_releases_its_bytes_and_a_late_failure_leaves_the_clock_running():
    """A fold that fails resolves its round with the error and gives back the bytes it held; one that fails after
    the round's deadline already resolved it is logged, not set twice (that raised out of the clock's loop)."""
    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, executor=_FailingFolds(clk))
    s.add_job(Job("j", template={"w": np.zeros(4, np.float32)}, parties=["a", "b"], quorum=2, rounds=1,
                  deadline_s=1.0))
    s.submit("j", 0, "a", {"w": np.ones(4, np.float32)})
    clk.run(until=20)
    assert isinstance(s.result("j", 0).exception(), QuorumUnreachable)
    assert any(d["event"] == "fold_failed_after_round_end" for d in s.decisions)
    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, executor=_FailingFolds(clk))
    s.add_job(Job("j", template={"w": np.zeros(4, np.float32)}, parties=["a", "b"], quorum=2, rounds=1))
    for p in "ab":
        s.submit("j", 0, p, {"w": np.ones(4, np.float32)})
    clk.run(until=30)
    assert isinstance(s.result("j", 0).exception(), OSError) and s.buffered_bytes == 0


def test_a_round_that_cannot_open_is_tried_again_and_strands_no_other_job(monkeypatch):
    """A round whose aggregator cannot be made (MemoryError) opens a start-up later, with the updates sent for it
    meanwhile; the error does not leave the thread that ended the last round, and other jobs go on. (It went out of
    the fold's completion, and the round, and every job's opening after it in that batch, never opened.)"""
    clk = VirtualClock()
    s = JITScheduler("eager", slots=2, clock=clk, cost=COST)
    tmpl = {"w": np.zeros(3, np.float32)}
    for j in "ab":
        s.add_job(Job(j, template=tmpl, parties=["p", "q"], quorum=2, rounds=2))
    real, failed = JITScheduler._open_round, []

    def open_round(self, js, number):
        if js.job.id == "a" and number == 1 and not failed:
            failed.append(clk.now())
            raise MemoryError("no room for the aggregator")
        return real(self, js, number)

    monkeypatch.setattr(JITScheduler, "_open_round", open_round)
    for r in (0, 1):
        for j in "ab":
            for i, p in enumerate("pq"):
                clk.call_at(10.0 * (r + 1) + i, s.submit, j, r, p, {"w": np.full(3, r + i, np.float32)})
    clk.run()
    assert failed
    for j in "ab":  # round 1's mean of (1, 2): a's updates came before its round could open, and were kept
        assert s.result(j, 1).done(), j
        np.testing.assert_array_equal(s.result(j, 1).result()["w"], np.full(3, 1.5, np.float32))
    assert any(d["event"] == "open_failed" and d["job"] == "a" for d in s.decisions)
    opened = next(d["t"] for d in s.decisions if d["event"] == "open_round" and d["job"] == "a" and d["round"] == 1)
    assert opened == failed[0] + COST.startup_s


def test_close_shuts_down_even_if_a_done_callback_raises():
    """A done-callback raising a BaseException while close() resolves the rounds: the scheduler still stops its
    executor, clock and state directory (close went out before them)."""
    s = JITScheduler("jit")
    s.add_job(Job("j", template={"w": np.zeros(2, np.float32)}, parties=list("ab"), quorum=2))

    def interrupt(_):
        raise KeyboardInterrupt

    s.result("j", 0).add_done_callback(interrupt)
    with pytest.raises(KeyboardInterrupt):
        s.close()
    assert s.executor.pool._shutdown and not s.clock._thread.is_alive()


def test_close_resolves_open_rounds_and_refuses_later_submits():
    s = JITScheduler("jit")
    s.add_job(Job("j", template={"w": np.zeros(2, np.float32)}, parties=list("ab"), quorum=2))
    s.submit("j", 0, "a", {"w": np.ones(2, np.float32)})
    fut = s.result("j", 0)
    s.close()
    with pytest.raises(SchedulerClosed, match="round 0"):
        fut.result(timeout=5)
    with pytest.raises(SchedulerClosed, match="'b'"):
        s.submit("j", 0, "b", {"w": np.ones(2, np.float32)})


def test_unreachable_quorum_resolves_with_a_typed_error_or_partial():
    for rule in ("error", "partial"):
        clk = VirtualClock()
        sched = JITScheduler("jit", clock=clk, cost=COST)
        sched.add_job(Job("a", parties=list("abc"), quorum=3, rounds=1, deadline_s=50.0, model_elems=1000,
                          update_bytes=4000, unreachable=rule))
        clk.call_at(5, sched.submit, "a", 0, "a", None, 1.0)
        clk.run()
        fut = sched.result("a", 0)
        if rule == "error":
            with pytest.raises(QuorumUnreachable, match="deadline"):
                fut.result()
        else:
            assert fut.done() and fut.exception() is None
        # a missed deadline counts once, whether the round fails or finalizes partially after it
        assert sched.metrics()["a"]["unreachable_rounds"] == 1 and sched.metrics()["a"]["deadline_misses"] == 1


def test_dropped_parties_make_a_round_unreachable():
    clk = VirtualClock()
    sched = JITScheduler("lazy", clock=clk, cost=COST)
    sched.add_job(Job("a", parties=list("abc"), quorum=3, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(1, sched.submit, "a", 0, "a", None, 1.0)
    clk.call_at(2, sched.drop_party, "a", "b")
    clk.run()
    with pytest.raises(QuorumUnreachable, match="parties left"):
        sched.result("a", 0).result()


def test_an_update_acknowledged_before_its_party_is_dropped_still_counts():
    """drop_party's reachability check counted arrived members and parties still expected, not acknowledged updates
    whose arrivals were still queued: c's update, acknowledged as the quorum's third, then c dropped, and the check
    ran first (a race with submit's persisting on real clocks, 8-27 in 200 runs): QuorumUnreachable, c's update
    thrown away. Here the check runs exactly there."""
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template={"w": np.zeros(4, np.float32)}, parties=list("abc"), quorum=3, rounds=1))
    for i, p in enumerate("ab"):
        s.submit("j", 0, p, {"w": np.full(4, i + 1.0, np.float32)})
    s.clock.run()
    s.submit("j", 0, "c", {"w": np.full(4, 6.0, np.float32)})
    s.drop_party("j", "c")
    s._check_reachable(s.jobs["j"])  # before c's queued arrival
    s.clock.run()
    assert np.array_equal(s.result("j", 0).result(timeout=1)["w"], np.full(4, 3.0))
    s.close()


def test_an_update_is_taken_in_memory_only_within_the_budget():
    """submit took an update whenever the buffered bytes were under the budget, so with updates of several sizes
    the bytes passed it by most of an update, and a fold's read-back past it added one more (budget + 1.7-1.9
    updates with 8 and 6 KB updates). An update is now taken only if it fits; one that never can is refused when
    its job is added."""
    from scheduler import InvalidJob

    s = JITScheduler("lazy", clock=VirtualClock(), byte_budget=10_000, overflow="raise")
    s.add_job(Job("a", parties=list(range(5)), quorum=5, rounds=1, model_elems=750, update_bytes=3000))
    s.add_job(Job("b", parties=list(range(5)), quorum=5, rounds=1, model_elems=2000, update_bytes=8000))
    for p in range(3):
        s.submit("a", 0, p, None, 1.0)
    with pytest.raises(Backpressure, match="9000 bytes are buffered; its 8000 would pass the budget of 10000"):
        s.submit("b", 0, 0, None, 1.0)
    assert s.buffered_bytes == 9000 and s.peak_buffered_bytes <= 10_000
    with pytest.raises(InvalidJob, match="do not fit the byte budget"):
        s.add_job(Job("c", parties=[0], quorum=1, rounds=1, model_elems=3000, update_bytes=12_000))
    assert "c" not in s.jobs
    # a job's update_bytes below its real updates' size passes add_job's check: each update says it can never fit
    # (it said to retry once the folds had drained the buffer, which held nothing)
    s.add_job(Job("d", template={"w": np.zeros(3000, np.float32)}, parties=[0], rounds=1, update_bytes=4000))
    with pytest.raises(Backpressure, match="12000 bytes are more than the whole budget of 10000: no fold makes room"):
        s.submit("d", 0, 0, {"w": np.ones(3000, np.float32)})
    s.close()


def test_burst_stays_within_byte_budget_plus_one_update():
    clk = VirtualClock()
    budget = 10 * 4000
    sched = JITScheduler("lazy", clock=clk, cost=COST, byte_budget=budget)
    parties = list(range(100))
    sched.add_job(Job("a", parties=parties, quorum=100, rounds=1, model_elems=1000, update_bytes=4000))
    accepted, refused = [], []

    def burst(p):
        try:
            sched.submit("a", 0, p, None, 1.0)
            accepted.append(p)
        except Backpressure:
            refused.append(p)
            clk.call_later(0.05, burst, p)  # the client retries

    for p in parties:  # 10x the budget at once
        clk.call_at(1.0, burst, p)
    clk.run()
    assert refused and sorted(accepted) == parties
    assert sched.peak_buffered_bytes <= budget + 4000
    assert sched.result("a", 0).done()


def test_least_laxity_first_and_preemption_of_idle_deployments():
    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=2.0)
    sched = JITScheduler("eager", slots=1, clock=clk, cost=cost, hysteresis_s=0.5)
    sched.add_job(Job("a", parties=["x"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000))
    sched.add_job(Job("b", parties=["y"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(50, sched.submit, "b", 0, "y", None, 1.0)
    clk.call_at(100, sched.submit, "a", 0, "x", None, 1.0)
    clk.run()
    assert sched.result("a", 0).done() and sched.result("b", 0).done()
    events = [(d["event"], d["job"]) for d in sched.decisions if d["event"] in ("deploy", "wait_slot", "preempt")]
    assert events[0] == ("deploy", "a") and ("wait_slot", "b") in events


def test_real_aggregation_on_virtual_clock_equals_direct_fold():
    rng = np.random.default_rng(0)
    tmpl = {"w": np.zeros((20, 10), np.float32), "b": np.zeros(10, np.float32)}
    ups = {p: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tmpl.items()} for p in range(6)}
    clk = VirtualClock()
    sched = JITScheduler("jit", clock=clk, cost=COST)
    sched.add_job(Job("a", template=tmpl, parties=list(ups), quorum=6, rounds=1))
    for i, p in enumerate(ups):
        clk.call_at(10.0 * (i + 1), sched.submit, "a", 0, p, ups[p], float(p + 1))
    clk.run()
    got = sched.result("a", 0).result()
    ref = jk.Aggregator(tmpl)
    ref.fold_many(list(ups.values()), [p + 1 for p in ups], parties=list(ups))
    want = ref.finalize()
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    with pytest.raises(jk.LayoutMismatch):
        sched.submit("a", 1, 0, {"w": np.zeros(3, np.float32)}, 1.0)


def test_cost_model_calibrates_saves_and_loads(tmp_path):
    cm = CostModel.calibrate(sizes=(20_000, 200_000), k=4, repeats=2, startup_s=3.0)
    b = cm.backends["cpu"]
    assert b.throughput_Bps > 1e8 and b.call_s > 0 and cm.startup_s == 3.0
    cm.save(tmp_path / "cost.json")
    again = CostModel.load(tmp_path / "cost.json")
    assert again == cm
    assert again.fold_s(4000 * 10, 10, 1000) == pytest.approx(b.call_s + (40000 + 8000) / b.throughput_Bps)


@pytest.mark.parametrize("body", [
    '{"backend": "cpu", "backends": {"cpu": {"throughput_Bps": 1' + "0" * 400 + '}}}',  # OverflowError
    '{"backend": "cpu", "backends": {"cpu": {"throughput_Bps": true}}}',  # a throughput of 1
    '{"backend": "cpu", "backends": ["cpu"]}',  # AttributeError
    '{"backend": "cpu", "backends": {"cpu": {"throughput_Bps": 1e9}}, "startup_s": "1"}',
    "[" * 100_000 + "]" * 100_000,  # RecursionError
    '{"backend": "cpu", "backends": {"cpu": {"throughput_Bps": 1e9}}, "acc_itemsize": 1' + "0" * 400 + '}',
], ids=["400-digits", "true", "list", "str", "deep", "itemsize"])
def test_bad_cost_files_are_value_errors(tmp_path, body):
    """A calibration file is read by jitagg, which reports ValueError/TypeError/OSError by name: a 400-digit
    integer, a list of backends or JSON nested too deep escaped as tracebacks, and `true` was a throughput of 1; a
    400-digit acc_itemsize loaded, and every fold estimate raised OverflowError on the clock's thread."""
    (tmp_path / "cost.json").write_text(body)
    with pytest.raises(ValueError):
        CostModel.load(tmp_path / "cost.json")


def test_the_calibration_fit_takes_the_call_cost_from_the_small_calls():
    """Timings of 0.4 MB to 300 MB folds with 5% noise on the largest: a plain least-squares line took its intercept
    (the per-call cost, ~20 us) from that noise (a busy machine's calibrations gave 4-7 ms)."""
    from scheduler.cost import fit_call_and_throughput

    call, bw = 20e-6, 30e9
    sizes = np.array([1_000, 100_000, 1_000_000, 8_000_000]) * 40.0
    for noise in (1.05, 0.95):
        t = call + sizes / bw
        t[-1] *= noise
        got_call, got_bw = fit_call_and_throughput(sizes, t)
        assert 0.5 * call < got_call < 2 * call and 0.9 * bw < got_bw < 1.1 * bw


def test_the_calibration_fit_refuses_bad_timings_and_a_line_without_slope():
    """A 0 or NaN timing failed in LAPACK (an untyped LinAlgError, and a message on stderr); timings that the
    per-call cost dominates fitted 1.6e27 B/s, and every estimate became the call cost alone. Bad timings are a
    ValueError; a line without a clear slope takes the best rate a call showed."""
    from scheduler.cost import fit_call_and_throughput

    sizes = np.array([1_000, 100_000, 1_000_000, 8_000_000]) * 40.0
    for bad in (0.0, -1e-6, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite timings > 0"):
            fit_call_and_throughput(sizes, [bad, 2e-4, 2e-3, 1.6e-2])
    call, bw = fit_call_and_throughput(sizes, [1e-3] * 4)
    assert bw == pytest.approx(sizes[-1] / 1e-3) and call == pytest.approx(1e-3)


@pytest.mark.parametrize("rule", ["fedmedian", "krum"])
def test_a_robust_job_buffers_its_rounds_through_the_scheduler(rule):
    """A buffered (robust) rule runs through the JIT scheduler unchanged: each round's result equals the rule over
    that round's updates."""
    from jitkernels import robust as R

    alg = R.FedMedian() if rule == "fedmedian" else R.Krum(f=1)
    rng = np.random.default_rng(0)
    tmpl = {"w": np.zeros(1000, np.float32)}
    parties = [f"p{i}" for i in range(7)]
    sched = JITScheduler("jit", slots=1, clock=VirtualClock())
    sched.add_job(Job("j", template=tmpl, parties=parties, quorum=1.0, rounds=2, algorithm=alg, prior_response_s=1.0))
    ups = {}
    for r in range(2):
        for i, p in enumerate(parties):
            ups[(r, p)] = {"w": rng.standard_normal(1000).astype(np.float32)}
            sched.clock.call_at(r * 10 + i * 0.1 + 0.1, sched.submit, "j", r, p, ups[(r, p)], 1.0)
    sched.clock.run()
    for r in range(2):
        agg = jk.Aggregator(tmpl, alg)
        agg.fold_many([ups[(r, p)] for p in parties], parties=parties)
        assert np.array_equal(agg.finalize()["w"], sched.result("j", r).result(timeout=5)["w"])


def test_a_freed_slot_goes_first_to_a_job_whose_quorum_is_in():
    """Least laxity first, except that a waiting job whose quorum has arrived (every second is added latency) comes
    before one that is only past its planned start (its quorum may be minutes away): on cross_silo the slot went by
    laxity to an idle-bound 1B-parameter job while a 25M job's quorum waited 630 s."""
    clk = VirtualClock()
    sched = JITScheduler("lazy", slots=1, clock=clk, cost=COST)
    for j in ("h", "u", "r"):
        sched.add_job(Job(j, parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(10.0, sched.submit, "h", 0, "p0", None, 1.0)
    clk.call_at(10.0, sched.submit, "h", 0, "p1", None, 1.0)
    clk.run(until=10.5)  # h holds the slot (lazy: deployed at its quorum, ready at 11)
    u, r = sched.jobs["u"], sched.jobs["r"]
    with sched._lock:
        u.open.quorum_time, u.open.plan_t = 10.5, 10.5  # quorum in, waiting
        r.open.plan_t = 5.0  # past its planned start by more, quorum not in
        sched.waiting.update({"u": 0.0, "r": -5.5})
    clk.run(until=12.0)
    deployed = [d["job"] for d in sched.decisions if d["event"] == "deploy"]
    assert deployed[:2] == ["h", "u"]


def _scripted():
    """A policy whose idle "h..." jobs deploy at once and could be redeployed ``laxity[job]`` seconds from now (0
    until a test raises it); the other jobs deploy at their quorum."""
    from scheduler.policies import Policy

    class Scripted(Policy):
        name = "scripted"

        def __init__(self):
            self.laxity = {}

        def deploy_at(self, sched, js, rnd, *, redeploy=False):
            now = sched.clock.now()
            if js.job.id.startswith("h"):
                return (now + self.laxity.get(js.job.id, 0.0) if redeploy else now), {}
            return (now, {}) if rnd.quorum_time is not None else (None, {})

    return Scripted()


def test_close_stops_the_retries_and_hands_no_slot_out():
    """close() while a job whose quorum is in waits for a slot: its retries stop (they re-armed for ever: a virtual
    clock's run() never returned), and the slots freed by close go to nobody (a waiting job got one and folded and
    finalized after close)."""
    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=8.0)
    sched = JITScheduler(_scripted(), slots=1, clock=clk, cost=cost, hysteresis_s=0.5)
    for j in ("u1", "u2", "h"):  # h's release comes last in close's loop: u1 and u2 were passed already
        sched.add_job(Job(j, parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    for j in ("u1", "u2"):
        clk.call_at(5.0, sched.submit, j, 0, "p0", None, 1.0)
        clk.call_at(5.0, sched.submit, j, 0, "p1", None, 1.0)
    clk.run(until=6.0)
    assert set(sched.waiting) == {"u1", "u2"} and sched._retries
    sched.close()
    n = len(sched.decisions)
    clk.run()  # returns: nothing is left scheduled
    assert not sched._retries and not sched.waiting
    assert len(sched.decisions) == n and list(sched.decisions)[-1]["event"] == "release"  # close's own, last
    assert all(js.deployment is None for js in sched.jobs.values())


def test_a_waiting_quorum_looks_again_for_an_idle_deployment_to_take_back():
    """A job whose quorum is in and finds no deployment it may take back (their laxities are too small) looks again
    every quarter start-up: an idle deployment's laxity grows while its quorum fails to come, and the round should
    not wait for that job's quorum (a 25M job waited 360 s that way on cross_silo)."""
    pol = _scripted()
    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=8.0)  # retries every 2 s
    sched = JITScheduler(pol, slots=1, clock=clk, cost=cost, hysteresis_s=0.5)
    for j in ("h", "u"):
        sched.add_job(Job(j, parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(5.0, sched.submit, "u", 0, "p0", None, 1.0)
    clk.call_at(5.0, sched.submit, "u", 0, "p1", None, 1.0)
    clk.call_at(6.0, pol.laxity.__setitem__, "h", 20.0)  # h's parties are late: it could now redeploy later
    clk.run(until=30.0)
    got = [(d["t"], d["event"], d["job"]) for d in sched.decisions if d["event"] in ("wait_slot", "preempt", "deploy")]
    assert got[:4] == [(0.0, "deploy", "h"), (5.0, "wait_slot", "u"), (7.0, "preempt", "h"), (7.0, "deploy", "u")]
    assert sched.result("u", 0).done() and sched.metrics()["u"]["latency_p50_s"] == pytest.approx(2.0 + 8.0, abs=0.01)
    sched.close()


def test_the_search_for_a_slot_to_take_back_replans_at_most_search_max_deployments():
    """Each idle deployment the search weighs is re-planned as a redeployment (a quantile over its parties): with
    1,000 jobs on 200 slots that was 1.9M quantiles for 2M updates, most of a simulation. It weighs the SEARCH_MAX
    planned furthest ahead; a victim among them is still taken."""
    from scheduler import core
    from scheduler.policies import Policy

    replans = []

    class Idle(Policy):  # "h..." jobs deploy at once, then (taken back, or weighed for it) 20 s from now
        name = "idle"

        def deploy_at(self, sched, js, rnd, *, redeploy=False):
            now = sched.clock.now()
            if js.job.id.startswith("h"):
                replans.append(redeploy)
                return now + (20.0 if redeploy or js.metrics.deployments else 0.0), {}
            return (now, {}) if rnd.quorum_time is not None else (None, {})

    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=8.0)
    most = getattr(core, "SEARCH_MAX", 8)
    n = most + 4
    sched = JITScheduler(Idle(), slots=n, clock=clk, cost=cost, hysteresis_s=0.5)
    for j in [f"h{i}" for i in range(n)] + ["u"]:
        sched.add_job(Job(j, parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    clk.run(until=1.0)
    assert all(sched.jobs[f"h{i}"].deployment for i in range(n)) and not sched.jobs["u"].deployment
    replans.clear()
    for p in ("p0", "p1"):
        clk.call_at(5.0, sched.submit, "u", 0, p, None, 1.0)
    clk.run(until=6.0)
    assert sum(replans) == most
    assert [d["event"] for d in sched.decisions if d["t"] == 5.0 and d["event"] in ("preempt", "deploy")] == \
        ["preempt", "deploy"] and sched.jobs["u"].deployment
    sched.close()


def test_a_quorum_that_is_in_weighs_the_idle_deployments_past_the_first_search_max():
    """(Review.) The search weighs first the SEARCH_MAX idle deployments planned furthest ahead, by plans made
    before they deployed: h0 deployed first and its parties are late (it could redeploy 100 s from now), h1..h8
    planned later and expect their quorums at once. u's quorum is in: it waited 10 s for a slot (and then took h8's,
    which took h0's: two start-ups). Where none of the first qualifies and a quorum waits, the rest are weighed."""
    from scheduler import core
    from scheduler.policies import Policy

    most = getattr(core, "SEARCH_MAX", 8)

    class Late(Policy):
        name = "late"

        def deploy_at(self, sched, js, rnd, *, redeploy=False):
            now, j = sched.clock.now(), js.job.id
            if j == "u":
                return (now, {}) if rnd.quorum_time is not None else (None, {})
            i = int(j[1:])
            if redeploy or js.metrics.deployments:
                return now + (100.0 if i == 0 else 0.1), {}
            return (0.0 if i == 0 else 1.0 + 0.1 * i), {}

    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=8.0)
    sched = JITScheduler(Late(), slots=most + 1, clock=clk, cost=cost, hysteresis_s=0.5)
    for j in [f"h{i}" for i in range(most + 1)] + ["u"]:
        sched.add_job(Job(j, parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    clk.run(until=3.0)
    for p in ("p0", "p1"):
        clk.call_at(5.0, sched.submit, "u", 0, p, None, 1.0)
    clk.run(until=6.0)
    got = [(d["t"], d["event"], d["job"]) for d in sched.decisions if d["event"] in ("preempt", "deploy", "wait_slot")
           and d["t"] >= 5.0]
    assert got[:2] == [(5.0, "preempt", "h0"), (5.0, "deploy", "u")]
    sched.close()


def test_close_releases_the_slot_of_a_job_removed_while_its_task_ran():
    """(Review.) remove_job while a task runs leaves the slot to the task's end, which after close() returns without
    effect: the slot stayed held, the removed job reachable, the occupancy at 1 for good."""
    from scheduler.executors import ModelExecutor

    clk = VirtualClock()
    s = JITScheduler("lazy", slots=1, clock=clk, executor=ModelExecutor(clk),
                     cost=CostModel(backends={"cpu": BackendCost(1e3, 1.0)}, startup_s=0.0))
    s.add_job(Job("a", parties=["p"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000, prior_response_s=1.0))
    clk.call_at(1.0, s.submit, "a", 0, "p", None, 1.0)
    clk.run(until=1.5)
    assert s.jobs["a"].deployment.busy
    s.remove_job("a")
    s.close()
    clk.run(until=100.0)
    assert not s._removing and not getattr(s, "deployed", {}) and s.free_slots == [0] and s.occupancy[-1][1] == 0


def test_a_quorum_whose_search_freed_a_slot_for_another_job_keeps_looking():
    """u1's search takes h1's slot back, but the slot goes to u2 (higher priority) first: u1 keeps looking, and
    takes h2's slot once h2 can wait (it had no retry left and waited for u2's round to end)."""
    pol = _scripted()
    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=8.0)  # retries every 2 s
    sched = JITScheduler(pol, slots=2, clock=clk, cost=cost, hysteresis_s=0.5)
    for j, prio in (("h1", 0), ("h2", 0), ("u1", 0), ("u2", 1)):
        sched.add_job(Job(j, parties=["p0", "p1"], quorum=2, rounds=1, model_elems=1000, update_bytes=4000,
                          priority=prio))
    for j in ("u1", "u2"):
        clk.call_at(5.0, sched.submit, j, 0, "p0", None, 1.0)
        clk.call_at(5.0, sched.submit, j, 0, "p1", None, 1.0)
    clk.call_at(6.0, pol.laxity.__setitem__, "h1", 20.0)
    clk.call_at(8.0, pol.laxity.__setitem__, "h2", 20.0)
    clk.run(until=40.0)
    preempts = [(d["t"], d["job"], d["for_job"]) for d in sched.decisions if d["event"] == "preempt"]
    assert preempts[0][1:] == ("h1", "u1") and preempts[1][1:] == ("h2", "u1") and preempts[1][0] <= 9.0
    assert sched.result("u1", 0).done() and sched.metrics()["u1"]["latency_p50_s"] < 13.0
    sched.close()


W4 = {"w": np.zeros(4, np.float32)}


def _ones(v=1.0):
    return {"w": np.full(4, v, np.float32)}


def test_a_partial_round_keeps_the_acknowledged_updates_whose_arrivals_are_still_queued():
    """An update acknowledged for round 0 whose arrival is processed after the deadline fired is in the partial
    model (it was left out without a word); a deadline that finds the quorum acknowledged fails nothing."""
    for quorum, unreachable, want in ((3, "partial", 2.0), (2, "error", 2.0)):
        clk = VirtualClock()
        s = JITScheduler("lazy", clock=clk)
        acks = []
        # the submit runs at t = 5 ahead of the deadline timer (queued first), its arrival after it
        clk.call_at(5.0, lambda: acks.append(s.submit("j", 0, "b", _ones(3.0))))
        s.add_job(Job("j", template=W4, parties=["a", "b", "c"], quorum=quorum, rounds=1, deadline_s=5.0,
                      unreachable=unreachable))
        s.submit("j", 0, "a", _ones())
        clk.run(until=20)
        assert acks[0].accepted and acks[0].round == 0
        assert s.result("j", 0).result(timeout=1)["w"].tolist() == [want] * 4
        assert not [d for d in s.decisions if d["event"] == "late_rejected"]
        s.close()


def test_a_late_update_refused_by_the_budget_changes_nothing_and_teaches_the_predictor_once():
    clk = VirtualClock()
    s = JITScheduler("lazy", clock=clk, byte_budget=2 * 16)
    s.add_job(Job("j", template=W4, parties=["a", "b", "c"], quorum=2, rounds=3, late="next_round"))
    js = s.jobs["j"]
    clk.run(until=10.0)
    s.submit("j", 0, "a", _ones())
    s.submit("j", 0, "b", _ones())  # round 0's quorum; the budget is full
    for _ in range(3):
        with pytest.raises(Backpressure, match="round 0: update from 'c'"):
            s.submit("j", 0, "c", _ones(5.0))
    r1 = js.rounds[1]
    assert (r1.carried, r1.unobserved, r1.admitted) == (set(), set(), 0)
    assert js.predictor.model("c").n == 0
    clk.run(until=12.0)  # round 0 folded: room again
    ack = s.submit("j", 0, "c", _ones(5.0), update_id="c0")
    assert ack.round == 1 and js.predictor.model("c").n == 1
    for _ in range(3):  # resends of the carried update are acknowledged again and teach nothing more
        assert s.submit("j", 0, "c", _ones(5.0), update_id="c0").duplicate
    assert js.predictor.model("c").n == 1
    s.close()


def test_updates_for_a_round_not_open_yet_take_at_most_half_the_budget():
    """Early updates cannot be folded before their round opens: had they filled the budget, the open round's
    updates were refused for ever (a livelock)."""
    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, byte_budget=2 * 16)
    s.add_job(Job("j", template=W4, parties=["a", "b"], quorum=2, rounds=4))
    s.submit("j", 1, "a", _ones())  # a fast party sends rounds 1 and 2 ahead of time
    with pytest.raises(Backpressure, match="round 2 is not open yet"):
        s.submit("j", 2, "a", _ones())
    refused = []

    def client(p):
        try:
            s.submit("j", 0, p, _ones())
        except Backpressure:
            refused.append(p)
            clk.call_later(0.5, client, p)  # the client retries

    clk.call_at(1.0, client, "a")
    clk.call_at(1.0, client, "b")
    clk.run(until=60.0)
    assert s.result("j", 0).done() and s.result("j", 0).exception() is None and len(refused) < 5
    s.close()


@pytest.mark.parametrize("policy", ["jit", "lazy", "eager"])
def test_a_job_waiting_for_a_slot_with_the_budget_full_takes_back_an_idle_deployment(policy):
    """Job A holds the only slot, idle; job B waits for one while its updates fill the budget: every later update
    of either job was refused for ever. The pressure now searches B a victim."""
    clk = VirtualClock()
    s = JITScheduler(policy, slots=1, clock=clk, byte_budget=2 * 16)
    for j in ("A", "B"):
        s.add_job(Job(j, template=W4, parties=["p", "q", "r"], quorum=3, rounds=1))
    refused = {"A": 0, "B": 0}

    def client(j, p):
        try:
            s.submit(j, 0, p, _ones())
        except Backpressure:
            refused[j] += 1
            clk.call_later(0.5, client, j, p)

    for p in "pqr":
        clk.call_at(1.0, client, "B", p)
        clk.call_at(2.0, client, "A", p)
    clk.run(until=600.0)
    assert s.result("A", 0).done() and s.result("B", 0).done(), refused
    assert s.buffered_bytes == 0 and sum(refused.values()) < 10
    s.close()


def test_a_deployment_is_released_when_the_fold_of_a_round_that_ended_meanwhile_ends():
    """A lazy job's round fails at its deadline while a (pressure-forced) fold runs: the deployment goes when the
    fold ends (it was held, idle, through the next round)."""
    clk = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(32.0, 0.0)}, startup_s=1.0)  # the fold runs 9 -> 11 s
    s = JITScheduler("lazy", clock=clk, cost=cost, byte_budget=2 * 16)
    s.add_job(Job("j", template=W4, parties=["a", "b", "c"], quorum=3, rounds=2, deadline_s=10.0))
    clk.call_at(8.0, s.submit, "j", 0, "a", _ones())
    clk.call_at(8.0, s.submit, "j", 0, "b", _ones())  # past half the budget: a forced fold
    clk.run(until=200.0)
    assert isinstance(s.result("j", 0).exception(), QuorumUnreachable)
    releases = [d["t"] for d in s.decisions if d["event"] == "release"]
    assert releases and releases[0] == pytest.approx(11.0)
    assert s.metrics()["j"]["deployed_s"] == pytest.approx(3.0)
    s.close()


def test_work_that_ends_after_close_has_no_effect():
    """A finalize running at close, and an arrival queued before it: the closed scheduler starts nothing and
    resolves nothing again (it raised InvalidStateError on the clock)."""
    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, cost=COST)
    s.add_job(Job("j", template=W4, parties=["a"], quorum=1, rounds=2))
    s.submit("j", 0, "a", _ones())
    clk.run(until=0.0011)  # deployed, folding or finalizing
    s.close()
    clk.run()  # the task's completion and anything queued run on the closed scheduler
    with pytest.raises(SchedulerClosed):
        s.result("j", 0).result(timeout=0)
    clk2 = VirtualClock()
    s2 = JITScheduler("eager", clock=clk2, cost=COST)
    s2.add_job(Job("j", template=W4, parties=["a"], quorum=1, rounds=2))
    s2.submit("j", 0, "a", _ones())  # its arrival is queued
    s2.close()
    events = len(s2.decisions)
    clk2.run()
    assert len(s2.decisions) == events


def test_a_refused_construction_starts_no_thread_and_changes_no_setting(tmp_path):
    import threading

    from scheduler import StateDirLocked

    holder = JITScheduler("jit", state_dir=tmp_path)
    threads, kernel = threading.active_count(), jk.get_num_threads()
    try:
        for kwargs in ({"state_dir": tmp_path}, {"keep_rounds": 0}, {"overflow": "drop"}, {"slots": 0}):
            with pytest.raises((StateDirLocked, ValueError)):
                JITScheduler("jit", **kwargs)
        assert threading.active_count() == threads and jk.get_num_threads() == kernel
    finally:
        holder.close()


@pytest.mark.parametrize("change, what", [
    ({"quorum": 5}, "quorum 5"), ({"quorum": 0}, "quorum 0"), ({"quorum": -1}, "quorum -1"),
    ({"quorum": 2.5}, "quorum 2.5"), ({"quorum": True}, "quorum True"), ({"late": "rejct"}, "late must be"),
    ({"unreachable": "part"}, "unreachable must be"), ({"late_weight": -0.5}, "late_weight"),
    ({"late_weight": 0.0}, "late_weight"), ({"late_weight": float("nan")}, "late_weight"),
    # (bare ValueErrors before: an algorithm name was resolved, and the sizes checked, past the InvalidJob checks;
    # a str of parties was its characters, "listed twice")
    ({"algorithm": "nope"}, "job 'j': unknown algorithm 'nope'"), ({"template": None}, "give a template, or model"),
    ({"parties": "abc"}, "parties must be a list of party ids, got str 'abc'"), ({"parties": 3}, "got int 3"),
    ({"parties": np.array(5)}, "parties must be a list of party ids \\(iteration over a 0-d array")])
def test_a_job_that_cannot_run_as_given_is_refused_by_add_job(change, what):
    from scheduler import InvalidJob

    s = JITScheduler("jit", clock=VirtualClock())
    with pytest.raises(InvalidJob, match=what):
        s.add_job(Job("j", **{"template": W4, "parties": ["a", "b", "c"], **change}))
    assert "j" not in s.jobs
    s.add_job(Job("ok", template=W4, parties=["a", "b", "c"], quorum=3.0))  # a count read from TOML as a float
    s.close()


def test_round_numbers_and_parties_of_the_wrong_type_are_refused_by_name():
    s = JITScheduler("jit", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=["a"]))
    for bad in ("0", 0.0, None, True):
        with pytest.raises(NoSuchRound, match="a round number is an int"):
            s.submit("j", bad, "a", _ones())
        with pytest.raises(NoSuchRound, match="a round number is an int"):
            s.result("j", bad)
    with pytest.raises(UnknownParty, match=r"\['a'\]"):
        s.submit("j", 0, ["a"], _ones())
    assert s.submit("j", np.int64(0), "a", _ones()).round == 0
    s.close()


def test_a_dp_job_run_again_in_the_same_process_replays_its_noise():
    """A second scheduler (a recovery in the same process) replays round 0 with the same noise: the same aggregate,
    the same release."""
    dp = jk.algorithms.DPFixedClipping(jk.algorithms.FedAvg(), clip_norm=1.0, noise_multiplier=0.5, seed=3)
    job = Job("j", template=W4, parties=["a"], quorum=1, rounds=1, algorithm=dp)
    outs = []
    for _ in range(2):
        clk = VirtualClock()
        s = JITScheduler("eager", clock=clk)
        s.add_job(job)
        s.submit("j", 0, "a", _ones())
        clk.run()
        outs.append(s.result("j", 0).result(timeout=0)["w"])
        s.close()
    assert outs[0].tobytes() == outs[1].tobytes() and not np.array_equal(outs[0], np.ones(4, np.float32))


def test_two_jobs_given_one_dp_instance_noise_their_rounds_apart():
    """Two jobs given one DP algorithm instance (its seed drawn from os.urandom) released round 0 with the same
    noise, each aggregator holding its own copy of the instance, with no record of the other's rounds: the
    difference of the two models gave the difference of the two jobs' sums exactly. Noise is keyed by the
    aggregate: the two rounds draw their own."""
    dp = jk.algorithms.DPFixedClipping(jk.algorithms.FedAvg(), clip_norm=10.0, noise_multiplier=0.5)
    clk = VirtualClock()
    s = JITScheduler("eager", slots=2, clock=clk)
    for j in ("j1", "j2"):
        s.add_job(Job(j, template=W4, parties=["a"], quorum=1, rounds=1, algorithm=dp))
    s.submit("j1", 0, "a", _ones())
    s.submit("j2", 0, "a", {"w": np.full(4, 3, np.float32)})
    clk.run()
    r1, r2 = (s.result(j, 0).result(timeout=0)["w"] for j in ("j1", "j2"))
    s.close()
    assert not np.allclose(r2 - r1, 2.0, rtol=0, atol=1e-6)


def test_a_job_without_a_round_count_ends_when_its_parties_fall_below_its_quorum():
    """Every later round would fail at once (an endless chain of failures on the clock): the job ends instead, and
    asking for a later round says so."""
    clk = VirtualClock()
    s = JITScheduler("lazy", clock=clk, cost=COST)
    s.add_job(Job("a", parties=list("abc"), quorum=3, model_elems=1000, update_bytes=4000))
    clk.call_at(1, s.submit, "a", 0, "a", None, 1.0)
    clk.call_at(2, s.drop_party, "a", "b")
    clk.run()
    with pytest.raises(QuorumUnreachable):
        s.result("a", 0).result(timeout=0)
    assert s.jobs["a"].finished and s.jobs["a"].open is None
    with pytest.raises(NoSuchRound, match="has ended"):
        s.result("a", 1)
    s.close()


def test_an_update_sent_before_its_round_opens_teaches_no_response_time():
    """Accepted when its round opens, it read as a 0 s response (log 1e-9): the party's model collapsed (sigma 7)."""
    clk = VirtualClock()
    s = JITScheduler("jit", slots=1, clock=clk, cost=COST)
    s.add_job(Job("a", parties=["p0", "p1"], quorum=2, rounds=4, model_elems=1000, update_bytes=4000))

    def start(r, t0):
        for p, dt in (("p0", 100.0), ("p1", 101.0)):
            if r == 2 and p == "p0":
                clk.call_at(t0 + 50.0, s.submit, "a", 3, p, None, 1.0)  # round 3's update, sent during round 2
            if not (r == 3 and p == "p0"):
                clk.call_at(t0 + dt, s.submit, "a", r, p, None, 1.0)

    for r in range(4):
        s.result("a", r).add_done_callback(lambda f, r=r: start(r + 1, clk.now()) if r + 1 < 4 else None)
    start(0, 0.0)
    clk.run()
    dist, _ = s.jobs["a"].predictor.distribution("p0")
    assert abs(dist.mu - np.log(100.0)) < 0.01 and dist.sigma < 0.1
    s.close()


def test_a_long_running_scheduler_keeps_a_bounded_history():
    """Round latencies and occupancy changes grew by every round for the scheduler's life (a server running for
    months); ``history`` bounds them (the simulator keeps all)."""
    s = JITScheduler("eager", clock=VirtualClock(), history=5)
    s.add_job(Job("j", template={"w": np.zeros(4, np.float32)}, parties=["a"], quorum=1, rounds=20))
    for r in range(20):
        s.submit("j", r, "a", {"w": np.ones(4, np.float32)})
        s.clock.run()
    assert len(s.jobs["j"].metrics.latencies) == 5 and len(s.occupancy) <= 5
    assert s.metrics()["j"]["rounds"] == 20
    s.close()
    with pytest.raises(ValueError, match="history"):
        JITScheduler("eager", clock=VirtualClock(), history=0)


@pytest.mark.parametrize("field,value", [("deadline_s", float("nan")), ("deadline_s", 0.0), ("deadline_s", -5.0),
                                         ("deadline_s", "10"), ("parties", ["a", "a"]), ("rounds", -1),
                                         ("rounds", 2.5), ("first_round", -1), ("late_weight", "0.5"),
                                         ("late_weight", 2.0),
                                         ("priority", float("nan")), ("prior_response_s", 0.0),
                                         ("update_bytes", 0)])
def test_a_job_with_a_bad_field_is_refused_by_name(field, value):
    """A NaN deadline stopped the real clock's thread (its heap's top compared with nothing: every job's events
    stalled); one <= 0 failed rounds in a hot loop (35k rounds/s, starving the other jobs); a string one was
    registered, then failed in add_job, leaving the job half added; duplicate parties made a quorum that could never
    be met; a string late_weight passed, then raised TypeError in submit."""
    from scheduler import InvalidJob

    kw = {"id": "j", "parties": ["a", "b"], "quorum": 1, "model_elems": 4, **{field: value}}
    s = JITScheduler("eager", clock=VirtualClock())
    with pytest.raises(InvalidJob, match=field.split("_")[0] if field != "parties" else "listed twice"):
        s.add_job(Job(**kw))
    assert "j" not in s.jobs
    s.add_job(Job(**{**kw, field: Job.__dataclass_fields__[field].default if field != "parties" else ["a", "b"]}))
    s.close()


def test_scheduler_arguments_and_event_times_are_checked():
    from scheduler.clock import RealClock

    for kw in ({"byte_budget": "x"}, {"byte_budget": -1}, {"checkpoint_bytes": 1.5}, {"hysteresis_s": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            JITScheduler("eager", clock=VirtualClock(), **kw)
    for clock in (VirtualClock(), RealClock()):
        with pytest.raises(ValueError, match="NaN"):
            clock.call_at(float("nan"), print)
        if isinstance(clock, RealClock):
            clock.close()


def test_a_jobs_peak_buffered_bytes_counts_folds_in_progress_and_early_updates():
    """The job's metric was its open round's unfolded bytes: an update being folded, or sent ahead for the next
    round, was buffered (the scheduler's peak counted it) but not the job's (12 MB against 16 MB here)."""
    clock = VirtualClock()
    cost = CostModel(backends={"cpu": BackendCost(throughput_Bps=1e6, call_s=0.0)})  # a 4 MB fold takes ~4 s
    s = JITScheduler(policy="eager", slots=1, clock=clock, cost=cost)
    s.add_job(Job("j", parties=list(range(4)), quorum=4, rounds=2, model_elems=1_000_000, update_bytes=4_000_000))
    for i in range(4):
        clock.call_at(float(i), lambda i=i: s.submit("j", 0, i, None, 1.0))
    clock.call_at(1.5, lambda: s.submit("j", 1, 0, None, 1.0))  # ahead, for round 1
    clock.run(until=60.0)
    assert s.metrics()["j"]["peak_bytes_buffered"] == s.peak_buffered_bytes >= 16_000_000
    assert s.jobs["j"].buffered_bytes == s.buffered_bytes
    s.close()


def test_an_integer_leaf_past_the_limit_is_refused_at_submit():
    """The fold found it: the update was acknowledged and its round failed for every party. 5,000 samples x a
    BatchNorm counter of 300,000 is past a deterministic job's 2^30 for integer leaves."""
    t = {"w": np.zeros(2, np.float32), "n": np.zeros((), np.int64)}
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=t, parties=["a", "b"], quorum=2, rounds=1, deterministic=True))
    with pytest.raises(jk.ValueOutOfRange, match="'a'.*leaf 'n'"):
        s.submit("j", 0, "a", {"w": np.ones(2, np.float32), "n": np.array(300_000, np.int64)}, weight=5000)
    for p in "ab":
        s.submit("j", 0, p, {"w": np.ones(2, np.float32), "n": np.array(3, np.int64)}, weight=5000)
    s.clock.run()
    assert int(s.result("j", 0).result(timeout=1)["n"]) == 3
    s.close()


def test_a_jobs_work_is_priced_on_its_own_backend_and_accumulator():
    """work_estimate priced every job as the scheduler-wide backend's float32 job: a GPU job's host updates paid no
    bus time, a deterministic job's 16 bytes per element were priced as 4 (JIT then deployed them late)."""
    cost = CostModel(backends={"cpu": BackendCost(10e9, 0.0), "cupy": BackendCost(2000e9, 0.0, h2d_Bps=25e9)})
    s = JITScheduler("jit", slots=2, clock=VirtualClock(), cost=cost)
    kw = dict(parties=list(range(10)), quorum=10, rounds=1, model_elems=25_000_000, update_bytes=100_000_000)
    for jid, extra in (("cpu", {}), ("gpu", {"backend": "cupy"}), ("det", {"deterministic": True}),
                       ("f64", {"acc_dtype": "float64"})):
        s.add_job(Job(jid, **kw, **extra))
    est = {j: s.work_estimate(s.jobs[j], s.jobs[j].open) for j in s.jobs}
    n, ub = 25_000_000, 1e9
    assert est["cpu"] == pytest.approx((ub + 2 * n * 4) / 10e9 + n * 8 / 10e9)
    assert est["gpu"] == pytest.approx((ub + 2 * n * 4) / 2000e9 + ub / 25e9 + n * 8 / 2000e9)
    assert est["det"] == pytest.approx((ub + 2 * n * 16) / 10e9 + n * 20 / 10e9)
    assert est["f64"] == pytest.approx((ub + 2 * n * 8) / 10e9 + n * 12 / 10e9)
    # backend "auto" with a template in GPU memory: its aggregator runs on the GPU, and is priced so
    s.add_job(Job("auto", template={"w": np.zeros(1000, np.float32)}, parties=list(range(10)), quorum=10, rounds=1))
    js = s.jobs["auto"]
    cpu = s.work_estimate(js, js.open)
    js.layout = jk.Layout.from_json({**js.layout.to_json(), "array_type": "cupy"})
    assert s.work_estimate(js, js.open) < cpu
    s.close()


def test_a_round_whose_quorum_came_in_time_but_whose_model_was_late_counts_one_miss():
    """The quorum is in at 9.5 s against a 10 s deadline; the folds take ~30 s: the round finalizes (it is not
    unreachable) and counts one deadline miss."""
    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, cost=CostModel(backends={"cpu": BackendCost(1e6, 0.0)}))
    s.add_job(Job("a", parties=["x", "y"], quorum=2, rounds=1, deadline_s=10.0, model_elems=1_000_000,
                  update_bytes=4_000_000))
    clk.call_at(9.0, s.submit, "a", 0, "x", None, 1.0)
    clk.call_at(9.5, s.submit, "a", 0, "y", None, 1.0)
    clk.run()
    m = s.metrics()["a"]
    assert s.jobs["a"].rounds[0].ready_time > 10.0 and m["deadline_misses"] == 1 and m["unreachable_rounds"] == 0
    s.close()


def test_an_update_sent_ahead_is_told_to_wait_for_its_round():
    """Updates for a round not open yet may take half the budget: with a budget under two updates none fits, and
    the Backpressure said to retry "once the forced fold has drained them", which nothing could do before the round
    opened. It says to retry once the round opens (taking it anyway, past half the budget, starved the open round:
    found in review)."""
    s = JITScheduler("lazy", clock=VirtualClock(), byte_budget=1536, overflow="raise")
    s.add_job(Job("j", parties=["a"], quorum=1, rounds=2, model_elems=256, update_bytes=1024))
    with pytest.raises(Backpressure, match="round 1 is not open yet.*retry once it opens"):
        s.submit("j", 1, "a", None, 1.0)
    s.submit("j", 0, "a", None, 1.0)
    s.clock.run()
    assert s.submit("j", 1, "a", None, 1.0).round == 1
    s.close()


def test_buffered_bytes_return_to_zero_when_updates_are_let_go():
    """close() with an update pending, and a job without a round count that ends (its parties dropped below the
    quorum) holding an update sent ahead for its next round: the bytes stayed counted for good, and that round's
    future never resolved (review)."""
    from scheduler import QuorumUnreachable

    t, u = {"w": np.zeros(256, np.float32)}, {"w": np.ones(256, np.float32)}
    s = JITScheduler("lazy", clock=VirtualClock())
    s.add_job(Job("j", template=t, parties=list("abc"), quorum=3, rounds=1))
    s.submit("j", 0, "a", u)
    s.clock.run()
    s.close()
    assert s.buffered_bytes == 0 and s.jobs["j"].buffered_bytes == 0
    s = JITScheduler("lazy", clock=VirtualClock())
    s.add_job(Job("j", template=t, parties=list("abc"), quorum=2))
    s.submit("j", 1, "a", u)
    s.clock.run()
    s.drop_party("j", "b")
    s.drop_party("j", "c")
    s.clock.run(until=100.0)
    assert s.buffered_bytes == 0 and s.jobs["j"].buffered_bytes == 0
    # (round 1 holds an acknowledged update: it opens, and fails; since 2026-11-28 a job's end spares such rounds)
    with pytest.raises(QuorumUnreachable, match="round 1: only 1 parties left for a quorum of 2"):
        s.result("j", 1).result(timeout=1)
    s.close()


def test_close_leaves_no_bytes_counted_on_a_real_clock():
    """close() stops its own RealClock at once: arrivals still queued on it never ran, and their reservations stayed
    counted (review). close() zeroes the counts; what was queued ends without effect."""
    s = JITScheduler("lazy")
    s.add_job(Job("j", template={"w": np.zeros(65536, np.float32)}, parties=list("abc"), quorum=3, rounds=1))
    for p in "ab":
        s.submit("j", 0, p, {"w": np.ones(65536, np.float32)})
    s.close()
    assert s.buffered_bytes == 0 and s.jobs["j"].buffered_bytes == 0


def test_a_fold_running_at_close_leaves_the_counts_at_zero(tmp_path):
    """close() zeroes the buffered bytes and waits for a running fold, which then gave its bytes back: the counts
    went negative (review). Nothing moves them after close."""
    import threading

    s = JITScheduler("eager", state_dir=tmp_path)
    started, release = threading.Event(), threading.Event()
    real = s.executor.fold_many

    def slow(agg, items):
        started.set()
        release.wait(10)
        return real(agg, items)
    s.executor.fold_many = slow
    s.add_job(Job("j", template={"w": np.zeros(65536, np.float32)}, parties=list("ab"), quorum=2, rounds=1))
    s.submit("j", 0, "a", {"w": np.ones(65536, np.float32)})
    assert started.wait(10)
    closer = threading.Thread(target=s.close)
    closer.start()
    release.set()
    closer.join(30)
    assert s.buffered_bytes == 0 and s.jobs["j"].buffered_bytes == 0


def test_a_resend_of_a_carried_update_is_a_duplicate_after_the_round_it_went_to_fills():
    """A late update carried to round 1 (late="next_round"), resent with its update_id once round 1 had filled, was
    acknowledged as new for round 2 and counted there too (only the round the resend ended on was checked)."""
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=list("abc"), quorum=2, late="next_round", late_weight=1.0))
    for p in "ab":
        s.submit("j", 0, p, _ones(0.0))
    assert s.submit("j", 0, "c", _ones(100.0), update_id="c0").round == 1
    s.submit("j", 1, "a", _ones(0.0))  # round 1 fills: c's carried update and a's
    s.clock.run()
    ack = s.submit("j", 0, "c", _ones(100.0), update_id="c0")
    assert ack.duplicate and ack.round == 1
    assert s.jobs["j"].rounds[2].admitted == 0
    np.testing.assert_array_equal(s.result("j", 1).result(timeout=0)["w"], np.full(4, 50.0))
    assert [(d["round"], d["to"]) for d in s.decisions if d["event"] == "late_to_next_round"] == [(0, 1)]
    s.close()


def test_a_second_update_for_a_round_answered_late_is_a_duplicate_party():
    """c's late update for round 0 went to round 1; a second, different one for round 0 was carried again once
    round 1 had filled, to round 2, where it counted too (c's round 0 in two models, and c's own round-2 update
    then refused)."""
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=list("abc"), quorum=2, late="next_round", late_weight=1.0))
    for p in "ab":
        s.submit("j", 0, p, _ones(0.0))
    assert s.submit("j", 0, "c", _ones(100.0), update_id="c0").round == 1
    s.submit("j", 1, "a", _ones(0.0))  # round 1 fills
    with pytest.raises(jk.DuplicateParty, match="round 0 .*counts in round 1"):
        s.submit("j", 0, "c", _ones(7.0), update_id="c0-again")
    assert 2 not in s.jobs["j"].rounds
    assert s.submit("j", 2, "c", _ones(1.0)).round == 2  # c's own update for round 2 is taken
    s.close()


def test_between_a_round_resolving_and_the_next_opening_submits_take_the_next_for_open():
    """Done-callbacks run after a round resolves and before the next opens (and on a real clock, threads woken by
    its future submit meanwhile). Such submits took the finished round for the open one: one for the next round got
    the half of the budget kept for rounds sent ahead (Backpressure with room left), and a late one for the round
    before was carried two rounds on."""
    s = JITScheduler("eager", clock=VirtualClock(), slots=2, byte_budget=48)  # an update: 16 bytes; ahead: 24
    s.add_job(Job("j", template=W4, parties=["a", "b"], quorum=1, rounds=5, late="next_round"))
    s.add_job(Job("k", template=W4, parties=["x", "y"], quorum=2, rounds=3))
    s.submit("k", 1, "x", _ones(1.0))  # 16 bytes sent ahead for k's round 1
    s.submit("j", 0, "a", _ones(0.0))
    s.clock.run()
    s.submit("j", 1, "a", _ones(1.0))
    seen = {}

    def in_the_gap(_fut):
        seen["next"] = s.submit("j", 2, "a", _ones(2.0)).round  # (16 + 16 > 24: refused as sent ahead)
        with pytest.raises(LateUpdate, match="round 0 is over"):
            s.submit("j", 0, "b", _ones(9.0))
        seen["late"] = True
    s.result("j", 1).add_done_callback(in_the_gap)
    s.clock.run()
    assert seen == {"next": 2, "late": True}
    s.close()


def test_result_of_a_round_asked_after_close_resolves_with_scheduler_closed():
    """It returned a future that nothing would ever resolve."""
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=["a"], quorum=1, rounds=4))
    s.close()
    fut = s.result("j", 2)
    assert fut.done() and isinstance(fut.exception(), SchedulerClosed)


def test_a_round_futures_done_callback_runs_without_the_schedulers_lock():
    """Done-callbacks ran on the clock's thread under the scheduler's lock: a slow one stalled every submit (and
    one that called close() deadlocked, see test_runtime). They still run before the next round opens."""
    import threading

    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=["a"], quorum=1, rounds=2))
    seen = []

    def on_done(fut):  # another thread takes the scheduler's lock meanwhile
        t = threading.Thread(target=s.metrics)
        t.start()
        t.join(timeout=5)
        seen.append((not t.is_alive(), s.jobs["j"].open.number))
    s.result("j", 0).add_done_callback(on_done)
    s.submit("j", 0, "a", _ones())
    s.clock.run()
    assert seen == [(True, 0)] and s.jobs["j"].open.number == 1
    s.close()


def test_a_cancelled_round_future_does_not_stop_the_job():
    """Cancelling a round's future (asyncio.wait_for's timeout cancels the future it waits on) made its resolution
    raise InvalidStateError, and the job stopped for good. A round's future is shared by every caller of result():
    it cannot be cancelled, and the rounds go on."""
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=["a", "b"], quorum=2, rounds=3))
    assert not s.result("j", 0).cancel() and not s.result("j", 0).cancelled()
    for r in range(3):
        for p in "ab":
            s.submit("j", r, p, _ones(r + 1.0))
        s.clock.run()
    assert [float(s.result("j", r).result(timeout=0)["w"][0]) for r in range(3)] == [1.0, 2.0, 3.0]
    assert s.jobs["j"].finished
    s.close()


def test_update_ids_are_str_or_int():
    """A UUID update id made every durable write fail; a tuple one came back from the file as a list, and a resend
    after a restart was refused as another update (test_durable). They are refused at submit, naming the value;
    numpy integers are taken as ints."""
    import uuid

    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=["a", "b"], quorum=2))
    u = uuid.UUID(int=7)
    for bad in (u, ("a", 0), ["a"], 1.5, True, object()):
        with pytest.raises(TypeError, match="update_id must be None, a str or an int, got .*" + type(bad).__name__):
            s.submit("j", 0, "a", _ones(), update_id=bad)
    assert s.jobs["j"].rounds[0].admitted == 0
    s.submit("j", 0, "a", _ones(), update_id=np.int64(5))
    assert s.jobs["j"].seen[0]["a"] == 5 and type(s.jobs["j"].seen[0]["a"]) is int
    assert s.submit("j", 0, "a", _ones(), update_id=5).duplicate
    s.close()


def test_job_ids_are_str_or_int():
    """A tuple job id was taken, and its state directory could not be opened again (test_durable): every job in it
    was refused. Job ids follow the rule of party ids; numpy integers are normalized."""
    from scheduler import InvalidJob

    s = JITScheduler("eager", clock=VirtualClock())
    for bad in (("tenant", "resnet"), 1.5, None, True):
        with pytest.raises(InvalidJob, match="job ids must be str or int, got " + type(bad).__name__):
            s.add_job(Job(bad, template=W4, parties=["a"]))
    assert not s.jobs
    job = Job(np.int64(3), template=W4, parties=["a"])
    s.add_job(job)
    assert type(job.id) is int and s.submit(3, 0, "a", _ones()).round == 0
    s.close()


def test_bad_ids_get_the_schedulers_typed_errors():
    """add_job after close() was taken, and its rounds never resolved; an unhashable job id raised a bare TypeError;
    drop_party of a party the job does not have did nothing without a word."""
    from scheduler import UnknownJob

    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template=W4, parties=["a", "b", 3], quorum=2))
    for fn in (lambda: s.submit(["j"], 0, "a", _ones()), lambda: s.result({"j"}, 0),
               lambda: s.drop_party(["j"], "a")):
        with pytest.raises(UnknownJob, match="no job"):
            fn()
    for bad in ("zz", ["a"], 3.0):
        with pytest.raises(UnknownParty, match="is not one of the job's parties"):
            s.drop_party("j", bad)
    s.drop_party("j", np.int64(3))  # normalized: the job's party 3
    s.drop_party("j", 3)  # already dropped: left as it is
    assert s.jobs["j"].expected == ["a", "b"]
    assert s.submit("j", 0, np.int64(3), _ones()).party == 3
    s.close()
    with pytest.raises(SchedulerClosed, match="'k'.*not added"):
        s.add_job(Job("k", template=W4, parties=["a"]))
    assert "k" not in s.jobs


def test_late_updates_are_carried_from_the_round_before_the_open_one_at_most():
    """late="next_round": an update for a round long over was carried to the open round while the scheduler still
    held that round, and refused with LateUpdate once it had let it go (keep_rounds): one submit, two answers. Rounds
    before the one before the open round are over, whether held or not; the decision log names the round the update
    was sent for, and the one it counts in."""
    s = JITScheduler("eager", clock=VirtualClock(), keep_rounds=2)
    s.add_job(Job("j", template=W4, parties=list("abc"), quorum=2, late="next_round"))
    for r in range(3):
        for p in "ab":
            s.submit("j", r, p, _ones())
        s.clock.run()
    assert s.jobs["j"].open.number == 3 and 0 in s.jobs["j"].rounds  # round 0: over, still held
    for old in (0, 1):
        with pytest.raises(LateUpdate, match=f"round {old} is over \\(round 3 is open"):
            s.submit("j", old, "c", _ones())
    assert s.submit("j", 2, "c", _ones()).round == 3
    assert [(d["round"], d["to"]) for d in s.decisions if d["event"] == "late_to_next_round"] == [(2, 3)]
    s.close()


# --- review fixes (scheduler runtime, 2026-11-28) ---------------------------------------------------------------------
def test_finish_job_while_a_deployment_starts_up_does_not_strand_the_round():
    """finish_job released any deployment that was not busy, one still starting up for a round whose quorum was in
    too: nothing planned that round again, and it never resolved. Such a deployment now stays for the round."""
    clk = VirtualClock()
    s = JITScheduler("lazy", slots=1, clock=clk, cost=COST)
    s.add_job(Job("a", parties=["p0", "p1"], quorum=2, rounds=3, model_elems=1000, update_bytes=4000))
    for p in ("p0", "p1"):
        clk.call_at(10.0, s.submit, "a", 0, p, None, 1.0)
    clk.run(until=10.5)  # the quorum is in; lazy's deployment starts up until 11
    s.finish_job("a")
    clk.run(until=100)
    assert s.result("a", 0).done() and s.result("a", 0).exception() is None


def test_a_waiting_quorum_retries_with_time_moving_when_hysteresis_and_start_up_are_zero():
    """hysteresis_s=0 with a start-up of 0 (the default cost model's) re-armed the slot retry at now, for ever: a
    virtual clock's time stood still (run() never returned), a real clock's thread spun."""
    clk = VirtualClock()
    s = JITScheduler("lazy", slots=1, clock=clk, cost=CostModel(backends={"cpu": BackendCost(1e6, 0.0)}),
                     hysteresis_s=0.0)
    for j in "AB":
        s.add_job(Job(j, parties=["p"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(10.0, s.submit, "A", 0, "p", None, 1.0)
    clk.call_at(10.001, s.submit, "B", 0, "p", None, 1.0)  # B's quorum in while A holds the only slot
    real, calls = s._retry_slot, []

    def counted(*a):
        calls.append(clk.now())
        assert len(calls) < 1000, "the retries do not let time move"
        return real(*a)

    s._retry_slot = counted
    clk.run()
    assert s.result("B", 0).done() and len(calls) < 10


def test_a_job_whose_round_ends_while_it_waits_for_a_slot_leaves_the_queue():
    """A job queued for a slot whose round then ended (its deadline) stayed in the queue: a slot freed later was
    deployed to it at once, an ended job (rounds=1) or a next round planned for later (rounds=2), far early."""
    for rounds in (1, 2):
        clk = VirtualClock()
        s = JITScheduler("jit", slots=1, clock=clk, cost=COST)
        s.add_job(Job("A", parties=["x"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000))
        s.add_job(Job("B", parties=["y", "z"], quorum=2, rounds=rounds, model_elems=1000, update_bytes=4000,
                      deadline_s=60.0, prior_response_s=40.0))
        clk.call_at(70.0, s.submit, "A", 0, "x", None, 1.0)
        clk.run(until=59.9)
        assert "B" in s.waiting  # A's cold start holds the only slot
        clk.run(until=71.5)
        assert "B" not in s.waiting and s.jobs["B"].metrics.deployments == 0, rounds


def test_an_update_sent_before_its_round_opened_teaches_no_response_time_whenever_it_arrives():
    """An update acknowledged for round 1 while round 0 was open, whose arrival came through after round 1 had
    opened (the finalize's completion queued ahead of it), was learnt as a response of ~0 s (log-time mean -9.2)."""
    clk = VirtualClock()
    s = JITScheduler("lazy", slots=1, clock=clk, cost=COST)
    s.add_job(Job("a", parties=["p0", "p1"], quorum=2, rounds=3, model_elems=1000, update_bytes=4000))
    ready = 10.0 + 1.0 + 0.016 + 0.008  # quorum at 10, start-up 1, fold of 2, finalize
    clk.call_at(ready, lambda: s.submit("a", 1, "p0", None, 1.0))  # (before the completion at the same time)
    for p in ("p0", "p1"):
        clk.call_at(10.0, s.submit, "a", 0, p, None, 1.0)
    clk.run()
    m = s.jobs["a"].predictor.model("p0")
    assert m.n == 1 and m.mu == pytest.approx(math.log(10.0))


def test_an_executor_that_refuses_a_task_fails_the_round_instead_of_holding_it():
    """An executor whose run() raised (a custom one, a Ray cluster gone) left the deployment busy for good: the round
    never resolved. The task now fails as if it had run, and the round resolves with the error."""

    class Refusing(ModelExecutor):
        def run(self, task, done):
            raise ConnectionError("the cluster is gone")

    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, executor=Refusing(clk))
    s.add_job(Job("j", template={"w": np.zeros(4, np.float32)}, parties=["a"], quorum=1, rounds=1))
    s.submit("j", 0, "a", {"w": np.ones(4, np.float32)})
    clk.run(until=30)
    assert isinstance(s.result("j", 0).exception(), ConnectionError) and s.buffered_bytes == 0
    assert s.jobs["j"].deployment is None or not s.jobs["j"].deployment.busy


@pytest.mark.parametrize("restart", [False, True])
def test_fednova_rounds_fold_against_the_last_rounds_model(tmp_path, restart):
    """An algorithm that folds deltas and does not close its round (FedNova, SCAFFOLD) had every round of a job
    measured against the template: round 1 returned 4.22 where x_1 + tau_eff sum p_j (u_j - x_1) / tau_j is 3.78.
    The job keeps the last model as the next round's base, through a restart too (from the committed result)."""
    tmpl = {"w": np.full(4, 1.0, np.float32)}

    def update(i, r):
        return {"w": np.full(4, 2.0 + i + r, np.float32)}

    want, base = [], tmpl
    for r in range(2):
        ref = jk.Aggregator(tmpl, jk.algorithms.FedNova(), base=base)
        for i in range(3):
            ref.fold(update(i, r), weight=1.0, party=i, steps=10 * (i + 1))
        base = ref.finalize()
        want.append(base["w"].tolist())

    def scheduler():
        s = JITScheduler("eager", slots=1, state_dir=tmp_path)
        s.add_job(Job("n", template=tmpl, parties=[0, 1, 2], quorum=3, rounds=2, algorithm=jk.algorithms.FedNova()))
        return s

    s, got = scheduler(), []
    try:
        for r in range(2):
            if r == 1 and restart:
                s.close()
                s = scheduler()
            for i in range(3):
                s.submit("n", r, i, update(i, r), 1.0, steps=10 * (i + 1))
            got.append(s.result("n", r).result(timeout=30)["w"].tolist())
    finally:
        s.close()
    assert got == want


@pytest.mark.parametrize("restart", [False, True])
def test_a_dp_job_measures_each_round_from_the_last_model(tmp_path, restart):
    """A DP job over FedAvg clipped every round's deltas against the template: its model never got further than the
    clip norm from it (round 1 returned 1.0 where the parties' steps of 0.75 give 1.5). Its rounds carry the
    released model, through a restart too."""
    def scheduler():
        s = JITScheduler("eager", slots=1, state_dir=tmp_path)
        s.add_job(Job("d", template={"w": np.zeros(1, np.float32)}, parties=[0, 1], quorum=2, rounds=3,
                      algorithm=jk.algorithms.DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0)))
        return s

    s, got, x = scheduler(), [], np.zeros(1, np.float32)
    try:
        for r in range(3):
            if r == 2 and restart:
                s.close()
                s = scheduler()
            for i in range(2):
                s.submit("d", r, i, {"w": x + np.float32(0.75)})
            x = s.result("d", r).result(timeout=30)["w"]
            got.append(float(x[0]))
    finally:
        s.close()
    assert got == [0.75, 1.5, 2.25]


@pytest.mark.parametrize("alg", [jk.algorithms.FedAdam(), jk.algorithms.FedAvgM(),
                                 jk.algorithms.DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0)],
                         ids=["fedadam", "fedavgm", "dp"])
def test_jobs_whose_model_moves_refuse_to_carry_late_updates(alg):
    """A server optimizer's or DP's round measures deltas from the model its step released, as FedNova's does: a
    late update carried to the next round was trained from the round before's (FedAdam's was accepted)."""
    from scheduler import InvalidJob

    with pytest.raises(InvalidJob, match="late='reject'"):
        JITScheduler("eager", clock=VirtualClock()).add_job(
            Job("j", template={"w": np.zeros(4, np.float32)}, parties=[0, 1], quorum=1, algorithm=alg,
                late="next_round"))


def test_a_job_id_added_twice_is_invalid_job():
    """README: add_job refuses ids that repeat with InvalidJob (a repeated job id raised a plain ValueError)."""
    from scheduler import InvalidJob

    s = JITScheduler("eager", clock=VirtualClock(), cost=COST)
    s.add_job(Job("a", parties=["p"], quorum=1, rounds=1, model_elems=10, update_bytes=40))
    with pytest.raises(InvalidJob, match="already added"):
        s.add_job(Job("a", parties=["p"], quorum=1, rounds=1, model_elems=10, update_bytes=40))


def test_a_job_that_folds_against_its_last_model_refuses_to_carry_late_updates():
    """A late update carried from round r to r + 1 was trained from round r's base, and was folded against round
    r + 1's: FedNova's round 1 gave 3.5 where the party's own delta gives 3.75. Such jobs take late='reject' only."""
    from scheduler import InvalidJob

    s = JITScheduler("eager", clock=VirtualClock(), cost=COST)
    tmpl = {"w": np.zeros(4, np.float32)}
    with pytest.raises(InvalidJob, match="late='reject'"):
        s.add_job(Job("n", template=tmpl, parties=[0, 1], quorum=1, algorithm=jk.algorithms.FedNova(),
                      late="next_round"))
    s.add_job(Job("m", template=tmpl, parties=[0, 1], quorum=1, algorithm="fedavg", late="next_round"))


def test_a_refused_fold_lets_its_spilled_updates_files_go(tmp_path):
    """A fold task refused by the executor (run() raises) held its spilled updates' files for the life of the
    process: the task's own failure path releases them, and it never ran."""

    class Refusing(ModelExecutor):
        def run(self, task, done):
            raise ConnectionError("the cluster is gone")

    clk = VirtualClock()
    s = JITScheduler("lazy", clock=clk, executor=Refusing(clk), state_dir=tmp_path, byte_budget=64,
                     overflow="spill")
    try:
        s.add_job(Job("j", template={"w": np.zeros(16, np.float32)}, parties=["a", "b"], quorum=2, rounds=2))
        for p in "ab":
            s.submit("j", 0, p, {"w": np.ones(16, np.float32)})
        clk.run(until=30)
        assert isinstance(s.result("j", 0).exception(), ConnectionError) and s.spilled >= 1
        assert not s.store._held
    finally:
        s.close()


def test_a_rebasing_jobs_last_round_keeps_no_copy_of_its_model():
    """The next round's base is a copy of the result; after a job's last round there is no next round to keep one
    for (a finished FedNova job held a model-sized copy for the life of the scheduler)."""
    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, cost=COST)
    s.add_job(Job("n", template={"w": np.zeros(4, np.float32)}, parties=[0], quorum=1, rounds=2,
                  algorithm=jk.algorithms.FedNova()))
    s.submit("n", 0, 0, {"w": np.ones(4, np.float32)}, 1.0, steps=1)
    clk.run()
    assert s.jobs["n"].next_base is not None
    s.submit("n", 1, 0, {"w": np.full(4, 3.0, np.float32)}, 1.0, steps=1)
    clk.run()
    assert s.result("n", 1).result()["w"].tolist() == [3.0] * 4 and s.jobs["n"].next_base is None


def test_a_fedbuff_job_returns_the_servers_step_of_the_deltas_sent():
    """README's contract for FedBuff jobs (they keep no model): parties send deltas, and a round's result is
    lr sum w_j s(tau_j) delta_j / sum w_j, in each round alike (the template is not a base)."""
    alg = jk.algorithms.FedBuff(staleness="polynomial", a=0.5, server_lr=0.5, weighted=True)
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("b", template={"w": np.full(3, 7.0, np.float32)}, parties=["p", "q"], quorum=2, rounds=2,
                  algorithm=alg))
    for r in range(2):
        s.submit("b", r, "p", {"w": np.full(3, 1.0 + r, np.float32)}, weight=3.0, staleness=0)
        s.submit("b", r, "q", {"w": np.full(3, -2.0, np.float32)}, weight=1.0, staleness=3)
        s.clock.run()
        want = 0.5 * (3.0 * (1.0 + r) + 1.0 * 0.5 * -2.0) / 4.0  # (1 + 3)^-1/2 = 0.5
        np.testing.assert_allclose(s.result("b", r).result(timeout=5)["w"], np.full(3, want), rtol=1e-6)
    s.close()


def test_jobs_tied_in_the_slot_queue_with_str_and_int_ids_take_the_slot_in_queue_order():
    """Two queued jobs tied on urgency, laxity and priority were ordered by id: a str id against an int one raised
    TypeError in the release of the slot, before the releasing job opened its next round, which then never
    opened (a real clock logs the error and goes on: silently)."""
    clk = VirtualClock()
    s = JITScheduler("lazy", slots=1, clock=clk, cost=CostModel(backends={"cpu": BackendCost(1e6, 0.0)},
                                                                startup_s=1.0))
    s.add_job(Job(0, parties=["p"], quorum=1, rounds=2, model_elems=1000, update_bytes=4000))
    for jid in ("b", 7):
        s.add_job(Job(jid, parties=["p"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000))
    clk.call_at(10.0, s.submit, 0, 0, "p", None, 1.0)
    clk.call_at(10.5, s.submit, "b", 0, "p", None, 1.0)  # (both quorums at 10.5: tied)
    clk.call_at(10.5, s.submit, 7, 0, "p", None, 1.0)
    clk.call_at(50.0, s.submit, 0, 1, "p", None, 1.0)
    clk.run()
    assert all(s.result(j, r).done() for j, r in ((0, 0), (0, 1), ("b", 0), (7, 0)))
    ready = {j: s.result(j, 0).result() for j in ("b", 7)}  # (modelled jobs: no model)
    assert ready == {"b": None, 7: None}
    s.close()


def test_jit_is_ready_by_the_deadline_of_a_round_that_ends_partial_there():
    """JIT planned on the quorum time's quantile alone: where one party always came after the deadline of a job
    whose rounds end there with what came (unreachable="partial"), it deployed after the deadline, and every round
    waited a whole start-up (lazy's latency, at 3.7x lazy's aggregator time). It plans on min(quantile, deadline)."""
    def run(policy):
        clk = VirtualClock()
        s = JITScheduler(policy, slots=1, clock=clk, cost=CostModel(backends={"cpu": BackendCost(1e9, 0.0)},
                                                                    startup_s=5.0))
        s.add_job(Job("a", parties=[0, 1, 2, 3], quorum=4, rounds=12, deadline_s=50.0, unreachable="partial",
                      model_elems=1000, update_bytes=4000))

        def start(r, t0):
            for p, d in zip(range(4), (10.0, 11.0, 12.0, 200.0)):
                clk.call_at(t0 + d, send, r, p)

        def send(r, p):
            try:
                s.submit("a", r, p, None, 1.0)
            except LateUpdate:
                pass

        for r in range(11):
            s.result("a", r).add_done_callback(lambda f, r=r: start(r + 1, clk.now()))
        start(0, 0.0)
        clk.run()
        return s.metrics()["a"]

    jit, lazy = run("jit"), run("lazy")
    assert jit["rounds"] == lazy["rounds"] == 12 and lazy["latency_p50_s"] == pytest.approx(5.0, abs=1e-3)
    assert jit["latency_p95_s"] < 1e-3


def test_buffer_pressure_takes_back_a_deployment_only_with_the_budget_full():
    """Past half the byte budget (where early folds start, nothing refused yet) a job queued for a slot took back
    any idle deployment, ranked by its plan from before it deployed: B, half a second from its quorum, lost its
    ready deployment to A and paid a whole start-up (latency 1 s, two deployments). It is taken back only where
    the budget is full, and the job that can wait longest, re-planned now, yields."""
    cost = CostModel(backends={"cpu": BackendCost(1e9, 0.0)}, startup_s=1.0)
    clk = VirtualClock()
    s = JITScheduler("jit", slots=2, clock=clk, cost=cost, byte_budget=40_000, hysteresis_s=0.5)

    def job(jid, n, prior):
        return Job(jid, parties=[f"{jid}{i}" for i in range(n)], quorum=n, rounds=1, model_elems=1000,
                   update_bytes=4000, prior_response_s=prior)

    s.add_job(job("B", 2, 10.0))  # its quorum at 10 s, as predicted
    s.add_job(job("C", 2, 5.0))  # predicted at 5 s, answers at 1000 s
    s.add_job(job("A", 10, 1000.0))  # 6 early answers at 9.5 s (past half the budget), the rest at 1000 s
    for p in ("B0", "B1"):
        clk.call_at(10.0, s.submit, "B", 0, p, None, 1.0)
    for p in ("C0", "C1"):
        clk.call_at(1000.0, s.submit, "C", 0, p, None, 1.0)
    for i in range(10):
        clk.call_at(9.5 if i < 6 else 1000.0, s.submit, "A", 0, f"A{i}", None, 1.0)
    clk.run()
    m = s.metrics()
    assert m["B"]["deployments"] == 1 and m["B"]["latency_p50_s"] < 1e-3
    assert all(s.result(j, 0).done() for j in "ABC")
    s.close()


def test_round_semantics_the_scheduler_review_found():
    """A late weight on an algorithm that weighs no update (unweighted FedAvg, the median) was ignored: a carried
    update counted as a fresh one; a finalize that failed was counted a finished round with a latency; result()
    of a round before the first raised RoundForgotten once rounds had been let go; a job without parties was
    taken, and every round then failed."""
    from jitkernels import robust as R

    tmpl = {"w": np.zeros(2, np.float32)}
    for alg in (jk.algorithms.FedAvg(weighted=False), R.FedMedian()):
        with pytest.raises(InvalidJob, match="does not weigh updates"):
            JITScheduler("eager", clock=VirtualClock()).add_job(
                Job("j", template=tmpl, parties=["a", "b"], quorum=1, late="next_round", late_weight=0.5,
                    algorithm=alg))
    JITScheduler("eager", clock=VirtualClock()).add_job(  # (a late weight of 1 asks for nothing)
        Job("j", template=tmpl, parties=["a", "b"], quorum=1, late="next_round", late_weight=1.0,
            algorithm=R.FedMedian()))
    with pytest.raises(InvalidJob, match="no parties"):
        JITScheduler("eager", clock=VirtualClock()).add_job(Job("j", template=tmpl, parties=[], quorum=1.0))

    class FailingFinalize(ModelExecutor):
        def run(self, task, done):
            if task.kind != "fold":
                task.fn = lambda: (_ for _ in ()).throw(MemoryError("finalize failed"))
            super().run(task, done)

    clk = VirtualClock()
    s = JITScheduler("eager", clock=clk, executor=FailingFinalize(clk), keep_rounds=1)
    s.add_job(Job("f", template=tmpl, parties=["a"], quorum=1, rounds=4, first_round=1))
    for r in range(1, 5):
        s.submit("f", r, "a", {"w": np.ones(2, np.float32)})
        clk.run()
    assert isinstance(s.result("f", 4).exception(), MemoryError)
    m = s.metrics()["f"]
    assert m["rounds"] == 0 and np.isnan(m["latency_p50_s"])
    with pytest.raises(NoSuchRound):
        s.result("f", 0)
    s.close()


def test_a_server_step_torn_part_way_ends_its_job_instead_of_continuing_from_it(monkeypatch):
    """A FedAdam job whose finalize stopped part-way (the second dtype group's step: out of GPU memory at a launch)
    handed its half-stepped model and moments to the next round as its carry; the next round's reset then failed
    again and again (every start-up), and the carry, taken before the reset, was lost to the retry, which
    continued from the template. The job now ends there, its later rounds answered with TornState."""
    from jitkernels.backends import cpp

    two = {"a": np.zeros(3, np.float32), "b": np.zeros(3, np.float64)}
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("adam", template=two, parties=["p"], quorum=1, rounds=4, backend="cpp",
                  algorithm=jk.algorithms.FedAdam(lr=0.1, tau=1e-3)))
    later = s.result("adam", 1)
    calls, real = [], cpp.step

    def step(*a):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("injected at the second group's step")
        return real(*a)

    monkeypatch.setattr(cpp, "step", step)
    s.submit("adam", 0, "p", {"a": np.ones(3, np.float32), "b": np.ones(3)})
    s.clock.run()
    monkeypatch.undo()
    assert isinstance(s.result("adam", 0).exception(timeout=5), MemoryError)
    assert isinstance(later.exception(timeout=5), jk.TornState)
    with pytest.raises(NoSuchRound, match="has ended: a finalize that closes its round failed part-way"):
        s.result("adam", 2)
    s.close()


@pytest.mark.parametrize("durable", [False, True])
def test_a_weight_in_a_one_element_array_counts_once_and_its_round_resolves(tmp_path, durable):
    """Admission takes a one-element array as a weight; submit then called float() on it after the round had
    counted the update (a 2-D one: TypeError), so the round waited for ever for an arrival that never came, a resend
    was a DuplicateParty and the others' updates were late."""
    clk = VirtualClock()
    sched = JITScheduler("lazy", clock=clk, cost=COST, state_dir=tmp_path if durable else None)
    sched.add_job(Job("a", template={"w": np.zeros(3, np.float32)}, parties=["p", "q"], quorum=2, rounds=1))
    acks = [sched.submit("a", 0, "p", {"w": np.ones(3, np.float32)}, np.array([[2.0]])),
            sched.submit("a", 0, "q", {"w": np.full(3, 4.0, np.float32)}, np.array([1.0]))]
    [a.durable.result(timeout=10) for a in acks]
    clk.run()
    np.testing.assert_array_equal(sched.result("a", 0).result(timeout=0)["w"], np.full(3, 2.0, np.float32))
    sched.close()


def test_remove_job_lets_go_of_all_it_holds_and_its_id_starts_afresh():
    """A server that adds jobs over time must be able to forget them: there was no way to, and an ended job kept a
    model-sized aggregator for a next round that never came."""
    from scheduler import JobRemoved, UnknownJob

    clk = VirtualClock()
    slow = CostModel(backends={"cpu": BackendCost(1e3, 0.0)}, startup_s=1.0)  # a fold of 12 bytes takes 12 ms
    sched = JITScheduler("eager", slots=1, clock=clk, cost=slow, byte_budget=1 << 20)
    t = {"w": np.zeros(3, np.float32)}
    one = {"w": np.ones(3, np.float32)}
    sched.add_job(Job("done", template=t, parties=["p"], rounds=1))
    sched.submit("done", 0, "p", one)
    clk.run(until=5)
    ended = sched.jobs["done"]
    assert ended.open is None and ended.spare is None and ended.rounds[0].aggregator is None
    assert sched.remove_job("done")["rounds"] == 1 and "done" not in sched.metrics()

    sched.add_job(Job("a", template=t, parties=["p", "q"], quorum=2, rounds=3))
    sched.add_job(Job("b", template=t, parties=["p"], rounds=1))  # waits for the one slot "a" holds
    sched.submit("a", 0, "p", one)
    sched.submit("a", 1, "p", one)  # sent ahead for a round not open
    clk.run(until=clk.now() + 2.0)
    sched.submit("a", 0, "q", one)  # the quorum: its fold starts, and runs 12 ms
    clk.run(until=clk.now() + 0.001)
    a = sched.jobs["a"]
    assert a.deployment is not None and a.deployment.busy and sched.buffered_bytes > 0
    futures = [sched.result("a", r) for r in (0, 1, 2)]
    final = sched.remove_job("a")
    assert final["deployments"] == 1
    for f in futures:
        with pytest.raises(JobRemoved, match="removed before the round finished"):
            f.result(timeout=0)
    assert sched.buffered_bytes == 0 and sched.free_slots == []  # its slot comes back when its fold ends
    for call in (lambda: sched.submit("a", 0, "p", one), lambda: sched.result("a", 0),
                 lambda: sched.remove_job("a"), lambda: sched.finish_job("a")):
        with pytest.raises(UnknownJob):
            call()
    with pytest.raises(InvalidJob, match="still running"):  # (its fold ends first)
        sched.add_job(Job("a", template=t, parties=["p"], rounds=1))
    sched.submit("b", 0, "p", one)
    clk.run(until=clk.now() + 5)
    assert sched.result("b", 0).result(timeout=0)["w"].tolist() == [1, 1, 1]  # the slot went to "b"
    sched.add_job(Job("a", template=t, parties=["p"], rounds=1))  # afresh: round 0 open, nothing sent ahead
    sched.submit("a", 0, "p", {"w": np.full(3, 2.0, np.float32)})
    clk.run(until=clk.now() + 5)
    assert sched.result("a", 0).result(timeout=0)["w"].tolist() == [2, 2, 2]
    sched.close()


def test_an_ended_job_keeps_no_aggregator_after_a_fold_that_failed_past_its_deadline():
    """The last round's deadline passed while its fold ran, and the fold then failed: the round kept its aggregator
    for the scheduler's life (a fold that succeeded let it go)."""
    from scheduler.executors import ModelExecutor as Model

    class Failing(Model):
        def fold_many(self, agg, items):
            raise RuntimeError("worker lost")

    clk = VirtualClock()
    slow = CostModel(backends={"cpu": BackendCost(1.0, 0.0)}, startup_s=0.0)  # a 4 KB fold takes 4000 s
    s = JITScheduler("eager", clock=clk, executor=Failing(clk), cost=slow)
    s.add_job(Job("a", template={"w": np.zeros(1024, np.float32)}, parties=["p", "q"], quorum=2, rounds=1,
                  deadline_s=10.0))
    s.submit("a", 0, "p", {"w": np.ones(1024, np.float32)})
    clk.run()
    js = s.jobs["a"]
    assert js.open is None and js.rounds[0].aggregator is None and js.spare is None
    assert isinstance(s.result("a", 0).exception(timeout=0), QuorumUnreachable)
    with pytest.raises(InvalidJob, match="late_weight"):  # (a weight no float holds: InvalidJob as any bad one)
        Job("b", parties=["p"], late_weight=__import__("fractions").Fraction(1, 10 ** 400)).check()
    s.close()


def test_a_finished_rounds_cancelled_deadline_lets_its_result_go():
    """A round's deadline timer, cancelled when the round ended, held the round (and its result model) until the
    deadline's time came whenever an earlier event stood before it in the clock's heap: a job kept every round of
    the last deadline_s in memory, not its last keep_rounds."""
    import gc
    import weakref

    clk = VirtualClock()
    s = JITScheduler("eager", slots=2, clock=clk, cost=COST, keep_rounds=2)
    t = {"w": np.zeros(1000, np.float32)}
    s.add_job(Job("slow", template=t, parties=["p", "q"], quorum=2, deadline_s=3600.0))  # its deadline stays first
    s.add_job(Job("fast", template=t, parties=["p"], deadline_s=3600.0))
    refs = []
    for r in range(200):
        s.submit("fast", r, "p", {"w": np.full(1000, r, np.float32)})
        clk.run(until=clk.now() + 2.0)
        if r == 0:
            refs.append(weakref.ref(s.result("fast", 0).result(timeout=0)["w"]))
    gc.collect()
    assert refs[0]() is None  # let go with its round (keep_rounds), not held by its cancelled deadline
    assert len(clk._q) < 150  # and the heap drops its cancelled handles once they are most of it
    s.close()


@pytest.mark.parametrize("rounds", [4, None])
def test_a_job_ending_keeps_a_later_round_whose_quorum_was_acknowledged(rounds):
    """Parties 1 and 2 sent round 1's quorum ahead and then left: a counted job opened round 1 and finalized it, but
    a job without a round count ended at round 0 and failed round 1, dropping the acknowledged updates (its message
    "only 1 parties left" false for round 1). Found by a stateful model of the scheduler."""
    s = JITScheduler("eager", clock=VirtualClock())
    s.add_job(Job("j", template={"a": np.zeros(2, np.float32)}, parties=[0, 1, 2], quorum=2, rounds=rounds))
    s.submit("j", 0, 0, {"a": np.ones(2, np.float32)})
    for p, v in ((1, 2.0), (2, 4.0)):
        assert s.submit("j", 1, p, {"a": np.full(2, v, np.float32)}).accepted
    s.drop_party("j", 1)
    s.drop_party("j", 2)
    s.clock.run(until=100)
    with pytest.raises(QuorumUnreachable):
        s.result("j", 0).result(timeout=0)
    np.testing.assert_array_equal(s.result("j", 1).result(timeout=0)["a"], np.full(2, 3.0, np.float32))
    if rounds is None:  # then the job ends: no round ahead holds an update
        assert s.jobs["j"].ended and s.jobs["j"].finished
        with pytest.raises(NoSuchRound, match="has ended"):
            s.result("j", 2)
    else:  # its remaining rounds fail in turn
        for r in (2, 3):
            assert isinstance(s.result("j", r).exception(timeout=0), QuorumUnreachable)
    s.close()


# --- contracts a mutation review found untested (2026-11-28); each test kills its mutant ----------------------------
def _policy_fixture(pending, deployed=False):
    from types import SimpleNamespace as NS

    from scheduler.predictor import Predictor

    pred = Predictor()
    for p in "abc":
        for y in (10.0, 11.0, 9.0, 10.5):
            pred.observe(p, y)
    sched = NS(clock=NS(now=lambda: 0.0), cost=NS(startup_s=2.0), work_estimate=lambda js, rnd: 3.0)
    js = NS(predictor=pred, job=NS(id="j", deadline_s=None, unreachable="wait"),
            deployment=object() if deployed else None, pending=lambda rnd: pred.indices(pending))
    return sched, js, NS(quorum_time=None, quorum=3, members=[], start=0.0, number=0, quantile_s=None)


def test_jit_deploys_the_work_and_a_start_up_ahead_of_the_quorum_quantile():
    """deploy at = start + Q_alpha - work - start-up (dropping the work deployed 3 s late)."""
    from scheduler.policies import JIT

    sched, js, rnd = _policy_fixture(list("abc"))
    t, info = JIT(0.05).deploy_at(sched, js, rnd)
    assert info["work_s"] == 3.0 and info["startup_s"] == 2.0
    assert t == pytest.approx(rnd.start + info["quantile_s"] - 3.0 - 2.0, abs=1e-6)  # (quantile_s is rounded)
    # a quorum its pending parties cannot make, with history: not yet known (None), not "deploy now"
    sched, js, rnd = _policy_fixture(list("ab"))
    t, info = JIT(0.05).deploy_at(sched, js, rnd)
    assert t is None and info["quantile"] == "inf"


def test_an_oracle_redeployment_pays_its_start_up():
    """A deployed job's redeployment (preemption) starts afresh: the oracle plans its start-up too."""
    from scheduler.policies import Oracle

    sched, js, rnd = _policy_fixture(list("abc"), deployed=True)
    t, info = Oracle(lambda job_id, r: 20.0).deploy_at(sched, js, rnd, redeploy=True)
    assert t == pytest.approx(20.0 - 3.0 - 2.0) and info["startup_s"] == 2.0


def test_submit_refuses_an_update_its_fold_weight_takes_past_the_headroom():
    """submit checked weight * max|x|, the fold the algorithm's fold weight (FedBuff's is 1 whatever the sample
    count): an unweighted FedBuff update of 6e32 at weight 1/3 was acknowledged, and its fold failed the round,
    the other party's update with it."""
    from jitkernels import algorithms as A

    s = JITScheduler("eager", clock=VirtualClock())
    t = {"z": np.zeros(3, np.float32)}
    s.add_job(Job("j", template=t, parties=["a", "b"], quorum=2, rounds=1,
                  algorithm=A.FedBuff(staleness="constant")))
    with pytest.raises(jk.ValueOutOfRange, match="'a'.*fold weight 1"):
        s.submit("j", 0, "a", {"z": np.full(3, 6e32, np.float32)}, weight=1 / 3, staleness=0)
    for p in "ab":
        s.submit("j", 0, p, {"z": np.ones(3, np.float32)}, weight=1.0, staleness=0)
    s.clock.run()
    np.testing.assert_array_equal(s.result("j", 0).result(timeout=0)["z"], np.ones(3, np.float32))
    s.close()


def test_slots_are_a_whole_number_in_range():
    """slots = 1.5 ran as 1 slot, "2" was taken, and 10**30 raised OverflowError from list(range(...))."""
    for bad in (1.5, "2", 10 ** 30, 0, True):
        with pytest.raises(ValueError, match="slots must be an integer"):
            JITScheduler("eager", slots=bad, clock=VirtualClock())
    JITScheduler("eager", slots=np.int64(2), clock=VirtualClock()).close()


def test_live_metrics_count_an_open_deployment_and_each_jobs_peak_is_its_own():
    """Mutation testing found these untested: metrics() while a deployment is open (its time so far, and idle =
    deployed - busy), and a job's peak buffered bytes (the scheduler's total passed for it)."""
    cost = CostModel(backends={"cpu": BackendCost(1e6, 0.0)}, startup_s=1.0)
    clk = VirtualClock()
    s = JITScheduler("eager", slots=1, clock=clk, cost=cost)
    s.add_job(Job("a", parties=["p0", "p1"], quorum=2, rounds=2, model_elems=1000, update_bytes=4000))
    clk.call_at(10.0, s.submit, "a", 0, "p0", None, 1.0)
    clk.run(until=15.0)
    m = s.metrics()["a"]
    assert m["deployed_s"] == pytest.approx(15.0) and m["idle_s"] == pytest.approx(m["deployed_s"] - m["busy_s"])
    assert 0 < m["busy_s"] < 0.1
    clk = VirtualClock()
    s = JITScheduler("lazy", slots=2, clock=clk, cost=cost)
    for job, parties in (("a", ["p0", "p1"]), ("b", ["q0", "q1"])):
        s.add_job(Job(job, parties=parties, quorum=2, rounds=1, model_elems=1000, update_bytes=4000))
    for t, job, p in ((1, "b", "q0"), (2, "a", "p0"), (3, "a", "p1"), (4, "b", "q1")):
        clk.call_at(t, s.submit, job, 0, p, None, 1.0)
    clk.run()
    m = s.metrics()
    assert m["a"]["peak_bytes_buffered"] == m["b"]["peak_bytes_buffered"] == 8000


def test_a_jit_scheduler_loads_the_planning_code_before_its_first_job():
    """numba loads (or compiles) the predictor's code on first use: 0.4-1.8 s here, which the first add_job of a JIT
    scheduler spent under the scheduler's lock, with round 0's deadline running (a deadline of 1 s failed the round
    before add_job returned). Constructing a JIT scheduler loads it; eager, which plans nothing, does not."""
    from scheduler import predictor

    predictor.warm.cache_clear()
    JITScheduler("eager", clock=VirtualClock()).close()
    assert predictor.warm.cache_info().currsize == 0
    JITScheduler("jit", clock=VirtualClock()).close()
    assert predictor.warm.cache_info().currsize == 1


def test_take_backs_for_quorums_that_are_in_do_not_count_against_a_job():
    """The rule that stops two idle jobs taking a slot from each other for ever counts take-backs made at another
    job's planned time only: a job whose deployment two urgent jobs (quorums in) took back could no longer take a
    third job's long-idle deployment at its own planned time, and paid a whole start-up at its quorum."""
    from scheduler.policies import Policy

    plans = {"A": [(0, 10.0), (11, 40.0), (41, 70.0)], "B": [], "C": [], "D": [(0, 50.0), (55, 500.0)]}

    class Table(Policy):  # planned deploy times that move later while nothing arrives, as JIT's quantiles do
        name = "table"

        def deploy_at(self, sched, js, rnd, *, redeploy=False):
            now = sched.clock.now()
            if rnd.quorum_time is not None:
                return now, {"quorum": "reached"}
            return max(((s, t) for s, t in plans[js.job.id] if now >= s), default=(0, None))[1], {}

    clock = VirtualClock()
    s = JITScheduler(Table(), slots=1, clock=clock, cost=CostModel(backends={"cpu": BackendCost(1e9, 0.0)},
                                                                  startup_s=1.0))
    for j in "ABCD":
        s.add_job(Job(j, parties=[j + "0"], quorum=1, rounds=1, model_elems=1000, update_bytes=4000))
    for t, j in [(12, "B"), (45, "C"), (80, "A"), (510, "D")]:
        clock.call_at(t, s.submit, j, 0, j + "0", None, 1.0)
    clock.run()
    m = s.metrics()
    # (the work's 2e-5 s; a start-up of 1 s, and D deployed 40 s, where those take-backs counted)
    assert m["A"]["latency_p50_s"] < 0.01 and m["D"]["deployed_s"] == pytest.approx(30.0, abs=0.01)


def test_scheduler_arguments_are_refused_by_name():
    """keep_rounds=1.5 kept 1; keep_rounds=None, decision_log="x" and alpha=None failed as bare TypeErrors."""
    for kw, name in (({"keep_rounds": 1.5}, "keep_rounds"), ({"keep_rounds": None}, "keep_rounds"),
                     ({"decision_log": "x"}, "decision_log"), ({"decision_log": -1}, "decision_log"),
                     ({"alpha": None}, "alpha"), ({"alpha": "0.1"}, "alpha"), ({"alpha": True}, "alpha")):
        with pytest.raises(ValueError, match=name):
            JITScheduler(clock=VirtualClock(), **kw)
    JITScheduler(clock=VirtualClock(), alpha=np.float64(0.1), keep_rounds=np.int64(3), decision_log=0).close()


@pytest.mark.parametrize("deadline, prior", [(None, 100.0), (130.0, 100.0), (None, None)])
def test_jit_tells_a_redeployment_later_than_t_from_one_cdf_as_its_plan_does(deadline, prior):
    """The search for a slot to take back asks each idle deployment whether its redeployment comes later than t, by
    one evaluation of the quorum CDF (JIT.redeploy_after) instead of the quantile's search: the answer is deploy_at's
    (redeploy=True), and its time where it does, part way through rounds and near the deadline; deploy_at itself
    runs only for those (and before any response, with no prior: the plan is made, deploying at once as eager)."""
    from scheduler.policies import JIT

    rng = np.random.default_rng(4)
    clk = VirtualClock()
    sched = JITScheduler("jit", slots=1, clock=clk, cost=CostModel(backends={"cpu": BackendCost(1e8, 0.0)},
                                                                    startup_s=5.0))
    parties = list(range(30))
    sched.add_job(Job("a", parties=parties, quorum=0.8, rounds=4, model_elems=10_000, update_bytes=40_000,
                      prior_response_s=prior, deadline_s=deadline, unreachable="partial"))
    js, pol = sched.jobs["a"], sched.policy
    assert isinstance(pol, JIT)

    def submit(r, p):
        try:
            sched.submit("a", r, p, None, 1.0)
        except LateUpdate:  # (past the quorum)
            pass
    checked = 0
    for r in range(3):
        start = js.open.start
        assert js.open.number == r and start <= clk.now() < start + 1.0
        for p, dt in zip(parties, rng.lognormal(np.log(100.0), 0.3, len(parties))):
            clk.call_at(start + dt, submit, r, p)
        for frac in (0.0, 0.3, 0.6, 0.9):
            clk.run(until=start + 20.0 + 100.0 * frac)
            rnd = js.open
            if rnd is None or rnd.number != r or rnd.quorum_time is not None:
                continue
            d, _ = pol.deploy_at(sched, js, rnd, redeploy=True)
            d = math.inf if d is None else d
            near = [] if math.isinf(d) else [d + e for e in (-10.0, -2.0, -0.1, -0.01, 0.01, 0.1, 2.0, 10.0)]
            for t in [clk.now() + e for e in (-50.0, 0.0, 200.0)] + near:
                if abs(t - d) <= 1e-3:  # (the quantile is solved to 1e-5 relative)
                    continue
                planned = []
                pol.deploy_at = lambda *a, **k: planned.append(1) or JIT.deploy_at(pol, *a, **k)
                try:
                    assert pol.redeploy_after(sched, js, rnd, t) == (d if d > t else None)
                finally:
                    del pol.deploy_at
                if js.predictor.has_history():
                    assert len(planned) == (d > t)  # (one CDF said no: no plan made)
                checked += d > t
        fut = sched.result("a", r)
        while not fut.done():  # (to the round's end: the next opens then, and its arrivals are drawn from there)
            clk.run(until=clk.now() + 0.25)
        fut.result()
    assert checked >= 20
    sched.close()
