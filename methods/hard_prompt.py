"""Language Models are Few-Shot Learners (Brown et al. 2020, arXiv 2005.14165): hard prompts.

An instruction and k solved examples of the task, drawn with the trial's seed from the task's
train split (never its eval rows), go as text before every input; nothing is trained. The
baseline every trained method has to beat at zero trainable parameters.

The text is tokenized once and its token ids go in through the same `Prefix` mechanism as the
soft prompt (methods/prompt_tuning.py), inside the model's forward: training loss, lm-eval
scores and generation all see the prompt, and the logits keep one row per input position.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, AdapterFileError, ConfigError, MethodConfig, MethodContext, freeze, load_safetensors
from methods.prompt_tuning import Prefix, input_embeddings

WEIGHTS_FILE = "adapter.safetensors"
IDS_KEY = "hard_prompt.input_ids"


@dataclass(frozen=True, kw_only=True)
class HardPromptConfig(MethodConfig):
    instruction: str = ""
    """Text put first, e.g. a description of the task (empty: none)."""
    shots: int = 0
    """Solved examples (prompt + answer) from the task's train split, after the instruction."""
    separator: str = "\n\n"
    """Text between the instruction and the examples, and between the last of them and the input."""
    prompt_ids: list[int] = field(default_factory=list)
    """The whole prompt as token ids instead of instruction and shots (no tokenizer needed)."""

    def validate(self) -> None:
        if self.shots < 0:
            raise ConfigError("shots", f"must be >= 0, got {self.shots}")
        if any(i < 0 for i in self.prompt_ids):
            raise ConfigError("prompt_ids", f"token ids must be >= 0, got {self.prompt_ids}")
        if self.prompt_ids and (self.instruction or self.shots):
            raise ConfigError("prompt_ids", "give either prompt_ids or instruction and shots, not both")
        if not self.prompt_ids and not self.instruction and self.shots == 0:
            raise ConfigError(
                "instruction", "empty with shots = 0: the prompt would be empty (give an instruction, shots >= 1 or prompt_ids)"
            )


def render(cfg: HardPromptConfig, context: MethodContext) -> str:
    """The prompt text: instruction, then `shots` train examples drawn with the context's seed."""
    if cfg.shots > len(context.train):
        raise ConfigError("shots", f"{cfg.shots} exceeds the {len(context.train)} examples of the task's train split")
    picks = random.Random(context.seed).sample(range(len(context.train)), cfg.shots)
    parts = ([cfg.instruction] if cfg.instruction else []) + [prompt + answer for prompt, answer in (context.train[i] for i in picks)]
    return cfg.separator.join(parts) + cfg.separator


class TokenPrompt(Prefix):
    def __init__(self, input_ids: Tensor) -> None:
        super().__init__()
        self.register_buffer("input_ids", input_ids)

    @property
    def n(self) -> int:
        return self.input_ids.shape[0]

    def embeddings(self, embed: nn.Module) -> Tensor:
        return embed(self.input_ids)


class HardPrompt:
    name = "hard_prompt"
    version = "1"
    init_atol: ClassVar[float | None] = None  # the prompt changes every output
    packs: ClassVar[bool] = False  # its prompt goes in front of every row (bench.trial.loss.packs)
    needs_context: ClassVar[bool] = True
    Config = HardPromptConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [{"prompt_ids": [5, 6, 7]}]

    def apply(self, model: nn.Module, cfg: HardPromptConfig, context: MethodContext | None = None) -> Adapted:
        embed = input_embeddings(model)
        if cfg.prompt_ids:
            ids = cfg.prompt_ids
        elif context is not None:
            # Special tokens as for any input: a BOS, if the tokenizer adds one, opens the sequence.
            ids = context.tokenizer(render(cfg, context))["input_ids"]
        elif embed.weight.is_meta:  # suite validation on a skeleton: the runner brings the context later
            ids = []
        else:
            raise ConfigError("instruction", "needs the tokenizer and train examples: apply(model, cfg, context=MethodContext(...))")
        if ids and max(ids) >= embed.num_embeddings:
            raise ConfigError("prompt_ids", f"token id {max(ids)} is outside the model's {embed.num_embeddings}-token vocabulary")
        prompt = TokenPrompt(torch.tensor(ids, dtype=torch.long, device=embed.weight.device))
        freeze(model)
        prompt.attach(model, "hard_prompt")

        def load(directory: Path) -> None:
            # The ids were rendered from a tokenizer and a train split: load what was saved,
            # not what this context would render.
            path = directory / WEIGHTS_FILE
            state = load_safetensors(path)
            if set(state) != {IDS_KEY} or state[IDS_KEY].dim() != 1 or state[IDS_KEY].dtype != torch.long:
                raise AdapterFileError(f"{path}: expected one 1-D int64 tensor {IDS_KEY!r}, got {sorted(state)}")
            saved = state[IDS_KEY]
            if saved.numel() and not 0 <= int(saved.min()) <= int(saved.max()) < embed.num_embeddings:
                raise AdapterFileError(f"{path}: token ids outside the model's {embed.num_embeddings}-token vocabulary")
            prompt.input_ids = saved.to(embed.weight.device)

        return Adapted(model=model, trainable=[], state_fn=lambda: {IDS_KEY: prompt.input_ids}, load_fn=load)

    def expected_trainable(self, model: nn.Module, cfg: HardPromptConfig) -> int:
        """Nothing is trained: 0."""
        return 0
