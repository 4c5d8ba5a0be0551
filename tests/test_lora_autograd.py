"""methods.lora.LowRankLinear (the frozen base layer and the LoRA branch in one autograd node)
against autograd over the plain expression W0 x + s B A x, and the training loop's fused AdamW
against torch's for-loop AdamW. Float comparisons are relative to a norm that is far from zero."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from conftest import build_model, make_batch
from torch import Tensor, nn

import methods
from bench.trial.measure import saved_for_backward
from bench.trial.train import OPTIMIZERS
from methods.layers import Conv1D
from methods.lora import LoRALinear, lora_layers

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


@contextlib.contextmanager
def plain_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every LoRALinear runs the plain expression (autograd over base, two linears and an add)."""
    with monkeypatch.context() as m:
        m.setattr(LoRALinear, "fused", lambda self, x: False)
        yield


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_layer(base: str, dtype: torch.dtype, dropout: float = 0.0, train_a: bool = True) -> LoRALinear:
    """A 24 -> 40 layer with B random (LoRA's zero B would make A's gradient zero) and a scale
    that is not a power of two (so scaling B or the gradient first rounds differently)."""
    torch.manual_seed(0)
    fin, fout = 24, 40
    layer = {"linear": lambda: nn.Linear(fin, fout, bias=False), "linear_bias": lambda: nn.Linear(fin, fout),
             "conv1d": lambda: Conv1D(fout, fin)}[base]().to(dtype)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
        p.requires_grad_(False)
    wrapped = LoRALinear(layer, r=4, scaling=1.7, dropout=dropout).to(dtype)
    nn.init.normal_(wrapped.lora_B, std=0.2)
    wrapped.lora_A.requires_grad_(train_a)
    return wrapped.train()


