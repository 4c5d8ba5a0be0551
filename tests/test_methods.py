"""The method battery: every registered method on every tiny layout, plus LoRA-specific checks.

A method takes part automatically once it is in methods.REGISTRY. It may declare, as ClassVars:
- `battery_configs`: the configs to test (default [{}]);
- `battery_kinds`: the tiny layouts it supports (default all of MODEL_KINDS); on any other
  layout `apply` must raise ConfigError before touching the model;
- `init_atol`: the largest change of the logits at init its paper allows (0.0 = exact
  identity, as for LoRA with B = 0); None (default) when the method changes the model at init.
It must expose `expected_trainable(model, cfg) -> int`, a closed-form count independent of `apply`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MODEL_KINDS, VOCAB, build_model, logits, make_batch
from torch import Tensor

import methods
from bench.run.suite import TrainSpec
from bench.tasks.tokens import collate, collate_packed
from bench.trial.loss import loss as train_loss
from bench.trial.loss import packs, width_cost
from bench.trial.train import train
from methods.base import Adapted, AdapterFileError, ConfigError, MethodConfig
from methods.layers import inert_parameters, resolve_targets
from methods.lora import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LoRA,
    LoRAConfig,
    LoRALinear,
    lora_layers,
)


def _case_id(name: str, values: dict[str, Any]) -> str:
    return "-".join([name, *(f"{k}={v}" for k, v in values.items())])


def _kinds(name: str) -> tuple[str, ...]:
    return tuple(getattr(methods.get(name), "battery_kinds", MODEL_KINDS))


CASES = [
    pytest.param(name, values, kind, id=f"{_case_id(name, values)}-{kind}")
    for name in methods.names()
    for values in getattr(methods.get(name), "battery_configs", [{}])
    for kind in _kinds(name)
]
UNSUPPORTED = [
    pytest.param(name, kind, id=f"{name}-{kind}") for name in methods.names() for kind in MODEL_KINDS if kind not in _kinds(name)
]
LORA_CASES = [pytest.param(values, id=_case_id("lora", values)) for values in LoRA.battery_configs]


def adapt(name: str, values: dict[str, Any], kind: str) -> tuple[Any, MethodConfig, Adapted]:
    method = methods.get(name)
    cfg = method.Config.from_dict(values)
    return method, cfg, method.apply(build_model(kind), cfg)


def train_step(adapted: Adapted, batch: dict[str, Tensor]) -> None:
    optimizer = torch.optim.AdamW(adapted.trainable, lr=1e-2)
    adapted.model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def randomise_b(adapted: Adapted, seed: int = 0) -> None:
    """B starts at zero, which would make many comparisons trivially pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(adapted.model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


# ---------------------------------------------------------------- the battery, every method


@pytest.mark.parametrize(("name", "values", "kind"), CASES)
def test_only_trainable_params_get_grads(name: str, values: dict[str, Any], kind: str) -> None:
    _, _, adapted = adapt(name, values, kind)
    trainable = {id(p) for p in adapted.trainable}
    assert len(trainable) == len(adapted.trainable), "a tensor is listed twice in trainable"
    params = dict(adapted.model.named_parameters())
    assert trainable <= {id(p) for p in params.values()}, "trainable holds tensors outside the model"
    for n, p in params.items():
        assert p.requires_grad == (id(p) in trainable), n

    loss = adapted.model(**make_batch(kind)).loss
    if not trainable:
        assert not loss.requires_grad
        return
    loss.backward()
    for n, p in params.items():
        if id(p) in trainable:
            assert p.grad is not None, f"trainable {n} got no grad"
        else:
            assert p.grad is None, f"frozen {n} got a grad"


@pytest.mark.parametrize(("name", "values", "kind"), CASES)
def test_trainable_count_is_closed_form(name: str, values: dict[str, Any], kind: str) -> None:
    method, cfg, adapted = adapt(name, values, kind)
    expected = method.expected_trainable(build_model(kind), cfg)
    assert sum(p.numel() for p in adapted.trainable) == expected


def inert_names(adapted: Adapted) -> dict[str, str]:
    return inert_parameters(adapted.model, adapted.trainable, adapted.inert)


def trainable_names(adapted: Adapted) -> list[str]:
    names = {id(p): n for n, p in adapted.model.named_parameters()}
    return [names[id(p)] for p in adapted.trainable]


@pytest.mark.parametrize(("name", "values", "kind"), CASES)
def test_optimizer_steps_change_every_live_trainable(name: str, values: dict[str, Any], kind: str) -> None:
    """Two steps, since a factor whose partner starts at zero (LoRA's A) gets its first gradient in the
    second; tensors the architecture makes inert are left out (the next test pins them down)."""
    _, _, adapted = adapt(name, values, kind)
    if not adapted.trainable:
        pytest.skip("nothing to train")
    before = [p.detach().clone() for p in adapted.trainable]
    batch = make_batch(kind)
    train_step(adapted, batch)
    train_step(adapted, batch)
    inert = inert_names(adapted)
    unchanged = [n for n, p, old in zip(trainable_names(adapted), adapted.trainable, before) if torch.equal(p, old) and n not in inert]
    assert not unchanged, f"trainable tensors {unchanged} did not change"


# A live tensor's float64 gradient is at least LIVE times the largest one, an inert tensor's at most
# INERT: rounding in float64 leaves crumbs near 1e-16, so no CPU's rounding can cross the gap.
LIVE, INERT = 1e-9, 1e-12


@pytest.mark.parametrize(("name", "values", "kind"), CASES)
def test_exactly_the_declared_inert_tensors_get_no_gradient(name: str, values: dict[str, Any], kind: str) -> None:
    """In float64, at init and after one AdamW step without weight decay: every trainable tensor has a
    real gradient, except those the method (or the shared key-bias rule) declares inert, whose
    gradient is zero up to float64 rounding. A zero that only exact arithmetic gives would otherwise
    make a test pass or fail on one CPU's rounding."""
    method = methods.get(name)
    adapted = method.apply(build_model(kind).double(), method.Config.from_dict(values))
    if not adapted.trainable:
        pytest.skip("nothing to train")
    batch = make_batch(kind)
    optimizer = torch.optim.AdamW(adapted.trainable, lr=1e-2, weight_decay=0.0)
    scale = [0.0] * len(adapted.trainable)
    for _ in range(2):
        optimizer.zero_grad()
        adapted.model(**batch).loss.backward()
        grads = [0.0 if p.grad is None else p.grad.abs().max().item() for p in adapted.trainable]
        scale = [max(s, g / max(grads)) for s, g in zip(scale, grads)]
        optimizer.step()
    inert = inert_names(adapted)
    named = dict(zip(trainable_names(adapted), scale))
    assert set(inert) <= set(named), "declared inert tensors that are not trainable"
    dead = {n: f"{s:.1e}" for n, s in named.items() if s < LIVE and n not in inert}
    assert not dead, f"trainable tensors with no real gradient, not declared inert: {dead}"
    live = {n: f"{named[n]:.1e}" for n in inert if named[n] > INERT}
    assert not live, f"declared inert but got a gradient: {live}"


@pytest.mark.parametrize(("name", "values", "kind"), CASES)
def test_save_load_gives_same_outputs(name: str, values: dict[str, Any], kind: str, tmp_path: Path) -> None:
    method, cfg, adapted = adapt(name, values, kind)
    batch = make_batch(kind)
    if adapted.trainable:
        train_step(adapted, batch)
    adapted.save(tmp_path)

    fresh = method.apply(build_model(kind), cfg)
    fresh.load(tmp_path)
    torch.testing.assert_close(logits(fresh.model, batch), logits(adapted.model, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "values", "kind"), CASES)
def test_identity_at_init(name: str, values: dict[str, Any], kind: str) -> None:
    atol = getattr(methods.get(name), "init_atol", None)
    if atol is None:
        pytest.skip(f"{name} changes the model at init")
    batch = make_batch(kind)
    _, _, adapted = adapt(name, values, kind)
    torch.testing.assert_close(logits(adapted.model, batch), logits(build_model(kind), batch), atol=atol, rtol=0)


TRAIN_STEPS = 30
HEAD_GAIN = 10.0


@pytest.mark.parametrize(("name", "values", "kind"), [c for c in CASES if c.values[2] == "llama"])
def test_method_reduces_training_loss(name: str, values: dict[str, Any], kind: str) -> None:
    """30 AdamW steps on one fixed batch through the one training loop (bench.trial.train.train, so
    every hook runs as in a trial: param groups, lr multipliers, on_step, on_epoch): every method
    with trainable tensors must clearly lower the loss (by a tenth at least); the frozen baseline
    must not move it at all."""
    torch.manual_seed(0)
    method = methods.get(name)
    model = build_model(kind)
    # A randomly initialised head (std 0.02) after a norm keeps the logits near zero whatever the
    # blocks do; a larger head lets a change inside the blocks show in the loss within 30 steps.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_GAIN)
    adapted = method.apply(model, method.Config.from_dict(values))
    # Tokens from an 8-word sub-vocabulary: learnable by any method that can move the logits
    # (ln 128 -> ln 8 and below), unlike uniform random tokens on a random model.
    batch = make_batch(kind, batch=4, seq=16)
    batch["input_ids"] = batch["input_ids"] % 8
    batch["labels"] = batch["input_ids"].clone()
    adapted.model.train()
    with torch.no_grad():
        first = adapted.model(**batch).loss.item()
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    t = TrainSpec(lr=getattr(method, "battery_lr", 1e-2), batch_size=4, max_steps=TRAIN_STEPS, schedule="constant",
                  weight_decay=0.01, clip=None).to_dict()
    result = train(adapted, rows, t, lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}, torch.device("cpu"))
    final = adapted.model(**batch).loss.item()
    if not adapted.trainable:
        assert result.steps == 0 and final == first
    else:
        assert result.steps == TRAIN_STEPS and result.loss_curve[0] == pytest.approx(first, rel=1e-5)
        assert final < 0.9 * first, f"{name}: loss {first:.4f} -> {final:.4f} in {TRAIN_STEPS} steps"


