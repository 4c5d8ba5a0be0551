"""Bottleneck adapters, IA3, GLoRA and MultiLoRA: their papers' properties, and peft where it has the method.

The shared battery (tests/test_methods.py) already checks counts, grads, save/load, identity at
init and training for every registered config; this file checks what is specific to each method.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, logits, make_batch
from safetensors.torch import load_file, save_file
from torch import nn

import methods
from methods.adapters import Bottleneck, BottleneckAdapter, BottleneckConfig, adapter_layers
from methods.base import AdapterFileError, ConfigError
from methods.glora import GLoRA, GLoRAConfig, glora_layers
from methods.ia3 import IA3, IA3Config, ia3_layers
from methods.layers import block_norms, inert_parameters, shift_invariant_layers
from methods.lora import LoRA, LoRAConfig, lora_layers
from methods.multilora import MultiLoRA, MultiLoRAConfig, multilora_layers

BLOCK = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}."}
ATTN_OUT = {"llama": "self_attn.o_proj", "gpt2": "attn.c_proj", "bert": "attention.output.dense"}
FFN_OUT = {"llama": "mlp.down_proj", "gpt2": "mlp.c_proj", "bert": "output.dense"}


def randomise(params: list[nn.Parameter], seed: int = 0, scale: float = 0.1, around: float = 0.0) -> None:
    """Move trainable tensors off their init, which would make most comparisons trivially pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(around + torch.randn(p.shape, generator=gen) * scale)


def in_blocks(kind: str, names: list[str]) -> set[str]:
    return {BLOCK[kind].format(i) + n for i in range(2) for n in names}


# ---------------------------------------------------------------- bottleneck adapters


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapter_wraps_exactly_the_sublayer_outputs(kind: str, placement: str) -> None:
    adapted = Bottleneck().apply(build_model(kind), BottleneckConfig(size=4, placement=placement))
    expected = [FFN_OUT[kind]] if placement == "pfeiffer" else [ATTN_OUT[kind], FFN_OUT[kind]]
    assert set(adapter_layers(adapted.model)) == in_blocks(kind, expected)
    # The wrapped projections keep their own class inside; nothing else in the block changed type.
    reference = {n: type(m) for n, m in build_model(kind).named_modules()}
    for name, module in adapted.model.named_modules():
        if name in adapter_layers(adapted.model):
            assert isinstance(module.base_layer, reference[name])
        elif ".adapter_" not in name and not name.endswith(".act") and ".base_layer" not in name:
            assert type(module) is reference[name], name


def test_adapter_is_a_residual_bottleneck_on_the_projection_output() -> None:
    adapted = Bottleneck().apply(build_model("llama"), BottleneckConfig(size=4, activation="relu"))
    randomise(adapted.trainable)
    layer = adapted.model.model.layers[0].mlp.down_proj
    assert isinstance(layer, BottleneckAdapter)
    x = torch.randn(2, 3, 64)
    y = x @ layer.base_layer.weight.T
    expected = y + torch.relu(y @ layer.adapter_down.weight.T + layer.adapter_down.bias) @ layer.adapter_up.weight.T + layer.adapter_up.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_adapter_zero_up_is_exact_identity(kind: str) -> None:
    batch = make_batch(kind)
    for placement in ("houlsby", "pfeiffer"):
        adapted = Bottleneck().apply(build_model(kind), BottleneckConfig(size=8, placement=placement, init="zero_up"))
        assert torch.equal(logits(adapted.model, batch), logits(build_model(kind), batch))


