"""GPU-versus-CPU fusion comparison: the fused fold on the GPU against unfused CuPy, torch CUDA and the CPU backends.

For each model size N, input dtype (fp32, bf16; k updates of ``leaves`` leaves each) and placement of the updates:

* ``device``: updates already in GPU memory. Methods: jitkernels' fused kernel (one pass, k updates), unfused CuPy
  (``acc += w * u`` per leaf and update), torch ``acc.add_(u, alpha=w)``, ``torch._foreach_add_``. Ceiling: the
  device-to-device copy bandwidth measured in the same run (bytes read + written); useful bytes = k*N*itemsize +
  2*N*4 (the float32 accumulator read and written once).
* ``pinned`` / ``pageable``: updates in host memory (pinned by the receiver, or plain). The GPU methods include the
  host-to-device copy (jitkernels stages it through its pinned ring; the peers call ``.to('cuda')`` /
  ``cp.asarray``); the CPU backends (cpp, numba) fold the same pageable host updates where they are. Ceiling: the
  pinned host-to-device bandwidth measured in the same run; useful bytes = k*N*itemsize over the bus.

Times are medians of ``reps`` runs after a warm-up, each ending with the device synchronized. For device updates
two more rows time the same fold call on the GPU: "GPU time" (CUDA events around the whole call, so the host work
between them counts) and "kernel time" (events around the fold kernel's launch alone: what the copy probe, a bare
kernel too, compares with). ``--fold-variants 1x2,4x2`` sweeps the fold kernel's tuning macros (U updates' loads in
flight, E quads per thread; kernels.cu) by kernel time, to pick its defaults. Without a GPU, the CPU half runs and
the report says so. ``--robust`` compares the robust rules on a slab in GPU memory with the same slab on the host
instead (:func:`robust_rows`). ``python -m jitkernels.gpu_benchmark --json out.json --plot out.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np

import jitkernels as jk
from jitkernels.dtypes import bf16_bits_to_float32

DTYPES = ("float32", "bfloat16")
SIZES = (25_000_000, 250_000_000)
PLACEMENTS = ("device", "pinned", "pageable")


def _median_time(fn, reps, setup=None, sync=None) -> float:
    times = []
    for i in range(reps + 1):
        if setup is not None:
            setup()
        if sync is not None:
            sync()
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        if i:  # the first run warms up (compiles, allocates, faults pages in)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def probes(reps: int = 5, nbytes: int = 1 << 30) -> dict:
    """Device-to-device copy (bytes read + written / s) and host-to-device copy from pinned and pageable memory."""
    import cupy as cp

    sync = cp.cuda.Device().synchronize
    src, dst = cp.ones(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
    d2d = 2 * nbytes / _median_time(lambda: dst.__setitem__(Ellipsis, src), reps, sync=sync)
    pinned = np.ndarray((nbytes,), np.uint8, buffer=cp.cuda.alloc_pinned_memory(nbytes))
    pinned[...] = 1
    pageable = np.ones(nbytes, np.uint8)
    h2d_pinned = nbytes / _median_time(lambda: dst.set(pinned), reps, sync=sync)
    h2d_pageable = nbytes / _median_time(lambda: dst.set(pageable), reps, sync=sync)
    return {"d2d_GBps": d2d / 1e9, "h2d_pinned_GBps": h2d_pinned / 1e9, "h2d_pageable_GBps": h2d_pageable / 1e9}


@contextmanager
def kernel_timer(rt, times: list):
    """Append, per backend call made inside, the GPU time of its kernel launches alone (ms; CUDA events recorded
    around each launch on its stream). Read ``times`` after synchronizing."""
    import cupy as cp

    launch, pending = rt.launch, []

    def timed(name, grid, args, stream):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record(stream.s)
        launch(name, grid, args, stream)
        b.record(stream.s)
        pending.append((a, b))
    rt.launch = timed
    try:
        yield lambda: times.append(sum(cp.cuda.get_elapsed_time(a, b) for a, b in pending) / 1e3) or pending.clear()
    finally:
        del rt.launch  # the class's own method again


def _kernel_seconds(agg, adm, reps) -> float:
    """Median kernel time of ``agg.fold_many(adm)`` on the GPU (warm-up call first)."""
    import cupy as cp

    from .backends.cupy_backend import runtime

    times = []
    with kernel_timer(runtime(), times) as done:
        for _ in range(reps + 1):
            agg.reset(reuse=True)
            agg.fold_many(adm)
            cp.cuda.Device().synchronize()
            done()
    return statistics.median(times[1:])


def _leaf_sizes(n, leaves) -> list:
    """n elements in ``leaves`` nearly equal leaves (the rows count n)."""
    return [n // leaves + (1 if i < n % leaves else 0) for i in range(leaves)]


def _model(n, leaves, dtype, k, seed):
    """k updates (dicts of torch CUDA tensors) and their weights."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    tdt = getattr(torch, dtype)
    ups = [{f"l{i}": torch.randn(s, device="cuda", generator=g).to(tdt) for i, s in enumerate(_leaf_sizes(n, leaves))}
           for _ in range(k)]
    return ups, np.random.default_rng(seed).uniform(1, 100, k)


