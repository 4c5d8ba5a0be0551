"""The method interface: configs, the protocol every method follows, and what `apply` returns.

A method is a small class with a registry name, a version and a typed config; `apply` edits a
model in place (freezing, wrapping layers) and hands back an `Adapted` that tells the one
training loop what to optimise and which hooks to call. Nothing in bench/ knows method names.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Iterator, Protocol, Sequence

import torch
from torch import Tensor, nn

Targets = str | list[str]
"""An alias ("qv", "kv", "attention", "mlp", "all-linear"), a list of aliases or module-name
suffixes, or any other string, read as a regular expression over full module names."""


class ConfigError(ValueError):
    """A config value is wrong; `key` names the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@dataclass(frozen=True, kw_only=True)
class Config:
    """A typed, frozen config read from a TOML table: unknown keys, wrong types and
    out-of-range values are errors that name the field."""

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(key, f"unknown key; {cls.__name__} knows: {', '.join(sorted(known)) or 'none'}")
        try:
            cfg = cls(**values)
        except TypeError as exc:  # a required field is missing
            missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
            raise ConfigError(missing[0] if missing else cls.__name__, f"required ({exc})") from exc
        for f in dataclasses.fields(cls):
            # Annotations are strings under `from __future__ import annotations`, types otherwise.
            hint = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            _check_type(f.name, getattr(cfg, f.name), hint)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Config):
    """Base of every method config; subclasses add fields with a docstring under each."""


_SCALARS: dict[str, Callable[[Any], bool]] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    "list[int]": lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v),
    "Targets": lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def _check_type(name: str, value: Any, hint: str) -> None:
    """Check a value against the string annotation of its field (only the shapes configs use)."""
    options = [h.strip() for h in hint.split("|")]
    if value is None and "None" in options:
        return
    checks = [_SCALARS[o] for o in options if o in _SCALARS]
    if checks and not any(check(value) for check in checks):
        raise ConfigError(name, f"expected {hint}, got {type(value).__name__} {value!r}")
    # TOML spells nan and inf, and both slip through every range check (nan < 0 is False): refused
    # here, once, for every float field of every config.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value}")


@dataclass
class TrainHooks:
    """Method-specific behaviour the training loop calls; every hook is optional."""

    param_groups: Callable[[list[nn.Parameter]], list[dict[str, Any]]] | None = None
    """Turn the trainable list into optimizer param groups (per-tensor learning rates)."""
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None
    """Called after every optimizer step with that step's 0-based global index (restarts, lr rescaling)."""
    lr_multiplier: Callable[[int], float] | None = None
    """A factor on the loop's schedule for the step with this (0-based) global index: jagged
    schedules with restarts multiply the suite's schedule instead of replacing it."""
    on_epoch: Callable[[int, Iterator[dict[str, Tensor]], torch.optim.Optimizer], None] | None = None
    """Called before each epoch's first step with the epoch index, an iterator over the upcoming
    micro-batches (read ahead: training still gets them) and the optimizer. A param group's
    "lr_scale" (default 1) multiplies its scheduled rate; a change applies from this epoch on."""
    report: Callable[[], dict[str, Any]] | None = None
    """What the method did while training, JSON-able (Auto-RGN: its multipliers per epoch); the
    trial result keeps it under method_report."""


@dataclass
class Adapted:
    """What `Method.apply` returns to the runner."""

    model: nn.Module
    trainable: list[nn.Parameter]
    """Exactly the tensors the optimizer updates; the trainable count comes from here."""
    hooks: TrainHooks = field(default_factory=TrainHooks)
    merge_fn: Callable[[], nn.Module] | None = None
    unmerge_fn: Callable[[], nn.Module] | None = None
    state_fn: Callable[[], dict[str, Tensor]] | None = None
    save_fn: Callable[[Path], None] | None = None
    load_fn: Callable[[Path], None] | None = None
    inert: dict[str, str] = field(default_factory=dict)
    """Trainable tensors (qualified names) that the architecture gives a zero gradient in exact
    arithmetic, with the reason; kept trainable (the paper counts them) and reported in the result.
    `methods.layers.inert_parameters` adds what every method shares (key-projection biases)."""

    def merge(self) -> nn.Module:
        if self.merge_fn is None:
            raise NotImplementedError("this method has no merge")
        return self.merge_fn()

    def unmerge(self) -> nn.Module:
        if self.unmerge_fn is None:
            raise NotImplementedError("this method has no unmerge")
        return self.unmerge_fn()

    def state_dict(self) -> dict[str, Tensor]:
        """The adapter only: what differs from the base model."""
        if self.state_fn is not None:
            return self.state_fn()
        ids = {id(p) for p in self.trainable}
        return {n: p.detach() for n, p in self.model.named_parameters() if id(p) in ids}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.save_fn is not None:
            self.save_fn(directory)
        else:
            save_safetensors(self.state_dict(), directory / "adapter.safetensors")
        return directory

    def load(self, directory: str | Path) -> None:
        directory = Path(directory)
        if self.load_fn is not None:
            self.load_fn(directory)
            return
        state = load_safetensors(directory / "adapter.safetensors")
        load_into(self.model, state, source=directory / "adapter.safetensors")