def test_adapter_near_identity_init_follows_the_paper() -> None:
    """Truncated N(0, 1e-2^2) at two standard deviations, zero biases; close to, not exactly, the identity."""
    std = 1e-2
    adapted = Bottleneck().apply(build_model("llama"), BottleneckConfig(size=64))
    projections = [m for layer in adapter_layers(adapted.model).values() for m in (layer.adapter_down, layer.adapter_up)]
    weights = torch.cat([m.weight.flatten() for m in projections])
    assert weights.abs().max() <= 2 * std
    assert 0.7 * std < weights.std() < 1.0 * std  # a Gaussian truncated at 2 sigma has std 0.88 sigma
    assert all(not m.bias.any() for m in projections)
    batch = make_batch("llama")
    change = (logits(adapted.model, batch) - logits(build_model("llama"), batch)).abs().max()
    assert 0 < change <= Bottleneck.init_atol


# Two norms per block, two blocks, d = 32: RMSNorm has a weight, LayerNorm a weight and a bias.
NORM_PARAMS = {"llama": 2 * 2 * 32, "gpt2": 2 * 2 * 64, "bert": 2 * 2 * 64}


@pytest.mark.parametrize("train_norms", [True, False])
def test_adapter_trains_block_norms_only_when_asked(kind: str, train_norms: bool) -> None:
    adapted = Bottleneck().apply(build_model(kind), BottleneckConfig(size=4, train_norms=train_norms))
    norms = {id(p) for norm in block_norms(adapted.model) for p in norm.parameters()}
    trainable = {id(p) for p in adapted.trainable}
    if train_norms:
        assert norms <= trainable
    else:
        assert not norms & trainable
    # Per adapter 2 d m + d + m with d = 32, m = 4: two per block (Houlsby), two blocks.
    adapters = 4 * (2 * 32 * 4 + 32 + 4)
    assert sum(p.numel() for p in adapted.trainable) == adapters + (NORM_PARAMS[kind] if train_norms else 0)


class _NoKnownSublayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_adapter_on_an_unknown_layout_is_a_config_error() -> None:
    model = _NoKnownSublayers()
    with pytest.raises(ConfigError) as info:
        Bottleneck().apply(model, BottleneckConfig())
    assert info.value.key == "model" and "output projections" in str(info.value)
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_config_validation() -> None:
    for values, key in [
        ({"size": 0}, "size"),
        ({"placement": "after_attention"}, "placement"),
        ({"activation": "softmax"}, "activation"),
        ({"init": "zeros"}, "init"),
        ({"init_std": 0.0}, "init_std"),
        ({"train_norms": "yes"}, "train_norms"),
    ]:
        with pytest.raises(ConfigError) as info:
            BottleneckConfig.from_dict(values)
        assert info.value.key == key, values


# ---------------------------------------------------------------- IA3

# Module names inside a block that get a vector, and whether it scales the input (ff) or the output (k, v).
IA3_TARGETS = {
    "llama": {"self_attn.k_proj": False, "self_attn.v_proj": False, "mlp.down_proj": True},
    "gpt2": {"attn.c_attn": False, "mlp.c_proj": True},
    "bert": {"attention.self.key": False, "attention.self.value": False, "output.dense": True},
}


@pytest.fixture(scope="module")
def peft() -> Any:
    return pytest.importorskip("peft")


def test_ia3_scales_keys_values_and_ffn_input(kind: str) -> None:
    adapted = IA3().apply(build_model(kind), IA3Config())
    layers = ia3_layers(adapted.model)
    expected = {BLOCK[kind].format(i) + n: on_input for i in range(2) for n, on_input in IA3_TARGETS[kind].items()}
    assert {n: layer.on_input for n, layer in layers.items()} == expected
    assert all(torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l)) for layer in layers.values())
    if kind == "gpt2":  # only the k and v thirds of the fused q|k|v output
        assert all(torch.equal(layer.rows, torch.arange(32, 96)) for n, layer in layers.items() if n.endswith("c_attn"))


def _peft_ia3(peft: Any, base: nn.Module, ours: dict[str, Any]) -> nn.Module:
    names = list(ours)
    return peft.get_peft_model(
        copy.deepcopy(base),
        peft.IA3Config(
            target_modules=names,
            feedforward_modules=[n for n, layer in ours.items() if layer.on_input],
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in ours.values()),
        ),
    )