def _unfused_cupy(acc, ups, w, to_device):
    """acc += w * u, per leaf and update (bf16 widened by its bits: CuPy has no bfloat16)."""
    import cupy as cp

    for u, wj in zip(ups, w):
        for name, a in acc.items():
            x = to_device(u[name])
            if x.dtype == cp.int16:  # a bf16 tensor's bits
                x = bf16_bits_to_float32(x.view(cp.uint16))
            a += cp.float32(wj) * x


def _torch_bits(t):
    """A CuPy view of a torch CUDA tensor (bf16 as its int16 bits)."""
    import cupy as cp
    import torch

    return cp.from_dlpack(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def _host_bits(t):
    import cupy as cp
    import torch

    return cp.asarray((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy())


def run_case(n, dtype, *, k=10, leaves=10, reps=5, seed=0, bw=None, log=print, placements=PLACEMENTS,
             variants=()) -> list:
    """Rows of one (N, dtype): every method on every placement; with ``variants`` ((U, E) pairs), the device fold's
    kernel time under each."""
    import cupy as cp
    import torch

    sync = torch.cuda.synchronize
    ups, w = _model(n, leaves, dtype, k, seed)
    isz = 2 if dtype == "bfloat16" else 4
    dev_bytes, bus_bytes = k * n * isz + 2 * n * 4, k * n * isz
    parties = list(range(k))
    rows = []

    def add(placement, method, secs):
        ceiling = bw["d2d_GBps"] if placement == "device" else bw["h2d_pinned_GBps"]
        useful = dev_bytes if placement == "device" else bus_bytes
        rows.append({"N": n, "dtype": dtype, "k": k, "placement": placement, "method": method, "seconds": secs,
                     "GBps": useful / secs / 1e9, "fraction_of_ceiling": useful / secs / 1e9 / ceiling})
        log(f"  N={n:>11,} {dtype:8s} {placement:8s} {method:24s} {secs * 1e3:9.2f} ms  "
            f"{rows[-1]['fraction_of_ceiling']:.2f} of {'d2d' if placement == 'device' else 'pinned h2d'}")

    make = {"device": lambda: ups, "pinned": lambda: [{n_: t.cpu().pin_memory() for n_, t in u.items()} for u in ups],
            "pageable": lambda: [{n_: t.cpu() for n_, t in u.items()} for u in ups]}
    host = {p: make[p]() for p in placements}
    as_cupy = [{n_: _torch_bits(t) for n_, t in u.items()} for u in ups]  # views, made once, outside the timing
    to_dev = {"device": lambda x: x, "pinned": _host_bits, "pageable": _host_bits}
    for placement, us in host.items():
        r = reps if n < 100_000_000 or placement == "device" else max(2, reps // 2)
        agg = jk.Aggregator({k_: v.cuda() if placement == "device" else v for k_, v in us[0].items()},
                            backend="cupy")
        adm = agg.admit_many(us, w, parties)
        add(placement, "jitkernels fused (cupy)",
            _median_time(lambda: agg.fold_many(adm), r, setup=lambda: agg.reset(reuse=True), sync=sync))
        if placement == "device":  # the same call's GPU time alone (CUDA events): without the Python around it
            from cupyx.profiler import benchmark

            def again():
                agg.state.parties.clear()  # fold the same updates again (the sums grow; no matter here)
                agg.fold_many(adm)
            gpu_t = benchmark(again, n_repeat=r, n_warmup=1).gpu_times
            add(placement, "jitkernels fused, GPU time", float(np.median(gpu_t)))
            add(placement, "jitkernels fused, kernel time", _kernel_seconds(agg, adm, r))
            sweep_variants(agg, adm, r, variants, add)
        agg = adm = None  # free the device accumulator before the next method (rebound: closures read these cells)
        acc_c = {name: cp.zeros(t.numel(), cp.float32) for name, t in ups[0].items()}
        add(placement, "cupy unfused",
            _median_time(lambda: _unfused_cupy(acc_c, as_cupy if placement == "device" else us, w,
                                               to_dev[placement]), r, sync=sync))
        acc_c = None
        acc_t = {name: torch.zeros(t.numel(), device="cuda") for name, t in ups[0].items()}
        nb = placement == "pinned"

        def torch_add():
            for u, wj in zip(us, w):
                for name, a in acc_t.items():
                    a.add_(u[name].to("cuda", non_blocking=nb), alpha=float(wj))

        def torch_foreach():
            names = list(acc_t)
            for u, wj in zip(us, w):
                torch._foreach_add_([acc_t[x] for x in names], [u[x].to("cuda", non_blocking=nb) for x in names],
                                    alpha=float(wj))
        add(placement, "torch add_(alpha=)", _median_time(torch_add, r, sync=sync))
        add(placement, "torch _foreach_add_", _median_time(torch_foreach, r, sync=sync))
        acc_t = None
        if placement == "pageable":
            rows += cpu_rows(n, dtype, us, w, r, bw, log)
    host = ups = as_cupy = None
    torch.cuda.empty_cache()
    cp.get_default_memory_pool().free_all_blocks()
    return rows


def sweep_variants(agg, adm, reps, variants, add) -> None:
    """Add a row per (U, E): the device fold's kernel time with kernels.cu compiled at ``JK_FOLD_UPDATES`` = U,
    ``JK_FOLD_QUADS`` = E; the runtime's own defaults are restored after."""
    from .backends.cupy_backend import runtime

    rt = runtime()
    for u, e in variants:
        rt.defines = {"JK_FOLD_UPDATES": u, "JK_FOLD_QUADS": e}
        try:
            add("device", f"fused kernel, U={u} E={e}", _kernel_seconds(agg, adm, reps))
        finally:
            rt.defines = {}


def cpu_rows(n, dtype, host_updates, w, reps, bw, log=print) -> list:
    """The CPU backends folding the same host updates (where they are: no bus), as fractions of the same ceiling
    (so GPU and CPU rows compare), in GB/s of update bytes read, and against the host's own read bandwidth: a
    STREAM-like probe (:class:`jitkernels.benchmark.Probe`) timed between the repetitions, over the fold's bytes
    (k*N*itemsize + 2*N*4, the accumulator read and written), as the kernel table reports it."""
    from .benchmark import Probe, interleaved

    rows = []
    isz = 2 if dtype == "bfloat16" else 4
    useful, moved = len(w) * n * isz, len(w) * n * isz + 2 * n * 4
    probe = Probe()
    for backend in ("cpp", "numba"):
        agg = jk.Aggregator(host_updates[0], backend=backend)
        try:
            adm = agg.admit_many(host_updates, w, list(range(len(w))))
        except jk.BackendUnavailable:
            continue
        agg.fold_many(adm)  # warm-up (numba compiles; the accumulator's pages fault in)
        timing = interleaved(lambda: agg.fold_many(adm), probe, setup=lambda: agg.reset(reuse=True),
                             min_reps=reps, max_reps=reps)
        secs, host_bw = timing.time, timing.bandwidth
        rows.append({"N": n, "dtype": dtype, "k": len(w), "placement": "pageable", "method": f"{backend} (CPU)",
                     "seconds": secs, "GBps": useful / secs / 1e9,
                     "fraction_of_ceiling": None if bw is None else useful / secs / 1e9 / bw["h2d_pinned_GBps"],
                     "host_read_probe_GBps": host_bw, "fraction_of_host_roofline": moved / secs / 1e9 / host_bw})
        log(f"  N={n:>11,} {dtype:8s} host     {backend + ' (CPU)':24s} {secs * 1e3:9.2f} ms  "
            f"{useful / secs / 1e9:.1f} GB/s of updates, {moved / secs / 1e9 / host_bw:.2f} of its byte roofline "
            f"(read probe {host_bw:.1f} GB/s)")
    return rows


def robust_rows(n, k=10, reps=5, bw=None, log=print, host=True, gram_columns=(None,)) -> list:
    """The robust rules over a round's k float32 updates in GPU memory: filling a
    :class:`~jitkernels.robust_store.DeviceUpdateStore` from device updates (what a GPU aggregator's fold does), then
    each rule on its slab (robust_coord's kernels; robust_gram on CuPy, the Gram by its fused kernel), with the
    Gram's kernel at each tile size (and at each U of ``gram_columns``: kernels.cu's JK_GRAM_COLUMNS, None for its
    default) and the array path it replaced (the slab widened to float64 in tiles, centered, batched cuBLAS GEMMs)
    beside it, and likewise the rules' final weighted sum (combine); and, with ``host``, the same rules on the same
    slab in host memory (C++ coordinate kernels, numpy's BLAS Gram: nothing to compile on a fresh machine). Device
    rows as fractions of the d2d copy bandwidth, bytes = what the pass must read (k N 4; the store's fill reads and
    writes them)."""
    import cupy as cp

    from . import robust_coord as rc
    from . import robust_gram as rg
    from .backends import cuda_source, cupy_backend
    from .robust_store import DeviceUpdateStore

    sync = cp.cuda.Device().synchronize
    rng = cp.random.default_rng(0)
    ups = [rng.standard_normal(n, dtype=cp.float32) for _ in range(k)]
    store = DeviceUpdateStore(n, k)

    def fill():
        store.clear(release=False)
        for j, u in enumerate(ups):
            store.add(u, party=j, finite=True)  # as an aggregator adds its admitted updates
    fill()
    host_slab = np.stack([u.get() for u in ups]) if host else None
    f = max(0, (k - 3) // 4)  # Bulyan's k >= 4f + 3
    rules = [("coordinate median", lambda x, b: rc.coordinate_median(x, backend=b[0])),
             ("trimmed mean 0.2", lambda x, b: rc.trimmed_mean(x, 0.2, backend=b[0])),
             ("Gram (float64, centered)", lambda x, b: rg.gram(x, backend=b[1])),
             (f"Krum f={f} m={k - f}", lambda x, b: rg.krum(x, f, m=k - f, backend=b[1])),
             (f"Bulyan f={f}", lambda x, b: rg.bulyan(x, f, backend=b[1])),
             ("geometric median", lambda x, b: rg.geometric_median(x, backend=b[1]))]
    rows = []

    def add(where, method, secs, nbytes):
        frac = nbytes / secs / 1e9 / bw["d2d_GBps"] if bw is not None and where == "device slab" else None
        rows.append({"N": n, "dtype": "float32", "k": k, "placement": where, "method": method, "seconds": secs,
                     "GBps": nbytes / secs / 1e9, "fraction_of_ceiling": frac})
        log(f"  N={n:>11,} {where:11s} {method:26s} {secs * 1e3:9.2f} ms  {nbytes / secs / 1e9:7.1f} GB/s"
            + ("" if frac is None else f"  {frac:.2f} of d2d"))
    add("device slab", "store add (device updates)", _median_time(fill, reps, sync=sync), 2 * k * n * 4)
    slab = store.rows()
    for name, rule in rules:
        add("device slab", name + " (cupy)", _median_time(lambda: rule(store, ("cupy", "cupy")), reps, sync=sync),
            k * n * 4)
        if name.startswith("Gram"):  # centered at row 0, as the rules' pilot picks a row
            rt = cupy_backend.runtime()
            for u in gram_columns:
                rt.defines = {} if u is None else {"JK_GRAM_COLUMNS": u}
                try:
                    for T in cuda_source.GRAM_TILES:
                        add("device slab", f"  Gram kernel, {T}-row tiles" + ("" if u is None else f", U={u}"),
                            _median_time(lambda: cupy_backend.gram(slab, rg.MODE_ROW, 0, None, False, T), reps,
                                         sync=sync), k * n * 4)
                finally:
                    rt.defines = {}
            add("device slab", "  pilot reference row", _median_time(lambda: rg._pilot_reference(slab), reps,
                                                                      sync=sync), k * min(n, rg.PILOT) * 4)
            add("device slab", "  Gram, array path (cuBLAS)", _median_time(
                lambda: rg._gram_xp(slab, rg.MODE_ROW, 0, None, rg._tile_columns("cupy", k, rg.BLOCK), False), reps,
                sync=sync), k * n * 4)
        if name.startswith("Krum"):  # the rules' final weighted sum, kernel against the array path it replaced
            coef, every, out = np.full(k, 1.0 / k), np.arange(k), cp.empty(n, cp.float32)
            add("device slab", "  weighted sum of the k rows (kernel)", _median_time(
                lambda: rg.combine(slab, coef), reps, sync=sync), k * n * 4)
            add("device slab", "  weighted sum, array path", _median_time(
                lambda: rg._combine_xp(slab, every, coef, None, out, rg._tile_columns("cupy", k, rg.BLOCK)), reps,
                sync=sync), k * n * 4)
        if host:
            add("host slab", name + " (cpp / numpy)", _median_time(lambda: rule(host_slab, ("cpp", "numpy")), reps),
                k * n * 4)
    return rows


def run(sizes=SIZES, dtypes=DTYPES, k=10, leaves=10, reps=5, log=print, placements=PLACEMENTS, variants=(),
        on_case=None, robust=False, gram_columns=(None,)) -> dict:
    """The report: probes and rows; ``on_case(report)`` after each (N, dtype), so a run cut short keeps its rows."""
    gpu = jk.available_backends()["cupy"]
    report = {"gpu": gpu is True, "threads": jk.get_num_threads(), "rows": []}
    if gpu is not True:
        log(f"no GPU ({gpu}): running the CPU half only")
        if robust:  # the CPU backends' robust rules have their own benchmark
            log("(the robust rules on the CPU: python -m jitkernels.algorithms_benchmark --robust)")
            return report
        import torch

        for n in sizes:
            for dtype in dtypes:
                tdt = getattr(torch, dtype)
                ups = [{f"l{i}": torch.randn(m).to(tdt) for i, m in enumerate(_leaf_sizes(n, leaves))}
                       for _ in range(k)]
                report["rows"] += cpu_rows(n, dtype, ups, np.random.default_rng(0).uniform(1, 100, k), reps,
                                           None, log)
        return report
    import cupy as cp

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    report["device"] = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    report["probes"] = bw = probes()
    log(f"{report['device']}: d2d copy {bw['d2d_GBps']:.0f} GB/s, h2d pinned {bw['h2d_pinned_GBps']:.1f} GB/s, "
        f"h2d pageable {bw['h2d_pageable_GBps']:.1f} GB/s")
    for n in sizes:
        if robust:  # the robust rules instead of the fold (float32 slabs)
            report["rows"] += robust_rows(n, k, reps, bw, log, "pageable" in placements, gram_columns)
            if on_case is not None:
                on_case(report)
            continue
        for dtype in dtypes:
            report["rows"] += run_case(n, dtype, k=k, leaves=leaves, reps=reps, bw=bw, log=log,
                                       placements=placements, variants=variants)
            if on_case is not None:
                on_case(report)
    return report


def markdown(report) -> str:
    head = ("| N | dtype | updates in | method | ms | GB/s | fraction of ceiling | vs cupy unfused | CPU rows: of the "
            "host roofline (read probe) |\n|---|---|---|---|---|---|---|---|---|\n")
    base = {(r["N"], r["dtype"], r["placement"]): r["seconds"] for r in report["rows"]
            if r["method"] == "cupy unfused"}  # wall-clock, like every row but the GPU-time one
    lines = []
    for r in report["rows"]:
        ref = base.get((r["N"], r["dtype"], r["placement"]))
        frac = "" if r["fraction_of_ceiling"] is None else f"{r['fraction_of_ceiling']:.2f}"
        speedup = "" if ref is None else f"{ref / r['seconds']:.2f}x"
        host = (f"{r['fraction_of_host_roofline']:.2f} ({r['host_read_probe_GBps']:.1f} GB/s)"
                if "fraction_of_host_roofline" in r else "")
        lines.append(f"| {r['N']:,} | {r['dtype']} | {r['placement']} | {r['method']} | {r['seconds'] * 1e3:.2f} "
                     f"| {r['GBps']:.1f} | {frac} | {speedup} | {host} |")
    return head + "\n".join(lines) + "\n"


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r["fraction_of_ceiling"] is not None]
    if not rows:  # the CPU half alone has no GPU ceiling to plot against (said: --plot wrote nothing, silently)
        print(f"plot skipped ({path}): no GPU rows, whose fraction of the GPU ceiling it plots", file=sys.stderr)
        return
    cases = sorted({(r["N"], r["dtype"], r["placement"]) for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 1.2), 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ys = [next((r["fraction_of_ceiling"] for r in rows if (r["N"], r["dtype"], r["placement"]) == c
                    and r["method"] == m), 0) for c in cases]
        ax.bar(np.arange(len(cases)) + i * width, ys, width, label=m)
    ax.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    ax.set_xticklabels([f"{n / 1e6:g}M {d}\n{p}" for n, d, p in cases], fontsize=8)
    ax.set_ylabel("fraction of ceiling (d2d copy; pinned h2d for host updates)")
    ax.set_title(f"fold of k updates on {report.get('device', 'CPU')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _variants(text: str) -> list:
    """--fold-variants: comma-separated UxE pairs of integers >= 1 (a lone "4" parsed, and the sweep crashed on a GPU
    after timing its case)."""
    try:
        out = [tuple(int(x) for x in v.split("x")) for v in text.split(",")]
    except ValueError:
        out = []
    if not out or any(len(v) != 2 or min(v) < 1 for v in out):
        raise argparse.ArgumentTypeError(f"expected UxE,... (e.g. 1x2,4x2), got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jitkernels.gpu_benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=list(SIZES))
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--leaves", type=int, default=10)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    p.add_argument("--fold-variants", type=_variants,
                   default=[], metavar="UxE,...", help="sweep the fold kernel's tuning macros (device updates)")
    p.add_argument("--robust", action="store_true",
                   help="the robust rules on a device slab against the host slab, instead of the fold")
    p.add_argument("--gram-columns", type=lambda s: [int(x) for x in s.split(",")], default=[None], metavar="U,...",
                   help="with --robust: time the Gram kernel at each JK_GRAM_COLUMNS (kernels.cu) too")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--markdown", metavar="PATH")
    p.add_argument("--plot", metavar="PATH")
    a = p.parse_args(argv)

    def save(report):
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=1)
        if a.markdown:
            with open(a.markdown, "w") as f:
                f.write(markdown(report))
    report = run(a.sizes, a.dtypes, a.k, a.leaves, a.reps, log=lambda s: print(s, flush=True),
                 placements=a.placements, variants=a.fold_variants, on_case=save, robust=a.robust,
                 gram_columns=a.gram_columns)
    save(report)
    print(markdown(report))
    if a.plot:
        plot(report, a.plot)
    return 0


if __name__ == "__main__":  # (again with OMP_WAIT_POLICY=passive from the start where it came too late)
    from .benchmark import command_line

    sys.exit(command_line(sys.argv[1:], "jitkernels.gpu_benchmark", main))
