"""Suites: a TOML file of defaults and [[sweep]] grids, validated whole, expanded into trials.

    name = "lora_sweep"
    [model]  name = "smollm2-135m"
    [data]   task = "sst2"
    [train]  lr = 1e-3
    [eval]   tasks = ["sst2"]
    [[sweep]]
    method = "lora"
    config = { dropout = 0.0 }                    # fixed method settings
    grid.rank = [{ r = 4, alpha = 8 }, { r = 8, alpha = 16 }]   # a table sets several keys together
    grid.targets = [["qv"], ["all-linear"]]       # a bare key is a method field
    grid."train.optimizer" = ["adamw", "sgd"]     # a dotted key is section.field

Every grid value is a list of choices; the trials are their cartesian product.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import methods
from methods.base import Config, ConfigError

SCHEMA = 1


class SuiteError(ValueError):
    """A suite that cannot run; the message names the file and the key."""

    def __init__(self, path: Path | str, key: str, message: str):
        super().__init__(f"{path}: {key}: {message}")


@dataclass(frozen=True, kw_only=True)
class ModelSpec(Config):
    name: str
    """A packaged model (smollm2-135m, minilm-l6), synthetic:<config>, an HF id or a local path."""
    dtype: str = "float32"
    """Weights and compute dtype: float32, bfloat16 or float16."""
    quant: str = "none"
    """Base quantization with bitsandbytes (bench/models/quant.py): none, nf4, fp4 (4-bit) or int8
    (LLM.int8()). Every linear layer but the output head. QLoRA is lora with quant = "nf4"."""
    double_quant: bool = False
    """4-bit only: quantize the per-block absmax constants again (QLoRA's double quantization)."""
    compute_dtype: str | None = None
    """4-bit only: the dtype 4-bit layers compute in (float32, bfloat16, float16); default: dtype."""

    def validate(self) -> None:
        from bench.models.quant import FOUR_BIT, QUANTS

        dtypes = ("float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            raise ConfigError("dtype", f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quant not in QUANTS:
            raise ConfigError("quant", f"unknown quantization {self.quant!r}{_suggest(self.quant, QUANTS)}")
        # Settings that would do nothing are errors: two spellings of one experiment would
        # otherwise get two trial ids.
        if self.double_quant and self.quant not in FOUR_BIT:
            raise ConfigError("double_quant", f"applies to 4-bit quant (nf4, fp4) only, quant is {self.quant!r}")
        if self.compute_dtype is not None:
            if self.quant not in FOUR_BIT:
                raise ConfigError("compute_dtype", f"applies to 4-bit quant (nf4, fp4) only, quant is {self.quant!r}")
            if self.compute_dtype not in dtypes:
                raise ConfigError("compute_dtype", f"must be float32, bfloat16 or float16, got {self.compute_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        # The quantization fields postdate the first results: left out while unset, so the
        # trial ids of unquantized trials stay what they were and finished trials are kept.
        out = super().to_dict()
        if self.quant == "none":
            for key in ("quant", "double_quant", "compute_dtype"):
                out.pop(key)
        return out


@dataclass(frozen=True, kw_only=True)
class DataSpec(Config):
    """What a trial trains on. A packaged task by name, an image task, or the user's own file:

        [data]
        task = "file:groups_mc.jsonl"   # .jsonl, .csv, .parquet or a datasets folder, next to the suite file
        train_examples = 64
        [eval]
        tasks = ["file:groups_mc.jsonl"]  # scored by lm-eval on its eval rows

    A file's rows are {prompt, answer} (generation: exact match) or {prompt, choices, gold}
    (multiple choice: log-likelihood accuracy); bench/tasks/user.py has the details. The four
    file settings below apply to file tasks only, and stay out of the trial id while unset."""

    task: str
    """Training task: sst2, arc_easy, piqa, boolq, gsm8k (bench/tasks/text.py), an image task
    (bench/tasks/vision.py), or file:<path> (a path relative to the suite file's folder, or absolute)."""
    train_examples: int = 512
    """Training examples drawn from the task's train split."""
    max_length: int = 128
    """Tokens per example; the prompt is cut from the left, the answer kept."""
    eval_file: str | None = None
    """file tasks: a second file of the same kind holding the rows scored (none of them may repeat
    a training prompt). Default: a seeded split of the task's file (or a saved DatasetDict's
    eval/validation/test split)."""
    eval_fraction: float | None = None
    """file tasks without eval_file: the share of rows held out for scoring (default 0.2)."""
    split_seed: int | None = None
    """file tasks without eval_file: the seed of that split (default 0; the same for every trial,
    whatever train.seed is)."""
    extract: str | None = None
    """file generation tasks: a regular expression (at most one group) that picks the part of the
    generated text and of the answer that exact match compares, e.g. "(-?[0-9]+)"; default: the
    whole text, stripped."""
    suite_dir: str | None = None
    """Set by the loader, not in a suite: the suite file's folder (absolute), which relative file
    paths are relative to. Outside the trial id (trial_id), so ids are the same from any folder."""

    validation: int | None = None
    """Text tasks: rows carved from the train split, by a fixed seed, for tuning ([tune] sets it): the
    trial trains on the rest, and search trials are scored on them (eval.split = "validation").
    None: the whole train split is drawn from."""

    def validate(self) -> None:
        if self.validation is not None and self.validation < 1:
            raise ConfigError("validation", f"must be >= 1, got {self.validation}")
        if self.train_examples < 1:
            raise ConfigError("train_examples", f"must be >= 1, got {self.train_examples}")
        if self.max_length < 8:
            raise ConfigError("max_length", f"must be >= 8, got {self.max_length}")
        for key in _FILE_SETTINGS:
            if getattr(self, key) is not None and not self.task.startswith("file:"):
                raise ConfigError(key, f"applies to file:<path> tasks only, task is {self.task!r}")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ConfigError("eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")
        if self.eval_file is not None and (self.eval_fraction is not None or self.split_seed is not None):
            raise ConfigError("eval_file", "names the eval rows: eval_fraction and split_seed would do nothing")
        from bench.tasks.user import located, missing

        for key, value in (("task", self.task.removeprefix("file:") if self.task.startswith("file:") else None),
                           ("eval_file", self.eval_file)):
            if value is not None and not located(value, self.suite_dir).exists():
                raise ConfigError(key, missing(value, located(value, self.suite_dir)))

    def to_dict(self) -> dict[str, Any]:
        # The file settings postdate the first results: left out while unset, so the trial ids
        # of packaged-task trials stay what they were.
        out = super().to_dict()
        for key in (*_FILE_SETTINGS, "validation", "suite_dir"):
            if out[key] is None:
                out.pop(key)
        if self.task.startswith("file:"):
            # A file's rows are part of the experiment: an edited file makes new trials, never
            # "already successful" ones.
            from bench.tasks.user import digest

            out["sha256"] = digest(self.task, self.eval_file, self.suite_dir)
        return out


_FILE_SETTINGS = ("eval_file", "eval_fraction", "split_seed", "extract")


@dataclass(frozen=True, kw_only=True)
class TrainSpec(Config):
    optimizer: str = "adamw"
    """adamw, sgd (with momentum), or bitsandbytes' adamw-8bit, paged-adamw, paged-adamw-8bit
    (paged needs CUDA: elsewhere the non-paged optimizer runs and the result says so)."""
    lr: float = 1e-4
    """Peak learning rate."""
    batch_size: int = 4
    """Examples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    epochs: int = 1
    """Passes over the training examples (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps; overrides epochs."""
    schedule: str = "cosine"
    """constant, linear or cosine, after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    """Decoupled weight decay (adamw) or L2 (sgd)."""
    momentum: float = 0.9
    """SGD momentum."""
    clip: float | None = 1.0
    """Gradient-norm clipping threshold; none disables it."""
    seed: int = 0
    """Seed for data order, dropout and adapter init."""

    def validate(self) -> None:
        from bench.trial.train import OPTIMIZERS, SCHEDULES

        if self.optimizer not in OPTIMIZERS:
            raise ConfigError("optimizer", f"unknown optimizer {self.optimizer!r}{_suggest(self.optimizer, OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError("schedule", f"unknown schedule {self.schedule!r}{_suggest(self.schedule, SCHEDULES)}")
        for name in ("lr", "batch_size", "grad_accum", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError("max_steps", f"must be >= 1, got {self.max_steps}")
        if self.clip is not None and self.clip <= 0:
            raise ConfigError("clip", f"must be > 0, got {self.clip}")


@dataclass(frozen=True, kw_only=True)
class EvalSpec(Config):
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks: the packaged text tasks, or a file:<path> task (empty: no lm-eval run)."""
    limit: int | None = None
    """Evaluate only the first `limit` rows of each task."""
    batch_size: int = 16
    """lm-eval batch size."""
    forgetting: bool = True
    """Measure the held-out LM loss change against the base model."""
    forgetting_texts: int = 32
    """Held-out passages for the forgetting measure."""
    split: str = "eval"
    """Rows scored: eval (the held-out rows), or validation (the rows [data] validation carves from the
    train split: a tuning search trial's, scored on its own task only)."""

    def validate(self) -> None:
        if self.split not in ("eval", "validation"):
            raise ConfigError("split", f"must be eval or validation, got {self.split!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.split == "eval":  # postdates the first results: absent by default, so their ids hold
            out.pop("split")
        return out


@dataclass(frozen=True, kw_only=True)
class RunSpec(Config):
    timeout: float = 3600.0
    """Seconds before a trial's process is killed and recorded as timeout."""
    threads: int | None = None
    """torch threads per trial (default: all cores; with parallel N, each trial's share: cores // N).
    1 keeps timings sane on a shared machine."""
    calibrate_every: int = 1
    """Time the runtime calibration (bench/regression/calibrate.py) after every Nth training step only,
    not after each: for steps so short that a calibration after each would cost a large share of the
    sweep (surgical's CNN steps). Recorded as runtime.calibration_every; the regression suite keeps 1."""
    parallel: int = 1
    """The local runner's trials at once, each in its own process pinned to its own cores (this
    machine's cores split N ways). The suite's setting, not a trial's: the same in every block."""
    cpus: float | None = None
    """--backend ray: CPUs a trial reserves on its node (default: threads, else 1)."""
    gpus: float = 0.0
    """--backend ray: GPUs a trial reserves; a fraction packs several trials on one GPU."""
    memory_gb: float | None = None
    """--backend ray: host memory a trial reserves, in GB; Ray schedules by it but does not cap it."""
    memory_budget_gb: float | None = None
    """Skip, before it starts, a trial whose memory forecast (bench/trial/forecast.py: its peak on this
    machine's device) exceeds this many GB (1e9 bytes); it is recorded with status skipped_memory and
    the component that breaks the budget. Unlike memory_gb (a Ray reservation) this is a cap."""
    retries: int = 0
    """--backend ray: reruns of a trial whose Ray worker or node died under it (not of one that
    failed, ran out of memory or timed out on its own)."""
    track: list[str] = field(default_factory=list)
    """Trackers each published trial is copied to (bench/records/track.py): mlflow, tensorboard. Needs the
    track extra; `peftbench run --track` overrides it."""
    tracking_uri: str | None = None
    """MLflow tracking URI (a server, sqlite:///...); default: results/<suite>/tracking/mlflow.db."""

    def validate(self) -> None:
        from bench.records.track import TRACKERS

        for name in self.track:
            if name not in TRACKERS:
                raise ConfigError("track", f"unknown tracker {name!r}{_suggest(name, TRACKERS)}")
        if len(set(self.track)) != len(self.track):
            raise ConfigError("track", f"names a tracker twice: {self.track}")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise ConfigError("tracking_uri", "must not be empty")
        if self.timeout <= 0:
            raise ConfigError("timeout", f"must be > 0, got {self.timeout}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("threads", f"must be >= 1, got {self.threads}")
        if self.calibrate_every < 1:
            raise ConfigError("calibrate_every", f"must be >= 1 (training steps per calibration), got {self.calibrate_every}")
        if self.parallel < 1:
            raise ConfigError("parallel", f"must be >= 1 (trials at once), got {self.parallel}")
        if self.cpus is not None and self.cpus <= 0:
            raise ConfigError("cpus", f"must be > 0, got {self.cpus}")
        if self.gpus < 0 or (self.gpus > 1 and self.gpus != int(self.gpus)):
            raise ConfigError("gpus", f"must be >= 0, and a whole number above 1, got {self.gpus}")
        if self.memory_gb is not None and self.memory_gb <= 0:
            raise ConfigError("memory_gb", f"must be > 0, got {self.memory_gb}")
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ConfigError("memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        if self.retries < 0:
            raise ConfigError("retries", f"must be >= 0, got {self.retries}")


SECTIONS: dict[str, type[Config]] = {"model": ModelSpec, "data": DataSpec, "train": TrainSpec, "eval": EvalSpec, "run": RunSpec}
# Sections that define the experiment; [run] only says how to run it, so it stays out of the id.
ID_SECTIONS = ("model", "data", "method", "train", "eval")


def _suggest(name: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=2)
    return f"; did you mean {' or '.join(map(repr, close))}?" if close else f" (known: {', '.join(known)})"


@dataclass(frozen=True)
class Trial:
    suite: str
    spec: dict[str, Any]
    """Resolved sections plus method {name, version, config}; the experiment, fully."""
    run: dict[str, Any]
    tune: dict[str, Any] | None = None
    """A tuning trial's role (search or final), its study and how it was tuned (bench/run/tune.py);
    outside the id, like run."""

    @property
    def id(self) -> str:
        return trial_id(self.spec)

    @property
    def label(self) -> str:
        m = self.spec["method"]
        cfg = ",".join(f"{k}={_short(v)}" for k, v in m["config"].items())
        t = self.spec["train"]
        base = self.spec["model"]
        # The base's precision only when it is not the default, so older labels read as before.
        quant = base.get("quant", "none")
        precision = "" if quant == "none" else f" {quant}{'-dq' if base.get('double_quant') else ''}"
        if base["dtype"] != "float32" or precision:
            precision = f" [{base['dtype']}{precision}]"
        role = ""
        if self.tune:  # search trials differ in their searched settings, which the label must show
            role = f" {self.tune['role']}" + (f"{self.tune['index']}" if self.tune["role"] == "search" else "")
            role += "".join(f" {k.rpartition('.')[2]}={v:.3g}" if isinstance(v, float) else f" {k.rpartition('.')[2]}={_short(v)}"
                            for k, v in self.tune["params"].items())
        return f"{m['name']}({cfg}){precision} {t['optimizer']} ep{t['epochs']} seed{t['seed']}{role}"


def _short(v: Any) -> str:
    return "+".join(map(str, v)) if isinstance(v, list) else str(v)


def trial_id(spec: dict[str, Any]) -> str:
    sections = {k: spec[k] for k in ID_SECTIONS}
    # Where the suite file lies says where its data files are, not what the experiment is: the
    # file task's path as written and its sha256 stay in the id, the folder does not.
    sections["data"] = {k: v for k, v in sections["data"].items() if k != "suite_dir"}
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class Suite:
    name: str
    path: Path
    trials: list[Trial]
    studies: list = field(default_factory=list)
    """Tuned blocks' grid points (bench/run/tune.py Study): their trials are made as the search goes."""


def load(path: str | Path, check_models: bool = True) -> Suite:
    """Parse, validate and expand a suite; any problem raises SuiteError naming file and key."""
    path = Path(path)
    text = read_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(path, _toml_key(text, exc), f"invalid TOML: {exc}") from None
    known = {"name", "sweep", "tune", *SECTIONS}
    for key in raw:
        if key not in known:
            raise SuiteError(path, key, f"unknown top-level key{_suggest(key, sorted(known))}")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name):
        raise SuiteError(path, "name", f"must be a plain name (letters, digits, . _ -), got {name!r}")
    defaults = {}
    for section in SECTIONS:
        value = raw.get(section, {})
        if not isinstance(value, dict):
            raise SuiteError(path, section, f"must be a table, got {type(value).__name__}")
        defaults[section] = value
    sweeps = raw.get("sweep")
    if not isinstance(sweeps, list) or not sweeps:
        raise SuiteError(path, "sweep", "needs at least one [[sweep]] block")
    top_tune = raw.get("tune")
    if top_tune is not None and not isinstance(top_tune, dict):
        raise SuiteError(path, "tune", f"must be a table, got {type(top_tune).__name__}")
    trials: list[Trial] = []
    studies: list = []
    seen: set[str] = set()
    for i, block in enumerate(sweeps):
        if isinstance(block, dict) and (tuned := _studies(path, f"sweep[{i}]", block, defaults, name, top_tune)) is not None:
            studies += tuned
            continue
        for trial in _expand(path, f"sweep[{i}]", block, defaults, name):
            if trial.id not in seen:  # the same trial named twice runs once
                seen.add(trial.id)
                trials.append(trial)
    from bench.run import tune

    if problem := tune.check_equal_budgets(path, studies):
        raise SuiteError(path, *problem)
    if check_models:
        _check_against_models(path, trials + [t for study in studies for t in study.corners()])
    return Suite(name=name, path=path, trials=trials, studies=studies)


def _studies(path: Path, where: str, block: dict[str, Any], defaults: dict[str, dict], suite: str,
             top: dict[str, Any] | None) -> list | None:
    """A tuned block's studies, one per grid point (bench/run/tune.py); None for an untuned block."""
    from bench.run import tune

    own = block.get("tune")
    if own is not None and own is not False and not isinstance(own, dict):
        raise SuiteError(path, f"{where}.tune", "must be a table, or false for an untuned block")
    settings = tune.merged(top, own)
    if settings is None:
        return None
    key = "tune" if own is None else f"{where}.tune"
    try:
        spec = tune.parse(settings)
    except tune.TuneError as exc:
        raise SuiteError(path, f"{key}.{exc.key}", exc.message) from None
    grid = block.get("grid", {})
    if not isinstance(grid, dict):
        raise SuiteError(path, f"{where}.grid", "must be a table of lists")
    for dim in spec.space:
        if dim.key in grid:
            raise SuiteError(path, f"{key}.space.{dim.key}", f"also a grid key of {where}: a setting is searched or swept, not both")
    _expand(path, where, block, defaults, suite)  # the block itself, checked as an untuned one would be
    bare = {k: v for k, v in block.items() if k not in ("grid", "tune")}
    studies = []
    for n, point in enumerate(tune.grid_points(grid)):
        def expand(extra: dict[str, Any], point=point) -> Trial:
            (trial,) = _expand(path, where, {**bare, "grid": {**point, "_tune": [extra]}}, defaults, suite)
            return trial

        studies.append(tune.Study(f"{where}" + (f" point {n}" if grid else ""), spec, expand))
    return studies


def read_text(path: Path) -> str:
    """A suite file's text, or a SuiteError saying why it cannot be read."""
    if not path.exists():
        raise SuiteError(path, "-", "file not found")
    if path.is_dir():
        raise SuiteError(path, "-", "is a folder, not a suite file (pass a .toml file)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SuiteError(path, "-", f"cannot read the file ({exc.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise SuiteError(path, f"line {line}", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                                                "a suite is a TOML text file") from None


def _toml_key(text: str, exc: Exception) -> str:
    """The line a TOML error points at, which names the key in most cases."""
    m = re.search(r"line (\d+)", str(exc))
    if not m:
        return "-"
    lines = text.splitlines()
    n = int(m.group(1))
    line = lines[n - 1].strip() if 0 < n <= len(lines) else ""
    return f"line {n} `{line[:60]}`"


def _expand(path: Path, where: str, block: Any, defaults: dict[str, dict], suite: str) -> list[Trial]:
    if not isinstance(block, dict):
        raise SuiteError(path, where, "must be a table")
    for key in block:
        if key not in ("method", "config", "grid", "tune", *SECTIONS):
            raise SuiteError(path, f"{where}.{key}", "unknown key; a sweep takes method, config, grid and section overrides")
    name = block.get("method")
    if not isinstance(name, str):
        raise SuiteError(path, f"{where}.method", "required: the name of a registered method")
    try:
        method = methods.get(name)
    except methods.UnknownMethod as exc:
        raise SuiteError(path, f"{where}.method", str(exc)) from None
    fixed = block.get("config", {})
    if not isinstance(fixed, dict):
        raise SuiteError(path, f"{where}.config", "must be a table of method settings")
    grid = block.get("grid", {})
    if not isinstance(grid, dict):
        raise SuiteError(path, f"{where}.grid", "must be a table of lists")
    axes: list[list[dict[str, Any]]] = []
    for key, choices in grid.items():
        if not isinstance(choices, list):
            raise SuiteError(path, f"{where}.grid.{key}", f"must be a list of choices, got {type(choices).__name__}")
        if not choices:
            raise SuiteError(path, f"{where}.grid.{key}", "empty list: a grid axis needs at least one choice")
        # A table choice sets several keys at once (r and alpha together, say).
        axes.append([c if isinstance(c, dict) else {key: c} for c in choices])
    trials = []
    for combo in itertools.product(*axes) if axes else [()]:
        sections = copy.deepcopy(defaults)
        for section in SECTIONS:
            override = block.get(section, {})
            if not isinstance(override, dict):
                raise SuiteError(path, f"{where}.{section}", "must be a table")
            sections[section].update(override)
        cfg = dict(fixed)
        for choice in combo:
            for key, value in choice.items():
                if "." in key:
                    section, _, field_name = key.partition(".")
                    if section not in SECTIONS:
                        raise SuiteError(path, f"{where}.grid.{key}", f"unknown section {section!r}{_suggest(section, SECTIONS)}")
                    sections[section][field_name] = value
                else:
                    cfg[key] = value
        if "suite_dir" in sections["data"]:
            raise SuiteError(path, f"data.suite_dir (in {where})", "set by peftbench (the suite file's folder), not in a suite")
        if any(str(t).startswith("file:") for t in [sections["data"].get("task"), *_listed(sections["eval"].get("tasks"))]):
            # A file task's relative path is relative to the suite file, wherever peftbench runs.
            sections["data"]["suite_dir"] = str(path.resolve().parent)
        resolved: dict[str, Any] = {}
        for section, spec_cls in SECTIONS.items():
            try:
                resolved[section] = spec_cls.from_dict(sections[section]).to_dict()
            except ConfigError as exc:
                raise SuiteError(path, f"{section}.{exc.key} (in {where})", exc.message) from None
        try:
            method_cfg = method.Config.from_dict(cfg)
        except ConfigError as exc:
            raise SuiteError(path, f"{where}.{exc.key}", exc.message) from None
        run = resolved.pop("run")
        resolved["method"] = {"name": method.name, "version": method.version, "config": method_cfg.to_dict()}
        trials.append(Trial(suite=suite, spec=resolved, run=run))
    return trials


def _listed(value: Any) -> list[Any]:
    """[eval] tasks as a list, before it is checked to be one."""
    return value if isinstance(value, list) else []


def _check_against_models(path: Path, trials: list[Trial]) -> None:
    """Apply each trial's method to a weightless (meta) copy of its model: catches targets
    that match nothing, k beyond the block count, ranks beyond a layer's size, unknown models;
    and asks each task for its size: more training examples than it has. All before anything runs."""
    from bench.tasks import data, vision
    from bench.tasks.text import TextTask

    for trial in trials:
        spec = trial.spec
        if spec["model"].get("quant", "none") != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise SuiteError(path, "model.quant", f"{spec['model']['quant']!r} needs bitsandbytes, which is not installed")
        if problem := _model_problem(json.dumps(spec["model"], sort_keys=True), json.dumps(spec["method"], sort_keys=True)):
            raise SuiteError(path, *problem)
        task_name = spec["data"]["task"]
        try:  # a file task reads and checks every row here
            task = data.get_task(task_name, spec["data"])
        except data.DataError as exc:
            raise SuiteError(path, "data.task", str(exc)) from None
        if problem := vision.mismatch(spec["model"]["name"], task_name, spec["eval"]["tasks"]):
            raise SuiteError(path, "data.task", problem)
        if spec["data"].get("validation") is not None and not isinstance(task, TextTask):
            raise SuiteError(path, "data.validation", f"task {task_name!r} has no text train rows to carve validation rows from")
        if spec["eval"].get("split") == "validation" and (spec["data"].get("validation") is None or spec["eval"]["tasks"] != [task_name]):
            raise SuiteError(path, "eval.split", "validation rows are scored for the trial's own task only, "
                                                 "with [data] validation set (tuning search trials do this)")
        try:
            if problem := task.check(spec["data"]):
                raise SuiteError(path, *problem)
        except data.DataError as exc:
            raise SuiteError(path, "data.task", str(exc)) from None
        for name in spec["eval"]["tasks"]:
            try:
                scored = data.get_task(name, spec["data"])
            except data.DataError as exc:
                raise SuiteError(path, "eval.tasks", str(exc)) from None
            if not scored.lm_eval:
                raise SuiteError(path, "eval.tasks", f"{name!r} is not an lm-eval task{_suggest(name, data.TASKS)}")


@functools.lru_cache(maxsize=1024)
def _model_problem(model: str, method_spec: str) -> tuple[str, str] | None:
    """(key, message) when the method cannot be applied to the model, else None. Keyed by the
    JSON of both specs: a sweep repeats each (model, method config) pair for every optimizer,
    learning rate and seed, and applying a method to a skeleton is the slow part of validation."""
    from bench import models

    try:
        skeleton = models.skeleton(json.loads(model))
    except models.ModelError as exc:
        return "model.name", str(exc)
    spec = json.loads(method_spec)
    method = methods.get(spec["name"])
    try:
        method.apply(skeleton, method.Config.from_dict(spec["config"]))
    except ConfigError as exc:
        return f"method {spec['name']}: {exc.key}", exc.message
    return None


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
