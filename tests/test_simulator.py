"""The simulator: common random numbers, reproducible runs, TOML workloads, and the jitagg command."""

import json
import sys
from dataclasses import replace

import numpy as np
import pytest

from scheduler import cli
from scheduler.simulator import Arrivals, JobSpec, Workload, compare, risk_bound, simulate, sweep_workload

SMALL = """
name = "tiny"
seed = 5
slots = 1
startup_s = 5.0
[cost.cpu]
throughput_Bps = 1.0e9
call_s = 0.0
[[jobs]]
name = "a"
count = 2
model_params = 1_000_000
parties = 6
quorum = 0.5
rounds = 6
response_s = 100.0
jitter_cv = 0.1
intermittent = 0.5
availability = 0.8
"""


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(SMALL)
    return Workload.from_toml(path), path


def test_draws_do_not_depend_on_policy_or_call_order():
    spec = JobSpec(parties=50, intermittent=0.3, availability=0.7, dropout=0.05)
    a, b = Arrivals(1, 7, spec), Arrivals(1, 7, spec)
    for r in (3, 0, 5):  # asked in any order, round r's draws are the same
        ia, ta = a.round(r)
        ib, tb = b.round(r)
        assert np.array_equal(ia, ib) and np.array_equal(ta, tb)
    assert not np.array_equal(a.round(0)[1], a.round(1)[1])


def test_runs_repeat_exactly_and_membership_is_shared(tiny):
    """Runs repeat bit for bit, and every policy's rounds have the same members: the first q of the round's draws
    (quorum 0.5 of 6 intermittent parties, so members are a choice the draws make, not all parties)."""
    wl, _ = tiny
    r1, r2 = simulate(wl, "jit"), simulate(wl, "jit")
    assert r1.deployed_s == r2.deployed_s and r1.latencies == r2.latencies
    out = compare(wl, members=True)
    rows = out["policies"]
    assert rows["eager"]["saving_vs_eager"] == 0.0
    assert rows["lazy"]["aggregator_s"] <= rows["jit"]["aggregator_s"] <= rows["eager"]["aggregator_s"]
    assert all(r["rounds"] == 12 for r in rows.values())
    members = {p: r.members for p, r in out["results"].items()}
    assert len(members["eager"]) == 12 and all(len(m) == 3 for m in members["eager"].values())
    assert len(set(members["eager"].values())) > 1  # (the draws choose them)
    for (jid, r), m in members["eager"].items():
        idx, t = Arrivals(wl.seed, int(jid.rsplit("-", 1)[1]), wl.jobs[0]).round(r)
        assert m == frozenset(idx[np.argsort(t, kind="stable")][:3].tolist())
        assert all(members[p][(jid, r)] == m for p in members)


def test_unknown_keys_in_workload_files_are_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(SMALL.replace("parties = 6", "partys = 6"))
    with pytest.raises(ValueError, match="partys"):
        Workload.from_toml(bad)


def test_builtin_mixes_load():
    for name in ("mixed", "cross_silo", "cross_device"):
        wl = Workload.builtin(name)
        assert wl.jobs and wl.slots >= 1


def test_real_mode_folds_real_arrays(tiny):
    """--real: the kernels' measured busy time beside the cost model's estimate of the same work (the jobs sized by
    the arrays folded: the estimate was of the full model's bytes, the measurement of the scaled one's)."""
    wl, _ = tiny
    r = simulate(wl, "lazy", real=True)
    assert r.real_busy_s is not None and r.real_busy_s > 0 and r.rounds == 12
    cost = wl.cost_model()  # 12 rounds of 3 updates of 1M float32, folded and finalized
    want = 12 * (cost.fold_s(3 * 4_000_000, 3, 1_000_000) + cost.finalize_s(1_000_000))
    assert r.model_busy_s == pytest.approx(want, rel=0.05)
    assert r.summary()["model_busy_s"] == r.model_busy_s


def test_waits_for_buffer_room_count_as_added_latency():
    """Under a byte budget an update refused for room (Backpressure) retries every second: lazy, which holds the
    round's updates, met its quorum 25-38 s after the drawn one and reported 0.02 s of added latency (measured from
    the accepted retry). Added latency now runs from the drawn quorum time."""
    from scheduler.simulator import JobSpec

    spec = JobSpec(name="a", model_params=1_000_000, parties=6, quorum=0.5, rounds=3, response_s=100.0,
                   jitter_cv=0.3, party_spread=0.3)
    wl = Workload(name="bp", seed=2, slots=1, startup_s=60.0, byte_budget=6_000_000,
                  cost={"cpu": {"throughput_Bps": 1e9, "call_s": 0.0}}, jobs=[spec])
    lazy, eager = simulate(wl, "lazy"), simulate(wl, "eager")
    assert min(lazy.latencies) > 20.0 and max(eager.latencies) < 1.0


def test_a_run_in_which_every_round_fails_is_refused_not_a_saving():
    """Deadlines shorter than the responses: no round made a model, and compare() reported a 100% saving and a p95
    added latency of 0."""
    from scheduler.simulator import JobSpec

    spec = JobSpec(name="a", model_params=1_000_000, parties=4, quorum=1.0, rounds=5, response_s=100.0,
                   jitter_cv=0.0, party_spread=0.0, deadline_s=50.0)
    wl = Workload(name="dl", seed=1, slots=1, startup_s=20.0, cost={"cpu": {"throughput_Bps": 1e9, "call_s": 0.0}},
                  jobs=[spec])
    with pytest.raises(ValueError, match="no round made a model"):
        compare(wl)
    assert np.isnan(simulate(wl, "lazy").summary()["latency_p95_s"])


