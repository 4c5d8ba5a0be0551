"""The memory forecast (bench/trial/forecast.py): the meta step against a real step, the forecast against
the committed measurements, the CUDA forecast against the H200 results, and [run] memory_budget_gb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import methods
from bench.tasks import data
from bench.tasks.tokens import collate_packed
from bench.trial import forecast
from bench import models
from bench.run import suite
from bench.trial.measure import weight_bytes
from bench.trial.train import train

ROOT = Path(__file__).resolve().parent.parent
CI = ROOT / "results" / "baselines" / "x86_64-2cpu-cpu" / "ci"
QLORA = ROOT / "results" / "reference" / "lora_vs_qlora"
GPU = ROOT / "results" / "reference" / "gpu" / "gpu_7b.json"
TRAIN = {"optimizer": "adamw", "lr": 1e-3, "batch_size": 4, "grad_accum": 1, "epochs": 1, "max_steps": 1, "schedule": "constant",
         "warmup_steps": 0, "weight_decay": 0.0, "momentum": 0.9, "clip": 1.0, "seed": 0}


def _rows(padded: bool | str) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    # packed: four rows in three bins as wide as the longest (24 | 13 + 10 | 9)
    lengths = [24, 10, 13, 9] if padded == "packed" else [24, 24, 24, 17 if padded else 24]
    out = []
    for n in lengths:
        ids = torch.randint(3, 500, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 8 + ids[8:]})
    return out


def _real_step(spec: dict, rows: list[dict], packed: bool = False) -> tuple[dict, dict]:
    """memory.accounted of one real training step, as bench.run.worker records it, and the first batch."""
    loaded = models.load(spec["model"])
    method = methods.get(spec["method"]["name"])
    torch.manual_seed(0)
    adapted = method.apply(loaded.model, method.Config.from_dict(spec["method"]["config"]))
    weights = sum(weight_bytes(adapted.model).values())

    def collate(batch):
        return collate_packed(batch, pad_id=1, width_cost=1.0) if packed else data.collate(batch, pad_id=1)

    result = train(adapted, rows, spec["train"], collate, torch.device("cpu"))
    return {"weights": weights, **{k: result.accounted.get(k, 0) for k in ("grads", "optimizer", "activations")}}, collate(rows)


CASES = [  # (model, dtype, quant, method config, optimizer, padded: True, False or "packed")
    ("synthetic:llama-tiny", "float32", "none", ("lora", {"targets": "qv"}), "adamw", False),
    ("synthetic:llama-tiny", "float32", "none", ("lora", {"targets": "all-linear"}), "adamw", True),
    ("synthetic:llama-tiny", "float32", "none", ("full", {}), "sgd", True),
    ("synthetic:gpt2-tiny", "float32", "none", ("lora", {"targets": "all-linear"}), "adamw", True),
    ("synthetic:gpt2-tiny", "float32", "none", ("top_k", {"k": 1}), "adamw-8bit", False),
    ("synthetic:llama-tiny", "bfloat16", "nf4", ("lora", {"targets": "all-linear"}), "adamw", True),
    ("synthetic:llama-tiny", "bfloat16", "nf4-dq", ("lora", {"targets": "qv"}), "paged-adamw", False),
    ("synthetic:llama-tiny", "float32", "none", ("lora", {"targets": "all-linear"}), "adamw", "packed"),
    ("synthetic:gpt2-tiny", "float32", "none", ("full", {}), "adamw", "packed"),
]


IDS = [f"{c[0][10:]}-{c[2]}-{c[3][0]}-{c[4]}-" + (c[5] if isinstance(c[5], str) else f"pad{int(c[5])}") for c in CASES]


@pytest.mark.parametrize("model,dtype,quant,method,optimizer,padded", CASES, ids=IDS)
def test_meta_step_forecasts_every_accounted_component_of_a_real_step(model, dtype, quant, method, optimizer, padded):
    if quant != "none":
        pytest.importorskip("bitsandbytes")
    m = {"name": model, "dtype": dtype}
    if quant != "none":
        m.update(quant="nf4", double_quant=quant.endswith("-dq"), compute_dtype=dtype)
    spec = {"model": m, "method": {"name": method[0], "config": method[1]}, "train": {**TRAIN, "optimizer": optimizer, "momentum": 0.0}}
    rows = _rows(padded)
    measured, batch = _real_step(spec, rows, packed=padded == "packed")
    f = forecast.forecast(spec, batch=forecast.Batch.of(batch), runtime_bytes=0)
    assert f.activations_from == "meta-forward"
    assert forecast.Batch.of(batch).padded is bool(padded)  # packed rows need a mask at their boundaries
    # The same bytes, not nearly: the meta step runs the very code of the real one.
    assert {k: getattr(f, k) for k in measured} == measured


def test_sgd_without_momentum_keeps_no_state_and_with_momentum_one_buffer():
    spec = {"model": {"name": "synthetic:llama-tiny", "dtype": "float32"}, "method": {"name": "full", "config": {}}, "train": dict(TRAIN)}
    batch = forecast.Batch.tokens(4, 16)
    plain = forecast.forecast({**spec, "train": {**TRAIN, "optimizer": "sgd", "momentum": 0.0}}, batch=batch, runtime_bytes=0)
    heavy = forecast.forecast({**spec, "train": {**TRAIN, "optimizer": "sgd", "momentum": 0.9}}, batch=batch, runtime_bytes=0)
    adamw = forecast.forecast(spec, batch=batch, runtime_bytes=0)
    assert plain.optimizer == 0 and heavy.optimizer == heavy.grads
    n_tensors = len(list(models.skeleton({"name": "synthetic:llama-tiny"}).parameters()))
    assert adamw.optimizer == 2 * adamw.grads + 4 * n_tensors  # exp_avg, exp_avg_sq and a float32 step each


def _trial_files(directory: Path) -> list[Path]:
    return [p for p in sorted(directory.glob("*.json")) if not p.name.startswith(".")]  # .baseline.json is the baseline's own record


def _committed(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in _trial_files(directory)]


def test_forecast_holds_against_the_committed_ci_baselines():
    """Fails when the forecast drifts from the measurements committed in results/baselines."""
    rows = forecast.compare(_committed(CI))
    assert len(rows) == 10 and all("forecast" in r for r in rows)
    errs = [forecast.errors(r) for r in rows]
    assert all(abs(e["accounted"]) <= 0.02 for e in errs), forecast.table(rows, "ci")
    within = sum(abs(e["peak"]) <= 0.10 for e in errs)
    assert within >= 9, forecast.table(rows, "ci")


@pytest.mark.parametrize("base", ["float32", "bfloat16", "nf4", "nf4-dq"])
def test_forecast_holds_against_committed_smollm2_results(base):
    """A few real-model trials (the SmolLM2 skeleton costs no weights): accounted within 2%."""
    want = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
            "nf4": {"quant": "nf4", "double_quant": False}, "nf4-dq": {"quant": "nf4", "double_quant": True}}[base]
    picked = [r for r in _committed(QLORA) if all(r["spec"]["model"].get(k) == v for k, v in want.items())
              and r["spec"]["method"]["name"] == "lora"
              and r["spec"]["method"]["config"]["r"] == 8 and r["spec"]["method"]["config"]["targets"] == "qv"
              and r["spec"]["train"]["optimizer"] == "adamw"]
    assert picked, base
    rows = forecast.compare(picked[:1], forecast.CpuCalibration(0, 0.0))
    assert abs(forecast.errors(rows[0])["accounted"]) <= 0.02, forecast.table(rows, base)


def test_cuda_forecast_on_paper_matches_the_h200_7b_measurement():
    report = json.loads(GPU.read_text())
    for name in ("lora-bf16-qv", "qlora-nf4dq-qv"):
        v = next(x for x in report["variants"] if x["name"] == name)
        spec = {"model": v["model"], "method": v["method"], "train": v["train_spec"]}
        f = forecast.forecast(spec, device="cuda", batch=forecast.Batch.tokens(1, v["seq"]))
        m = v["memory"]["accounted"]
        assert f.weights == m["weights"] and f.grads == m["grads"] and f.optimizer == m["optimizer"], name
        assert abs(f.activations / m["activations"] - 1) <= 0.02, (name, f.activations, m["activations"])
        assert abs(f.peak / v["memory"]["peak_bytes"] - 1) <= 0.05, (name, f.peak, v["memory"]["peak_bytes"])


def test_memory_budget_must_be_positive(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[model]\nname = "synthetic:llama-tiny"\n[data]\ntask = "sst2"\n[run]\nmemory_budget_gb = 0\n'
                    '[[sweep]]\nmethod = "frozen"\n')
    with pytest.raises(suite.SuiteError, match="memory_budget_gb"):
        suite.load(path, check_models=False)


SUITE = """
name = "budget"
[model]
name = "synthetic:llama-tiny"
[data]
task = "sst2"
train_examples = 8
max_length = 32
[train]
batch_size = 4
max_steps = 2
[eval]
tasks = []
forgetting = false
[run]
timeout = 120
threads = 1
memory_budget_gb = {budget}
[[sweep]]
method = "lora"
[[sweep]]
method = "full"
"""


def test_memory_budget_skips_exactly_the_trial_over_it_and_runs_the_others(tmp_path):
    trials = suite.load(_write(tmp_path, 1.0)).trials
    peaks = {t.spec["method"]["name"]: forecast.forecast(t.spec).peak for t in trials}  # as the runner forecasts them
    assert peaks["full"] > peaks["lora"]
    budget = (peaks["full"] + peaks["lora"]) / 2 / forecast.GB
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "run", str(_write(tmp_path, budget)), "--results", str(tmp_path / "r"),
                           "--no-progress"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    found = {json.loads(p.read_text())["spec"]["method"]["name"]: json.loads(p.read_text())
             for p in (tmp_path / "r" / "budget").glob("*.json")}
    assert set(found) == {"lora", "full"}, out
    assert found["lora"]["status"] == "success", out
    stored, measured = found["lora"]["memory"]["forecast"], found["lora"]["memory"]["accounted"]
    assert stored["version"] == forecast.VERSION  # every result stores its forecast, made before loading
    assert {k: stored[k] for k in measured} == measured, (stored, measured)
    skipped = found["full"]
    assert skipped["status"] == forecast.SKIPPED and skipped["train"]["steps"] == 0
    assert "exceeds memory_budget_gb" in skipped["error"] and "breaking component: " in skipped["error"]
    assert skipped["memory"]["forecast"]["peak"] == peaks["full"]
    assert "skipped_memory" in out


def _write(tmp_path: Path, budget: float) -> Path:
    path = tmp_path / "budget.toml"
    path.write_text(SUITE.format(budget=repr(budget)))
    return path


def test_forecast_cli_prints_the_comparison_and_refuses_a_missing_folder(tmp_path):
    picked = tmp_path / "ci"
    picked.mkdir()
    for p in _trial_files(CI)[:2]:
        (picked / p.name).write_text(p.read_text())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    ok = subprocess.run([sys.executable, "-m", "bench.cli", "forecast", str(picked), "-o", str(tmp_path / "f.json")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "accounted within 2%: 2/2" in ok.stdout
    assert len(json.loads((tmp_path / "f.json").read_text())[str(picked)]) == 2
    bad = subprocess.run([sys.executable, "-m", "bench.cli", "forecast", str(tmp_path / "nothing")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nothing" in bad.stderr


def test_report_section_sets_the_stored_forecast_beside_the_measurement():
    import pandas as pd

    from reports import forecast as section

    row = {"label": "lora", "status": "success", "memory.peak_bytes": 2.0e9, "memory.forecast.peak": 1.8e9,
           "memory.forecast.activations_from": "meta-forward"}
    for k, measured, forecast_ in [("weights", 5e8, 5e8), ("grads", 2e6, 2e6), ("optimizer", 4e6, 4e6), ("activations", 6e8, 6.6e8)]:
        row[f"memory.accounted.{k}"], row[f"memory.forecast.{k}"] = measured, forecast_
    s = section.section(pd.DataFrame([row]))
    table = next(b.table for b in s.blocks if b.kind == "table")
    cells = [c.text for c in table.rows[0]]
    assert "+10.0%" in cells and "-10.0%" in cells  # activations over by 10%, peak under by 10%
    empty = section.section(pd.DataFrame([{"label": "x", "status": "success"}]))
    assert "peftbench forecast" in " ".join(b.text for b in empty.blocks)
