"""Fixtures of the pytest-benchmark suites: ``pytest bench/ --benchmark-only`` (users run them; CI does not).

Importing :mod:`jitkernels.benchmark` first sets ``OMP_WAIT_POLICY=passive`` before torch or the C++ extension load
an OpenMP runtime (see that module). The workload and the probe are built once per session.
"""

import statistics

import pytest

from jitkernels import benchmark as jb

N, LEAVES, K = 4_000_000, 50, 10
"""A modest size: each update (16 MB as float32) is larger than a core's L2 but the suite runs in minutes."""


def pytest_report_header(config):
    h = jb.header()
    vers = ", ".join(f"{k} {v}" for k, v in h["versions"].items() if v)
    return [f"jitkernels bench: {h['cpu']}, {h['usable_cpus']} CPUs, "
            f"last-level cache {h['last_level_cache_mb']:.0f} MB",
            f"threads {h['threads']}, simd {h['simd']}, OMP_WAIT_POLICY={h['OMP_WAIT_POLICY']}; {vers}",
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
        bw = statistics.median(bws)
        benchmark.extra_info.update(bytes_moved=nbytes, probe_gbps=bw, probe_gbps_all=bws)
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["frac_roofline"] = nbytes / (bw * 1e9) / benchmark.stats.stats.median

    return run
