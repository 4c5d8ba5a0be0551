"""The fork server every trial process is forked from (bench/run/runner.py, bench/run/ray_backend.py,
and bench/trial/forecast.py's measure of a fresh trial process's memory).

It imports torch, transformers, lm-eval and peftbench's own trial code once, so each trial starts
in milliseconds yet in a process of its own (its own memory high-water mark, its own crash).
"""

from __future__ import annotations

import multiprocessing as mp

# Imported once by the fork server, so each trial process starts without paying for them.
PRELOAD = ["bench.run.forkserver_guard", "torch", "transformers", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "datasets", "lm_eval", "lm_eval.models.huggingface",
           "bench.run.worker", "bench.tasks.data", "bench.trial.evaluate", "bench.models",
           # A trial's arguments are a bench.run.suite.Trial and a bench.run.runner.Lane: unpickling them
           # in each trial process would otherwise import these (~50-100 ms a trial).
           "bench.run.suite", "bench.run.runner",
           "bench.run.forkserver_warm"]  # last: it freezes what the imports before it made (see there)


def trial_context():
    """A fork server that has imported torch and friends once, so each trial starts in milliseconds
    yet in a process of its own (its own memory high-water mark, its own crash)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start() -> None:
    """Start the fork server now, without waiting for it: its imports (several seconds) then run
    beside whatever the caller does before its first trial (`peftbench run` loading and checking
    its suites), and the first trial finds it ready. The server exits with its caller
    (bench/run/forkserver_guard.py)."""
    from multiprocessing import forkserver

    trial_context()
    forkserver.ensure_running()