@pytest.mark.parametrize("cv", [0.05, 0.5])
def test_the_sweeps_rho_is_that_of_the_rounds_it_runs(cv):
    """A round lasts until its quorum's last response; the sweep sized its rounds by the mean response time, so
    (work + start-up) / round time was 0.23 in the "0.3" cell at CV 0.05 and lower still at CV 0.5. Measured on
    eager's run: the share of a round one deployment needs is the cell's rho, whatever the jitter."""
    wl = sweep_workload(0.3, cv, rounds=100)
    r = simulate(wl, "eager")
    cost = wl.cost_model()
    spec = wl.jobs[0]
    need = cost.fold_s(10 * spec.model_params * 4, 10, spec.model_params) + cost.finalize_s(spec.model_params) \
        + wl.startup_s
    assert need / (r.makespan_s / spec.rounds) == pytest.approx(0.3, rel=0.06)


def test_jitagg_simulate_writes_table_png_and_json(tiny, tmp_path, capsys):
    _, path = tiny
    out = tmp_path / "out"
    assert cli.main(["simulate", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eager" in printed and "jit captures" in printed
    data = json.loads((out / "simulate_tiny.json").read_text())
    assert set(data["policies"]) == {"eager", "lazy", "jit", "oracle"}
    assert (out / "simulate_tiny.png").stat().st_size > 1000


def test_without_matplotlib_the_figures_and_json_are_written_and_the_plot_skipped(tiny, tmp_path, capsys,
                                                                                 monkeypatch):
    """matplotlib is the bench extra's: a plain install ran the simulation, wrote the JSON, then died in the plot."""
    _, path = tiny
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # (its import raises ImportError)
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr()
    assert "plot skipped: matplotlib is not installed" in printed.err and "simulate_tiny.png" not in printed.out
    assert json.loads((tmp_path / "simulate_tiny.json").read_text())["policies"]
    assert not (tmp_path / "simulate_tiny.png").exists()


def test_jitagg_sweep_reports_each_bar_per_cell(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "--rho", "0.01", "--cv", "0.05,0.2", "--rounds", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "share of oracle's saving" in printed and "share of lazy's saving" in printed
    cells = json.loads((out / "sweep.json").read_text())
    assert [(c["rho"], c["jitter_cv"]) for c in cells] == [(0.01, 0.05), (0.01, 0.2)]
    for c in cells:
        assert {"eager", "lazy", "jit", "oracle"} <= set(c)
        assert 0.0 <= c["jit"]["capture_of_oracle_saving"] <= 1.0 + 1e-9
        assert all(c[p]["rounds"] == 6 for p in ("eager", "lazy", "jit", "oracle"))
        assert 0.0 < c["jit"]["risk_bound_of_oracle_saving"] <= 1.0
        # the run's speed apart, as simulate's JSON keeps it (it sat among the figures: two runs of a seed differed)
        assert not {"wall_s", "events_per_s"} & set(c["jit"]) and c["timing"]["jit"]["wall_s"] > 0
    assert (out / "sweep.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["out_is_a_file", "cost_not_a_table", "jobs_as_one_table", "budget_below_an_update",
                                  "missing_file", "not_toml", "json_is_a_folder", "too_deep", "speeds_underflow",
                                  "count_past_a_run", "model_past_a_run", "availability_without_intermittent",
                                  "window_open_without_window", "backend_not_a_str", "misspelled_job_key",
                                  "response_past_a_run", "windows_always_open"])
def test_jitagg_refuses_bad_inputs_before_the_run_in_one_line(case, tmp_path):
    """These failed after the whole run (--out a file, a folder where the JSON goes), or as tracebacks
    (AttributeError for cost = 5, the letters of [jobs]' keys as unknown keys, an InvalidJob from inside the run,
    FileNotFoundError, TOMLDecodeError, RecursionError; ZeroDivisionError after the run where a party_spread of 40
    made every response time 0; OverflowError for model_params = 1e308), or hung (count = 1e12)."""
    import time

    body, out, match = SMALL, tmp_path / "out", None
    if case == "out_is_a_file":
        out.write_text("a file")
        match = "cannot be the output folder"
    elif case == "json_is_a_folder":
        (out / "simulate_tiny.json").mkdir(parents=True)
        match = "is a folder, where the output file goes"
    elif case == "too_deep":
        body, match = "name = " + "[" * 100_000 + "]" * 100_000 + "\n" + SMALL, "TOML nested too deep"
    elif case == "speeds_underflow":
        body, match = SMALL + "party_spread = 40\n", "party_spread = 40 is out of range"
    elif case == "count_past_a_run":
        body, match = SMALL.replace("count = 2", "count = 1e12"), "past the 1e\\+04 jobs and 1e\\+08 events"
    elif case == "model_past_a_run":
        body, match = SMALL.replace("model_params = 1_000_000", "model_params = 1e308"), \
            r"model_params = 1000000000000000010979063629440455417\.\.\. is out of range"
    elif case == "cost_not_a_table":
        body, match = "cost = 5\n" + SMALL.replace("[cost.cpu]\nthroughput_Bps = 1.0e9\ncall_s = 0.0\n", ""), \
            "cost is a table per backend"
    elif case == "jobs_as_one_table":
        body, match = SMALL.replace("[[jobs]]", "[jobs]"), r"jobs are tables \[\[jobs\]\]"
    elif case == "budget_below_an_update":
        body, match = "byte_budget = 1000\n" + SMALL, "one update .* is larger than byte_budget = 1000"
    elif case == "not_toml":
        body, match = "name = = 1\n", "not TOML"
    # keys that change nothing where the job has no intermittent parties (or no windows) ran as the defaults
    elif case == "availability_without_intermittent":
        body, match = SMALL.replace("intermittent = 0.5\n", ""), \
            "job 'a': availability = 0.8 applies to intermittent parties' availability, and intermittent = 0"
    elif case == "window_open_without_window":
        body, match = SMALL + "window_open = 0.5\n", "job 'a': window_open = 0.5 applies .*, and window_s = 0"
    elif case == "backend_not_a_str":  # ("unhashable type: 'list'", naming no key)
        body, match = "backend = [1]\n" + SMALL, r"backend = \[1\] is not a string"
    elif case == "misspelled_job_key":  # (the job was not named)
        body, match = SMALL + "quorom = 0.5\n", r"job 'a': unknown job keys \['quorom'\]"
    elif case == "windows_always_open":
        body, match = SMALL + "window_s = 600.0\n", "job 'a': window_s = 600.0 applies .*, and window_open = 1"
    elif case == "response_past_a_run":
        body, match = SMALL.replace("response_s = 100.0", "response_s = 1e300"), r"response_s = 1e\+300 is out of range"
    path = tmp_path / "w.toml"
    if case != "missing_file":
        path.write_text(body)
    match = match or "No such file"
    t0 = time.perf_counter()
    with pytest.raises(SystemExit, match=match):
        cli.main(["simulate", "--config", str(path), "--out", str(out)])
    assert time.perf_counter() - t0 < 5.0  # (before the run)


def test_jitagg_writes_files_named_after_any_workload_and_takes_a_float_budget(tmp_path):
    """A workload named "a/b" crashed after the run (its file name named a folder); byte_budget = 16e9 (TOML's
    float) was "out of range" where model_params = 1e6 was taken."""
    path = tmp_path / "w.toml"
    path.write_text(SMALL.replace('name = "tiny"', 'name = "a/b"\nbyte_budget = 16e9').replace("rounds = 6",
                                                                                                "rounds = 2"))
    assert Workload.from_toml(path).byte_budget == 16_000_000_000
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path / "o"), "--policies", "eager"]) == 0
    assert (tmp_path / "o" / f"simulate_{cli._file_name('a/b')}.json").exists()
    assert cli._file_name("a/b").startswith("a_b-")  # (and a hash: "a_b" is another workload's name)


