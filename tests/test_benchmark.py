"""The kernel benchmark (``python -m jitkernels.benchmark``, ``jitagg bench``) runs end to end on a tiny workload and
fills every row it promises: the timings themselves are for bench/, not for tests."""

import io
import json
import sys

import pytest

import jitkernels as jk
from jitkernels import benchmark as jb


def test_benchmark_table_rows_and_json(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # progress=False needs no tqdm (it comes with the extras)
    backends = [b for b in ("numpy", "cpp") if jk.available_backends()[b] is True]
    out = io.StringIO()
    rows = jk.bench([(20_000, 4, 4)], backends=backends, dtypes=["float32"], peers=False, probe_mb=4,
                  json_path=tmp_path / "b.json", progress=False, file=out)
    methods = {(r["method"], r["backend"]) for r in rows}
    for b in backends:
        for m in ("fold_many", "fold", "fold, 1 elem/leaf", jb.DETERMINISTIC, "admit_many"):
            assert (m, b) in methods
    for r in rows:
        assert r["time_s"] > 0 and r["reps"] >= 1, r
        if r["method"] == jb.DETERMINISTIC:
            f32 = next(x for x in rows if x["method"] == "fold_many" and x["backend"] == r["backend"])
            assert r["vs_fold_many"] == r["time_s"] / f32["time_s"]
            assert r["bytes"] == 4 * 20_000 * 4 + (16 if r["backend"] == "cpp" else 32) * 20_000
    assert "fold_many deterministic" in out.getvalue()
    assert len(json.loads((tmp_path / "b.json").read_text())["rows"]) == len(rows)


def test_progress_bar_without_tqdm(monkeypatch):
    from jitkernels.progress import bar

    monkeypatch.setitem(sys.modules, "tqdm", None)
    with bar(["a", "b"], enabled=True, unit="part") as b:
        assert list(b) == ["a", "b"]
        b.set_description("x")
    with bar(total=3) as b:
        b.update(2)
        assert b.n == 2


def test_workload_leaves_hold_at_least_one_element_each():
    """Rounding every leaf up to one element and taking the excess from the largest made a leaf negative where the
    element count is near the leaf count (50 leaves of 50 elements: one of -13, five empty): the "1 elem/leaf" row
    was not what it said."""
    from jitkernels.benchmark import make_workload

    for n, leaves in ((50, 50), (51, 50), (10, 10), (1000, 50), (100_000, 10)):
        sizes = make_workload(n, leaves, 2).sizes
        assert len(sizes) == leaves and sizes.min() >= 1 and sizes.sum() == n


def test_gpu_comparison_cpu_half_reports_against_the_host_probe():
    """Without a GPU the comparison runs its CPU half; each row carries the host read probe timed between its
    repetitions and its fraction of the fold's byte roofline (it had absolute GB/s only)."""
    from jitkernels import gpu_benchmark as gb

    if jk.available_backends()["cupy"] is True:
        pytest.skip("a GPU is present: the comparison runs its GPU half (bench/test_gpu_bench.py)")
    report = gb.run(sizes=(20_000,), dtypes=("float32",), k=3, leaves=2, reps=2, log=lambda s: None)
    assert not report["gpu"] and {r["method"] for r in report["rows"]} >= {"cpp (CPU)"}
    for r in report["rows"]:
        assert r["host_read_probe_GBps"] > 0 and r["fraction_of_host_roofline"] > 0
        frac = (3 * 20_000 * 4 + 2 * 20_000 * 4) / r["seconds"] / 1e9 / r["host_read_probe_GBps"]
        assert abs(r["fraction_of_host_roofline"] - frac) <= 1e-12 * frac
    assert f"{report['rows'][0]['fraction_of_host_roofline']:.2f} (" in gb.markdown(report)


def test_peer_ratios_at_equal_bandwidth():
    """jk x divides times of rows timed minutes apart; jk x@bw scales each by its own probe first."""
    def row(method, kind, t, bw, dtype="float32"):
        return {"method": method, "kind": kind, "backend": "cpp" if kind == "jitkernels" else "", "dtype": dtype,
                "time_s": t, "probe_gbps": bw, "vs_numpy_eager": None, "jk_speedup": None,
                "jk_speedup_equal_bw": None, "vs_fold_many": None}
    rows = [row("fold_many", "jitkernels", 0.04, 30.0), row("fold_many", "jitkernels", 0.05, 20.0),
            row("fold_many+finalize", "jitkernels", 0.06, 25.0), row("torch add_(alpha=w)", "peer", 0.08, 20.0),
            row("flwr aggregate", "peer", 0.6, 30.0)]
    jb._ratios(rows)
    torch_row, flwr_row = rows[3], rows[4]
    assert torch_row["jk_speedup"] == 0.08 / 0.04 and torch_row["jk_speedup_equal_bw"] == 0.08 * 20 / (0.04 * 30)
    assert flwr_row["jk_speedup"] == 0.6 / 0.06 and flwr_row["jk_speedup_equal_bw"] == 0.6 * 30 / (0.06 * 25)
    assert rows[0]["jk_speedup_equal_bw"] is None  # ours: no ratio to ourselves


def test_benchmark_command_lines_refuse_what_would_crash_mid_run(monkeypatch, capsys):
    """Bad --size values, --probe-mb 0, --threads 0, a named backend this machine lacks, --robust with k < 7 and a
    malformed --fold-variants were taken: they crashed after earlier workloads had been measured (and every row was
    lost), were ignored, or dropped the backend without a word."""
    import argparse

    from jitkernels import algorithms_benchmark, gpu_benchmark

    for bad in ("100:0:4", "100:10:0", "5:10:1", "100:10:-2", "a:b:c"):
        with pytest.raises(argparse.ArgumentTypeError):
            jb._size(bad)
    assert jb._size("1_000:10:3") == (1000, 10, 3)
    for argv in (["--probe-mb", "0"], ["--threads", "0"], ["--size", "10:0:1"]):
        with pytest.raises(SystemExit) as e:
            jb.main(argv)
        assert e.value.code == 2
    real = jk.available_backends

    def without_numba():
        return {**real(), "numba": "not installed (test)"}

    monkeypatch.setattr(jk, "available_backends", without_numba)
    with pytest.raises(SystemExit, match=r"not available here: numba \(not installed \(test\)\)"):
        jb.main(["--backends", "numba"])
    with pytest.raises(SystemExit, match="numba"):
        algorithms_benchmark.main(["--backends", "numba"])
    with pytest.raises(SystemExit) as e:
        algorithms_benchmark.main(["--robust", "--k", "6"])
    assert e.value.code == 2 and "needs --k >= 7" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentTypeError):
        gpu_benchmark._variants("4,4x2")
    assert gpu_benchmark._variants("1x2,4x2") == [(1, 2), (4, 2)]


