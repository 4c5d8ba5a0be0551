"""LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention (Zhang et al. 2023, arXiv 2303.16199).

The top `layers` attention layers of a frozen Llama-layout model each gain a trainable adaption
prompt P (prompt_length x hidden). A layer's queries also attend to the prompt's keys and values
(its own frozen k_proj and v_proj applied to P, without rotary position), but those scores are
softmaxed on their own and multiplied by a zero-initialised gate before they join the ordinary
attention output (the paper's S_g = [softmax(S_K) · g; softmax(S_{M+1})]). With the gate at zero
the model is exactly unchanged at init, and the prompt's influence grows as training opens it.

The gate: the paper writes one factor g_l per layer, and peft's adaption_prompt has one scalar per
layer applied as is ("layer", the default). The authors' code has one gate per head applied
through tanh (OpenGVLab/LLaMA-Adapter, commit 521a09d, alpaca_finetuning_v1/llama/model.py:
`self.gate = zeros(1, n_heads, 1, 1)`, scores scaled by `self.gate.tanh()`): gate = "head", an
option rather than the default so that committed results keep their meaning
(tests/test_prompt_attention_methods.py::test_per_head_gate_is_tanh_of_the_layer_gate pins it).
Both start at exactly zero.

The prompt part needs no cache: it is recomputed for each new query, so generation just works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, MethodConfig, freeze
from methods.layers import blocks

GATES = ("layer", "head")
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True, kw_only=True)
class LlamaAdapterConfig(MethodConfig):
    prompt_length: int = 10
    """Adaption prompt tokens per adapted layer (10 in the paper)."""
    layers: int = 8
    """How many of the topmost layers get a prompt (the paper: 30 of LLaMA-7B's 32)."""
    gate: str = "layer"
    """"layer": one zero-init scalar per layer (paper's g_l, peft); "head": tanh of a zero-init gate per head (the authors' code)."""

    def validate(self) -> None:
        if self.prompt_length < 1:
            raise ConfigError("prompt_length", f"must be >= 1, got {self.prompt_length}")
        if self.layers < 1:
            raise ConfigError("layers", f"must be >= 1, got {self.layers}")
        if self.gate not in GATES:
            raise ConfigError("gate", f"must be one of {', '.join(GATES)}, got {self.gate!r}")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptionPrompt(nn.Module):
    """One layer's prompt and gate; `forward` gives the gated prompt attention to add to the layer's output."""

    def __init__(self, attn: nn.Module, length: int, hidden: int, gate: str):
        super().__init__()
        weight = attn.q_proj.weight
        # Half-precision prompts train poorly; keep them in float32 as LoRA here does.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        heads = attn.config.num_attention_heads
        # N(0, 1), as the authors' nn.Embedding and peft start it.
        self.prompt = nn.Parameter(torch.randn(length, hidden, dtype=dtype, device=weight.device))
        self.gate = nn.Parameter(torch.zeros(heads if gate == "head" else 1, dtype=dtype, device=weight.device))
        self.per_head = gate == "head"

    def forward(self, attn: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
        batch, length, _ = hidden_states.shape
        dtype = hidden_states.dtype
        # The attention module does not hand out its rotated queries: recompute them (one extra q_proj).
        query = attn.q_proj(hidden_states).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query = query * cos + _rotate_half(query) * sin
        prompt = self.prompt.to(dtype)
        # (heads, prompt_length, head_dim); kv heads repeated for grouped-query attention as repeat_kv does.
        key, value = (
            proj(prompt).view(prompt.shape[0], -1, attn.head_dim).transpose(0, 1).repeat_interleave(attn.num_key_value_groups, dim=0)
            for proj in (attn.k_proj, attn.v_proj)
        )
        scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scaling
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        gate = (self.gate.tanh().view(1, -1, 1, 1) if self.per_head else self.gate).to(dtype)
        mixed = torch.matmul(gate * probs, value).transpose(1, 2).reshape(batch, length, -1)
        out = attn.o_proj(mixed)
        # The ordinary attention output already carries o_proj's bias once.
        return out - attn.o_proj.bias if attn.o_proj.bias is not None else out


def _add_prompt_attention(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """Forward hook on a Llama attention module: add the gated prompt attention to its output."""
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    position_embeddings = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    if position_embeddings is None:
        raise RuntimeError(f"{type(module).__name__} was called without position_embeddings; LLaMA-Adapter needs the rotary cos/sin")
    attn_output, *rest = output
    return (attn_output + module.adaption(module, hidden_states, position_embeddings), *rest)


def _check_layout(model: nn.Module) -> list[nn.Module]:
    """The attention modules of a Llama-layout model, or a ConfigError saying what is missing."""
    layers = blocks(model)
    attns = [getattr(block, "self_attn", None) for block in layers]
    first = attns[0]
    missing = [p for p in _PROJECTIONS if not isinstance(getattr(first, p, None), nn.Module)] if first is not None else ["self_attn"]
    missing += [a for a in ("head_dim", "num_key_value_groups", "scaling", "config") if first is not None and not hasattr(first, a)]
    if missing:
        raise ConfigError(
            "model",
            f"LLaMA-Adapter needs the Llama attention layout (self_attn with q_proj, k_proj, v_proj, o_proj and rotary "
            f"embeddings); {type(model).__name__} lacks {', '.join(missing)}",
        )
    if any(hasattr(first, norm) for norm in ("q_norm", "k_norm")):
        # The recomputed queries would skip that normalisation.
        raise ConfigError("model", f"{type(model).__name__} normalises queries and keys; LLaMA-Adapter here supports plain Llama attention")
    return attns


class LlamaAdapter:
    name = "llama_adapter"
    version = "1"
    Config = LlamaAdapterConfig
    init_atol: ClassVar[float] = 0.0  # the zero gate
    battery_configs: ClassVar[list[dict[str, Any]]] = [{"prompt_length": 4, "layers": 1}, {"prompt_length": 3, "layers": 2, "gate": "head"}]
    battery_kinds: ClassVar[tuple[str, ...]] = ("llama",)
    # Adam moves the zero gate by about lr a step, so 30 steps at 1e-2 barely open it.
    battery_lr: ClassVar[float] = 3e-2

    def apply(self, model: nn.Module, cfg: LlamaAdapterConfig) -> Adapted:
        attns = _check_layout(model)
        if cfg.layers > len(attns):
            raise ConfigError("layers", f"{cfg.layers} exceeds the model's {len(attns)} layers")
        if any(hasattr(attn, "adaption") for attn in attns):
            raise ConfigError("model", "already has adaption prompts; apply LLaMA-Adapter once")
        freeze(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        trainable: list[nn.Parameter] = []
        for attn in attns[len(attns) - cfg.layers :]:
            attn.adaption = AdaptionPrompt(attn, cfg.prompt_length, hidden, cfg.gate)
            attn.register_forward_hook(_add_prompt_attention, with_kwargs=True)
            trainable += [attn.adaption.prompt, attn.adaption.gate]
        return Adapted(model=model, trainable=trainable)

    def expected_trainable(self, model: nn.Module, cfg: LlamaAdapterConfig) -> int:
        """layers · (prompt_length · hidden + g), g = 1 per layer or the head count per layer ("head" gate)."""
        config = model.config.get_text_config()
        gates = config.num_attention_heads if cfg.gate == "head" else 1
        return cfg.layers * (cfg.prompt_length * config.hidden_size + gates)