def test_workloads_and_cost_models_refuse_values_a_run_cannot_use(tmp_path):
    """A quorum of 1.5 used to run and report a 100% saving over zero rounds; an empty config divided by zero; a
    cost file with a zero throughput or no entry for its backend loaded."""
    from scheduler import BackendCost, CostModel

    for body, what in (("", "no jobs"), ("[[jobs]]\nquorum = 1.5\n", "quorum"), ("[[jobs]]\nparties = -3\n", "parties"),
                       ("[[jobs]]\nresponse_s = 0\n", "response_s"), ("backend = 'gpu'\n[[jobs]]\n", "'gpu'"),
                       ("byte_budget = 0\n[[jobs]]\n", "byte_budget"), ("slots = 1.5\n[[jobs]]\n", "slots"),
                       ("seed = -1\n[[jobs]]\n", "seed"), ("alpha = 1.5\n[[jobs]]\n", "alpha"),
                       ("[[jobs]]\nrounds = 2.5\n", "rounds"), ("[[jobs]]\nresponse_s = inf\n", "response_s"),
                       ("[[jobs]]\npriority = 'high'\n", "priority"),
                       ("[[jobs]]\nname = 'a'\n[[jobs]]\nname = 'a'\n", "unique"),
                       ("[cost.cpu]\nthroughput = 1e9\n[[jobs]]\n", "throughput")):
        p = tmp_path / "w.toml"
        p.write_text(body)
        with pytest.raises(ValueError, match=what):
            Workload.from_toml(p)
    with pytest.raises(ValueError, match="throughput_Bps"):
        BackendCost(0.0)
    with pytest.raises(ValueError, match="no cost entry"):
        CostModel(backends={"cpu": BackendCost(1e9)}, backend="cupy")
    with pytest.raises(ValueError, match="acc_itemsize"):
        CostModel(acc_itemsize=-4)
    (tmp_path / "w.toml").write_text("[[jobs]]\nmodel_params = 1e6\n")  # TOML's float for a count: taken
    assert Workload.from_toml(tmp_path / "w.toml").jobs[0].model_params == 1_000_000
    CostModel().save(tmp_path / "new" / "dir" / "cost.json")  # the folder is made
    assert CostModel.load(tmp_path / "new" / "dir" / "cost.json").backend == "cpu"


def test_simulate_takes_a_calibrated_cost_file(tmp_path, capsys):
    """`jitagg calibrate` writes a cost file; `simulate --cost` reads it back (it was written and never reused):
    a slower kernel gives more busy time on the same draws."""
    from scheduler import BackendCost, CostModel

    cfg = tmp_path / "w.toml"
    cfg.write_text("[[jobs]]\nparties = 4\nrounds = 3\nresponse_s = 50\nmodel_params = 1000000\n")
    slow = tmp_path / "slow.json"
    CostModel(backends={"cpu": BackendCost(1e6)}, backend="cpu").save(slow)
    busy = []
    for extra in ([], ["--cost", str(slow)]):
        assert cli.main(["simulate", "--config", str(cfg), "--policies", "eager", "--out", str(tmp_path / "o"),
                         *extra]) == 0
        busy.append(json.loads((tmp_path / "o" / "simulate_workload.json").read_text())["policies"]["eager"]["busy_s"])
    assert busy[1] > 10 * busy[0]


