"""Prefix tuning and LLaMA-Adapter: equality with peft, generation through the cache, the zero gate.

The shared battery (tests/test_methods.py) already checks grads, counts, saving and training for
both; these tests check what is particular to methods that act inside attention.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import build_model, make_batch
from torch import Tensor, nn

from methods.base import ConfigError
from methods.llama_adapter import LlamaAdapter, LlamaAdapterConfig
from methods.prefix_tuning import PrefixTuning, PrefixTuningConfig, kv_geometry, vocab_prefix

ATOL = 1e-5
DECODER_KINDS = ("llama", "gpt2")


@pytest.fixture(scope="module")
def peft() -> Any:
    return pytest.importorskip("peft")


def padded_batch(kind: str) -> dict[str, Tensor]:
    """A batch whose first row ends in two padding positions, so that the mask handling shows."""
    batch = make_batch(kind)
    batch["attention_mask"][0, -2:] = 0
    batch["labels"][0, -2:] = -100
    return batch


def greedy_without_cache(model: nn.Module, ids: Tensor, steps: int) -> Tensor:
    """Greedy decoding that re-reads the whole sequence each step: the reference for generate()."""
    for _ in range(steps):
        with torch.no_grad():
            step = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, step], dim=1)
    return ids


def generate(model: nn.Module, ids: Tensor, steps: int, **kwargs: Any) -> Tensor:
    return model.generate(ids, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kwargs)


def left_padded(ids: Tensor, pad: int = 2) -> tuple[Tensor, Tensor]:
    """Two rows: `ids` behind `pad` padding tokens, and a longer row, so that padding is needed."""
    row0 = torch.cat([torch.zeros(1, pad, dtype=ids.dtype), ids], dim=1)
    row1 = torch.cat([ids[:, :pad], ids], dim=1)
    mask = torch.ones(2, row0.shape[1], dtype=torch.long)
    mask[0, :pad] = 0
    return torch.cat([row0, row1]), mask


# ---------------------------------------------------------------- prefix tuning


def prefix_pair(kind: str, projection: bool, peft: Any) -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    """Our prefix-tuned model and peft's with the same weights, and (ours, theirs) parameter pairs."""
    base = build_model(kind)
    geometry = kv_geometry(base)
    # peft's P' is as wide as the kv projection (its token_dim); ours defaults to the hidden size.
    kv_width = geometry.kv_heads * geometry.head_dim
    cfg = PrefixTuningConfig(n=3, projection=projection, projection_dim=16, embedding_dim=kv_width if projection else None)
    ours = PrefixTuning().apply(copy.deepcopy(base), cfg).model
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.n, prefix_projection=projection, encoder_hidden_size=16),
    )
    mine, reference = ours.prefix_encoder, theirs.prompt_encoder["default"]
    if projection:
        pairs = [(mine.embedding, reference.embedding.weight)]
        pairs += [(getattr(mine.mlp[i], a), getattr(reference.transform[i], a)) for i in (0, 2) for a in ("weight", "bias")]
    else:
        pairs = [(mine.prefix, reference.embedding.weight)]
    with torch.no_grad():
        for m, r in pairs:
            r.copy_(m)
    return ours, theirs, pairs


@pytest.mark.parametrize("projection", [False, True], ids=["direct", "mlp"])
@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_prefix_matches_peft(kind: str, projection: bool, peft: Any) -> None:
    ours, theirs, pairs = prefix_pair(kind, projection, peft)
    batch = padded_batch(kind)
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    assert out_ours.logits.shape == (*batch["input_ids"].shape, out_ours.logits.shape[-1]), "logits must stay aligned with the input"
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=ATOL, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for mine, reference in pairs:
        torch.testing.assert_close(mine.grad, reference.grad, atol=ATOL, rtol=0)