def _rows_of_unequal_length(seed: int = 0) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length in (16, 9, 13, 5):
        ids = torch.randint(1, VOCAB, (length,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return rows


PACKING = [c for c in CASES if c.values[2] != "bert" and getattr(methods.get(c.values[0]), "packs", True)]


@pytest.mark.parametrize(("name", "values", "kind"), PACKING)
def test_packed_rows_train_as_padded_rows(name: str, values: dict[str, Any], kind: str) -> None:
    """Every method that does not say `packs = False` computes each token from its own row, so rows
    laid end to end (bench.tasks.tokens.collate_packed, what the worker trains on when
    bench.trial.loss.packs allows) give the padded batch's loss and gradients. Trainables are moved
    off their init first (LoRA's B = 0 would hide its A's gradients); eval mode, because dropout
    draws its masks over the batch's shape."""
    torch.manual_seed(0)
    method = methods.get(name)
    adapted = method.apply(build_model(kind), method.Config.from_dict(values))
    assert packs(method, adapted.model)
    with torch.no_grad():
        for p in adapted.trainable:
            p.add_(torch.randn_like(p) * 0.05)
    adapted.model.eval()
    rows = _rows_of_unequal_length()
    results = []
    for batch in (collate(rows, pad_id=0), collate_packed(rows, pad_id=0, width_cost=width_cost(adapted.model))):
        for p in adapted.trainable:
            p.grad = None
        value = train_loss(adapted.model, batch)
        if adapted.trainable:
            value.backward()
        grads = [p.grad.flatten() for p in adapted.trainable if p.grad is not None]
        results.append((value.item(), torch.cat(grads) if grads else torch.zeros(1)))
    (padded, padded_grads), (packed, packed_grads) = results
    assert packed == pytest.approx(padded, rel=1e-5)
    assert padded_grads.shape == packed_grads.shape
    assert (packed_grads - padded_grads).norm() <= 1e-4 * padded_grads.norm() + 1e-12


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_packing_is_refused_where_rows_would_leak_into_each_other(kind: str) -> None:
    """An encoder (bidirectional attention) and methods that put positions in front of rows train padded."""
    lora = methods.get("lora")
    assert packs(lora, lora.apply(build_model(kind), lora.Config()).model) is (kind != "bert")
    for name in ("prompt_tuning", "prefix_tuning", "longlora"):
        method = methods.get(name)
        if kind in _kinds(name):
            values = getattr(method, "battery_configs", [{}])[0]
            assert not packs(method, method.apply(build_model(kind), method.Config.from_dict(values)).model)


@pytest.mark.parametrize(("name", "values", "kind"), [c for c in CASES if c.values[2] == "llama"])
def test_applies_to_a_weightless_skeleton(name: str, values: dict[str, Any], kind: str) -> None:
    """Suites are validated by applying every method to a meta-device copy of the model before
    anything runs (bench/run/suite.py): a method must not need weight values to be applied."""
    with torch.device("meta"):
        model = build_model(kind)
    method = methods.get(name)
    adapted = method.apply(model, method.Config.from_dict(values))
    assert sum(p.numel() for p in adapted.trainable) == method.expected_trainable(build_model(kind), method.Config.from_dict(values))


@pytest.mark.parametrize(("name", "kind"), UNSUPPORTED)
def test_unsupported_layout_is_a_config_error(name: str, kind: str) -> None:
    method = methods.get(name)
    cfg = method.Config.from_dict(getattr(method, "battery_configs", [{}])[0])
    model = build_model(kind)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError):
        method.apply(model, cfg)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items()), "apply changed the model before failing"


