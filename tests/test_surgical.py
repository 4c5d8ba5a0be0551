"""Surgical fine-tuning and Auto-RGN (Lee et al., ICLR 2023, arXiv 2210.11466), and the vision
reproduction's data: which tensors train, the per-epoch multipliers, the shifts, and the rule
that the test split never takes part in choosing a learning rate."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import build_model, make_batch

import methods
from bench.tasks import vision
from bench.trial.train import Lookahead, train
from methods.auto_rgn import multipliers
from methods.base import ConfigError
from methods.layers import blocks, head_parameters

TRAIN = {
    "optimizer": "adamw",
    "lr": 1e-2,
    "batch_size": 8,
    "grad_accum": 1,
    "epochs": 3,
    "max_steps": None,
    "schedule": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "momentum": 0.9,
    "clip": None,
    "seed": 0,
}


def surgical(model: torch.nn.Module, blocks_: Any):
    method = methods.get("surgical")
    return method.apply(model, method.Config.from_dict({"blocks": blocks_}))


def small_cnn(num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return vision.ResNet4(num_classes, widths=(8, 8, 8, 8))


def images(n: int = 32, seed: int = 0) -> vision.Rows:
    g = torch.Generator().manual_seed(seed)
    return vision.Rows(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


# ---------------------------------------------------------------- surgical: which tensors train


def _names(model: torch.nn.Module, adapted) -> set[str]:
    ids = {id(p) for p in adapted.trainable}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(
    ("selection", "stages"), [("first", [0]), ("1", [1]), ("1-2", [1, 2]), ("middle", [1, 2]), ("last", [3]), (["0", "3"], [0, 3])]
)
def test_surgical_trains_exactly_the_named_cnn_stages(selection: Any, stages: list[int]) -> None:
    model = small_cnn()
    adapted = surgical(model, selection)
    expected = {n for n, _ in model.named_parameters() if any(n.startswith(f"stages.{i}.") for i in stages)}
    assert _names(model, adapted) == expected
    for n, p in model.named_parameters():
        assert p.requires_grad == (n in expected), n
    model(**vision.collate([images(4)[i] for i in range(4)])).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


def test_surgical_head_on_cnn_is_the_classifier() -> None:
    model = small_cnn()
    assert _names(model, surgical(model, "head")) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_surgical_trains_exactly_the_named_transformer_blocks(kind: str) -> None:
    model = build_model(kind)
    layers = blocks(model)
    adapted = surgical(model, ["last", "head"])
    expected = {id(p) for p in layers[len(layers) - 1].parameters()} | {id(p) for p in head_parameters(model)}
    assert {id(p) for p in adapted.trainable} == expected
    assert all(p.requires_grad == (id(p) in expected) for p in model.parameters())
    adapted.model(**make_batch(kind)).loss.backward()
    assert {id(p) for p in model.parameters() if p.grad is not None} == expected


def test_surgical_thirds_of_thirty_blocks() -> None:
    from bench.models import skeleton

    model = skeleton({"name": "synthetic:smollm2-135m"})  # 30 blocks on the meta device
    layers = blocks(model)
    for name, (lo, hi) in {"first-third": (0, 10), "middle-third": (10, 20), "last-third": (20, 30)}.items():
        model = skeleton({"name": "synthetic:smollm2-135m"})
        layers = blocks(model)
        adapted = surgical(model, name)
        assert {id(p) for p in adapted.trainable} == {id(p) for i in range(lo, hi) for p in layers[i].parameters()}, name


@pytest.mark.parametrize(
    ("kind", "selection", "listing"),
    [
        ("cnn", "4", "ResNet4 has 4 blocks, indices 0-3 (stages.N"),
        ("cnn", "block1", "ResNet4 has 4 blocks, indices 0-3"),
        ("cnn", "3-1", "ends before it starts"),
        ("llama", "frist", "LlamaForCausalLM has 2 blocks, indices 0-1 (model.layers.N"),
        ("gpt2", ["0", "2"], "GPT2LMHeadModel has 2 blocks, indices 0-1 (transformer.h.N"),
    ],
)
def test_bad_block_is_a_clear_error_listing_the_blocks(kind: str, selection: Any, listing: str) -> None:
    model = small_cnn() if kind == "cnn" else build_model(kind)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ConfigError) as info:
        surgical(model, selection)
    assert info.value.key == "blocks"
    assert listing in str(info.value) and "names: first, middle, last" in str(info.value)
    assert [p.requires_grad for p in model.parameters()] == before, "apply froze the model before failing"


def test_empty_selection_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="blocks"):
        methods.get("surgical").Config.from_dict({"blocks": []})


# ---------------------------------------------------------------- Auto-RGN


def test_multipliers_are_rgn_over_max() -> None:
    assert multipliers([0.2, 0.4, 0.1], [1.0, 1.0, 1.0]) == [0.5, 1.0, 0.25]
    # A zero-weight tensor has no relative norm: full rate, outside the max.
    assert multipliers([5.0, 0.4, 0.1], [0.0, 1.0, 1.0]) == [1.0, 1.0, 0.25]
    assert multipliers([0.0, 0.0], [1.0, 1.0]) == [1.0, 1.0]


def _run_auto_rgn(epochs: int = 3, probe: int = 2):
    model = small_cnn()
    method = methods.get("auto_rgn")
    adapted = method.apply(model, method.Config.from_dict({"probe_batches": probe}))
    seen: dict[str, Any] = {}
    on_epoch = adapted.hooks.on_epoch

    def spy(epoch, batches, optimizer):
        seen["optimizer"] = optimizer
        on_epoch(epoch, batches, optimizer)

    adapted.hooks.on_epoch = spy
    result = train(adapted, images(32), {**TRAIN, "epochs": epochs}, vision.collate, torch.device("cpu"))
    return model, adapted, result, seen["optimizer"]


def test_auto_rgn_multipliers_per_epoch_in_unit_interval_with_max_one() -> None:
    model, adapted, result, optimizer = _run_auto_rgn(epochs=3)
    report = adapted.hooks.report()
    assert [e["epoch"] for e in report["epochs"]] == [0, 1, 2]  # recomputed at every epoch
    names = [n for n, _ in model.named_parameters()]
    for epoch in report["epochs"]:
        values = epoch["multipliers"]
        assert list(values) == names
        assert all(0.0 <= v <= 1.0 for v in values.values())
        assert max(values.values()) == 1.0
        assert len({round(v, 6) for v in values.values()}) > 3, "multipliers should differ between tensors"
        # RGN / max RGN; the zero-initialised GroupNorm biases of this random model have no
        # relative norm (rgn recorded as 0) and keep the full rate.
        top = max(epoch["rgn"].values())
        assert all(math.isclose(values[n], epoch["rgn"][n] / top) if epoch["rgn"][n] > 0 else values[n] == 1.0 for n in names)
    assert report["epochs"][0]["multipliers"] != report["epochs"][-1]["multipliers"]
    # The optimizer used them: with a constant schedule each tensor's rate is lr x its last multiplier.
    last = report["epochs"][-1]["multipliers"]
    for group, name in zip(optimizer.param_groups, names, strict=True):
        assert group["lr"] == pytest.approx(TRAIN["lr"] * last[name])
    assert result.steps == 3 * 4


def test_auto_rgn_probe_leaves_grads_and_data_order_alone() -> None:
    """The probe reads batches ahead; training still gets every batch in the same order, and the
    probe's gradients never reach .grad."""
    stream = Lookahead(iter(range(10)))
    assert [x for _, x in zip(range(3), stream.peek())] == [0, 1, 2]
    assert [next(stream) for _ in range(4)] == [0, 1, 2, 3]

    model = small_cnn()
    adapted = methods.get("auto_rgn").apply(model, methods.get("auto_rgn").Config())
    rows = images(16)
    adapted.hooks.on_epoch(
        0,
        iter([vision.collate([rows[i] for i in range(8)])]),
        torch.optim.SGD([{"params": [p], "lr_scale": 1.0} for p in model.parameters()], lr=0.1),
    )
    assert all(p.grad is None for p in model.parameters())


def test_auto_rgn_on_a_transformer_records_blocks() -> None:
    model = build_model("llama")
    method = methods.get("auto_rgn")
    adapted = method.apply(model, method.Config.from_dict({"probe_batches": 2}))
    groups = adapted.hooks.param_groups(adapted.trainable)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    adapted.hooks.on_epoch(0, iter([make_batch("llama"), make_batch("llama")]), optimizer)
    epoch = adapted.hooks.report()["epochs"][0]
    assert set(epoch["mean_by_block"]) == {"block 0", "block 1", "other"}
    assert max(epoch["multipliers"].values()) == 1.0 and min(epoch["multipliers"].values()) >= 0.0
    assert [g["lr_scale"] for g in optimizer.param_groups] == list(epoch["multipliers"].values())


# ---------------------------------------------------------------- the shifts


def test_label_permutation_is_a_fixed_derangement() -> None:
    y = torch.arange(10)
    flipped = vision.flip_labels(y, 10)
    assert sorted(flipped.tolist()) == list(range(10))  # a permutation
    assert not (flipped == y).any()  # with no fixed point
    assert torch.equal(flipped, vision.flip_labels(y, 10))
    x_clean, y_clean = vision.images(vision.source_name())["pool"]
    x, y_target = vision.shift("fmnist-flip", x_clean, y_clean, "any")
    assert torch.equal(x, x_clean) and torch.equal(y_target, 9 - y_clean)


