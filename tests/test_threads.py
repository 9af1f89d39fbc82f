"""Threads: set_num_threads, environment variables, thread-count independence, concurrent folds."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import jitkernels as jk
from jitkernels import backends

from strategies import CPU_BACKENDS


def test_set_num_threads_returns_previous():
    old = jk.get_num_threads()
    try:
        assert jk.set_num_threads(1) == old
        assert jk.set_num_threads(2) == 1
        assert jk.get_num_threads() == 2
        for bad in (0, jk.threads.MAX_THREADS + 1, 100_000, 2.5, True):  # 100000 segfaulted the next cpp fold
            with pytest.raises(ValueError, match="thread"):
                jk.set_num_threads(bad)
        assert jk.get_num_threads() == 2
    finally:
        jk.set_num_threads(old)


@pytest.mark.parametrize("env,want", [({"JITKERNELS_NUM_THREADS": "3", "OMP_NUM_THREADS": "5"}, 3),
                                      ({"OMP_NUM_THREADS": "5"}, 5),
                                      ({"OMP_NUM_THREADS": "2048"}, 1024),  # clamped (with a warning), not fatal
                                      # OpenMP's variable, meant for other programs too: one we cannot use is passed
                                      # over (with a warning), not an import that fails
                                      ({"OMP_NUM_THREADS": "abc"}, len(os.sched_getaffinity(0))),
                                      ({"OMP_NUM_THREADS": "0", "JITKERNELS_NUM_THREADS": ""},
                                       len(os.sched_getaffinity(0)))])
def test_thread_env_vars(env, want):
    clean = {k: v for k, v in os.environ.items() if k not in ("JITKERNELS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import jitkernels as jk; print(jk.get_num_threads())"],
                         env={**clean, **env}, capture_output=True, text=True, check=True)
    assert int(out.stdout) == want


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_our_own_thread_variable_must_be_a_count(value):
    """JITKERNELS_NUM_THREADS=0 was passed over without a word (set_num_threads(0) raises): refused, naming it."""
    clean = {k: v for k, v in os.environ.items() if k not in ("JITKERNELS_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", "import jitkernels"], env={**clean, "JITKERNELS_NUM_THREADS": value},
                         capture_output=True, text=True)
    assert out.returncode != 0 and f"JITKERNELS_NUM_THREADS={value!r} is not a thread count" in out.stderr


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_results_do_not_depend_on_thread_count(backend):
    rng = np.random.default_rng(0)
    tmpl = {f"l{i}": np.zeros(n, np.float32) for i, n in enumerate([70000, 3, 0, 12345, 1])}
    ups = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tmpl.items()} for _ in range(6)]
    results = []
    old = jk.get_num_threads()
    try:
        for n in (1, 2, 3):
            jk.set_num_threads(n)
            agg = jk.Aggregator(tmpl, backend=backend)
            adm = agg.admit_many(ups, list(range(1, 7)), list(range(6)))
            agg.fold_many(adm)
            results.append((agg.state.acc.tobytes(), [u.norm for u in adm]))
    finally:
        jk.set_num_threads(old)
    assert results[0][0] == results[1][0] == results[2][0]
    assert results[0][1] == results[1][1] == results[2][1]


_SMALL_TEAM = """
import numpy as np, jitkernels as jk
jk.set_num_threads(3)
rng = np.random.default_rng(0)
tmpl = {"a": np.zeros(300000, np.float32), "b": np.zeros(70001, np.float32)}
for k in (4, 20):  # one item per tile, and update-major tiles
    ups = [{n: rng.standard_normal(v.shape).astype(np.float32) for n, v in tmpl.items()} for _ in range(k)]
    w = rng.uniform(1, 5, k)
    out = {}
    for backend in ("numpy", "cpp"):
        agg = jk.Aggregator(tmpl, backend=backend)
        agg.fold_many(agg.admit_many(ups, w, list(range(k))))
        out[backend] = agg.state.acc.tobytes()
    assert out["cpp"] == out["numpy"], k