def test_prefix_sits_in_every_layers_cache_once() -> None:
    """Grouped-query attention: the prefix has kv_heads heads, not heads; each layer holds n + T positions."""
    model = PrefixTuning().apply(build_model("llama"), PrefixTuningConfig(n=3)).model
    batch = make_batch("llama")
    cache = model(**batch, use_cache=True).cache
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads
    head_dim = config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        assert cache.layers[layer].keys.shape == (2, config.num_key_value_heads, 3 + 8, head_dim)
    prefix = model.prefix_encoder()
    torch.testing.assert_close(cache.layers[1].values[0, :, :3], prefix[3], atol=0, rtol=0)


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_prefix_generate_matches_full_recompute(kind: str) -> None:
    """generate() reuses the cache it started with the prefix; rereading the whole sequence each
    step must give the same tokens (a prefix added twice, or shifted positions, would not)."""
    model = PrefixTuning().apply(build_model(kind), PrefixTuningConfig(n=3)).model
    ids = make_batch(kind)["input_ids"][:1]
    reference = greedy_without_cache(model, ids, 6)
    assert torch.equal(generate(model, ids, 6), reference)
    assert torch.equal(generate(model, ids, 6, attention_mask=torch.ones_like(ids)), reference)
    both, mask = left_padded(ids)
    assert torch.equal(generate(model, both, 6, attention_mask=mask)[0, 2:], reference[0])
    # The cache ends with the prefix once, the prompt and all generated tokens but the last.
    cache = generate(model, ids, 6, return_dict_in_generate=True).cache
    assert cache.get_seq_length() == 3 + ids.shape[1] + 6 - 1


def test_peft_generate_drops_the_prefix_on_this_transformers(peft: Any) -> None:
    """The documented difference: peft 0.21.2 passes its prefix as `past_key_values` beside the
    `cache` that transformers 5.24's generate() passes, and the model keeps the (empty) `cache`.
    Its generate() then decodes like the base model, unlike its own forward; ours decodes like ours."""
    ours, theirs, _ = prefix_pair("llama", False, peft)
    ids = make_batch("llama")["input_ids"][:1]
    base_tokens = generate(build_model("llama"), ids, 6)
    ours_tokens = generate(ours, ids, 6)
    assert torch.equal(greedy_without_cache(theirs, ids, 6), ours_tokens), "peft's forward agrees with ours"
    assert torch.equal(theirs.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0), base_tokens)
    assert not torch.equal(ours_tokens, base_tokens)


def test_prefix_gets_no_virtual_positions_in_the_output() -> None:
    model = PrefixTuning().apply(build_model("gpt2"), PrefixTuningConfig(n=5)).model
    batch = make_batch("gpt2")
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    # Positional input works too (lm-eval calls model(ids)).
    torch.testing.assert_close(model(batch["input_ids"]).logits, out.logits, atol=0, rtol=0)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"n": 0}, "n"),
        ({"projection_dim": 0, "projection": True}, "projection_dim"),
        ({"embedding_dim": 8}, "embedding_dim"),
        ({"n": "4"}, "n"),
        ({"init": "zeros"}, "init"),
        ({"init": "vocab", "projection": True}, "init"),
    ],
)
def test_prefix_config_errors_name_the_field(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        PrefixTuningConfig.from_dict(values)
    assert info.value.key == key


def test_prefix_longer_than_the_positions_is_a_config_error() -> None:
    model = build_model("gpt2")
    with pytest.raises(ConfigError, match="64") as info:
        PrefixTuning().apply(model, PrefixTuningConfig(n=64))
    assert info.value.key == "n"
    assert all(p.requires_grad for p in model.parameters()), "the model was touched before the error"


def test_prefix_refuses_gradient_checkpointing() -> None:
    """Checkpointed layers drop the cache, which would silently drop the prefix."""
    adapted = PrefixTuning().apply(build_model("llama"), PrefixTuningConfig(n=2))
    adapted.model.activation_checkpointing_enable()
    adapted.model.train()
    with pytest.raises(RuntimeError, match="checkpointing"):
        adapted.model(**make_batch("llama"))


def test_prefix_count_by_hand() -> None:
    """Tiny llama: 2 layers, 2 kv heads of width 8 -> W = 64; tiny gpt2: 2 layers, 4 heads of 8 -> W = 128."""
    llama, gpt2 = build_model("llama"), build_model("gpt2")
    assert PrefixTuning().expected_trainable(llama, PrefixTuningConfig(n=4)) == 4 * 64
    # P' 3 x 32, MLP 32 -> 16 -> 128 with biases.
    assert (
        PrefixTuning().expected_trainable(gpt2, PrefixTuningConfig(n=3, projection=True, projection_dim=16))
        == 3 * 32 + 32 * 16 + 16 + 16 * 128 + 128
    )


# ---------------------------------------------------------------- LLaMA-Adapter


def adapter_pair(peft: Any, gate: float, layers: int = 1) -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    """Our LLaMA-Adapter and peft's adaption_prompt with the same prompts and an open gate."""
    base = build_model("llama")
    ours = LlamaAdapter().apply(copy.deepcopy(base), LlamaAdapterConfig(prompt_length=3, layers=layers)).model
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=layers)
    )
    pairs = []
    for i, block in enumerate(ours.model.layers):
        if not hasattr(block.self_attn, "adaption"):
            continue
        mine = block.self_attn.adaption
        reference = theirs.get_submodule(f"base_model.model.model.layers.{i}.self_attn")
        with torch.no_grad():
            mine.gate.fill_(gate)
            reference.adaption_prompt.copy_(mine.prompt.unsqueeze(0))
            reference.adaption_gate.copy_(mine.gate)
        pairs += [(mine.prompt, reference.adaption_prompt), (mine.gate, reference.adaption_gate)]
    return ours, theirs, pairs


