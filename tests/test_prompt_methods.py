"""Soft prompt tuning and hard prompts: equality with peft, logits aligned with the input, generation
with a KV cache, the method context (tokenizer and train examples) and suite validation."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB, build_model, make_batch
from torch import Tensor, nn

from bench.run import suite
from bench.models import _tiny_tokenizer
from methods.base import Adapted, AdapterFileError, ConfigError, MethodContext
from methods.hard_prompt import HardPrompt, HardPromptConfig, render
from methods.prompt_tuning import Prefix, PromptTuning, PromptTuningConfig

CAUSAL = ("llama", "gpt2")
TRAIN = tuple((f"Q{i}:", f"A{i}") for i in range(20))


def context(seed: int = 0) -> MethodContext:
    return MethodContext(tokenizer=_tiny_tokenizer(VOCAB), train=TRAIN, seed=seed)


def adapt(name: str, kind: str) -> Adapted:
    if name == "prompt_tuning":
        return PromptTuning().apply(build_model(kind), PromptTuningConfig(n_tokens=4, init="random"))
    return HardPrompt().apply(build_model(kind), HardPromptConfig(instruction="Do:", shots=1), context=context())


def prefix_of(model: nn.Module) -> Prefix:
    return next(m for m in model.modules() if isinstance(m, Prefix))


def with_prefix(model: nn.Module, prefix: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inputs the base model needs to see what the adapted model sees: [prefix; input]."""
    b, n = batch["input_ids"].shape[0], prefix.shape[0]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    out = {
        "inputs_embeds": torch.cat([prefix.expand(b, -1, -1), embeds], 1),
        "attention_mask": torch.cat([torch.ones(b, n, dtype=torch.long), batch["attention_mask"]], 1),
    }
    if "labels" in batch:
        out["labels"] = torch.cat([torch.full((b, n), -100), batch["labels"]], 1)
    return out


def padded_batch(side: str) -> dict[str, Tensor]:
    """Two rows, the second two tokens shorter, padded on `side`."""
    batch = make_batch("llama", seq=7)
    mask = batch["attention_mask"]
    if side == "left":
        mask[1, :2] = 0
    else:
        mask[1, -2:] = 0
    batch["labels"][mask == 0] = -100
    return batch


# ---------------------------------------------------------------- peft


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_soft_prompt_matches_peft(kind: str) -> None:
    """Same prompt -> same logits, loss and prompt gradient as peft (whose logits keep the n
    virtual positions in front: we drop them), and the same greedy generations as peft without a
    KV cache. (With the cache, peft 0.21.2 under transformers 5.24 diverges from its own uncached
    output after the first token: it finds the decoding step by `past_key_values` and
    `cache_position`, which transformers 5 renamed to `cache` and dropped, so it feeds the
    prompt again on every step. test_generate_feeds_the_prompt_once checks our cached path
    against the base model instead.)"""
    peft = pytest.importorskip("peft")
    n = 4
    ours = PromptTuning().apply(build_model(kind), PromptTuningConfig(n_tokens=n, init="random"))
    task = "SEQ_CLS" if kind == "bert" else "CAUSAL_LM"
    theirs = peft.get_peft_model(build_model(kind), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n))
    reference = theirs.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        reference.copy_(ours.trainable[0])

    batch = make_batch(kind)
    out_ours, out_theirs = ours.model(**batch), theirs(**batch)
    expected = out_theirs.logits if kind == "bert" else out_theirs.logits[:, n:]
    torch.testing.assert_close(out_ours.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_ours.loss, out_theirs.loss, atol=1e-5, rtol=0)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    torch.testing.assert_close(ours.trainable[0].grad, reference.grad, atol=1e-5, rtol=0)

    if kind != "bert":
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            mine = ours.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
            peft_ids = theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False)
        assert torch.equal(mine, peft_ids)


# ---------------------------------------------------------------- the prefix inside forward


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", CAUSAL)
@pytest.mark.parametrize("name", ["prompt_tuning", "hard_prompt"])
def test_logits_stay_aligned_with_input(name: str, kind: str, side: str) -> None:
    """One logit row per input position, equal to the base model's on [prefix; input] from the n-th on."""
    adapted = adapt(name, kind)
    batch = padded_batch(side)
    prefix = prefix_of(adapted.model)
    with torch.no_grad():
        out = adapted.model(**batch)
        base = build_model(kind)
        reference = base(**with_prefix(base, prefix.embeddings(base.get_input_embeddings()), batch))
    assert out.logits.shape == (*batch["input_ids"].shape, VOCAB)
    torch.testing.assert_close(out.logits, reference.logits[:, prefix.n :], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, reference.loss, atol=1e-6, rtol=0)
    # positional arguments reach the hook too (lm-eval calls model(input_ids))
    with torch.no_grad():
        torch.testing.assert_close(adapted.model(batch["input_ids"]).logits, adapted.model(input_ids=batch["input_ids"]).logits)


def test_hard_prompt_is_the_token_sequence() -> None:
    """A hard prompt equals feeding the base model its token ids followed by the input."""
    adapted = adapt("hard_prompt", "llama")
    ids = prefix_of(adapted.model).input_ids
    batch = make_batch("llama")
    with torch.no_grad():
        whole = build_model("llama")(input_ids=torch.cat([ids.expand(2, -1), batch["input_ids"]], 1)).logits
        torch.testing.assert_close(adapted.model(input_ids=batch["input_ids"]).logits, whole[:, ids.numel() :], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", CAUSAL)
@pytest.mark.parametrize("name", ["prompt_tuning", "hard_prompt"])
def test_generate_feeds_the_prompt_once(name: str, kind: str) -> None:
    """Greedy generation of a left-padded batch: with the KV cache, without it, and the base model
    generating from [prefix; input] embeddings all give the same tokens."""
    adapted = adapt(name, kind)
    batch = padded_batch("left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = adapted.model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **settings)
        uncached = adapted.model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **settings)
        base = build_model(kind)
        inputs = with_prefix(base, prefix_of(adapted.model).embeddings(base.get_input_embeddings()), batch)
        reference = base.generate(inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"], **settings)
    assert cached.shape == (2, ids.shape[1] + 6)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, ids.shape[1] :], reference)


def test_bert_keeps_class_labels() -> None:
    adapted = adapt("prompt_tuning", "bert")
    out = adapted.model(**make_batch("bert"))
    assert out.logits.shape == (2, 2)
    assert out.loss.requires_grad


# ---------------------------------------------------------------- inits


def test_soft_prompt_inits() -> None:
    embed = build_model("llama").get_input_embeddings().weight
    torch.manual_seed(0)
    weight = PromptTuning().apply(build_model("llama"), PromptTuningConfig(n_tokens=16, init="random")).trainable[0]
    assert weight.shape == (16, 32) and weight.abs().max() <= 0.5 and weight.std() > 0.2  # uniform in [-0.5, 0.5]
    weight = PromptTuning().apply(build_model("llama"), PromptTuningConfig(n_tokens=16, init="vocab", vocab_top=10)).trainable[0]
    assert all(any(torch.equal(row, embed[i]) for i in range(10)) for row in weight)
    weight = PromptTuning().apply(build_model("llama"), PromptTuningConfig(n_tokens=5, init="text", init_ids=[3, 9])).trainable[0]
    assert torch.equal(weight, embed[[3, 9, 3, 9, 3]])
    cfg = PromptTuningConfig(n_tokens=3, init="text", init_text="hello")
    weight = PromptTuning().apply(build_model("llama"), cfg, context=context()).trainable[0]
    tokens = _tiny_tokenizer(VOCAB)("hel", add_special_tokens=False)["input_ids"]
    assert torch.equal(weight, embed[tokens])


# ---------------------------------------------------------------- hard prompt, context


def test_hard_prompt_changes_predictions_and_trains_nothing() -> None:
    adapted = adapt("hard_prompt", "llama")
    assert adapted.trainable == [] and not any(p.requires_grad for p in adapted.model.parameters())
    assert HardPrompt().expected_trainable(build_model("llama"), HardPromptConfig(shots=3)) == 0
    batch = make_batch("llama")
    with torch.no_grad():
        before = build_model("llama")(**batch).logits.argmax(-1)
        after = adapted.model(**batch).logits.argmax(-1)
    assert (before != after).float().mean() > 0.25


def test_render_draws_train_examples_by_seed() -> None:
    cfg = HardPromptConfig(instruction="Answer the question.", shots=3, separator="|")
    text = render(cfg, context(seed=0))
    parts = text.split("|")
    assert parts[0] == "Answer the question." and parts[-1] == ""
    shots = parts[1:-1]
    assert len(shots) == 3 and len(set(shots)) == 3
    assert set(shots) <= {p + a for p, a in TRAIN}
    assert render(cfg, context(seed=0)) == text
    assert render(cfg, context(seed=1)) != text
    # the prefix is exactly the rendered text's tokens
    adapted = HardPrompt().apply(build_model("llama"), cfg, context=context(seed=0))
    assert prefix_of(adapted.model).input_ids.tolist() == _tiny_tokenizer(VOCAB)(text)["input_ids"]


def test_context_errors() -> None:
    with pytest.raises(ConfigError) as info:
        HardPrompt().apply(build_model("llama"), HardPromptConfig(shots=len(TRAIN) + 1), context=context())
    assert info.value.key == "shots" and "21 exceeds the 20" in str(info.value)
    model = build_model("llama")
    for method, cfg in [(HardPrompt(), HardPromptConfig(shots=1)), (PromptTuning(), PromptTuningConfig(init="text", init_text="hi"))]:
        with pytest.raises(ConfigError, match="needs the tokenizer"):
            method.apply(model, cfg)  # a real model without a context
    assert not any(isinstance(m, Prefix) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters()), "apply changed the model before failing"
    with pytest.raises(ConfigError) as info:
        PromptTuning().apply(build_model("llama"), PromptTuningConfig(init="text", init_ids=[VOCAB]))
    assert info.value.key == "init_ids"
    with pytest.raises(ConfigError, match="already carries a prompt"):
        PromptTuning().apply(adapt("hard_prompt", "llama").model, PromptTuningConfig())


@pytest.mark.parametrize(
    ("cls", "values", "key"),
    [
        (HardPromptConfig, {}, "instruction"),
        (HardPromptConfig, {"instruction": "", "shots": 0}, "instruction"),
        (HardPromptConfig, {"shots": -1}, "shots"),
        (HardPromptConfig, {"prompt_ids": [1], "shots": 2}, "prompt_ids"),
        (HardPromptConfig, {"prompt_ids": [-1]}, "prompt_ids"),
        (PromptTuningConfig, {"n_tokens": 0}, "n_tokens"),
        (PromptTuningConfig, {"init": "label"}, "init"),
        (PromptTuningConfig, {"init": "text"}, "init_text"),
        (PromptTuningConfig, {"init": "text", "init_text": "a", "init_ids": [1]}, "init_text"),
        (PromptTuningConfig, {"init": "vocab", "init_text": "a"}, "init_text"),
        (PromptTuningConfig, {"vocab_top": 0}, "vocab_top"),
    ],
)
def test_config_errors_name_the_field(cls: Any, values: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls.from_dict(values)
    assert info.value.key == key


def test_hard_prompt_save_load(tmp_path: Path) -> None:
    """Loading restores the saved token ids, whatever the new context would render."""
    cfg = HardPromptConfig(shots=2)
    saved = HardPrompt().apply(build_model("llama"), cfg, context=context(seed=0))
    saved.save(tmp_path)
    fresh = HardPrompt().apply(build_model("llama"), cfg, context=context(seed=5))
    assert not torch.equal(prefix_of(fresh.model).input_ids, prefix_of(saved.model).input_ids)
    fresh.load(tmp_path)
    batch = make_batch("llama")
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(**batch).logits, saved.model(**batch).logits, atol=0, rtol=0)
    from safetensors.torch import save_file

    save_file({"hard_prompt.input_ids": torch.zeros(3)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(AdapterFileError, match="adapter.safetensors"):
        fresh.load(tmp_path)


# ---------------------------------------------------------------- suite validation


SUITE = """
name = "prompts"
[model]
name = "synthetic:{model}"
[data]
task = "sst2"
train_examples = 8
[[sweep]]
method = "hard_prompt"
grid.shots = [0, 2]
config = {{ instruction = "Classify the sentiment." }}
[[sweep]]
method = "prompt_tuning"
grid.init = [{{ init = "text", init_text = "positive or negative" }}, {{ init = "vocab" }}, {{ init = "random" }}]
"""


@pytest.mark.parametrize("model", ["llama-tiny", "gpt2-tiny"])
def test_suite_validates_on_the_skeleton(model: str, tmp_path: Path) -> None:
    """Suite loading applies each method to a meta-device skeleton, without a context."""
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(SUITE.format(model=model)))
    trials = suite.load(path).trials
    assert sorted(t.spec["method"]["name"] for t in trials) == ["hard_prompt"] * 2 + ["prompt_tuning"] * 3


def test_suite_rejects_an_empty_hard_prompt(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        textwrap.dedent(SUITE.format(model="llama-tiny")).replace('instruction = "Classify the sentiment."', 'instruction = ""')
    )
    with pytest.raises(suite.SuiteError, match=r"sweep\[0\]\.instruction"):
        suite.load(path)


def test_t5_xxl_sized_prompt_has_the_papers_count() -> None:
    """The paper's 5-token prompt on a 4,096-wide model: 20,480 parameters (checked on a meta skeleton)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(
            LlamaConfig(hidden_size=4096, intermediate_size=64, num_hidden_layers=1, num_attention_heads=32, vocab_size=32000)
        )
    cfg = PromptTuningConfig(n_tokens=5, init="text", init_text="unknown without a tokenizer")
    adapted = PromptTuning().apply(model, cfg)  # no context: allowed on the meta device only
    assert sum(p.numel() for p in adapted.trainable) == PromptTuning().expected_trainable(model, cfg) == 20_480
