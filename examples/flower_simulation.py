"""A small Flower federation, end to end, with a jitkernels strategy in Flower's own server loop.

Flower's ``Server`` samples clients, sends them the model, collects their ``FitRes`` and calls the strategy's
``aggregate_fit``; here the strategy is ``jitkernels.integrations.flower.FedAdam`` (or ``--strategy``), which folds
the clients' serialized updates in place and finalizes straight into the new ``Parameters``. The clients run in this
process (Flower's simulation engine would run them as Ray actors; the server side is the same). Each client trains
a softmax regression on its own non-IID shard of a synthetic 10-class problem with a few epochs of SGD.

    python examples/flower_simulation.py                   # jitkernels FedAdam, 8 clients, 10 rounds
    python examples/flower_simulation.py --compare         # the same run with Flower's own strategy, side by side

Prints the accuracy after every round (and, with ``--compare``, the largest difference between the two runs'
models: float32 rounding, the strategies are the same math).
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
from flwr.client import NumPyClient
from flwr.common import (Code, EvaluateRes, FitRes, GetParametersRes, GetPropertiesRes, Status,
                         ndarrays_to_parameters, parameters_to_ndarrays)
from flwr.server import Server, SimpleClientManager
from flwr.server.client_proxy import ClientProxy

import jitkernels.integrations.flower as jkfl

CLASSES, FEATURES = 10, 64


def make_data(n_clients, per_client, seed=0):
    """Gaussian classes; each client sees mostly 3 of them (non-IID), plus a shared test set."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, FEATURES)) * 0.25

    def draw(labels):
        return (centers[labels] + rng.standard_normal((labels.size, FEATURES))).astype(np.float32), labels

    shards = []
    for c in range(n_clients):
        favored = rng.choice(CLASSES, 3, replace=False)
        labels = np.where(rng.random(per_client) < 0.8, rng.choice(favored, per_client),
                          rng.integers(0, CLASSES, per_client))
        shards.append(draw(labels))
    return shards, draw(rng.integers(0, CLASSES, 2000))


def accuracy(params, data):
    w, b = params
    x, y = data
    return float(((x @ w + b).argmax(1) == y).mean())


class SoftmaxClient(NumPyClient):
    def __init__(self, data, seed):
        self.x, self.y = data
        self.rng = np.random.default_rng(seed)

    def fit(self, parameters, config):
        w, b = (p.astype(np.float32).copy() for p in parameters)
        for _ in range(int(config.get("epochs", 2))):
            for idx in np.array_split(self.rng.permutation(len(self.y)), max(1, len(self.y) // 32)):
                z = self.x[idx] @ w + b
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                p[np.arange(idx.size), self.y[idx]] -= 1
                w -= 0.05 * self.x[idx].T @ p / idx.size
                b -= 0.05 * p.mean(0)
        return [w, b], len(self.y), {"train_acc": accuracy([w, b], (self.x, self.y))}

    def evaluate(self, parameters, config):
        return 0.0, len(self.y), {"acc": accuracy(parameters, (self.x, self.y))}


class InProcessProxy(ClientProxy):
    """Flower's ClientProxy over a client in this process (what Ray actors do in Flower's simulation engine)."""

    def __init__(self, cid, client):
        super().__init__(cid)
        self.client = client.to_client()

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(status=Status(Code.OK, ""), properties={})

    def get_parameters(self, ins, timeout, group_id):
        return GetParametersRes(status=Status(Code.OK, ""), parameters=self.client.get_parameters(ins).parameters)

    def fit(self, ins, timeout, group_id) -> FitRes:
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id) -> EvaluateRes:
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def weighted(metrics):
    n = sum(k for k, _ in metrics)
    return {key: sum(k * m[key] for k, m in metrics) / n for key in metrics[0][1]}


def run(strategy_name, flower_own, clients, rounds, seed=0, log_rounds=True):
    shards, test = make_data(clients, 400, seed)
    rng = np.random.default_rng(seed + 1)
    x0 = [(0.01 * rng.standard_normal((FEATURES, CLASSES))).astype(np.float32), np.zeros(CLASSES, np.float32)]
    module = __import__("flwr.server.strategy", fromlist=["x"]) if flower_own else jkfl
    kw = dict(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients, min_available_clients=clients,
              initial_parameters=ndarrays_to_parameters(x0), fit_metrics_aggregation_fn=weighted,
              on_fit_config_fn=lambda r: {"epochs": 2})
    if strategy_name == "FedAdam":
        kw.update(eta=0.05, tau=1e-3)
    strategy = getattr(module, strategy_name)(**kw)
    manager = SimpleClientManager()
    for c in range(clients):
        manager.register(InProcessProxy(str(c), SoftmaxClient(shards[c], seed + c)))
    server = Server(client_manager=manager, strategy=strategy)
    server.set_max_workers(1)  # clients fit in arrival order, so the two runs see the same results
    accs = []
    params = strategy.initialize_parameters(manager)
    server.parameters = params
    for r in range(1, rounds + 1):
        res = server.fit_round(r, timeout=None)
        params, metrics, _ = res
        server.parameters = params
        accs.append(accuracy(parameters_to_ndarrays(params), test))
        if log_rounds:
            print(f"round {r:2d}: test accuracy {accs[-1]:.3f}  train accuracy {metrics['train_acc']:.3f}", flush=True)
    return parameters_to_ndarrays(params), accs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="FedAdam", choices=["FedAvg", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--compare", action="store_true", help="also run Flower's own strategy and compare")
    a = p.parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    print(f"jitkernels {a.strategy}, {a.clients} clients, {a.rounds} rounds")
    ours, accs = run(a.strategy, False, a.clients, a.rounds)
    print(f"done in {time.perf_counter() - t0:.1f} s; final test accuracy {accs[-1]:.3f}")
    if a.compare:
        theirs, accs_t = run(a.strategy, True, a.clients, a.rounds, log_rounds=False)
        diff = max(float(np.abs(o - t.astype(np.float32)).max()) for o, t in zip(ours, theirs))
        print(f"Flower's own {a.strategy}: final test accuracy {accs_t[-1]:.3f}; max |model difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
