"""LQ-LoRA's initial reconstruction error against LoftQ and plain quantization at equal bits.

    python benchmarks/lqlora_error.py [--layers 0,14,29] [--modules q_proj,v_proj] [--r 64]

The small-scale version of the paper's comparison (Guo et al. 2023, arXiv 2311.12023,
Section 3.1 and Figure 1: ||W - (Q + L1 L2)||_F of LQ-LoRA's decomposition against QLoRA's
||W - quantize(W)||_F, per LLaMA-2 matrix) on SmolLM2-135M's real weights. Every row stores the
same bits per weight: NF-k codes with the authors' default double-quantized scales (8-bit
absmax codes, B0 = 64, B1 = 256, fp32), k.127 bits. Rows:

- plain:      W - quantize(W), what QLoRA starts from (B = 0);
- LoftQ T=1:  quantize W first, then the SVD of the residual (peft's default);
- LoftQ T=5:  five alternations (the paper's ablation range), best iterate kept;
- LQ-LoRA:    SVD of W first, then quantize W - L1 L2, iterate until the error rises;
- LQ-LoRA ILP: per-matrix NF bits in {2, 3, 4} x B0 in {16, 32, 64} under the budget
               of the uniform row's bits (the paper's mixed-configuration allocation).

Errors are the sum over the chosen matrices of ||W - (Q + L1 L2)||_F^2, printed as its root
and relative to plain NF. Needs the SmolLM2 asset (`peftbench assets`); the weights were 4-bit
GGUF upstream (DESIGN section 5); NF4 loses as much on them as on float weights
(benchmarks/nf4_roundtrip.py).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from methods.loftq import decompose as loftq_decompose  # noqa: E402
from methods.lqlora import QConfig, decompose as lq_decompose, solve  # noqa: E402
from methods.quantizers import ScaleQuant, quantize  # noqa: E402

SCALES = ScaleQuant(8, "fp32", 256)
"""The authors' default second level (models/allocation_utils.py "nf3" / "nf4")."""


def load_weights(layers: list[int], modules: list[str]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from bench.models import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    named = dict(model.named_modules())
    out = {}
    for i in layers:
        for m in modules:
            kind = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{i}.{kind}.{m}"
            out[name] = named[name].weight.detach().float()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="0,14,29")
    parser.add_argument("--modules", default="q_proj,v_proj")
    parser.add_argument("--r", type=int, default=64, help="LoRA rank (the paper's LLaMA-2 runs use 64)")
    parser.add_argument("--bits", default="2,3,4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    weights = load_weights([int(x) for x in args.layers.split(",")], args.modules.split(","))
    numel = [w.numel() for w in weights.values()]
    r = args.r
    ilp_space = [QConfig(b, s, SCALES) for b in (2, 3, 4) for s in (16, 32, 64)]
    start = time.perf_counter()
    # Squared errors per matrix of each ILP candidate (LQ-LoRA's decomposition), computed once.
    table = [[lq_decompose(w, r, 1.0, qc).error ** 2 for qc in ilp_space] for w in weights.values()]
    costs = [[n * qc.bits_per_weight for qc in ilp_space] for n in numel]
    print(f"SmolLM2-135M, {len(weights)} matrices ({args.modules} of layers {args.layers}), r = {r}; "
          "error = sqrt(sum ||W - (Q + L1 L2)||_F^2)\n")
    heads = ["plain (QLoRA)", "LoftQ T=1", "LoftQ T=5", "LQ-LoRA", "LQ-LoRA ILP"]
    print("| NF bits | bits/param | " + " | ".join(f"{h:>13}" for h in heads) + " |")
    print("|---|---|---|---|---|---|---|")
    for bits in (int(x) for x in args.bits.split(",")):
        qc = QConfig(bits, 64, SCALES)

        def quantizer(x: torch.Tensor, bits: int = bits) -> object:
            return quantize(x, "nf", bits, 64, SCALES)

        plain = loftq1 = loftq5 = lq = 0.0
        for w in weights.values():
            plain += float((w - quantizer(w).dequantize()).norm()) ** 2
            loftq1 += loftq_decompose(w, r, 1.0, 1, quantizer).error ** 2
            loftq5 += loftq_decompose(w, r, 1.0, 5, quantizer).error ** 2
            lq += lq_decompose(w, r, 1.0, qc).error ** 2
        choice, _ = solve(table, costs, qc.bits_per_weight * sum(numel))
        ilp = sum(table[i][c] for i, c in enumerate(choice))
        used = sum(costs[i][c] for i, c in enumerate(choice)) / sum(numel)
        cells = [math.sqrt(x) for x in (plain, loftq1, loftq5, lq, ilp)]
        text = " | ".join(f"{c:6.2f} ({c / cells[0]:4.0%})" for c in cells)
        print(f"| {bits} | {qc.bits_per_weight:.3f} (ILP {used:.3f}) | {text} |")
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
