"""Trial result files: one JSON per trial, written to a temp file and renamed, so a crash or a
kill never leaves a partial result. The keys are listed in DESIGN.md section 4."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.paths import REPO

SCHEMA = 1
STATUSES = ("success", "failed", "oom", "diverged", "timeout", "skipped_memory")
"""skipped_memory: not started, its memory forecast broke [run] memory_budget_gb (bench/trial/forecast.py)."""
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "lm_eval", "datasets", "accelerate", "peftbench")


class ResultFileError(ValueError):
    """A result file that cannot be read."""


def path_for(results_dir: Path, trial_id: str) -> Path:
    return results_dir / f"{trial_id}.json"


def write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def read(path: Path) -> dict[str, Any]:
    """A result file, checked (`check`); anything else is a ResultFileError naming the file."""
    try:
        result = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ResultFileError(f"{path}: unreadable result file ({type(exc).__name__}: {exc})") from None
    check(result, path)
    return result


# The shape of each key a reader uses, where the key is present (hand-made and older results
# lack some). "number" is an int or float, never a bool; "?" admits null.
SHAPES: dict[str, str] = {
    "schema": "int", "trial_id": "str", "suite": "str", "label": "str", "status": "str", "error": "str?",
    **{key: "dict" for key in ("spec", "run", "params", "memory", "runtime", "eval", "train", "env")},
    "spec.model": "dict", "spec.data": "dict", "spec.method": "dict", "spec.train": "dict", "spec.eval": "dict",
    "spec.method.name": "str", "spec.method.version": "str", "spec.method.config": "dict",
    "params.trainable": "int?", "params.total": "int?", "params.adapter_bytes": "int?",
    "memory.peak_bytes": "number?", "memory.peak_delta_bytes": "number?", "memory.accounted": "dict",
    **{f"memory.accounted.{key}": "number?" for key in ("weights", "grads", "optimizer", "activations")},
    **{f"runtime.{key}": "number?" for key in ("train_s", "step_s_median", "tokens_per_s", "eval_s", "step_ratio")},
    "runtime.calibration_s": "durations", "runtime.calibration_every": "count", "runtime.utilization": "dict",
    **{f"runtime.utilization.{key}": "number?" for key in ("train_flops", "achieved_flops_per_s", "peak_flops_per_s", "fraction")},
    "eval.lm_eval": "dict", "eval.forgetting": "number?",
    "train.loss_curve": "numbers", "train.step_times": "durations", "train.steps": "int", "env.machine_class": "str",
}


def _is(value: Any, shape: str) -> bool:
    if shape.endswith("?"):
        return value is None or _is(value, shape[:-1])
    if shape == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if shape == "numbers":
        return isinstance(value, list) and all(v is None or _is(v, "number") for v in value)
    if shape == "count":  # a whole number of things, at least one
        return _is(value, "int") and value >= 1
    if shape == "durations":  # timed seconds: compare divides by them
        return isinstance(value, list) and all(_is(v, "number") and 0 < v < math.inf for v in value)
    return isinstance(value, {"int": int, "str": str, "dict": dict}[shape]) and not isinstance(value, bool)


def check(result: Any, path: Path) -> None:
    """Refuse, naming the file and the key, anything but a result of this schema whose keys have
    the shapes readers rely on (SHAPES; every lm-eval score a number or null)."""
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ResultFileError(f"{path}: not a peftbench result of schema {SCHEMA} (no 'schema': {SCHEMA} in a JSON object)")
    if result.get("status") not in STATUSES:
        raise ResultFileError(f"{path}: key 'status' is {str(result.get('status'))[:40]!r}, expected one of {', '.join(STATUSES)}")
    for key, shape in SHAPES.items():
        node: Any = result
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT and not _is(node, shape):
            raise ResultFileError(f"{path}: key {key!r} is {type(node).__name__} {str(node)[:40]!r}, expected {_SAY[shape]}")
    for task, scores in (result.get("eval") or {}).get("lm_eval", {}).items():
        if not isinstance(scores, dict) or not all(_is(v, "number?") for v in scores.values()):
            raise ResultFileError(f"{path}: key 'eval.lm_eval.{task}' must map metric names to numbers, got {str(scores)[:40]!r}")


_ABSENT = object()
_SAY = {"int": "an integer", "str": "a string", "dict": "a JSON object", "number": "a number", "numbers": "a list of numbers",
        "durations": "a list of positive, finite numbers of seconds", "count": "a whole number >= 1",
        **{f"{k}?": f"{v} or null" for k, v in {"int": "an integer", "str": "a string", "number": "a number"}.items()}}


def skeleton(trial, status: str, error: str | None = None) -> dict[str, Any]:
    """A result with every required key; measured values stay None until measured."""
    tune = {"tune": trial.tune} if getattr(trial, "tune", None) else {}  # a tuning trial's role and choice
    return {
        **tune,
        "schema": SCHEMA,
        "trial_id": trial.id,
        "suite": trial.suite,
        "label": trial.label,
        "status": status,
        "error": error,
        "spec": trial.spec,
        "run": trial.run,
        "synthetic": trial.spec["model"]["name"].startswith("synthetic:"),
        "params": {"trainable": None, "total": None, "adapter_bytes": None},
        "memory": {"peak_bytes": None, "peak_source": None,
                   "accounted": {"weights": None, "grads": None, "optimizer": None, "activations": None}},
        "runtime": {"train_s": None, "step_s_median": None, "tokens_per_s": None, "eval_s": None},
        "eval": {"lm_eval": {}, "forgetting": None},
        "train": {"loss_curve": [], "steps": 0},
        "env": environment(),
    }


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


_FROZEN: dict[str, Any] | None = None
"""environment() as freeze_environment() found it, served from then on in this process."""


def freeze_environment() -> None:
    """Take environment() once and serve that copy for the rest of this process. The fork server
    does it before it forks the sweep's first trial (bench/run/forkserver_warm.py): its trials run
    the code it imported, so the git sha and dirty flag of the sweep's start are theirs, and each
    trial saves four git calls and the package lookups."""
    global _FROZEN
    _FROZEN = None
    _FROZEN = environment()


def environment(device_name: str | None = None) -> dict[str, Any]:
    if _FROZEN is not None:
        return {**_FROZEN, "packages": dict(_FROZEN["packages"]), "device": device_name or _FROZEN["device"]}
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "packages": versions,
        "python": platform.python_version(),
        "device": device_name or _cpu_name(),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())