@pytest.mark.parametrize("layers", [1, 2])
def test_llama_adapter_matches_peft(layers: int, peft: Any) -> None:
    ours, theirs, pairs = adapter_pair(peft, gate=0.7, layers=layers)
    batch = padded_batch("llama")
    out_ours, out_theirs = ours(**batch), theirs(**batch)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, atol=ATOL, rtol=0)
    assert not torch.allclose(out_ours.logits, build_model("llama")(**batch).logits, atol=1e-3), "the open gate must matter"
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for mine, reference in pairs:
        torch.testing.assert_close(mine.grad, reference.grad.view_as(mine.grad), atol=ATOL, rtol=0)


def test_llama_adapter_generates_like_peft_and_like_full_recompute(peft: Any) -> None:
    ours, theirs, _ = adapter_pair(peft, gate=0.7)
    ids = make_batch("llama")["input_ids"][:1]
    tokens = generate(ours, ids, 6)
    assert torch.equal(tokens, greedy_without_cache(ours, ids, 6))
    assert torch.equal(tokens, theirs.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0))
    both, mask = left_padded(ids)
    assert torch.equal(generate(ours, both, 6, attention_mask=mask)[0, 2:], tokens[0])


def test_per_head_gate_is_tanh_of_the_layer_gate(peft: Any) -> None:
    """The authors' per-head form: gates all at atanh(g) give exactly peft's scalar gate g."""
    _, theirs, _ = adapter_pair(peft, gate=0.7)
    ours = LlamaAdapter().apply(build_model("llama"), LlamaAdapterConfig(prompt_length=3, layers=1, gate="head")).model
    mine = ours.model.layers[1].self_attn.adaption
    assert mine.gate.shape == (ours.config.num_attention_heads,)
    with torch.no_grad():
        mine.gate.fill_(torch.atanh(torch.tensor(0.7)).item())
        theirs.get_submodule("base_model.model.model.layers.1.self_attn").adaption_prompt.copy_(mine.prompt.unsqueeze(0))
    batch = padded_batch("llama")
    torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("gate", ["layer", "head"])
def test_zero_gate_makes_the_prompt_silent_but_not_the_gate(gate: str) -> None:
    """At init the output is exactly the base model's; the prompt gets zero gradient (it acts only
    through the gate), the gate a non-zero one, so training opens the gate first."""
    adapted = LlamaAdapter().apply(build_model("llama"), LlamaAdapterConfig(prompt_length=3, layers=2, gate=gate))
    batch = make_batch("llama")
    out = adapted.model(**batch)
    assert torch.equal(out.logits, build_model("llama")(**batch).logits)
    out.loss.backward()
    for block in adapted.model.model.layers:
        adaption = block.self_attn.adaption
        assert torch.count_nonzero(adaption.prompt.grad) == 0
        assert torch.count_nonzero(adaption.gate.grad) == adaption.gate.numel()


def test_llama_adapter_takes_the_top_layers() -> None:
    model = LlamaAdapter().apply(build_model("llama"), LlamaAdapterConfig(layers=1)).model
    assert [hasattr(block.self_attn, "adaption") for block in model.model.layers] == [False, True]


def test_more_layers_than_the_model_has_is_a_config_error() -> None:
    model = build_model("llama")
    with pytest.raises(ConfigError, match="exceeds the model's 2 layers") as info:
        LlamaAdapter().apply(model, LlamaAdapterConfig(layers=3))
    assert info.value.key == "layers"
    assert all(p.requires_grad for p in model.parameters()), "the model was touched before the error"


