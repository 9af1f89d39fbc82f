"""Aggregation algorithms: each one readable class whose docstring states its math.

An algorithm turns a party's reported weight into its fold weight and names its parameters (saved with the state).
The fold itself is the backends' fused kernel; finalize divides by the total weight.
"""

from __future__ import annotations


class FedAvg:
    r"""Federated averaging (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
    Decentralized Data").

    .. math::  x = \frac{\sum_j w_j\, u_j}{\sum_j w_j}, \qquad w_j = n_j \text{ (weighted) or } 1 \text{ (unweighted)}

    With a base :math:`b` (the global model) the kernels fold deltas, :math:`x = b + \sum_j w_j (u_j - b) / \sum_j w_j`,
    which keeps rounding noise out of small steps. Streaming: O(model) memory, one read of each update
    (bytes moved per element: ``itemsize(u)`` per update, plus ``2 * itemsize(acc)`` once per fused batch).
    """

    name = "fedavg"

    def __init__(self, *, weighted: bool = True):
        self.weighted = bool(weighted)

    def fold_weight(self, weight: float) -> float:
        return weight if self.weighted else 1.0

    def params(self) -> dict:
        return {"name": self.name, "weighted": self.weighted}

    def __repr__(self):
        return f"FedAvg(weighted={self.weighted})"


_BY_NAME = {
    "fedavg": lambda: FedAvg(),
    "fedavg_unweighted": lambda: FedAvg(weighted=False),
}


def resolve(algorithm):
    """An algorithm object from a name or an instance."""
    if isinstance(algorithm, str):
        try:
            return _BY_NAME[algorithm.lower()]()
        except KeyError:
            raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(_BY_NAME)}") from None
    if not hasattr(algorithm, "fold_weight") or not hasattr(algorithm, "params"):
        raise TypeError(f"{algorithm!r} is not an algorithm (needs fold_weight() and params())")
    return algorithm


def from_params(params: dict):
    """Rebuild an algorithm from the ``params()`` saved in a state."""
    p = {k: v for k, v in params.items() if k not in ("name", "int_leaves", "deterministic")}
    if params.get("name") == "fedavg":
        return FedAvg(**p)
    raise ValueError(f"unknown algorithm in state: {params.get('name')!r}")
