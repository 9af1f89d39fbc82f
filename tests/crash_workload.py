"""The workload of the crash tests: one deterministic job of 6 parties over some rounds, and the expected results.

Run as a script (``crash_workload.py STATE_DIR ACKED ROUNDS``) it is the child process of the kill -9 test: it opens
(or recovers) the state directory, submits the updates not yet acknowledged (those listed in ACKED), prints
``ACK round party`` once an update is durable and ``RESULT <hash>`` when every round is finished.
"""

import hashlib
import sys
import time

import numpy as np

import jitkernels as jk
from scheduler import Job, JITScheduler

PARTIES = [f"p{i}" for i in range(6)]
ROUNDS = 3
SHAPES = {"w": (3000,), "b": (7, 11)}


def template():
    return {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}


def update(r, p):
    rng = np.random.default_rng(1000 * r + PARTIES.index(p))
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def weight(r, p):
    return float(1 + (7 * r + PARTIES.index(p)) % 5)


def algorithm(name="fedavg"):
    """The job's algorithm: FedAvg, or ones whose rounds hand state to the next (a server optimizer's model and
    moments; DP's round counter, which keys the noise)."""
    return {"fedavg": lambda: "fedavg",
            "fedadam": lambda: jk.algorithms.FedAdam(lr=0.05, tau=1e-3),
            "dp": lambda: jk.algorithms.DPFixedClipping(jk.algorithms.FedAvgM(lr=0.5, momentum=0.5), clip_norm=40.0,
                                                        noise_multiplier=0.3, seed=7)}[name]()


def job(rounds=ROUNDS, alg="fedavg"):
    return Job("crash-job", template=template(), parties=PARTIES, quorum=1.0, rounds=rounds, deterministic=True,
               prior_response_s=1.0, algorithm=algorithm(alg))


def order(rounds=ROUNDS):
    return [(r, p) for r in range(rounds) for p in PARTIES]


def expected(rounds=ROUNDS, alg="fedavg"):
    """Each round's model, folded in one batch by a plain aggregator (deterministic: any batching gives it); for
    algorithms that carry state, one aggregator across the rounds."""
    a = jk.algorithms.resolve(algorithm(alg))
    agg = jk.Aggregator(template(), a, deterministic=True, base=template() if a.needs_base else None)
    out = []
    for r in range(rounds):
        agg.fold_many([update(r, p) for p in PARTIES], [weight(r, p) for p in PARTIES], parties=PARTIES)
        out.append(agg.finalize())
        agg.reset()
    return out


def digest(models) -> str:
    h = hashlib.sha256()
    for m in models:
        for n in sorted(m):
            h.update(np.ascontiguousarray(m[n]).tobytes())
    return h.hexdigest()


def child(state_dir, acked_path, rounds):
    with open(acked_path) as f:
        acked = {tuple(line.split()) for line in f if line.strip()}
    # every round's result is asked for at the end: all are kept (with the default 16, a run whose killed
    # predecessors got past round 16 found round 0 forgotten, as it should be)
    sched = JITScheduler(policy="eager", slots=1, state_dir=state_dir, checkpoint_bytes=0, keep_rounds=rounds)
    sched.add_job(job(rounds))
    print("READY", flush=True)
    for r, p in order(rounds):
        if (str(r), p) in acked:
            continue
        ack = sched.submit("crash-job", r, p, update(r, p), weight(r, p), update_id=f"{r}:{p}")
        ack.durable.add_done_callback(
            lambda f, r=r, p=p: f.exception() is None and print(f"ACK {r} {p}", flush=True))
        time.sleep(0.01)
    models = [sched.result("crash-job", r).result(timeout=120) for r in range(rounds)]
    print(f"RESULT {digest(models)}", flush=True)
    sched.close()


if __name__ == "__main__":
    child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