def test_ia3_matches_peft(kind: str, peft: Any) -> None:
    """Same vectors -> same outputs and gradients. On GPT-2, peft scales the whole fused c_attn output
    (q included) where the paper scales k and v only: peft's q third is held at one to compare."""
    base = build_model(kind)
    ours = IA3().apply(copy.deepcopy(base), IA3Config())
    randomise(ours.trainable, around=1.0)
    layers = ia3_layers(ours.model)
    theirs = _peft_ia3(peft, base, layers)
    pairs = []
    for name, layer in layers.items():
        vector = theirs.get_submodule(f"base_model.model.{name}").ia3_l["default"]
        with torch.no_grad():
            vector.copy_(layer.scale().detach().view(vector.shape))
        pairs.append((layer, vector))

    batch = make_batch(kind)
    out_ours, out_theirs = ours.model(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for layer, vector in pairs:
        grad = vector.grad.flatten()
        torch.testing.assert_close(layer.ia3_l.grad, grad if layer.rows is None else grad[layer.rows], atol=1e-5, rtol=0)
    if kind == "gpt2":  # peft trains the q third too; ours has no parameter there
        assert all(vector.numel() == 3 * layer.ia3_l.numel() // 2 for layer, vector in pairs if layer.rows is not None)


@pytest.mark.parametrize("vectors", [None, ["k", "v"], ["ff"]])
def test_ia3_merge_matches_unmerged(kind: str, vectors: list[str] | None) -> None:
    adapted = IA3().apply(build_model(kind), IA3Config(vectors=vectors))
    randomise(adapted.trainable, around=1.0)
    layers = ia3_layers(adapted.model)
    # The tiny random models start with zero biases: give them some, so that scaling the bias is checked.
    randomise([layer.base_layer.bias for layer in layers.values() if getattr(layer.base_layer, "bias", None) is not None], seed=1)
    base = {n: (layer.base_layer.weight.clone(), getattr(layer.base_layer, "bias", None)) for n, layer in layers.items()}
    base = {n: (w, None if b is None else b.detach().clone()) for n, (w, b) in base.items()}
    batch = make_batch(kind)
    unmerged = logits(adapted.model, batch)
    adapted.merge()
    assert all(layer.merged for layer in layers.values())
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)
    adapted.unmerge()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base[n][0], atol=1e-6, rtol=1e-6)
        if base[n][1] is not None:
            torch.testing.assert_close(layer.base_layer.bias, base[n][1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-6, rtol=0)


def test_ia3_config_validation() -> None:
    for values in [{"vectors": []}, {"vectors": ["q"]}, {"vectors": ["k", "k"]}, {"vectors": "kv"}]:
        with pytest.raises(ConfigError) as info:
            IA3Config.from_dict(values)
        assert info.value.key == "vectors", values
    # A fused q|k|v projection scales its k rows alone: GPT-2's c_attn, heads of 8 features.
    layer = ia3_layers(IA3().apply(build_model("gpt2"), IA3Config(vectors=["k"])).model)["transformer.h.0.attn.c_attn"]
    assert torch.equal(layer.rows, torch.arange(32, 64))


# ---------------------------------------------------------------- GLoRA


def test_peft_has_glora(peft: Any) -> None:
    assert hasattr(peft, "GloraConfig")


def _glora_pairs(ours: dict[str, Any], theirs: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(our tensor, peft's tensor) for every support tensor both have; peft's is set to ours."""
    pairs = []
    for name, layer in ours.items():
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")
        for key in "abcde":
            mine, path = getattr(layer, f"glora_{key}"), getattr(peft_layer, f"glora_{key.upper()}")["default"]
            for our_name, peft_name in [("down", "Xd"), ("up", "Xu"), ("value", "X")]:
                if hasattr(mine, our_name):
                    reference = getattr(path, peft_name)
                    with torch.no_grad():
                        reference.copy_(getattr(mine, our_name).view(reference.shape))
                    pairs.append((getattr(mine, our_name), reference))
    return pairs


@pytest.mark.parametrize(("ab", "c", "de"), [("lora", "lora", "constant"), ("vector", "vector", "vector"), ("constant", "none", "none")])
def test_glora_matches_peft_on_biased_layers(peft: Any, ab: str, c: str, de: str) -> None:
    """BERT's linear layers have biases: all five support tensors exist in both implementations."""
    base = build_model("bert")
    randomise([m.bias for m in base.modules() if isinstance(m, nn.Linear)], seed=3)  # give D something to scale
    cfg = GLoRAConfig(r=2, a=ab, b=ab, c=c, d=de, e=de, targets="all-linear")
    ours = GLoRA().apply(copy.deepcopy(base), cfg)
    randomise(ours.trainable)
    layers = glora_layers(ours.model)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.GloraConfig(r=2, config_A_B=ab, config_C=c, config_D_E=de, target_modules=list(layers))
    )
    pairs = _glora_pairs(layers, theirs)
    assert len(pairs) == len(ours.trainable)
    batch = make_batch("bert")
    out_ours, out_theirs = ours.model(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for mine, reference in pairs:
        torch.testing.assert_close(mine.grad, reference.grad.view(mine.shape), atol=1e-5, rtol=0)


def test_glora_on_bias_free_layers_differs_from_peft_only_by_c_and_e(peft: Any) -> None:
    """Llama's projections have no bias. Like the authors' code we keep C (prompt W0 C) and E (shift)
    there and drop D; peft drops C, D and E. Without C and E both agree; with them ours differs."""
    base = build_model("llama")
    batch = make_batch("llama")
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.GloraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_layer = peft_model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert not list(peft_layer.glora_C["default"].parameters()) and not list(peft_layer.glora_E["default"].parameters())

    same = GLoRA().apply(copy.deepcopy(base), GLoRAConfig(r=2, c="none", e="none", targets="qv"))
    randomise(same.trainable)
    _glora_pairs(glora_layers(same.model), peft_model)
    torch.testing.assert_close(logits(same.model, batch), logits(peft_model, batch), atol=1e-5, rtol=0)

    ours = GLoRA().apply(copy.deepcopy(base), GLoRAConfig(r=2, targets="qv"))
    layer = glora_layers(ours.model)["model.layers.0.self_attn.q_proj"]
    assert {n for n, _ in layer.named_parameters() if not n.startswith("base_layer")} == {
        "glora_a.down",
        "glora_a.up",
        "glora_b.down",
        "glora_b.up",
        "glora_c.down",
        "glora_c.up",
        "glora_e.value",
    }
    randomise(ours.trainable)
    x = torch.randn(3, 32)
    w0 = layer.base_layer.weight
    a, b = layer.glora_a(), layer.glora_b()
    expected = x @ (w0 + w0 * a + b).T + (w0 @ layer.glora_c()).squeeze(-1) + layer.glora_e()
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


GLORA_FORMS = [
    {"a": "lora", "b": "lora", "c": "lora", "d": "vector", "e": "vector"},
    {"a": "vector", "b": "vector", "c": "vector", "d": "constant", "e": "constant"},
    {"a": "constant", "b": "none", "c": "none", "d": "none", "e": "vector"},
    {"a": "none", "b": "constant", "c": "lora", "d": "vector", "e": "none"},
]


@pytest.mark.parametrize("forms", GLORA_FORMS, ids=lambda f: "-".join(f.values()))
def test_glora_is_exact_identity_at_init(kind: str, forms: dict[str, str]) -> None:
    batch = make_batch(kind)
    adapted = GLoRA().apply(build_model(kind), GLoRAConfig(r=2, targets="all-linear", **forms))
    assert torch.equal(logits(adapted.model, batch), logits(build_model(kind), batch))


@pytest.mark.parametrize("forms", GLORA_FORMS, ids=lambda f: "-".join(f.values()))
def test_glora_merge_matches_unmerged(kind: str, forms: dict[str, str]) -> None:
    model = build_model(kind)
    randomise([m.bias for m in model.modules() if getattr(m, "bias", None) is not None and m.bias.dim() == 1], seed=2)
    adapted = GLoRA().apply(model, GLoRAConfig(r=2, targets="all-linear", **forms))
    randomise(adapted.trainable)
    layers = glora_layers(adapted.model)
    originals = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    biases = {n: layer.base_layer.bias.clone() for n, layer in layers.items() if layer.has_bias}
    batch = make_batch(kind)
    unmerged = logits(adapted.model, batch)
    adapted.merge()
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)
    if kind == "llama" and forms["e"] != "none":  # E gave the bias-free projections a bias
        assert all(layer.base_layer.bias is not None for layer in layers.values())
    adapted.unmerge()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, originals[n], atol=1e-5, rtol=1e-5)
        if n in biases:
            torch.testing.assert_close(layer.base_layer.bias, biases[n], atol=1e-5, rtol=1e-5)
        else:
            assert layer.base_layer.bias is None
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)


