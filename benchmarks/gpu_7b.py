"""LoRA vs QLoRA on a synthetic Llama-2-7B on one GPU, and every registered method on CUDA.

    python3 benchmarks/gpu_7b.py --out DIR [--tiny] [--budget-s 300]

Part 1 (the numbers DESIGN.md section 7 compares with Raschka's "LoRA insights"): a Llama-2-7B
architecture with random bf16 weights (bench.models synthetic:llama-2-7b: memory and time do
not depend on weight values) is built on the GPU, quantized through bench.models.quant where the
variant says so, adapted with our LoRA, and trained for a fixed number of steps by the
project's one training loop (bench.trial.train.train), measured as a trial is (bench.trial.measure:
PeakMemory for the allocator's peak allocated and reserved bytes over training, StepTimer for
the median step after 2 warm-up steps).

  lora-bf16-qv        LoRA r=8 alpha=16 on q and v, bf16 base           (Raschka: 21.33 GB)
  qlora-nf4-qv        the same LoRA on an nf4 base, bf16 compute        (14.18 GB)
  qlora-nf4dq-qv      nf4 + double quantization                         (13.84 GB, LitGPT table)
  qlora-fp4-qv        fp4                                               (time +39% over bf16 LoRA)
  lora-bf16-all       LoRA r=8 on every linear layer but the head
  qlora-nf4-all       ... on an nf4 base                                (16.62 GB)
then, as time allows: r=256 on all layers with AdamW vs SGD on nf4 (17.86 vs 14.46 GB), a
paged AdamW and an int8 base (to run those code paths on CUDA), and sequence length 1024.

Settings, after Raschka's lit-gpt Alpaca runs (finetune/lora.py): micro-batch 1 (lit-gpt
accumulates gradients over micro-batches of single examples there; gradient accumulation does
not change peak memory, so one micro-batch is one step here), LoRA r=8 alpha=16 on query and
value, AdamW lr 3e-4, bf16 weights, bf16 compute for 4-bit layers, no gradient checkpointing.
Sequence length 512 tokens: lit-gpt pads each micro-batch to its longest example and does not
truncate Alpaca, so his peak comes from the longest Alpaca example (above 1,000 tokens) while
most examples are far shorter. 512 is a typical length, not his worst case; the 1024-token
rows bracket it. So compare our ratios (QLoRA / LoRA memory and time) with his, and treat
absolute GB as indicative. One difference: our adapters are float32 (as peft's are), his bf16.

Part 2 (run first: it is short and pays CUDA's start-up costs): every registered method
(methods.names()) trains 2 steps on a smaller synthetic model (smollm2-135m's architecture) on a
float32 and on an nf4 base, to catch CUDA-only bugs; a table says which ran and which failed,
with the error. Failing on a 4-bit base is expected for methods that train the base weights
(full, top_k) or quantize the base themselves (they refuse an already quantized one).

Needs torch, transformers and bitsandbytes only (no datasets, lm-eval, peft): the data are
random token ids, so bench.tasks.data is not used. Results: DIR/gpu_7b.json (rewritten after each
run, so a timeout still leaves what finished) and DIR/summary.txt. --tiny runs the same code
paths on synthetic:llama-tiny with 2 steps, on the CPU if there is no GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402

import methods  # noqa: E402
from bench import models  # noqa: E402
from bench.records import results  # noqa: E402
from bench.trial.measure import PeakMemory, param_counts, weight_bytes  # noqa: E402
from bench.run.suite import ModelSpec, TrainSpec  # noqa: E402
from bench.trial.train import train  # noqa: E402

GB = 1e9  # Raschka reports torch.cuda.max_memory_allocated() / 1e9


@dataclass
class Variant:
    name: str
    model: dict[str, Any]
    """bench.run.suite.ModelSpec fields, minus the name."""
    lora: dict[str, Any]
    optimizer: str = "adamw"
    seq: int | None = None
    """Sequence length; None: the run's --seq."""
    raschka_gb: float | None = None
    """His peak for this setting (DESIGN.md section 7), for the table only."""
    extra: bool = False
    """Run only if time allows."""


BF16 = {"dtype": "bfloat16"}
NF4 = {"dtype": "bfloat16", "quant": "nf4", "compute_dtype": "bfloat16"}
QV = {"r": 8, "alpha": 16, "targets": "qv"}
ALL = {"r": 8, "alpha": 16, "targets": "all-linear"}
R256 = {"r": 256, "alpha": 512, "targets": "all-linear"}

