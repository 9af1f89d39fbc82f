"""Executors run a deployment's tasks (a fused fold of the pending updates, or a finalize).

* :class:`LocalExecutor` (default, real clock): a thread pool; the kernels release the GIL, so folds of several
  jobs run in parallel. Threads per kernel are sized so that slots x kernel threads <= cores.
* :class:`ModelExecutor` (virtual clock): a task takes the cost model's estimate of virtual time.
* :class:`MeasuredExecutor` (virtual clock, the simulator's ``--real`` mode): runs the real task, then lets virtual
  time advance by the measured duration.
* :class:`RayExecutor` (real clock): the folds run as Ray tasks, each folding a share of the batch into a partial
  state that comes back as checksummed bytes and is merged in a fixed tree; for more than one machine.

``run(task, done)`` calls ``done(duration_s, result, error)`` on the clock's thread when the task ends. A fold task
folds through ``executor.fold_many(aggregator, items)``: in place by default, on Ray workers for :class:`RayExecutor`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

import jitkernels as jk
from jitkernels.device import to_host

log = logging.getLogger("jitkernels.scheduler")


@dataclass
class Task:
    kind: str  # "fold" | "finalize"
    job: str
    round: int
    n_updates: int
    nbytes: int
    est_s: float
    fn: object = field(default=None, repr=False)  # () -> result, or None for a modelled job


def _call(task: Task):
    """(duration, result, error) of a task. Any error is caught, BaseExceptions too (a SystemExit raised in a fold
    thread left its deployment busy and its round unresolved for good): it is surfaced through the round's future.
    Executors that run tasks on the caller's thread raise a BaseException again once the round has it
    (:func:`_reraise`), so that Ctrl-C still stops a simulation."""
    t0 = time.perf_counter()
    result, error = None, None
    try:
        result = task.fn() if task.fn is not None else None
    except BaseException as e:
        error = e
    return time.perf_counter() - t0, result, error


def _reraise(error) -> None:
    if error is not None and not isinstance(error, Exception):
        raise error


class _InPlace:
    @staticmethod
    def fold_many(agg, items) -> None:
        """Fold a batch of admitted updates into ``agg`` (in this process)."""
        agg.fold_many(items)


class ModelExecutor(_InPlace):
    """Virtual time advances by the cost model's estimate; a task with data still runs (so results are real and
    timings deterministic)."""

    def __init__(self, clock):
        self.clock = clock

    def run(self, task: Task, done) -> None:
        _, result, error = _call(task)
        self.clock.call_later(task.est_s, done, task.est_s, result, error)
        _reraise(error)

    def close(self):
        pass


class MeasuredExecutor(_InPlace):
    """Virtual time advances by the measured duration of the real task; ``estimated_s`` sums the cost model's
    estimates of the tasks run, for the measured busy time to be read beside."""

    def __init__(self, clock):
        self.clock = clock
        self.estimated_s = 0.0

    def run(self, task: Task, done) -> None:
        dt, result, error = _call(task)
        self.estimated_s += task.est_s
        self.clock.call_later(dt, done, dt, result, error)
        _reraise(error)

    def close(self):
        pass


_thread_setters: list = []  # [executor, the count before it set its own], oldest first (under _setters_lock)
_setters_lock = threading.Lock()


def _kernel_threads(value) -> int | None:
    """``kernel_threads`` as jk.set_num_threads takes a count, or None (the default); ValueError else (0 was taken
    as "not given")."""
    return None if value is None else jk.threads.thread_count(value, "kernel_threads")


class LocalExecutor(_InPlace):
    def __init__(self, clock, slots: int, kernel_threads: int | None = None, nice: int = 0):
        nice = check_nice(nice, "nice")
        kernel_threads = _kernel_threads(kernel_threads)
        self.clock = clock
        self.pool = ThreadPoolExecutor(max_workers=max(1, slots), thread_name_prefix="jitkernels-fold",
                                       initializer=renice, initargs=(nice, "fold threads"))
        with _setters_lock:
            # the user's count (jk.set_num_threads or the environment's), as it was before any executor set its
            # own, shared by the slots: sized from the CPUs, an OMP_NUM_THREADS=1 was overridden while the
            # scheduler ran; read now, a second scheduler's took the first's share and shared it again
            current = jk.get_num_threads()
            if _thread_setters and current != _thread_setters[-1][0].kernel_threads:
                _thread_setters[0][1] = current  # the user's own since the last executor: the share, and what the
                # last close restores
            user = _thread_setters[0][1] if _thread_setters else current
            self.kernel_threads = kernel_threads or max(1, user // max(1, slots))
            _thread_setters.append([self, jk.set_num_threads(self.kernel_threads)])

    def _restore_threads(self) -> None:
        """Put back the process's kernel thread count as it was before this executor, whatever order executors
        close in: the last one open restores it, an earlier one hands its saved count to the one after it (each
        restoring its own saved count left the first one's count in place once both had closed)."""
        with _setters_lock:
            i = next((i for i, e in enumerate(_thread_setters) if e[0] is self), None)
            if i is None:
                return
            _, old = _thread_setters.pop(i)
            if i < len(_thread_setters):
                _thread_setters[i][1] = old
            else:
                jk.set_num_threads(old)

    def run(self, task: Task, done) -> None:
        def work():
            self.clock.call_soon_threadsafe(done, *_call(task))

        self.pool.submit(work)

    def close(self):
        self.pool.shutdown(wait=True)
        self._restore_threads()


def check_nice(nice, what: str) -> int:
    """A nice value: a whole number in [-20, 19], else ValueError naming ``what`` (a bad one was taken, and the pool
    whose threads take it broke at its first task: a round that never resolved)."""
    if isinstance(nice, bool) or not isinstance(nice, (int, np.integer)) or not -20 <= nice <= 19:
        raise ValueError(f"{what} must be a nice value, an integer in [-20, 19], got {nice!r}")
    return int(nice)


def renice(nice: int, what: str) -> None:
    """Nice value ``nice`` for the calling thread, and for the OpenMP workers it starts later (Linux: nice values are
    per thread and inherited by the threads a thread creates, and libgomp keeps a worker pool per thread that opens a
    parallel region). Elsewhere the call would change the whole process, so it is skipped there. A refusal is logged
    and leaves the thread as it was."""
    if nice and sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(nice))
        except OSError as e:  # e.g. a negative value without the privilege
            log.warning("%s: nice %s refused (%s); they run at the process's priority", what, nice, e)


