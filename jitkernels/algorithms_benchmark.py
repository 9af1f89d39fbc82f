"""Benchmark of the algorithms' kernels and whole rounds: ``python -m jitkernels.algorithms_benchmark``.

As :mod:`jitkernels.benchmark`, every number is a ratio from one run: against the read-bandwidth probe measured
between repetitions (the roofline) and against Flower on the same inputs. Rows, for N float32 parameters in uneven
leaves and k updates:

* **step (fused)**: the server-optimizer step at finalize (``backend.step``), per backend, on a state with a folded
  accumulator. Bytes: FedAdam/Yogi/Adagrad read acc, x, m, v and write x, m, v, out (32N, f32 everywhere); FedAvgM
  reads acc, x, m and writes x, m, out (24N). ``min bytes`` is what the equations need at least (28N for FedAdam:
  the new model written once, as the output).
* **numpy f32 expressions**: the same equations as plain float32 numpy expressions over the flat arrays (the way
  Flower writes them: ``m = b1*m + (1-b1)*d`` ...), each allocating its result.
* **clipped fold**: ``fold_many`` of the k raw updates into an empty state with a base, by FedAvg (admission and
  fold fused in one pass over the updates) and by :class:`~jitkernels.algorithms.DPFixedClipping` (noise off: the
  clip factors need the norms first, so the stats pass, then the fold). Bytes: ``passes * (k*N*4 + 4N) + 8N``
  (updates and base per pass, accumulator), passes 1 for FedAvg where admission is fused (cpp), else 2, and always 2
  for clipping; ``speedup`` of the clipped row is unclipped time / clipped time.
* **SecAgg sum**: the k-way modular sum of k masked uint32 vectors (:mod:`jitkernels.secagg`, ``SecAggSum.fold_many``
  into a cleared state) against Flower's SecAgg+ server loop (``parameters_addition`` per client on its int64 wire
  arrays, then ``parameters_mod``). Bytes: ``k*N*4 + 8N``.
* **robust** (``--robust``): the round's k updates in an :class:`~jitkernels.robust_store.UpdateStore` slab (k x N
  float32); coordinate median and trimmed mean (beta 0.2) per backend against Flower's ``aggregate_median`` /
  ``aggregate_trimmed_avg`` (bytes: the slab read once + 4N written); the Gram step of Krum against numpy's
  ``X @ X.T`` on the same slab (SSYRK, in the same run: ``speedup`` < 1 means slower than BLAS); Krum (f =
  :data:`KRUM_F`, so k >= 7) against Flower's ``aggregate_krum``; the geometric median's passes over the slab.
  Each row also gives the peak resident-set growth of one call (the slab, filled before, not counted): ours
  should be O(tile), Flower's stacks its inputs.
* **round from FitRes**: a whole round from Flower ``FitRes`` in to the new ``Parameters`` out, by the strategies of
  :mod:`jitkernels.integrations.flower` (zero-copy views of the serialized bytes folded in one pass, finalized into
  the bytes of the new Parameters) and by Flower's own ``FedAdam`` / ``FedAvg`` (``inplace=True``, as shipped), whose
  ``aggregate_fit`` deserializes with copies and allocates per step. Bytes (the fused minimum): ``k*N*4 + 8N`` for
  the fold, plus the step's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import sys
from typing import Callable, NamedTuple

import numpy as np

import jitkernels as jk

from . import algorithms as A
from .backends import numpy_ref
from .batch import build_out_groups
from .benchmark import (Probe, available_or_exit, header, installed, interleaved, make_workload, peak_memory,
                        positive_int)
from .progress import bar as progress_bar

KRUM_F = 2  # Byzantine parties the Krum rows tolerate (k >= 2f + 3)
OPTIMIZERS = {"fedadam": (lambda: A.FedAdam(lr=0.01, tau=1e-3), 32, 28),
              "fedavgm": (lambda: A.FedAvgM(lr=1.0, momentum=0.9), 24, 20)}


def _row(label, method, backend, timing, nbytes, min_bytes=None, mem=(None, None)):
    t, bw = timing.time, timing.bandwidth
    return {"workload": label, "method": method, "backend": backend, "time_s": t, "times_s": timing.times,
            "probe_gbps": bw, "bytes": nbytes, "frac_roofline": nbytes / (bw * 1e9) / t,
            "frac_min_roofline": None if min_bytes is None else min_bytes / (bw * 1e9) / t,
            "traced_peak_bytes": mem[0], "rss_peak_bytes": mem[1]}


def _stepped_state(wl, alg, backend):
    """An aggregator with the workload's k updates folded (deltas against the first update as the model)."""
    base = wl.updates("float32")[0]
    agg = jk.Aggregator(wl.template("float32"), alg, backend=backend, base=base)
    agg.fold_many(wl.updates("float32")[1:], wl.weights[1:], wl.parties[1:])
    return agg