def test_llama_adapter_refuses_an_attention_that_computes_itself() -> None:
    """Falcon's attention does not go through transformers' attention interface, where the prompt goes in."""
    from tiny_archs import build_arch

    model = build_arch("falcon")
    with pytest.raises(ConfigError, match="FalconAttention computes its attention itself") as info:
        LlamaAdapter().apply(model, LlamaAdapterConfig(layers=1))
    assert info.value.key == "model"
    assert all(p.requires_grad for p in model.parameters()), "the model was touched before the error"


@pytest.mark.parametrize("arch", ["gemma3", "gpt_neox"])
def test_llama_adapter_prompt_keys_are_the_models_own(arch: str) -> None:
    """The prompt's keys and values are what the layer's own projections give for the prompt:
    Gemma-3's separate k_proj with its per-head k_norm and 2 key/value heads for 4 query heads,
    GPT-NeoX's fused query_key_value split per head, written out by hand here."""
    from tiny_archs import build_arch

    model = LlamaAdapter().apply(build_arch(arch), LlamaAdapterConfig(prompt_length=3, layers=1)).model
    caller, adaption = next((m, m.adaption) for m in model.modules() if hasattr(m, "adaption"))
    key, value = adaption.keys_values(caller, torch.float32)
    h = adaption.heads
    assert key.shape == value.shape == (h.heads, 3, h.head_dim)
    prompt = adaption.prompt
    if hasattr(caller, "query_key_value"):  # GPT-NeoX: per head [q | k | v]
        fused = caller.query_key_value(prompt).view(3, h.heads, 3, h.head_dim)
        expected_k, expected_v = fused[:, :, 1].transpose(0, 1), fused[:, :, 2].transpose(0, 1)
    else:
        expected_k = caller.k_norm(caller.k_proj(prompt).view(3, h.kv_heads, h.head_dim)).transpose(0, 1)
        expected_v = caller.v_proj(prompt).view(3, h.kv_heads, h.head_dim).transpose(0, 1)
        groups = h.heads // h.kv_heads
        expected_k, expected_v = expected_k.repeat_interleave(groups, 0), expected_v.repeat_interleave(groups, 0)
    torch.testing.assert_close(key, expected_k, atol=1e-6, rtol=0)
    torch.testing.assert_close(value, expected_v, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("values", "key"), [({"prompt_length": 0}, "prompt_length"), ({"layers": 0}, "layers"), ({"gate": "neuron"}, "gate")]
)
def test_llama_adapter_config_errors_name_the_field(values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        LlamaAdapterConfig.from_dict(values)
    assert info.value.key == key


def test_llama_adapter_count_matches_the_paper() -> None:
    """LLaMA-7B (hidden 4096), 10 prompt tokens in 30 layers: the paper's 1.2M (1,228,830 with scalar gates)."""
    from transformers import LlamaConfig

    class Shell(nn.Module):
        config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_hidden_layers=32)

    assert LlamaAdapter().expected_trainable(Shell(), LlamaAdapterConfig(prompt_length=10, layers=30)) == 1_228_830
    assert LlamaAdapter().expected_trainable(Shell(), LlamaAdapterConfig(prompt_length=10, layers=30, gate="head")) == 1_229_760


@pytest.mark.parametrize("kind", DECODER_KINDS)
def test_vocab_init_reads_like_real_words_before_the_input(kind: str) -> None:
    """init = "vocab" (the paper's real-word init): the prefix holds the model's own keys and values
    for n tokens, so at init the output equals the base model's on [words; input], words dropped."""
    words = torch.tensor([[5, 17, 42]])
    adapted = PrefixTuning().apply(build_model(kind), PrefixTuningConfig(n=3))
    with torch.no_grad():
        adapted.model.prefix_encoder.prefix.copy_(vocab_prefix(build_model(kind), kv_geometry(build_model(kind)), words))
    ids = make_batch(kind)["input_ids"]
    with torch.no_grad():
        ours = adapted.model(input_ids=ids).logits
        reference = build_model(kind)(input_ids=torch.cat([words.expand(ids.shape[0], -1), ids], dim=1)).logits[:, 3:]
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


def test_vocab_init_sets_the_prefix_from_the_model() -> None:
    torch.manual_seed(0)
    random = PrefixTuning().apply(build_model("llama"), PrefixTuningConfig(n=3)).model.prefix_encoder.prefix
    vocab = PrefixTuning().apply(build_model("llama"), PrefixTuningConfig(n=3, init="vocab")).model.prefix_encoder.prefix
    # Llama's values are small next to N(0, 1) draws; half the columns (the values) show it.
    assert vocab.abs().mean() < 0.5 * random.abs().mean()
