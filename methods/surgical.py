"""Surgical fine-tuning: tune a chosen subset of blocks, freeze the rest.

Lee, Chen, Tajwar, Kumar, Yao, Liang, Finn, "Surgical Fine-Tuning Improves Adaptation to
Distribution Shifts", ICLR 2023, arXiv 2210.11466. Which blocks to tune follows the kind of
shift: the first block for input-level shifts, middle blocks for feature-level shifts, the last
layer for output-level shifts.

Blocks are the model's repeated units (methods.layers.blocks): the stages of a CNN, the
transformer blocks of a language model. A selection is a list of:

    "first", "middle", "last"                    one block (middle: the central one or two)
    "first-third", "middle-third", "last-third"  a third of the blocks (rounded boundaries)
    "3", "0-9"                                   a block index, or an inclusive index range
    "head"                                       the output head (with the final norm and pooler)
    "embeddings"                                 the input embeddings (transformers)
    "stem"                                       every tensor before the first block (a CNN's stem,
                                                 a transformer's embeddings)

"first" is block 0 alone. The reference's first block includes the stem (anniesch/
surgical-finetuning, main.py, commit effeec3: "first_two_block" tunes model.conv1 and
model.block1 of its WideResNet, conv1 being the stem): that is blocks = ["stem", "first"]. Our
CNN (bench/tasks/vision.py ResNet4) has its stem conv inside stage 0, so there "first" alone is the
reference's choice and "stem" is empty.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from methods.base import Adapted, ConfigError, MethodConfig, freeze, require_float
from methods.layers import blocks, head_parameters

NAMED = ("first", "middle", "last", "first-third", "middle-third", "last-third", "head", "embeddings", "stem")
_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True, kw_only=True)
class SurgicalConfig(MethodConfig):
    blocks: str | list[str] = "first"
    """What to tune: a name (first, middle, last, first-third, middle-third, last-third, head,
    embeddings), a block index ("3") or inclusive range ("0-9"), or a list of these."""

    def validate(self) -> None:
        # Names and indices are checked against the model in apply(), where the error can list
        # the blocks the model has.
        if not selection(self.blocks):
            raise ConfigError("blocks", "empty selection: name at least one block")


def selection(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def block_indices(item: str, n: int) -> list[int]:
    """The block indices a selection item names, for a model with n blocks (raises on out-of-range)."""
    thirds = [round(n * k / 3) for k in range(4)]
    named = {
        "first": [0],
        "last": [n - 1],
        "middle": [(n - 1) // 2, n // 2] if n % 2 == 0 else [n // 2],
        "first-third": list(range(thirds[0], thirds[1])),
        "middle-third": list(range(thirds[1], thirds[2])),
        "last-third": list(range(thirds[2], thirds[3])),
    }
    if item in named:
        return sorted(set(named[item]))
    m = _RANGE.fullmatch(item)
    if m is None:
        raise ConfigError("blocks", f"{item!r} is neither a block name nor an index or range like 3 or 0-9")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
        raise ConfigError("blocks", f"range {item!r} ends before it starts")
    if hi >= n:
        raise ConfigError("blocks", f"{item!r} is outside the model's blocks")
    return list(range(lo, hi + 1))


def describe_blocks(model: nn.Module) -> str:
    """What a model offers, for error messages."""
    layers = blocks(model)
    where = next((name for name, m in model.named_modules() if m is layers), "?")
    return (
        f"{type(model).__name__} has {len(layers)} blocks, indices 0-{len(layers) - 1} ({where}.N, "
        f"{type(layers[0]).__name__}); names: {', '.join(NAMED)}"
    )


def stem_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors registered before the first block's first tensor (what runs before block 0)."""
    first = {id(p) for p in blocks(model)[0].parameters()}
    stem = []
    for p in model.parameters():
        if id(p) in first:
            return stem
        stem.append(p)
    return stem


def chosen_parameters(model: nn.Module, cfg: SurgicalConfig) -> dict[int, nn.Parameter]:
    """The tensors a selection trains, by identity (shared tensors once), in model order."""
    layers = blocks(model)
    chosen: dict[int, nn.Parameter] = {}
    for item in selection(cfg.blocks):
        try:
            if item == "head":
                tensors = head_parameters(model)
            elif item == "embeddings":
                if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
                    raise ConfigError("blocks", "'embeddings': the model has no input embeddings")
                tensors = list(model.get_input_embeddings().parameters())
            elif item == "stem":
                tensors = stem_parameters(model)
            else:
                tensors = [p for i in block_indices(item, len(layers)) for p in layers[i].parameters()]
        except ConfigError as exc:
            raise ConfigError("blocks", f"{exc.message}: {describe_blocks(model)}") from None
        chosen.update({id(p): p for p in tensors})
    order = {id(p): i for i, p in enumerate(model.parameters())}
    return dict(sorted(chosen.items(), key=lambda kv: order.get(kv[0], -1)))


class Surgical:
    name = "surgical"
    version = "1"
    Config = SurgicalConfig
    init_atol: ClassVar[float] = 0.0
    battery_configs: ClassVar[list[dict[str, Any]]] = [{"blocks": "first"}, {"blocks": ["last", "head"]}]

    def apply(self, model: nn.Module, cfg: SurgicalConfig) -> Adapted:
        chosen = chosen_parameters(model, cfg)  # raises before the model is touched
        names = {id(p): n for n, p in model.named_parameters()}
        require_float([(names[i], p) for i, p in chosen.items()], f"{self.name} ({cfg.blocks})")
        freeze(model)
        for p in chosen.values():
            p.requires_grad_(True)
        return Adapted(model=model, trainable=list(chosen.values()))

    def expected_trainable(self, model: nn.Module, cfg: SurgicalConfig) -> int:
        """Sum over the selected blocks' tensors (plus head: output layer, final norm, pooler;
        embeddings: the input embedding matrix), each shared tensor once."""
        layers = list(blocks(model))
        tensors: list[nn.Parameter] = []
        for item in selection(cfg.blocks):
            if item == "head":
                tensors += head_parameters(model)
            elif item == "embeddings":
                tensors += list(model.get_input_embeddings().parameters())
            elif item == "stem":
                tensors += stem_parameters(model)
            else:
                tensors += [p for i in block_indices(item, len(layers)) for p in layers[i].parameters()]
        return sum(p.numel() for p in {id(p): p for p in tensors}.values())