print("ok")
"""


@pytest.mark.skipif(jk.available_backends()["cpp"] is not True, reason="the C++ backend is not built")
def test_cpp_covers_every_share_with_a_smaller_openmp_team():
    """The walk hands the C++ kernels 3 shares; OpenMP may give a smaller team (OMP_THREAD_LIMIT, nested
    parallelism): its threads take the missing shares too, so nothing is left out."""
    out = subprocess.run([sys.executable, "-c", _SMALL_TEAM], env={**os.environ, "OMP_THREAD_LIMIT": "1"},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_concurrent_folds_into_one_aggregator(backend):
    rng = np.random.default_rng(1)
    tmpl = {"w": np.zeros((300, 200), np.float32), "b": np.zeros(200, np.float32)}
    ups = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in tmpl.items()} for _ in range(32)]
    agg = jk.Aggregator(tmpl, backend=backend)
    errors = []

    def worker(t):
        try:
            for j in range(t, 32, 4):
                agg.fold(ups[j], weight=1 + j, party=j)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert agg.count == 32 and sorted(agg.state.parties) == list(range(32))
    ref = jk.Aggregator(tmpl, backend="numpy", acc_dtype="float64")
    ref.fold_many(ups, [1 + j for j in range(32)], parties=list(range(32)))
    np.testing.assert_allclose(agg.finalize()["w"], ref.finalize()["w"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("via", ["state", "aggregator", "copy"])
def test_a_state_taken_while_another_thread_folds_is_never_torn(via):
    """merge(other.state) locked only the receiving aggregator: merged while the other folded, the result held an
    update's values without its weight (83 of 150 merges in review); FoldState.copy() read the state without the
    guard save() and merge() hold (159 of 300 copies in review). Every snapshot now has as many ones in every
    element as parties recorded."""
    n = 1 << 20
    b = jk.Aggregator(np.zeros(n, np.float32), backend="cpp")
    ones = np.ones(n, np.float32)
    stop = threading.Event()

    def folder():
        for j in range(2000):
            if stop.is_set():
                return
            b.fold(ones, weight=1.0, party=j)

    t = threading.Thread(target=folder)
    t.start()
    try:
        for _ in range(150):
            if via == "copy":
                snap = b.state.copy()
            else:
                a = jk.Aggregator(np.zeros(n, np.float32), backend="cpp")
                a.merge(b.state if via == "state" else b)
                snap = a.state
            assert snap.acc[0] == snap.acc[-1] == snap.count == snap.leaf_weight[0]
    finally:
        stop.set()
        t.join()


def test_concurrent_duplicate_party_counts_once():
    agg = jk.Aggregator(np.zeros(1000, np.float32))
    x = np.ones(1000, np.float32)
    outcomes = []

    def worker():
        try:
            agg.fold(x, party="same")
            outcomes.append("ok")
        except jk.DuplicateParty:
            outcomes.append("dup")

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["dup"] * 7 + ["ok"]
    assert agg.count == 1 and agg.state.leaf_weight[0] == 1.0


def test_reset_with_a_new_base_during_admission_is_not_taken_for_the_new_base(monkeypatch):
    """admit_many read the base token after its stats pass: a reset(base=new) from another thread during the pass
    stamped norms measured against the old base as the new base's, and clipping used them (NormBounding clipped
    updates within the bound; DP clipping let deltas of norm 7-17 through a bound of 1). Here the reset comes
    exactly there; the fold must measure again against the new base."""
    import jitkernels.aggregator as A
    import jitkernels.robust as R

    old_base, new_base = {"w": np.zeros(64, np.float32)}, {"w": np.full(64, 10.0, np.float32)}
    update = {"w": np.full(64, 10.5, np.float32)}  # 4 from the new base (norm 4); 84 from the old one
    agg = jk.Aggregator(old_base, R.NormBounding(max_norm=5.0), base=old_base, backend="numpy")
    real = A.admit_many

    def racing(*args, **kw):
        out = real(*args, **kw)
        agg.reset(base=new_base)  # another thread's reset lands between the stats pass and the stamp
        return out
    monkeypatch.setattr(A, "admit_many", racing)
    admitted = agg.admit(update, weight=1.0, party="p")
    monkeypatch.setattr(A, "admit_many", real)
    agg.fold(admitted)
    np.testing.assert_array_equal(agg.finalize()["w"], update["w"])  # within the bound: not clipped


def test_save_waits_for_folds_from_other_threads(tmp_path, monkeypatch):
    """state.save() ran outside the aggregator's lock, so a fold from another thread changed the arrays between the
    checksum and the write (CorruptState on load) or between the accumulator and the party record (a file that
    verifies but holds a party its record lacks: resumed, that party would count twice). The aggregator's lock now
    guards its state's files: a fold waits for the write."""
    import jitkernels.state as S

    agg = jk.Aggregator({"w": np.zeros(1000, np.float32)}, backend="numpy")
    agg.fold({"w": np.ones(1000, np.float32)}, weight=1.0, party="a")
    writing, release = threading.Event(), threading.Event()
    real = S.atomic_write

    def slow_write(path, write, **kw):
        writing.set()
        assert release.wait(10)
        return real(path, write, **kw)
    monkeypatch.setattr(S, "atomic_write", slow_write)
    saver = threading.Thread(target=agg.state.save, args=(tmp_path / "s.jks",))
    saver.start()
    assert writing.wait(10)
    folder = threading.Thread(target=agg.fold, args=({"w": np.full(1000, 2.0, np.float32)},),
                              kwargs={"weight": 1.0, "party": "b"})
    folder.start()
    folder.join(0.3)
    assert folder.is_alive()  # held until the file is written
    admitter = threading.Thread(target=agg.admit, args=({"w": np.ones(1000, np.float32)},), kwargs={"party": "c"})
    admitter.start()
    admitter.join(5)
    assert not admitter.is_alive()  # admission does not wait for it (it took the lock for the base: 95 ms a save)
    release.set()
    saver.join(10)
    folder.join(10)
    st = jk.FoldState.load(tmp_path / "s.jks")
    assert set(st.parties) == {"a"} and np.all(st.acc == 1.0)
    assert set(agg.state.parties) == {"a", "b"}
    assert agg.state.to_bytes() and set(jk.FoldState.from_bytes(agg.state.to_bytes()).parties) == {"a", "b"}


