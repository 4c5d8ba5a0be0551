"""LoftQ, QA-LoRA and LQ-LoRA beyond the shared battery: the quantizers, LoftQ's init error,
QA-LoRA's exact merge against merge-then-quantize, LQ-LoRA's budgeted plan."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import build_model, logits, make_batch, with_4bit_q_proj
from torch import Tensor, nn

import methods
from methods.base import AdapterFileError, ConfigError
from methods.layers import resolve_targets
from methods.loftq import LoftQ, LoftQConfig, decompose, plain_quantization_error
from methods.lqlora import LQLoRA, LQLoRAConfig, QConfig, _greedy, average_bits, solve
from methods.lqlora import decompose as lq_decompose
from methods.lora import LoRA, LoRAConfig, lora_layers
from methods.qalora import QALoRA, QALoRAConfig, merge_then_quantize, merge_then_quantize_error, qalora_merge_error
from methods.quantizers import (
    PackedWeight,
    QuantizedLinear,
    ScaleQuant,
    nf_codebook,
    pack,
    quant_lora_layers,
    quantize,
    quantize_scales,
    unpack,
    weight_of,
)


def randomise_b(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in quant_lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


def original_weights(kind: str, targets: str) -> dict[str, Tensor]:
    return {n: weight_of(m) for n, m in resolve_targets(build_model(kind), targets)}


# ---------------------------------------------------------------- quantizers


def test_nf4_matches_bitsandbytes() -> None:
    bnb = pytest.importorskip("bitsandbytes.functional")
    torch.testing.assert_close(nf_codebook(4), bnb.get_4bit_type("nf4", device="cpu"), atol=1e-6, rtol=0)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    ours = quantize(w, "nf", 4, 64)
    packed, state = bnb.quantize_4bit(w.clone(), blocksize=64, quant_type="nf4")
    flat = packed.reshape(-1).long()
    theirs = torch.stack([flat >> 4, flat & 15], 1).reshape(-1)  # bnb: first code in the high nibble
    assert torch.equal(ours.codes().reshape(-1), theirs)
    torch.testing.assert_close(ours.scale, state.absmax)
    torch.testing.assert_close(ours.dequantize(), bnb.dequantize_4bit(packed, state), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip_and_size(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (1001 if bits == 8 else -(-1001 // 8) * bits)
    assert torch.equal(unpack(packed, bits, 1001), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int_quantizer_is_min_max_round_to_nearest(bits: int) -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    q = quantize(w, "int", bits, 32)
    blocks = w.reshape(-1, 32)
    torch.testing.assert_close(q.offset, blocks.amin(1))
    torch.testing.assert_close(q.scale, (blocks.amax(1) - blocks.amin(1)) / (2**bits - 1))
    err = (q.dequantize().reshape(-1, 32) - blocks).abs()
    assert (err <= q.scale.unsqueeze(1) / 2 + 1e-6).all()
    assert q.codes().max() <= 2**bits - 1
    # More bits, less error (nf and int alike).
    for kind in ("nf", "int"):
        errors = [float((quantize(w, kind, b, 64).dequantize() - w).norm()) for b in (2, 3, 4, 8)]
        assert errors == sorted(errors, reverse=True)


def test_stored_bytes_and_counts_as_bench_measures_them() -> None:
    from bench.trial.measure import param_counts, weight_bytes

    base = build_model("llama")
    total = sum(p.numel() for p in base.parameters())
    adapted = LoftQ().apply(build_model("llama"), LoftQConfig(r=4, targets="qv"))
    targets = dict(resolve_targets(build_model("llama"), "qv"))
    packed = [p for p in adapted.model.parameters() if isinstance(p, PackedWeight)]
    assert len(packed) == len(targets)
    assert weight_bytes(adapted.model)["uint8"] == sum(m.weight.numel() // 2 for m in targets.values())
    # Quantized weights count as weights, not bytes; the adapter adds r * (in + out) each.
    counts = param_counts(adapted.model, adapted.trainable)
    assert counts["total"] == total + counts["trainable"]


def test_a_quantized_base_is_refused() -> None:
    pytest.importorskip("bitsandbytes")
    model = with_4bit_q_proj(build_model("llama"))
    for method, cfg in [(LoftQ(), LoftQConfig(targets="qv")), (QALoRA(), QALoRAConfig(targets="qv"))]:
        with pytest.raises(ConfigError) as info:
            method.apply(model, cfg)
        assert info.value.key == "targets"


# ---------------------------------------------------------------- LoftQ


def test_loftq_init_beats_plain_quantization(kind: str) -> None:
    cfg = LoftQConfig(r=4, targets="all-linear")
    originals = original_weights(kind, cfg.targets)
    adapted = LoftQ().apply(build_model(kind), cfg)
    for name, layer in quant_lora_layers(adapted.model).items():
        w = originals[name]
        approx = layer.base_layer.dequantized_weight() + layer.delta_weight()
        err = float((w - approx).detach().norm())
        assert err == pytest.approx(layer.loftq_errors[0], rel=1e-4)
        assert err < 0.95 * plain_quantization_error(w, cfg), name
    # B is not zero: training starts from Q + s B A ~= W, not from Q.
    assert all(layer.lora_B.abs().sum() > 0 for layer in quant_lora_layers(adapted.model).values())


@pytest.mark.parametrize(("quant_type", "bits"), [("nf4", 4), ("nf", 2), ("int", 3)])
def test_loftq_error_does_not_increase_with_iterations(quant_type: str, bits: int) -> None:
    cfg = LoftQConfig(r=4, quant_type=quant_type, bits=bits)
    improved = 0
    for name, w in list(original_weights("llama", "all-linear").items())[:7]:
        errors = [decompose(w, cfg.r, cfg.scaling, t, lambda x: quantize(x, cfg.kind, cfg.bits, cfg.blocksize)).error for t in range(1, 6)]
        assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), (name, errors)
        assert errors[0] < plain_quantization_error(w, cfg)
        improved += errors[-1] < errors[0]
    assert improved >= 4, "more iterations should help most layers"


def test_loftq_model_follows_the_kept_iterate() -> None:
    cfg = LoftQConfig(r=4, targets="qv", iters=4)
    originals = original_weights("llama", "qv")
    adapted = LoftQ().apply(build_model("llama"), cfg)
    for name, layer in quant_lora_layers(adapted.model).items():
        err = float((originals[name] - layer.base_layer.dequantized_weight() - layer.delta_weight()).detach().norm())
        assert err == pytest.approx(min(layer.loftq_errors), rel=1e-4)


def test_loftq_merge_gives_float_weights_with_same_outputs() -> None:
    adapted = LoftQ().apply(build_model("llama"), LoftQConfig(r=4, targets="qv"))
    batch = make_batch("llama")
    before = logits(adapted.model, batch)
    adapted.merge()
    torch.testing.assert_close(logits(adapted.model, batch), before, atol=1e-5, rtol=0)
    adapted.unmerge()
    assert torch.equal(logits(adapted.model, batch), before)


def test_loftq_config_validation() -> None:
    for values, key in [
        ({"bits": 2}, "quant_type"),
        ({"bits": 5, "quant_type": "int"}, "bits"),
        ({"quant_type": "fp4"}, "quant_type"),
        ({"iters": 0}, "iters"),
        ({"r": 0}, "r"),
    ]:
        with pytest.raises(ConfigError) as info:
            LoftQConfig.from_dict(values)
        assert info.value.key == key, values
    with pytest.raises(ConfigError) as info:
        LoftQ().apply(build_model("llama"), LoftQConfig(r=33, targets="qv"))
    assert info.value.key == "r"


# ---------------------------------------------------------------- QA-LoRA


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_qalora_merge_is_exact_and_stays_quantized(kind: str, pool: str) -> None:
    adapted = QALoRA().apply(build_model(kind), QALoRAConfig(r=4, bits=4, group_size=16, targets="all-linear", pool=pool))
    randomise_b(adapted.model)
    layers = quant_lora_layers(adapted.model)
    saved = {
        n: (layer.base_layer.qweight.clone(), layer.base_layer.scale.clone(), layer.base_layer.offset.clone())
        for n, layer in layers.items()
    }
    batch = make_batch(kind)
    unmerged = logits(adapted.model, batch)

    adapted.merge()
    for name, layer in layers.items():
        codes, scale, offset = saved[name]
        assert torch.equal(layer.base_layer.qweight, codes) and torch.equal(layer.base_layer.scale, scale)
        assert not torch.equal(layer.base_layer.offset, offset)
        assert layer._merged_weight is None  # no float weight kept: the merged model is INT-k
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-5, rtol=0)

    adapted.unmerge()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.offset, saved[name][2], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(adapted.model, batch), unmerged, atol=1e-6, rtol=0)


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_qalora_adapter_is_a_group_constant_update(pool: str) -> None:
    adapted = QALoRA().apply(build_model("llama"), QALoRAConfig(r=4, group_size=16, targets="mlp", pool=pool))
    randomise_b(adapted.model)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    layer = adapted.model.model.layers[0].mlp.down_proj
    assert layer.lora_A.shape == (4, 64 // 16)
    dense = torch.nn.functional.linear(x, layer.base_layer.dequantized_weight() + layer.delta_weight())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=0)
    delta = layer.delta_weight().view(layer.out_features, -1, 16)
    assert torch.equal(delta, delta[..., :1].expand_as(delta))


def test_merge_then_quantize_loses_what_qalora_keeps() -> None:
    """Same tiny model, rank, scaling, bits and groups: a plain LoRA merged into the float
    weights then quantized to INT-4 moves the outputs; QA-LoRA's merge into the offsets does not."""
    batch = make_batch("llama")
    qa = QALoRA().apply(build_model("llama"), QALoRAConfig(r=4, alpha=8, bits=4, group_size=16, targets="all-linear"))
    randomise_b(qa.model)
    qa_unmerged = logits(qa.model, batch)
    assert qalora_merge_error(qa.model)["qalora_merge"] < 1e-6
    qa.merge()
    qa_gap = float((logits(qa.model, batch) - qa_unmerged).abs().max())

    plain = LoRA().apply(build_model("llama"), LoRAConfig(r=4, alpha=8, targets="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(plain.model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    plain_unmerged = logits(plain.model, batch)
    errors = merge_then_quantize_error(plain.model, bits=4, group_size=16)
    assert errors["merge_then_quantize"] > 1e-2
    assert set(errors["layers"]) == set(lora_layers(plain.model))
    posthoc = merge_then_quantize(plain.model, bits=4, group_size=16)
    assert not lora_layers(posthoc) and lora_layers(plain.model)
    posthoc_gap = float((logits(posthoc, batch) - plain_unmerged).abs().max())
    assert qa_gap < 1e-5 and posthoc_gap > 1e-2, (qa_gap, posthoc_gap)


def test_a_group_constant_update_survives_requantization() -> None:
    """Why pooling works: re-quantizing a QA-LoRA merge with min-max groups loses nothing."""
    qa = QALoRA().apply(build_model("llama"), QALoRAConfig(r=4, bits=3, group_size=16, targets="qv"))
    randomise_b(qa.model)
    assert merge_then_quantize_error(qa.model)["merge_then_quantize"] < 1e-5


def test_qalora_group_size_must_divide_inputs() -> None:
    model = build_model("llama")
    with pytest.raises(ConfigError) as info:
        QALoRA().apply(model, QALoRAConfig(group_size=24, targets="qv"))
    assert info.value.key == "group_size"
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError) as info:
        QALoRAConfig.from_dict({"pool": "max"})
    assert info.value.key == "pool"


# ---------------------------------------------------------------- LQ-LoRA

# A narrowed configuration space keeps the plan fast: every (b, B0) pair with two scale settings.
LQ_SPACE = {"bits_choices": [2, 3, 4, 8], "block_choices": [16, 64], "scale_bits_choices": [4, 8],
            "scale_dtype_choices": ["fp32"], "scale_block_choices": [256], "iters": 5}
NF3_DQ = QConfig(3, 64, ScaleQuant(8, "fp32", 256))


def outlier_matrix() -> Tensor:
    """256 x 256 Gaussian weights with 4 columns 30x larger (the issue's test matrix)."""
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) * 0.02
    w[:, [3, 70, 140, 200]] *= 30
    return w


