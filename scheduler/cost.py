"""Cost model: how long aggregation work takes, and what a deployment's start-up costs.

    fold(n updates)  = call_s + (update bytes [+ host-to-device copy] + 2 * accumulator bytes) / throughput
    finalize         = call_s + (accumulator bytes + output bytes) / throughput
    deployment       = startup_s (user-set: a process, container or GPU context cold start)

Throughput and per-call overhead are calibrated by running the real kernels (:meth:`CostModel.calibrate`: a
least-squares fit of time against bytes over several sizes), saved to a JSON file and reused. Updates that arrive in
host memory pay the host-to-device copy on a GPU backend (``h2d_Bps``), which the CPU backends do not.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

import jitkernels as jk


def _number(v) -> float:
    """``v`` as a finite float, else NaN (so that every comparison fails): a file's ``true`` is no throughput of 1,
    and its 400-digit integer no OverflowError."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        return math.nan
    try:
        v = float(v)
    except OverflowError:
        return math.nan
    return v if math.isfinite(v) else math.nan


@dataclass
class BackendCost:
    throughput_Bps: float  # bytes moved per second by a fused fold
    call_s: float = 50e-6  # fixed cost per kernel call
    h2d_Bps: float | None = None  # host-to-device copy bandwidth (GPU backends only)

    def __post_init__(self):
        for name in ("throughput_Bps", "h2d_Bps"):
            v = getattr(self, name)
            if v is not None and not _number(v) > 0:
                raise ValueError(f"{name} must be finite and > 0, got {v!r}")
        if not _number(self.call_s) >= 0:
            raise ValueError(f"call_s must be finite and >= 0, got {self.call_s!r}")