def bench_step(wl, probe, name, backends):
    make, nbytes, min_bytes = OPTIMIZERS[name]
    rows = []
    for backend in backends:
        agg = _stepped_state(wl, make(), backend)
        st, alg = agg.state, agg.algorithm
        outs = [np.empty(l.shape, np.float32) for l in agg.layout.leaves]
        ids = list(range(len(agg.layout)))
        groups = build_out_groups(agg.layout, ids, outs, st.leaf_weight)
        mod = numpy_ref if backend == "numpy" else jk.backends.get(backend)
        coef = alg.coefficients(1)

        def run():
            for og in groups:
                mod.step(st.acc, st.base, st.opt["m"], st.opt.get("v"), alg.kind, coef, og)

        run()  # warm-up: a numba step's first call compiles (or loads its cache: 1.4 s measured as a repetition)
        rows.append(_row(wl.label, f"{name} step (fused)", backend, interleaved(run, probe), nbytes * wl.n,
                         min_bytes * wl.n))
        if backend == backends[0]:
            rows.append(_row(wl.label, f"{name} numpy f32 expressions", "numpy",
                             interleaved(_numpy_expressions(st, alg, agg.layout), probe), nbytes * wl.n,
                             min_bytes * wl.n))
    return rows


def _numpy_expressions(st, alg, layout):
    """The step as plain float32 numpy expressions per leaf, each one allocating (as FL frameworks write it)."""
    b1, c1, b2, c2, lr, tau = alg.coefficients(1)
    spans = [(l.offset, l.offset + l.size) for l in layout.leaves]
    W = np.float32(st.leaf_weight[0])
    x = [st.base[a:b].copy() for a, b in spans]
    m = [st.opt["m"][a:b].copy() for a, b in spans]
    v = [st.opt["v"][a:b].copy() for a, b in spans] if "v" in st.opt else None
    d = [st.acc[a:b] for a, b in spans]

    def run():
        nonlocal x, m, v
        delta = [a / W for a in d]
        if v is None:
            m = [b1 * mm + dd for mm, dd in zip(m, delta)]
            x = [xx + lr * mm for xx, mm in zip(x, m)]
        else:
            m = [b1 * mm + c1 * dd for mm, dd in zip(m, delta)]
            v = [b2 * vv + c2 * (dd * dd) for vv, dd in zip(v, delta)]
            x = [xx + lr * mm / (np.sqrt(vv) + tau) for xx, mm, vv in zip(x, m, v)]
    return run


def bench_clipping(wl, probe, backend):
    base = wl.template("float32")
    ups = wl.updates("float32")
    rows = []
    # bytes: the fused pass reads the updates and the base once, the accumulator read and written; clipping reads the
    # updates and the base twice (the stats pass for the norms, then the scaled fold)
    for method, alg in (("fold_many raw: FedAvg", A.FedAvg(weighted=False)),
                        ("fold_many raw: DP fixed clipping", A.DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0))):
        agg = jk.Aggregator(base, alg, backend=backend, base=base)
        # (admission fused into the fold on cpp only: elsewhere FedAvg's raw fold reads the updates twice too)
        passes = 1 if agg._fused_admission() else 2
        method += " (fused admission)" if passes == 1 else ""
        rows.append(_row(wl.label, method, backend,
                         interleaved(lambda: agg.fold_many(ups, wl.weights, wl.parties), probe,
                                     setup=lambda: agg.reset(reuse=True)),
                         passes * (wl.k * wl.n * 4 + 4 * wl.n) + 8 * wl.n))
    return rows