def test_double_quantized_storage_matches_the_papers_figures() -> None:
    # NF4 with 8-bit absmaxes, B0 64, B1 256, fp32: QLoRA's 4.127 bits; NF3 the same: 3.127.
    assert QConfig(4, 64, ScaleQuant(8, "fp32", 256)).bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert NF3_DQ.bits_per_weight == pytest.approx(3.127, abs=5e-4)
    assert QConfig(2, 16, ScaleQuant(2, "bf16", 16)).bits_per_weight == pytest.approx(2 + 2 / 16 + 16 / 256)
    assert len(LQLoRAConfig().candidates()) == 4 * 3 * 4 * 3 * 3
    # The stored buffers are what the formula counts: packed scale codes and one amax per group in its dtype.
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(1))
    q = quantize(w, "nf", 3, 64, ScaleQuant(4, "bf16", 16))
    assert q.scales is not None and q.scales.amax.dtype == torch.bfloat16 and q.scales.amax.numel() == 128 * 256 // 64 // 16
    assert q.scales.packed.numel() == 128 * 256 // 64 * 4 // 8
    layer = QuantizedLinear(q, None)
    assert "scale" not in dict(layer.named_buffers())
    torch.testing.assert_close(layer.dequantized_weight(), q.dequantize())


def test_double_quantized_scales_round_within_half_a_step() -> None:
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    absmax = w.reshape(-1, 32).abs().amax(1)
    for bits in (2, 8):
        qs = quantize_scales(absmax, ScaleQuant(bits, "fp32", 16))
        step = (absmax - absmax.min()).view(-1, 16).amax(1) / (2**bits - 1)
        err = (qs.dequantize() - absmax).abs().view(-1, 16)
        assert (err <= step.unsqueeze(1) / 2 * (1 + 1e-5) + 1e-7).all()
    coarse = (quantize_scales(absmax, ScaleQuant(2, "fp32", 16)).dequantize() - absmax).norm()
    fine = (quantize_scales(absmax, ScaleQuant(8, "fp32", 16)).dequantize() - absmax).norm()
    assert fine < coarse / 10


