"""The simulator: common random numbers, reproducible runs, TOML workloads, and the jitagg command."""

import json

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
    wl, _ = tiny
    r1, r2 = simulate(wl, "jit"), simulate(wl, "jit")
    assert r1.deployed_s == r2.deployed_s and r1.latencies == r2.latencies
    out = compare(wl)
    rows = out["policies"]
    assert rows["eager"]["saving_vs_eager"] == 0.0
    assert rows["lazy"]["aggregator_s"] <= rows["jit"]["aggregator_s"] <= rows["eager"]["aggregator_s"]
    assert all(r["rounds"] == 12 for r in rows.values())


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
    wl, _ = tiny
    r = simulate(wl, "lazy", real=True)
    assert r.real_busy_s is not None and r.real_busy_s > 0 and r.rounds == 12


def test_jitagg_simulate_writes_table_png_and_json(tiny, tmp_path, capsys):
    _, path = tiny
    out = tmp_path / "out"
    assert cli.main(["simulate", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eager" in printed and "jit captures" in printed
    data = json.loads((out / "simulate_tiny.json").read_text())
    assert set(data["policies"]) == {"eager", "lazy", "jit", "oracle"}
    assert (out / "simulate_tiny.png").stat().st_size > 1000


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
    assert (out / "sweep.png").stat().st_size > 1000


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
