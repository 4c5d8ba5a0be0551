"""pytest-benchmark settings for the layer micro-benchmarks: one torch thread, and baselines
stamped with peftbench's machine class, since pytest-benchmark keys its storage by OS and
Python only (see README.md here)."""

from __future__ import annotations

import pytest
import torch
from pytest_benchmark.session import PerformanceRegression

from bench.regression.calibrate import machine_class

# One thread: on a shared machine a second thread measures the neighbour more than the layer.
torch.set_num_threads(1)

KEY = "peftbench_machine_class"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info[KEY] = machine_class()


def pytest_benchmark_compare_machine_info(config: pytest.Config, benchmarksession, machine_info: dict,
                                          compared_benchmark: dict) -> None:
    """Timings from another machine class are refused, not compared (a warning is easy to miss)."""
    theirs = compared_benchmark["machine_info"].get(KEY, "unknown")
    if theirs != machine_info[KEY]:
        raise pytest.UsageError(f"stored benchmarks are from machine class {theirs}, this is {machine_info[KEY]}: "
                                "refusing to compare; save a baseline for this machine (benchmarks/README.md)")


@pytest.hookimpl(hookwrapper=True)
def pytest_terminal_summary(terminalreporter) -> None:
    """pytest-benchmark reports a regression by raising from its summary, which ends in a
    traceback; turn it into one line and exit status 1."""
    outcome = yield
    if outcome.excinfo and isinstance(outcome.excinfo[1], PerformanceRegression):
        outcome.force_result(None)
        terminalreporter.write_line("microbench: performance regressed against the stored baseline (see above)", red=True)
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED
