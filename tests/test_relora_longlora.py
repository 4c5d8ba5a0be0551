"""ReLoRA (restarts: merge, reinit, moment pruning, jagged schedule, rank growth) and LongLoRA
(S²-Attn's groups and shift, full attention in eval mode, LoRA+ trainables)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_model, logits, make_batch, with_4bit_q_proj
from torch import Tensor

from methods.base import Adapted, AdapterFileError, ConfigError
from methods.longlora import EXTRA_FILE, LongLoRA, LongLoRAConfig, shifted_sparse_attention
from methods.lora import LoRA, LoRAConfig, lora_layers
from methods.relora import BASE_FILE, ReLoRA, ReLoRAConfig, check_prunable, jagged, moments


def learnable_batch() -> dict[str, Tensor]:
    """Tokens from an 8-word sub-vocabulary, which a tiny model can learn in a few steps."""
    batch = make_batch("llama", batch=4, seq=16)
    batch["input_ids"] = batch["input_ids"] % 8
    batch["labels"] = batch["input_ids"].clone()
    return batch


def train(adapted: Adapted, steps: int, lr: float = 1e-2, batch: dict[str, Tensor] | None = None) -> torch.optim.Optimizer:
    """`steps` AdamW steps calling the hooks as bench/trial/train.py does (on_step with the 0-based step)."""
    batch = batch or learnable_batch()
    optimizer = torch.optim.AdamW(adapted.trainable, lr=lr)
    adapted.model.train()
    for step in range(steps):
        adapted.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if adapted.hooks.on_step:
            adapted.hooks.on_step(step, optimizer)
    adapted.model.eval()
    return optimizer


def relora(values: dict, dtype: torch.dtype = torch.float32) -> Adapted:
    return ReLoRA().apply(build_model("llama").to(dtype), ReLoRAConfig.from_dict(values))


# ---------------------------------------------------------------- ReLoRA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_restart_moves_the_update_into_w_and_keeps_outputs(dtype: torch.dtype) -> None:
    adapted = relora({"r": 4, "targets": "all-linear", "reset_every": 1000}, dtype)
    optimizer = train(adapted, 5)
    layers = lora_layers(adapted.model)
    before = {
        n: (layer.base_layer.weight.float().clone(), layer.delta_weight().detach().clone(), layer.lora_A.detach().clone())
        for n, layer in layers.items()
    }
    batch = make_batch("llama")
    reference = logits(adapted.model, batch)
    assert all(delta.abs().max() > 0 for _, delta, _ in before.values()), "training left some B at zero"

    adapted.hooks.on_step(999, optimizer)  # the 1000th step: a restart

    for n, layer in layers.items():
        weight, delta, a = before[n]
        assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, a), n
        expected = (weight + delta).to(dtype).float()
        assert torch.equal(layer.base_layer.weight.float(), expected), n
    after = logits(adapted.model, batch)
    if dtype == torch.float32:
        torch.testing.assert_close(after, reference, atol=1e-5, rtol=0)
    else:  # bf16 arithmetic throughout: the restart must move the logits far less than the adapter does
        effect = (reference.float() - logits(build_model("llama").to(dtype), batch).float()).abs().max()
        assert (after.float() - reference.float()).abs().max() < 0.1 * effect


@pytest.mark.parametrize("ratio", [0.99, 0.5, 1.0])
def test_restart_prunes_adapter_moments_by_magnitude(ratio: float) -> None:
    adapted = relora({"r": 8, "targets": "all-linear", "reset_every": 6, "restart_warmup": 2, "prune_ratio": ratio})
    optimizer = train(adapted, 5)  # no restart yet (it comes after the 6th step)
    old = {id(p): {k: t.clone() for k, t in moments(optimizer, p).items()} for p in adapted.trainable}
    steps = {id(p): optimizer.state[p]["step"].clone() for p in adapted.trainable}
    adapted.hooks.on_step(5, optimizer)

    for p in adapted.trainable:
        state = moments(optimizer, p)
        assert set(state) == {"exp_avg", "exp_avg_sq"}
        for key, t in state.items():
            n, before = t.numel(), old[id(p)][key]
            assert torch.count_nonzero(before) == n, "a moment was zero before pruning: the count below would be loose"
            kept = t != 0
            assert n - int(kept.sum()) == round(ratio * n), (key, ratio)
            assert torch.equal(t[kept], before[kept]), "surviving entries must keep their values"
            if 0 < kept.sum() < n:  # the survivors are the largest magnitudes
                assert before[kept].abs().min() >= before[~kept].abs().max()
        assert torch.equal(optimizer.state[p]["step"], steps[id(p)]), "the step count (bias correction) is kept, as in the paper"


def test_jagged_multiplier_sequence() -> None:
    assert [jagged(s, 4, 2) for s in range(13)] == [1, 1, 1, 1, 0, 0.5, 1, 1, 0, 0.5, 1, 1, 0]
    assert [jagged(s, 5, 3) for s in range(11)] == pytest.approx([1, 1, 1, 1, 1, 0, 1 / 3, 2 / 3, 1, 1, 0])
    assert all(jagged(s, 4, 0) == 1.0 for s in range(20))
    hooks = relora({"reset_every": 4, "restart_warmup": 2}).hooks
    assert [hooks.lr_multiplier(s) for s in range(9)] == [1, 1, 1, 1, 0, 0.5, 1, 1, 0]


def test_the_training_loop_follows_the_jagged_schedule() -> None:
    """Through bench.trial.train: the lr of each step is the suite's cosine times the jag, and the
    restarts happen after steps 3 and 6."""
    from bench.tasks import data
    from bench import models
    from bench.trial.train import lr_lambda
    from bench.trial.train import train as bench_train

    loaded = models.load({"name": "synthetic:llama-tiny"})
    dataset = data.tokenized("sst2", loaded.tokenizer, 48, 16)
    adapted = ReLoRA().apply(loaded.model, ReLoRAConfig(r=2, targets="qv", reset_every=3, restart_warmup=2))
    layers = lora_layers(adapted.model)
    lrs, restarts, inner = [], [], adapted.hooks.on_step

    def on_step(step: int, optimizer: torch.optim.Optimizer) -> None:
        lrs.append(optimizer.param_groups[0]["lr"])  # set by the scheduler for the step to come
        weights = [layer.base_layer.weight.clone() for layer in layers.values()]
        inner(step, optimizer)
        if any(not torch.equal(w, layer.base_layer.weight) for w, layer in zip(weights, layers.values())):
            restarts.append(step)

    adapted.hooks.on_step = on_step
    t = dict(
        optimizer="adamw",
        lr=1e-3,
        batch_size=4,
        grad_accum=1,
        epochs=1,
        max_steps=9,
        schedule="cosine",
        warmup_steps=1,
        weight_decay=0.0,
        momentum=0.9,
        clip=1.0,
        seed=0,
    )
    bench_train(adapted, dataset, t, lambda rows: data.collate(rows, loaded.tokenizer.pad_token_id), torch.device("cpu"))
    envelope = lr_lambda("cosine", 1, 9)
    expected = [1e-3 * envelope(s) * jagged(s, 3, 2) for s in range(1, 10)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[2] == 0 and lrs[5] == 0 and 0 < lrs[3] < 1e-3 * envelope(4)  # steps 3 and 6 start from zero
    assert restarts == [2, 5, 8]


def test_total_update_has_rank_above_r() -> None:
    """The paper's point: k restarts of a rank-r update reach rank up to k r; plain LoRA stays at r."""
    ranks = {}
    for reset_every in (3, 1000):
        adapted = relora({"r": 1, "targets": ["model.layers.0.self_attn.q_proj"], "reset_every": reset_every, "restart_warmup": 0})
        layer = lora_layers(adapted.model)["model.layers.0.self_attn.q_proj"]
        w0 = layer.base_layer.weight.detach().clone()
        train(adapted, 12)
        total = layer.base_layer.weight.detach() + layer.delta_weight().detach() - w0
        ranks[reset_every] = int(torch.linalg.matrix_rank(total.double(), rtol=1e-6))
    assert ranks[1000] == 1
    assert ranks[3] == 4, ranks  # four cycles of rank 1


def test_relora_save_load_after_restarts(tmp_path: Path) -> None:
    cfg = ReLoRAConfig(r=2, targets="all-linear", reset_every=3, restart_warmup=1)
    adapted = ReLoRA().apply(build_model("llama"), cfg)
    train(adapted, 7)  # two restarts and a live adapter
    adapted.save(tmp_path)
    fresh = ReLoRA().apply(build_model("llama"), cfg)
    fresh.load(tmp_path)
    batch = make_batch("llama")
    torch.testing.assert_close(logits(fresh.model, batch), logits(adapted.model, batch), atol=1e-6, rtol=0)
    # Saved again from the loaded copy: the restarts it holds are not forgotten.
    fresh.save(tmp_path / "again")
    other = ReLoRA().apply(build_model("llama"), cfg)
    other.load(tmp_path / "again")
    torch.testing.assert_close(logits(other.model, batch), logits(adapted.model, batch), atol=1e-6, rtol=0)


def test_relora_corrupt_or_stale_base_file_names_it(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = ReLoRAConfig(r=2, targets="qv", reset_every=2, restart_warmup=1)
    adapted = ReLoRA().apply(build_model("llama"), cfg)
    train(adapted, 3)
    adapted.save(tmp_path)
    state = load_file(str(tmp_path / BASE_FILE))
    state.pop(next(iter(state)))
    save_file(state, str(tmp_path / BASE_FILE), metadata={"resets": "1"})
    with pytest.raises(AdapterFileError, match=BASE_FILE):
        ReLoRA().apply(build_model("llama"), cfg).load(tmp_path)

    early = ReLoRA().apply(build_model("llama"), cfg)
    early.save(tmp_path / "early")  # before any restart
    with pytest.raises(AdapterFileError, match="fresh base"):
        adapted.load(tmp_path / "early")


def test_relora_refuses_a_quantized_base() -> None:
    pytest.importorskip("bitsandbytes")
    model = with_4bit_q_proj(build_model("llama"))
    with pytest.raises(ConfigError, match="quantized") as info:
        ReLoRA().apply(model, ReLoRAConfig(targets="qv"))
    assert info.value.key == "model.quant"
    assert not lora_layers(model), "apply changed the model before failing"


def test_relora_refuses_quantized_optimizer_moments_and_merged_layers() -> None:
    adapted = relora({"r": 2, "reset_every": 2, "restart_warmup": 1})
    optimizer = torch.optim.AdamW(adapted.trainable)
    p = adapted.trainable[0]
    optimizer.state[p]["state1"] = torch.zeros(p.shape, dtype=torch.uint8)  # as bitsandbytes' 8-bit Adam keeps it
    with pytest.raises(ConfigError, match="state1"):
        check_prunable(optimizer, adapted.trainable)
    adapted.merge()
    with pytest.raises(RuntimeError, match="merged"):
        adapted.hooks.on_step(1, torch.optim.AdamW(adapted.trainable))


def test_relora_config_validation() -> None:
    for values, key in [
        ({"reset_every": 0}, "reset_every"),
        ({"prune_ratio": 1.5}, "prune_ratio"),
        ({"prune_ratio": -0.1}, "prune_ratio"),
        ({"restart_warmup": -1}, "restart_warmup"),
        ({"reset_every": 10, "restart_warmup": 10}, "restart_warmup"),
        ({"r": 0}, "r"),
    ]:
        with pytest.raises(ConfigError) as info:
            ReLoRAConfig.from_dict(values)
        assert info.value.key == key, values


# ---------------------------------------------------------------- LongLoRA


def qkv(heads: int = 4, kv_heads: int = 4, n: int = 16, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, h, n, 8, generator=gen, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))


def test_one_group_without_shift_is_causal_attention() -> None:
    q, k, v = qkv(heads=4, kv_heads=2)
    reference = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    ours = shifted_sparse_attention(q, k, v, None, group_size_ratio=1.0, shift=False, scaling=8**-0.5)
    torch.testing.assert_close(ours, reference.transpose(1, 2), atol=1e-12, rtol=0)


def test_one_group_without_shift_in_the_model_is_plain_lora_in_training_mode() -> None:
    base = build_model("llama")
    plain = LoRA().apply(copy.deepcopy(base), LoRAConfig(r=4, targets="attention"))
    ours = LongLoRA().apply(copy.deepcopy(base), LongLoRAConfig(r=4, group_size_ratio=1.0, shift=False))
    for mine, theirs in zip(lora_layers(ours.model).values(), lora_layers(plain.model).values()):
        with torch.no_grad():
            theirs.lora_B.normal_(std=0.1)
            mine.lora_A.copy_(theirs.lora_A)
            mine.lora_B.copy_(theirs.lora_B)
    batch = make_batch("llama", batch=3, seq=12)
    batch["attention_mask"][1, -4:] = 0  # right padding, as bench/data.collate makes it
    real = batch["attention_mask"].bool()
    plain.model.train()
    ours.model.train()
    torch.testing.assert_close(ours.model(**batch).logits[real], plain.model(**batch).logits[real], atol=1e-5, rtol=0)


def receptive_field(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, ratio: float) -> Tensor:
    """seen[h, i, j]: whether output i of head h depends on value j (softmax weights are never exactly 0)."""
    heads, n = q.shape[1], q.shape[2]
    seen = torch.zeros(heads, n, n, dtype=torch.bool)
    v = v.clone().requires_grad_(True)
    out = shifted_sparse_attention(q, k, v, mask, ratio, shift=True, scaling=8**-0.5)
    for h in range(heads):
        for i in range(n):
            (grad,) = torch.autograd.grad(out[0, i, h].sum(), v, retain_graph=True)
            seen[h, i] = grad[0, h].abs().sum(-1) > 0
    return seen


@pytest.mark.parametrize("n", [16, 10])
def test_tokens_attend_within_their_group_and_shifted_heads_use_shifted_groups(n: int) -> None:
    """Group size G = ceil(n / 4): 4 for 16 tokens; 3 for 10, padded to 12. Heads 0-1 use groups
    [0, G), [G, 2G)...; heads 2-3 use [0, G/2), [G/2, G/2 + G)... Always causal: the group that
    the pseudo-code's roll wraps around (last and first tokens) never lets a token see the future."""
    q, k, v = qkv(n=n)
    size, half = math.ceil(n / 4), math.ceil(n / 4) // 2
    seen = receptive_field(q, k, v, None, 0.25)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    plain = (i // size == j // size) & (j <= i)
    shifted = ((i + size - half) // size == (j + size - half) // size) & (j <= i)
    for h in range(4):
        assert torch.equal(seen[h], plain if h < 2 else shifted), h
    assert not torch.equal(plain, shifted)


@pytest.mark.parametrize("n", [12, 11])
def test_padding_keys_are_never_attended(n: int) -> None:
    """A right-padded batch, as bench/data.collate makes it, with the mask sdpa_mask builds; 11
    tokens also need S²-Attn's own padding to whole groups of 3."""
    q, k, v = qkv(n=n)
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[:, 8:] = False
    mask = (torch.ones(n, n, dtype=torch.bool).tril() & valid[:, None, :])[:, None]
    seen = receptive_field(q, k, v, mask, 0.25)
    unmasked = receptive_field(q, k, v, None, 0.25)
    assert not seen[:, :8, 8:].any()
    assert torch.equal(seen[:, :8, :8], unmasked[:, :8, :8]), "real tokens see what they see without padding"
    out = shifted_sparse_attention(q, k, v, mask, 0.25, True, 8**-0.5)
    torch.testing.assert_close(out[:, :8], shifted_sparse_attention(q, k, v, None, 0.25, True, 8**-0.5)[:, :8], atol=1e-12, rtol=0)
    assert torch.isfinite(out).all()


def test_no_token_sees_the_future_through_the_model() -> None:
    adapted = LongLoRA().apply(build_model("llama"), LongLoRAConfig(r=4, group_size_ratio=0.25))
    adapted.model.train()
    embeds = adapted.model.get_input_embeddings()(make_batch("llama", batch=1, seq=16)["input_ids"]).detach().requires_grad_(True)
    out = adapted.model(inputs_embeds=embeds).logits
    for i in range(16):
        (grad,) = torch.autograd.grad(out[0, i].sum(), embeds, retain_graph=True)
        depends = grad[0].abs().sum(-1) > 0
        assert not depends[i + 1 :].any(), f"position {i} depends on later tokens"
        assert depends[i]


def test_eval_mode_is_plain_lora_and_training_mode_is_not() -> None:
    base = build_model("llama")
    plain = LoRA().apply(copy.deepcopy(base), LoRAConfig(r=4, targets="attention"))
    ours = LongLoRA().apply(copy.deepcopy(base), LongLoRAConfig(r=4))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in ours.trainable:
            p.add_(torch.randn_like(p) * 0.05)  # embeddings and norms too, shared below
        for name, p in ours.model.named_parameters():
            plain.model.get_parameter(name).copy_(p)
    batch = make_batch("llama", seq=16)
    torch.testing.assert_close(logits(ours.model, batch), logits(plain.model, batch), atol=1e-6, rtol=0)
    ours.model.train()
    plain.model.train()
    with torch.no_grad():
        assert (ours.model(**batch).logits - plain.model(**batch).logits).abs().max() > 1e-3
    ours.model.eval()
    generated = ours.model.generate(batch["input_ids"][:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_eager_attention_base_works_too() -> None:
    base = build_model("llama")
    base.set_attn_implementation("eager")
    ours = LongLoRA().apply(copy.deepcopy(base), LongLoRAConfig(r=4, group_size_ratio=1.0, shift=False))
    plain = LoRA().apply(copy.deepcopy(base), LoRAConfig(r=4, targets="attention"))
    for mine, theirs in zip(lora_layers(ours.model).values(), lora_layers(plain.model).values()):
        with torch.no_grad():
            mine.lora_A.copy_(theirs.lora_A)
    batch = make_batch("llama", seq=12)
    batch["attention_mask"][0, -3:] = 0
    real = batch["attention_mask"].bool()
    ours.model.train()
    plain.model.train()
    torch.testing.assert_close(ours.model(**batch).logits[real], plain.model(**batch).logits[real], atol=1e-5, rtol=0)


def test_trainable_count_is_lora_plus_embeddings_plus_norms() -> None:
    model = build_model("llama")  # hidden 32, 2 blocks, vocab 128, q/o 32x32, k/v 32x16 (2 kv heads of 8)
    adapted = LongLoRA().apply(model, LongLoRAConfig(r=4))
    lora = 2 * (4 * (32 + 32) * 2 + 4 * (32 + 16) * 2)
    assert sum(p.numel() for p in adapted.trainable) == lora + VOCAB * 32 + 32 * (2 * 2 + 1)
    names = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names and "lm_head.weight" not in names
    assert "model.layers.1.post_attention_layernorm.weight" in names
    bare = LongLoRA().apply(build_model("llama"), LongLoRAConfig(r=4, train_embeddings=False, train_norms=False))
    assert sum(p.numel() for p in bare.trainable) == lora


def test_longlora_missing_extra_file_names_it(tmp_path: Path) -> None:
    cfg = LongLoRAConfig(r=2)
    LongLoRA().apply(build_model("llama"), cfg).save(tmp_path)
    (tmp_path / EXTRA_FILE).unlink()
    with pytest.raises(AdapterFileError, match=EXTRA_FILE):
        LongLoRA().apply(build_model("llama"), cfg).load(tmp_path)
    other = LongLoRAConfig(r=2, train_embeddings=False)
    LongLoRA().apply(build_model("llama"), other).save(tmp_path / "small")
    with pytest.raises(AdapterFileError, match="missing"):
        LongLoRA().apply(build_model("llama"), cfg).load(tmp_path / "small")


def test_longlora_refuses_other_layouts_and_attention_kernels() -> None:
    with pytest.raises(ConfigError) as info:
        LongLoRA().apply(build_model("gpt2"), LongLoRAConfig())
    assert info.value.key == "model"
    model = build_model("llama")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ConfigError, match="flex_attention"):
        LongLoRA().apply(model, LongLoRAConfig())
    with pytest.raises(ConfigError) as info:
        LongLoRAConfig.from_dict({"group_size_ratio": 0.0})
    assert info.value.key == "group_size_ratio"


def test_models_sharing_one_config_can_both_be_adapted() -> None:
    """set_attn_implementation writes the shared config object: the second apply must still find
    the attention that S²-Attn wraps."""
    from transformers import LlamaForCausalLM

    first = build_model("llama")
    second = LlamaForCausalLM(first.config).eval()
    LongLoRA().apply(first, LongLoRAConfig(r=2))
    adapted = LongLoRA().apply(second, LongLoRAConfig(r=2, shift=False))
    adapted.model.train()
    assert torch.isfinite(adapted.model(**make_batch("llama")).loss)