def run(layer: LoRALinear, x: Tensor, seed: int = 3) -> tuple[Tensor, list[Tensor | None]]:
    """Output and the gradients of x, A and B under a random cotangent (the dropout mask seeded)."""
    for t in (x, layer.lora_A, layer.lora_B):
        t.grad = None
    torch.manual_seed(seed)
    out = layer(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    out.backward(cotangent)
    return out.detach(), [t.grad for t in (x, layer.lora_A, layer.lora_B)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base", ["linear", "linear_bias", "conv1d"])
def test_gradients_equal_plain_autograd(base: str, dropout: float, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(base, dtype, dropout)
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    out, grads = run(layer, x)
    with plain_path(monkeypatch):
        ref_out, ref_grads = run(layer, x)
    assert rel(out, ref_out) <= TOLERANCE[dtype]
    for g, ref in zip(grads, ref_grads, strict=True):
        assert rel(g, ref) <= TOLERANCE[dtype]


def test_fused_node_runs_in_training() -> None:
    """The float32 training step takes the fused node (else the benchmark measures the plain path)."""
    layer = make_layer("linear", torch.float32)
    out = layer(torch.randn(3, 24, requires_grad=True))
    assert type(out.grad_fn).__name__ == "LowRankLinearBackward"


@pytest.mark.parametrize("train_a", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_frozen_a_or_input(train_a: bool, input_grad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """LoRA-FA freezes A; the first layer's input needs no gradient. Each gradient that is asked for
    equals autograd's, none that is not is computed, and the node saves no more than autograd does
    (with A frozen: nothing input-sized, tests/test_lora_variants.py)."""
    layer = make_layer("linear", torch.float32, train_a=train_a)
    x = torch.randn(6, 24, requires_grad=input_grad)
    with saved_for_backward(layer) as saved:
        _, grads = run(layer, x)
    with plain_path(monkeypatch), saved_for_backward(layer) as ref_saved:
        _, ref_grads = run(layer, x)
    assert saved["bytes"] <= ref_saved["bytes"]
    for g, ref, wanted in zip(grads, ref_grads, (input_grad, train_a, True), strict=True):
        assert (g is not None) == wanted and (ref is not None) == wanted
        if wanted:
            assert rel(g, ref) <= TOLERANCE[torch.float32]


def test_eval_and_no_grad_equal_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout is off in eval; inference under no_grad runs the fused forward too."""
    layer = make_layer("linear_bias", torch.float32, dropout=0.5).eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        out = layer(x)
        with plain_path(monkeypatch):
            ref = layer(x)
    assert rel(out, ref) <= TOLERANCE[torch.float32]


def test_merged_equals_unmerged() -> None:
    layer = make_layer("conv1d", torch.float32).eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        layer.unmerge()
        again = layer(x)
    assert rel(merged, unmerged) <= TOLERANCE[torch.float32]
    assert rel(again, unmerged) <= TOLERANCE[torch.float32]


def hooked(layer: LoRALinear) -> list[int]:
    calls: list[int] = []
    layer.base_layer.register_forward_hook(lambda module, args, out: calls.append(1))
    return calls


@pytest.mark.parametrize("case", ["bfloat16 base", "base weight trains", "hook on base", "autocast"])
def test_plain_path_where_the_node_does_not_apply(case: str) -> None:
    """A half-precision base (float32 adapters), a base that trains, hooks that expect the base
    module to run, autocast: the plain path runs, gradients reach what trains, hooks fire."""
    layer = make_layer("linear_bias", torch.float32)
    if case == "bfloat16 base":
        layer.base_layer.to(torch.bfloat16)
    if case == "base weight trains":
        layer.base_layer.weight.requires_grad_(True)
    calls = hooked(layer) if case == "hook on base" else []
    x = torch.randn(3, 24, dtype=layer.base_layer.weight.dtype, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext():
        out = layer(x)
    assert type(out.grad_fn).__name__ != "LowRankLinearBackward"
    out.float().square().sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None and layer.lora_B.grad is not None
    if case == "base weight trains":
        assert layer.base_layer.weight.grad is not None
    if case == "hook on base":
        assert calls == [1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "lora_fa"])
def test_model_gradients_equal_plain_autograd(kind: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole tiny model with every linear layer adapted (GPT-2's are Conv1D): loss and every
    trainable gradient as autograd over the plain expression gives them."""
    impl = methods.get(method)
    adapted = impl.apply(build_model(kind), impl.Config(r=4, alpha=7, targets="all-linear"))
    for layer in lora_layers(adapted.model).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    adapted.model.train()
    batch = make_batch(kind)

    def grads() -> tuple[Tensor, list[Tensor]]:
        for p in adapted.trainable:
            p.grad = None
        loss = adapted.model(**batch).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in adapted.trainable]

    loss, fused = grads()
    with plain_path(monkeypatch):
        ref_loss, ref = grads()
    assert rel(loss, ref_loss) <= TOLERANCE[torch.float32]
    assert len(fused) == len(ref) > 0
    for g, r in zip(fused, ref, strict=True):
        assert rel(g, r) <= 1e-4  # through two layers of attention and norms: rounding grows a little


def test_training_loop_adamw_is_fused_and_matches_the_for_loop() -> None:
    """OPTIMIZERS["adamw"] is torch's fused AdamW on the CPU; five steps with the same gradients
    land where the default (for-loop) AdamW lands, up to float32 rounding."""
    torch.manual_seed(0)
    init = [torch.randn(8, 24), torch.randn(40, 8), torch.randn(5)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(5)]
    fused_params = [nn.Parameter(t.clone()) for t in init]
    loop_params = [nn.Parameter(t.clone()) for t in init]
    settings = {"lr": 1e-2, "weight_decay": 0.1}
    fused = OPTIMIZERS["adamw"]([{"params": fused_params}], settings)
    loop = torch.optim.AdamW(loop_params, **settings)
    assert fused.defaults["fused"] and "fused=True" in fused.peftbench_note
    assert not loop.defaults["fused"]
    for step in grads:
        for params, optimizer in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b, start in zip(fused_params, loop_params, init, strict=True):
        assert rel(b.detach(), start) > 1e-3  # the steps moved the parameters
        assert rel(a.detach(), b.detach()) <= TOLERANCE[torch.float32]


def test_training_loop_adamw_unfused_where_no_fused_kernel() -> None:
    """A parameter on a device without a fused AdamW (meta here) gets the default implementation."""
    params = [nn.Parameter(torch.empty(3, device="meta"))]
    optimizer = OPTIMIZERS["adamw"]([{"params": params}], {"lr": 1e-3, "weight_decay": 0.0})
    assert not optimizer.defaults["fused"] and getattr(optimizer, "peftbench_note", None) is None
