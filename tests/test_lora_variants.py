"""LoRA-FA, DoRA, VeRA and Tied-LoRA: equality with peft where it has the method, and each
paper's own property (frozen A, detached norm, shared random matrices, tied tensors)."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model, logits, make_batch
from torch import Tensor, nn

import methods
from methods.base import Adapted, AdapterFileError, ConfigError
from methods.dora import DoRA, DoRALinear
from methods.lora import LoRA, LoRAConfig, lora_layers
from methods.lora_fa import LoRAFA
from methods.tied_lora import FACTORS, TiedLoRA, TiedLoRAConfig
from methods.vera import VeRA, VeRAConfig

PEFT = "base_model.model."


@pytest.fixture(scope="module")
def peft() -> Any:
    return pytest.importorskip("peft")


def adapt(name: str, values: dict[str, Any], kind: str) -> Adapted:
    method = methods.get(name)
    return method.apply(build_model(kind), method.Config.from_dict(values))


def randomise(tensors: list[Tensor], seed: int = 0, scale: float = 0.1) -> None:
    """Zero-initialised factors would make most comparisons pass trivially."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=gen) * scale)


def peft_lora(peft: Any, base: nn.Module, cfg: LoRAConfig, names: list[str], kind: str, **extra: Any) -> Any:
    return peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            use_rslora=cfg.rslora,
            target_modules=names,
            fan_in_fan_out=kind == "gpt2",
            **extra,
        ),
    )


def assert_same_outputs_and_grads(ours: nn.Module, theirs: nn.Module, pairs: list[tuple[Tensor, Tensor]], kind: str) -> None:
    batch = make_batch(kind)
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for mine, reference in pairs:
        assert mine.grad is not None and reference.grad is not None
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=0)