def test_lqlora_decomposition_follows_the_published_order() -> None:
    """SVD of W first (Q = 0), then Q = quantize(W - L1 L2), then the SVD of W - Q, ..."""
    w = outlier_matrix()
    one = lq_decompose(w, 8, 1.0, NF3_DQ, iters=1, randomized=False)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    low = (u[:, :8] * s[:8]) @ vh[:8]
    torch.testing.assert_close(one.B @ one.A, low, atol=1e-5, rtol=1e-4)
    direct = quantize(w - one.B @ one.A, "nf", 3, 64, NF3_DQ.scale)
    assert torch.equal(one.q.packed, direct.packed)
    # Step 2: the SVD of W - Q1, then Q2 = quantize(W - L1 L2).
    two = lq_decompose(w, 8, 1.0, NF3_DQ, iters=2, randomized=False)
    u, s, vh = torch.linalg.svd(w - one.q.dequantize(), full_matrices=False)
    torch.testing.assert_close(two.B @ two.A, (u[:, :8] * s[:8]) @ vh[:8], atol=1e-5, rtol=1e-4)
    # LoftQ's first step quantizes W itself: a different Q.
    loftq_first = quantize(w, "nf", 3, 64, NF3_DQ.scale)
    assert not torch.equal(one.q.packed, loftq_first.packed)