def test_quorum_quantile_of_the_true_model():
    """One party, no spread: the quorum time is its log-normal response time, whose alpha-quantile is known."""
    spec = JobSpec(parties=1, quorum=1.0, response_s=100.0, jitter_cv=0.2, party_spread=0.0)
    s = np.sqrt(np.log1p(0.2 ** 2))
    want = 100.0 * np.exp(-s * s / 2 + s * -1.6448536)
    assert Arrivals(0, 0, spec).quorum_quantile(0, 1, 0.05, draws=200_000) == pytest.approx(want, rel=0.01)
    gone = JobSpec(parties=2, quorum=1.0, dropout=1.0)  # both leave in round 0: no quorum
    assert np.isinf(Arrivals(0, 0, gone).quorum_quantile(3, 2, 0.05))


def test_risk_bound_is_the_price_of_the_risk_alpha():
    """Without jitter a known distribution is the round's draw: the bound keeps all of oracle's saving. With
    jitter it keeps less, more at a larger alpha (less margin); JIT, which learns the distributions, stays near it."""
    flat = sweep_workload(0.01, 1e-4, rounds=8)
    assert risk_bound(flat, compare(flat, ("eager", "oracle"))) > 0.999
    wl = sweep_workload(0.01, 0.2, rounds=30)
    out = compare(wl, ("eager", "jit", "oracle"))
    b05 = risk_bound(wl, out)
    wl.alpha = 0.2
    assert b05 < risk_bound(wl, out) < 1.0
    assert abs(out["policies"]["jit"]["capture_of_oracle_saving"] - b05) < 0.05


def test_the_oracle_knows_round_0_and_parties_that_leave_end_their_rounds():
    """The oracle's round 0 was planned before its truth was drawn (it behaved as lazy); a round that dropouts make
    unreachable ended only by a deadline (the job stalled, and compare reported eager's idle time as savings); a
    round that can never end is an error, not a result."""
    spec = JobSpec(name="a", model_params=1_000_000, parties=2, quorum=1.0, rounds=2, response_s=100.0,
                   jitter_cv=0.0, party_spread=0.0)
    wl = Workload(name="two", seed=1, slots=1, startup_s=20.0, jobs=[spec])
    assert simulate(wl, "oracle").latencies == pytest.approx(simulate(wl, "eager").latencies, abs=0.1)
    drop = JobSpec(name="d", model_params=1_000_000, parties=20, quorum=0.5, rounds=20, response_s=100.0,
                   dropout=0.1)
    out = compare(Workload(name="dropout", seed=0, slots=1, startup_s=20.0, jobs=[drop]))
    for row in out["policies"].values():  # every round ended (compare checks): some of them unreachable
        assert row["unreachable_rounds"] >= 1
    stuck = JobSpec(name="s", model_params=1_000_000, parties=4, quorum=1.0, rounds=3, response_s=100.0,
                    intermittent=1.0, availability=0.5)
    with pytest.raises(ValueError, match="could not reach its quorum"):
        compare(Workload(name="stuck", seed=0, slots=1, startup_s=20.0, jobs=[stuck]))


def test_sweep_sizes_its_rounds_with_the_cost_model_it_runs():
    from scheduler import BackendCost, CostModel

    slow = CostModel(backends={"cpu": BackendCost(1e8, 0.0)})
    # (work + start-up) / round time: the slow kernels' work moves the round time (the start-up stays 5 s)
    assert sweep_workload(0.3, 0.1, cost=slow).jobs[0].response_s > 3 * sweep_workload(0.3, 0.1).jobs[0].response_s
    with pytest.raises(ValueError, match="rho"):
        sweep_workload(0.0, 0.1)


def test_the_expected_quorum_time_counts_the_draws_that_reach_the_quorum():
    """Intermittent parties miss a quorum of all of them in some draws: their inf made the mean inf, and a
    workload's rho 0."""
    spec = JobSpec(parties=10, quorum=1.0, intermittent=0.5, availability=0.9, response_s=100.0, jitter_cv=0.1)
    a = Arrivals(3, 0, spec)
    assert 100.0 < a.mean_quorum_time(10, 4000) < 300.0
    assert a.mean_quorum_time(11, 100) == float("inf")


