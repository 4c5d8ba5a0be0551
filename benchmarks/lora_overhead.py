"""Where our LoRA step's time goes beyond the floor (benchmarks/lora_step.py's variants), in one run.

    python benchmarks/lora_overhead.py [--reps 12] [--json out.json]

Three measurements, so that the gap ours - floor splits into parts that each have a cause:
  phases    forward, backward and optimizer step of floor and ours at lora_step's batch (4 x 128 tokens),
            interleaved rep by rep, the gap taken within each (floor, ours) pair: which phase it sits in
  fixed     the same two steps at 1 x 4 tokens, where the matmuls cost next to nothing: the per-step
            cost that does not grow with tokens (Python, op dispatch, autograd nodes, thread wake-ups)
  products  the six rank-r products of methods/lora.py's LowRankLinear (two forward, four backward)
            of every adapted layer, on random tensors of its shapes at the batch's token count, layer
            after layer (each its own tensors, so caches are as cold as in a step): the branch's arithmetic
The remainder (gap - fixed - products) is what neither explains: memory traffic of the extra
addmm_ passes, cache effects of interleaving. Same model, rank, targets and AdamW as lora_step.py.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch

import lora_step as L
from bench import models
from methods.lora import lora_layers


def branch_products(tokens: int, shapes: list[tuple[int, int]], r: int, scaling: float = 2.0, reps: int = 5) -> float:
    """Seconds for the six branch products of every layer in `shapes` (in, out), one layer after the
    other, written as LowRankLinear writes them. Each layer has its own tensors, as in a step: timed
    on one layer's tensors over and over, they stay in cache and the branch looks 20-30% cheaper."""
    layers = [(torch.randn(tokens, fin), torch.randn(tokens, fout), torch.randn(r, fin), torch.randn(fout, r),
               torch.randn(tokens, fout), torch.randn(tokens, fin)) for fin, fout in shapes]

    def six() -> None:
        for x, g, A, B, out, dx in layers:
            down = torch.mm(x, A.t())
            out.addmm_(down, B.t(), alpha=scaling)
            up = torch.mm(g, B).mul_(scaling)
            dx.addmm_(up, A)
            torch.mm(up.t(), x)
            torch.mm(down.t(), g).mul_(scaling).t()

    six()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        six()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    tokenizer = models.load_tokenizer({"name": "smollm2-135m"})
    batches = {"4x128": L.make_batch(tokenizer, 4, 128), "1x4": L.make_batch(tokenizer, 1, 4)}
    variants = ["floor", "ours"]
    built = {v: L.build(v, args.rank) for v in variants}

    for ids in batches.values():  # warm-up
        for v in variants:
            L.step(*built[v], ids)
    times: dict[tuple[str, str], list[dict[str, float]]] = collections.defaultdict(list)
    for _ in range(args.reps):
        for b, ids in batches.items():
            for v in variants:
                times[b, v].append(L.step(*built[v], ids))
    med = {f"{v} {b}": {p: statistics.median(t[p] for t in times[b, v]) for p in times[b, v][0]} for b, v in times}

    shapes = [(layer.in_features, layer.out_features) for layer in lora_layers(built["ours"][0]).values()]
    del built  # the products' tensors take their place
    tokens = batches["4x128"].numel()
    products_s = branch_products(tokens, shapes, args.rank)
    products_flops = sum(2 * tokens * args.rank * 3 * (fin + fout) for fin, fout in shapes)  # six products: x and g each meet A or B thrice

    def paired(b: str, phase: str) -> float:
        """The median over reps of ours minus the floor step just before it: slow drifts of the
        machine, which move whole runs by more than the gap itself, cancel within a pair."""
        return statistics.median(o[phase] - f[phase] for f, o in zip(times[b, "floor"], times[b, "ours"]))

    gap = {p: paired("4x128", p) for p in med["ours 4x128"]}
    fixed = paired("1x4", "step")
    out = {"benchmark": "lora_overhead",
           "config": {"reps": args.reps, "rank": args.rank, "threads": torch.get_num_threads(), "model": "smollm2-135m",
                      "targets": "all-linear", "tokens": tokens},
           "step_s_median": med, "gap_s": gap, "fixed_gap_s": fixed, "products_s": products_s, "products_flops": products_flops,
           "adapted_layers": {f"{i}->{o}": n for (i, o), n in collections.Counter(shapes).items()},
           "remainder_s": gap["step"] - fixed - products_s,
           "ours_over_floor_time": med["ours 4x128"]["step"] / med["floor 4x128"]["step"],
           "ours_over_floor_time_paired": statistics.median(
               o["step"] / f["step"] for f, o in zip(times["4x128", "floor"], times["4x128", "ours"]))}

    print(f"{args.reps} interleaved reps, {out['config']['threads']} threads, LoRA r={args.rank} all-linear "
          f"({len(shapes)} layers)")
    for k, m in med.items():
        print(f"  {k:11s} " + "  ".join(f"{p} {s * 1e3:7.1f} ms" for p, s in m.items()))
    print("  gap at 4x128 (median of paired differences): " + "  ".join(f"{p} {s * 1e3:+.1f} ms" for p, s in gap.items())
          + f"  (ours/floor: ratio of medians {out['ours_over_floor_time']:.3f}, median of paired ratios "
            f"{out['ours_over_floor_time_paired']:.3f})")
    print(f"  fixed (paired gap at 1x4 tokens): {fixed * 1e3:+.1f} ms")
    print(f"  branch products at {tokens} tokens, every adapted layer's own tensors: {products_s * 1e3:.1f} ms, "
          f"{products_flops / 1e9:.1f} GFLOP = {products_flops / products_s / 1e9:.1f} GFLOP/s ("
          + ", ".join(f"{n} x {k}" for k, n in out["adapted_layers"].items()) + ")")
    print(f"  remainder: {out['remainder_s'] * 1e3:+.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
