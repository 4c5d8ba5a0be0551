"""Where a method's authors chose differently from peft or from our first implementation, the
authors' choice is the default or an option (each module's docstring says which, with the
citation); these tests pin the authors' behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_model, make_batch

import methods
from methods.auto_rgn import AutoRGNConfig, norm_parameter_ids
from methods.glora import Support
from methods.layers import blocks
from methods.qalora import QALoRAConfig
from methods.quantizers import quant_lora_layers


def uniform_bound(t: torch.Tensor) -> float:
    return float(t.detach().abs().max())


def test_glora_up_factors_are_xavier_uniform() -> None:
    """ViT-Slim GLoRA/layer.py: nn.init.xavier_uniform_ on Au, Bu, Cu (down factors zero)."""
    torch.manual_seed(0)
    s = Support("lora", 64, 256, r=4, column=True, dtype=torch.float32, device=torch.device("cpu"))
    xavier = math.sqrt(6 / (256 + 4))  # fan_in 256, fan_out 4: 0.152
    kaiming = 1 / math.sqrt(256)  # Kaiming-uniform with a = sqrt(5): 0.0625
    assert uniform_bound(s.up) <= xavier
    assert uniform_bound(s.up) > 2 * kaiming
    assert float(s.down.abs().max()) == 0.0


@pytest.mark.parametrize("a_init, bound", [("xavier", math.sqrt(6 / (2 + 4))), ("kaiming", 1 / math.sqrt(4))])
def test_qalora_a_init_option(a_init: str, bound: float) -> None:
    """yuhuixu1993/qa-lora peft_utils.py reset_lora_parameters: Xavier-uniform A, zero B."""
    torch.manual_seed(0)
    cfg = QALoRAConfig.from_dict({"r": 2, "group_size": 8, "targets": "qv", "a_init": a_init})
    adapted = methods.get("qalora").apply(build_model("llama"), cfg)
    a = torch.cat([layer.lora_A.detach().reshape(-1) for layer in quant_lora_layers(adapted.model).values()])
    # A is r x (32 / 8) = 2 x 4: Xavier's bound sqrt(6 / 6) = 1, Kaiming's 1 / sqrt(4) = 0.5.
    assert uniform_bound(a) <= bound
    assert uniform_bound(a) > 0.6 * bound
    assert all(float(layer.lora_B.abs().max()) == 0.0 for layer in quant_lora_layers(adapted.model).values())


def test_qalora_a_init_is_validated() -> None:
    with pytest.raises(methods.base.ConfigError) as info:
        QALoRAConfig.from_dict({"a_init": "orthogonal"})
    assert info.value.key == "a_init"


def _auto_rgn(**values):
    model = build_model("llama")
    cfg = AutoRGNConfig.from_dict({"probe_batches": 1, **values})
    adapted = methods.get("auto_rgn").apply(model, cfg)
    groups = adapted.hooks.param_groups(adapted.trainable)
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    return model, adapted, optimizer


def _step(model, optimizer) -> None:
    optimizer.zero_grad()
    model(**make_batch("llama")).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("reset", [True, False])
def test_auto_rgn_reset_moments_starts_adam_over_each_epoch(reset: bool) -> None:
    """The reference builds a new Adam every epoch: moments and step count start over."""
    model, adapted, optimizer = _auto_rgn(reset_moments=reset)
    adapted.hooks.on_epoch(0, iter([make_batch("llama")]), optimizer)
    _step(model, optimizer)
    steps = {int(s["step"]) for s in optimizer.state.values()}
    assert steps == {1}
    adapted.hooks.on_epoch(1, iter([make_batch("llama", seed=2)]), optimizer)
    if reset:
        assert len(optimizer.state) == 0
    else:
        assert len(optimizer.state) == len(adapted.trainable)
    _step(model, optimizer)
    assert {int(s["step"]) for s in optimizer.state.values()} == ({1} if reset else {2})


def test_auto_rgn_skip_norms_freezes_every_norm() -> None:
    """The reference keeps its "bn" tensors out of the optimizer."""
    model, adapted, _ = _auto_rgn(skip_norms=True)
    norms = norm_parameter_ids(model)
    assert norms  # the tiny Llama has input, post-attention and final RMSNorms
    assert not norms & {id(p) for p in adapted.trainable}
    assert all(not p.requires_grad for p in model.parameters() if id(p) in norms)
    assert sum(p.numel() for p in adapted.trainable) == methods.get("auto_rgn").expected_trainable(
        build_model("llama"), AutoRGNConfig(skip_norms=True))
    _, default, _ = _auto_rgn()
    assert sum(p.numel() for p in default.trainable) > sum(p.numel() for p in adapted.trainable)


STEMS = [("llama", {"model.embed_tokens.weight"}), ("gpt2", {"transformer.wte.weight", "transformer.wpe.weight"})]


@pytest.mark.parametrize("kind, stem", STEMS)
def test_surgical_stem_plus_first_is_the_references_first_block(kind: str, stem: set[str]) -> None:
    """The reference's first block is conv1 (the stem) plus block1: blocks = ["stem", "first"]."""
    method = methods.get("surgical")
    model = build_model(kind)
    cfg = method.Config.from_dict({"blocks": ["stem", "first"]})
    adapted = method.apply(model, cfg)
    first = {n for n, p in model.named_parameters() if any(p is q for q in blocks(model)[0].parameters())}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == stem | first
    assert sum(p.numel() for p in adapted.trainable) == method.expected_trainable(build_model(kind), cfg)