def test_shift_invariant_layers_follow_the_architecture() -> None:
    """Keys without rotary positions ignore a shared shift (GPT-2's keys sit inside the fused c_attn,
    which is not all key); LayerNorm models' block outputs ignore a feature-uniform one; Llama
    (rotary, RMSNorm) has neither."""
    assert shift_invariant_layers(build_model("llama")) == {}
    gpt2 = shift_invariant_layers(build_model("gpt2"))
    assert gpt2 == {f"transformer.h.{i}.{s}": "feature" for i in range(2) for s in ("attn.c_proj", "mlp.c_proj")}
    bert = shift_invariant_layers(build_model("bert"))
    assert {n for n, kind in bert.items() if kind == "token"} == {f"bert.encoder.layer.{i}.attention.self.key" for i in range(2)}
    assert {n for n, kind in bert.items() if kind == "feature"} == {
        f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in ("attention.output.dense", "output.dense")
    }


def test_glora_names_the_support_tensors_the_architecture_makes_inert() -> None:
    """The decision for inert support tensors: they stay trainable (the paper counts them), and apply
    warns and names each with its reason. On BERT with every form on all attention and FFN layers:
    C, D and E of each key projection, and the constant B and E of each block output projection."""
    cfg = GLoRAConfig(r=2, a="vector", b="constant", c="vector", d="vector", e="constant", targets="all-linear")
    with pytest.warns(UserWarning, match="get no gradient"):
        adapted = GLoRA().apply(build_model("bert"), cfg)
    keys = [f"bert.encoder.layer.{i}.attention.self.key.glora_{x}.value" for i in range(2) for x in "cde"]
    outputs = [f"bert.encoder.layer.{i}.{s}.glora_{x}.value"
               for i in range(2) for s in ("attention.output.dense", "output.dense") for x in "be"]
    assert sorted(adapted.inert) == sorted(keys + outputs)
    assert "softmax" in adapted.inert[keys[0]] and "LayerNorm" in adapted.inert[outputs[0]]
    trainable = {id(p) for p in adapted.trainable}
    assert all(id(p) in trainable for n, p in adapted.model.named_parameters() if n in adapted.inert)
    # Llama: RMSNorm and rotary positions, so the same config has nothing inert and no warning.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GLoRA().apply(build_model("llama"), cfg).inert == {}