def bench_secagg(wl, probe):
    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod

    from . import secagg

    rng = np.random.default_rng(0)
    u32 = [rng.integers(0, 2 ** 32, wl.n, dtype=np.uint32) for _ in range(wl.k)]
    i64 = [u.astype(np.int64) for u in u32]
    state = secagg.SecAggSum(wl.n, 32)

    def ours():
        state.reset()  # as a server reuses its state between rounds (untimed below)

    def flower():
        masked = None
        for v in i64:
            masked = [v] if masked is None else parameters_addition(masked, [v])
        return parameters_mod(masked, 1 << 32)[0]

    ours()
    state.fold_many(u32, list(range(wl.k)))
    assert np.array_equal(state.result(), flower())
    nbytes = wl.k * wl.n * 4 + 8 * wl.n
    return [_row(wl.label, "SecAgg sum (uint32, k-way mod 2^32)", secagg._default_backend(),
                 interleaved(lambda: state.fold_many(u32, list(range(wl.k))), probe, setup=ours), nbytes),
            _row(wl.label, "SecAgg sum: Flower's per-client loop", "flwr",
                 interleaved(flower, probe, min_reps=2, max_reps=4, cap_s=20), nbytes)]


class Case(NamedTuple):
    """One timed call of the robust or round rows: ``key`` names it across backends (``"median"``,
    ``"median: Flower"``...), ``method`` is the table's label; ``peer`` calls are Flower's (few repetitions)."""

    key: str
    method: str
    backend: str
    fn: Callable
    nbytes: int
    peer: bool = False


@contextlib.contextmanager
def robust_cases(wl, backends):
    """The robust rows' calls on one slab of the workload's k float32 updates (filled here, closed on exit), each
    warmed up (numba compiles): the coordinate median and trimmed mean per backend and Flower's, the Gram step and
    numpy's SSYRK, Krum and Flower's, the geometric median. Used by :func:`bench_robust` and by
    ``bench/test_algorithms_bench.py``."""
    from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

    from . import robust_coord, robust_gram
    from .robust_store import UpdateStore

    store = UpdateStore(wl.n, wl.k)
    try:
        for u, p in zip(wl.updates("float32"), wl.parties):
            store.add(list(u.values()), p)
        X = store.rows()
        flower_in = [(list(u.values()), w) for u, w in zip(wl.updates("float32"), wl.weights)]
        nbytes = X.nbytes + 4 * wl.n
        cases = []
        for name, ours, theirs in (("median", lambda b: robust_coord.coordinate_median(store, backend=b),
                                    lambda: aggregate_median(flower_in)),
                                   ("trimmed mean 0.2", lambda b: robust_coord.trimmed_mean(store, 0.2, backend=b),
                                    lambda: aggregate_trimmed_avg(flower_in, 0.2))):
            for b in backends:
                if robust_coord.available_backends().get(b) is True and b != "numpy":
                    ours(b)  # compile / warm
                    cases.append(Case(name, f"robust {name}", b, functools.partial(ours, b), nbytes))
            cases.append(Case(f"{name}: Flower", f"robust {name}: Flower", "flwr", theirs, nbytes, True))
        robust_gram.gram(X[:, :4096])
        gm = robust_gram.geometric_median(store)
        cases += [Case("gram", "robust Gram step (Krum)", "numba", lambda: robust_gram.gram(X), X.nbytes),
                  Case("gram: SSYRK", "robust Gram step: numpy X @ X.T (SSYRK)", "blas", lambda: X @ X.T, X.nbytes),
                  Case("krum", f"robust Krum f={KRUM_F}", "numba", lambda: robust_gram.krum(store, KRUM_F), X.nbytes),
                  Case("krum: Flower", f"robust Krum f={KRUM_F}: Flower", "flwr",
                       lambda: aggregate_krum(flower_in, KRUM_F, 0), X.nbytes, True),
                  Case("geometric median", f"robust geometric median ({gm.info.get('passes')} passes)", "numba",
                       lambda: robust_gram.geometric_median(store), gm.info["passes"] * X.nbytes)]
        yield cases
    finally:
        store.close()


