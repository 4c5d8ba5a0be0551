"""What glibc's allocator costs a training step on the CPU: freed memory returned to the system
(the default) against kept for reuse, side by side in one run.

    python benchmarks/allocator.py [--reps 7] [--json out.json]

Why: a CPU step allocates its activations afresh every step. glibc serves blocks above its mmap
threshold (128 KiB, rising to 32 MiB as blocks are freed) with mmap and unmaps them on free, and
trims the heap's free top, so each step touches new pages: a page fault per 4 KiB (lora_step's
SmolLM2 step at 4 x 128 tokens faults about 100,000 times). `mallopt(M_MMAP_MAX, 0)` and a huge
M_TRIM_THRESHOLD keep freed memory in the process instead. Both settings apply to allocations made
after the call, so one process switches between them rep by rep (malloc_trim(0) on each switch).

Measured: the step time of benchmarks/lora_step.py's floor (backward to the inputs through the
frozen model) and ours (LoRA r=8 all-linear, AdamW), minor page faults per step, and, each variant
and mode in its own forked process from a fresh start, the resident-set high-water mark over four
steps (what a trial reports as its peak). Trials keep glibc's default: kept memory raises the peak
a trial reports, which is the figure the product is asked for.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch

import lora_step as L
from bench import models
from bench.trial.measure import PeakMemory

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
LIBC = ctypes.CDLL("libc.so.6")


def keep_freed_memory(on: bool) -> None:
    """Keep freed memory in the process (on) or glibc's defaults (off: 65,536 mmaps, 128 KiB trim)."""
    LIBC.mallopt(M_MMAP_MAX, 0 if on else 65536)
    LIBC.mallopt(M_TRIM_THRESHOLD, 2**31 - 1 if on else 128 * 1024)
    LIBC.malloc_trim(0)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_child(variant: str, keep: bool, ids: torch.Tensor, queue) -> None:
    keep_freed_memory(keep)
    model, optimizer = L.build(variant, 8)
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    for _ in range(4):
        L.step(model, optimizer, ids)
    queue.put(peak.stop()["peak_delta_bytes"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    ids = L.make_batch(models.load_tokenizer({"name": "smollm2-135m"}), 4, 128)
    variants, modes = ["floor", "ours"], {"default": False, "kept": True}

    ctx = mp.get_context("fork")
    peaks = {}
    for v in variants:
        for mode, keep in modes.items():
            q = ctx.Queue()
            p = ctx.Process(target=peak_child, args=(v, keep, ids, q))
            p.start()
            peaks[f"{v} {mode}"] = q.get()
            p.join()

    built = {v: L.build(v, 8) for v in variants}
    times: dict[str, list[float]] = {}
    faulted: dict[str, list[int]] = {}
    for rep in range(args.reps + 1):  # rep 0 warms up both modes
        for mode, keep in modes.items():
            keep_freed_memory(keep)
            for v in variants:
                L.step(*built[v], ids)  # the first step after a switch settles the allocator
                before, start = faults(), time.perf_counter()
                L.step(*built[v], ids)
                if rep:
                    times.setdefault(f"{v} {mode}", []).append(time.perf_counter() - start)
                    faulted.setdefault(f"{v} {mode}", []).append(faults() - before)
    keep_freed_memory(False)

    med = {k: statistics.median(t) for k, t in times.items()}
    out = {"benchmark": "allocator", "config": {"reps": args.reps, "threads": torch.get_num_threads(), "tokens": "4 x 128",
                                                "lora": "r=8 all-linear, AdamW"},
           "step_s_median": med, "faults_median": {k: statistics.median(f) for k, f in faulted.items()},
           "peak_delta_bytes": peaks,
           "ratios": {f"ours_over_floor_{m}": med[f"ours {m}"] / med[f"floor {m}"] for m in modes}
           | {f"{v}_kept_over_default_time": med[f"{v} kept"] / med[f"{v} default"] for v in variants}
           | {f"{v}_kept_over_default_peak": peaks[f"{v} kept"] / peaks[f"{v} default"] for v in variants}}
    print(f"{args.reps} interleaved reps, {out['config']['threads']} threads, lora_step's batch and variants")
    for k in med:
        print(f"  {k:14s} step median {med[k]:.3f} s  faults/step {out['faults_median'][k]:>8.0f}  peak +{peaks[k] / 2**20:.0f} MiB")
    for k, r in out["ratios"].items():
        print(f"  {k}: {r:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
