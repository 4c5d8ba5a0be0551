"""Every method Hugging Face peft also has, against peft: training-step time and peak memory on SmolLM2-135M (CPU), in one run.

    python benchmarks/methods_vs_peft.py [--reps 5] [--methods dora,vera] [--json out.json]

For DoRA, LoRA-FA, VeRA, IA3, prompt tuning, prefix tuning and LLaMA-Adapter (peft's adaption
prompt), ours (methods.get(name).apply) and peft's (get_peft_model) are built from the same
settings (rank, alpha, targets, virtual tokens, adapter layers and length, init) on the same
frozen float32 SmolLM2-135M, and run the same loop on the same batch of real text (lora_step.py's):
forward with labels through the training loop's loss (bench/trial/loss.py), backward, a step of
the training loop's AdamW (lora_step.py's `adamw`). Every variant is timed rep by rep in turn,
so that machine noise hits all of them alike; peak memory is measured per variant in its own
forked process (resident-set high-water mark over two steps, after building), with the bytes
autograd saves for backward in one step, as lora_step.py does. Prints per method the median step
times, the ratios ours/peft (time, peak memory; the targets are <= 1.0) and both trainable counts, which
must be equal (a warning line says so when they are not).

LoRA-FA in peft 0.21 is `create_lorafa_optimizer`: it freezes every lora_A of a LoRA model and
returns LoraFAOptimizer, an AdamW that also projects B's gradient (methods/lora_fa.py). The model
is built that way here, and both sides then train with the loop's AdamW, as our LoRA-FA does.

The variants share one loaded copy of the frozen weights (each wraps its own module tree around
the same tensors), so the timed run holds one model's weights, not fourteen.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.lora_step when run as a script

import torch  # noqa: E402
from torch import nn  # noqa: E402

import methods  # noqa: E402
from bench import models  # noqa: E402
from bench.trial.loss import loss as train_loss  # noqa: E402
from bench.trial.measure import PeakMemory, saved_for_backward  # noqa: E402
from benchmarks.lora_step import adamw, make_batch  # noqa: E402

SIDES = ("ours", "peft")


@dataclass(frozen=True)
class Settings:
    """What both sides are built from; each field is a CLI option."""

    rank: int = 8
    """r of DoRA and LoRA-FA (alpha = 2 r, as lora_step.py)."""
    targets: str = "all-linear"
    """Layers DoRA, LoRA-FA and VeRA adapt."""
    vera_rank: int = 256
    """r of VeRA's shared random matrices (both libraries' default)."""
    prompt_tokens: int = 20
    """Soft-prompt length of prompt tuning (peft's num_virtual_tokens)."""
    prefix_tokens: int = 10
    """Prefix length of prefix tuning, no reparameterisation (peft's num_virtual_tokens, prefix_projection=False)."""
    adapter_len: int = 10
    """Adaption prompt length of LLaMA-Adapter."""
    adapter_layers: int = 8
    """Top layers that get an adaption prompt."""


@dataclass
class Built:
    """One variant ready to train: the model to call and the tensors its optimizer steps."""

    model: nn.Module
    trainable: list[nn.Parameter]

    @property
    def count(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.trainable}.values())


@dataclass(frozen=True)
class Pair:
    """One method as we build it and as peft does, from the same settings."""

    ours: Callable[[Settings], dict[str, Any]]
    """Our config (methods.get(name).Config.from_dict) for these settings."""
    peft: Callable[[nn.Module, Settings], Built]
    """peft's variant on a fresh base."""


def _peft_model(base: nn.Module, config: Any) -> Built:
    import peft

    model = peft.get_peft_model(base, config)
    return Built(model, [p for p in model.parameters() if p.requires_grad])


def _peft_lora(base: nn.Module, s: Settings, **extra: Any) -> Any:
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(r=s.rank, lora_alpha=2 * s.rank, lora_dropout=0.0, target_modules=s.targets, **extra))


def _peft_dora(base: nn.Module, s: Settings) -> Built:
    model = _peft_lora(base, s, use_dora=True)
    return Built(model, [p for p in model.parameters() if p.requires_grad])