def test_lqlora_stops_when_the_error_rises_and_keeps_the_best() -> None:
    w = outlier_matrix()
    d = lq_decompose(w, 8, 1.0, NF3_DQ, iters=100)
    errors = d.errors
    assert 1 < len(errors) <= 100
    assert all(b <= a for a, b in zip(errors[:-2], errors[1:-1]))  # descending until the last step
    assert len(errors) == 100 or errors[-1] > errors[-2]  # which rose, unless the cap was reached
    kept = float((w - d.q.dequantize() - d.B @ d.A).norm())
    assert kept == pytest.approx(min(errors), rel=1e-5)
    assert errors[-1] < 0.95 * errors[0]  # iterating helps on this matrix (0.96 -> 0.85 measured)


def test_lqlora_beats_loftq_one_step_and_plain_quantization_on_outlier_columns() -> None:
    w = outlier_matrix()
    quantizer = lambda x: quantize(x, "nf", 3, 64, NF3_DQ.scale)  # noqa: E731
    plain = float((w - quantizer(w).dequantize()).norm())
    loftq = decompose(w, 8, 1.0, 1, quantizer).error
    lq = lq_decompose(w, 8, 1.0, NF3_DQ).error
    # Measured: plain 4.20, LoftQ T=1 3.94, LQ-LoRA 0.85.
    assert lq < 0.5 * loftq
    assert loftq < plain


@pytest.fixture(scope="module")
def lq_plan():
    cfg = LQLoRAConfig.from_dict({"r": 2, "targets": "all-linear", "budget": 3.0, **LQ_SPACE})
    return cfg, LQLoRA().plan(build_model("llama"), cfg)


