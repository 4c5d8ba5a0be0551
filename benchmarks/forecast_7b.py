"""The memory forecast (bench/trial/forecast.py) for Llama-2-7B on a CUDA device, on paper (no GPU here):
against the H200 measurements in results/reference/gpu/gpu_7b.json and against Raschka's published
Llama-2-7B LoRA and QLoRA peaks (DESIGN.md section 7).

    python benchmarks/forecast_7b.py [--gpu results/reference/gpu/gpu_7b.json]

Each H200 variant is forecast from its stored spec and sequence length (random tokens, micro-batch 1,
no padding: benchmarks/gpu_7b.py), per accounted component and for the peak (max_memory_allocated).
Raschka's runs used lit-gpt (its own Llama, chunked cross-entropy) on Alpaca with micro-batch 1;
the peak is set by the longest example, which the article does not state: the forecast is printed for
a range of lengths, with the error of each against the published figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.trial import forecast  # noqa: E402

GB = 1e9
TRAIN = {"optimizer": "adamw", "lr": 3e-4, "batch_size": 1, "grad_accum": 1, "epochs": 1, "max_steps": 1,
         "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "momentum": 0.9, "clip": 1.0, "seed": 0}
LORA_QV = {"name": "lora", "config": {"r": 8, "alpha": 16, "targets": "qv"}}
RASCHKA = [  # (name, [model], published GB): DESIGN.md section 7
    ("LoRA bf16, r=8 q,v", {"name": "synthetic:llama-2-7b", "dtype": "bfloat16"}, 21.33),
    ("QLoRA nf4, r=8 q,v", {"name": "synthetic:llama-2-7b", "dtype": "bfloat16", "quant": "nf4", "double_quant": False,
                            "compute_dtype": "bfloat16"}, 14.18),
]
LENGTHS = (256, 512, 1024, 1304, 2048)


def spec_of(model: dict, method: dict, train: dict) -> dict:
    return {"model": model, "method": method, "train": train, "data": {"task": "none"}, "eval": {}}


def gpu_rows(path: Path) -> list[str]:
    report = json.loads(path.read_text())
    lines = [f"H200 measurements ({path}): forecast / measured - 1, per accounted component and peak",
             f"{'variant':26s} {'weights':>8s} {'grads':>7s} {'optim':>7s} {'activ':>7s} {'accounted':>9s} "
             f"{'peak GB':>8s} {'fcast GB':>8s} {'peak err':>8s}"]
    for v in report["variants"]:
        if v.get("status") != "success":
            continue
        f = forecast.forecast(spec_of(v["model"], v["method"], v["train_spec"]), device="cuda",
                              batch=forecast.Batch.tokens(1, v["seq"]))
        m = v["memory"]["accounted"]
        errs = [f"{(getattr(f, k) / m[k] - 1) * 100:+6.1f}%" if m[k] else "      -" for k in forecast.COMPONENTS]
        total = sum(m.values())
        peak = v["memory"]["peak_bytes"]
        lines.append(f"{v['name']:26s} {' '.join(errs)} {(f.accounted / total - 1) * 100:+8.1f}% "
                     f"{peak / GB:8.2f} {f.peak / GB:8.2f} {(f.peak / peak - 1) * 100:+7.1f}%")
    return lines


def raschka_rows() -> list[str]:
    lines = ["Raschka, Llama-2-7B on an A100 with lit-gpt, micro-batch 1 (published peak GB; forecast at each longest-example length)",
             f"{'run':22s} {'published':>9s} " + " ".join(f"{n:>14d}" for n in LENGTHS)]
    for name, model, published in RASCHKA:
        cells = []
        for n in LENGTHS:
            f = forecast.forecast(spec_of(model, LORA_QV, TRAIN), device="cuda", batch=forecast.Batch.tokens(1, n))
            cells.append(f"{f.peak / GB:6.2f} {(f.peak / GB / published - 1) * 100:+6.1f}%")
        lines.append(f"{name:22s} {published:9.2f} " + " ".join(cells))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu", default=str(Path(__file__).resolve().parent.parent / "results/reference/gpu/gpu_7b.json"))
    args = ap.parse_args(argv)
    print("\n".join(gpu_rows(Path(args.gpu))))
    print()
    print("\n".join(raschka_rows()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