# ---------------------------------------------------------------- LoRA


def test_lora_is_exact_noop_at_init(kind: str) -> None:
    batch = make_batch(kind)
    reference = logits(build_model(kind), batch)
    for values in LoRA.battery_configs:
        _, _, adapted = adapt("lora", values, kind)
        assert torch.equal(logits(adapted.model, batch), reference)


@pytest.mark.parametrize("values", LORA_CASES)
def test_lora_merge_matches_unmerged(values: dict[str, Any], kind: str) -> None:
    _, _, adapted = adapt("lora", values, kind)
    randomise_b(adapted)
    batch = make_batch(kind)
    layers = lora_layers(adapted.model)
    base_weights = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    unmerged = logits(adapted.model, batch)

    assert adapted.merge() is adapted.model
    assert all(layer.merged for layer in layers.values())
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)

    adapted.unmerge()
    assert not any(layer.merged for layer in layers.values())
    for n, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, base_weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def peft() -> Any:
    return pytest.importorskip("peft")


@pytest.mark.parametrize("values", LORA_CASES)
def test_lora_matches_peft(values: dict[str, Any], kind: str, peft: Any) -> None:
    cfg = LoRAConfig.from_dict(values)
    base = build_model(kind)
    ours = LoRA().apply(copy.deepcopy(base), cfg)
    randomise_b(ours)
    layers = lora_layers(ours.model)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            use_rslora=cfg.rslora,
            target_modules=list(layers),
            fan_in_fan_out=any(layer.fan_in_fan_out for layer in layers.values()),
        ),
    )
    pairs = []
    for name, layer in layers.items():
        peft_layer = theirs.get_submodule(f"base_model.model.{name}")
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(layer.lora_A)
            b.copy_(layer.lora_B)
        pairs += [(layer.lora_A, a), (layer.lora_B, b)]

    batch = make_batch(kind)
    out_ours, out_theirs = ours.model(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for mine, reference in pairs:
        torch.testing.assert_close(mine.grad, reference.grad, atol=1e-5, rtol=0)


def test_peft_loads_our_adapter(kind: str, peft: Any, tmp_path: Path) -> None:
    _, cfg, adapted = adapt("lora", LoRA.battery_configs[-1], kind)
    randomise_b(adapted)
    adapted.save(tmp_path)

    loaded = peft.PeftModel.from_pretrained(build_model(kind), tmp_path)
    assert loaded.peft_config["default"].r == cfg.r
    batch = make_batch(kind)
    torch.testing.assert_close(logits(loaded, batch), logits(adapted.model, batch), atol=1e-5, rtol=0)


def test_we_load_an_adapter_peft_saved(kind: str, peft: Any, tmp_path: Path) -> None:
    cfg = LoRAConfig(r=4, alpha=8, targets="qv")
    ours = LoRA().apply(build_model(kind), cfg)
    theirs = peft.get_peft_model(
        build_model(kind),
        peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            target_modules=list(lora_layers(ours.model)),
            fan_in_fan_out=kind == "gpt2",
            init_lora_weights=False,  # random B, so that the adapter is not a no-op
        ),
    )
    theirs.save_pretrained(tmp_path)
    ours.load(tmp_path)
    batch = make_batch(kind)
    torch.testing.assert_close(logits(ours.model, batch), logits(theirs, batch), atol=1e-5, rtol=0)


