"""LongLoRA at long context: S²-Attn against full attention on SmolLM2-135M, side by side in one run.

    python benchmarks/longlora_context.py [--lengths 1024 2048 4096 8192] [--reps 2] [--reps-long 1] [--device cpu|cuda] [--json F]
    python benchmarks/longlora_context.py --quick                 # 1024 and 2048 only, one timed step: minutes on a CPU
    python benchmarks/longlora_context.py --markdown results/reference/perf/longlora_context.json   # the README table

The paper's point (Chen et al. 2023, "LongLoRA", arXiv 2309.12307: its Figure 1 sets training hours
and GPU memory against context length) is that shifted sparse attention makes training at long
context cheaper than full attention with the same trainables. Two variants per length, batch 1:
  s2    LongLoRA as methods/longlora.py trains it: LoRA r=8 (alpha 16) on q, k, v, o plus the
        embeddings and norms (LoRA+), S²-Attn with groups of 1/4 of the length, half the heads
        shifted by half a group
  full  the same model, trainables and optimizer with the model's own attention switched back on:
        full causal attention, what a user of SmolLM2 gets (transformers' "sdpa")
Same kernel for both: S²-Attn calls torch's scaled_dot_product_attention once per kind of group with
is_causal and no mask (the batch has no padding), as transformers' sdpa attention does for the whole
sequence, so torch dispatches both to the same kernel (on CPU its flash kernel). The warm-up step of
every variant runs under torch's profiler and the JSON records the attention kernels each one called
(`attention_kernels`); the table says whether they match. S²-Attn repeats the key and value heads
(grouped-query attention, 3 key/value heads for 9 query heads) where full attention passes
enable_gqa: that copy is part of the method's cost and is timed with it.

First every length's peak memory per variant, each in its own spawned process (the committed CPU
reference run forked them, before this process trained anything; see memory_in_child): a step on 8
tokens allocates AdamW's state, then one step at the length; the resident-set high-water mark on
CPU or torch.cuda.max_memory_allocated on CUDA over both, minus the level after loading, plus the
bytes autograd saves for backward in the second. A variant whose process dies (out of memory) is
recorded as such and not timed. Then per length the variants that fit are built side by side in
this process, one untimed warm-up step each, and --reps timed steps (--reps-long from 8192 tokens
on) interleaved rep by rep, so that machine noise hits them alike. The JSON is rewritten after
every timed length, so a run stopped at 8k keeps the shorter lengths.

Run time on a 2-core CPU (estimated from 1k and 2k steps, float32, 2 threads; 4k and 8k
extrapolated): a step takes about 4 s at 1k tokens and 30-80 s at 8k (full attention the slower).
The default run steps each variant four times per length (memory, warm-up, 2 timed) and three
times at 8192 (one timed: --reps-long), about 8-12 minutes; --quick takes 1-2. On a GPU all of it
takes seconds: pass --reps 5 --reps-long 5 there.

Text: LAMBADA book passages (bench.trial.evaluate.forgetting_texts, the held-out text lora_step.py
uses), joined with blank lines and cut to the length: 8192 tokens take about 100 passages of the
5,000 packaged, so nothing repeats unless a length needs more than all of them (the JSON says
`repeated`). Positions: SmolLM2-135M's max_position_embeddings is 8192, so the default lengths need
no extension; a longer length gets LongLoRA's position interpolation (linear RoPE scaling by
ceil(length / max_position_embeddings), as the authors' fine-tune.py sets), recorded per length.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import multiprocessing as mp
import os
import queue as queue_lib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import methods  # noqa: E402
from bench import models  # noqa: E402
from bench.records import results as results_env  # noqa: E402
from bench.trial.evaluate import forgetting_texts  # noqa: E402
from bench.trial.measure import PeakMemory, saved_for_backward  # noqa: E402
from bench.trial.train import OPTIMIZERS  # noqa: E402
from reports import longlora_context as render  # noqa: E402
from reports.results import ResultFileError  # noqa: E402

MODEL = "smollm2-135m"
LENGTHS = (1024, 2048, 4096, 8192)
QUICK_LENGTHS = (1024, 2048)
PRIMING_TOKENS = 8
LONG = 8192
"""From this length on, --reps-long timed steps (default 1: a step takes minutes per variant on a 2-core CPU)."""
FULL_ATTENTION = "sdpa"
"""The attention a user of the model gets (transformers' default) and the one S²-Attn wraps."""


@dataclass(frozen=True)
class Variant:
    """One side of the comparison."""

    name: str
    label: str
    full_attention: bool
    """Switch the model's own attention back on after LongLoRA set S²-Attn."""


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("s2", "LongLoRA, S²-Attn", full_attention=False),
    Variant("full", "LongLoRA trainables, full attention", full_attention=True),
)}