_FORK_CHILD = """
import multiprocessing as mp, sys, warnings
import numpy as np, jitkernels as jk

def fold(backend):
    t = {"w": np.zeros(400_000, np.float32)}
    agg = jk.Aggregator(t, backend=backend)
    agg.fold_many([{"w": np.ones(400_000, np.float32)}] * 2, [1.0, 3.0], parties=["a", "b"])
    return float(agg.finalize()["w"][-1])

def child(q):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jk.set_num_threads(2)
    out = [fold("auto"), fold("cpp"), jk.get_num_threads(), any("spawn" in str(w.message) for w in caught)]
    try:
        fold("numba")
        out.append("numba ran")
    except jk.BackendUnavailable as e:
        out.append("fork-safe" in str(e))
    q.put(out)

if __name__ == "__main__":
    jk.set_num_threads(2)
    fold("cpp"), fold("numba")  # both OpenMP pools started here
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    p.join(60)
    if p.exitcode is None:
        p.kill()
        print("hung")
    else:
        print(p.exitcode, q.get(timeout=5))
"""


@pytest.mark.skipif(not (backends.is_available("cpp") and backends.is_available("numba")), reason="needs cpp and numba")
def test_a_forked_child_folds_on_one_thread_instead_of_hanging_or_being_killed(tmp_path):
    """GNU OpenMP is not fork-safe: a child forked (multiprocessing's default on Linux) after the kernels ran on
    several threads hung for ever in its first C++ fold, and numba's omp layer ended it at its first numba kernel.
    The child now runs the C++ kernels on one thread (asking for more warns), and numba says why it cannot run."""
    script = tmp_path / "fork_child.py"
    script.write_text(_FORK_CHILD)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.stdout.strip() == "0 [1.0, 1.0, 1, True, True]", done.stdout + done.stderr[-2000:]