def _truncate_weights(d: Path) -> Path:
    path = d / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    return path


def _garbage_config(d: Path) -> Path:
    (d / CONFIG_FILE).write_text("{not json")
    return d / CONFIG_FILE


def _wrong_rank_in_config(d: Path) -> Path:
    saved = json.loads((d / CONFIG_FILE).read_text())
    (d / CONFIG_FILE).write_text(json.dumps({**saved, "r": saved["r"] + 1}))
    return d / CONFIG_FILE


def _wrong_rank_tensor(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("lora_A.weight"))
    state[key] = torch.cat([state[key], state[key]])
    save_file(state, str(d / WEIGHTS_FILE))
    return d / WEIGHTS_FILE


def _extra_tensor(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / WEIGHTS_FILE))
    save_file({**state, "base_model.model.nowhere.lora_A.weight": torch.zeros(4, 32)}, str(d / WEIGHTS_FILE))
    return d / WEIGHTS_FILE


def _missing_tensor(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / WEIGHTS_FILE))
    state.pop(next(k for k in state if k.endswith("lora_B.weight")))
    save_file(state, str(d / WEIGHTS_FILE))
    return d / WEIGHTS_FILE


def _missing_weights(d: Path) -> Path:
    (d / WEIGHTS_FILE).unlink()
    return d / WEIGHTS_FILE