def bench_robust(wl, probe, backends):
    """The robust rows: each case's peak memory of one (warm) call, then its timing."""
    rows = []
    with robust_cases(wl, backends) as cases:
        for c in cases:
            mem = peak_memory(c.fn)
            reps = {"min_reps": 1, "max_reps": 2, "cap_s": 30} if c.peer else {}
            rows.append(_row(wl.label, c.method, c.backend, interleaved(c.fn, probe, **reps), c.nbytes, mem=mem))
    return rows


def round_cases(wl, backend):
    """A FedAdam and a FedAvg round, Flower FitRes in -> new Parameters out: jitkernels' Flower strategies (on
    ``backend``) and Flower's own, ``aggregate_fit`` on the same FitRes objects, each call a new round. Used by
    :func:`bench_rounds` and by ``bench/test_algorithms_bench.py``."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server import strategy as fl

    from .integrations import flower as jkfl

    ok = Status(code=Code.OK, message="")
    ups = [list(u.values()) for u in wl.updates("float32")]
    results = [(None, FitRes(status=ok, parameters=ndarrays_to_parameters(u), num_examples=w, metrics={}))
               for u, w in zip(ups, wl.weights)]
    x0 = ndarrays_to_parameters([np.zeros_like(a) for a in ups[0]])
    cases = []
    # the fold: the updates, the accumulator read and written, and for FedAdam (deltas against the model) the model
    for name, make, fold_bytes, step_bytes in (
            ("FedAdam", lambda m: m.FedAdam(initial_parameters=x0, eta=0.01, tau=1e-3), 12, 32),
            ("FedAvg", lambda m: m.FedAvg(), 8, 8)):
        nbytes = wl.k * wl.n * 4 + fold_bytes * wl.n + step_bytes * wl.n
        for key, method, mod, be in ((name, f"{name} round from FitRes", jkfl, backend),
                                     (f"{name}: Flower", f"{name} round: Flower aggregate_fit", fl, "flwr")):
            strat = make(mod)
            if mod is jkfl:
                strat._jk.backend = backend
            rounds = itertools.count(1)
            cases.append(Case(key, method, be, lambda s=strat, r=rounds: s.aggregate_fit(next(r), results, []),
                              nbytes, mod is fl))
    return cases


def bench_rounds(wl, probe, backend):
    """The round rows: each case's peak memory of one round, then its timing (2-5 rounds)."""
    rows = []
    for c in round_cases(wl, backend):
        mem = peak_memory(c.fn)
        rows.append(_row(wl.label, c.method, c.backend, interleaved(c.fn, probe, min_reps=2, max_reps=5, cap_s=30),
                         c.nbytes, mem=mem))
    return rows


def run(n=25_000_000, leaves=50, k=10, *, backends=None, flower=True, robust=False, json_path=None, progress=True,
        file=None):
    """Run every row, print the table and return the rows."""
    avail = jk.available_backends()
    backends = [b for b in (backends or ("cpp", "numba", "numpy")) if avail.get(b) is True]
    probe = Probe()
    head = header(probe)
    wl = make_workload(n, leaves, k)
    _stepped_state(make_workload(4096, 4, 2), A.FedAdam(), backends[0])  # warm up (numba compiles)
    rows = []
    steps = [("step", o) for o in OPTIMIZERS] + [("clipping", None)] + (
        [("secagg", None), ("rounds", None)] if flower and installed("flwr") else []) + (
        [("robust", None)] if robust and installed("flwr") else [])
    with progress_bar(steps, enabled=progress, unit="part") as bar:
        for what, name in bar:
            bar.set_description(f"{what} {name or ''}")
            if what == "step":
                rows += bench_step(wl, probe, name, backends)
            elif what == "clipping":
                rows += bench_clipping(wl, probe, backends[0])
            elif what == "secagg":
                rows += bench_secagg(wl, probe)
            elif what == "robust":
                rows += bench_robust(wl, probe, backends)
            else:
                rows += bench_rounds(wl, probe, backends[0])
    _ratios(rows)
    print(format_table(head, rows, wl.label), file=file or sys.stdout)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": head, "rows": rows}, f, indent=1)
    return rows