@dataclass(frozen=True)
class MethodContext:
    """What a method gets besides the model and its config when its class sets
    `needs_context = True`: the runner passes it as `apply(model, cfg, context=...)`. Suite
    validation applies methods to a weightless skeleton without one (context=None)."""

    tokenizer: Any
    """The model's tokenizer (a transformers tokenizer)."""
    train: Sequence[tuple[str, str]] = ()
    """The trial task's train split as (prompt, answer) texts, in the format training and
    evaluation use; never eval rows."""
    seed: int = 0
    """The trial's seed, for anything drawn from `train`."""


class Method(Protocol):
    name: ClassVar[str]
    """Registry key, e.g. "lora"."""
    version: ClassVar[str]
    """Bump when behaviour changes: part of the trial id."""
    Config: ClassVar[type[MethodConfig]]

    def apply(self, model: nn.Module, cfg: MethodConfig) -> Adapted:
        """A class with `needs_context: ClassVar[bool] = True` takes `context: MethodContext | None` too.
        One with `packs: ClassVar[bool] = False` trains on padded rows only (bench.trial.loss.packs)."""
        ...


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt or does not fit the model."""


def save_safetensors(state: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise AdapterFileError(f"{path}: adapter file not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise AdapterFileError(f"{path}: not a readable safetensors file ({exc})") from exc


def load_into(model: nn.Module, state: dict[str, Tensor], source: Path | str) -> None:
    """Copy adapter tensors into the model's parameters, checking names and shapes."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        if name not in params:
            raise AdapterFileError(f"{source}: tensor {name!r} has no matching parameter in the model")
        if params[name].shape != value.shape:
            raise AdapterFileError(
                f"{source}: tensor {name!r} has shape {tuple(value.shape)}, the model expects {tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(value.to(params[name].dtype))


def copy_checked(
    params: dict[str, Tensor], state: dict[str, Tensor], path: Path, layers: Iterable[Any] = (), what: str = "adapter"
) -> None:
    """Copy a saved `state` into `params` (same names): an extra, misshapen or missing tensor is an
    AdapterFileError naming the file, raised before anything is copied. Merged `layers` (objects
    with merged, merge(), unmerge()) are unmerged first and merged again after, so that their base
    weights never keep the old update."""
    for key, value in state.items():
        if key not in params:
            raise AdapterFileError(f"{path}: tensor {key!r} has no matching {what} tensor in the model")
        if value.shape != params[key].shape:
            raise AdapterFileError(
                f"{path}: tensor {key!r} has shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)} "
                "(saved with other settings, or for another base model?)"
            )
    missing = sorted(set(params) - set(state))
    if missing:
        raise AdapterFileError(f"{path}: missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state[key].to(param.dtype))
    for layer in merged:
        layer.merge()


def load_trainable(model: nn.Module, trainable: list[nn.Parameter], directory: Path, layers: Sequence[Any] = ()) -> None:
    """Load the adapter.safetensors that Adapted.save wrote into exactly the trainable tensors."""
    path = Path(directory) / "adapter.safetensors"
    ids = {id(p) for p in trainable}
    params = {n: p for n, p in model.named_parameters() if id(p) in ids}
    copy_checked(params, load_safetensors(path), path, layers, what="trainable")


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def read_json(path: Path) -> dict[str, Any]:
    """An adapter's JSON config, or an AdapterFileError naming the file."""
    if not path.exists():
        raise AdapterFileError(f"{path}: adapter config not found")
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: not readable JSON ({exc})") from exc
    if not isinstance(saved, dict):
        raise AdapterFileError(f"{path}: expected a JSON object, got {type(saved).__name__}")
    return saved


def merging(model: nn.Module, layers: Iterable[nn.Module]) -> dict[str, Callable[[], nn.Module]]:
    """Adapted's merge_fn and unmerge_fn for a method whose wrapped layers each merge themselves."""
    layers = list(layers)

    def each(op: str) -> Callable[[], nn.Module]:
        def run() -> nn.Module:
            for layer in layers:
                getattr(layer, op)()
            return model

        return run

    return {"merge_fn": each("merge"), "unmerge_fn": each("unmerge")}


def require_float(params: list[tuple[str, nn.Parameter]], method: str) -> None:
    """Gradients need floating-point tensors: a 4-bit or int8 base cannot be trained directly."""
    for name, p in params:
        if not p.is_floating_point():
            raise ConfigError(
                "model.quant",
                f"{method} trains {name}, which is quantized ({p.dtype}); use a full-precision base "
                '(quant = "none") or an adapter method such as lora',
            )


def require_float_weights(targets: list[tuple[str, nn.Module]], reason: str) -> None:
    """Methods that read the base weight W0 itself (not only the layer's output W0 x) cannot use
    a packed 4-bit or int8 weight: refuse before the model is touched."""
    for name, layer in targets:
        if not layer.weight.is_floating_point():
            raise ConfigError("targets", f"{name} has a quantized weight ({type(layer).__name__}); {reason}")


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