@dataclass
class CostModel:
    backends: dict = field(default_factory=lambda: {"cpu": BackendCost(10e9)})
    startup_s: float = 0.0
    backend: str = "cpu"
    acc_itemsize: int = 4

    def __post_init__(self):
        if self.backend not in self.backends:
            raise ValueError(f"backend {self.backend!r} has no cost entry (entries: {sorted(self.backends)})")
        if not _number(self.startup_s) >= 0:
            raise ValueError(f"startup_s must be finite and >= 0, got {self.startup_s!r}")
        if isinstance(self.acc_itemsize, bool) or not isinstance(self.acc_itemsize, int) or not \
                1 <= self.acc_itemsize <= 64:  # (a file's 400-digit one passed, and every fold estimate overflowed)
            raise ValueError(f"acc_itemsize must be an integer in [1, 64], got {self.acc_itemsize!r:.40}")

    def _b(self, backend=None) -> BackendCost:
        return self.backends[backend or self.backend]

    def fold_s(self, update_bytes: float, n_updates: int, model_elems: int, backend=None,
               acc_itemsize: int | None = None) -> float:
        """``backend``, ``acc_itemsize``: a job's own (its backend's entry; 8 for a float64 accumulator, 16 for
        deterministic mode's two), where they differ from the model's defaults."""
        if n_updates <= 0:
            return 0.0
        b = self._b(backend)
        t = b.call_s + (update_bytes + 2 * model_elems * (acc_itemsize or self.acc_itemsize)) / b.throughput_Bps
        if b.h2d_Bps:
            t += update_bytes / b.h2d_Bps
        return t

    def finalize_s(self, model_elems: int, out_itemsize: int = 4, backend=None,
                   acc_itemsize: int | None = None) -> float:
        b = self._b(backend)
        return b.call_s + model_elems * ((acc_itemsize or self.acc_itemsize) + out_itemsize) / b.throughput_Bps

    # --- files -------------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"backends": {k: asdict(v) for k, v in self.backends.items()}, "startup_s": self.startup_s,
                "backend": self.backend, "acc_itemsize": self.acc_itemsize}

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        missing = [k for k in ("backends", "backend") if not isinstance(d, dict) or k not in d]
        if missing:  # (a KeyError reached jitagg's user as a traceback)
            raise ValueError(f"a cost model file needs {' and '.join(missing)} (jitagg calibrate writes one)")
        if not isinstance(d["backends"], dict) or not all(isinstance(v, dict) for v in d["backends"].values()):
            raise ValueError("a cost model file's backends are a mapping of name to {throughput_Bps, call_s, h2d_Bps}")
        return cls(backends={k: BackendCost(**v) for k, v in d["backends"].items()}, startup_s=d.get("startup_s", 0.0),
                   backend=d["backend"], acc_itemsize=d.get("acc_itemsize", 4))

    def save(self, path) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
        jk.atomic_write(os.fspath(path), json.dumps(self.to_json(), indent=2).encode())

    @classmethod
    def load(cls, path) -> "CostModel":
        with open(path) as f:
            try:
                d = json.load(f)
            except RecursionError:  # (a file nested past the parser's limit)
                raise ValueError(f"{os.fspath(path)}: not a cost model file (JSON nested too deep)") from None
        return cls.from_json(d)

    # --- calibration -------------------------------------------------------------------------------------------
    @classmethod
    def calibrate(cls, *, backend: str = "auto", sizes=(1_000, 100_000, 1_000_000, 8_000_000), k: int = 8,
                  repeats: int = 5, startup_s: float = 0.0, progress=None) -> "CostModel":
        """Fit throughput and per-call overhead by timing the real ``fold_many`` of k float32 host updates (the best
        of ``repeats`` per size; :func:`fit_call_and_throughput`). On the GPU backend ("cupy") that is the staged
        path, so the fitted throughput includes the host-to-device copy; the entry is named after the backend ("cpu"
        for the CPU ones)."""
        xs, ys = [], []
        rng = np.random.default_rng(0)
        for n in sizes:
            ups = [rng.standard_normal(n).astype(np.float32) for _ in range(k)]
            agg = jk.Aggregator(ups[0], backend=backend)
            adm = agg.admit_many(ups, [1.0] * k, list(range(k)))
            agg.fold_many(adm)  # warm-up: compile, first touch
            best = float("inf")
            for _ in range(repeats):
                agg.reset(reuse=True)
                t0 = time.perf_counter()
                agg.fold_many(adm)
                best = min(best, time.perf_counter() - t0)
            xs.append(k * n * 4 + 2 * n * 4)
            ys.append(best)
            if progress:
                progress(n, best)
        call_s, throughput = fit_call_and_throughput(xs, ys)
        name = "cupy" if backend == "cupy" else "cpu"
        return cls(backends={name: BackendCost(throughput, call_s)}, startup_s=startup_s, backend=name)


def fit_call_and_throughput(nbytes, seconds) -> tuple:
    """(per-call seconds, bytes per second) of ``seconds = call + bytes / throughput``, fitted to relative error:
    timings span four orders of magnitude, and a plain least-squares line takes its intercept (microseconds) from the
    noise of the largest timings (milliseconds; calibrations on a busy machine gave 4-7 ms per call)."""
    x, y = np.asarray(nbytes, float), np.asarray(seconds, float)
    bad = next((v for v in y if not (np.isfinite(v) and v > 0)), None)
    if bad is not None or x.size != y.size or x.size < 2:  # (a 0 or NaN timing: LAPACK's SVD failed, untyped)
        raise ValueError(f"calibration needs finite timings > 0 for two sizes or more; got {list(seconds)!r}")
    slope, intercept = np.polyfit(x, y, 1, w=1.0 / y)
    best = float(np.max(x / y))  # the best rate a call showed, its fixed cost included: a floor
    # a line with no clear slope (timings that the per-call cost dominates, or noise) gave 1.6e27 B/s, and every
    # estimate its call cost alone: the sizes did not measure the throughput, and the floor stands in for it
    throughput = 1.0 / slope if slope > 0 and 1.0 / slope <= 10 * best else best
    return float(min(max(intercept, 1e-6), float(y.min()))), float(throughput)