def _peft_lora_fa(base: nn.Module, s: Settings) -> Built:
    from peft.optimizers import create_lorafa_optimizer

    model = _peft_lora(base, s)
    # Freezes every lora_A; its LoraFAOptimizer is not used (see the module docstring).
    create_lorafa_optimizer(model, r=s.rank, lora_alpha=2 * s.rank, lr=1e-4)
    return Built(model, [p for p in model.parameters() if p.requires_grad])


def _peft_vera(base: nn.Module, s: Settings) -> Built:
    import peft

    return _peft_model(base, peft.VeraConfig(r=s.vera_rank, target_modules=s.targets, projection_prng_key=0, d_initial=0.1))


def _peft_ia3(base: nn.Module, s: Settings) -> Built:
    import peft

    # peft's defaults for a Llama: k_proj and v_proj scaled on their outputs, down_proj on its input (the paper's l_k, l_v, l_ff).
    return _peft_model(base, peft.IA3Config(task_type="CAUSAL_LM"))


def _peft_prompt_tuning(base: nn.Module, s: Settings) -> Built:
    import peft

    built = _peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.prompt_tokens))
    with torch.no_grad():  # the paper's random init, as ours (peft's RANDOM keeps nn.Embedding's N(0, 1))
        built.model.prompt_encoder["default"].embedding.weight.uniform_(-0.5, 0.5)
    return built


def _peft_prefix_tuning(base: nn.Module, s: Settings) -> Built:
    import peft

    return _peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=s.prefix_tokens))


def _peft_llama_adapter(base: nn.Module, s: Settings) -> Built:
    import peft

    return _peft_model(base, peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=s.adapter_len, adapter_layers=s.adapter_layers))


def _low_rank(s: Settings) -> dict[str, Any]:
    return {"r": s.rank, "alpha": 2 * s.rank, "targets": s.targets}


PAIRS: dict[str, Pair] = {
    "dora": Pair(_low_rank, _peft_dora),
    "lora_fa": Pair(_low_rank, _peft_lora_fa),
    "vera": Pair(lambda s: {"r": s.vera_rank, "targets": s.targets, "d_init": 0.1, "seed": 0}, _peft_vera),
    "ia3": Pair(lambda s: {}, _peft_ia3),
    "prompt_tuning": Pair(lambda s: {"n_tokens": s.prompt_tokens, "init": "random"}, _peft_prompt_tuning),
    "prefix_tuning": Pair(lambda s: {"n": s.prefix_tokens}, _peft_prefix_tuning),
    "llama_adapter": Pair(lambda s: {"prompt_length": s.adapter_len, "layers": s.adapter_layers}, _peft_llama_adapter),
}


def sharing(base: nn.Module) -> nn.Module:
    """A copy of `base` with its own modules and Parameter objects over the same weight tensors:
    each variant wraps and freezes its own copy, none writes the frozen weights."""
    memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad) for p in base.parameters()}
    return copy.deepcopy(base, memo)


def build(method: str, side: str, base: nn.Module, s: Settings) -> Built:
    """Method `method` as `side` ("ours" or "peft") builds it, on a copy sharing base's weights, in train mode."""
    fresh = sharing(base)
    fresh.train()
    if side == "peft":
        built = PAIRS[method].peft(fresh, s)
    else:
        impl = methods.get(method)
        adapted = impl.apply(fresh, impl.Config.from_dict(PAIRS[method].ours(s)))
        built = Built(adapted.model, adapted.trainable)
    built.model.train()
    return built


def optimizer(built: Built) -> torch.optim.Optimizer:
    """The training loop's AdamW (fused where torch has the kernel), as lora_step.py steps both sides."""
    return adamw(built.trainable)


def step(built: Built, opt: torch.optim.Optimizer, ids: torch.Tensor) -> None:
    # The training loop's loss for both sides: it projects onto the vocabulary only the positions
    # whose next token is labelled where the model supports it (ours: all but each row's last, and
    # not a prompt's own positions); peft's wrapper models take their own loss over every position.
    train_loss(built.model, {"input_ids": ids, "labels": ids}).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def load_base() -> nn.Module:
    return models.load({"name": "smollm2-135m"}).model