def test_full_fine_tuning_declares_the_key_biases_inert(kind: str) -> None:
    adapted = methods.get("full").apply(build_model(kind), methods.get("full").Config())
    inert = inert_parameters(adapted.model, adapted.trainable, adapted.inert)
    expected = {"bert": {f"bert.encoder.layer.{i}.attention.self.key.bias" for i in range(2)}, "gpt2": set(), "llama": set()}[kind]
    assert set(inert) == expected


def test_glora_bias_scale_d_trains_when_biases_are_nonzero() -> None:
    model = build_model("bert")
    randomise([m.bias for m in model.modules() if isinstance(m, nn.Linear)], seed=4)
    adapted = GLoRA().apply(model, GLoRAConfig(r=2, targets="qv"))
    adapted.model(**make_batch("bert")).loss.backward()
    for layer in glora_layers(adapted.model).values():
        assert layer.glora_d.value.grad.abs().sum() > 0


def test_glora_config_validation() -> None:
    for values, key in [
        ({"r": 0}, "r"),
        ({"a": "full"}, "a"),
        ({"c": "constant"}, "c"),
        ({"d": "lora"}, "d"),
        ({"e": "lora"}, "e"),
        ({"a": "none", "b": "none", "c": "none", "d": "none", "e": "none"}, "a"),
    ]:
        with pytest.raises(ConfigError) as info:
            GLoRAConfig.from_dict(values)
        assert info.value.key == key, values


