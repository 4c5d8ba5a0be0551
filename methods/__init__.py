"""Registry of PEFT methods: name -> "module:Class", imported only when asked for."""

from __future__ import annotations

import difflib
import importlib
from functools import cache

from methods.base import Adapted, ConfigError, Method, MethodConfig, TrainHooks

REGISTRY: dict[str, str] = {
    "full": "methods.full:Full",
    "frozen": "methods.frozen:Frozen",
    "top_k": "methods.top_k:TopK",
    "surgical": "methods.surgical:Surgical",
    "auto_rgn": "methods.auto_rgn:AutoRGN",
    "lora": "methods.lora:LoRA",
    "loftq": "methods.loftq:LoftQ",
    "qalora": "methods.qalora:QALoRA",
    "lqlora": "methods.lqlora:LQLoRA",
    "lora_fa": "methods.lora_fa:LoRAFA",
    "dora": "methods.dora:DoRA",
    "vera": "methods.vera:VeRA",
    "tied_lora": "methods.tied_lora:TiedLoRA",
    "prompt_tuning": "methods.prompt_tuning:PromptTuning",
    "hard_prompt": "methods.hard_prompt:HardPrompt",
    "bottleneck_adapter": "methods.adapters:Bottleneck",
    "ia3": "methods.ia3:IA3",
    "glora": "methods.glora:GLoRA",
    "multilora": "methods.multilora:MultiLoRA",
    "prefix_tuning": "methods.prefix_tuning:PrefixTuning",
    "llama_adapter": "methods.llama_adapter:LlamaAdapter",
    "relora": "methods.relora:ReLoRA",
    "longlora": "methods.longlora:LongLoRA",
}


class UnknownMethod(KeyError):
    def __init__(self, name: str):
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        super().__init__(f"unknown method {name!r}{hint} (known: {', '.join(sorted(REGISTRY))})")
        self.name = name

    def __str__(self) -> str:
        return self.args[0]


@cache
def get(name: str) -> Method:
    if name not in REGISTRY:
        raise UnknownMethod(name)
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def names() -> list[str]:
    return sorted(REGISTRY)


__all__ = ["Adapted", "ConfigError", "Method", "MethodConfig", "TrainHooks", "REGISTRY", "UnknownMethod", "get", "names"]