def test_availability_windows_delay_the_parties_outside_them():
    """An intermittent party is online window_open of every window_s seconds: a round that opens while it is offline
    gets its answer only after its window opens. Without windows the draws are those of before (their own
    generator); with them every policy still sees the same draws, and the round's members are decided by them."""
    spec = JobSpec(parties=8, quorum=0.5, intermittent=1.0, response_s=10.0, jitter_cv=0.0, party_spread=0.0,
                   window_s=100.0, window_open=0.3)
    a = Arrivals(4, 0, spec)
    idx = np.arange(8)
    for t in (0.0, 37.0, 81.5):
        w = a.waits(idx, t)
        pos = (t - a.phase) % 100.0
        offline = a.intermittent & (pos >= 30.0)
        assert np.array_equal(w > 0, offline) and np.allclose((pos + w)[offline], 100.0)
    plain = Arrivals(4, 0, JobSpec(parties=8, quorum=0.5, intermittent=0.5, response_s=10.0))
    assert not plain.waits(idx, 50.0).any()
    assert a.mean_quorum_time(4, 2000) > 10.0 == Arrivals(4, 0, replace(spec, window_s=0.0)).mean_quorum_time(4, 2000)
    wl = Workload(name="w", seed=4, slots=1, startup_s=1.0, cost={"cpu": {"throughput_Bps": 1e9, "call_s": 0.0}},
                  jobs=[replace(spec, rounds=6, name="a")])
    windowed = simulate(wl, "eager")
    flat = simulate(replace(wl, jobs=[replace(spec, rounds=6, name="a", window_s=0.0)]), "eager")
    assert windowed.rounds == flat.rounds == 6 and windowed.makespan_s > flat.makespan_s


def test_the_example_workloads_load():
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "cross_device_windows.toml")
    spec = Workload.from_toml(path).jobs[0]
    assert spec.window_s == 600.0 and spec.window_open == 0.5 and spec.intermittent > 0
    scale = Workload.from_toml(os.path.join(os.path.dirname(path), "scale_1000_jobs.toml"))
    assert [(j.count, j.parties, j.rounds) for j in scale.jobs] == [(1000, 1000, 10)] and scale.slots == 200


def test_rounds_cut_by_their_deadline_take_their_latency_from_it():
    """A partial round (the simulator's jobs end unreachable rounds with what came) ended at its deadline, before its
    drawn quorum time: its added latency came out negative (eager p50 -60 s); a round whose draws never reach the
    quorum made a model and had no latency, so compare refused the run as one without models. Membership is fixed at
    the deadline where it comes first: the scheduler's own figures, exactly."""
    import scheduler.simulator as sim
    from scheduler.core import JITScheduler

    made = []
    real = JITScheduler.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        made.append(self)

    spec = JobSpec(name="dl", model_params=1_000_000, parties=10, quorum=1.0, rounds=20, response_s=60.0,
                   jitter_cv=0.3, deadline_s=75.0)
    wl = Workload(name="dl", jobs=[spec], slots=1, startup_s=5.0)
    try:
        sim.JITScheduler.__init__ = init
        r = simulate(wl, "eager")
    finally:
        sim.JITScheduler.__init__ = real
    theirs = [x for js in made[-1].jobs.values() for x in js.metrics.latencies]
    assert r.misses > 0 and min(r.latencies) >= 0.0 and r.latencies == pytest.approx(theirs, abs=1e-9)
    flaky = JobSpec(name="flaky", model_params=1_000_000, parties=10, quorum=1.0, rounds=10, response_s=30.0,
                    jitter_cv=0.2, intermittent=1.0, availability=0.5, deadline_s=120.0)
    out = compare(Workload(name="flaky", jobs=[flaky], slots=1, startup_s=5.0), ["eager", "jit"])
    assert len(out["results"]["eager"].latencies) == 10


@pytest.mark.parametrize("case", ["no_quorum_drawn", "quorum_after_the_deadline"])
def test_the_oracle_is_ready_when_a_deadline_ends_the_round(case):
    """The oracle planned on the drawn quorum time alone: a round that its deadline ended (the partial rule) with no
    quorum drawn stalled the oracle for good (compare refused the run: "had no deadline"), and one whose drawn
    quorum came after the deadline deployed after it (latency 40-92 s against lazy's 5). It now knows the round
    ends at min(quorum, deadline): ready then, as late as lazy is early, at lazy's cost."""
    spec = JobSpec(name="j", parties=4, quorum=1.0, rounds=6, response_s=60.0, model_params=100_000,
                   **({"intermittent": 1.0, "availability": 0.6, "deadline_s": 200.0} if case == "no_quorum_drawn"
                      else {"party_spread": 0.5, "jitter_cv": 0.3, "deadline_s": 55.0}))
    out = compare(Workload(name="od", seed=3, slots=1, startup_s=5.0, jobs=[spec]))
    oracle, lazy = out["results"]["oracle"], out["results"]["lazy"]
    assert oracle.ended == lazy.ended == 6 and max(oracle.latencies) < 1e-3 and min(lazy.latencies) >= 5.0
    assert oracle.deployed_s == pytest.approx(lazy.deployed_s, abs=1e-2)  # (lazy's start-ups, a finalize apart)


def test_workloads_refuse_names_and_spreads_that_fail_after_the_run(tmp_path):
    """A workload named 5 ran every policy and then failed to name its files; jobs named 5 and "5" both became job
    "5-0" (InvalidJob from inside the run); jitter_cv = 1e200 overflowed every policy's draws."""
    for body, what in (("name = 5\n[[jobs]]\n", "name = 5 is not a string"),
                       ("[[jobs]]\nname = 5\n[[jobs]]\nname = '5'\n", "job name 5 is not a string"),
                       ("[[jobs]]\njitter_cv = 1e200\n", "jitter_cv"), ("[[jobs]]\nparty_spread = 1e200\n",
                                                                        "party_spread")):
        p = tmp_path / "w.toml"
        p.write_text(body)
        with pytest.raises(ValueError, match=what):
            Workload.from_toml(p)