# ---------------------------------------------------------------- MultiLoRA


def test_multilora_init_follows_the_paper() -> None:
    """Scaling factors at zero, A and B both Kaiming-uniform (B is not zero as in LoRA): exactly the base model."""
    adapted = MultiLoRA().apply(build_model("llama"), MultiLoRAConfig(n=3, r=4, targets="qv"))
    for layer in multilora_layers(adapted.model).values():
        assert torch.equal(layer.lora_scale, torch.zeros(3))
        assert layer.lora_B.abs().min() >= 0 and 0 < layer.lora_B.abs().max() <= 1 / 4**0.5
        assert layer.lora_A.abs().max() <= 1 / 32**0.5
    batch = make_batch("llama")
    assert torch.equal(logits(adapted.model, batch), logits(build_model("llama"), batch))


def test_multilora_is_a_scaled_sum_of_n_loras(kind: str) -> None:
    adapted = MultiLoRA().apply(build_model(kind), MultiLoRAConfig(n=3, r=2, targets="qv"))
    randomise(adapted.trainable)
    for layer in multilora_layers(adapted.model).values():
        total = sum(layer.module_delta(i) for i in range(3))
        torch.testing.assert_close(layer.delta_weight(), total.T if layer.fan_in_fan_out else total, atol=1e-6, rtol=0)
        x = torch.randn(2, layer.in_features)
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ total.T, atol=1e-5, rtol=0)


def test_multilora_with_one_module_is_lora_with_a_learned_scale(kind: str) -> None:
    """n = 1 and s = alpha / r is LoRA: same outputs and the same gradients for A and B."""
    base = build_model(kind)
    ours = MultiLoRA().apply(copy.deepcopy(base), MultiLoRAConfig(n=1, r=4, targets="qv"))
    lora = LoRA().apply(copy.deepcopy(base), LoRAConfig(r=4, alpha=8, targets="qv"))
    pairs = []
    for (name, layer), reference in zip(multilora_layers(ours.model).items(), lora_layers(lora.model).values(), strict=True):
        with torch.no_grad():
            layer.lora_scale.fill_(reference.scaling)
            reference.lora_A.copy_(layer.lora_A)
            reference.lora_B.copy_(layer.lora_B)
        pairs += [(layer.lora_A, reference.lora_A), (layer.lora_B, reference.lora_B)]
    batch = make_batch(kind)
    out_ours, out_lora = ours.model(**batch), lora.model(**batch)
    torch.testing.assert_close(out_ours.logits, out_lora.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_lora.loss.backward()
    for mine, reference in pairs:
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=0)


def test_multilora_update_has_rank_n_times_r() -> None:
    """n modules of rank r span up to n r directions where one rank-r LoRA spans r."""
    adapted = MultiLoRA().apply(build_model("llama"), MultiLoRAConfig(n=3, r=2, targets="qv"))
    randomise([layer.lora_scale for layer in multilora_layers(adapted.model).values()], around=1.0)
    for layer in multilora_layers(adapted.model).values():
        assert torch.linalg.matrix_rank(layer.delta_weight()) == 6
        assert all(torch.linalg.matrix_rank(layer.module_delta(i)) == 2 for i in range(3))