def test_lqlora_budget_respected_and_more_budget_less_error(lq_plan) -> None:
    cfg, plan = lq_plan
    assert plan.solver == "milp"
    total = sum(plan.numel)
    costs = [[n * c.bits_per_weight for c in plan.candidates] for n in plan.numel]
    previous = None
    for budget in [2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.5, 8.25, 8.5]:
        choice, _ = solve(plan.errors, costs, budget * total)
        used = sum(costs[i][c] for i, c in enumerate(choice)) / total
        err = sum(plan.errors[i][c] for i, c in enumerate(choice))
        assert used <= budget + 1e-9
        if previous is not None:
            assert err <= previous * (1 + 1e-9)
        previous = err
    cheapest = min(range(len(plan.candidates)), key=lambda c: plan.candidates[c].bits_per_weight)
    lowest = sum(plan.errors[i][cheapest] for i in range(len(plan.names)))
    assert previous < 0.1 * lowest
    # The plan from apply's budget mixes configurations.
    assert plan.average_bits <= cfg.budget + 1e-9
    assert len(set(plan.choice)) > 1


def test_lqlora_ilp_is_exact_and_greedy_is_feasible(lq_plan) -> None:
    _, plan = lq_plan
    rows = list(range(3))
    errors = [plan.errors[i] for i in rows]
    costs = [[plan.numel[i] * c.bits_per_weight for c in plan.candidates] for i in rows]
    capacity = 3.1 * sum(plan.numel[i] for i in rows)
    best = min(
        (sum(errors[i][c] for i, c in enumerate(combo)), combo)
        for combo in itertools.product(range(len(plan.candidates)), repeat=len(rows))
        if sum(costs[i][c] for i, c in enumerate(combo)) <= capacity
    )
    choice, _ = solve(errors, costs, capacity)
    assert sum(errors[i][c] for i, c in enumerate(choice)) == pytest.approx(best[0], rel=1e-9)
    greedy = _greedy(errors, costs, capacity)
    assert sum(costs[i][c] for i, c in enumerate(greedy)) <= capacity
    assert sum(errors[i][c] for i, c in enumerate(greedy)) >= best[0] * (1 - 1e-9)


def test_lqlora_apply_follows_plan(lq_plan) -> None:
    cfg, plan = lq_plan
    adapted = LQLoRA().apply(build_model("llama"), cfg)
    layers = quant_lora_layers(adapted.model)
    assert list(layers) == plan.names
    for i, (name, layer) in enumerate(layers.items()):
        qc = plan.config(i)
        assert (layer.base_layer.bits, layer.base_layer.blocksize, layer.base_layer.scale_quant) == (qc.bits, qc.blocksize, qc.scale)
        assert layer.lora_A.numel() + layer.lora_B.numel() == cfg.r * (layer.in_features + layer.out_features)
        # The built layer is the plan's decomposition: its error is the one the ILP saw.
        w = weight_of(dict(resolve_targets(build_model("llama"), cfg.targets))[name])
        err = float((w - layer.base_layer.dequantized_weight() - layer.delta_weight().detach()).norm()) ** 2
        assert err == pytest.approx(plan.errors[i][plan.choice[i]], rel=1e-4)
    assert average_bits(adapted.model) == pytest.approx(plan.average_bits)
    assert average_bits(adapted.model) <= cfg.budget + 1e-9
    assert sum(p.numel() for p in adapted.trainable) == methods.get("lqlora").expected_trainable(build_model("llama"), cfg)


def test_lqlora_budget_validation() -> None:
    with pytest.raises(ConfigError) as info:
        LQLoRAConfig.from_dict({"budget": 2.0})
    assert info.value.key == "budget"
    for key, value in [("bits_choices", [5]), ("scale_bits_choices", [1]), ("scale_dtype_choices", ["fp8"]), ("block_choices", [1])]:
        with pytest.raises(ConfigError) as info:
            LQLoRAConfig.from_dict({key: value})
        assert info.value.key == key


def test_lqlora_load_refuses_another_plan(tmp_path: Path) -> None:
    cfg = LQLoRAConfig.from_dict({"r": 2, "targets": "qv", "budget": 3.0, **LQ_SPACE})
    adapted = LQLoRA().apply(build_model("llama"), cfg)
    adapted.save(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    first = next(iter(saved["layers"]))
    saved["layers"][first]["scale_quant"]["bits"] = 4 if saved["layers"][first]["scale_quant"]["bits"] != 4 else 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(AdapterFileError, match="adapter_config.json"):
        LQLoRA().apply(build_model("llama"), cfg).load(tmp_path)


# ---------------------------------------------------------------- adapter files


def _truncate(d: Path) -> Path:
    path = d / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return path


def _other_rank(d: Path) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / "adapter.safetensors"))
    key = next(k for k in state if k.endswith("lora_A"))
    state[key] = torch.cat([state[key], state[key]])
    save_file(state, str(d / "adapter.safetensors"))
    return d / "adapter.safetensors"


