"""jitkernels: fused, incremental aggregation kernels for federated learning.

>>> import jitkernels as jk
>>> agg = jk.Aggregator(template, algorithm="fedavg")          # doctest: +SKIP
>>> agg.fold(update, weight=n_samples, party="hospital-3")     # doctest: +SKIP
>>> model = agg.finalize()                                     # doctest: +SKIP
"""

from . import algorithms
from .admission import Admitted, admit, admit_many, check_weight, norm_scores
from .aggregator import Aggregator
from .backends import available_backends
from .dtypes import Quantized, bfloat16
from .errors import (AggregationError, BackendUnavailable, CorruptState, DuplicateParty, EmptyAggregate,
                     IncompatibleStates, InvalidParty, InvalidQuantized, InvalidTemplate, InvalidUpdateInfo,
                     InvalidWeight, LayoutMismatch, NonFiniteUpdate, OverlappingParties, RoundClosed, TooFewUpdates,
                     TornState, ValueOutOfRange)
from .layout import Layout
from .state import FoldState, atomic_write
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"


def bench(sizes=None, **kwargs) -> list:
    """Run the kernel benchmark on this machine and print its table (one run: every kernel against a read-bandwidth
    probe and the peers, interleaved); returns the rows. The arguments are :func:`jitkernels.benchmark.run`'s
    (``quick=True`` for a smoke run). Needs the ``bench`` extra (pytest-benchmark's peers, tqdm, matplotlib)."""
    from . import benchmark

    return benchmark.run(sizes, **kwargs)


__all__ = [
    "Admitted", "AggregationError", "Aggregator", "BackendUnavailable", "CorruptState", "DuplicateParty",
    "EmptyAggregate", "FoldState", "IncompatibleStates", "InvalidParty", "InvalidQuantized", "InvalidTemplate",
    "InvalidUpdateInfo", "InvalidWeight", "Layout", "LayoutMismatch", "NonFiniteUpdate", "OverlappingParties",
    "Quantized", "RoundClosed", "TooFewUpdates", "TornState", "ValueOutOfRange", "admit", "admit_many", "algorithms",
    "atomic_write", "available_backends", "bench", "bfloat16", "check_weight", "get_num_threads", "norm_scores",
    "set_num_threads",
]
