"""What a trial computes besides training and scoring, made cheaper without changing a recorded value:
the memory forecast's components cached on disk (bench.trial.forecast, bench.trial.memo), and the FLOP
count over the micro-batch shapes training recorded instead of drawing every batch again."""

from __future__ import annotations

import json

import pytest
import torch

import methods
from bench import models
from bench.paths import cache_dir
from bench.run import suite as suite_mod
from bench.tasks import data
from bench.trial import flops, forecast, memo
from bench.trial.train import batches, train

CALIBRATION = forecast.CpuCalibration(runtime_bytes=300_000_000, backward_factor=0.5)
"""Fixed, so the test needs neither a committed calibration nor a fork server measuring one."""

SUITE = """
name = "overhead"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 12
max_length = 32
[train]
lr = 1e-3
batch_size = 4
epochs = 1
[eval]
tasks = []
forgetting = false
[[sweep]]
method = "lora"
config = { r = 4, targets = "qv" }
"""


@pytest.fixture
def spec(tmp_path, monkeypatch) -> dict:
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "overhead.toml"
    path.write_text(SUITE)
    return suite_mod.load(path).trials[0].spec


def _forecast(spec: dict, **kwargs) -> dict:
    return forecast.forecast(spec, runtime_bytes=kwargs.pop("runtime_bytes", 200_000_000), calibration=CALIBRATION, **kwargs).to_dict()


def _no_meta_step(monkeypatch) -> None:
    """From here on a forecast that is not read from the cache fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("computed, not read from the cache")

    monkeypatch.setattr(forecast, "meta_step", refuse)


def test_cached_forecast_equals_the_computed_one_and_takes_the_callers_runtime(spec, monkeypatch):
    computed = _forecast(spec)
    assert computed["activations"] > 0 and computed["optimizer"] > 0
    first = _forecast(spec, cache=True)  # computed and stored
    assert len(list((cache_dir() / "forecast").glob("*.json"))) == 1
    _no_meta_step(monkeypatch)
    assert _forecast(spec, cache=True) == first == computed
    # The peak is the caller's: this process's runtime and the calibration, applied after the cache.
    other = _forecast(spec, cache=True, runtime_bytes=250_000_000)
    assert other["peak"] - computed["peak"] == 50_000_000
    assert {k: v for k, v in other.items() if k not in ("peak", "peak_parts")} == \
        {k: v for k, v in computed.items() if k not in ("peak", "peak_parts")}
    # Another learning rate: the same batches and optimizer state, the same entry.
    assert _forecast({**spec, "train": {**spec["train"], "lr": 0.5}}, cache=True) == computed


@pytest.mark.parametrize("change", ["seed", "batch_size", "method", "code", "version"])
def test_forecast_cache_misses_when_its_key_changes(spec, monkeypatch, change):
    _forecast(spec, cache=True)
    _no_meta_step(monkeypatch)
    if change in ("seed", "batch_size"):  # the batches drawn
        spec = {**spec, "train": {**spec["train"], change: spec["train"][change] + 1}}
    elif change == "method":
        spec = {**spec, "method": {**spec["method"], "config": {**spec["method"]["config"], "r": 8}}}
    elif change == "code":  # a method, model loader, data or forecast source changed
        digest = memo.code_digest
        monkeypatch.setattr(memo, "code_digest", lambda paths: digest(paths) + "-edited")
    else:
        monkeypatch.setattr(forecast, "VERSION", forecast.VERSION + 1)
    with pytest.raises(AssertionError, match="not read from the cache"):
        _forecast(spec, cache=True)


def test_a_damaged_or_foreign_cache_entry_is_computed_again(spec, monkeypatch):
    computed = _forecast(spec, cache=True)
    (path,) = (cache_dir() / "forecast").glob("*.json")
    path.write_text("{broken")
    assert _forecast(spec, cache=True) == computed
    stored = json.loads(path.read_text())
    stored["key"][0] = "another key"  # what a file of another key at this name would hold
    path.write_text(json.dumps(stored))
    _no_meta_step(monkeypatch)
    with pytest.raises(AssertionError, match="not read from the cache"):
        _forecast(spec, cache=True)


def test_an_explicit_batch_is_never_cached(spec):
    forecast.forecast(spec, batch=forecast.Batch.tokens(2, 8), runtime_bytes=0, calibration=CALIBRATION, cache=True)
    assert not (cache_dir() / "forecast").exists()


def _rows() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in [9, 14, 20, 11, 17, 24, 10, 13, 22, 16, 12]:
        ids = torch.randint(3, 500, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    return out


def test_training_records_each_micro_batch_shape_and_utilization_counts_them(tmp_path, monkeypatch):
    """The shapes train() records are the micro-batches a replay of its stream draws (padding and the
    labelled positions included), and of_trial counts exactly their FLOPs."""
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(flops, "_measure", lambda device, threads, dtype: 1e10)  # no timing in a test
    spec = {"model": {"name": "synthetic:llama-tiny"}, "method": {"name": "lora", "version": "1", "config": {"r": 4, "targets": "qv"}},
            "train": {"optimizer": "adamw", "lr": 1e-3, "batch_size": 3, "grad_accum": 2, "epochs": 3, "max_steps": None,
                      "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "momentum": 0.9, "clip": 1.0, "seed": 3}}
    rows = _rows()

    def collate(batch):
        return data.collate(batch, pad_id=1)

    method = methods.get("lora")
    torch.manual_seed(0)
    adapted = method.apply(models.load(spec["model"]).model, method.Config.from_dict(spec["method"]["config"]))
    trained = train(adapted, rows, spec["train"], collate, torch.device("cpu"))
    stream = batches(rows, spec["train"], collate, torch.device("cpu"))
    replayed = [flops.batch_shape(next(stream)) for _ in range(trained.steps * spec["train"]["grad_accum"])]
    assert trained.batch_shapes == replayed
    assert len({width for _, width, _ in replayed}) > 1 and any(rows_ < 3 for rows_, _, _ in replayed)  # padded widths, a short last batch
    counted = flops.of_trial(adapted, rows, spec, collate, torch.device("cpu"), trained.batch_shapes, 2.0)
    fit = flops.flop_model(adapted.model, next(batches(rows, spec["train"], collate, torch.device("cpu"))))
    assert counted["micro_batches"] == len(replayed)
    assert counted["train_flops"] == pytest.approx(sum(fit(*shape) for shape in replayed), rel=1e-12)


def _pickled_modules(obj) -> set[str]:
    """The modules a pickle of `obj` names (what unpickling it imports)."""
    import pickle
    import pickletools

    found, strings = set(), []
    for op, arg, _ in pickletools.genops(pickle.dumps(obj)):
        if op.name in ("GLOBAL", "INST"):
            found.add(arg.split(" ")[0])
        elif op.name == "STACK_GLOBAL":
            found.add(strings[-2])
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_the_fork_server_preloads_every_module_a_trials_arguments_name(spec):
    """Unpickling a trial's arguments in its process imports nothing of peftbench that the fork server
    has not imported already (bench.run.forkserver.PRELOAD): each import would be paid by every trial."""
    from bench.run import forkserver, runner, suite as suite_mod, worker

    trial = suite_mod.Trial(suite="overhead", spec=spec, run={"timeout": 60, "threads": 1})
    args = (worker.main, trial, "/tmp/draft.json", None, False, 1, runner.lanes(2, [0, 1])[0])
    named = {m for m in _pickled_modules(args) if m.split(".")[0] in ("bench", "methods", "reports")}
    assert {"bench.run.worker", "bench.run.suite", "bench.run.runner"} <= named
    assert named <= set(forkserver.PRELOAD)