def test_multilora_merge_matches_unmerged(kind: str) -> None:
    adapted = MultiLoRA().apply(build_model(kind), MultiLoRAConfig(n=2, r=2, targets="all-linear"))
    randomise([layer.lora_scale for layer in multilora_layers(adapted.model).values()], around=0.5)
    layers = multilora_layers(adapted.model)
    originals = {n: layer.base_layer.weight.clone() for n, layer in layers.items()}
    batch = make_batch(kind)
    unmerged = logits(adapted.model, batch)
    adapted.merge()
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)
    adapted.unmerge()
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, originals[n], atol=1e-6, rtol=0)


def test_multilora_config_validation() -> None:
    for values, key in [({"n": 0}, "n"), ({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"alpha": 8}, "alpha")]:
        with pytest.raises(ConfigError) as info:
            MultiLoRAConfig.from_dict(values)
        assert info.value.key == key, values


# ---------------------------------------------------------------- all four


@pytest.mark.parametrize("name", ["bottleneck_adapter", "ia3", "glora", "multilora"])
@pytest.mark.parametrize("causal", ["llama", "gpt2"])
def test_generation_works_after_training_a_step(name: str, causal: str) -> None:
    method = methods.get(name)
    adapted = method.apply(build_model(causal), method.Config.from_dict(method.battery_configs[0]))
    batch = make_batch(causal)
    optimizer = torch.optim.AdamW(adapted.trainable, lr=1e-2)
    adapted.model(**batch).loss.backward()
    optimizer.step()
    out = adapted.model.generate(
        batch["input_ids"][:, :4], attention_mask=batch["attention_mask"][:, :4], max_new_tokens=3, do_sample=False
    )
    assert out.shape == (2, 7)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _drop_one(path: Path) -> None:
    state = load_file(str(path))
    state.pop(sorted(state)[0])
    save_file(state, str(path))


def _add_base_weight(path: Path) -> None:
    """A tensor naming a frozen base weight must not be loaded over it."""
    state = load_file(str(path))
    save_file({**state, "lm_head.weight": torch.zeros(128, 32)}, str(path))


def _reshape_one(path: Path) -> None:
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = torch.cat([state[key], state[key]])
    save_file(state, str(path))


@pytest.mark.parametrize("name", ["bottleneck_adapter", "ia3", "glora", "multilora"])
@pytest.mark.parametrize("corrupt", [_truncate, _drop_one, _add_base_weight, _reshape_one], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_adapter_file_is_named(name: str, corrupt: Any, tmp_path: Path) -> None:
    method = methods.get(name)
    cfg = method.Config.from_dict(method.battery_configs[0])
    method.apply(build_model("llama"), cfg).save(tmp_path)
    corrupt(tmp_path / "adapter.safetensors")
    with pytest.raises(AdapterFileError, match="adapter.safetensors"):
        method.apply(build_model("llama"), cfg).load(tmp_path)


@pytest.mark.parametrize("name", ["ia3", "glora", "multilora"])
def test_loading_into_a_merged_model_replaces_the_update(name: str, tmp_path: Path) -> None:
    method = methods.get(name)
    cfg = method.Config.from_dict(method.battery_configs[0])
    trained = method.apply(build_model("llama"), cfg)
    randomise(trained.trainable, around=1.0 if name == "ia3" else 0.0)
    trained.save(tmp_path)
    other = method.apply(build_model("llama"), cfg)
    randomise(other.trainable, seed=7, around=1.0 if name == "ia3" else 0.0)
    other.merge()
    other.load(tmp_path)
    batch = make_batch("llama")
    torch.testing.assert_close(logits(other.model, batch), logits(trained.model, batch), atol=1e-5, rtol=0)