def test_surgical_stem_of_our_cnn_is_inside_stage_zero() -> None:
    from bench.tasks import vision

    method = methods.get("surgical")
    model = vision.ResNet4(10, widths=(8, 8, 8, 8))
    adapted = method.apply(model, method.Config.from_dict({"blocks": ["stem", "first"]}))
    stage0 = {n for n, _ in model.named_parameters() if n.startswith("stages.0.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == stage0
    assert adapted.trainable


def test_prompt_tuning_vocab_init_draws_from_the_first_vocab_top_rows() -> None:
    """The authors' from_sample_of_embeddings draws from the first population_size (5,000) rows."""
    method = methods.get("prompt_tuning")
    model = build_model("llama")
    embed = model.get_input_embeddings().weight.detach().clone()
    torch.manual_seed(0)
    adapted = method.apply(model, method.Config.from_dict({"n_tokens": 16, "init": "vocab", "vocab_top": 5}))
    prompt = adapted.trainable[0].detach()
    # Each prompt row is a copy of one of the first 5 embedding rows.
    assert all(any(torch.equal(row, embed[i]) for i in range(5)) for row in prompt)


def test_houlsby_adapter_bert_init_std() -> None:
    """adapter-bert's feedforward_adapter: truncated normal with stddev init_scale = 1e-3 (an option here)."""
    method = methods.get("bottleneck_adapter")
    model = build_model("bert")
    torch.manual_seed(0)
    adapted = method.apply(model, method.Config.from_dict({"size": 64, "init_std": 1e-3}))
    weights = torch.cat([p.detach().reshape(-1) for p in adapted.trainable if p.dim() == 2])
    assert float(weights.abs().max()) <= 2e-3
    assert 0.5e-3 < float(weights.std()) < 1e-3  # a N(0, 1e-6) truncated at two std has std 0.88e-3


@pytest.mark.parametrize("reference, merge_after", [(False, 3), (True, 4)])
def test_relora_zero_lr_step_position(reference: bool, merge_after: int) -> None:
    """Guitaricet/relora merges after the zero-rate step (update_step % relora == 1); ours before it by default."""
    from methods.relora import ReLoRAConfig, jagged
    from methods.lora import lora_layers

    cfg = ReLoRAConfig.from_dict({"r": 2, "targets": "qv", "reset_every": 4, "restart_warmup": 2, "zero_lr_before_merge": reference})
    model = build_model("llama")
    adapted = methods.get("relora").apply(model, cfg)
    layer = next(iter(lora_layers(model).values()))
    with torch.no_grad():
        layer.lora_B.normal_()
    optimizer = torch.optim.SGD(adapted.trainable, lr=0.0)
    first_merge = None
    for step in range(8):
        before = layer.base_layer.weight.detach().clone()
        adapted.hooks.on_step(step, optimizer)
        if first_merge is None and not torch.equal(before, layer.base_layer.weight):
            first_merge = step
    assert first_merge == merge_after
    # Step 4 is the zero-rate step in both orders: in the reference's it precedes the merge.
    assert adapted.hooks.lr_multiplier(4) == jagged(4, 4, 2) == 0.0
    assert adapted.hooks.lr_multiplier(5) == 0.5


def _randomise_adapters(model) -> None:
    from methods.adapters import adapter_layers

    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in (layer.adapter_down.weight, layer.adapter_up.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


@pytest.mark.parametrize("kind, wrapped", [
    ("bert", {"bert.encoder.layer.0.attention.output.dropout", "bert.encoder.layer.0.output.dropout"}),
    ("gpt2", {"transformer.h.0.attn.resid_dropout", "transformer.h.0.mlp.dropout"}),
    ("llama", {"model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"}),  # no dropout there
])
def test_adapter_after_dropout_as_adapter_bert(kind: str, wrapped: set[str]) -> None:
    """adapter-bert applies the adapter to dropout(dense(h)), before the residual add and LN."""
    from methods.adapters import adapter_layers

    method = methods.get("bottleneck_adapter")
    model = build_model(kind)
    cfg = method.Config.from_dict({"size": 4, "position": "after_dropout"})
    adapted = method.apply(model, cfg)
    names = set(adapter_layers(model))
    assert wrapped <= names and len(names) == 2 * len(blocks(model))
    assert sum(p.numel() for p in adapted.trainable) == method.expected_trainable(build_model(kind), cfg)
    model(**make_batch(kind)).loss.backward()
    assert all(p.grad is not None for p in adapted.trainable if p.dim() == 2)


def test_pfeiffer_stream_on_a_pre_ln_block_is_y_plus_adapter_of_y() -> None:
    """adapter-hub SeqBnConfig on Llama: block output residual + h + A(residual + h) = y + A(y)."""
    method = methods.get("bottleneck_adapter")
    base, model = build_model("llama"), build_model("llama")
    method.apply(model, method.Config.from_dict({"size": 4, "placement": "pfeiffer", "position": "stream", "activation": "relu"}))
    _randomise_adapters(model)
    outputs = {}
    # Registered after the adapter's hook, so it sees the adapted output.
    base.model.layers[0].register_forward_hook(lambda m, args, out: outputs.update(y=out))
    model.model.layers[0].register_forward_hook(lambda m, args, out: outputs.update(got=out))
    batch = make_batch("llama")
    with torch.no_grad():
        base(**batch)
        model(**batch)
        adapter = model.model.layers[0].pfeiffer_adapter
        y = outputs["y"]
        expected = y + adapter.adapter_up(torch.relu(adapter.adapter_down(y)))
    torch.testing.assert_close(outputs["got"], expected, atol=1e-5, rtol=1e-5)
    assert float((outputs["got"] - y).abs().max()) > 1e-2  # the adapter matters


def test_pfeiffer_stream_on_a_post_ln_block_reapplies_the_original_ln() -> None:
    """On BERT: LN(s + A(LN(s))), s = dropout(dense(h)) + x the FFN's residual sum."""
    from methods.adapters import StreamAdapterPostLN

    method = methods.get("bottleneck_adapter")
    model = build_model("bert")
    method.apply(model, method.Config.from_dict({"size": 4, "placement": "pfeiffer", "position": "stream", "activation": "relu"}))
    _randomise_adapters(model)
    wrapper = model.bert.encoder.layer[0].output.LayerNorm
    assert isinstance(wrapper, StreamAdapterPostLN)
    seen = {}
    wrapper.register_forward_hook(lambda m, args, out: seen.update(s=args[0], out=out))
    with torch.no_grad():
        model(**make_batch("bert"))
        ln = wrapper.base_layer
        y = ln(seen["s"])
        expected = ln(seen["s"] + wrapper.adapter_up(torch.relu(wrapper.adapter_down(y))))
    torch.testing.assert_close(seen["out"], expected)
    assert float((seen["out"] - y).abs().max()) > 1e-2
    # The blocks' norms stay findable (train_norms): the wrapped LN is among them, once.
    from methods.layers import block_norms

    assert sum(n is ln for n in block_norms(model)) == 1


def test_stream_position_needs_pfeiffer() -> None:
    with pytest.raises(methods.base.ConfigError) as info:
        methods.get("bottleneck_adapter").Config.from_dict({"position": "stream"})
    assert info.value.key == "position"