def memory_child(method: str, side: str, s: Settings, ids: torch.Tensor, queue: Any) -> None:
    built = build(method, side, load_base(), s)
    opt = optimizer(built)
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    with saved_for_backward(built.model) as saved:
        step(built, opt, ids)
    # The second step runs with AdamW's state, allocated at the end of the first: the steady peak.
    step(built, opt, ids)
    queue.put({"peak_delta_bytes": peak.stop()["peak_delta_bytes"], "saved_bytes": saved["bytes"]})


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="interleaved timed steps per variant (after one warm-up step)")
    ap.add_argument("--methods", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    for field, default in asdict(Settings()).items():
        ap.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args(argv)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in PAIRS]
    if unknown or not chosen:
        ap.error(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose among {', '.join(PAIRS)}")
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    args.methods = chosen
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    settings = Settings(**{f: getattr(args, f) for f in asdict(Settings())})
    start = time.perf_counter()

    def progress(text: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {text}", flush=True)

    ids = make_batch(models.load_tokenizer({"name": "smollm2-135m"}), args.batch, args.seq)
    variants = [(m, side) for m in args.methods for side in SIDES]

    # Forked before this process computes anything with torch: a child forked after that can hang
    # in its thread pool. Each child loads the model itself.
    ctx = mp.get_context("fork")
    memory: dict[tuple[str, str], dict[str, int]] = {}
    for v in variants:
        progress(f"peak memory of {v[0]} ({v[1]}) in its own process")
        q = ctx.Queue()
        p = ctx.Process(target=memory_child, args=(*v, settings, ids, q))
        p.start()
        memory[v] = q.get()
        p.join()

    progress("building every variant")
    base = load_base()
    built = {v: build(*v, base, settings) for v in variants}
    opts = {v: optimizer(built[v]) for v in variants}
    progress("one warm-up step each")
    for v in variants:  # allocator, caches, lazy inits, AdamW state
        step(built[v], opts[v], ids)
    times: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    for rep in range(args.reps):
        progress(f"rep {rep + 1} of {args.reps}")
        for v in variants:
            t0 = time.perf_counter()
            step(built[v], opts[v], ids)
            times[v].append(time.perf_counter() - t0)

    results = {}
    for m in args.methods:
        med = {side: statistics.median(times[m, side]) for side in SIDES}
        mem = {side: memory[m, side] for side in SIDES}
        counts = {side: built[m, side].count for side in SIDES}
        results[m] = {
            "config": PAIRS[m].ours(settings),
            "step_s_median": med,
            "step_s_min": {side: min(times[m, side]) for side in SIDES},
            "memory": mem,
            "trainable": counts,
            "ratios": {
                "time": med["ours"] / med["peft"],
                "peak_memory": mem["ours"]["peak_delta_bytes"] / mem["peft"]["peak_delta_bytes"],
                "saved_bytes": mem["ours"]["saved_bytes"] / mem["peft"]["saved_bytes"],
            },
        }
    out = {
        "benchmark": "methods_vs_peft",
        "config": {"batch": args.batch, "seq": args.seq, "reps": args.reps, "settings": asdict(settings),
                   "threads": torch.get_num_threads(), "model": "smollm2-135m", "dtype": "float32"},
        "methods": results,
        "wall_s": time.perf_counter() - start,
    }
    progress("done")
    print(f"batch {args.batch} x {args.seq} tokens, {out['config']['threads']} threads, {args.reps} interleaved reps; "
          f"ratios are ours / peft (target <= 1.0)")
    print(f"{'method':14s} {'ours s':>7s} {'peft s':>7s} {'time':>6s} {'peak':>6s} {'saved':>6s} "
          f"{'ours MiB':>9s} {'peft MiB':>9s}  trainable ours / peft")
    for m, r in results.items():
        med, peak, n = r["step_s_median"], {side: r["memory"][side]["peak_delta_bytes"] / 2**20 for side in SIDES}, r["trainable"]
        ratios = " ".join(f"{r['ratios'][k]:6.3f}" for k in ("time", "peak_memory", "saved_bytes"))
        print(f"{m:14s} {med['ours']:7.3f} {med['peft']:7.3f} {ratios} {peak['ours']:9.0f} {peak['peft']:9.0f}  "
              f"{n['ours']:,} / {n['peft']:,}")
    for m, r in results.items():
        if r["trainable"]["ours"] != r["trainable"]["peft"]:
            print(f"WARNING: {m}: ours trains {r['trainable']['ours']:,} parameters, peft {r['trainable']['peft']:,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
