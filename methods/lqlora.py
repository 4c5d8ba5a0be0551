"""LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning (Guo et al. 2023, arXiv 2311.12023).

Each target W is decomposed as W ~= deq(Q) + L1 L2 by the same alternating minimisation as
LoftQ (quantize the residual of the low-rank part, then take the rank-r SVD of what the
quantization left), and only L1 (= scaling * B) and L2 (= A) are trained. What LQ-LoRA adds is
a per-matrix quantization configuration c = (bits, blocksize), bits in {2, 3, 4, 8} and
blocksize in {64, 128} by default, chosen by an integer linear program:

    minimise   sum_i err_i(c_i)           err_i(c) = ||W_i - (deq(Q_i^c) + L1 L2)||_F^2
    subject to sum_i numel_i * bits(c_i) <= budget * sum_i numel_i,  one c per matrix

where bits(c) is the stored bits per weight including the block scales (see
methods/quantizers.py). The ILP is solved exactly with scipy.optimize.milp (HiGHS); without
scipy, a greedy upgrade by error saved per extra bit stands in (not exact).

Deviations: the quantizer is NF-k (the paper's) with float32 absmax, not the paper's
second-level 8-bit quantization of the absmax, so a block costs 32 bits of scale (budget
figures are not directly comparable with the paper's); quant_type = "int" uses the min-max
INT-k quantizer shared with QA-LoRA instead. The errors are unweighted Frobenius norms: the
paper's Fisher-weighted variant (which needs calibration data and gradients) is not
implemented. The plan costs one decomposition per (matrix, config) pair; the chosen one is
recomputed once more when the layer is built (deterministic, saves memory). The quantized
base is recomputed from the base model on load; the saved adapter records the plan and load
refuses a model whose plan differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from methods.base import Adapted, ConfigError, Targets
from methods.lora import LowRankConfig
from methods.loftq import adapted_layer, decompose
from methods.quantizers import (
    BITS,
    KINDS,
    bits_per_weight,
    float_targets,
    make_adapted,
    quant_lora_layers,
    quantize,
    rank_check,
    weight_of,
    wrap,
)


@dataclass(frozen=True, kw_only=True)
class LQLoRAConfig(LowRankConfig):
    targets: Targets = "all-linear"
    """Which linear layers are decomposed and adapted."""
    budget: float = 3.0
    """Average stored bits per quantized weight (codes plus block scales) over all targets."""
    bits_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    """Candidate bit widths per matrix."""
    block_choices: list[int] = field(default_factory=lambda: [64, 128])
    """Candidate block sizes per matrix."""
    quant_type: str = "nf"
    """"nf" (NormalFloat-k, the paper's) or "int" (min-max INT-k)."""
    iters: int = 1
    """Alternating quantize / SVD steps per (matrix, config)."""

    def validate(self) -> None:
        super().validate()
        if not self.bits_choices or any(b not in BITS for b in self.bits_choices):
            raise ConfigError("bits_choices", f"must be a non-empty list drawn from {BITS}, got {self.bits_choices}")
        if not self.block_choices or any(b < 2 for b in self.block_choices):
            raise ConfigError("block_choices", f"must be a non-empty list of sizes >= 2, got {self.block_choices}")
        if self.quant_type not in KINDS:
            raise ConfigError("quant_type", f"must be one of {KINDS}, got {self.quant_type!r}")
        if self.iters < 1:
            raise ConfigError("iters", f"must be >= 1, got {self.iters}")
        cheapest = min(self.candidates(), key=lambda c: c[2])[2]
        if self.budget < cheapest:
            raise ConfigError("budget", f"{self.budget} bits is below the cheapest configuration ({cheapest:g} bits per weight)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def candidates(self) -> list[tuple[int, int, float]]:
        """(bits, blocksize, stored bits per weight) for every configuration, in a fixed order."""
        pairs = sorted({(b, s) for b in self.bits_choices for s in self.block_choices})
        return [(b, s, bits_per_weight(self.quant_type, b, s)) for b, s in pairs]


@dataclass
class Plan:
    """The ILP's answer: one (bits, blocksize) per target, and the tables it was chosen from."""

    names: list[str]
    numel: list[int]
    candidates: list[tuple[int, int, float]]
    errors: list[list[float]]
    """errors[i][c]: squared Frobenius error of target i under candidate c."""
    choice: list[int]
    solver: str

    def config(self, i: int) -> tuple[int, int]:
        bits, blocksize, _ = self.candidates[self.choice[i]]
        return bits, blocksize

    @property
    def total_error(self) -> float:
        return sum(row[c] for row, c in zip(self.errors, self.choice))

    @property
    def average_bits(self) -> float:
        used = sum(n * self.candidates[c][2] for n, c in zip(self.numel, self.choice))
        return used / sum(self.numel)


def solve(errors: list[list[float]], costs: list[list[float]], capacity: float) -> tuple[list[int], str]:
    """Pick one column per row minimising total error with total cost <= capacity."""
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:  # pragma: no cover - scipy is present in the project venv
        return _greedy(errors, costs, capacity), "greedy"
    n, m = len(errors), len(errors[0])
    err = np.asarray(errors, dtype=float)
    cost = np.asarray(costs, dtype=float)
    norm = err.sum() or 1.0
    one_each = np.kron(np.eye(n), np.ones(m))
    # The budget row in units of the capacity keeps HiGHS's tolerances meaningful.
    constraints = [LinearConstraint(one_each, 1, 1), LinearConstraint(cost.reshape(1, -1) / capacity, -np.inf, 1)]
    res = milp(
        err.reshape(-1) / norm,
        constraints=constraints,
        integrality=np.ones(n * m),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0},
    )
    if res.x is None:
        raise ConfigError("budget", f"no configuration fits the budget ({res.message})")
    return [int(np.argmax(row)) for row in res.x.reshape(n, m)], "milp"


def _greedy(errors: list[list[float]], costs: list[list[float]], capacity: float) -> list[int]:
    choice = [min(range(len(row)), key=lambda c: (row[c], errs[c])) for row, errs in zip(costs, errors)]
    used = sum(costs[i][c] for i, c in enumerate(choice))
    while True:
        best, gain = None, 0.0
        for i, c in enumerate(choice):
            for d in range(len(errors[i])):
                extra = costs[i][d] - costs[i][c]
                saved = errors[i][c] - errors[i][d]
                if saved > 0 and used + extra <= capacity:
                    ratio = saved / extra if extra > 0 else float("inf")
                    if ratio > gain:
                        best, gain = (i, d), ratio
        if best is None:
            return choice
        i, d = best
        used += costs[i][d] - costs[i][choice[i]]
        choice[i] = d


class LQLoRA:
    name = "lqlora"
    version = "1"
    Config = LQLoRAConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4, "targets": "qv", "budget": 3.0},
        {"r": 2, "targets": "all-linear", "budget": 3.5, "block_choices": [32, 64], "quant_type": "int"},
    ]

    def plan(self, model: nn.Module, cfg: LQLoRAConfig) -> Plan:
        """Decompose every target under every candidate and solve the ILP."""
        chosen = float_targets(model, cfg.targets)
        rank_check(chosen, cfg.r)
        candidates = cfg.candidates()
        names, numel, errors, costs = [], [], [], []
        for name, layer in chosen:
            w = weight_of(layer)
            row = []
            for bits, blocksize, _ in candidates:
                if w.is_meta:  # suite validation (a weightless skeleton): only the budget can be checked
                    row.append(0.0)
                    continue
                d = decompose(w, cfg.r, cfg.scaling, cfg.iters, lambda x, b=bits, s=blocksize: quantize(x, cfg.quant_type, b, s))
                row.append(d.error**2)
            names.append(name)
            numel.append(w.numel())
            errors.append(row)
            costs.append([w.numel() * c[2] for c in candidates])
        choice, solver = solve(errors, costs, cfg.budget * sum(numel))
        return Plan(names, numel, candidates, errors, choice, solver)

    def apply(self, model: nn.Module, cfg: LQLoRAConfig) -> Adapted:
        plan = self.plan(model, cfg)
        index = {name: i for i, name in enumerate(plan.names)}

        def build(name: str, layer: nn.Module):
            bits, blocksize = plan.config(index[name])
            d = decompose(weight_of(layer), cfg.r, cfg.scaling, cfg.iters, lambda x: quantize(x, cfg.quant_type, bits, blocksize))
            return adapted_layer(layer, d, cfg.scaling, cfg.dropout)

        layers = wrap(model, float_targets(model, cfg.targets), build)
        model.lqlora_plan = plan
        return make_adapted(model, self.name, cfg, layers)

    def expected_trainable(self, model: nn.Module, cfg: LQLoRAConfig) -> int:
        """r * (in + out) per target."""
        return sum(cfg.r * sum(layer.weight.shape) for _, layer in float_targets(model, cfg.targets))


def average_bits(model: nn.Module) -> float:
    """Stored bits per quantized weight over an adapted model's targets."""
    layers = quant_lora_layers(model).values()
    total = sum(layer.in_features * layer.out_features for layer in layers)
    used = sum(
        layer.in_features * layer.out_features * bits_per_weight(layer.base_layer.kind, layer.base_layer.bits, layer.base_layer.blocksize)
        for layer in layers
    )
    return used / total