def _task_cpus() -> int:
    """The CPUs Ray assigned this task (Ray leaves an OMP_NUM_THREADS that was set before it started, so that
    variable may not say), at least 1."""
    try:
        import ray

        return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    except Exception:  # outside a Ray task
        return 1


def _fold_partial(spec: dict, base, updates: list, weights: list, parties: list, infos: list) -> bytes:
    """A Ray task: fold a share of a round's updates into an empty partial state; return it as checksummed bytes
    (without the base, which the caller holds). Kernel threads follow the CPUs Ray gave the task (it sets
    ``OMP_NUM_THREADS`` to them)."""
    fault = os.environ.get("JITKERNELS_RAY_KILL_ONCE")  # tests: a worker that dies mid-fold, once
    if fault:
        try:
            os.remove(fault)  # atomic: of concurrent tasks, only the one that removes the file dies
        except FileNotFoundError:
            pass
        else:
            os._exit(1)
    jk.set_num_threads(_task_cpus())
    layout = jk.Layout.from_json(spec["layout"])
    state = jk.FoldState(layout, algorithm=spec["algorithm"], acc_dtype=spec["acc_dtype"], base=base,
                         round=spec["round"], scalars=spec["scalars"])
    agg = jk.Aggregator.from_state(state, backend=spec["backend"])
    rebuild = jk.Layout(layout.leaves, layout.treedef)  # numpy containers: a torch job's worker need not load torch
    agg.fold_many([rebuild.unflatten(u) for u in updates], weights, parties, infos)
    state.base = None
    return state.to_bytes()


