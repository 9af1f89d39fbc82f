"""Scheduler runtime: ``submit`` latency while folds run on the executor's threads, and simulator event rates.

``submit`` admits the update (validation and stats pass) in the caller's thread and returns; it never waits for a
fold. The p50/p99 of ``submit`` on small updates is recorded while a large job's folds keep the pool busy.
"""

import time

import numpy as np
import pytest

from scheduler import BackendCost, CostModel, JITScheduler, Job
from scheduler.simulator import Workload, simulate


@pytest.mark.parametrize("durable, nice, fold_nice", [(False, 0, 0), (True, 0, 0), (True, 19, 0), (True, 0, 19)],
                         ids=["memory", "state_dir", "state_dir_writer_nice19", "state_dir_fold_nice19"])
def test_submit_latency_while_folding(benchmark, tmp_path, durable, nice, fold_nice):
    """With a state directory every update is also written (and fsynced) by the writer thread: ``submit`` must not
    wait for that (the acknowledgement's ``durable`` future does). ``writer_nice``, ``fold_nice``: see JITScheduler."""
    rng = np.random.default_rng(0)
    big_t = np.zeros(8_000_000, np.float32)
    small_t = {f"l{i}": np.zeros(1000, np.float32) for i in range(10)}
    cost = CostModel(backends={"cpu": BackendCost(2e10, 5e-5)}, startup_s=0.0)
    sched = JITScheduler("eager", slots=2, cost=cost, state_dir=tmp_path if durable else None, writer_nice=nice,
                         fold_nice=fold_nice)
    big_parties = list(range(40))
    sched.add_job(Job("big", template=big_t, parties=big_parties, quorum=1.0, rounds=1))
    n_small = 2000
    sched.add_job(Job("small", template=small_t, parties=list(range(n_small)), quorum=1.0, rounds=1))
    big = [rng.standard_normal(big_t.size).astype(np.float32) for _ in range(4)]
    small = {k: np.ones(1000, np.float32) for k in small_t}
    lat = []
    try:
        for p in big_parties:  # keeps the fold threads busy
            sched.submit("big", 0, p, big[p % 4], 1.0)

        def run():
            for p in range(n_small):
                t0 = time.perf_counter()
                sched.submit("small", 0, p, small, 1.0)
                lat.append(time.perf_counter() - t0)

        benchmark.pedantic(run, rounds=1, iterations=1)
        sched.result("small", 0).result(timeout=120)
        sched.result("big", 0).result(timeout=120)
    finally:
        sched.close()
    lat_us = np.array(lat) * 1e6
    benchmark.extra_info.update(submit_p50_us=float(np.percentile(lat_us, 50)),
                                submit_p99_us=float(np.percentile(lat_us, 99)),
                                submit_max_us=float(lat_us.max()))
    print(f"\nsubmit latency while folding: p50 {np.percentile(lat_us, 50):.0f} us, "
          f"p99 {np.percentile(lat_us, 99):.0f} us, max {lat_us.max():.0f} us")


def _scale_shape(rounds: int) -> Workload:
    """The issue's scale shape (examples/scale_1000_jobs.toml: 1,000 jobs x 1,000 parties) cut to ``rounds``."""
    import dataclasses
    import os

    wl = Workload.from_toml(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                                         "scale_1000_jobs.toml"))
    return dataclasses.replace(wl, jobs=[dataclasses.replace(j, rounds=rounds) for j in wl.jobs])


@pytest.mark.parametrize("shape", ["cross_device", "1000_jobs_1_round"])
def test_simulator_event_rate(benchmark, shape):
    """Events per second of a JIT run: the cross_device mix (10 jobs x 2,000 parties), and the issue's scale shape
    of many jobs cut to one round (1M updates, ~40 s here), where costs that grow with the number of jobs show
    (a slot search that weighed every idle deployment took most of it, README "Simulator speed")."""
    wl = Workload.builtin("cross_device") if shape == "cross_device" else _scale_shape(rounds=1)
    result = benchmark.pedantic(lambda: simulate(wl, "jit"), rounds=1, iterations=1)
    benchmark.extra_info.update(events=result.events, events_per_s=result.events / result.wall_s)
    print(f"\n{shape}, jit: {result.events:,} events at {result.events / result.wall_s:,.0f} events/s")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_executor_fold_throughput(benchmark, executor):
    """``executor.fold_many`` of k = 10 admitted updates of 4M float32 (160 MB): in place on the local executor's
    threads, or split over 2 Ray workers (object store in, partial states out as bytes, merged in a tree).
    ``extra_info["gb_per_s"]`` is update bytes folded per second."""
    from scheduler import LocalExecutor, RayExecutor, RealClock
    import jitkernels as jk

    if executor == "ray":
        ray = pytest.importorskip("ray")
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ex = RayExecutor(RealClock(), slots=1, workers=2)
    else:
        ex = LocalExecutor(RealClock(), slots=1)
    rng = np.random.default_rng(0)
    tmpl = {"w": np.zeros(4_000_000, np.float32)}
    agg = jk.Aggregator(tmpl)
    items = agg.admit_many([{"w": rng.standard_normal(4_000_000).astype(np.float32)} for _ in range(10)],
                           [1.0] * 10, list(range(10)))
    try:
        benchmark.pedantic(lambda: ex.fold_many(agg, items), setup=lambda: agg.reset(reuse=True), rounds=5,
                           warmup_rounds=1)
        if benchmark.stats is not None:
            benchmark.extra_info["gb_per_s"] = 10 * 16e6 / benchmark.stats.stats.median / 1e9
    finally:
        ex.close()