def test_real_mode_refuses_a_budget_its_float32_updates_do_not_fit():
    """--real folds float32 arrays (4 bytes a parameter): a workload of 1-byte parameters within its budget ran
    modelled, and --real died inside the run with InvalidJob."""
    spec = JobSpec(name="a", parties=2, quorum=1.0, rounds=1, response_s=10.0, model_params=10_000, bytes_per_param=1)
    wl = Workload(name="rb", jobs=[spec], slots=1, byte_budget=20_000)
    wl.check()
    with pytest.raises(ValueError, match="--real: job 'a' folds float32 updates of 40000 bytes"):
        simulate(wl, "eager", real=True)


def test_jitagg_reports_runs_it_cannot_compare_and_bad_cost_files_in_one_line(tmp_path):
    """compare's refusal (rounds that stall) and a cost file without its backends came out as tracebacks."""
    path = tmp_path / "w.toml"  # every party intermittent, a quorum of all, no deadline: rounds that never end
    path.write_text(SMALL.replace("quorum = 0.5", "quorum = 1.0").replace("intermittent = 0.5", "intermittent = 1.0")
                    .replace("availability = 0.8", "availability = 0.3"))
    with pytest.raises(SystemExit, match="jitagg simulate: workload 'tiny': rounds ended"):
        cli.main(["simulate", "--config", str(path), "--policies", "eager", "--out", str(tmp_path)])
    (tmp_path / "cost.json").write_text('{"startup_s": 1.0}')
    with pytest.raises(SystemExit, match="needs backends and backend"):
        cli.main(["simulate", "--config", str(path), "--cost", str(tmp_path / "cost.json"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="needs backends and backend"):
        cli.main(["sweep", "--cost", str(tmp_path / "cost.json"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="comma-separated --rho"):
        cli.main(["sweep", "--rho", "x", "--out", str(tmp_path)])


def test_per_job_latency_of_a_job_without_models_is_nan_not_zero():
    """JobMetrics.summary reported p50/p95 0 s for a job whose every round failed: a perfect latency."""
    from scheduler.core import JobMetrics

    m = JobMetrics(rounds=0, unreachable=3).summary()
    assert np.isnan(m["latency_p50_s"]) and np.isnan(m["latency_p95_s"])
    assert JobMetrics(latencies=[2.0]).summary()["latency_p95_s"] == 2.0


def test_a_slot_taken_back_under_memory_pressure_goes_to_the_job_it_was_taken_for(tmp_path):
    """An idle deployment preempted because the byte budget was full went to the queue's first job by laxity, which
    often had nothing buffered, became the next idle victim within milliseconds, and so on: on this 6-job mix JIT
    made 2,436 deployments in 30 rounds and the oracle 23,173 (more aggregator-seconds than lazy, 4 misses)."""
    path = tmp_path / "multi.toml"
    path.write_text('name = "multi"\nseed = 3\nslots = 2\nstartup_s = 20.0\nbyte_budget = 40_000_000\n'
                    '[cost.cpu]\nthroughput_Bps = 1e8\n'
                    '[[jobs]]\nname = "a"\ncount = 3\nmodel_params = 1_000_000\nparties = 20\nquorum = 0.6\n'
                    'rounds = 5\nresponse_s = 100.0\njitter_cv = 0.3\nintermittent = 0.5\navailability = 0.7\n'
                    '[[jobs]]\nname = "b"\ncount = 3\nmodel_params = 2_000_000\nparties = 8\nrounds = 5\n'
                    'response_s = 150.0\ndeadline_s = 400.0\n')
    w = Workload.from_toml(path)
    lazy = simulate(w, "lazy")
    for policy in ("jit", "oracle"):
        r = simulate(w, policy)
        assert r.rounds == 30 and sum(v["deployments"] for v in r.per_job.values()) <= 3 * r.rounds, policy
        assert r.deployed_s < 1.05 * lazy.deployed_s and r.misses <= 1, policy


def test_jitagg_json_is_strict_and_one_seed_writes_the_same_figures(tmp_path):
    """A job whose rounds all failed had NaN latencies, written as NaN (not JSON: strict parsers refuse it); the
    run's own wall time and events per second sat among the figures, so two runs of one seed never diffed equal."""
    path = tmp_path / "w.toml"
    path.write_text(SMALL + '[[jobs]]\nname = "late"\nmodel_params = 1000\nparties = 3\nrounds = 2\n'
                    'response_s = 100.0\njitter_cv = 0.0\nparty_spread = 0.0\ndeadline_s = 50.0\n')

    def strict(constant):
        raise ValueError(f"not JSON: {constant}")

    runs = []
    for out in ("a", "b"):
        assert cli.main(["simulate", "--config", str(path), "--seed", "5", "--out", str(tmp_path / out),
                         "--policies", "eager,jit"]) == 0
        runs.append(json.loads((tmp_path / out / "simulate_tiny.json").read_text(), parse_constant=strict))
    a, b = runs
    assert a["per_job"]["eager"]["late-0"]["latency_p95_s"] is None
    assert a["timing"]["jit"]["events_per_s"] > 0 and "wall_s" not in a["policies"]["jit"]
    del a["timing"], b["timing"]
    assert a == b


def test_a_runs_totals_sum_its_jobs_and_its_percentiles_are_the_named_ones():
    """Mutation testing found these untested: the run's busy time summed over jobs (the last job's alone passed),
    the p95 of the summaries (p90 passed), the mean quorum time (the median passed), and risk_bound at most 1."""
    from scheduler.core import JobMetrics
    from scheduler.simulator import PolicyResult

    wl = Workload(name="two", seed=1, slots=2, startup_s=5.0,
                  jobs=[JobSpec(name="j", count=2, model_params=100_000, parties=4, rounds=3, response_s=50.0)])
    r = simulate(wl, "eager")
    assert len(r.per_job) == 2 and r.busy_s == pytest.approx(sum(m["busy_s"] for m in r.per_job.values()))
    assert r.deployed_s == pytest.approx(sum(m["deployed_s"] for m in r.per_job.values()))
    lat = list(range(1, 101))
    want = {"latency_p50_s": 50.5, "latency_p95_s": 95.05, "latency_p99_s": 99.01}
    got = PolicyResult("x", 0.0, 0.0, lat, 0, 0, 0, 0, [], 0.0, 0, 1.0).summary()
    assert {k: got[k] for k in want} == pytest.approx(want)
    got = JobMetrics(latencies=lat).summary()
    assert {k: got[k] for k in want} == pytest.approx(want)
    spec = JobSpec(parties=1, quorum=1.0, response_s=100.0, jitter_cv=1.0, party_spread=0.0)
    a = Arrivals(0, 0, spec)
    draws = np.array([a.round(r)[1][0] for r in range(20000)])
    assert a.mean_quorum_time(1) == pytest.approx(draws.mean(), rel=0.03)  # a mean (the median is 70)
    sweep = sweep_workload(0.01, 0.2, rounds=30)
    out = compare(sweep, ("eager", "oracle"))
    sweep.alpha = 0.5
    assert 0.0 <= risk_bound(sweep, out) <= 1.0


STUCK = """
name = "stuck"
seed = 1
slots = 1
startup_s = 0.0
[cost.cpu]
throughput_Bps = 2.0e10
call_s = 5e-5
[[jobs]]
name = "g"
count = 2
model_params = 1_000_000
parties = 20
quorum = 0.9
rounds = 2
response_s = 60.0
intermittent = 1.0
availability = 0.5
"""


def test_jobs_whose_quorum_never_comes_do_not_take_a_slot_from_each_other_for_ever(tmp_path, monkeypatch):
    """Two jobs whose rounds cannot reach their quorum (no deadline), one slot: under JIT each took the idle
    deployment back from the other at its next plan, each conditional quantile a little past the other's, a
    take-back every ~4e-4 x the round's age for ever (the simulation never ended; a server would thrash). A job
    whose deployment was taken back waits for a free slot or its quorum; the run ends, and compare names the stall."""
    from scheduler import simulator

    path = tmp_path / "stuck.toml"
    path.write_text(STUCK)
    wl = Workload.from_toml(path)

    class Bounded(simulator.VirtualClock):  # (the old code's run never ended: bounded here, it fails on its count)
        def run(self, until=None):
            super().run(until=1e5)

    monkeypatch.setattr(simulator, "VirtualClock", Bounded)
    r = simulate(wl, "jit")
    assert r.ended == 0 and r.events < 1000, r.events
    with pytest.raises(ValueError, match="rounds ended .* a round could not reach its quorum and had no deadline"):
        compare(wl)


@pytest.mark.parametrize("args, match", [
    (["--rho", "1e-320"], r"rho=1e-320, cv=0.2: rho = 1e-320 needs rounds of inf s"),
    (["--rho", "0.01", "--rounds", "100000000"], r"rho=0.01, cv=0.2: .* past the 1e\+04 jobs and 1e\+08 events")])
def test_jitagg_sweep_refuses_cells_it_cannot_run_in_one_line(tmp_path, args, match):
    """Arguments its own check took (a finite rho > 0, rounds >= 1) ended in tracebacks from inside the run."""
    with pytest.raises(SystemExit, match=match):
        cli.main(["sweep", "--cv", "0.2", "--out", str(tmp_path), *args])


def test_jitagg_simulate_says_how_many_rounds_made_no_model(tmp_path, capsys):
    """The table's figures are over the rounds that made a model: with 9 of 10 rounds failed for dropouts it showed
    "misses 0" and a 95% saving, the failures in the JSON only."""
    path = tmp_path / "w.toml"
    path.write_text(SMALL.replace("count = 2", "count = 1").replace("rounds = 6", "rounds = 10")
                    .replace("intermittent = 0.5\navailability = 0.8\n", "dropout = 0.5\n"))
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path)]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("rounds that made no model"))
    assert "of 10: eager " in line and "the figures are over the others" in line


def test_jitagg_simulate_tells_rounds_finalized_partial_from_rounds_without_a_model(tmp_path, capsys):
    """The simulator's jobs finalize what came when a quorum becomes unreachable (a deadline): the line counted
    every such round as one that made no model (all 8, where 6 had one and were in the table's figures)."""
    path = tmp_path / "w.toml"
    path.write_text('name = "tiny"\nseed = 5\nslots = 2\nstartup_s = 5.0\n[cost.cpu]\nthroughput_Bps = 2.0e10\n'
                    'call_s = 5e-5\n[[jobs]]\nname = "a"\ncount = 2\nmodel_params = 100_000\nparties = 5\n'
                    'quorum = 0.6\nrounds = 4\ndeadline_s = 45.0\nintermittent = 0.6\navailability = 0.4\n'
                    'response_s = 60.0\njitter_cv = 0.2\nparty_spread = 0.3\n')
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path), "--policies", "eager"]) == 0
    rows = json.loads((tmp_path / "simulate_tiny.json").read_text())["policies"]["eager"]
    lines = capsys.readouterr().out.splitlines()
    none, partial = rows["rounds_without_model"], rows["partial_rounds"]
    assert (none, partial) == (2, 6) and rows["unreachable_rounds"] == 8  # (counted by the scheduler, per round)
    assert f"rounds that made no model, of 8: eager {none};" in "\n".join(lines)
    assert f"finalized with the updates that came, of 8: eager {partial}" in "\n".join(lines)


