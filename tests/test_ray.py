"""The Ray executor against a real local Ray (``ray.init(num_cpus=2)``): partial folds on Ray workers merged in a
fixed tree equal the in-process fold, a scheduler job runs its rounds through it, and a worker killed mid-fold
loses nothing (Ray re-runs the task from the object store)."""

import os

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is a test dependency: pip install -e '.[test]'")

import jitkernels as jk  # noqa: E402
from scheduler import JITScheduler, RayExecutor, RealClock  # noqa: E402

import crash_workload as cw  # noqa: E402


@pytest.fixture(scope="module")
def kill_file(tmp_path_factory):
    return str(tmp_path_factory.mktemp("ray") / "kill-once")


@pytest.fixture(scope="module")
def executor(kill_file):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"JITKERNELS_RAY_KILL_ONCE": kill_file}})
    ex = RayExecutor(RealClock(), slots=1, workers=2)
    yield ex
    ex.close()
    ray.shutdown()


def _batch(agg, k=5, seed=0):
    rng = np.random.default_rng(seed)
    ups = [{n: rng.standard_normal(a.shape).astype(np.float32) for n, a in cw.template().items()} for _ in range(k)]
    return agg.admit_many(ups, [float(j + 1) for j in range(k)], [f"p{j}" for j in range(k)])


@pytest.mark.parametrize("alg", ["fedavg", "fedadam", "dp"])
def test_ray_partial_folds_equal_the_local_fold(executor, alg):
    a = jk.algorithms.resolve(cw.algorithm(alg))
    base = cw.template() if a.needs_base else None
    local = jk.Aggregator(cw.template(), a, base=base, deterministic=True)
    # the same algorithm and seed, another instance: one DP instance refuses to noise two aggregates in one round
    remote = jk.Aggregator(cw.template(), jk.algorithms.resolve(cw.algorithm(alg)), base=base, deterministic=True)
    local.fold_many(_batch(local))
    executor.fold_many(remote, _batch(remote))
    assert remote.state.same_bits(local.state)  # deterministic mode: any split and merge tree gives the same bits
    out_l, out_r = local.finalize(), remote.finalize()
    assert all(out_l[n].tobytes() == out_r[n].tobytes() for n in out_l)


def test_gpu_aggregators_send_host_copies_to_the_workers(executor):
    """A GPU aggregator's device updates, float and int8-quantized, go to Ray's workers as host copies (a device
    Quantized went as CuPy arrays), and the workers' partial states merge into the GPU state: the local fold's bits.
    Run over the fake CuPy (tests/fake_cupy.py), which cannot reach the workers: only host arrays can."""
    fake_cupy = pytest.importorskip("fake_cupy")
    with fake_cupy.installed():
        import cupy as cp
        tmpl = cw.template()
        rng = np.random.default_rng(5)
        ups = [{n: rng.standard_normal(a.shape).astype(np.float32) for n, a in tmpl.items()} for _ in range(4)]
        ups[1] = {n: jk.Quantized.quantize(a, block=32) for n, a in ups[1].items()}
        dev = [{n: jk.Quantized(cp.asarray(a.values), cp.asarray(a.scale), a.block) if isinstance(a, jk.Quantized)
                else cp.asarray(a) for n, a in u.items()} for u in ups]
        gpu = jk.Aggregator({n: cp.asarray(a) for n, a in tmpl.items()}, deterministic=True)
        local = jk.Aggregator(tmpl, deterministic=True)
        executor.fold_many(gpu, gpu.admit_many(dev, [1.0, 2.0, 3.0, 4.0], ["a", "b", "c", "d"]))
        local.fold_many(ups, [1.0, 2.0, 3.0, 4.0], parties=["a", "b", "c", "d"])
        assert gpu.on_gpu and gpu.state.same_bits(local.state)


def test_a_worker_killed_mid_fold_loses_nothing(executor, kill_file):
    agg = jk.Aggregator(cw.template(), deterministic=True)
    ref = jk.Aggregator(cw.template(), deterministic=True)
    ref.fold_many(_batch(ref, seed=3))
    open(kill_file, "w").close()  # the next fold task to start exits its worker process
    executor.fold_many(agg, _batch(agg, seed=3))
    assert not os.path.exists(kill_file)  # a worker did die
    assert agg.state.same_bits(ref.state)


