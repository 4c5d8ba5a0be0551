"""LQ-LoRA: Low-rank Plus Quantized Matrix Decomposition for Efficient Language Model Finetuning (Guo et al. 2023, arXiv 2311.12023).

Each target W is decomposed as W ~= Q + L1 L2 with Q quantized (frozen) and L1 (= scaling * B),
L2 (= A) trained, by the paper's Algorithm (Section 3.1) as the authors' code runs it
(HanGuo97/lq-lora, models/lq_utils.py `lowrank_quantized_sparse_decomposition`, commit
c2424b3): start from Q = 0 and repeat, up to `iters` (100) times,

    L1, L2 = rank-r SVD of W - Q            (randomized: r + 10 columns, 2 power iterations,
                                             as torch.svd_lowrank in the authors' code)
    Q      = quantize(W - L1 L2)
    stop when ||W - (Q + L1 L2)||_F rises.

This differs from LoftQ (methods/loftq.py), which quantizes W first. The authors' loop returns
the iterate whose error rose (a TODO in their code says the previous one is slightly better);
we keep the best iterate, i.e. the one before the rise.

Quantization configurations (the authors' models/allocation_utils.py and
models/quantization_utils.py `blockwise_absmax` / `estimate_storage_from_config`): NF-b codes
for b in {2, 3, 4, 8} over blocks of B0 in {16, 32, 64} weights; each block's absmax
double-quantized to b_s in {2, 3, 4, 8} bits (unsigned, above the matrix's smallest absmax)
with one absmax of those per B1 in {16, 64, 256} blocks, stored in bf16, fp16 or fp32. A
configuration stores b + b_s / B0 + dtype_bits / (B0 B1) bits per weight; NF3 with the
paper's default (b_s 8, fp32, B0 64, B1 256) is 3.127, NF4 4.127 (QLoRA's figure). 432
configurations in all: the plan below costs one decomposition per (matrix, configuration),
so on a CPU narrow the lists (a suite can). The per-matrix choice is the paper's integer
linear program (Section 3.2):

    minimise   sum_i err_i(c_i)           err_i(c) = ||W_i - (Q_i^c + L1 L2)||_F^2
    subject to sum_i numel_i * bits(c_i) <= budget * sum_i numel_i,  one c per matrix

solved exactly with scipy.optimize.milp (HiGHS; the authors use Gurobi with a 60 s limit);
without scipy, a greedy upgrade by error saved per extra bit stands in (not exact).

Deviations: our NF-k codebook for k != 4 uses QLoRA's per-k offset (NF4 is identical to the
authors' and bitsandbytes'); the authors reuse NF4's offset 0.9677 for every k. The randomized
SVD is seeded (the same W always gives the same decomposition, which `load` relies on).
The Fisher-weighted variant (Section 3.3), fisher_samples > 0: F, the diagonal empirical Fisher of
each target weight, is the sum over that many training texts of the squared per-example gradient
of the language-model loss (the authors' models/allocation_utils.py
`compute_empirical_Fisher_LLaMA`; they use 10,000 C4 sequences, we the trial's own training
texts, the only data a trial has). The SVD step becomes the authors' `weighted_svd_decomposition`
with its default "two-sided" heuristic: with row weights d1 = sqrt(mean_j F_ij) and column
weights d2 = sqrt(mean_i F_ij), L1 L2 = diag(d1)^-1 svd_r(diag(d1) (W - Q) diag(d2)) diag(d2)^-1;
the quantization step is unchanged, and every error (the stopping rule's and the ILP's) is
||sqrt(F) ⊙ (W - Q - L1 L2)||_F. It needs a causal language model and the trial's texts (the
runner passes them; `apply(model, cfg, context=MethodContext(...))`).

The plan's decomposition of the chosen configuration is recomputed once more when the layer is
built (deterministic, saves memory). The quantized base is recomputed from the base model on
load; the saved adapter records the plan and load refuses a model whose plan differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, MethodContext, Targets
from methods.lora import LowRankConfig
from methods.layers import Conv1D
from methods.loftq import Decomposition, adapted_layer
from methods.quantizers import (
    BITS,
    SCALE_DTYPES,
    Quantized,
    QuantizedScales,
    ScaleQuant,
    bits_per_weight,
    float_targets,
    make_adapted,
    nf_round,
    pack,
    quant_lora_layers,
    rank_check,
    weight_of,
    wrap,
)

OVERSAMPLING = 10
"""Extra columns of the randomized SVD (the authors' `num_oversampling` default)."""
POWER_ITERS = 2
"""Subspace iterations of the randomized SVD (torch.svd_lowrank's default, which the authors call)."""


@dataclass(frozen=True)
class QConfig:
    """One quantization configuration: NF-`bits` over blocks of `blocksize`, scales per `scale`."""

    bits: int
    blocksize: int
    scale: ScaleQuant

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight("nf", self.bits, self.blocksize, self.scale)

    def describe(self) -> str:
        s = self.scale
        return f"nf{self.bits}/B0={self.blocksize}/scale {s.bits}-bit, B1={s.blocksize}, {s.dtype}"


@dataclass(frozen=True, kw_only=True)
class LQLoRAConfig(LowRankConfig):
    targets: Targets = "all-linear"
    """Which linear layers are decomposed and adapted."""
    budget: float = 3.0
    """Average stored bits per quantized weight (codes plus double-quantized block scales) over all targets."""
    bits_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    """Candidate NF bit widths per matrix (b)."""
    block_choices: list[int] = field(default_factory=lambda: [16, 32, 64])
    """Candidate weight block sizes (B0)."""
    scale_bits_choices: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    """Candidate bits per stored block absmax."""
    scale_dtype_choices: list[str] = field(default_factory=lambda: ["bf16", "fp16", "fp32"])
    """Candidate dtypes of the second-level absmax."""
    scale_block_choices: list[int] = field(default_factory=lambda: [16, 64, 256])
    """Candidate first-level blocks per second-level block (B1)."""
    iters: int = 100
    """At most this many SVD / quantize steps per (matrix, configuration); stops when the error rises."""
    randomized: bool = True
    """Randomized SVD (the authors' default); False takes the exact SVD."""
    fisher_samples: int = 0
    """0: unweighted errors; n > 0: the Fisher-weighted variant, F from n training texts."""
    fisher_max_length: int = 128
    """Tokens per text when estimating F (longer texts are cut)."""

    def validate(self) -> None:
        super().validate()
        for key in ("bits_choices", "scale_bits_choices"):
            values = getattr(self, key)
            if not values or any(b not in BITS for b in values):
                raise ConfigError(key, f"must be a non-empty list drawn from {BITS}, got {values}")
        for key in ("block_choices", "scale_block_choices"):
            values = getattr(self, key)
            if not values or any(b < 2 for b in values):
                raise ConfigError(key, f"must be a non-empty list of sizes >= 2, got {values}")
        if not self.scale_dtype_choices or any(d not in SCALE_DTYPES for d in self.scale_dtype_choices):
            known = list(SCALE_DTYPES)
            raise ConfigError("scale_dtype_choices", f"must be a non-empty list drawn from {known}, got {self.scale_dtype_choices}")
        if self.iters < 1:
            raise ConfigError("iters", f"must be >= 1, got {self.iters}")
        if self.fisher_samples < 0:
            raise ConfigError("fisher_samples", f"must be >= 0, got {self.fisher_samples}")
        if self.fisher_max_length < 2:
            raise ConfigError("fisher_max_length", f"must be >= 2, got {self.fisher_max_length}")
        cheapest = min(c.bits_per_weight for c in self.candidates())
        if self.budget < cheapest:
            raise ConfigError("budget", f"{self.budget} bits is below the cheapest configuration ({cheapest:g} bits per weight)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def candidates(self) -> list[QConfig]:
        """Every configuration in the lists, in a fixed order."""
        return [
            QConfig(b, s0, ScaleQuant(sb, dt, s1))
            for b in sorted(set(self.bits_choices))
            for s0 in sorted(set(self.block_choices))
            for sb in sorted(set(self.scale_bits_choices))
            for dt in sorted(set(self.scale_dtype_choices))
            for s1 in sorted(set(self.scale_block_choices))
        ]


def rank_r(residual: Tensor, r: int, scaling: float, randomized: bool) -> tuple[Tensor, Tensor]:
    """B (out x r), A (r x in) with scaling * B A a rank-r approximation of `residual` from its
    (randomized) SVD, the singular values split as sqrt into both factors."""
    if randomized and r + OVERSAMPLING < min(residual.shape):
        # Halko et al.'s range finder with a fixed seed, so the same W always decomposes the same way.
        gen = torch.Generator(device=residual.device).manual_seed(0)
        probe = torch.randn(residual.shape[1], r + OVERSAMPLING, generator=gen, device=residual.device)
        basis = torch.linalg.qr(residual @ probe).Q
        for _ in range(POWER_ITERS):
            basis = torch.linalg.qr(residual @ torch.linalg.qr(residual.T @ basis).Q).Q
        u, s, vh = torch.linalg.svd(basis.T @ residual, full_matrices=False)
        u = basis @ u
    else:
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = (s[:r] / scaling).sqrt()
    return u[:, :r] * root, root.unsqueeze(1) * vh[:r]


def weighted_rank_r(residual: Tensor, fisher: Tensor, r: int, scaling: float, randomized: bool) -> tuple[Tensor, Tensor]:
    """The authors' two-sided weighted SVD: rank r of diag(d1) R diag(d2), mapped back."""
    d1, d2 = fisher.mean(1, keepdim=True).sqrt(), fisher.mean(0, keepdim=True).sqrt()
    # A row or column no example reached has weight 0; a floor keeps the division finite (its
    # error does not count in the weighted objective anyway).
    floor = torch.finfo(torch.float32).tiny ** 0.5
    d1, d2 = d1.clamp_min(floor), d2.clamp_min(floor)
    b, a = rank_r(d1 * residual * d2, r, scaling, randomized)
    return b / d1, a / d2


def empirical_fisher(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], texts: Sequence[str], tokenizer: Any, max_length: int
) -> dict[str, Tensor]:
    """Sum over texts of the squared per-example gradient of the LM loss, per target weight (out, in)."""
    weights = [layer.weight for _, layer in chosen]
    saved = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    fisher = {name: torch.zeros_like(weight_of(layer)) for name, layer in chosen}
    was_training = model.training
    model.eval()  # no dropout: the gradients of the model that is decomposed
    try:
        for text in texts:
            enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            ids = enc["input_ids"].to(weights[0].device)
            loss = model(input_ids=ids, attention_mask=enc["attention_mask"].to(ids.device), labels=ids).loss
            for (name, layer), g in zip(chosen, torch.autograd.grad(loss, weights), strict=True):
                g = g.detach().float()
                fisher[name] += (g.T if isinstance(layer, Conv1D) else g).square()
    finally:
        for w, flag in zip(weights, saved, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    return fisher


def decompose(
    weight: Tensor, r: int, scaling: float, qc: QConfig, iters: int = 100, randomized: bool = True, fisher: Tensor | None = None
) -> Decomposition:
    """The published order: SVD of W - Q (Q = 0 first), then Q = quantize(W - L1 L2); stop at
    the first rise of the error and keep the best iterate. `errors` lists every step's error.
    With `fisher` (F, shaped like W) the SVD is the weighted one and errors are ||sqrt(F) ⊙ E||_F."""
    w = weight.detach().float()
    if w.is_meta:  # suite validation applies methods to a weightless skeleton: shapes only
        codes, scale, scales, _ = nf_round(w, qc.bits, qc.blocksize, qc.scale)
        q = Quantized("nf", qc.bits, qc.blocksize, tuple(w.shape), pack(codes, qc.bits), scale, scales=scales)
        return Decomposition(q, w.new_empty(r, w.shape[1]), w.new_empty(w.shape[0], r), [float("nan")])
    q_values = torch.zeros_like(w)
    errors: list[float] = []
    best: tuple[Tensor, Tensor, QuantizedScales | None, Tensor, Tensor] | None = None
    root = None if fisher is None else fisher.float().sqrt()
    for _ in range(iters):
        if fisher is None:
            b, a = rank_r(w - q_values, r, scaling, randomized)
        else:
            b, a = weighted_rank_r(w - q_values, fisher.float(), r, scaling, randomized)
        low = scaling * (b @ a)
        codes, scale, scales, q_values = nf_round(w - low, qc.bits, qc.blocksize, qc.scale)
        residual = w - low - q_values
        err = float((residual if root is None else root * residual).norm())
        if best is None or err < min(errors):
            best = (codes, scale, scales, a, b)
        errors.append(err)
        if len(errors) > 1 and err > errors[-2]:
            break
    assert best is not None
    codes, scale, scales, a, b = best
    q = Quantized("nf", qc.bits, qc.blocksize, tuple(w.shape), pack(codes, qc.bits), scale, scales=scales)
    return Decomposition(q, a, b, errors)


@dataclass
class Plan:
    """The ILP's answer: one configuration per target, and the tables it was chosen from."""

    names: list[str]
    numel: list[int]
    candidates: list[QConfig]
    errors: list[list[float]]
    """errors[i][c]: squared Frobenius error of target i under candidate c."""
    choice: list[int]
    solver: str

    def config(self, i: int) -> QConfig:
        return self.candidates[self.choice[i]]

    @property
    def total_error(self) -> float:
        return sum(row[c] for row, c in zip(self.errors, self.choice))

    @property
    def average_bits(self) -> float:
        used = sum(n * self.candidates[c].bits_per_weight for n, c in zip(self.numel, self.choice))
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
    version = "2"
    Config = LQLoRAConfig
    needs_context: ClassVar[bool] = True  # the Fisher-weighted variant reads the trial's texts
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"r": 4, "targets": "qv", "budget": 3.0, "scale_bits_choices": [8], "scale_dtype_choices": ["fp32"], "scale_block_choices": [256]},
        {
            "r": 2,
            "targets": "all-linear",
            "budget": 3.5,
            "bits_choices": [2, 4],
            "block_choices": [16, 64],
            "scale_bits_choices": [4, 8],
            "scale_dtype_choices": ["bf16"],
            "scale_block_choices": [16],
            "iters": 5,
        },
    ]

    def fisher(self, model: nn.Module, cfg: LQLoRAConfig, context: MethodContext | None) -> dict[str, Tensor] | None:
        """F per target for the Fisher-weighted variant, None for the unweighted one."""
        chosen = float_targets(model, cfg.targets)
        if cfg.fisher_samples == 0 or any(layer.weight.is_meta for _, layer in chosen):
            return None  # a weightless skeleton (suite validation) has no gradients to take
        if context is None or not context.train:
            raise ConfigError("fisher_samples", "the Fisher-weighted variant needs the trial's training texts (MethodContext)")
        if not (hasattr(model, "can_generate") and model.can_generate()):
            raise ConfigError("fisher_samples", f"the Fisher-weighted variant needs a causal language model, not {type(model).__name__}")
        texts = [prompt + answer for prompt, answer in context.train[: cfg.fisher_samples]]
        return empirical_fisher(model, chosen, texts, context.tokenizer, cfg.fisher_max_length)

    def plan(self, model: nn.Module, cfg: LQLoRAConfig, fisher: dict[str, Tensor] | None = None) -> Plan:
        """Decompose every target under every candidate and solve the ILP."""
        chosen = float_targets(model, cfg.targets)
        rank_check(chosen, cfg.r)
        candidates = cfg.candidates()
        names, numel, errors, costs = [], [], [], []
        for name, layer in chosen:
            w = weight_of(layer)
            f = None if fisher is None else fisher[name]
            # Suite validation (a weightless skeleton) can check only the budget.
            row = [0.0 if w.is_meta else decompose(w, cfg.r, cfg.scaling, qc, cfg.iters, cfg.randomized, f).error ** 2 for qc in candidates]
            names.append(name)
            numel.append(w.numel())
            errors.append(row)
            costs.append([w.numel() * qc.bits_per_weight for qc in candidates])
        choice, solver = solve(errors, costs, cfg.budget * sum(numel))
        return Plan(names, numel, candidates, errors, choice, solver)

    def apply(self, model: nn.Module, cfg: LQLoRAConfig, context: MethodContext | None = None) -> Adapted:
        fisher = self.fisher(model, cfg, context)
        plan = self.plan(model, cfg, fisher)
        index = {name: i for i, name in enumerate(plan.names)}

        def build(name: str, layer: nn.Module):
            f = None if fisher is None else fisher[name]
            d = decompose(weight_of(layer), cfg.r, cfg.scaling, plan.config(index[name]), cfg.iters, cfg.randomized, f)
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
    return sum(layer.in_features * layer.out_features * layer.base_layer.bits_per_weight() for layer in layers) / total
