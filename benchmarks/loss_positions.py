"""The training step with the loss over labelled positions only (bench/trial/loss.py) against the
model's own loss over every position, and with the batch's rows packed end to end without padding
(bench/tasks/tokens.py collate_packed) against padded rows, side by side in one run.

    python benchmarks/loss_positions.py [--reps 8] [--threads 1] [--json out.json]

SmolLM2-135M with LoRA r=8 on q and v, lora_sweep's data (SST-2, batch 8, answer-only labels):
forward, backward and the AdamW step, the four variants (every position padded, labelled padded,
labelled packed: what training runs now, and packed in bins no wider than the longest row)
interleaved rep by rep so that machine noise hits all alike. Prints the median step times, their ratios and the losses of the first batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import methods  # noqa: E402
from bench import models  # noqa: E402
from bench.tasks import data  # noqa: E402
from bench.trial.loss import batch_shape, loss, width_cost  # noqa: E402
from bench.trial.train import OPTIMIZERS, batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (lora_sweep's lanes run one)")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = models.load_tokenizer({"name": "smollm2-135m"})
    prepared = data.prepare({"task": "sst2", "train_examples": 256, "max_length": 128}, tokenizer, seed=0)
    def draw(collate) -> list[dict[str, torch.Tensor]]:  # the same rows in the same order for every variant
        stream = batches(prepared.train, {"batch_size": 8, "seed": 0}, collate, torch.device("cpu"))
        return [next(stream) for _ in range(args.reps + 1)]

    lora = methods.get("lora")
    adapted = lora.apply(models.load({"name": "smollm2-135m"}).model, lora.Config(r=8, alpha=16, targets="qv"))
    model = adapted.model
    padded, packed = draw(prepared.collate), draw(prepared.collate_for(width_cost(model)))
    narrow = draw(prepared.collate_for(1.0))  # attention priced high: bins as wide as the longest row
    model.train()
    optimizer = OPTIMIZERS["adamw"]([{"params": adapted.trainable}], {"lr": 0.0, "weight_decay": 0.0})  # lr 0: same weights every rep
    variants = {"labelled": (padded, lambda b: loss(model, b)), "every position": (padded, lambda b: model(**b).loss),
                "labelled, packed": (packed, lambda b: loss(model, b)), "labelled, narrow bins": (narrow, lambda b: loss(model, b))}
    first = {name: f(batch_list[0]).item() for name, (batch_list, f) in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(1, args.reps + 1):
        for name, (batch_list, f) in variants.items():
            t0 = time.perf_counter()
            f(batch_list[rep]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    shapes = [batch_shape(b) for b in padded[1:]]
    out = {"benchmark": "loss_positions", "threads": args.threads, "reps": args.reps, "step_s_median": med,
           "ratio_labelled_over_every": med["labelled"] / med["every position"],
           "ratio_packed_over_padded": med["labelled, packed"] / med["labelled"],
           "ratio_narrow_bins_over_padded": med["labelled, narrow bins"] / med["labelled"], "first_batch_loss": first,
           "positions": {"labelled": sum(s[2] for s in shapes), "every": sum(s[0] * s[1] for s in shapes),
                         "packed": sum(batch_shape(b)[0] * batch_shape(b)[1] for b in packed[1:]),
                         "narrow bins": sum(batch_shape(b)[0] * batch_shape(b)[1] for b in narrow[1:])}}
    print(f"LoRA r=8 qv on SmolLM2-135M, SST-2 batches of 8, {args.threads} thread(s), {args.reps} interleaved reps")
    for name in variants:
        print(f"  {name:21s} step median {med[name]:.3f} s  first-batch loss {first[name]:.6f}")
    print(f"  head rows: {out['positions']['labelled']} labelled of {out['positions']['every']} positions; "
          f"packed: {out['positions']['packed']} positions; narrow bins: {out['positions']['narrow bins']}")
    print(f"  labelled / every position: {out['ratio_labelled_over_every']:.3f}")
    print(f"  packed / padded (both labelled): {out['ratio_packed_over_padded']:.3f}")
    print(f"  narrow bins / padded (both labelled): {out['ratio_narrow_bins_over_padded']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
