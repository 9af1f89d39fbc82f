"""The scheduler on the real clock with the local executor: real updates in, real models out."""

import threading

import numpy as np
import pytest

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

        def client(job, p, i):
            for r in range(2):
                if r:
                    sched.result(job, r - 1).result(timeout=30)  # the next round starts from the new model
                ack = sched.submit(job, r, p, ups[job, r, p], weight=i + 1)
                assert ack.accepted and ack.durable.result(timeout=5)

        threads = [threading.Thread(target=client, args=(job, p, i))
                   for job in ("a", "b") for i, p in enumerate(parties)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
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