@pytest.mark.parametrize(
    "corrupt",
    [_truncate_weights, _garbage_config, _wrong_rank_in_config, _wrong_rank_tensor, _extra_tensor, _missing_tensor, _missing_weights],
    ids=lambda f: f.__name__.strip("_"),
)
def test_lora_corrupt_adapter_names_the_file(corrupt: Any, tmp_path: Path) -> None:
    _, cfg, adapted = adapt("lora", {"r": 4}, "llama")
    adapted.save(tmp_path)
    bad_file = corrupt(tmp_path)
    fresh = LoRA().apply(build_model("llama"), cfg)
    with pytest.raises(AdapterFileError, match=bad_file.name):
        fresh.load(tmp_path)


def test_lora_config_validation() -> None:
    for values, key in [
        ({"r": 0}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"r": "8"}, "r"),
        ({"rank": 8}, "rank"),
    ]:
        with pytest.raises(ConfigError) as info:
            LoRAConfig.from_dict(values)
        assert info.value.key == key, values
    assert LoRAConfig.from_dict({"alpha": 32, "r": 16, "rslora": True}).scaling == 8.0


def test_lora_wraps_conv1d_and_linear() -> None:
    _, _, gpt2 = adapt("lora", {"targets": "qv"}, "gpt2")
    _, _, llama = adapt("lora", {"targets": "qv"}, "llama")
    assert all(layer.fan_in_fan_out for layer in lora_layers(gpt2.model).values())
    assert not any(layer.fan_in_fan_out for layer in lora_layers(llama.model).values())
    state_names = [n for n, _ in gpt2.model.named_parameters()]
    assert "transformer.h.0.attn.c_attn.base_layer.weight" in state_names
    assert "transformer.h.0.attn.c_attn.lora_A" in state_names
    assert isinstance(gpt2.model.transformer.h[0].attn.c_attn, LoRALinear)