@pytest.mark.parametrize("task", ["fmnist-noise", "fmnist-blur", "fmnist-contrast"])
def test_corruption_changes_inputs_not_labels(task: str) -> None:
    source = vision.source_name()
    x_clean, y_clean = vision.images(source)["test"]
    x_clean, y_clean = x_clean[:500], y_clean[:500]
    x, y = vision.shift(task, x_clean, y_clean, "key")
    assert torch.equal(y, y_clean)
    assert x.shape == x_clean.shape and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float((x - x_clean).abs().mean()) > 0.02
    assert torch.equal(x, vision.shift(task, x_clean, y_clean, "key")[0]), "a corruption must be the same every time"


def test_feature_shift_has_disjoint_subclasses() -> None:
    source = vision.source_name()
    for name, (src, tgt) in vision.HIERARCHY[source].items():
        assert src and tgt and not set(src) & set(tgt), name
    # Tag each image with its original class to see which subclasses each side keeps.
    labels = torch.arange(10).repeat(3)
    tags = labels.float().view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    src_x, src_y = vision._superclass_rows(tags, labels, source, 0)
    tgt_x, tgt_y = vision._superclass_rows(tags, labels, source, 1)
    src_classes, tgt_classes = set(src_x[:, 0, 0, 0].int().tolist()), set(tgt_x[:, 0, 0, 0].int().tolist())
    assert src_classes and tgt_classes and not src_classes & tgt_classes
    assert set(src_y.tolist()) == set(tgt_y.tolist()) == set(range(len(vision.HIERARCHY[source])))  # same superclasses


def test_target_splits_are_disjoint() -> None:
    # fmnist-flip leaves the images as they are, so equal images mean the same row.
    train_rows, scored, info = vision.target_sets("fmnist-flip", 200, seed=1)
    assert info["source"] == vision.source_name() and info["shift"] == "output"
    key = lambda x: hash(x.numpy().tobytes())  # noqa: E731
    train_keys = {key(x) for x in train_rows.x}
    assert not train_keys & {key(x) for x in scored["val"].x}
    assert len(train_rows) == 200 and len(scored["test"]) == info["test_rows"]
    other, _, _ = vision.target_sets("fmnist-flip", 200, seed=2)
    assert {key(x) for x in other.x} != train_keys, "the seed draws the training rows"


def test_vision_tasks_need_their_model() -> None:
    assert vision.mismatch("cnn4-fmnist", "fmnist-noise", []) is None
    assert "cnn4-fmnist-super" in vision.mismatch("cnn4-fmnist", "fmnist-subpop", [])
    assert "vision tasks only" in vision.mismatch("cnn4-fmnist", "sst2", [])
    assert "tokenizer" in vision.mismatch("cnn4-fmnist", "fmnist-flip", ["sst2"])


# ---------------------------------------------------------------- the learning rate comes from validation


def _trial(lr: float, seed: int, val: float, test: float, blocks_: str = "0") -> dict[str, Any]:
    spec = {
        "method": {"name": "surgical", "config": {"blocks": blocks_}},
        "data": {"task": "fmnist-noise"},
        "train": {"lr": lr, "seed": seed},
        "model": {"name": "cnn4-fmnist"},
    }
    return {
        "status": "success",
        "spec": spec,
        "seed": seed,
        "eval.accuracy.val": val,
        "eval.accuracy.test": test,
        "data.shift": "input",
        "data.describe": "noise",
        "data.source": "fashion-mnist",
        "params.trainable": 1,
    }


