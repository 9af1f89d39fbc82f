"""``jitagg``: simulate the policies on a workload, sweep rho x jitter, calibrate the cost model, run the kernel bench.

    jitagg simulate [--config my.toml | --mix mixed|cross_silo|cross_device] [--out results/] [--real]
    jitagg sweep [--out results/]
    jitagg calibrate [--out cost.json]
    jitagg bench [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile

import numpy as np

from .cost import CostModel
from .simulator import MAX_SPREAD, POLICIES, Workload, compare, risk_bound, sweep_workload

COLUMNS = [("policy", "policy", "{}"), ("aggregator_s", "aggr-s", "{:,.0f}"), ("busy_s", "busy-s", "{:,.1f}"),
           ("saving_vs_eager", "saving", "{:.1%}"), ("latency_p50_s", "lat p50", "{:.2f}"),
           ("latency_p95_s", "lat p95", "{:.2f}"), ("latency_p99_s", "lat p99", "{:.2f}"),
           ("deadline_misses", "misses", "{}"), ("peak_buffered_bytes", "peak GB", "{:.2f}"),
           ("events_per_s", "events/s", "{:,.0f}")]


def _progress(desc_total):
    """The run's progress callback (``bars``: its tqdm bars, by policy); its ``close()`` closes the bars a run that
    stopped left open (an error printed after them was drawn into them)."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety: print dots instead
        tqdm = None
    bars = {}

    def update(policy, done, total):
        if tqdm is None:
            if done == total:
                print(f"  {policy}: {total} rounds", file=sys.stderr)
            return
        bar = bars.get(policy)
        if bar is None:
            bar = bars[policy] = tqdm(total=total, desc=f"{desc_total} {policy:>6}", unit="round", file=sys.stderr,
                                      leave=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    update.bars = bars
    update.close = lambda: [bar.close() for bar in bars.values()]
    return update


def _table(rows: dict) -> str:
    head = " ".join(f"{h:>10}" for _, h, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows.values():
        cells = []
        for key, _, fmt in COLUMNS:
            v = row.get(key)
            if key == "peak_buffered_bytes" and v is not None:
                v = v / 1e9
            cells.append(f"{fmt.format(v):>10}" if v is not None else f"{'-':>10}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def _pyplot():
    """matplotlib's pyplot, headless, or None with a note: the plots need the bench extra's matplotlib, the figures
    and the JSON do not (a plain install wrote the JSON and then died in the plot)."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'jitkernels[bench]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot(out: dict, path: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    results = out["results"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    for p, r in results.items():
        t, n = zip(*r.occupancy)
        ax.step(np.array(t) / 3600, n, where="post", label=f"{p} ({r.deployed_s / 3600:,.1f} aggr-h)")
    ax.set_xlabel("time (h)")
    ax.set_ylabel("aggregators deployed")
    ax.set_title(f"{out['workload']}: aggregator occupancy (rho = {out['rho']:.4f})")
    ax.legend()
    ax = axes[1]
    for p, r in results.items():
        lat = np.sort(np.maximum(np.array(r.latencies), 1e-3))
        ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post", label=p)
    ax.set_xscale("log")
    ax.set_xlabel("added latency: quorum's last update -> model ready (s)")
    ax.set_ylabel("fraction of rounds")
    ax.set_title("latency CDF")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


TIMING = ("wall_s", "events_per_s")  # the run's own speed: under "timing", so that one seed's figures diff equal


def _split_timing(rows: dict) -> dict:
    """Each policy's figures, and apart under "timing" the run's own speed (so that one seed's figures diff equal)."""
    return {**{p: {k: v for k, v in row.items() if k not in TIMING} for p, row in rows.items()},
            "timing": {p: {k: row[k] for k in TIMING if k in row} for p, row in rows.items()}}


def _json_ready(out: dict) -> dict:
    split = _split_timing(out["policies"])
    timing = split.pop("timing")
    return {"workload": out["workload"], "rho": out["rho"], "policies": split, "timing": timing,
            "per_job": {p: r.per_job for p, r in out["results"].items()},
            "occupancy": {p: r.occupancy for p, r in out["results"].items()}}


def _plain(x):
    """``x`` as strict JSON takes it: numpy numbers as Python's, NaN and inf (a latency where no round made a model)
    as null (json.dump wrote NaN, which JSON parsers refuse)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _write_json(path: str, obj, cmd: str) -> None:
    try:
        with open(path, "w") as f:
            json.dump(_plain(obj), f, indent=1, allow_nan=False)
    except OSError as e:  # (the folder was checked before the run; it may have changed since)
        raise SystemExit(f"jitagg {cmd}: cannot write {path!r}: {e}") from None


def _out_dir(path: str, files=(), cmd: str = "simulate") -> str:
    """The output folder, made and written to now, and ``files`` in it not folders: a path that cannot be the
    folder fails before the run, not after it (the results lost in a traceback)."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()  # (a folder that takes no files: /proc, read-only, full)
    except OSError as e:
        raise SystemExit(f"jitagg {cmd}: --out {path!r} cannot be the output folder: {e}") from None
    taken = next((f for f in files if os.path.isdir(os.path.join(path, f))), None)
    if taken is not None:
        raise SystemExit(f"jitagg {cmd}: {os.path.join(path, taken)!r} is a folder, where the output file goes")
    return path


def _workload(args) -> Workload:
    """The workload of --config (or --mix), with --cost and --seed: a file that is missing or wrong is one line
    naming what is wrong, not a traceback."""
    try:
        wl = Workload.from_toml(args.config) if args.config else Workload.builtin(args.mix)
        if args.cost:
            try:
                cost = CostModel.load(args.cost)
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"--cost {args.cost!r}: {e}") from None
            wl.use_cost(cost)
        if args.seed is not None:
            wl.seed = args.seed
        wl.check()
    except (OSError, ValueError, TypeError) as e:  # (tomllib's TOMLDecodeError is a ValueError)
        raise SystemExit(f"jitagg simulate: {e}") from None
    return wl


def _file_name(name: str) -> str:
    """A workload's name as part of a file name (a "/" in it named a folder that was not there), in ASCII (a byte a
    character: file names are limited in bytes), cut to 80 characters; where that changed the name, a hash of the
    whole follows (a 300-character name, or 90 CJK characters, failed to write after the run; "训练" and "测试" both
    became "__", and the second run wrote over the first's files)."""
    safe = "".join(c if c.isascii() and c.isalnum() or c in "-_." else "_" for c in name)[:80]
    return safe if safe == name and safe else f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def cmd_simulate(args) -> int:
    wl = _workload(args)
    base = f"simulate_{_file_name(wl.name)}"
    out_dir = _out_dir(args.out, (base + ".json", base + ".png"))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:  # before any policy runs (a typo at the end failed after the others had run)
        raise SystemExit(f"jitagg simulate: --policies takes some of {', '.join(POLICIES)}; got {args.policies!r}")
    print(f"workload {wl.name}: {sum(s.count for s in wl.jobs)} jobs, slots {wl.slots}, start-up {wl.startup_s}s, "
          f"alpha {wl.alpha}, seed {wl.seed}", file=sys.stderr)
    progress = _progress(wl.name)
    try:
        out = compare(wl, policies, real=args.real, progress=progress)
    except ValueError as e:  # a run that cannot be compared (rounds that stall or all fail): one line, as _workload's
        raise SystemExit(f"jitagg simulate: {e}") from None
    finally:
        progress.close()
    print(f"\n{wl.name}: rho = aggregation work / round time = {out['rho']:.5f}")
    print(_table(out["policies"]))
    rows, total = out["policies"], sum(s.count * s.rounds for s in wl.jobs)
    failed = {p: row["rounds_without_model"] for p, row in rows.items() if row["rounds_without_model"]}
    if failed:  # (figures over the rounds that made a model: "misses 0" sat beside 9 of 10 rounds failed)
        print(f"rounds that made no model, of {total}: " + ", ".join(f"{p} {n}" for p, n in failed.items())
              + "; the figures are over the others")
    partial = {p: row["partial_rounds"] for p, row in rows.items() if row["partial_rounds"]}
    if partial:  # (they were counted as rounds without a model: 6 of 8 had one, in the table)
        print(f"rounds whose quorum became unreachable, finalized with the updates that came, of {total}: "
              + ", ".join(f"{p} {n}" for p, n in partial.items()))
    j = out["policies"].get("jit", {})
    if "capture_of_lazy_saving" in j:
        print(f"\njit captures {j['capture_of_lazy_saving']:.1%} of lazy's saving over eager "
              f"and {j.get('capture_of_oracle_saving', math.nan):.1%} of oracle's; its p95 added latency is "
              f"{j['latency_share_of_lazy_gap']:.1%} of the way from eager's to lazy's. "
              f"Saving vs eager: {j['saving_vs_eager']:.1%} (the seed paper reports 60+%).")
    if args.real:
        print("--real: busy seconds are the kernels' measured time, beside the cost model's estimate of the same work "
              "(models scaled to <= 1M parameters, which a byte budget then binds less: savings differ from the "
              "modelled run's)")
        for p, row in out["policies"].items():
            print(f"  {p:>6}: measured busy {row['real_busy_s']:.3f} s, cost model {row['model_busy_s']:.3f} s")
    base = os.path.join(out_dir, base)
    _write_json(base + ".json", _json_ready(out), "simulate")
    plotted = _plot(out, base + ".png")
    print(f"\nwrote {base}.json" + (f" and {base}.png" if plotted else ""))
    return 0


def cmd_sweep(args) -> int:
    try:
        rhos = [float(x) for x in args.rho.split(",")]
        cvs = [float(x) for x in args.cv.split(",")]
    except ValueError:
        rhos = cvs = []
    if not rhos or not cvs or not all(0 < r < math.inf for r in rhos) or not all(
            0 <= c <= MAX_SPREAD for c in cvs) or args.rounds < 1:
        raise SystemExit(f"jitagg sweep: need comma-separated --rho > 0, --cv in [0, {MAX_SPREAD:g}] and --rounds "
                         f">= 1; got {args.rho!r}, {args.cv!r}, {args.rounds}")
    try:
        cost = CostModel.load(args.cost) if args.cost else None
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"jitagg sweep: --cost {args.cost!r}: {e}") from None
    out_dir = _out_dir(args.out, ("sweep.json", "sweep.png"), "sweep")
    shape = (len(cvs), len(rhos))
    saving, capture, oracle, bound, latency, added = (np.zeros(shape) for _ in range(6))
    cells = []
    total = len(rhos) * len(cvs)
    k = 0
    for i, cv in enumerate(cvs):
        for j, r in enumerate(rhos):
            k += 1
            print(f"[{k}/{total}] rho={r} cv={cv}", file=sys.stderr)
            try:  # (a rho whose rounds no clock can time, too many rounds: refused by name, not a traceback)
                wl = sweep_workload(r, cv, rounds=args.rounds, cost=cost)
                out = compare(wl, POLICIES)
            except ValueError as e:
                raise SystemExit(f"jitagg sweep: rho={r}, cv={cv}: {e}") from None
            row = out["policies"]["jit"]
            saving[i, j] = row["saving_vs_eager"]
            capture[i, j] = row["capture_of_lazy_saving"]
            oracle[i, j] = row["capture_of_oracle_saving"]
            bound[i, j] = row["risk_bound_of_oracle_saving"] = risk_bound(wl, out)
            latency[i, j] = row["latency_share_of_lazy_gap"]
            added[i, j] = row["added_latency_p95_vs_eager_s"]
            cells.append({"rho": r, "jitter_cv": cv, **_split_timing(out["policies"])})
    _write_json(os.path.join(out_dir, "sweep.json"), cells, "sweep")
    for title, data, fmt in (("jit saving vs eager", saving, "{:>8.1%}"),
                             ("share of lazy's saving jit captures", capture, "{:>8.1%}"),
                             ("share of oracle's saving jit captures", oracle, "{:>8.1%}"),
                             ("... and what planning at risk alpha on the true response-time distributions keeps "
                              "(simulator.risk_bound)", bound, "{:>8.1%}"),
                             ("jit p95 latency: share of the way from eager's to lazy's", latency, "{:>8.1%}"),
                             ("jit p95 added latency vs eager (s)", added, "{:>8.2f}")):
        print(f"\n{title} (rows: jitter CV, columns: rho)")
        print("cv \\ rho " + " ".join(f"{r:>8}" for r in rhos))
        for i, cv in enumerate(cvs):
            print(f"{cv:>8} " + " ".join(fmt.format(data[i, j]) for j in range(len(rhos))))
    plotted = _heatmaps(rhos, cvs, saving, capture, added, os.path.join(out_dir, "sweep.png"))
    print(f"\nwrote {out_dir}/sweep.json" + (f" and {out_dir}/sweep.png" if plotted else ""))
    return 0


def _heatmaps(rhos, cvs, saving, capture, added, path) -> bool:
    plt = _pyplot()
    if plt is None:
        return False

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, data, title, fmt in ((axes[0], saving, "jit saving vs eager", "{:.0%}"),
                                 (axes[1], capture, "share of lazy's saving jit captures", "{:.0%}"),
                                 (axes[2], added, "jit p95 added latency vs eager (s)", "{:.1f}")):
        im = ax.imshow(data, origin="lower", cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(rhos)), [str(r) for r in rhos])
        ax.set_yticks(range(len(cvs)), [str(c) for c in cvs])
        ax.set_xlabel("rho = aggregation work / round time")
        ax.set_ylabel("response-time jitter (CV)")
        ax.set_title(title)
        for i in range(len(cvs)):
            for j in range(len(rhos)):
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", color="w")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def cmd_calibrate(args) -> int:
    import jitkernels as jk

    if not (math.isfinite(args.startup) and args.startup >= 0):  # (before the measuring, not after it)
        raise SystemExit(f"jitagg calibrate: --startup must be a finite number of seconds >= 0, got {args.startup}")
    _out_dir(os.path.dirname(args.out) or ".", (os.path.basename(args.out),), "calibrate")
    try:
        jk.backends.choose(args.backend, "float32")
        cm = CostModel.calibrate(backend=args.backend, startup_s=args.startup,
                                 progress=lambda n, t: print(f"  N={n:>10,}: {t * 1e3:8.2f} ms", file=sys.stderr))
        cm.save(args.out)
    except (OSError, ValueError, jk.BackendUnavailable) as e:
        raise SystemExit(f"jitagg calibrate: {e}") from None
    b = cm.backends[cm.backend]
    print(f"throughput {b.throughput_Bps / 1e9:.2f} GB/s, per-call {b.call_s * 1e6:.0f} us -> {args.out}")
    return 0


def cmd_bench(args) -> int:
    from jitkernels import benchmark

    return benchmark.command_line(["--quick"] if args.quick else [])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jitagg", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("simulate", help="compare eager, lazy, jit and oracle on a workload")
    s.add_argument("--config", help="workload TOML (see scheduler/workloads/)")
    s.add_argument("--mix", default="mixed", choices=["mixed", "cross_silo", "cross_device"])
    s.add_argument("--policies", default=",".join(POLICIES))
    s.add_argument("--seed", type=int)
    s.add_argument("--real", action="store_true", help="fold real arrays; busy time measured")
    s.add_argument("--cost", metavar="FILE", help="kernel figures from `jitagg calibrate` (the start-up stays the "
                                                  "workload's)")
    s.add_argument("--out", default="results")
    s.set_defaults(fn=cmd_simulate)
    s = sub.add_parser("sweep", help="jit's saving and latency over rho x jitter (against eager, lazy, oracle)")
    s.add_argument("--rho", default="0.001,0.01,0.1,0.3",
                   help="(aggregation work + start-up) / round time: the share of a round one deployment needs")
    s.add_argument("--cv", default="0.05,0.2,0.5")
    s.add_argument("--cost", metavar="FILE", help="kernel figures from `jitagg calibrate`")
    s.add_argument("--rounds", type=int, default=100,
                   help="rounds per cell (the predictor learns over the first few; 100 is a short FL job)")
    s.add_argument("--out", default="results")
    s.set_defaults(fn=cmd_sweep)
    s = sub.add_parser("calibrate", help="measure kernel throughput for the cost model")
    s.add_argument("--backend", default="auto")
    s.add_argument("--startup", type=float, default=0.0, help="deployment start-up (s) to record")
    s.add_argument("--out", default="cost.json")
    s.set_defaults(fn=cmd_calibrate)
    s = sub.add_parser("bench", help="the kernel benchmark table")
    s.add_argument("--quick", action="store_true")
    s.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
