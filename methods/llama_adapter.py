"""LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention (Zhang et al. 2023, arXiv 2303.16199).

The top `layers` attention layers of a frozen model each gain a trainable adaption prompt P
(prompt_length x hidden). A layer's queries also attend to the prompt's keys and values (its own
frozen key and value projections applied to P, without positions), but those scores are
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

Any architecture whose attention goes through transformers' attention interface takes it (Llama,
Mistral, Qwen2, Gemma-3, Phi, GPT-NeoX, GPT-2, OPT, BERT): the adapted layers run an attention
function registered under a name of its own, which calls the model's own one and adds the gated
prompt attention to its output before the output projection. It gets the queries exactly as the
model computed them (projected, normalised, rotated, scaled: Gemma-3's q_norm, OPT's pre-scaled
queries), and the prompt's keys and values come from the layer's key and value projections as
methods.arch finds them (separate, or the k and v rows of a fused q|k|v projection split by head
counts; a per-head key norm applied as the model does). A model whose attention computes itself
(Falcon) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods.arch import Attention, attention_function, check_attention_interface, layout
from methods.base import Adapted, ConfigError, MethodConfig, freeze
from methods.lora import features

GATES = ("layer", "head")
_BASES: dict[str, str] = {}
"""Our registered attention names -> the attention implementation they wrap."""


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


class AdaptionPrompt(nn.Module):
    """One layer's prompt and gate; `forward` gives the gated prompt attention to add to the
    layer's attention output. It lives on the module that calls the attention function (the
    `caller`: self_attn, BERT's attention.self), whose key and value projections it reads."""

    def __init__(self, caller: nn.Module, attention: Attention, length: int, hidden: int, gate: str):
        super().__init__()
        base = attention.caller
        self.projections = {part: (attention.qkv or getattr(attention, part))[len(base) + 1 :] for part in ("k", "v")}
        self.fused = attention.qkv is not None
        for part in ("k", "v"):
            self.register_buffer(f"{part}_rows", attention.rows(part) if self.fused else None, persistent=False)
        self.heads = attention.heads
        weight = caller.get_submodule(self.projections["k"]).weight
        # Half-precision prompts train poorly; keep them in float32 as LoRA here does.
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        # N(0, 1), as the authors' nn.Embedding and peft start it.
        self.prompt = nn.Parameter(torch.randn(length, hidden, dtype=dtype, device=weight.device))
        self.gate = nn.Parameter(torch.zeros(self.heads.heads if gate == "head" else 1, dtype=dtype, device=weight.device))
        self.per_head = gate == "head"

    def keys_values(self, caller: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The prompt's keys and values, (heads, prompt_length, head_dim) each, kv heads repeated
        for grouped-query attention as repeat_kv does; keys normalised like the model's (k_norm)."""
        prompt = self.prompt.to(dtype)
        h = self.heads
        out = []
        for part in ("k", "v"):
            projected = caller.get_submodule(self.projections[part])(prompt)
            if self.fused:
                projected = projected[:, getattr(self, f"{part}_rows")]
            per_head = projected.view(prompt.shape[0], h.kv_heads, h.head_dim)
            norm = getattr(caller, f"{part}_norm", None)
            if isinstance(norm, nn.Module):  # Gemma-3, Qwen3: a norm over each head, before positions
                per_head = norm(per_head)
            out.append(per_head.transpose(0, 1).repeat_interleave(h.heads // h.kv_heads, dim=0))
        return out[0], out[1]

    def forward(self, caller: nn.Module, query: Tensor, scaling: float) -> Tensor:
        """query (batch, heads, n, head_dim) as the attention function got it -> (batch, n, heads,
        head_dim), the layout attention functions return."""
        key, value = self.keys_values(caller, query.dtype)
        scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        gate = (self.gate.tanh().view(1, -1, 1, 1) if self.per_head else self.gate).to(query.dtype)
        return torch.matmul(gate * probs, value).transpose(1, 2)


def register_prompt_attention(base: str) -> str:
    """Register, once, the attention function that runs the model's own `base` attention and adds
    an adapted layer's prompt attention; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = f"llama_adapter_{base}"
    if name in ALL_ATTENTION_FUNCTIONS:
        return name
    _BASES[name] = base

    def attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, **kwargs: Any):
        out, weights = attention_function(module, base)(module, query, key, value, attention_mask, **kwargs)
        adaption = getattr(module, "adaption", None)
        if adaption is not None:
            scaling = kwargs.get("scaling")
            out = out + adaption(module, query, query.shape[-1] ** -0.5 if scaling is None else scaling).to(out.dtype)
        return out, weights

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


class LlamaAdapter:
    name = "llama_adapter"
    version = "1"
    Config = LlamaAdapterConfig
    init_atol: ClassVar[float] = 0.0  # the zero gate
    battery_configs: ClassVar[list[dict[str, Any]]] = [{"prompt_length": 4, "layers": 1}, {"prompt_length": 3, "layers": 2, "gate": "head"}]
    # Adam moves the zero gate by about lr a step, so 30 steps at 1e-2 barely open it.
    battery_lr: ClassVar[float] = 3e-2

    def apply(self, model: nn.Module, cfg: LlamaAdapterConfig) -> Adapted:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        implementation = check_attention_interface(model, "LLaMA-Adapter")
        base = _BASES.get(implementation, implementation)
        if base not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise ConfigError("model", f"LLaMA-Adapter wraps a registered attention implementation; this model uses {base!r}")
        attentions = [block.attention for block in layout(model).blocks]
        if cfg.layers > len(attentions):
            raise ConfigError("layers", f"{cfg.layers} exceeds the model's {len(attentions)} layers")
        callers = [model.get_submodule(a.caller) for a in attentions]
        if any(hasattr(caller, "adaption") for caller in callers):
            raise ConfigError("model", "already has adaption prompts; apply LLaMA-Adapter once")
        top = list(zip(callers, attentions))[len(attentions) - cfg.layers :]
        for _, attention in top:  # before the model is touched: a fused layout must be splittable
            if attention.qkv is not None:
                attention.rows("k")
        freeze(model)
        trainable: list[nn.Parameter] = []
        for caller, attention in top:
            # The width the key projection reads: the hidden size (OPT-350m embeds in 512, attends in 1024).
            hidden = features(model.get_submodule(attention.k or attention.qkv))[0]
            caller.adaption = AdaptionPrompt(caller, attention, cfg.prompt_length, hidden, cfg.gate)
            trainable += [caller.adaption.prompt, caller.adaption.gate]
        model.set_attn_implementation(register_prompt_attention(base))
        return Adapted(model=model, trainable=trainable)

    def expected_trainable(self, model: nn.Module, cfg: LlamaAdapterConfig) -> int:
        """layers · (prompt_length · hidden + g), g = 1 per layer or the head count per layer ("head" gate)."""
        config = model.config.get_text_config()
        gates = config.num_attention_heads if cfg.gate == "head" else 1
        return cfg.layers * (cfg.prompt_length * config.hidden_size + gates)