def _other_config(d: Path) -> Path:
    saved = json.loads((d / "adapter_config.json").read_text())
    saved["config"]["r"] += 1
    (d / "adapter_config.json").write_text(json.dumps(saved))
    return d / "adapter_config.json"


@pytest.mark.parametrize("corrupt", [_truncate, _other_rank, _other_config], ids=lambda f: f.__name__.strip("_"))
def test_corrupt_adapter_names_the_file(corrupt, tmp_path: Path) -> None:
    cfg = QALoRAConfig(r=4, group_size=16, targets="qv")
    QALoRA().apply(build_model("llama"), cfg).save(tmp_path)
    bad = corrupt(tmp_path)
    with pytest.raises(AdapterFileError, match=bad.name):
        QALoRA().apply(build_model("llama"), cfg).load(tmp_path)


# ---------------------------------------------------------------- LQ-LoRA, Fisher-weighted


def test_weighted_svd_with_uniform_fisher_is_the_plain_svd() -> None:
    from methods.lqlora import rank_r, weighted_rank_r

    w = outlier_matrix()
    b, a = rank_r(w, 8, 2.0, randomized=False)
    wb, wa = weighted_rank_r(w, torch.full_like(w, 3.0), 8, 2.0, randomized=False)
    torch.testing.assert_close(wb @ wa, b @ a, atol=1e-4, rtol=1e-4)


def test_fisher_weighted_decomposition_trades_error_towards_heavy_rows() -> None:
    """Where F is large the weighted decomposition errs less than the unweighted one (Section 3.3)."""
    w = outlier_matrix()
    fisher = torch.ones_like(w)
    fisher[:32] = 100.0  # the first 32 output rows matter 100x more
    plain = lq_decompose(w, 8, 1.0, NF3_DQ, iters=20)
    weighted = lq_decompose(w, 8, 1.0, NF3_DQ, iters=20, fisher=fisher)

    def weighted_error(d) -> float:
        return float((fisher.sqrt() * (w - d.q.dequantize() - d.B @ d.A)).norm())

    assert weighted.error == pytest.approx(weighted_error(weighted), rel=1e-5)
    assert weighted_error(weighted) < 0.9 * weighted_error(plain)


def test_lqlora_fisher_variant_reads_the_trials_texts() -> None:
    from bench.models import _tiny_tokenizer
    from conftest import VOCAB

    from methods.base import MethodContext

    texts = tuple((f"Q{i}: what is {i}?", f" {i}") for i in range(4))
    context = MethodContext(tokenizer=_tiny_tokenizer(VOCAB), train=texts)
    cfg = LQLoRAConfig.from_dict({"r": 2, "targets": "qv", "budget": 3.0, "fisher_samples": 3, **LQ_SPACE})
    method = LQLoRA()
    model = build_model("llama")
    fisher = method.fisher(model, cfg, context)
    assert fisher is not None and set(fisher) == {n for n, _ in resolve_targets(build_model("llama"), "qv")}
    assert all(f.shape == weight_of(m).shape and float(f.sum()) > 0 for (n, m), f in zip(resolve_targets(model, "qv"), fisher.values()))
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # only autograd.grad was used
    weighted = method.plan(model, cfg, fisher)
    plain = method.plan(build_model("llama"), cfg)
    assert weighted.errors != plain.errors
    adapted = method.apply(build_model("llama"), cfg, context=context)
    assert len(quant_lora_layers(adapted.model)) == len(weighted.names)
    with pytest.raises(ConfigError) as info:
        method.apply(build_model("llama"), cfg)
    assert info.value.key == "fisher_samples"


def test_quantizing_a_meta_skeleton_first_does_not_poison_the_cached_tables() -> None:
    """Suite validation quantizes weightless skeletons inside `torch.device("meta")`; the codebook
    and byte tables it caches must still serve real weights afterwards."""
    from methods import quantizers

    for table in (quantizers._nf_codebook, quantizers._byte_codes, quantizers._byte_values):
        table.cache_clear()
    with torch.device("meta"):
        quantize(torch.empty(8, 64), "nf", 3, 64, ScaleQuant(8, "fp32", 256))
        quantize(torch.empty(8, 64), "nf", 4, 64)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for bits in (3, 4):
        q = quantize(w, "nf", bits, 64)
        assert q.dequantize().device.type == "cpu"
        assert float((q.dequantize() - w).abs().max()) < float(w.abs().max())
