"""The one training loop: schedules, accumulation, optimizers, divergence, the accounted memory."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

import methods
from bench.tasks import data
from bench import models
from bench.trial.train import Diverged, lr_lambda, total_steps, train

T = dict(optimizer="adamw", lr=1e-3, batch_size=4, grad_accum=1, epochs=1, max_steps=None, schedule="constant",
         warmup_steps=0, weight_decay=0.0, momentum=0.9, clip=1.0, seed=0)


@pytest.fixture(scope="module")
def tiny():
    loaded = models.load({"name": "synthetic:llama-tiny"})
    dataset = data.tokenized("sst2", loaded.tokenizer, 48, 16)
    return loaded, dataset


def collate_for(tokenizer):
    return lambda rows: data.collate(rows, tokenizer.pad_token_id)


def lora(model):
    m = methods.get("lora")
    return m.apply(model, m.Config(r=4, alpha=8, targets="all-linear"))


def test_schedules_warm_up_then_decay():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert f(0) < f(1) < f(2) == pytest.approx(1.0)
    assert f(9) < f(5) < f(2)
    assert lr_lambda("linear", 0, 10)(10) == 0.0
    assert lr_lambda("constant", 0, 10)(7) == 1.0


def test_steps_from_epochs_or_max_steps():
    assert total_steps(16, T) == 4
    assert total_steps(16, dict(T, epochs=2, grad_accum=2)) == 4
    assert total_steps(16, dict(T, max_steps=7)) == 7


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adamw-8bit"])
def test_loss_goes_down_and_memory_is_accounted(tiny, optimizer):
    loaded, dataset = tiny
    adapted = lora(copy.deepcopy(loaded.model))
    lr = 5e-2 if optimizer == "sgd" else 1e-2
    result = train(adapted, dataset, dict(T, optimizer=optimizer, lr=lr, max_steps=12), collate_for(loaded.tokenizer),
                   torch.device("cpu"))
    assert result.steps == 12 and len(result.loss_curve) == 12
    assert sum(result.loss_curve[-3:]) < sum(result.loss_curve[:3])
    trainable_bytes = sum(p.numel() * 4 for p in adapted.trainable)
    assert result.accounted["grads"] == trainable_bytes
    # Adam keeps two moments, SGD one momentum buffer (plus Adam's step scalars); bitsandbytes
    # keeps 32-bit state for tensors under 4096 elements, which all of this tiny LoRA's are.
    state = {"adamw": 2 * trainable_bytes, "sgd": trainable_bytes, "adamw-8bit": 2 * trainable_bytes}[optimizer]
    assert state <= result.accounted["optimizer"] <= state + 8192
    assert result.accounted["activations"] > 0


def test_8bit_adam_state_is_a_quarter_of_adams(tiny):
    loaded, dataset = tiny
    full = methods.get("full")
    state = {}
    for optimizer in ("adamw", "adamw-8bit"):
        adapted = full.apply(copy.deepcopy(loaded.model), full.Config())
        state[optimizer] = train(adapted, dataset, dict(T, optimizer=optimizer, max_steps=1), collate_for(loaded.tokenizer),
                                 torch.device("cpu")).accounted["optimizer"]
    # 1 byte instead of 4 per moment for the large tensors; the small ones (norms) stay 32-bit.
    assert state["adamw-8bit"] < 0.35 * state["adamw"]


def test_gradient_accumulation_matches_the_big_batch(tiny):
    loaded, dataset = tiny
    # Rows of equal length: with equal token counts per micro-batch, the mean of micro-batch
    # means is the big batch's mean, so one step of each must land on the same weights.
    rows = [r for r in dataset if len(r["input_ids"]) == len(dataset[0]["input_ids"])][:4]
    assert len(rows) == 4
    same = Dataset.from_list(rows)
    outs = []
    for bs, accum in [(4, 1), (2, 2)]:
        adapted = lora(copy.deepcopy(loaded.model))
        train(adapted, same, dict(T, batch_size=bs, grad_accum=accum, max_steps=1, optimizer="sgd", momentum=0.0, clip=None),
              collate_for(loaded.tokenizer), torch.device("cpu"))
        outs.append([p.detach().clone() for p in adapted.trainable])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_nan_loss_ends_as_diverged(tiny):
    loaded, dataset = tiny
    adapted = lora(copy.deepcopy(loaded.model))
    with torch.no_grad():
        adapted.trainable[0].fill_(float("nan"))
    with pytest.raises(Diverged, match="step 0"):
        train(adapted, dataset, dict(T, max_steps=3), collate_for(loaded.tokenizer), torch.device("cpu"))


def test_frozen_trains_nothing(tiny):
    loaded, dataset = tiny
    m = methods.get("frozen")
    result = train(m.apply(copy.deepcopy(loaded.model), m.Config()), dataset, T, collate_for(loaded.tokenizer),
                   torch.device("cpu"))
    assert result.steps == 0 and result.loss_curve == []


def test_seed_fixes_adapter_init_and_data_order(tiny):
    loaded, dataset = tiny
    curves = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        adapted = lora(copy.deepcopy(loaded.model))
        curves.append(train(adapted, dataset, dict(T, seed=seed, max_steps=4), collate_for(loaded.tokenizer),
                            torch.device("cpu")).loss_curve)
    assert curves[0] == curves[1] and curves[0] != curves[2]


# ---- the loss projects only the labelled positions onto the vocabulary -------------------------------


def _answer_only(batch: dict[str, torch.Tensor], answer: int = 2) -> dict[str, torch.Tensor]:
    """Labels on each row's last `answer` real tokens only, rows of different lengths (right padding):
    how instruction and classification rows are labelled (bench.tasks.tokens)."""
    out = {k: v.clone() for k, v in batch.items()}
    out["labels"][:] = -100
    for i in range(len(out["input_ids"])):
        length = out["input_ids"].shape[1] - i  # row i has i padding positions
        out["attention_mask"][i, length:] = 0
        out["labels"][i, length - answer:length] = out["input_ids"][i, length - answer:length]
    return out


@pytest.mark.parametrize("labels", ["answer", "every"])
@pytest.mark.parametrize("method", [("lora", {"r": 4, "targets": "qv"}), ("prompt_tuning", {"n_tokens": 3})], ids=["lora", "prompt"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_over_labelled_positions_equals_the_models_own(arch, method, labels):
    """Same loss and gradients as `model(**batch).loss`, which projects every position; the head sees
    only the labelled ones. Behind a prompt put in front of the input (methods/prompt_tuning.py) the
    prompt's last position scores the input's first token: kept when that token is labelled."""
    from conftest import build_model, make_batch

    from bench.trial.loss import keeps_logits, loss

    name, config = method
    m = methods.get(name)
    torch.manual_seed(0)
    adapted = m.apply(build_model(arch), m.Config.from_dict(config))
    model = adapted.model
    batch = make_batch("llama", batch=3, seq=10)
    batch = _answer_only(batch) if labels == "answer" else batch
    assert keeps_logits(model, batch)
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: head_rows.append(args[0].shape[:-1].numel()))
    ours = loss(model, batch)
    ours.backward()
    ours_grads = [p.grad.clone() for p in adapted.trainable]
    model.zero_grad(set_to_none=True)
    theirs = model(**batch).loss
    theirs.backward()
    hook.remove()
    every = 3 * (batch["input_ids"].shape[1] + config.get("n_tokens", 0))
    kept = int((batch["labels"][:, 1:] != -100).sum()) + (int((batch["labels"][:, 0] != -100).sum()) if name == "prompt_tuning" else 0)
    assert head_rows == [kept, every]  # ours: the labelled positions; the model's own: every one
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    for mine, reference in zip(ours_grads, (p.grad for p in adapted.trainable), strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-6)


def test_class_labels_and_images_keep_the_models_own_loss():
    from conftest import build_model, make_batch

    from bench.trial.loss import keeps_logits

    assert not keeps_logits(build_model("bert"), make_batch("bert"))  # one label a row, no next tokens