def test_learning_rate_is_chosen_on_validation_never_on_test() -> None:
    from reports.surgical import selected

    # lr 1e-3 wins on validation, lr 1e-2 would win on test: the table must show 1e-3's test scores.
    rows = [_trial(1e-3, s, 0.80, 0.60 + s / 100) for s in range(3)] + [_trial(1e-2, s, 0.70, 0.90) for s in range(3)]
    picked = selected(pd.DataFrame(rows))
    assert len(picked) == 1
    row = picked.iloc[0]
    assert row["choice"] == "Block 1" and row["lr"] == 1e-3
    assert row["test_values"] == [0.60, 0.61, 0.62]


def test_report_states_whether_the_rule_holds() -> None:
    from reports.surgical import verdict

    assert verdict("input", {"Block 1": [0.8, 0.81, 0.82], "Block 4": [0.5, 0.52, 0.51]})[1].startswith("holds")
    best, text = verdict("output", {"Block 1": [0.8, 0.81, 0.82], "Head": [0.5, 0.52, 0.51]})
    assert best == "Block 1" and text.startswith("does not hold")


# ---------------------------------------------------------------- through the worker


def test_worker_records_accuracy_data_source_and_multipliers(tmp_path, monkeypatch) -> None:
    """A vision trial end to end in-process: a quick source model, Auto-RGN on 64 target images."""
    from bench.records import results
    from bench.run import worker
    from bench.run.suite import SECTIONS, Trial

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(vision, "PRETRAIN", {**vision.PRETRAIN, "epochs": 1, "min_steps": 0})
    real_rows = vision.source_rows
    monkeypatch.setattr(vision, "source_rows", lambda kind, source: tuple(t[:256] for t in real_rows(kind, source)))
    spec = {
        s: cls.from_dict(v).to_dict()
        for s, cls, v in [
            ("model", SECTIONS["model"], {"name": "cnn4-fmnist"}),
            ("data", SECTIONS["data"], {"task": "fmnist-flip", "train_examples": 64}),
            ("train", SECTIONS["train"], {"epochs": 2, "batch_size": 16, "lr": 1e-3}),
            ("eval", SECTIONS["eval"], {"forgetting": False}),
        ]
    }
    spec["method"] = {"name": "auto_rgn", "version": "1", "config": {"probe_batches": 2}}
    trial = Trial(suite="t", spec=spec, run={"timeout": 60, "threads": 1})
    result = results.skeleton(trial, "failed")
    worker.run(trial, result, None, False)
    assert result["data"]["source"] == vision.source_name() and result["data"]["shift"] == "output"
    assert 0.0 <= result["model_info"]["source_test_accuracy"] <= 1.0 and result["model_info"]["source_rows"] == 256
    assert set(result["eval"]["accuracy"]) == {"val", "test"}
    assert [e["epoch"] for e in result["method_report"]["epochs"]] == [0, 1]
    assert result["train"]["tokens"] == 2 * 64  # images, for a batch without an attention mask


def test_report_section_renders_the_paper_table() -> None:
    from reports.surgical import section

    rows = [_trial(lr, s, 0.7 + lr, 0.6 + s / 100, blocks_=b) for lr in (1e-3, 1e-2) for s in range(3) for b in ("0", "3", "head")]
    pub = {
        "surgical": {
            "cifar10c": [{"setting": "First block", "accuracy_pct": 82.8}],
            "rules": {k: k for k in ("input_level", "feature_level", "output_level")},
        },
        "sources": {"surgical": {"cite": "Lee et al."}},
    }
    s = section(pd.DataFrame(rows), pd.DataFrame(), pub, ("surgical", "auto_rgn"))
    table = next(b for b in s.blocks if b.kind == "table" and "shift" in b.table.columns)
    assert table.table.columns[:4] == ["shift", "Block 1", "Block 4", "Head"]
    assert table.table.rows[0][1].text == "61.0 ± 1.0"


def test_source_model_does_not_depend_on_the_callers_random_state(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vision, "PRETRAIN", {**vision.PRETRAIN, "epochs": 1, "min_steps": 0})
    real_rows = vision.source_rows
    monkeypatch.setattr(vision, "source_rows", lambda kind, source: tuple(t[:128] for t in real_rows(kind, source)))
    weights = []
    for seed in (1, 2):
        monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / str(seed)))
        torch.manual_seed(seed)
        expected = torch.rand(1, generator=torch.Generator().manual_seed(seed))
        model, _ = vision.pretrained("cnn4-fmnist")
        weights.append(model.state_dict())
        assert torch.equal(torch.rand(1), expected), "pretraining changed the caller's random state"
    for name, value in weights[0].items():
        assert torch.equal(value, weights[1][name]), name