# ---------------------------------------------------------------- resolve_targets

BLOCK_PREFIX = {"llama": "model.layers.{}.", "gpt2": "transformer.h.{}.", "bert": "bert.encoder.layer.{}."}
_LLAMA_ATTN = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
_LLAMA_MLP = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_BERT_ATTN = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"]
_BERT_MLP = ["intermediate.dense", "output.dense"]
# alias -> module names inside each block; the head is never a target.
IN_BLOCK = {
    "llama": {
        "qv": ["self_attn.q_proj", "self_attn.v_proj"],
        "kv": ["self_attn.k_proj", "self_attn.v_proj"],
        "attention": _LLAMA_ATTN,
        "mlp": _LLAMA_MLP,
        "all-linear": _LLAMA_ATTN + _LLAMA_MLP,
    },
    "gpt2": {
        "qv": ["attn.c_attn"],
        "kv": ["attn.c_attn"],
        "attention": ["attn.c_attn", "attn.c_proj"],
        "mlp": ["mlp.c_fc", "mlp.c_proj"],
        "all-linear": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    },
    "bert": {
        "qv": ["attention.self.query", "attention.self.value"],
        "kv": ["attention.self.key", "attention.self.value"],
        "attention": _BERT_ATTN,
        "mlp": _BERT_MLP,
        "all-linear": _BERT_ATTN + _BERT_MLP,
    },
}
OUTSIDE_BLOCKS = {("bert", "all-linear"): {"bert.pooler.dense"}}


@pytest.mark.parametrize("alias", ["qv", "kv", "attention", "mlp", "all-linear"])
def test_resolve_targets_aliases(alias: str, kind: str) -> None:
    expected = {BLOCK_PREFIX[kind].format(i) + name for i in range(2) for name in IN_BLOCK[kind][alias]}
    expected |= OUTSIDE_BLOCKS.get((kind, alias), set())
    assert {n for n, _ in resolve_targets(build_model(kind), alias)} == expected


def test_resolve_targets_suffix_list_and_regex() -> None:
    model = build_model("llama")
    assert [n for n, _ in resolve_targets(model, ["q_proj", "mlp"])] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        *(f"model.layers.{i}.{name}" for i in range(2) for name in _LLAMA_MLP),
    ]
    assert [n for n, _ in resolve_targets(model, r"layers\.1\..*o_proj$")] == ["model.layers.1.self_attn.o_proj"]


@pytest.mark.parametrize("targets", ["no_such_layer", ["no_such_layer"], [], "("])
def test_unmatched_targets_raise_config_error(targets: Any) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_targets(build_model("llama"), targets)
    assert info.value.key == "targets"


def test_lora_unmatched_target_raises_before_touching_model() -> None:
    model = build_model("gpt2")
    with pytest.raises(ConfigError) as info:
        LoRA().apply(model, LoRAConfig(targets=["q_proj"]))
    assert info.value.key == "targets"
    assert all(p.requires_grad for p in model.parameters())


def test_every_kind_is_covered() -> None:
    assert set(MODEL_KINDS) == set(BLOCK_PREFIX) == set(IN_BLOCK)
