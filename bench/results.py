"""Trial result files: one JSON per trial, written to a temp file and renamed, so a crash or a
kill never leaves a partial result. The keys are listed in DESIGN.md section 4."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
STATUSES = ("success", "failed", "oom", "diverged", "timeout", "skipped_memory")
"""skipped_memory: not started, its memory forecast broke [run] memory_budget_gb (bench/forecast.py)."""
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "lm_eval", "datasets", "accelerate", "peftbench")
REPO = Path(__file__).resolve().parent.parent


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
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultFileError(f"{path}: unreadable result file ({exc})") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA or result.get("status") not in STATUSES:
        raise ResultFileError(f"{path}: not a peftbench result of schema {SCHEMA} (keys schema/status wrong)")
    return result


def skeleton(trial, status: str, error: str | None = None) -> dict[str, Any]:
    """A result with every required key; measured values stay None until measured."""
    return {
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


def environment(device_name: str | None = None) -> dict[str, Any]:
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
