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
           "bench.run.forkserver_warm"]  # last: it freezes what the imports before it made (see there)


def trial_context():
    """A fork server that has imported torch and friends once, so each trial starts in milliseconds
    yet in a process of its own (its own memory high-water mark, its own crash)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx
