"""bench/trial/flops.py: the counted training FLOPs against torch's own FlopCounterMode on a real
forward and backward, and the machine peak's cache.

FlopCounterMode counts the aten matmuls (mm, addmm, bmm, convolution) that autograd actually runs,
backward included; our count is read from the forward alone with the backward rules of
bench/trial/flops.py and extrapolated from tiny batches, so agreement checks both the rules (which
gradients autograd computes) and the extrapolation. Attention is eager (matmuls: FlopCounterMode
does not count torch's CPU flash-attention kernel) except in one SDPA case on the math backend.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from tiny_archs import arch_batch, build_arch
from torch.utils.flop_counter import FlopCounterMode

import methods
from bench.trial import flops
from bench.trial.loss import loss as train_loss

TOLERANCE = 0.01
"""Relative: what the count leaves out (norms, softmax, elementwise) is not in FlopCounterMode's
count either: the cases below agree exactly today; 1% is the stated bound (a custom autograd function
whose backward differs from what its forward shows would move it)."""


def _model(arch: str, attention: str = "eager"):
    model = build_arch(arch)
    model.config._attn_implementation = attention
    return model


# FlopCounterMode knows aten.addmm and aten.baddbmm but not their in-place forms, which a fused layer
# (methods/lora.py's LowRankLinear accumulates its branch into the base output) runs: same formulas.
def _product_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a_shape) * b_shape[-1]  # (..., m, k) @ (..., k, n): 2 m k n per batch entry


IN_PLACE = {torch.ops.aten.addmm_: _product_flops, torch.ops.aten.baddbmm_: _product_flops}


def _torch_count(model, trainable, batch, inputs_grad: bool = False) -> int:
    model.train()
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE) as counter:
        if inputs_grad:  # the frozen floor: backward to the input embeddings, no parameter trains
            embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        else:
            loss = train_loss(model, batch)  # the loss training runs: the head over labelled positions only
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _adapt(model, method: str, config: dict):
    m = methods.get(method)
    torch.manual_seed(0)
    adapted = m.apply(model, m.Config.from_dict(config))
    return adapted


CASES = [
    ("llama", "full", {}),
    ("gpt2", "full", {}),
    ("llama", "lora", {"r": 4, "targets": "qv"}),
    ("gpt2", "lora", {"r": 4, "targets": "qv"}),
    ("llama", "lora", {"r": 4, "targets": "all-linear"}),
    ("gpt2", "lora", {"r": 8, "targets": "all-linear"}),
    ("llama", "top_k", {"k": 1}),
    ("llama", "lora", {"r": 4, "targets": "qv", "dropout": 0.1}),  # the branch reads a dropped copy of x
    ("llama", "lora_fa", {"r": 4, "targets": "qv"}),  # A frozen: no dA, but the gradient still flows through it
    ("gpt2", "dora", {"r": 4, "targets": "qv"}),  # its weight norm's B A runs under no_grad: no backward
    ("llama", "vera", {"r": 16, "targets": "qv"}),
]


@pytest.mark.parametrize(("arch", "method", "config"), CASES, ids=[f"{a}-{m}-{c.get('targets', '')}" for a, m, c in CASES])
def test_count_matches_flop_counter(arch, method, config):
    model = _model(arch)
    adapted = _adapt(model, method, config)
    batch = arch_batch(arch, batch=3, seq=21)
    expected = _torch_count(adapted.model, adapted.trainable, batch)
    counted = flops.training_flops(adapted.model, adapted.trainable, [flops.batch_shape(batch)], arch_batch(arch, batch=2, seq=8))
    assert counted.flops == pytest.approx(expected, rel=TOLERANCE)
    assert counted.check_error < 1e-6  # a transformer's count is the polynomial exactly


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_counted_over_labelled_positions_only(arch):
    """Answer-only labels (instruction rows): the vocabulary head runs on the labelled positions alone,
    and the count, fitted on fully labelled tiny batches, follows the trial's own label count."""
    adapted = _adapt(_model(arch), "lora", {"r": 4, "targets": "qv"})
    batch = arch_batch(arch, batch=3, seq=21)
    batch["labels"][:, :-3] = -100  # the last three tokens of each row: the three positions before them are kept
    expected = _torch_count(adapted.model, adapted.trainable, batch)
    rows, width, kept = flops.batch_shape(batch)
    assert (rows, width, kept) == (3, 21, 9)
    counted = flops.training_flops(adapted.model, adapted.trainable, [(rows, width, kept)], arch_batch(arch, batch=2, seq=8))
    assert counted.flops == pytest.approx(expected, rel=TOLERANCE)
    every = flops.training_flops(adapted.model, adapted.trainable, [(rows, width, rows * (width - 1))], arch_batch(arch, batch=2, seq=8))
    head = 2 * 2 * adapted.model.config.hidden_size * adapted.model.config.vocab_size  # forward + input gradient, per position
    assert every.flops - counted.flops == pytest.approx(head * (rows * (width - 1) - kept), rel=TOLERANCE)


def test_lora_counts_less_than_full_and_weight_gradients_only_where_trained():
    """LoRA on q/v: the frozen W0 gets no weight gradient, so a step costs about 4 (not 6) x params x tokens."""
    batch = arch_batch("llama", batch=2, seq=16)
    shapes = [flops.batch_shape(batch)]
    full = _adapt(_model("llama"), "full", {})
    lora = _adapt(_model("llama"), "lora", {"r": 4, "targets": "qv"})
    f = flops.training_flops(full.model, full.trainable, shapes, batch).flops
    lo = flops.training_flops(lora.model, lora.trainable, shapes, batch).flops
    assert 0.55 * f < lo < 0.75 * f


def test_frozen_floor_backward_to_inputs():
    """No parameter trains but the input embeddings need a gradient (benchmarks/lora_step.py's floor)."""
    model = _model("llama")
    model.requires_grad_(False)
    batch = arch_batch("llama", batch=2, seq=16)
    expected = _torch_count(model, [], batch, inputs_grad=True)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    counted = flops.step_flops(flops.forward_products(model, {"inputs_embeds": embeds, "attention_mask": batch["attention_mask"],
                                                              "labels": batch["labels"]}))
    assert counted == pytest.approx(expected, rel=TOLERANCE)


def test_sdpa_math_backend():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _model("llama", attention="sdpa")
    adapted = _adapt(model, "lora", {"r": 4, "targets": "qv"})
    batch = arch_batch("llama", batch=2, seq=16)
    with sdpa_kernel(SDPBackend.MATH):  # decomposed into matmuls that FlopCounterMode counts
        expected = _torch_count(adapted.model, adapted.trainable, batch)
    counted = flops.step_flops(flops.forward_products(adapted.model, batch))
    assert counted == pytest.approx(expected, rel=TOLERANCE)


def test_frozen_trains_nothing():
    adapted = _adapt(_model("llama"), "frozen", {})
    batch = arch_batch("llama")
    assert flops.training_flops(adapted.model, adapted.trainable, [flops.batch_shape(batch)], batch).flops == 0
    assert flops.utilization(0.0, 1.0, None)["fraction"] is None


def test_count_leaves_model_and_random_state_alone():
    adapted = _adapt(_model("gpt2"), "lora", {"r": 4, "targets": "qv"})
    adapted.model.eval()
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    state = torch.random.get_rng_state()
    flops.training_flops(adapted.model, adapted.trainable, [(2, 8)], arch_batch("gpt2"))
    assert not adapted.model.training
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in adapted.model.state_dict().items())
    assert all(p.grad is None for p in adapted.trainable)


def test_images_count_is_linear_in_rows():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = conv

        def forward(self, pixel_values, labels):
            return torch.nn.functional.cross_entropy(self.body(pixel_values), labels)

    net = Net()
    batch = {"pixel_values": torch.randn(5, 3, 6, 6), "labels": torch.tensor([0, 1, 2, 3, 0])}
    with FlopCounterMode(display=False) as counter:
        net(**batch).backward()
    counted = flops.training_flops(net, list(net.parameters()), [(5, 1)], batch)
    assert counted.flops == pytest.approx(counter.get_total_flops(), rel=TOLERANCE)
    assert counted.check_error < 1e-6


# ---------------------------------------------------------------- the peak cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    calls = []

    def measure(device, threads, dtype):
        calls.append((device, threads, dtype))
        return 1.25e9 * len(calls)

    return calls, measure


def test_peak_measured_once_then_cached(cache):
    calls, measure = cache
    first = flops.peak_flops("cpu", 1, measure=measure)
    second = flops.peak_flops("cpu", 1, measure=measure)
    assert (first.source, second.source) == ("measured", "cached")
    assert second.flops_per_s == first.flops_per_s == 1.25e9
    assert len(calls) == 1
    assert flops.cache_path().exists() and flops.cache_path().parent.name == "machine"
    other = flops.peak_flops("cpu", 2, measure=measure)  # another thread count is another entry
    assert other.source == "measured" and len(calls) == 2
    assert flops.peak_flops("cpu", 1, measure=measure).flops_per_s == 1.25e9


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps({"cpu/float32/threads=1": {"flops_per_s": -3}})])
def test_corrupt_peak_cache_is_remeasured_with_a_warning(cache, content):
    calls, measure = cache
    path = flops.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="unreadable machine peak cache"):
        peak = flops.peak_flops("cpu", 1, measure=measure)
    assert peak.source == "measured" and len(calls) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert flops.peak_flops("cpu", 1, measure=measure).source == "cached"


def test_callers_that_miss_the_cache_together_measure_once(cache):
    """Trials side by side miss the cache at once: one times the peak, the others wait and read it."""
    import threading
    import time

    calls, measure = cache

    def slow(device, threads, dtype):
        time.sleep(0.3)
        return measure(device, threads, dtype)

    got = []
    threads = [threading.Thread(target=lambda: got.append(flops.peak_flops("cpu", 1, measure=slow))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert sorted(p.source for p in got) == ["cached", "cached", "measured"]
    assert {p.flops_per_s for p in got} == {1.25e9}


def test_the_runner_times_the_peak_first_alone_on_one_lane(cache, monkeypatch, tmp_path):
    """A parallel sweep times each (dtype, threads) peak its trials need before any lane starts,
    pinned to the first lane's cores, and leaves this process's cores as they were."""
    import os

    from bench.regression import calibrate
    from bench.run import runner, suite

    seen = []

    def measure(device, threads, dtype):
        seen.append((sorted(os.sched_getaffinity(0)), threads, dtype))
        return 1e9

    monkeypatch.setattr(flops, "_measure", measure)
    path = tmp_path / "s.toml"
    path.write_text('name = "s"\n[model]\nname = "synthetic:llama-tiny"\n[data]\ntask = "sst2"\n[train]\nmax_steps = 1\n'
                    '[run]\nparallel = 2\n'
                    '[[sweep]]\nmethod = "lora"\n[[sweep]]\nmethod = "ia3"\nrun = { threads = 2, parallel = 2 }\n')
    trials = suite.load(path).trials
    before = os.sched_getaffinity(0)
    lane = runner.lanes(2)[0]
    machine = calibrate.machine_class()
    calibrate.machine_class.cache_clear()  # as in a fresh `peftbench run`: the class not yet read
    runner.peaks_first(trials, lane)
    assert os.sched_getaffinity(0) == before
    # Stored under the machine's class, where the trials look, not under the pinned lane's share
    # (a run on two cores stored its peaks under x86_64-1cpu-cpu and every trial missed them).
    assert calibrate.machine_class() == machine
    assert [p.name for p in (tmp_path / "machine").glob("*.json")] == [f"{machine}.json"]
    assert sorted((threads, dtype) for _, threads, dtype in seen) == [(1, "float32"), (2, "float32")]
    assert all(cores == sorted(lane.cpus) for cores, _, _ in seen)
    runner.peaks_first(trials, lane)  # cached now: nothing timed again
    assert len(seen) == 2


def test_measured_peak_is_a_rate(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(flops, "MATMUL_SIZES", (64, 128))
    peak = flops.peak_flops("cpu", 1)
    assert peak.source == "measured" and peak.flops_per_s > 1e6


def test_utilization_fields():
    peak = flops.Peak(4e10, "cached", "x86_64-2cpu-cpu", "cpu", 2, "float32", "2026-01-01T00:00:00Z")
    u = flops.utilization(6e11, 30.0, peak)
    assert u["achieved_flops_per_s"] == pytest.approx(2e10)
    assert u["fraction"] == pytest.approx(0.5)
    assert u["peak_source"]["source"] == "cached" and u["peak_source"]["threads"] == 2


def test_flop_model_is_cached_per_model_and_method(tmp_path, monkeypatch):
    """Trials that differ only in training settings share one trace; another method config traces again."""
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    spec = {"model": {"name": "tiny-llama"}, "method": {"name": "lora", "version": "1", "config": {"r": 4, "targets": "qv"}}}
    adapted = _adapt(_model("llama"), "lora", spec["method"]["config"])
    batch = arch_batch("llama")
    first, how = flops.cached_flop_model(adapted.model, batch, spec)
    again, how_again = flops.cached_flop_model(adapted.model, batch, spec)
    assert (how, how_again) == ("traced", "cached") and again == first
    other = {**spec, "method": {**spec["method"], "config": {"r": 8, "targets": "qv"}}}
    assert flops.cached_flop_model(adapted.model, batch, other)[1] == "traced"
    for path in (tmp_path / "flops").glob("*.json"):
        path.write_text("{broken")
    assert flops.cached_flop_model(adapted.model, batch, spec) == (first, "traced")  # unreadable: traced again