_FLUSH_DENORMAL = """
import numpy as np, torch, jitkernels as jk
rng = np.random.default_rng(0)
n = 300_001
f16 = rng.integers(1, 0x400, n).astype(np.uint16).view(np.float16)  # every one a float16 subnormal
f32 = (rng.standard_normal(n) * 2.0 ** -130).astype(np.float32)  # float32 subnormals

def fold(u, backend, threads, det):
    jk.set_num_threads(threads)
    agg = jk.Aggregator({"w": np.zeros(n, u.dtype)}, backend=backend, deterministic=det,
                        bound=2.0 ** -100 if det and u.dtype == np.float32 else 2.0 ** 20)
    agg.fold({"w": u}, 1.0, "a")
    return agg.state.acc.tobytes() + (agg.state.lo.tobytes() if det else b"")

cases = [(u, det) for u in (f16, f32) for det in (False, True)]
want = [fold(u, "numpy", 1, det) for u, det in cases]  # IEEE: before the mode is set
fold(f32, "cpp", 2, False)  # the OpenMP workers exist before the calling thread's mode changes
big = np.full(1 << 17, 0.0, np.float32)  # a subnormal maximum in each of two chunks of the finiteness check
big[5], big[-5] = f32[0], -f32[1]
checked = jk.admission.finite_maxabs(big)
torch.set_flush_denormal(True)
print([fold(u, "cpp", t, det) == w for (u, det), w in zip(cases, want) for t in (1, 2)]
      + [jk.set_num_threads(t) is not None and jk.admission.finite_maxabs(big) == checked for t in (1, 2)])
"""


@pytest.mark.skipif(not backends.is_available("cpp"), reason="the C++ backend is not built")
def test_cpp_results_keep_subnormals_whatever_the_calling_threads_float_mode(tmp_path):
    """Flush-to-zero / denormals-are-zero are per-thread modes (torch.set_flush_denormal): the host float16 decode
    went through an float32 subnormal that the mode read as 0, and the calling thread and the OpenMP workers, each
    in its own mode, gave results (deterministic mode's too) that depended on the thread count. The kernels now
    compute in IEEE mode on every thread: the same bits as numpy computed without the mode, on 1 and 2 threads."""
    script = tmp_path / "flush.py"
    script.write_text(_FLUSH_DENORMAL)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == str([True] * 10), done.stdout + done.stderr[-2000:]


def test_thread_counts_are_whole_numbers():
    """set_num_threads(10**400) raised OverflowError (float() of it) where README says ValueError; "2" was taken."""
    old = jk.set_num_threads(1)
    try:
        for bad in (10 ** 400, "2", True, 2.5, 0):
            with pytest.raises(ValueError):
                jk.set_num_threads(bad)
        assert jk.set_num_threads(np.int64(1)) == 1 and jk.set_num_threads(1.0) == 1
    finally:
        jk.set_num_threads(old)


def test_numba_kernels_leave_numbas_thread_count_as_they_found_it():
    """The numba kernels set numba's thread count to jitkernels' for their parallel regions and left it there: the
    user's own prange code after a fold ran on our count. Each path puts it back: the backend's fold, deterministic
    fold, stats, finalize and step, the noise, the robust selection and Gram kernels, SecAgg's sum."""
    numba = pytest.importorskip("numba")
    if backends.is_available("numba") is not True or numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs the numba backend and a pool of two threads")
    from jitkernels import algorithms as A
    from jitkernels import noise, robust, secagg

    rng = np.random.default_rng(0)
    t = {"w": np.zeros(300_000, np.float32)}
    ups = [{"w": rng.standard_normal(300_000).astype(np.float32)} for _ in range(5)]
    runs = {
        "fold + finalize": lambda: _fold_finalize(jk.Aggregator(t, backend="numba"), ups),
        "deterministic": lambda: _fold_finalize(jk.Aggregator(t, backend="numba", deterministic=True, bound=2**10),
                                                ups),
        "step": lambda: _fold_finalize(jk.Aggregator(t, A.FedAdam(lr=0.1), backend="numba", base=t), ups),
        "noise": lambda: noise.gaussian_numba(1, 0, 0, 0, 300_000),
        "median": lambda: _fold_finalize(jk.Aggregator(t, robust.FedMedian(), backend="numba"), ups),
        "krum": lambda: _fold_finalize(jk.Aggregator(t, robust.Krum(f=1), backend="numba"), ups),
        "secagg": lambda: secagg.SecAggSum(300_000, backend="numba").fold_many(
            [rng.integers(0, 2**32, 300_000, dtype=np.uint32) for _ in range(3)], parties=[0, 1, 2]),
    }
    old = jk.set_num_threads(2)
    try:
        numba.set_num_threads(1)
        for what, run in runs.items():
            run()
            assert numba.get_num_threads() == 1, what
    finally:
        jk.set_num_threads(old)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


def _fold_finalize(agg, ups):
    agg.fold_many(ups, parties=list(range(len(ups))))
    return agg.finalize()