def test_workload_keys_a_run_cannot_use_are_refused_by_name(tmp_path, capsys, monkeypatch):
    """Review of the jitagg command (2026-11-28): a start-up or a round's aggregation past what a run can time
    (startup_s = 1e308, call_s = 1e308, a throughput of 5e-324) failed inside the run with "response time must be
    finite, got nan", naming no key; intermittent parties that are always available and keep no windows changed
    nothing, unsaid (the mirror case was refused); --cost replaced the workload's acc_itemsize (deterministic mode's
    16 ran as the file's 4); a 300-character name failed to write its files after the whole run; and a run that
    stopped drew its error into the progress bars it left open."""
    from scheduler.cost import BackendCost, CostModel

    def refused(text, match):
        path = tmp_path / "w.toml"
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            Workload.from_toml(path).check()
    refused(SMALL.replace("startup_s = 5.0", "startup_s = 1e308"), r"startup_s = 1e\+308 is past")
    refused(SMALL.replace("call_s = 0.0", "call_s = 1e308"), r"job 'a': a round's aggregation takes .* \[cost.cpu\]")
    refused(SMALL.replace("throughput_Bps = 1.0e9", "throughput_Bps = 5e-324"), r"job 'a': a round's aggregation")
    refused(SMALL.replace("availability = 0.8\n", ""), "intermittent = 0.5 applies .* availability = 1 and window_s")
    wl = Workload.from_toml(_written(tmp_path, SMALL.replace('name = "tiny"', 'name = "tiny"\nacc_itemsize = 16')))
    wl.use_cost(CostModel(backends={"cpu": BackendCost(2e9)}))
    assert wl.acc_itemsize == 16 and wl.cost["cpu"]["throughput_Bps"] == 2e9
    long = "数据" * 60 + "x" * 200  # (file names are limited in bytes: 3 a CJK character)
    path = _written(tmp_path, SMALL.replace('name = "tiny"', f'name = "{long}"').replace("rounds = 6", "rounds = 2"))
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path / "out"), "--policies", "eager"]) == 0
    assert sorted(len(p.name) for p in (tmp_path / "out").iterdir()) == [106, 107]  # .png, .json
    names = ["训练", "测试", "café", "cafè", "mixed", "a/b", "a_b"]  # (a second review: the first four made two names)
    assert len({cli._file_name(n) for n in names}) == len(names) and cli._file_name("mixed") == "mixed"

    bars = []
    real = cli._progress

    def progress(desc):
        update = real(desc)
        bars.append(update)
        return update

    def stalled(wl, policies, real=False, progress=None):
        progress("eager", 1, 8)
        raise ValueError("rounds ended {'eager': 1} of 8")
    monkeypatch.setattr(cli, "_progress", progress)
    monkeypatch.setattr(cli, "compare", stalled)
    with pytest.raises(SystemExit, match="rounds ended"):
        cli.main(["simulate", "--config", str(path), "--out", str(tmp_path / "out")])
    assert bars[0].bars and all(bar.disable for bar in bars[0].bars.values())


