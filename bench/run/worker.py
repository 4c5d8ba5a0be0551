"""One trial, in its own process: load, adapt, train, measure, evaluate, write the result.

The runner forks this from a server process that has already imported torch, transformers
and lm-eval, so each trial starts in milliseconds yet has its own memory high-water mark, and
a crash or an OOM kill ends this trial only.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (imported here so the fork server preloads it)
import transformers  # noqa: F401

import methods
from bench.regression import calibrate, compare
from bench.trial import inject
from bench.records import results
from bench.trial.loss import packing_cost
from bench.trial.measure import PeakMemory, dir_bytes, param_counts, trial_device, weight_bytes
from bench.trial.train import Diverged, train
from methods.base import MethodContext
from methods.layers import inert_parameters


def _die_with_runner(runner_pid: int) -> None:
    """A trial whose runner was killed must not live on, using the CPU a rerun needs. (It
    could not publish a result anyway: only the runner renames the result into place.)"""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the fork server's death
    except OSError:
        pass

    def watch() -> None:
        while True:
            time.sleep(0.5)
            try:
                os.kill(runner_pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _status_of(exc: BaseException) -> str:
    if isinstance(exc, Diverged):
        return "diverged"
    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return "oom"
    return "failed"


def main(trial, out_path: str, adapters_dir: str | None, show_progress: bool, runner_pid: int, lane=None) -> None:
    """`lane` (bench.run.runner.Lane): the cores and default threads a parallel sweep gives this trial."""
    if lane is not None and lane.cpus:  # before any thread starts: every thread of the trial inherits it
        calibrate.machine_class()  # the machine's CPUs, read (and kept) before the lane pins this process to its share
        os.sched_setaffinity(0, lane.cpus)
    _die_with_runner(runner_pid)
    # Library progress bars (weights loading, lm-eval requests) drown the sweep's own two bars.
    os.environ["TQDM_DISABLE"] = "1"
    import datasets  # its bars read their own switch, not tqdm's

    datasets.disable_progress_bars()
    out = Path(out_path)
    result = results.skeleton(trial, "failed")
    try:
        run(trial, result, Path(adapters_dir) if adapters_dir else None, show_progress, lane)
        result["status"] = "success"
    except BaseException as exc:  # every failure is recorded, then the process ends
        result["status"] = _status_of(exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
    result["runtime"]["wall_s"] = time.perf_counter() - result["runtime"].pop("_t0", time.perf_counter())
    results.write(out, result)


def _base_loss(model, tokenizer, spec: dict[str, Any]) -> float:
    """The base model's held-out loss, cached on disk: it is the same for every trial of a model."""
    from bench.trial.evaluate import forgetting_texts, lm_loss
    from bench.paths import cache_dir

    key = hashlib.sha256(json.dumps([spec["model"], spec["eval"]["forgetting_texts"]], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "base_loss" / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())["loss"]
    loss = lm_loss(model, tokenizer, forgetting_texts(spec["eval"]["forgetting_texts"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # trials side by side may both write it
    tmp.write_text(json.dumps({"loss": loss}))
    tmp.replace(path)
    return loss


def _store_forecast(spec: dict[str, Any], device: torch.device, result: dict[str, Any]) -> None:
    """memory.forecast beside the measurement, computed on the meta device before anything loads;
    the CPU runtime floor is this very process before loading. Its components come from the forecast
    cache when a trial of the same model, method, data and batches (any learning rate) was forecast
    before (bench.trial.forecast memo_key). A forecast that fails is noted, never fatal to the trial."""
    from bench.trial import forecast
    from bench.trial.measure import _proc_status

    start = time.perf_counter()
    try:
        runtime = _proc_status("VmRSS") if device.type == "cpu" else None
        result["memory"]["forecast"] = forecast.forecast(spec, device=device.type, runtime_bytes=runtime, cache=True).to_dict()
    except Exception as exc:  # noqa: BLE001  (the measurement matters more than its forecast)
        result["memory"]["forecast_error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:  # nothing of the forecast stays resident into the measured run
        forecast.clear_caches()
    result["runtime"]["forecast_s"] = time.perf_counter() - start


def _store_utilization(adapted, dataset, collate, device: torch.device, shapes: list[tuple[int, int, int | None]], spec: dict[str, Any],
                        result: dict[str, Any]) -> None:
    """runtime.utilization (bench/trial/flops.py): counted training FLOPs over train_s, against the
    machine's matmul peak, all after the timed window. A count that fails is noted, never fatal."""
    from bench.trial import flops

    rt = result["runtime"]
    start = time.perf_counter()
    try:
        rt["utilization"] = flops.of_trial(adapted, dataset, spec, collate, device, shapes, rt["train_s"])
    except Exception as exc:  # noqa: BLE001  (the trial's measurements matter more than their utilization)
        rt["utilization_error"] = f"{type(exc).__name__}: {exc}"[:500]
    rt["utilization_s"] = time.perf_counter() - start


def run(trial, result: dict[str, Any], adapters_dir: Path | None, show_progress: bool, lane=None) -> None:
    from bench.tasks import data
    from bench import models

    spec = trial.spec
    t = spec["train"]
    rt = result["runtime"]
    rt["_t0"] = time.perf_counter()
    if threads := lane.threads_for(trial) if lane is not None else trial.run.get("threads"):
        torch.set_num_threads(threads)
    device = trial_device()
    result["env"] = results.environment(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    result["env"]["torch_threads"] = torch.get_num_threads()
    result["env"]["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    result["env"]["parallel"] = lane.parallel if lane is not None else None  # None: not the local runner (Ray)
    result["env"]["machine_class"] = calibrate.machine_class()

    _store_forecast(spec, device, result)
    start = time.perf_counter()
    loaded = models.load(spec["model"], seed=t["seed"], device=device)  # quantized there, if asked
    model, tokenizer = loaded.model, loaded.tokenizer
    result["quant"] = loaded.quant
    rt["load_s"] = time.perf_counter() - start

    start = time.perf_counter()
    prepared = data.prepare(spec["data"], tokenizer, seed=t["seed"])
    dataset = prepared.train
    if prepared.info:
        result["data"] = prepared.info
    if loaded.info:
        result["model_info"] = loaded.info
    rt["data_s"] = time.perf_counter() - start

    base_loss = None
    if spec["eval"]["forgetting"] and not loaded.synthetic and tokenizer is not None:
        start = time.perf_counter()
        base_loss = _base_loss(model, tokenizer, spec)
        rt["base_loss_s"] = time.perf_counter() - start

    method = methods.get(spec["method"]["name"])
    extra = {}
    if getattr(method, "needs_context", False):  # methods that turn text into tokens (prompts)
        # The rows it trains on: without the validation rows a tuning trial is scored on.
        rows = data.text_task(spec["data"]["task"], spec["data"]).examples("train", validation=spec["data"].get("validation"))
        extra["context"] = MethodContext(tokenizer, tuple((e.prompt, e.answer) for e in rows), t["seed"])
    torch.manual_seed(t["seed"])  # adapter init is part of the trial's seed
    adapted = method.apply(model, method.Config.from_dict(spec["method"]["config"]), **extra)
    if injected := inject.apply(adapted):  # test-only, off by default: see bench/trial/inject.py
        result["test_injected"] = injected
    result["params"].update(param_counts(adapted.model, adapted.trainable))
    collate = prepared.collate_for(packing_cost(method, adapted.model))
    packed = collate is not prepared.collate
    if inert := inert_parameters(adapted.model, adapted.trainable, adapted.inert):
        result["params"]["inert"] = inert  # trainable, but the architecture gives them no gradient
    weights = weight_bytes(adapted.model)
    result["memory"]["weights_by_dtype"] = weights

    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(desc="  steps", leave=False, position=1, dynamic_ncols=True, disable=False)

    calibration = calibrate.Calibration(device)
    every = trial.run.get("calibrate_every", 1)

    def progress(step: int, total: int, loss: float) -> None:
        if step % every == 0:
            calibration()  # between steps, outside the step timer: see bench/regression/calibrate.py
        if bar is not None:
            bar.total = total
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)

    peak = PeakMemory(device)
    peak.start()
    start = time.perf_counter()
    try:
        trained = train(adapted, dataset, t, collate, device, progress)
    finally:
        if bar is not None:
            bar.close()
        rt["train_s"] = time.perf_counter() - start - calibration.spent
        rt["calibration_s"] = calibration.times
        result["memory"].update(peak.stop())
    result["memory"]["accounted"] = {"weights": sum(weights.values()), "grads": trained.accounted.get("grads", 0),
                                     "optimizer": trained.accounted.get("optimizer", 0),
                                     "activations": trained.accounted.get("activations", 0)}
    result["train"] = {"steps": trained.steps, "loss_curve": trained.loss_curve, "lr_curve": trained.lr_curve, "tokens": trained.tokens,
                       "step_times": trained.step_times, "examples": len(dataset),
                       "optimizer_class": trained.optimizer_class, "optimizer_note": trained.optimizer_note, "logits": trained.logits,
                       "batches": "packed" if packed else "padded"}
    if adapted.hooks.report:
        result["method_report"] = adapted.hooks.report()
    rt["step_s_median"] = trained.step_s_median
    rt["calibration_every"] = every
    rt["step_ratio"] = compare.step_ratio(trained.step_times, calibration.times, every)
    rt["tokens_per_s"] = trained.tokens / rt["train_s"] if trained.steps else None
    _store_utilization(adapted, dataset, collate, device, trained.batch_shapes, spec, result)

    start = time.perf_counter()
    if adapters_dir is not None and adapted.trainable:
        directory = adapters_dir / trial.id
        adapted.save(directory)
        result["params"]["adapter_bytes"] = dir_bytes(directory)
        result["adapter_dir"] = str(directory)
    else:
        result["params"]["adapter_bytes"] = sum(v.numel() * v.element_size() for v in adapted.state_dict().values())
    rt["save_s"] = time.perf_counter() - start

    start = time.perf_counter()
    if not loaded.synthetic:  # random weights have no score worth reporting
        from bench.trial.evaluate import lm_eval_scores, lm_loss, forgetting_texts

        e = spec["eval"]
        if e["tasks"]:
            result["eval"]["lm_eval"] = lm_eval_scores(adapted.model, tokenizer, e["tasks"], e["limit"], e["batch_size"], spec["data"],
                                                        e.get("split", "eval"))
        if base_loss is not None:
            after = lm_loss(adapted.model, tokenizer, forgetting_texts(e["forgetting_texts"]))
            result["eval"]["forgetting"] = after - base_loss
            result["eval"]["heldout_loss"] = {"base": base_loss, "after": after}
        if prepared.scored:
            from bench.tasks.vision import accuracy

            result["eval"]["accuracy"] = {name: accuracy(adapted.model, rows, prepared.collate) for name, rows in prepared.scored.items()}
    rt["eval_s"] = time.perf_counter() - start