def _ratios(rows):
    """``speedup``: the plain-numpy (or Flower) time of the same job over this row's time."""
    by = {r["method"]: r for r in rows}
    for r in rows:
        m = r["method"]
        peer = None
        if m.endswith("step (fused)"):
            peer = by.get(m.replace("step (fused)", "numpy f32 expressions"))
        elif m == "fold_many raw: DP fixed clipping":  # FedAvg's row on the same backend, "(fused admission)" on
            # cpp only (looked up by that name alone, the ratio was blank wherever the first backend was not cpp)
            peer = next((p for p in rows if p["method"].startswith("fold_many raw: FedAvg")
                         and p["backend"] == r["backend"]), None)
        elif m.startswith("robust ") and not m.endswith(("Flower", "(SSYRK)")) and "geometric" not in m:
            peer = by.get("robust Gram step: numpy X @ X.T (SSYRK)" if "Gram" in m else m + ": Flower")
        elif m.startswith("SecAgg sum (uint32"):
            peer = by.get("SecAgg sum: Flower's per-client loop")
        elif m.endswith("round from FitRes"):
            peer = by.get(m.replace("round from FitRes", "round: Flower aggregate_fit"))
        r["speedup"] = None if peer is None else peer["time_s"] / r["time_s"]


def format_table(head, rows, label) -> str:
    lines = [f"# jitkernels algorithms benchmark: {label}",
             f"# {head['cpu']}, {head['usable_cpus']} CPUs, threads {head['threads']}, simd {head['simd']}",
             f"{'method':38} {'backend':7} {'ms':>9} {'probe':>6} {'MB':>7} {'roofl':>5} {'min-r':>5} "
             f"{'speedup':>7} {'RSS MB':>7}"]
    for r in rows:
        def f(x, s, spec):
            return "" if x is None else format(x * s, spec)
        lines.append(f"{r['method']:38} {r['backend']:7} {f(r['time_s'], 1e3, '9.1f')} "
                     f"{f(r['probe_gbps'], 1, '6.1f')} {f(r['bytes'], 1e-6, '7.0f')} "
                     f"{f(r['frac_roofline'], 1, '5.2f')} {f(r['frac_min_roofline'], 1, '5.2f'):>5} "
                     f"{f(r['speedup'], 1, '7.1f'):>7} {f(r['rss_peak_bytes'], 1e-6, '7.0f'):>7}")
    lines.append("ms: median time; probe: read GB/s around it; MB: bytes the fused method moves; roofl: (MB / probe) "
                 "/ ms; min-r: the same with the equations' minimum bytes; speedup: the numpy-expression (step) or "
                 "Flower (round) time / this time (clipped fold: the unclipped fold's time / this time); RSS MB: peak "
                 "resident-set growth of one call.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jitkernels.algorithms_benchmark",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=positive_int, default=25_000_000)
    p.add_argument("--leaves", type=positive_int, default=50)
    p.add_argument("--k", type=positive_int, default=10)
    p.add_argument("--backends", nargs="+", choices=("cpp", "numba", "numpy"))
    p.add_argument("--no-flower", action="store_true")
    p.add_argument("--robust", action="store_true", help="also the robust rules (the slab needs k x N x 4 bytes more)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.leaves > a.n:
        p.error(f"--leaves {a.leaves} is more than --n {a.n}")
    if a.robust and a.k < 2 * KRUM_F + 3:  # (the robust rows come last: the crash took every row with it)
        p.error(f"--robust runs Krum with f = {KRUM_F}, which needs --k >= {2 * KRUM_F + 3}; got {a.k}")
    available_or_exit(a.backends, "python -m jitkernels.algorithms_benchmark")
    run(a.n, a.leaves, a.k, backends=a.backends, flower=not a.no_flower, robust=a.robust, json_path=a.json,
        progress=not a.no_progress)
    return 0


if __name__ == "__main__":  # (again with OMP_WAIT_POLICY=passive from the start where it came too late)
    from .benchmark import command_line

    sys.exit(command_line(sys.argv[1:], "jitkernels.algorithms_benchmark", main))
