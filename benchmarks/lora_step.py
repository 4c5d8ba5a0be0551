"""LoRA training-step cost on SmolLM2-135M (CPU), measured side by side in one run.

    python benchmarks/lora_step.py [--reps 12] [--rank 8] [--json out.json]

Three steps, interleaved rep by rep so that machine noise hits all of them alike:
  floor  backward to the inputs through the frozen model: the least any adapter can cost
  ours   our LoRA (methods/lora.py) on all linear layers: forward, backward, AdamW step
  peft   Hugging Face peft's LoRA with the same rank, alpha and targets, same loop
Both adapters step with the training loop's AdamW (bench/trial/train.py OPTIMIZERS["adamw"], fused
on the CPU), so ours/peft compares the adapters alone and ours/floor the whole step as trials run it.
Peak memory is measured per variant in its own forked process (resident-set high-water mark
over the steps, after loading), plus the bytes autograd saves for backward in one step.
Prints medians and the ratios issue #21 targets: ours/floor <= 1.10 (three consecutive runs on a
quiet machine), ours/peft <= 1.0 for step time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import methods  # noqa: E402
from bench import models  # noqa: E402
from bench.trial import flops  # noqa: E402
from bench.trial.evaluate import forgetting_texts  # noqa: E402
from bench.trial.measure import PeakMemory, saved_for_backward  # noqa: E402
from bench.trial.train import OPTIMIZERS  # noqa: E402


def make_batch(tokenizer, batch: int, seq: int) -> torch.Tensor:
    """Real text, cut into full windows so every row has exactly `seq` tokens (no padding)."""
    ids = tokenizer("\n\n".join(forgetting_texts(64)))["input_ids"]
    return torch.tensor(ids[: batch * seq]).view(batch, seq)


def adamw(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The training loop's AdamW as a trial with the suite defaults (lr 1e-4, no weight decay) builds it."""
    return OPTIMIZERS["adamw"]([{"params": params}], {"lr": 1e-4, "weight_decay": 0.0})


def build(variant: str, rank: int):
    base = models.load({"name": "smollm2-135m"}).model
    base.train()
    if variant == "floor":
        for p in base.parameters():
            p.requires_grad_(False)
        return base, None
    if variant == "ours":
        lora = methods.get("lora")
        adapted = lora.apply(base, lora.Config(r=rank, alpha=2 * rank, targets="all-linear"))
        return base, adamw(adapted.trainable)
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    model = peft.get_peft_model(base, cfg)
    return model, adamw([p for p in model.parameters() if p.requires_grad])


def step(model, optimizer, ids: torch.Tensor) -> dict[str, float]:
    """One training step; returns its phases' seconds (benchmarks/lora_overhead.py splits the gap by them)."""
    t0 = time.perf_counter()
    if optimizer is None:  # the floor: gradients reach the input embeddings only
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=ids).loss
    else:
        loss = model(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


def step_flops(model, optimizer, ids: torch.Tensor) -> int:
    """The matmul FLOPs of one `step` (bench/trial/flops.py: forward, backward to what needs a gradient,
    weight gradients where weights train), read from one forward of the same inputs."""
    if optimizer is None:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return flops.step_flops(flops.forward_products(model, {"inputs_embeds": embeds, "labels": ids}))
    return flops.step_flops(flops.forward_products(model, {"input_ids": ids, "labels": ids}))


def memory_child(variant: str, rank: int, ids: torch.Tensor, queue) -> None:
    model, optimizer = build(variant, rank)
    peak = PeakMemory(torch.device("cpu"))
    peak.start()
    with saved_for_backward(model) as saved:
        step(model, optimizer, ids)
    for _ in range(2):
        step(model, optimizer, ids)
    queue.put({"peak_delta_bytes": peak.stop()["peak_delta_bytes"], "saved_bytes": saved["bytes"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()

    tokenizer = models.load_tokenizer({"name": "smollm2-135m"})
    ids = make_batch(tokenizer, args.batch, args.seq)
    variants = ["floor", "ours", "peft"]

    ctx = mp.get_context("fork")
    memory = {}
    for v in variants:
        q = ctx.Queue()
        p = ctx.Process(target=memory_child, args=(v, args.rank, ids, q))
        p.start()
        memory[v] = q.get()
        p.join()

    built = {v: build(v, args.rank) for v in variants}
    counted = {v: step_flops(*built[v], ids) for v in variants}  # before the timed steps, as in a trial
    peak = flops.peak_flops("cpu", torch.get_num_threads())
    for v in variants:  # warm-up: allocator, caches, lazy inits
        step(*built[v], ids)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.reps):
        for v in variants:
            t0 = time.perf_counter()
            step(*built[v], ids)
            times[v].append(time.perf_counter() - t0)

    med = {v: statistics.median(times[v]) for v in variants}
    out = {
        "benchmark": "lora_step",  # how reports/results.py tells it from trial results
        "config": vars(args) | {"threads": torch.get_num_threads(), "model": "smollm2-135m", "dtype": "float32",
                                "optimizer": f"{type(built['ours'][1]).__name__} fused={built['ours'][1].defaults.get('fused')}"},
        "step_s_median": med,
        "step_s_min": {v: min(times[v]) for v in variants},
        "memory": memory,
        "utilization": {v: {"step_flops": counted[v], "achieved_flops_per_s": counted[v] / med[v],
                            "fraction": counted[v] / med[v] / peak.flops_per_s} for v in variants} | {"peak": peak.to_dict()},
        "ratios": {
            "ours_over_floor_time": med["ours"] / med["floor"],
            "ours_over_peft_time": med["ours"] / med["peft"],
            "ours_over_peft_peak_memory": memory["ours"]["peak_delta_bytes"] / memory["peft"]["peak_delta_bytes"],
            "ours_over_peft_saved_bytes": memory["ours"]["saved_bytes"] / memory["peft"]["saved_bytes"],
        },
    }
    print(f"batch {args.batch} x {args.seq} tokens, LoRA r={args.rank} all-linear, {out['config']['threads']} threads, "
          f"{args.reps} interleaved reps, {out['config']['optimizer']}")
    for v in variants:
        print(f"  {v:5s} step median {med[v]:.3f} s (min {min(times[v]):.3f})  "
              f"peak +{memory[v]['peak_delta_bytes'] / 2**20:.0f} MiB  saved-for-backward {memory[v]['saved_bytes'] / 2**20:.0f} MiB")
    for k, r in out["ratios"].items():
        print(f"  {k}: {r:.3f}")
    print(f"  utilization against the {peak.flops_per_s / 1e9:.1f} GFLOP/s matmul peak ({peak.source}, {peak.machine_class}, "
          f"{peak.threads} threads): " + ", ".join(
              f"{v} {counted[v] / 1e9:.0f} GFLOP/step, {out['utilization'][v]['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"{100 * out['utilization'][v]['fraction']:.1f}%" for v in variants))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
