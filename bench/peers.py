"""The peer baselines of the benchmarks, re-exported from :mod:`jitkernels.benchmark`, their one home (there, so
that ``python -m jitkernels.benchmark`` runs from an installed package, which does not ship ``bench/``).

Each times one real library call on k float32 updates (its docstring says which and what it allocates):

* :func:`numpy_eager`: ``acc += np.float32(w) * u`` per leaf, per update.
* :func:`torch_add`: ``acc.add_(u, alpha=w)`` per leaf, per update, on ``torch.from_numpy`` views.
* :func:`torch_foreach`: ``torch._foreach_add_(accs, leaves, alpha=w)`` per update.
* :func:`flower_aggregate`: ``flwr.server.strategy.aggregate.aggregate`` on ``[(NDArrays, num_examples)]``.
* :func:`flower_aggregate_inplace`: ``flwr.server.strategy.aggregate.aggregate_inplace`` on real ``FitRes``.
* :func:`nvflare_weighted`: NVFlare's ``WeightedAggregationHelper.add`` per update, then ``get_result``, on torch
  tensors or numpy arrays.

:data:`PEERS` pairs each with the function that builds its inputs from a workload and the package it needs.
"""

from jitkernels.benchmark import (PEERS, Peer, flower_aggregate, flower_aggregate_inplace, installed, numpy_eager,
                                  nvflare_weighted, torch_add, torch_foreach)

__all__ = ["PEERS", "Peer", "flower_aggregate", "flower_aggregate_inplace", "installed", "numpy_eager",
           "nvflare_weighted", "torch_add", "torch_foreach"]