class RayExecutor(LocalExecutor):
    """Folds on Ray workers: a batch of pending updates goes to Ray's object store, is split into ``workers``
    shares folded as Ray tasks (each an empty partial :class:`~jitkernels.FoldState`, returned as checksummed
    bytes), and the partial states are merged in a fixed balanced tree, then into the round's aggregator. A worker
    killed mid-fold loses nothing: Ray re-runs its task from the stored updates (``max_retries``). Finalize and the
    scheduler's bookkeeping stay in this process.

    Connect to a cluster with ``ray.init(address=...)`` before creating it (else a local Ray is started with
    ``ray_init`` arguments, and left running for other users in the process; given while Ray runs already, they are
    refused: they would change nothing). ``cpus_per_task`` is the Ray resource request of each fold task, and the
    kernels use that many threads (the CPUs Ray assigned the task). A request no node can meet is refused here (Ray
    would wait for one forever); tasks still waiting for CPUs, or running, when the executor closes are cancelled,
    and folds that reach it after are refused. Partial updates, buffered (robust) rules and algorithms the workers
    cannot rebuild from their parameters (a class of your own, or a subclass of ours: the workers would fold
    with the class its name registers) are folded in this process: the first need their masks shipped, the second
    a slab.
    """

    def __init__(self, clock, slots: int, *, workers: int = 2, cpus_per_task: int = 1, max_retries: int = 3,
                 kernel_threads: int | None = None, **ray_init):
        import ray

        kernel_threads = _kernel_threads(kernel_threads)  # (before Ray is started for nothing)
        if not ray.is_initialized():
            ray.init(**ray_init)
        elif ray_init:  # (a misspelt keyword, or a setting of a Ray that runs already, was dropped without a word)
            raise ValueError(f"Ray is running already: {', '.join(sorted(ray_init))} would change nothing (they are "
                             "ray.init's, for a Ray this executor starts)")
        most = max((n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        if cpus_per_task > most:
            raise ValueError(f"cpus_per_task={cpus_per_task}, but no Ray node has more than {most:g} CPUs: its tasks "
                             "would wait forever")
        super().__init__(clock, slots, kernel_threads)
        self.workers = max(1, int(workers))
        self._ray = ray
        self._task = ray.remote(num_cpus=cpus_per_task, max_retries=max_retries)(_fold_partial)
        self._running = set()  # the fold tasks' refs, cancelled by close() (under _running_lock)
        self._running_lock = threading.Lock()
        self._closed = False  # (under _running_lock) folds that reach the executor after close() are refused

    @staticmethod
    def _rebuilds(alg, params) -> bool:
        """Whether the workers, which rebuild the algorithm from its parameters, get ``alg``'s own class (and its
        inner algorithm's, for a wrapper)."""
        try:
            rebuilt = jk.algorithms.from_params(params)
        except Exception:  # (a name no class of ours registers, parameters ours do not take: a 10**400 overflows)
            return False
        while type(rebuilt) is type(alg):
            if not hasattr(alg, "inner"):  # (a DP wrapper's inner algorithm)
                return True
            alg, rebuilt = alg.inner, rebuilt.inner
        return False

    def fold_many(self, agg, items) -> None:
        if self._closed:  # (checked again under the lock before tasks are sent; here for the folds made in place too)
            raise RuntimeError("the RayExecutor is closed: nothing folded")
        if agg.partial or agg.buffered or not items or not self._rebuilds(agg.algorithm, agg.state.algorithm):
            return super().fold_many(agg, items)  # (see the class docstring)
        ray, st = self._ray, agg.state
        if not ray.is_initialized():  # (ray.put would start a new local Ray, and the job would fold here unnoticed)
            raise RuntimeError("Ray is not initialized (shut down while the scheduler ran?): the RayExecutor has no "
                               "cluster to fold on")
        # the fold's own checks, before any work is sent (the merge after the workers' folds found a closed round or
        # a shared party late, as IncompatibleStates or OverlappingParties, and the workers re-admitted an update
        # of another layout into this one's leaves by position)
        for u in items:
            agg._check_layout(u)
        agg._check_open()
        agg._check_parties([u.party for u in items])
        # the workers fold host copies on their CPU backends: a GPU aggregator's layout (array type "cupy") made
        # "auto" pick the GPU backend there, which a worker without one refused
        spec = {"layout": st.layout.on_host().to_json(), "algorithm": st.algorithm,
                "acc_dtype": st.acc_dtype, "round": st.round, "scalars": st.scalars,
                "backend": agg.backend if agg.backend != "cupy" else "auto"}
        shares = [items[i::self.workers] for i in range(min(self.workers, len(items)))]
        with self._running_lock:  # (submitted under it: a close() meanwhile cancels them, or refuses this fold)
            if self._closed:  # (a fold queued behind the pool at close: its tasks waited for CPUs another tenant
                raise RuntimeError("the RayExecutor is closed: nothing folded")  # held, and close() with them)
            base = None if st.base is None else ray.put(to_host(st.base))
            refs = [self._task.remote(spec, base, [[to_host(a) for a in u.leaves] for u in share],
                                      [u.weight for u in share], [u.party for u in share], [u.info for u in share])
                    for share in shares]
            self._running.update(refs)
        try:
            blobs = ray.get(refs)
        except BaseException as e:
            with contextlib.suppress(Exception):  # (the error to report is the fold's)
                for ref in refs:  # the other shares' tasks: their work is lost with this batch's
                    ray.cancel(ref)
                # their outcomes (the same refusal, or the cancellation), read and dropped: left unread, Ray logged
                # each as an unhandled error when the refs went
                done, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
                for ref in done:
                    with contextlib.suppress(Exception):
                        ray.get(ref)
            # the round keeps its error, and so its traceback's frames: ray.get's below this one held the refs (the
            # base and the tasks' results stayed pinned in Ray's object store until the scheduler itself was gone).
            # Raised from here (the worker's traceback is in the error's message), with this frame's refs let go:
            raise e.with_traceback(None)
        finally:
            with self._running_lock:
                self._running.difference_update(refs)
            base = refs = ref = done = None
        states = [jk.FoldState.from_bytes(b, where="ray partial fold") for b in blobs]
        while len(states) > 1:  # a fixed balanced tree: the merge order (hence the rounding) does not vary
            states = [states[i].merge(states[i + 1]) if i + 1 < len(states) else states[i]
                      for i in range(0, len(states), 2)]
        states[0].base = st.base
        agg.merge(states[0])

    def close(self):
        """Cancel the fold tasks still waiting for CPUs or running (their rounds end with the scheduler; a fold
        waiting on a CPU another tenant held kept close() waiting with it), and end the pool. Ray stays up (other
        executors in the process may be folding on it)."""
        with self._running_lock:
            self._closed = True
            running = list(self._running)
        with contextlib.suppress(Exception):  # (a Ray shut down meanwhile has nothing left to cancel)
            for ref in running:
                self._ray.cancel(ref, force=True)
        super().close()