def test_the_robust_rows_time_and_measure_every_rule_and_its_flower_peer():
    """The robust rows gave no peak memory (the issue asks for it, measured, beside Flower's), and no test ran them."""
    pytest.importorskip("flwr")
    from jitkernels import algorithms_benchmark as ab

    wl = jb.make_workload(4096, 4, 7)
    backends = [b for b in ("cpp", "numba") if jk.available_backends()[b] is True]
    rows = ab.bench_robust(wl, jb.Probe(mb=1), backends)
    ab._ratios(rows)
    methods = [r["method"] for r in rows]
    for rule in ("median", "trimmed mean 0.2"):
        assert [r["backend"] for r in rows if r["method"] == f"robust {rule}"] == backends
        assert f"robust {rule}: Flower" in methods
    assert "robust geometric median (2 passes)" in methods and "robust Krum f=2: Flower" in methods
    for r in rows:
        assert r["time_s"] > 0 and r["traced_peak_bytes"] is not None
        if sys.platform.startswith("linux"):
            assert r["rss_peak_bytes"] is not None
        assert (r["speedup"] is None) == (r["method"].endswith(("Flower", "(SSYRK)")) or "geometric" in r["method"])
    if "cpp" in backends:  # the round cases, which bench/test_algorithms_bench.py times too: each call a new round
        cases = {(c.key, c.backend): c for c in ab.round_cases(wl, "cpp")}
        assert set(cases) == {("FedAdam", "cpp"), ("FedAdam: Flower", "flwr"), ("FedAvg", "cpp"),
                              ("FedAvg: Flower", "flwr")}
        for c in cases.values():
            assert c.fn() is not None and c.fn()[0] is not None


def test_the_clipping_rows_say_whether_admission_was_fused(monkeypatch):
    """The FedAvg row read "(fused admission)" and counted one pass over the updates on every backend, where only cpp
    fuses admission into the fold: numba's and numpy's read the updates twice, and their fraction of roofline was
    understated by half."""
    from jitkernels import algorithms_benchmark as ab

    probe = jb.Probe(mb=1)
    wl = jb.make_workload(4096, 4, 3)
    for backend in [b for b in ("cpp", "numba", "numpy") if jk.available_backends()[b] is True]:
        fedavg = ab.bench_clipping(wl, probe, backend)[0]
        fused = backend == "cpp"
        assert fedavg["method"].endswith("(fused admission)") == fused
        assert fedavg["bytes"] == (1 if fused else 2) * (3 * 4096 * 4 + 4 * 4096) + 8 * 4096


def test_benchmark_sizes_are_checked_before_any_is_measured_and_rows_compare_like_with_like(capsys, monkeypatch):
    """jk.bench's sizes were not checked: a k = 0 second size divided by zero after the first was measured (every row
    lost). The clipped fold's ratio looked FedAvg's row up by cpp's name, and was blank on another first backend. The
    GPU comparison's --plot wrote nothing without a GPU, silently. The deterministic kernels compiled inside their
    row's memory pass (numba's compiler counted as the row's peak memory on a first run)."""
    from jitkernels import algorithms_benchmark as ab
    from jitkernels import gpu_benchmark as gb

    measured = []
    monkeypatch.setattr(jb, "make_workload", lambda *a, **k: measured.append(a))
    for bad in ((200, 5, 0), (200, 0, 3), (5, 10, 1), (200, 5), (200.0, 5, 3)):
        with pytest.raises(ValueError, match="LEAVES"):
            jk.bench(sizes=[(200, 5, 3), bad], progress=False)
    assert measured == []
    monkeypatch.undo()
    rows = [{"method": m, "backend": "numba", "time_s": t} for m, t in
            (("fold_many raw: FedAvg", 1.0), ("fold_many raw: DP fixed clipping", 4.0))]
    ab._ratios(rows)
    assert rows[1]["speedup"] == 0.25
    gb.plot({"rows": [{"fraction_of_ceiling": None}]}, "nowhere.png")
    assert "plot skipped" in capsys.readouterr().err
    if jk.available_backends()["numba"] is True:
        from jitkernels.backends import numba_kernels

        jb._warm_up(["numba"], ["float32"])
        assert numba_kernels._fold_binned.signatures
