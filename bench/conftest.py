"""Fixtures of the pytest-benchmark suites: ``pytest bench/ --benchmark-only`` (users run them; CI does not).

``OMP_WAIT_POLICY=passive`` is set here, before anything imports jitkernels (whose C++ extension loads an OpenMP
runtime, which reads it then) or torch: importing :mod:`jitkernels.benchmark` to set it came after the extension had
loaded, and the peers' OpenMP pools spun on both cores (torch ``add_`` 20-60x slower). The header says whether it
came too late all the same. The workload and the probe are built once per session.
"""

import os
import sys

_TOO_LATE = [] if "OMP_WAIT_POLICY" in os.environ else [m for m in ("torch", "jitkernels._core", "numba")
                                                        if m in sys.modules]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import statistics  # noqa: E402

import pytest  # noqa: E402

from jitkernels import benchmark as jb  # noqa: E402

N, LEAVES, K = 4_000_000, 50, 10
"""A modest size: each update (16 MB as float32) is larger than a core's L2 but the suite runs in minutes."""


def pytest_report_header(config):
    h = jb.header()
    vers = ", ".join(f"{k} {v}" for k, v in h["versions"].items() if v)
    return [f"jitkernels bench: {h['cpu']}, {h['usable_cpus']} CPUs, "
            f"last-level cache {h['last_level_cache_mb']:.0f} MB",
            f"threads {h['threads']}, simd {h['simd']}, OMP_WAIT_POLICY={h['OMP_WAIT_POLICY']}"
            + (f" (set after {', '.join(_TOO_LATE)} loaded: not in effect)" if _TOO_LATE else "") + f"; {vers}",
            f"workload: N={N:,} float32 in {LEAVES} leaves, k={K}"]


@pytest.fixture(scope="session")
def workload():
    return jb.make_workload(N, LEAVES, K)


@pytest.fixture(scope="session")
def probe():
    return jb.Probe()


@pytest.fixture
def measure(benchmark, probe):
    """``measure(fn, nbytes, setup=None)``: ``benchmark.pedantic`` of ``fn`` with the probe run before every round
    and once after the last (interleaved, as the probe drifts); records in ``extra_info`` the bytes the method moves,
    the probes' median bandwidth and the fraction of roofline ``(bytes / bandwidth) / median time``."""

    def run(fn, nbytes, setup=None, rounds=5, warmup_rounds=1):
        bws = []

        def before_round():
            bws.append(probe())
            if setup is not None:
                setup()

        benchmark.pedantic(fn, setup=before_round, rounds=rounds, warmup_rounds=warmup_rounds)
        bws.append(probe())
        # the probes around the timed rounds (pytest-benchmark runs setup before its warm-up rounds too, and once in
        # all under --benchmark-disable)
        kept = bws[-(rounds + 1):]
        bw = statistics.median(kept)
        benchmark.extra_info.update(bytes_moved=nbytes, probe_gbps=bw, probe_gbps_all=kept)
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["frac_roofline"] = nbytes / (bw * 1e9) / benchmark.stats.stats.median

    return run