def test_a_scheduler_job_runs_its_rounds_on_ray(executor):
    sched = JITScheduler(policy="eager", slots=1, executor=executor)
    sched.add_job(cw.job(alg="fedadam"))
    for r, p in cw.order():
        sched.submit("crash-job", r, p, cw.update(r, p), cw.weight(r, p))
    got = [sched.result("crash-job", r).result(timeout=120) for r in range(cw.ROUNDS)]
    want = cw.expected(alg="fedadam")
    assert all(g[n].tobytes() == w[n].tobytes() for g, w in zip(got, want) for n in w)


def test_buffered_rules_and_impossible_requests(executor):
    """Robust (buffered) rules fold in the driver, as partial updates do (their worker states had no slab and
    failed); a cpus_per_task no node has is refused at once (its tasks would wait forever)."""
    from jitkernels import robust as R

    for alg in (R.FedMedian(), R.Krum(f=1, m=1)):
        loc, rem = jk.Aggregator(cw.template(), alg), jk.Aggregator(cw.template(), alg)
        loc.fold_many(_batch(loc))
        executor.fold_many(rem, _batch(rem))
        a, b = loc.finalize(), rem.finalize()
        assert all(np.array_equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match="cpus_per_task=64"):
        RayExecutor(RealClock(), slots=1, cpus_per_task=64)


def test_a_party_folded_already_is_a_duplicate_party_on_ray_as_in_place(executor):
    """The same duplicate was DuplicateParty in place and OverlappingParties on Ray (from the merge of the workers'
    partial states); the state is unchanged either way."""
    agg = jk.Aggregator({"w": np.zeros(100, np.float32)})
    ups = agg.admit_many([{"w": np.ones(100, np.float32)}] * 2, [1.0] * 2, ["p0", "p1"])
    again = agg.admit_many([{"w": np.ones(100, np.float32)}] * 2, [1.0] * 2, ["p3", "p1"])  # (before either fold)
    executor.fold_many(agg, ups)
    before = agg.state.copy()
    with pytest.raises(jk.DuplicateParty, match="'p1'"):
        executor.fold_many(agg, again)
    assert agg.state.same_bits(before)


def test_the_folds_own_checks_come_before_any_task(executor, monkeypatch):
    """An update admitted for another layout of the same shapes was re-admitted on the workers into this one's leaves
    by position (in place: LayoutMismatch); a fold after a closing finalize ran on the workers and was refused at the
    merge as IncompatibleStates (in place: RoundClosed); a Ray shut down under the executor was started again, as a
    new local Ray, by the next fold's ray.put."""
    from jitkernels.admission import admit

    agg = jk.Aggregator({"w": np.zeros(8, np.float32)})
    other = jk.Aggregator({"x": np.zeros(8, np.float32)})
    before = agg.state.copy()
    with pytest.raises(jk.LayoutMismatch, match="admitted against layout"):
        executor.fold_many(agg, [admit({"x": np.ones(8, np.float32)}, other.layout, party=p) for p in "ab"])
    assert agg.state.same_bits(before)
    adam = jk.Aggregator({"w": np.zeros(8, np.float32)}, "fedadam", base={"w": np.zeros(8, np.float32)})
    executor.fold_many(adam, adam.admit_many([{"w": np.ones(8, np.float32)}] * 2, [1.0, 1.0], ["a", "b"]))
    adam.finalize()
    with pytest.raises(jk.RoundClosed):
        executor.fold_many(adam, adam.admit_many([{"w": np.ones(8, np.float32)}] * 2, [1.0, 1.0], ["c", "d"]))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="Ray is not initialized"):
        executor.fold_many(agg, agg.admit_many([{"w": np.ones(8, np.float32)}] * 2, [1.0, 1.0], ["a", "b"]))


def test_a_failed_fold_pins_nothing_in_the_object_store(executor):
    """A worker's refusal keeps its type (RayTaskError of it), and the error's frames hold no object refs: the base
    and the other tasks' results stayed pinned in Ray's object store for as long as the round kept its error."""
    from jitkernels.admission import admit

    agg = jk.Aggregator({"w": np.zeros(1000, np.float32)}, base={"w": np.full(1000, -2e32, np.float32)})
    items = [admit({"w": np.full(1000, 2e32 if j == 0 else 0.0, np.float32)}, agg.layout, party=f"q{j}")
             for j in range(4)]  # (admitted without the base: u - base passes the headroom on the worker)
    with pytest.raises(jk.ValueOutOfRange) as e:
        executor.fold_many(agg, items)
    tb, held = e.value.__traceback__, []
    while tb is not None:
        for v in tb.tb_frame.f_locals.values():
            held += [r for r in (v if isinstance(v, list) else [v]) if isinstance(r, ray.ObjectRef)]
        tb = tb.tb_next
    assert held == [] and agg.state.count == 0


