"""Does re-quantizing already-4-bit weights to NF4 cost less (or more) than quantizing float ones?

    python benchmarks/nf4_roundtrip.py [--out FILE]

The packaged SmolLM2-135M weights were rounded to GGUF Q4_1 upstream (blocks of 32 weights,
16 affine levels between the block's min and max) and are dequantized on load, so QLoRA's NF4
quantizes weights that are already quantized. Whether that matters is measured here, with
bitsandbytes' own quantize_4bit / dequantize_4bit (blocksize 64, QLoRA's default), as the median
over linear layers (output head excluded, as in bench.models.quant) of the relative round-trip error
||W - deq(quant(W))||_F / ||W||_F, for four sources of the same layer shapes:

- smollm2:           the packaged SmolLM2-135M-Instruct weights (GGUF Q4_1, dequantized);
- minilm:            the packaged all-MiniLM-L6-v2 weights (a float checkpoint, never quantized);
- gaussian:          N(row mean, row std) of each SmolLM2 layer: float weights of the same scale;
- gaussian after Q4_1: the same Gaussian rounded by Q4_1 first, then NF4: the GGUF history
                       reproduced on weights whose float originals are known.

If the Q4_1 grid helped NF4, the two last rows (and smollm2 against minilm) would differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.models import minilm_dir, smollm2_dir  # noqa: E402

BLOCKSIZE = 64
Q4_1_BLOCK = 32
KINDS = {"nf4": ("nf4", False), "nf4+DQ": ("nf4", True), "fp4": ("fp4", False)}


def roundtrip(w: torch.Tensor, quant_type: str, double_quant: bool) -> torch.Tensor:
    from bitsandbytes import functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type,
                                                 compress_statistics=double_quant)
    return bnb_functional.dequantize_4bit(packed, state, quant_type=quant_type).float()


def q4_1(w: torch.Tensor) -> torch.Tensor:
    """GGUF's Q4_1 round trip: per block of 32, 16 levels spaced evenly from the block's min to max."""
    blocks = w.reshape(-1, Q4_1_BLOCK)
    lo, hi = blocks.min(1, keepdim=True).values, blocks.max(1, keepdim=True).values
    step = ((hi - lo) / 15).clamp_min(torch.finfo(w.dtype).tiny)
    return (torch.round((blocks - lo) / step) * step + lo).reshape(w.shape)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m.weight.detach().float() for m in model.modules() if isinstance(m, nn.Linear) and m is not head]


def medians(weights: list[torch.Tensor]) -> dict[str, float]:
    errors = {kind: [relative_error(roundtrip(w, *args), w) for w in weights] for kind, args in KINDS.items()}
    return {kind: statistics.median(v) for kind, v in errors.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(0)
    smollm2 = linear_weights(AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32))
    gaussian = [torch.randn_like(w) * w.std(1, keepdim=True) + w.mean(1, keepdim=True) for w in smollm2]
    sources = {
        "smollm2 (GGUF Q4_1, dequantized)": smollm2,
        "minilm (float checkpoint)": linear_weights(AutoModel.from_pretrained(minilm_dir(), dtype=torch.float32)),
        "gaussian, SmolLM2 shapes and row scales": gaussian,
        "gaussian after a Q4_1 round trip": [q4_1(w) for w in gaussian],
    }
    lines = [f"{'source':42s} {'layers':>6s} " + " ".join(f"{k:>8s}" for k in KINDS)]
    for name, weights in sources.items():
        m = medians(weights)
        lines.append(f"{name:42s} {len(weights):6d} " + " ".join(f"{100 * m[k]:7.2f}%" for k in KINDS))
    q41 = statistics.median(relative_error(q4_1(w), w) for w in gaussian)
    lines.append(f"(Q4_1 itself on the gaussian weights: {100 * q41:.2f}%)")
    text = "median relative round-trip error ||W - deq(quant(W))|| / ||W|| per linear layer, bitsandbytes, blocksize 64\n"
    text += "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"$ python benchmarks/nf4_roundtrip.py --out {args.out}\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
