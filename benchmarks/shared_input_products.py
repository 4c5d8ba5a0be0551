"""What fusing the LoRA branches that share an input would save per step (issue #21's untried lever), in one run.

    python benchmarks/shared_input_products.py [--reps 9] [--rank 8] [--json out.json]

q, k and v read the same normed hidden states, as do gate and up. Their branches' input-side
products (forward u = x A^T, backward dA = up^T x and dx += up A) could run as one product per
group with the A's stacked ([3r, in] for q/k/v, [2r, in] for gate/up), reading x once instead of
three or two times and handing the BLAS a wider, less thin operand. This times both ways on
SmolLM2-135M's shapes at lora_step.py's 4 x 128 tokens, every one of the 30 blocks with its own
tensors (cold caches, as in a step; benchmarks/lora_overhead.py's branch_products does the same),
interleaved rep by rep, and prints the saving per step: the most this lever can take off the
gap between our LoRA step and the floor (lora_overhead.py), before the extra autograd node and
slices a real grouping would add. Output-side products (h B^T, g B, dB) stay per layer either way:
their outputs are separate tensors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import AutoConfig

from bench import models


def input_side(x: torch.Tensor, As: list[torch.Tensor], ups: list[torch.Tensor], dx: torch.Tensor) -> None:
    """The three input-side products of each branch, one branch after the other (methods/lora.py today)."""
    for A, up in zip(As, ups, strict=True):
        torch.mm(x, A.t())
        torch.mm(up.t(), x)
        dx.addmm_(up, A)


def fused(x: torch.Tensor, A: torch.Tensor, up: torch.Tensor, dx: torch.Tensor) -> None:
    """The same products with the group's A's stacked and its up's side by side."""
    torch.mm(x, A.t())
    torch.mm(up.t(), x)
    dx.addmm_(up, A)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512, help="lora_step.py's batch: 4 x 128")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    config = AutoConfig.from_pretrained(models.smollm2_dir())
    hidden, blocks, r, n = config.hidden_size, config.num_hidden_layers, args.rank, args.tokens
    groups = {"q/k/v": 3, "gate/up": 2}
    data = {name: [(torch.randn(n, hidden), [torch.randn(r, hidden) for _ in range(k)], [torch.randn(n, r) for _ in range(k)],
                    torch.randn(n, hidden)) for _ in range(blocks)] for name, k in groups.items()}
    stacked = {name: [(x, torch.cat(As), torch.cat(ups, dim=1), dx) for x, As, ups, dx in layers] for name, layers in data.items()}
    ways = {f"{name} {way}": (lambda name=name, way=way: [
        input_side(*layer) if way == "separate" else fused(*layer) for layer in (data if way == "separate" else stacked)[name]])
        for name in groups for way in ("separate", "fused")}
    for run in ways.values():
        run()  # warm-up: first-touch page faults and BLAS buffers
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.reps):
        for k, run in ways.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    saving = {name: med[f"{name} separate"] - med[f"{name} fused"] for name in groups}
    out = {"benchmark": "shared_input_products",
           "config": {"reps": args.reps, "rank": r, "tokens": n, "blocks": blocks, "hidden": hidden, "threads": torch.get_num_threads()},
           "step_s_median": med, "saving_s": saving, "saving_per_step_s": sum(saving.values())}
    print(f"{args.reps} interleaved reps, {out['config']['threads']} threads, rank {r}, {n} tokens, {blocks} blocks, hidden {hidden}")
    for name in groups:
        print(f"  {name:8s} separate {1e3 * med[f'{name} separate']:6.1f} ms  fused {1e3 * med[f'{name} fused']:6.1f} ms  "
              f"saving {1e3 * saving[name]:+6.1f} ms per step")
    print(f"  saving per step, both groups: {1e3 * out['saving_per_step_s']:.1f} ms (the input-side products only)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