def train(adapted: Adapted, kind: str, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(adapted.trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        adapted.model(**make_batch(kind)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ---------------------------------------------------------------- LoRA-FA


@pytest.mark.parametrize("values", LoRAFA.battery_configs, ids=str)
def test_lora_fa_matches_peft_lora_fa(values: dict[str, Any], kind: str, peft: Any) -> None:
    """peft's create_lorafa_optimizer freezes the same tensors; the model is its LoRA with those
    frozen, and B's gradients agree in every layer (the lower layers' only through the branch's
    input gradient in the upper ones, which a no_grad A x would drop)."""
    from peft.optimizers import create_lorafa_optimizer

    cfg = LoRAConfig.from_dict(values)
    base = build_model(kind)
    ours = LoRAFA().apply(copy.deepcopy(base), cfg)
    layers = lora_layers(ours.model)
    randomise([layer.lora_B for layer in layers.values()])
    theirs = peft_lora(peft, copy.deepcopy(base), cfg, list(layers), kind)
    create_lorafa_optimizer(theirs, r=cfg.r, lora_alpha=int(cfg.alpha), lr=1e-3)
    theirs_trainable = {n.removeprefix(PEFT).replace(".default", "") for n, p in theirs.named_parameters() if p.requires_grad}
    assert theirs_trainable == {f"{name}.lora_B.weight" for name in layers}
    assert [p for layer in layers.values() for p in (layer.lora_B,)] == ours.trainable

    pairs = []
    for name, layer in layers.items():
        module = theirs.get_submodule(PEFT + name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
        pairs.append((layer.lora_B, module.lora_B["default"].weight))
    assert_same_outputs_and_grads(ours.model, theirs, pairs, kind)


def test_lora_fa_frozen_a_gets_no_grad_and_stays_bit_identical(kind: str) -> None:
    adapted = adapt("lora_fa", {"r": 4, "targets": "all-linear"}, kind)
    layers = lora_layers(adapted.model)
    a_before = {n: layer.lora_A.detach().clone() for n, layer in layers.items()}
    b_before = {n: layer.lora_B.detach().clone() for n, layer in layers.items()}
    train(adapted, kind)
    for name, layer in layers.items():
        assert not layer.lora_A.requires_grad and layer.lora_A.grad is None, name
        assert torch.equal(layer.lora_A, a_before[name]), name
        assert not torch.equal(layer.lora_B, b_before[name]), name


def _saved_for_backward(layer: nn.Module, x: Tensor) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, whether it is the input's storage) of every tensor autograd keeps for backward."""
    saved: list[tuple[tuple[int, ...], bool]] = []

    def pack(t: Tensor) -> Tensor:
        saved.append((tuple(t.shape), t.data_ptr() == x.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return saved


def test_lora_fa_keeps_no_input_sized_activation() -> None:
    """The paper's memory claim: with A frozen, backward keeps A x (r per token), not x (in per token)."""
    x = torch.randn(2, 8, 32, requires_grad=True)
    saved = {}
    for method in (LoRA(), LoRAFA()):
        adapted = method.apply(build_model("llama"), LoRAConfig(r=4, targets="qv"))
        saved[method.name] = _saved_for_backward(adapted.model.model.layers[0].self_attn.q_proj, x)
    assert ((16, 32), True) in saved["lora"]  # LoRA keeps x for A's gradient
    assert not any(is_input for _, is_input in saved["lora_fa"])
    assert ((16, 4), False) in saved["lora_fa"]  # A x, for B's gradient
    activations = [shape for shape, _ in saved["lora_fa"] if shape[0] == 16]
    assert activations == [(16, 4)], saved["lora_fa"]


def test_lora_fa_save_load_restores_a(tmp_path: Path) -> None:
    """A is random and frozen: the adapter must carry it, or a reload would use another A."""
    adapted = adapt("lora_fa", {"r": 4}, "llama")
    randomise([layer.lora_B for layer in lora_layers(adapted.model).values()])
    adapted.save(tmp_path)
    torch.manual_seed(1234)  # a fresh A unlike the saved one
    fresh = adapt("lora_fa", {"r": 4}, "llama")
    batch = make_batch("llama")
    assert not torch.allclose(logits(fresh.model, batch), logits(adapted.model, batch))
    fresh.load(tmp_path)
    assert torch.equal(logits(fresh.model, batch), logits(adapted.model, batch))


def test_peft_loads_our_lora_fa_adapter(kind: str, peft: Any, tmp_path: Path) -> None:
    adapted = adapt("lora_fa", {"r": 2, "targets": "all-linear"}, kind)
    randomise([layer.lora_B for layer in lora_layers(adapted.model).values()])
    adapted.save(tmp_path)
    loaded = peft.PeftModel.from_pretrained(build_model(kind), tmp_path)
    batch = make_batch(kind)
    torch.testing.assert_close(logits(loaded, batch), logits(adapted.model, batch), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- DoRA


def _dora_tensors(adapted: Adapted) -> list[Tensor]:
    return [t for layer in lora_layers(adapted.model).values() for t in (layer.lora_B, layer.lora_magnitude)]


@pytest.mark.parametrize("values", DoRA.battery_configs, ids=str)
def test_dora_matches_peft(values: dict[str, Any], kind: str, peft: Any) -> None:
    cfg = DoRA.Config.from_dict(values)
    base = build_model(kind)
    ours = DoRA().apply(copy.deepcopy(base), cfg)
    layers = lora_layers(ours.model)
    theirs = peft_lora(peft, copy.deepcopy(base), cfg, list(layers), kind, use_dora=True)
    # At init both magnitudes are ||W|| per output feature: same formula, same layout.
    for name, layer in layers.items():
        torch.testing.assert_close(
            layer.lora_magnitude, theirs.get_submodule(PEFT + name).lora_magnitude_vector["default"].weight, atol=1e-6, rtol=0
        )
    randomise(_dora_tensors(ours))
    pairs = []
    for name, layer in layers.items():
        module = theirs.get_submodule(PEFT + name)
        theirs_tensors = (module.lora_A["default"].weight, module.lora_B["default"].weight, module.lora_magnitude_vector["default"].weight)
        for mine, reference in zip((layer.lora_A, layer.lora_B, layer.lora_magnitude), theirs_tensors):
            with torch.no_grad():
                reference.copy_(mine)
            pairs.append((mine, reference))
    assert_same_outputs_and_grads(ours.model, theirs, pairs, kind)


def test_dora_norm_is_a_constant_in_backward() -> None:
    """The layer equals m * V / ||V||_c with V = W + s B A and the norm detached (paper, section 4.3),
    gradients included, and differs from the fully differentiated form."""
    adapted = adapt("dora", {"r": 4, "alpha": 8}, "gpt2")  # Conv1D: the norm runs over the stored rows
    layer = adapted.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, DoRALinear)
    randomise([layer.lora_B, layer.lora_magnitude], scale=0.3)
    x = torch.randn(3, 32)
    params = (layer.lora_A, layer.lora_B, layer.lora_magnitude)

    def grads(detach: bool | None) -> tuple[Tensor, list[Tensor]]:
        if detach is None:
            y = layer(x)
        else:
            v = layer.base_layer.weight.T + layer.scaling * layer.lora_B @ layer.lora_A
            norm = v.norm(dim=1, keepdim=True)
            y = x @ (layer.lora_magnitude[:, None] * v / (norm.detach() if detach else norm)).T + layer.base_layer.bias
        return y, list(torch.autograd.grad((y * torch.arange(y.numel()).view_as(y).sin()).sum(), params))

    out, ours = grads(None)
    out_detached, detached = grads(True)
    _, full = grads(False)
    torch.testing.assert_close(out, out_detached, atol=1e-5, rtol=0)
    for mine, reference in zip(ours, detached):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[1], full[1], atol=1e-4)  # B: the norm depends on it, m does not enter it


def test_dora_identity_at_init_and_magnitude_is_weight_norm(kind: str) -> None:
    adapted = adapt("dora", {"r": 4}, kind)
    for layer in lora_layers(adapted.model).values():
        assert torch.equal(layer.lora_magnitude, torch.linalg.vector_norm(layer.oriented_weight(), dim=1))
    batch = make_batch(kind)
    assert torch.equal(logits(adapted.model, batch), logits(build_model(kind), batch))


def test_dora_merge_matches_unmerged(kind: str) -> None:
    adapted = adapt("dora", {"r": 4, "targets": "all-linear"}, kind)
    randomise(_dora_tensors(adapted))
    layers = lora_layers(adapted.model)
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    batch = make_batch(kind)
    unmerged = logits(adapted.model, batch)
    adapted.merge()
    assert all(layer.merged for layer in layers.values())
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)
    adapted.unmerge()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, before[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)


def test_peft_loads_our_dora_adapter_and_we_load_peft_s(kind: str, peft: Any, tmp_path: Path) -> None:
    adapted = adapt("dora", {"r": 2, "alpha": 4, "targets": "qv"}, kind)
    randomise(_dora_tensors(adapted))
    adapted.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(build_model(kind), tmp_path / "ours")
    batch = make_batch(kind)
    torch.testing.assert_close(logits(loaded, batch), logits(adapted.model, batch), atol=1e-5, rtol=0)

    theirs = peft_lora(
        peft, build_model(kind), LoRAConfig(r=2, alpha=4), list(lora_layers(adapted.model)), kind, use_dora=True, init_lora_weights=False
    )
    theirs.save_pretrained(tmp_path / "theirs")
    fresh = adapt("dora", {"r": 2, "alpha": 4, "targets": "qv"}, kind)
    fresh.load(tmp_path / "theirs")
    torch.testing.assert_close(logits(fresh.model, batch), logits(theirs, batch), atol=1e-5, rtol=0)


def test_lora_and_dora_adapters_do_not_load_into_each_other(tmp_path: Path) -> None:
    adapt("dora", {"r": 4}, "llama").save(tmp_path / "dora")
    adapt("lora", {"r": 4}, "llama").save(tmp_path / "lora")
    with pytest.raises(AdapterFileError, match="use_dora"):
        adapt("lora", {"r": 4}, "llama").load(tmp_path / "dora")
    with pytest.raises(AdapterFileError, match="use_dora"):
        adapt("dora", {"r": 4}, "llama").load(tmp_path / "lora")


# ---------------------------------------------------------------- VeRA


def _peft_vera(peft: Any, base: nn.Module, cfg: VeRAConfig, names: list[str], kind: str) -> Any:
    return peft.get_peft_model(
        base,
        peft.VeraConfig(r=cfg.r, target_modules=names, projection_prng_key=cfg.seed, d_initial=cfg.d_init, fan_in_fan_out=kind == "gpt2"),
    )


@pytest.mark.parametrize("values", VeRA.battery_configs, ids=str)
def test_vera_matches_peft(values: dict[str, Any], kind: str, peft: Any) -> None:
    cfg = VeRAConfig.from_dict(values)
    base = build_model(kind)
    ours = VeRA().apply(copy.deepcopy(base), cfg)
    layers = lora_layers(ours.model)
    theirs = _peft_vera(peft, copy.deepcopy(base), cfg, list(layers), kind)
    first = next(iter(layers.values()))
    # The same seed draws the same frozen matrices.
    assert torch.equal(first.lora_A, theirs.base_model.vera_A["default"])
    assert torch.equal(first.lora_B, theirs.base_model.vera_B["default"])
    randomise([t for layer in layers.values() for t in (layer.lora_u, layer.lora_v)])
    pairs = []
    for name, layer in layers.items():
        module = theirs.get_submodule(PEFT + name)
        for mine, reference in ((layer.lora_u, module.vera_lambda_d["default"]), (layer.lora_v, module.vera_lambda_b["default"])):
            with torch.no_grad():
                reference.copy_(mine)
            pairs.append((mine, reference))
    assert_same_outputs_and_grads(ours.model, theirs, pairs, kind)
    peft_trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert sum(p.numel() for p in ours.trainable) == peft_trainable


def test_vera_trainable_count_and_shared_frozen_matrices(kind: str) -> None:
    cfg = VeRAConfig(r=16, targets="all-linear")
    adapted = VeRA().apply(build_model(kind), cfg)
    layers = list(lora_layers(adapted.model).values())
    outs = [layer.out_features for layer in layers]
    assert sum(p.numel() for p in adapted.trainable) == cfg.r * len(layers) + sum(outs)
    assert all(layer.lora_A is layers[0].lora_A and layer.lora_B is layers[0].lora_B for layer in layers)
    assert layers[0].lora_A.shape == (cfg.r, max(layer.in_features for layer in layers))
    assert layers[0].lora_B.shape == (max(outs), cfg.r)
    assert not layers[0].lora_A.requires_grad and not layers[0].lora_B.requires_grad
    train(adapted, kind, steps=1)
    assert layers[0].lora_A.grad is None and layers[0].lora_B.grad is None


def test_vera_adapter_carries_its_matrices(tmp_path: Path) -> None:
    """Saved with seed 3, loaded into a model drawn with seed 0: the file's matrices win."""
    adapted = adapt("vera", {"r": 8, "seed": 3}, "llama")
    randomise([layer.lora_v for layer in lora_layers(adapted.model).values()])
    adapted.save(tmp_path)
    fresh = adapt("vera", {"r": 8, "seed": 0}, "llama")
    fresh.load(tmp_path)
    batch = make_batch("llama")
    assert torch.equal(logits(fresh.model, batch), logits(adapted.model, batch))


def test_vera_config_validation() -> None:
    for values, key in [({"r": 0}, "r"), ({"d_init": 0.0}, "d_init"), ({"dropout": 1.0}, "dropout"), ({"rank": 4}, "rank")]:
        with pytest.raises(ConfigError) as info:
            VeRAConfig.from_dict(values)
        assert info.value.key == key, values


# ---------------------------------------------------------------- Tied-LoRA


def test_tied_lora_shares_one_tensor_per_kind_of_target(kind: str) -> None:
    adapted = adapt("tied_lora", {"r": 4, "targets": "all-linear"}, kind)
    layers = lora_layers(adapted.model)
    by_kind: dict[str, list[Any]] = {}
    for name, layer in layers.items():
        by_kind.setdefault(name.replace(".0.", ".*.").replace(".1.", ".*."), []).append(layer)
    assert all(len(members) == 2 for k, members in by_kind.items() if "pooler" not in k)
    for members in by_kind.values():
        assert all(m.lora_A is members[0].lora_A and m.lora_B is members[0].lora_B for m in members)
        assert len({id(m.lora_u) for m in members}) == len(members)
    assert len({id(members[0].lora_A) for members in by_kind.values()}) == len(by_kind)
    # Listed once, for the optimizer and in the saved state.
    assert len({id(p) for p in adapted.trainable}) == len(adapted.trainable)
    assert sum(1 for key in adapted.state_dict() if key.endswith("lora_A")) == len(by_kind)


def _untie(model: nn.Module) -> None:
    """Give every layer its own copy of the shared A and B (same values)."""
    for layer in lora_layers(model).values():
        layer.lora_A = nn.Parameter(layer.lora_A.detach().clone())
        layer.lora_B = nn.Parameter(layer.lora_B.detach().clone())


def test_tied_lora_grad_is_the_sum_over_layers(kind: str) -> None:
    adapted = adapt("tied_lora", {"r": 4, "targets": "qv"}, kind)
    layers = lora_layers(adapted.model)
    randomise([t for layer in layers.values() for t in (layer.lora_B, layer.lora_u, layer.lora_v)], scale=0.3)
    untied = copy.deepcopy(adapted.model)
    _untie(untied)
    batch = make_batch(kind)
    tied_out, untied_out = adapted.model(**batch), untied(**batch)
    torch.testing.assert_close(tied_out.logits, untied_out.logits, atol=0, rtol=0)
    tied_out.loss.backward()
    untied_out.loss.backward()
    untied_layers = lora_layers(untied)
    for which in ("lora_A", "lora_B"):
        shared = {id(getattr(layer, which)): getattr(layer, which) for layer in layers.values()}
        for param in shared.values():
            users = [name for name, layer in layers.items() if getattr(layer, which) is param]
            assert len(users) >= 2
            total = sum(getattr(untied_layers[name], which).grad for name in users)
            assert param.grad.abs().sum() > 0
            torch.testing.assert_close(param.grad, total, atol=1e-6, rtol=1e-5)


TRAIN_SETS = [list(c) for n in range(1, 5) for c in itertools.combinations(FACTORS, n)]


@pytest.mark.parametrize("train_set", TRAIN_SETS, ids=lambda t: "".join(t))
def test_tied_lora_every_variant_starts_exact_and_learns(train_set: list[str]) -> None:
    """Each choice of trained factors trains exactly those, starts as the base model, and moves it
    after one step (so the zero used for the identity is never a dead end)."""
    adapted = adapt("tied_lora", {"r": 4, "targets": "qv", "train": train_set}, "llama")
    layers = lora_layers(adapted.model).values()
    trained = {id(getattr(layer, f"lora_{f}")) for layer in layers for f in train_set}
    assert {id(p) for p in adapted.trainable} == trained
    method, cfg = TiedLoRA(), TiedLoRAConfig(r=4, targets="qv", train=train_set)
    assert sum(p.numel() for p in adapted.trainable) == method.expected_trainable(build_model("llama"), cfg)
    batch = make_batch("llama")
    reference = logits(build_model("llama"), batch)
    assert torch.equal(logits(adapted.model, batch), reference)
    adapted.model(**batch).loss.backward()
    with torch.no_grad():
        for p in adapted.trainable:
            p.sub_(p.grad)  # one plain gradient step
    assert not torch.allclose(logits(adapted.model, batch), reference, atol=1e-6)


def test_tied_lora_merge_matches_unmerged(kind: str) -> None:
    for name, values in (("tied_lora", {"r": 4, "targets": "all-linear"}), ("vera", {"r": 8, "targets": "all-linear"})):
        adapted = adapt(name, values, kind)
        layers = lora_layers(adapted.model)
        randomise([t for layer in layers.values() for t in (layer.lora_B, layer.lora_u, layer.lora_v)])
        batch = make_batch(kind)
        unmerged = logits(adapted.model, batch)
        adapted.merge()
        torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)
        adapted.unmerge()
        torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-6, rtol=0)


def test_tied_lora_save_load_restores_frozen_random_tensors(tmp_path: Path) -> None:
    values = {"r": 4, "targets": "qv", "train": ["u", "v"]}  # A and B frozen random: only the file has them
    adapted = adapt("tied_lora", values, "llama")
    randomise([layer.lora_v for layer in lora_layers(adapted.model).values()])
    adapted.save(tmp_path)
    torch.manual_seed(99)
    fresh = adapt("tied_lora", values, "llama")
    fresh.load(tmp_path)
    batch = make_batch("llama")
    assert torch.equal(logits(fresh.model, batch), logits(adapted.model, batch))
    fresh_layers = list(lora_layers(fresh.model).values())
    assert fresh_layers[0].lora_A is fresh_layers[2].lora_A  # loading keeps the tying


def test_tied_lora_config_validation() -> None:
    for values in ({"train": ["C"]}, {"train": []}, {"train": ["u", "u"]}, {"train": "vBuA"}):
        with pytest.raises(ConfigError) as info:
            TiedLoRAConfig.from_dict(values)
        assert info.value.key == "train", values


def test_tied_lora_kind_with_two_shapes_is_a_config_error() -> None:
    model = build_model("llama")
    model.model.layers[1].self_attn.q_proj = nn.Linear(32, 48, bias=False)
    with pytest.raises(ConfigError, match="q_proj") as info:
        TiedLoRA().apply(model, TiedLoRAConfig(targets="qv"))
    assert info.value.key == "targets"
    assert all(p.requires_grad for p in model.parameters())


def _drop_tensor(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "adapter.safetensors"))
    state.pop(next(iter(state)))
    save_file(state, str(d / "adapter.safetensors"))
    return d / "adapter.safetensors"


def _other_rank(d: Path) -> Path:
    saved = json.loads((d / "adapter_config.json").read_text())
    saved["config"]["r"] += 1
    (d / "adapter_config.json").write_text(json.dumps(saved))
    return d / "adapter_config.json"


def _other_method(d: Path) -> Path:
    saved = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**saved, "method": "lora"}))
    return d / "adapter_config.json"


def _truncated(d: Path) -> Path:
    path = d / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    return path


@pytest.mark.parametrize("name", ["vera", "tied_lora"])
@pytest.mark.parametrize("corrupt", [_drop_tensor, _other_rank, _other_method, _truncated], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_adapter_names_the_file(name: str, corrupt: Any, tmp_path: Path) -> None:
    adapt(name, {"r": 4}, "llama").save(tmp_path)
    bad = corrupt(tmp_path)
    with pytest.raises(AdapterFileError, match=bad.name):
        adapt(name, {"r": 4}, "llama").load(tmp_path)