def test_close_cancels_folds_waiting_for_cpus():
    """Fold tasks waiting for CPUs another tenant holds kept close() waiting with them (the pool's thread sat in
    ray.get); close cancels them."""
    import threading

    @ray.remote(num_cpus=2)
    class Hog:
        def ping(self):
            return 1

    hog = Hog.remote()
    ray.get(hog.ping.remote())  # both CPUs of the local Ray are held
    ex = RayExecutor(RealClock(), slots=1, workers=1)
    agg = jk.Aggregator({"w": np.zeros(8, np.float32)})
    errors = []
    fold = threading.Thread(target=lambda: errors.append(_raises(ex.fold_many, agg, agg.admit_many(
        [{"w": np.ones(8, np.float32)}] * 2, [1.0, 1.0], ["a", "b"]))))
    try:
        fold.start()
        fold.join(2.0)
        assert fold.is_alive()  # waiting for a CPU
        closing = threading.Thread(target=ex.close)
        closing.start()
        closing.join(30)
        assert not closing.is_alive()
        fold.join(30)
        assert isinstance(errors[0], ray.exceptions.TaskCancelledError) and agg.state.count == 0
    finally:
        ray.kill(hog)


def test_an_algorithm_the_workers_cannot_rebuild_folds_in_this_process(executor):
    """The workers rebuild the algorithm from its parameters, by its name: a subclass of ours that keeps its
    name (here FedAvg weighing by the square of the sample count) folded as plain FedAvg there, a wrong model
    without a word, and a class of its own name failed as CorruptState. Both fold in this process."""
    class Squared(jk.algorithms.FedAvg):
        def mass(self, u):
            return u.weight ** 2

    class Named(jk.algorithms.FedAvg):
        name = "my_avg"

    class Unbuildable(jk.algorithms.FedAvg):  # (params the registered class cannot take: 10**400 overflows it)
        def params(self):
            return {**super().params(), "name": "fedprox", "mu": 10 ** 400}

    for alg in (Squared(), Named(), Unbuildable(),
                jk.algorithms.DPFixedClipping(Squared(), clip_norm=10.0, noise_multiplier=0.0)):
        base = cw.template() if alg.needs_base else None
        local, remote = jk.Aggregator(cw.template(), alg, base=base), jk.Aggregator(cw.template(), alg, base=base)
        local.fold_many(_batch(local))
        executor.fold_many(remote, _batch(remote))
        a, b = local.finalize(), remote.finalize()
        assert all(a[n].tobytes() == b[n].tobytes() for n in a)


def test_kernel_threads_follow_the_cpus_ray_gives_a_task(executor):
    """A fold task sizes its kernel threads to the CPUs Ray assigned it, whatever OMP_NUM_THREADS its worker
    started with."""
    from scheduler.executors import _fold_partial

    @ray.remote(num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    def fold_and_count(*args):
        _fold_partial(*args)
        return jk.get_num_threads()

    agg = jk.Aggregator({"w": np.zeros(8, np.float32)})
    spec = {"layout": agg.layout.to_json(), "algorithm": agg.state.algorithm, "acc_dtype": "float32", "round": 0,
            "scalars": agg.state.scalars, "backend": "auto"}
    assert ray.get(fold_and_count.remote(spec, None, [[np.ones(8, np.float32)]], [1.0], ["a"], [{}])) == 2


def test_a_closed_executor_refuses_folds_and_ray_settings_it_cannot_apply(executor):
    """A fold that reaches the executor after close() (queued behind its pool) sent its tasks all the same, and
    close() waited on them; it is refused. ray.init's keywords for a Ray that runs already (a misspelt one too)
    were dropped without a word."""
    ex = RayExecutor(RealClock(), slots=1, workers=1)
    ex.close()
    for agg in (jk.Aggregator({"w": np.zeros(8, np.float32)}), jk.Aggregator({"w": np.zeros(8, np.float32)},
                                                                             "fedmedian")):  # (folded in place)
        with pytest.raises(RuntimeError, match="closed"):
            ex.fold_many(agg, agg.admit_many([{"w": np.ones(8, np.float32)}] * 2, [1.0, 1.0], ["a", "b"]))
        assert agg.state.count == 0
    with pytest.raises(ValueError, match="Ray is running already: num_cpus, worker"):
        RayExecutor(RealClock(), slots=1, worker=4, num_cpus=16)


def _raises(f, *args):
    try:
        f(*args)
    except BaseException as e:  # noqa: BLE001 (the test looks at it)
        return e
    return None