VARIANTS = [
    Variant("lora-bf16-qv", BF16, QV, raschka_gb=21.33),
    Variant("qlora-nf4-qv", NF4, QV, raschka_gb=14.18),
    Variant("qlora-nf4dq-qv", NF4 | {"double_quant": True}, QV, raschka_gb=13.84),
    Variant("qlora-fp4-qv", NF4 | {"quant": "fp4"}, QV),
    Variant("lora-bf16-all", BF16, ALL),
    Variant("qlora-nf4-all", NF4, ALL, raschka_gb=16.62),
    Variant("qlora-nf4-all-r256-adamw", NF4, R256, raschka_gb=17.86, extra=True),
    Variant("qlora-nf4-all-r256-sgd", NF4, R256, optimizer="sgd", raschka_gb=14.46, extra=True),
    Variant("qlora-nf4-qv-paged", NF4, QV, optimizer="paged-adamw", extra=True),
    Variant("qlora-int8-qv", {"dtype": "bfloat16", "quant": "int8"}, QV, extra=True),
    Variant("lora-bf16-qv-seq1024", BF16, QV, seq=1024, extra=True),
    Variant("qlora-nf4-qv-seq1024", NF4, QV, seq=1024, extra=True),
]


@dataclass
class Settings:
    big: str
    small: str
    steps: int
    seq: int
    small_steps: int = 2
    small_seq: int = 128
    micro_batch: int = 1
    lr: float = 3e-4
    seed: int = 0


@dataclass
class Clock:
    """Keeps the whole script inside its time budget: a run starts only if one as long as the
    longest so far still fits."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    longest: float = 0.0

    def fits(self) -> bool:
        return time.perf_counter() - self.start + self.longest * 1.2 < self.budget_s

    def took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def random_tokens(n: int, seq: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Rows of random token ids, all `seq` long: no padding, so every step sees seq tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=gen)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def collate(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def free(device: torch.device) -> None:
    """Return the previous run's memory, so each run's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_one(model_spec: dict[str, Any], method_name: str, method_cfg: dict[str, Any], optimizer: str,
            steps: int, seq: int, s: Settings, device: torch.device) -> dict[str, Any]:
    """One trial, as bench.run.worker runs it minus data and evaluation: load (and quantize) on the
    device, adapt, count, train with the one loop under PeakMemory."""
    spec = ModelSpec.from_dict(model_spec).to_dict()  # validated as a suite's [model] is
    t = TrainSpec(optimizer=optimizer, lr=s.lr, batch_size=s.micro_batch, max_steps=steps, warmup_steps=0,
                  schedule="constant", seed=s.seed).to_dict()
    out: dict[str, Any] = {"model": spec, "method": {"name": method_name, "config": method_cfg}, "train_spec": t, "seq": seq}
    start = time.perf_counter()
    loaded = models.load(spec, seed=s.seed, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out["load_s"] = time.perf_counter() - start
    out["quant"] = loaded.quant
    method = methods.get(method_name)
    torch.manual_seed(s.seed)
    adapted = method.apply(loaded.model, method.Config.from_dict(method_cfg))
    out["params"] = param_counts(adapted.model, adapted.trainable)
    out["weights_by_dtype"] = weight_bytes(adapted.model)
    data = random_tokens(steps * s.micro_batch, seq, loaded.model.config.vocab_size, s.seed)
    peak = PeakMemory(device)
    peak.start()
    start = time.perf_counter()
    try:
        trained = train(adapted, data, t, collate, device)
    finally:
        out["train_s"] = time.perf_counter() - start
        out["memory"] = peak.stop()
    out["memory"]["accounted"] = {"weights": sum(out["weights_by_dtype"].values()), **trained.accounted}
    out["step_s_median"] = trained.step_s_median
    out["step_times"] = trained.step_times
    out["tokens_per_s"] = trained.tokens / out["train_s"] if trained.steps else None
    out["loss_curve"] = trained.loss_curve
    out["optimizer_class"], out["optimizer_note"] = trained.optimizer_class, trained.optimizer_note
    return out


def attempt(fn, *args) -> dict[str, Any]:
    """Run, and record a failure (with its traceback) instead of stopping the script."""
    start = time.perf_counter()
    try:
        out = fn(*args) | {"status": "success", "error": None}
    except BaseException as exc:  # noqa: BLE001 -- every failure is a result here, OOM included
        if isinstance(exc, KeyboardInterrupt):
            raise
        oom = isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))
        out = {"status": "oom" if oom else "failed", "error": f"{type(exc).__name__}: {exc}"[:2000],
               "traceback": traceback.format_exc()[-4000:]}
    out["wall_s"] = time.perf_counter() - start
    return out


def gb(v: float | None) -> str:
    return f"{v / GB:6.2f}" if v is not None else "     -"