@dataclass(frozen=True)
class Setup:
    """What every variant at every length shares."""

    rank: int = 8
    group_size_ratio: float = 0.25
    device: str = "cpu"
    dtype: str = "float32"
    lr: float = 1e-4


def load_smollm2(setup: Setup) -> nn.Module:
    """The packaged SmolLM2-135M in the setup's dtype, on its device, with its default (sdpa) attention."""
    return models.load({"name": MODEL, "dtype": setup.dtype}, device=setup.device).model


def text_ids(tokenizer: Any, length: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """`length` tokens of real text as a (1, length) batch, and where they came from. Passages are
    added (evenly spaced over the books) until they are enough; repeated only past all of them."""
    n, ids, texts = 64, [], []
    while True:
        texts = forgetting_texts(n)
        ids = tokenizer("\n\n".join(texts))["input_ids"]
        if len(ids) >= length or len(texts) < n:  # enough, or every passage is already in
            break
        n = max(2 * n, math.ceil(n * length / max(len(ids), 1)))
    available = len(ids)
    repeated = available < length
    if repeated:
        ids = (ids * math.ceil(length / available))[:length]
    source = {"source": "LAMBADA test passages (bench.trial.evaluate.forgetting_texts)", "passages": len(texts),
              "tokens_available": available, "repeated": repeated}
    return torch.tensor(ids[:length]).view(1, length), source


def position_factor(length: int, max_positions: int) -> float:
    """LongLoRA's linear RoPE scaling factor for training at `length`: ceil(length / max_positions), 1.0 where it fits."""
    return 1.0 if length <= max_positions else float(math.ceil(length / max_positions))


def interpolate_positions(model: nn.Module, length: int) -> float:
    """LongLoRA's position interpolation: past max_position_embeddings, RoPE positions are scaled down
    linearly by ceil(length / max_position_embeddings) (the authors' fine-tune.py); 1.0 where the
    length fits and nothing changes. Returns the factor."""
    config = model.config
    factor = position_factor(length, config.max_position_embeddings)
    if factor == 1.0:
        return factor
    config.rope_parameters = {**config.rope_parameters, "rope_type": "linear", "factor": factor}
    rotaries = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not rotaries:
        raise ValueError(f"{type(model).__name__}: no rotary embedding module to interpolate positions in")
    for name, rotary in rotaries:
        parent, _, attr = name.rpartition(".")
        device = rotary.inv_freq.device
        setattr(model.get_submodule(parent), attr, type(rotary)(config=config).to(device))
    return factor


def build(variant: str, length: int, setup: Setup, load: Callable[[Setup], nn.Module] = load_smollm2):
    """The model in training mode, its positions interpolated where `length` needs it, and the training loop's
    AdamW (bench/trial/train.py: fused where torch has the kernel; no weight decay) over LongLoRA's trainables."""
    model = load(setup)
    interpolate_positions(model, length)
    longlora = methods.get("longlora")
    base = model.config._attn_implementation
    if base != FULL_ATTENTION:  # the comparison's fairness rests on both variants calling torch's SDPA
        raise ValueError(f"{type(model).__name__} loaded with {base!r} attention; this benchmark compares against {FULL_ATTENTION!r}")
    adapted = longlora.apply(model, longlora.Config(r=setup.rank, alpha=2 * setup.rank, group_size_ratio=setup.group_size_ratio))
    if VARIANTS[variant].full_attention:
        model.set_attn_implementation(base)
    model.train()
    return model, OPTIMIZERS["adamw"]([{"params": adapted.trainable}], {"lr": setup.lr, "weight_decay": 0.0})


def step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """One training step (forward, backward, AdamW); returns its wall time, the device synchronised."""
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - t0


def attention_kernels(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> tuple[float, list[str]]:
    """One step under torch's profiler: its time (untimed warm-up) and the attention kernels it called."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        seconds = step(model, optimizer, ids)
    keys = {e.key for e in prof.key_averages()}
    return seconds, sorted(k for k in keys if "attention" in k and k != "aten::scaled_dot_product_attention")


def memory(variant: str, length: int, setup: Setup, ids: torch.Tensor,
           load: Callable[[Setup], nn.Module] = load_smollm2) -> dict[str, Any]:
    """Peak memory above the level after loading over a step with AdamW's state allocated, and the bytes
    autograd saves for backward in that step. A first step on the first PRIMING_TOKENS tokens allocates
    the optimizer state (the same size at any length), so one step at the length measures what a second
    step of training would hold, at the cost of one."""
    model, optimizer = build(variant, length, setup, load)
    ids = ids.to(setup.device)
    peak = PeakMemory(torch.device(setup.device))
    peak.start()
    step(model, optimizer, ids[:, :PRIMING_TOKENS])
    with saved_for_backward(model) as saved:
        step(model, optimizer, ids)
    measured = peak.stop()
    return {"status": "ok", "peak_delta_bytes": measured["peak_delta_bytes"], "peak_source": measured["peak_source"],
            "saved_bytes": saved["bytes"]}


def _memory_child(variant: str, length: int, setup: Setup, ids: torch.Tensor, load: Callable[[Setup], nn.Module], out) -> None:
    try:
        out.put(memory(variant, length, setup, ids, load))
    except torch.OutOfMemoryError as exc:  # CUDA: the allocator refuses; the CPU kernel kills instead
        out.put({"status": "oom", "error": str(exc).splitlines()[0]})


def memory_in_child(variant: str, length: int, setup: Setup, ids: torch.Tensor,
                    load: Callable[[Setup], nn.Module] = load_smollm2) -> dict[str, Any]:
    """`memory` in a process of its own, spawned: a fresh interpreter and heap. (A fork inherits the
    parent's heap and, once the parent has run torch's thread pool, can hang on its lock: the test
    suite's process had, and its child hung; CUDA cannot start in a fork of a process that used it.)
    A child that dies (the kernel's OOM killer) is recorded, not waited for."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_memory_child, args=(variant, length, setup, ids, load, out))
    child.start()
    while True:
        try:
            result = out.get(timeout=1.0)
            break
        except queue_lib.Empty:
            if not child.is_alive():
                try:  # it may have put its result just before exiting
                    result = out.get(timeout=1.0)
                except queue_lib.Empty:
                    result = {"status": "killed", "error": f"memory process exited with code {child.exitcode} (out of memory?)"}
                break
    child.join()
    return result


def measure_memory(length: int, setup: Setup, ids: torch.Tensor, load: Callable[[Setup], nn.Module] = load_smollm2
                   ) -> dict[str, dict[str, Any]]:
    """Every variant's memory at one length, each in its own process, all before this process trains:
    a forked child would start from this process's heap, whose freed memory would serve its tensors
    without raising its resident set (measured: a 2k child's peak came out below a 1k child's when
    forked after the 1k steps had run here); spawned children (memory_in_child) start clean anyway."""
    return {v: memory_in_child(v, length, setup, ids, load) for v in VARIANTS}


def measure_length(length: int, setup: Setup, ids: torch.Tensor, reps: int, max_positions: int,
                   load: Callable[[Setup], nn.Module] = load_smollm2, measured: dict[str, dict[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """One length: every variant's memory (`measured`, else measure_memory now), then the variants that
    fit built side by side, a profiled warm-up step each and `reps` interleaved timed steps."""
    row: dict[str, Any] = {"length": length, "group_size": math.ceil(setup.group_size_ratio * length), "reps": reps,
                           "rope_factor": position_factor(length, max_positions),
                           "variants": copy.deepcopy(measured) if measured else measure_memory(length, setup, ids, load)}
    fits = [v for v in VARIANTS if row["variants"][v]["status"] == "ok"]
    built = {v: build(v, length, setup, load) for v in fits}
    on_device = ids.to(setup.device)
    for v in fits:
        model, optimizer = built[v]
        warm_s, kernels = attention_kernels(model, optimizer, on_device)
        row["variants"][v] |= {"warmup_s": warm_s, "attention_kernels": kernels, "step_s": []}
    for _ in range(reps):
        for v in fits:
            model, optimizer = built[v]
            row["variants"][v]["step_s"].append(step(model, optimizer, on_device))
    for v in fits:
        times = row["variants"][v]["step_s"]
        row["variants"][v] |= {"step_s_median": statistics.median(times), "step_s_min": min(times)} if times else {}
    del built
    gc.collect()
    if setup.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def environment(setup: Setup) -> dict[str, Any]:
    """Package versions, git commit, host and device as trial results record them, and torch's thread count."""
    gpu = torch.cuda.get_device_name(setup.device) if setup.device.startswith("cuda") else None
    return results_env.environment(gpu) | {"threads": torch.get_num_threads()}


def header(setup: Setup, model: str, lengths: Sequence[int], max_positions: int, text: dict[str, Any]) -> dict[str, Any]:
    """The record before its rows (one per length): what was run, on what, with which text."""
    return {
        "benchmark": render.NAME,  # how reports/results.py tells it from trial results
        "config": asdict(setup) | {"model": model, "lengths": list(lengths), "batch": 1, "attn_implementation": FULL_ATTENTION,
                                   "max_position_embeddings": max_positions, "variants": {v.name: v.label for v in VARIANTS.values()}},
        "text": text,
        "env": environment(setup),
        "rows": [],
    }


def write_json(path: str, record: dict[str, Any]) -> None:
    """Written aside and renamed: a run stopped mid-way leaves the last complete record."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", help=f"context lengths in tokens (default {' '.join(map(str, LENGTHS))})")
    ap.add_argument("--reps", type=int, help="timed steps per variant and length, after one warm-up step (default 2; 1 with --quick)")
    ap.add_argument("--reps-long", type=int, help=f"timed steps at lengths from {LONG} on (default 1, or --reps where given)")
    ap.add_argument("--quick", action="store_true",
                    help=f"lengths {' '.join(map(str, QUICK_LENGTHS))} and one timed step, unless --lengths or --reps say otherwise")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--group-size-ratio", type=float, default=0.25, help="S²-Attn's group size over the length (the paper: 1/4)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(models.DTYPES), help="default: bfloat16 on CUDA (the paper's), float32 on CPU")
    ap.add_argument("--json", help="write the figures here too (rewritten after every length)")
    ap.add_argument("--markdown", metavar="JSON", help="print the table of a recorded run as Markdown and exit")
    args = ap.parse_args(argv)
    args.lengths = args.lengths or list(QUICK_LENGTHS if args.quick else LENGTHS)
    args.reps_long = args.reps_long or args.reps or 1
    args.reps = args.reps or (1 if args.quick else 2)
    if min(args.reps, args.reps_long) < 1 or any(n <= PRIMING_TOKENS for n in args.lengths):
        ap.error(f"--reps and --reps-long must be >= 1 and every length > {PRIMING_TOKENS}")
    if not 0 < args.group_size_ratio <= 1:
        ap.error("--group-size-ratio must be in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available here")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        ap.error(f"--json {args.json}: no such folder {Path(args.json).parent}")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown:
        try:
            print(render.markdown(render.read(args.markdown)))
        except ResultFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    setup = Setup(rank=args.rank, group_size_ratio=args.group_size_ratio, device=args.device, dtype=args.dtype)
    tokenizer = models.load_tokenizer({"name": MODEL})
    max_positions = models.config_of({"name": MODEL}).max_position_embeddings
    ids, text = text_ids(tokenizer, max(args.lengths))
    record = header(setup, MODEL, args.lengths, max_positions, text)
    print(f"{MODEL}, batch 1, LongLoRA r={args.rank} attention + embeddings + norms, groups of {args.group_size_ratio:g} x length, "
          f"{setup.device} {setup.dtype}, {record['env']['threads']} threads, warm-up + {args.reps} interleaved steps per length "
          f"({args.reps_long} from {LONG:,} tokens on)",
          flush=True)
    measured = {}
    for length in args.lengths:  # every length's memory before this process trains (see measure_memory)
        measured[length] = measure_memory(length, setup, ids[:, :length])
        print(render.memory_line(length, measured[length]), flush=True)
    for length in args.lengths:
        reps = args.reps_long if length >= LONG else args.reps
        row = measure_length(length, setup, ids[:, :length], reps, max_positions, measured=measured[length])
        record["rows"].append(row)
        print(render.progress_line(row), flush=True)
        if args.json:
            write_json(args.json, record)
    print(render.markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
