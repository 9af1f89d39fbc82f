"""The scheduler on the real clock with the local executor: real updates in, real models out."""

import os
import sys
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jitkernels as jk
from scheduler import BackendCost, CostModel, JITScheduler, Job


@pytest.mark.parametrize("policy", ["eager", "lazy", "jit"])
def test_runtime_two_jobs_two_slots(policy):
    rng = np.random.default_rng(0)
    tmpl = {"w": np.zeros((64, 32), np.float32), "b": np.zeros(32, np.float32)}
    parties = [f"p{i}" for i in range(8)]
    cost = CostModel(backends={"cpu": BackendCost(5e9, 1e-4)}, startup_s=0.01)
    sched = JITScheduler(policy, slots=2, cost=cost)
    try:
        ups = {}
        for job in ("a", "b"):
            sched.add_job(Job(job, template=tmpl, parties=parties, quorum=1.0, rounds=2))
            for r in range(2):
                for p in parties:
                    ups[job, r, p] = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tmpl.items()}

        errors = []

        def client(job, p, i):
            try:
                for r in range(2):
                    if r:
                        sched.result(job, r - 1).result(timeout=30)  # the next round starts from the new model
                    ack = sched.submit(job, r, p, ups[job, r, p], weight=i + 1)
                    assert ack.accepted and ack.durable.result(timeout=5)
            except BaseException as e:  # (a thread's failure is not the test's: it is raised below)
                errors.append(e)

        threads = [threading.Thread(target=client, args=(job, p, i))
                   for job in ("a", "b") for i, p in enumerate(parties)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not [t for t in threads if t.is_alive()]
        if errors:
            raise errors[0]
        for job in ("a", "b"):
            for r in range(2):
                got = sched.result(job, r).result(timeout=30)
                ref = jk.Aggregator(tmpl, acc_dtype="float64")
                ref.fold_many([ups[job, r, p] for p in parties], list(range(1, 9)), parties=parties)
                np.testing.assert_allclose(got["w"], ref.finalize()["w"], rtol=1e-5, atol=1e-6)
        m = sched.metrics()
        assert m["a"]["rounds"] == 2 and m["b"]["busy_s"] > 0
    finally:
        sched.close()


def test_runtime_bad_update_raises_in_submit():
    sched = JITScheduler("jit", slots=1)
    try:
        sched.add_job(Job("a", template=np.zeros(4, np.float32), parties=["x", "y"], quorum=2, rounds=1))
        with pytest.raises(jk.NonFiniteUpdate):
            sched.submit("a", 0, "x", np.array([1, np.nan, 0, 0], np.float32), 1.0)
        sched.submit("a", 0, "x", np.ones(4, np.float32), 1.0)  # the same party may still send a good one
        with pytest.raises(jk.DuplicateParty):
            sched.submit("a", 0, "x", np.ones(4, np.float32), 1.0)
        sched.submit("a", 0, "y", np.full(4, 3.0, np.float32), 1.0)
        np.testing.assert_array_equal(sched.result("a", 0).result(timeout=10), np.full(4, 2.0))
    finally:
        sched.close()


def _thread_nices() -> dict:
    """{thread id: nice value} of this process's threads (Linux /proc)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                out[int(tid)] = int(f.read().rsplit(")", 1)[1].split()[16])
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the nice value is per thread on Linux only")
def test_fold_nice_renices_the_fold_threads_and_their_kernel_threads():
    """JITScheduler(fold_nice=n): the executor's fold threads, and the OpenMP workers they start (libgomp keeps a pool
    per thread that opens a parallel region; new threads inherit their creator's nice value), run at nice n; the
    caller's thread and the threads that existed before keep theirs."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    old = _thread_nices()
    n = 2 * jk.batch.SMALL_CALL  # two kernel threads on a machine with two cores or more
    sched = JITScheduler("eager", slots=1, fold_nice=7)
    try:
        sched.add_job(Job("a", template=np.zeros(n, np.float32), parties=["x"], quorum=1, rounds=1))
        sched.submit("a", 0, "x", np.ones(n, np.float32), 1.0)
        np.testing.assert_array_equal(sched.result("a", 0).result(timeout=60), np.ones(n, np.float32))
        assert sched.executor.pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result(timeout=10) == 7
        new = {t: v for t, v in _thread_nices().items() if t not in old}
        niced = [t for t, v in new.items() if v == 7]
        want = 2 if sched.executor.kernel_threads > 1 and jk._core.openmp else 1
        assert len(niced) >= want, new
    finally:
        sched.close()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before
    now = _thread_nices()
    assert all(now.get(t, v) == v for t, v in old.items())


def test_a_scheduler_given_an_executor_runs_on_its_clock_and_closes_it():
    """RayExecutor(RealClock(), ...) inline (the README's form) left the executor's clock thread running after
    close(), and the scheduler ran a second clock of its own beside it."""
    import time

    from scheduler import JITScheduler, LocalExecutor, RealClock

    before = set(threading.enumerate())
    for _ in range(3):
        s = JITScheduler(policy="jit", slots=1, executor=LocalExecutor(RealClock(), 1))
        assert s.clock is s.executor.clock
        s.close()
    time.sleep(0.2)
    assert not [t.name for t in set(threading.enumerate()) - before if t.is_alive()]


@pytest.mark.parametrize("order", ["first_first", "last_first"])
def test_executors_put_the_kernel_thread_count_back_whatever_order_they_close_in(order):
    """Each executor set the process's kernel thread count and put back the count it had found: closed first in,
    first out, the first one's count stayed (2 threads, executors of 3 and 2: 3 after both had closed)."""
    from scheduler import LocalExecutor, VirtualClock

    old = jk.set_num_threads(2)
    try:
        a = LocalExecutor(VirtualClock(), 1, kernel_threads=3)
        b = LocalExecutor(VirtualClock(), 1, kernel_threads=4)
        assert jk.get_num_threads() == 4
        for ex in ((a, b) if order == "first_first" else (b, a)):
            ex.close()
        assert jk.get_num_threads() == 2
    finally:
        jk.set_num_threads(old)


def test_close_from_a_round_futures_done_callback_returns(tmp_path):
    """close() called from a round's done-callback ("stop the server once job A is done") while job B's fold was
    running deadlocked: the callback ran on the clock's thread under the scheduler's lock, close() waited for the fold
    threads, and B's fold thread waited for the lock."""
    import time

    sched = JITScheduler("eager", slots=2, state_dir=tmp_path, checkpoint_bytes=0)
    tmpl = {"w": np.zeros(1000, np.float32)}
    sched.add_job(Job("A", template=tmpl, parties=["a"], quorum=1, rounds=1))
    sched.add_job(Job("B", template=tmpl, parties=["b1", "b2"], quorum=2, rounds=1))
    fold = sched.executor.fold_many
    b_folding = threading.Event()

    def slow_fold(agg, items):  # B's fold takes a while (a large model's)
        if any(str(it.party).startswith("b") for it in items):
            b_folding.set()
            time.sleep(1.0)
        return fold(agg, items)
    sched.executor.fold_many = slow_fold
    closed = threading.Event()
    fut = sched.result("A", 0)
    fut.add_done_callback(lambda f: (sched.close(), closed.set()))
    sched.submit("B", 0, "b1", {"w": np.ones(1000, np.float32)})
    assert b_folding.wait(10)
    sched.submit("A", 0, "a", {"w": np.ones(1000, np.float32)})
    np.testing.assert_array_equal(fut.result(timeout=10)["w"], np.ones(1000, np.float32))
    assert closed.wait(10), "close() from the done-callback did not return"
    assert sched._closed and sched.store.closed


def test_a_timed_out_asyncio_wait_leaves_the_round_and_the_job_going():
    """asyncio.wait_for(asyncio.wrap_future(fut), timeout) cancels the round's future when it times out: the job
    stopped for good (the round's resolution raised InvalidStateError on the clock's thread)."""
    import asyncio

    sched = JITScheduler("eager")
    try:
        sched.add_job(Job("j", template=np.zeros(4, np.float32), parties=["a", "b"], quorum=2, rounds=2))

        async def wait(r):
            return await asyncio.wait_for(asyncio.wrap_future(sched.result("j", r)), 0.05)
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(wait(0))
        assert not sched.result("j", 0).cancelled()
        for r in range(2):
            for p in ("a", "b"):
                sched.submit("j", r, p, np.full(4, r + 1.0, np.float32))
            np.testing.assert_array_equal(sched.result("j", r).result(timeout=10), np.full(4, r + 1.0))
    finally:
        sched.close()


def test_a_deadline_past_the_platforms_longest_wait_leaves_the_clock_running():
    """deadline_s=1e10 ("practically none") is past threading.TIMEOUT_MAX: the real clock's wait raised
    OverflowError, its thread died, and every acknowledged update waited for ever. It waits an hour at a time."""
    s = JITScheduler("eager", slots=1)
    try:
        s.add_job(Job("a", template={"w": np.zeros(4, np.float32)}, parties=["p0"], quorum=1, rounds=2,
                      deadline_s=1e10))
        s.submit("a", 0, "p0", {"w": np.ones(4, np.float32)})
        assert s.result("a", 0).result(timeout=30)["w"].tolist() == [1.0] * 4
        assert s.clock._thread.is_alive()
    finally:
        s.close()


@pytest.mark.parametrize("where", ["thread", "caller"])
def test_a_base_exception_in_a_fold_fails_its_round_and_frees_the_deployment(monkeypatch, where):
    """A fold that raised a BaseException (SystemExit from code it calls) on a fold thread left the thread without
    a word: its deployment stayed busy and its round unresolved for good, and every later round waited behind it.
    It now fails its round as an error would; on the caller's thread (a virtual clock's executor) it is raised
    again once the round has it, so that Ctrl-C still stops a simulation."""
    from scheduler import LocalExecutor, ModelExecutor, VirtualClock

    calls = []

    def fold_many(agg, items):
        calls.append(len(items))
        if len(calls) == 1:
            raise SystemExit("a fold that exits")
        agg.fold_many(items)

    monkeypatch.setattr(LocalExecutor, "fold_many", staticmethod(fold_many))
    monkeypatch.setattr(ModelExecutor, "fold_many", staticmethod(fold_many))
    clk = VirtualClock() if where == "caller" else None
    s = JITScheduler("eager", slots=1, clock=clk)
    s.add_job(Job("j", template={"w": np.zeros(4, np.float32)}, parties=["a"], quorum=1, rounds=2))
    try:
        if where == "caller":
            s.submit("j", 0, "a", {"w": np.ones(4, np.float32)})
            with pytest.raises(SystemExit):
                clk.run(until=10)
            clk.run(until=20)
        else:
            s.submit("j", 0, "a", {"w": np.ones(4, np.float32)})
        assert isinstance(s.result("j", 0).exception(timeout=10), SystemExit)
        s.submit("j", 1, "a", {"w": np.full(4, 2.0, np.float32)})
        if where == "caller":
            clk.run(until=40)
        np.testing.assert_array_equal(s.result("j", 1).result(timeout=10)["w"], np.full(4, 2.0, np.float32))
    finally:
        s.close()


def test_the_real_clock_never_calls_a_handle_cancelled_as_it_is_read(caplog):
    """cancel() from another thread (remove_job cancels timers) between the clock thread's reads of a handle's fn and
    args: the live fn was called with no arguments, and its TypeError logged as a failed callback."""
    import time

    from scheduler.clock import Handle, RealClock

    class CancelledWhileRead(Handle):  # the other thread's cancel() lands between the two reads
        @property
        def args(self):
            self.cancel()
            return self._args

        @args.setter
        def args(self, value):
            self._args = value

        __slots__ = ("_args",)

    calls = []
    clk = RealClock()
    try:
        with clk._cv:
            h = CancelledWhileRead(clk.now(), lambda x: calls.append(x), (1,))
            clk._q._heap.append((h.when, next(clk._q._seq), h))
            clk._cv.notify()
        done = threading.Event()
        clk.call_later(0.05, done.set)
        assert done.wait(5)
    finally:
        clk.close()
    time.sleep(0.05)
    assert calls == [] and "failed" not in caplog.text


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_call_at_each_runs_in_the_order_of_as_many_call_at_calls(data):
    """The simulator schedules a round's arrivals with one heap entry at a time (call_at_each); the clock must run
    them, and everything scheduled around and between them (ties included, events due now, callbacks that schedule
    more), in exactly the order that one call_at per arrival gave."""
    from scheduler import VirtualClock

    times = st.sampled_from([0.0, 1.0, 1.5, 2.0, 3.0])  # few values: ties between streams and single events
    batches = data.draw(st.lists(st.lists(times, max_size=6), min_size=1, max_size=4))
    singles = data.draw(st.lists(st.tuples(times, st.booleans()), max_size=6))
    start = data.draw(st.sampled_from([0.0, 1.0]))

    def run(each: bool) -> list:
        clk, log = VirtualClock(), []

        def fire(tag, spawn=False):
            log.append((clk.now(), tag))
            if spawn:  # a callback that schedules more, now and later, between the batches' calls
                clk.call_soon(fire, tag + "/soon")
                clk.call_later(0.5, fire, tag + "/later")

        def begin():
            for b, batch in enumerate(batches):
                ts = sorted(start + t for t in batch)
                calls = [(f"b{b}.{i}", i == 0) for i in range(len(ts))]
                if each:
                    clk.call_at_each(ts, fire, calls)
                else:
                    for t, c in zip(ts, calls):
                        clk.call_at(t, fire, *c)
                for s, (t, spawn) in enumerate(singles):
                    clk.call_at(start + t, fire, f"s{b}.{s}", spawn)
        clk.call_at(start, begin)
        clk.run()
        return log

    assert run(True) == run(False)


def test_call_at_each_refuses_times_out_of_order_and_a_count_mismatch():
    from scheduler import VirtualClock

    clk = VirtualClock()
    with pytest.raises(ValueError, match="ascending"):
        clk.call_at_each([2.0, 1.0], print, [(), ()])
    with pytest.raises(ValueError, match="2 times for 1 calls"):
        clk.call_at_each([1.0, 2.0], print, [()])
    with pytest.raises(ValueError, match="NaN"):
        clk.call_at_each([1.0, float("nan")], print, [(), ()])
    clk.run()
    assert clk.events == 0


def test_the_local_executor_shares_the_users_thread_count_between_its_slots():
    """Its kernel threads were the CPUs over the slots whatever the user had set: under OMP_NUM_THREADS=1 (or
    jk.set_num_threads(1)) a scheduler ran OpenMP workers anyway. And kernel_threads=0 was taken as "not given"."""
    from scheduler import LocalExecutor, VirtualClock

    old = jk.set_num_threads(1)
    try:
        ex = LocalExecutor(VirtualClock(), 2)
        assert ex.kernel_threads == 1 and jk.get_num_threads() == 1
        ex.close()
        jk.set_num_threads(4)
        a, b = LocalExecutor(VirtualClock(), 2), LocalExecutor(VirtualClock(), 2)  # (the second took the first's
        assert a.kernel_threads == b.kernel_threads == 2  # share and shared it again: 1)
        b.close()
        a.close()
        assert jk.get_num_threads() == 4
        a = LocalExecutor(VirtualClock(), 1)  # the user sets a count while an executor is open: it is theirs
        jk.set_num_threads(1)
        b = LocalExecutor(VirtualClock(), 1)
        assert b.kernel_threads == 1
        b.close()
        a.close()
        assert jk.get_num_threads() == 1  # (and what the last close restores)
        jk.set_num_threads(4)
        ex = LocalExecutor(VirtualClock(), 1, kernel_threads=np.int64(3))  # (as jk.set_num_threads takes it)
        assert ex.kernel_threads == 3
        ex.close()
        for bad in (0, -1, 2.5, True, "2"):
            with pytest.raises(ValueError, match="kernel_threads"):
                LocalExecutor(VirtualClock(), 1, kernel_threads=bad)
    finally:
        jk.set_num_threads(old)


def test_a_finished_stream_of_calls_is_freed_without_the_cyclic_collector():
    """A stream (call_at_each) held itself through its handle's bound method; the simulator runs with the cyclic
    collector off, so every round's arrival list stayed until the run ended (~0.2 MB a round: 1 GB over the 10M-event
    run). The last call lets it all go."""
    import gc
    import weakref

    from scheduler import VirtualClock

    class Arg:
        pass
    was = gc.isenabled()
    gc.disable()
    try:
        clk, seen = VirtualClock(), []
        arg = Arg()
        ref = weakref.ref(arg)
        clk.call_at_each([1.0, 2.0, 3.0], seen.append, [(arg,), (arg,), (arg,)])
        del arg
        clk.run()
        assert len(seen) == 3
        seen.clear()
        assert ref() is None
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("policy", ["eager", "jit"])
def test_a_deployment_due_now_on_the_real_clock_is_requested_at_once(policy):
    """The policy reads the clock after _plan did: on the real clock its "now" came later, and a deployment due at
    once (eager's at the round's start, JIT's once the quorum is in) became a timer, logged as planned, leaving the
    slot queue. The same decisions as on the virtual clock now."""
    sched = JITScheduler(policy, slots=1)
    try:
        sched.add_job(Job("A", template={"w": np.zeros(4, np.float32)}, parties=["p0", "p1"], quorum=2, rounds=1,
                          prior_response_s=100.0))
        for p in ("p0", "p1"):
            sched.submit("A", 0, p, {"w": np.ones(4, np.float32)})
        sched.result("A", 0).result(timeout=30)
        events = [d["event"] for d in sched.decisions if d["event"] in ("deploy_planned", "deploy")]
        assert events[-1] == "deploy" and (policy == "jit" or events == ["deploy"]), events
        assert not [d for d in sched.decisions if d.get("plan", {}).get("timer")]
    finally:
        sched.close()


def test_submit_copy_holds_its_own_arrays_until_the_round_ends():
    """The scheduler holds a submitted update's arrays until its round ends (no copy): a server that reuses its
    receive buffer passes copy=True (there was no way to)."""
    sched = JITScheduler("lazy", slots=1)
    try:
        sched.add_job(Job("A", template={"w": np.zeros(4, np.float32)}, parties=["p0", "p1"], quorum=2, rounds=1))
        buf = np.ones(4, np.float32)
        sched.submit("A", 0, "p0", {"w": buf}, copy=True)
        buf[:] = 5.0  # the receive buffer, reused for the next party's update
        sched.submit("A", 0, "p1", {"w": buf}, copy=True)
        np.testing.assert_array_equal(sched.result("A", 0).result(timeout=30)["w"], np.full(4, 3.0, np.float32))
    finally:
        sched.close()