def _written(tmp_path, text):
    path = tmp_path / "w.toml"
    path.write_text(text)
    return path


def test_rho_budgets_its_draws_over_the_workloads_jobs(monkeypatch):
    """rho's Monte Carlo quorum times draw 200M response times in all once a workload has more than 100 jobs' worth
    (2M per job drew 2e9 for the issue's 1,000 jobs of 1,000 parties: 32 s beside the simulation); a few jobs keep
    2M each, so the shipped mixes' rho is as it was."""
    from scheduler import simulator
    drawn = []

    def mean_quorum_time(self, q, draws=20_000):
        drawn.append(draws * self.spec.parties)
        return 100.0
    monkeypatch.setattr(Arrivals, "mean_quorum_time", mean_quorum_time)
    many = Workload(name="many", jobs=[JobSpec(name="j", count=1000, parties=1000)])
    simulator.rho(many)
    assert len(drawn) == 1000 and sum(drawn) <= 200_000_000
    drawn.clear()
    mixed = Workload.builtin("mixed")
    simulator.rho(mixed)
    assert drawn and all(d > 2_000_000 - spec.parties for d, (_, _, spec) in zip(drawn, mixed.instances()))


@pytest.mark.parametrize("policy", ["eager", "lazy", "jit", "oracle"])
def test_a_finished_run_is_freed_by_reference_counts(tiny, policy):
    """simulate pauses the cyclic collector; the run's scheduler sat in a reference cycle (a round's future -> its
    driver's done-callback -> the scheduler -> its rounds), which only a full collection after the run freed: ~1 s a
    round of the issue's 1,000-job shape, paid by whatever came next. Nothing cyclic is left now."""
    import gc
    simulate(tiny[0], policy)  # (loads what the run compiles; numba leaves cycles of its own the first time)
    while gc.collect():  # (until nothing is left: a collection's finalizers can leave more, e.g. earlier tests' plots)
        pass
    gc.disable()
    try:
        simulate(tiny[0], policy)
        assert gc.collect() == 0
    finally:
        gc.enable()
