"""methods.tied_lora.ScaledLowRankLinear (the frozen base and VeRA's / Tied-LoRA's scaled branch
v ⊙ B (u ⊙ A x) in one autograd node) against autograd over the plain expression it replaced:
outputs and every gradient within float rounding, for each combination of trained factors, with and
without dropout, and saved-for-backward bytes no larger. Float comparisons are relative to a norm
far from zero."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from conftest import build_model, make_batch
from torch import Tensor, nn

import methods
from bench.trial.measure import saved_for_backward
from methods.layers import Conv1D
from methods.lora import LoRALinear, lora_layers
from methods.tied_lora import ScaledLoRALinear

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


@contextlib.contextmanager
def plain_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    with monkeypatch.context() as m:
        m.setattr(LoRALinear, "fused", lambda self, x: False)
        yield


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_layer(base: str, dtype: torch.dtype, train: tuple[str, ...], dropout: float = 0.0) -> ScaledLoRALinear:
    """A 24 -> 40 layer over shared A (6 x 30) and B (50 x 6) larger than it needs (VeRA's slicing),
    every factor random (a zero one would make others' gradients zero) and a scale not a power of two."""
    gen = torch.Generator().manual_seed(0)
    fin, fout = 24, 40
    layer = {"linear": lambda: nn.Linear(fin, fout, bias=False), "linear_bias": lambda: nn.Linear(fin, fout),
             "conv1d": lambda: Conv1D(fout, fin)}[base]().to(dtype)
    for p in layer.parameters():
        p.data = torch.randn(p.shape, generator=gen, dtype=dtype) * 0.2
        p.requires_grad_(False)
    factors = {name: nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype), requires_grad=name in train)
               for name, shape in (("A", (6, 30)), ("B", (50, 6)), ("u", (6,)), ("v", (fout,)))}
    return ScaledLoRALinear(layer, factors["A"], factors["B"], factors["u"], factors["v"], 1.7, dropout).train()


def run(layer: ScaledLoRALinear, x: Tensor) -> list[Tensor | None]:
    """Output, then the gradients of x, A, B, u, v under a random cotangent (the dropout mask seeded)."""
    tensors = (x, layer.lora_A, layer.lora_B, layer.lora_u, layer.lora_v)
    for t in tensors:
        t.grad = None
    torch.manual_seed(3)
    out = layer(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype))
    return [out.detach()] + [t.grad for t in tensors]


TRAINED = [("u", "v"), ("v", "B", "u", "A"), ("u", "A"), ("B",), ("v",)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base", ["linear", "linear_bias", "conv1d"])
@pytest.mark.parametrize("train", TRAINED)
def test_node_equals_plain_autograd(train: tuple[str, ...], base: str, dropout: float, dtype: torch.dtype,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer(base, dtype, train, dropout)
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    with saved_for_backward(layer) as saved:
        fused = run(layer, x)
    with plain_path(monkeypatch), saved_for_backward(layer) as ref_saved:
        ref = run(layer, x)
    assert saved["bytes"] <= ref_saved["bytes"]
    for name, got, want in zip(("out", "x", "A", "B", "u", "v"), fused, ref, strict=True):
        wanted = name in ("out", "x") or name in train
        assert (got is not None) == wanted and (want is not None) == wanted, name
        if wanted:
            assert rel(got, want) <= TOLERANCE[dtype], name


def test_node_runs_in_training_and_eval_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = make_layer("linear", torch.float32, ("u", "v"))
    out = layer(torch.randn(3, 24, requires_grad=True))
    assert type(out.grad_fn).__name__ == "ScaledLowRankLinearBackward"
    layer.eval()
    x = torch.randn(4, 24)
    with torch.no_grad():
        got = layer(x)
        with plain_path(monkeypatch):
            want = layer(x)
    assert rel(got, want) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["vera", "tied_lora"])
def test_model_gradients_equal_plain_autograd(kind: str, method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole tiny model with every linear layer adapted (GPT-2's are Conv1D, VeRA slices its shared
    pair per layer): loss and every trainable gradient as autograd over the plain expression."""
    impl = methods.get(method)
    adapted = impl.apply(build_model(kind), impl.Config.from_dict({"r": 4, "targets": "all-linear"}))
    with torch.no_grad():  # no factor at zero, so every gradient is far from zero
        for layer in lora_layers(adapted.model).values():
            for t in layer.adapter_tensors().values():
                t.normal_(std=0.3)
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