def variants_table(rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["name"] == "lora-bf16-qv" and r["status"] == "success"), None)
    lines = [f"{'variant':26s} {'status':7s} {'trainable':>11s} {'weights':>7s} {'peak':>7s} {'reserv':>7s} "
             f"{'raschka':>7s} {'step_s':>7s} {'x lora':>6s}  note"]
    for r in rows:
        if r["status"] != "success":
            lines.append(f"{r['name']:26s} {r['status']:7s} {r.get('error') or ''}"[:200])
            continue
        mem = r["memory"]
        ratio = f"{r['step_s_median'] / base['step_s_median']:6.2f}" if base and r["seq"] == base["seq"] else "     -"
        lines.append(f"{r['name']:26s} {r['status']:7s} {r['params']['trainable']:11,d} {gb(mem['accounted']['weights'])} "
                     f"{gb(mem['peak_bytes'])} {gb(mem.get('peak_reserved_bytes'))} "
                     f"{gb(r['raschka_gb'] * GB if r['raschka_gb'] else None)} {r['step_s_median']:7.3f} {ratio}  "
                     f"seq {r['seq']}{'; ' + r['optimizer_note'] if r['optimizer_note'] else ''}")
    return "\n".join(lines)


def methods_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'method':14s} {'base':8s} {'status':7s} {'trainable':>11s} {'step_s':>7s}  error"]
    for r in rows:
        ok = r["status"] == "success"
        step = f"{r['step_s_median']:7.3f}" if r.get("step_s_median") is not None else "      -"
        trainable = f"{r['params']['trainable']:11,d}" if ok else "          -"
        lines.append(f"{r['method_name']:14s} {r['base']:8s} {r['status']:7s} {trainable} {step}  "
                     f"{'' if ok else r['error']}"[:220])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_7b.json and summary.txt")
    ap.add_argument("--tiny", action="store_true", help="synthetic:llama-tiny, 2 steps: check the code paths (CPU is fine)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per 7B run (median after 2 warm-up steps)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per example (micro-batch 1)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no run that would end past this many seconds")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        s = Settings(big="synthetic:llama-tiny", small="synthetic:llama-tiny", steps=2, seq=32, small_seq=32)
    else:
        s = Settings(big="synthetic:llama-2-7b", small="synthetic:smollm2-135m", steps=args.steps, seq=args.seq)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget_s)
    report: dict[str, Any] = {
        "benchmark": "gpu_7b",  # how reports/results.py tells it from trial results
        "settings": vars(s) | {"device": str(device), "budget_s": args.budget_s},
        "env": results.environment(torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        "variants": [], "methods": [], "skipped": [],
    }

    def save() -> None:
        tmp = args.out / "gpu_7b.json.tmp"
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(args.out / "gpu_7b.json")

    def timed(label: str, fn, *fn_args) -> dict[str, Any] | None:
        if not clock.fits():
            report["skipped"].append(label)
            print(f"skip {label}: time budget", flush=True)
            return None
        out = attempt(fn, *fn_args)
        clock.took(out["wall_s"])
        free(device)
        print(f"{label}: {out['status']} in {out['wall_s']:.1f} s {out.get('error') or ''}", flush=True)
        return out

    def run_variants(extra: bool) -> None:
        for v in (v for v in VARIANTS if v.extra == extra):
            out = timed(v.name, run_one, {"name": s.big, **v.model}, "lora", v.lora, v.optimizer, s.steps,
                        v.seq or s.seq, s, device)
            if out is not None:
                report["variants"].append({"name": v.name, "raschka_gb": v.raschka_gb, "seq": v.seq or s.seq} | out)
                save()

    # Part 2 first: it is short, and it pays CUDA's and bitsandbytes' one-time start-up costs,
    # which would otherwise land in the first 7B run's load time.
    for name in methods.names():
        method = methods.get(name)
        # A method's first battery config if it has one (a small rank, say), else its defaults. On
        # the 4-bit base, the first one the method accepts there (GLoRA's first reads W0 itself).
        configs = getattr(method, "battery_configs", None) or [{}]
        for base, spec in (("float32", {}), ("nf4", {"quant": "nf4", "compute_dtype": "bfloat16"})):
            for cfg in configs if base == "nf4" else configs[:1]:
                out = timed(f"{name} on {base}", run_one, {"name": s.small, **spec}, name, cfg, "adamw",
                            s.small_steps, s.small_seq, s, device)
                if out is None or not (out["error"] or "").startswith("ConfigError"):
                    break
            if out is not None:
                report["methods"].append({"method_name": name, "base": base} | out)
                save()
    run_variants(extra=False)
    run_variants(extra=True)

    summary = (f"device: {report['env']['device']}; {s.big}, micro-batch {s.micro_batch}, {s.steps} steps; "
               f"GB = 1e9 bytes; peak = max allocated over training (weights included)\n\n"
               f"{variants_table(report['variants'])}\n\nevery method, {s.small_steps} steps on {s.small}:\n"
               f"{methods_table(report['methods'])}\n"
               + (f"\nskipped for time: {', '.join(report['skipped'])}\n" if report["skipped"] else "")
               + f"\ntotal {time.perf_counter() - clock.start:.0f} s\n")
    (args.out / "summary.txt").write_text(summary)
    save()
    print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
