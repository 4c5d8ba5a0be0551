"""Tiny randomly initialised models of ten transformers architectures, built from configs (no downloads).

Hidden width 64 and feed-forward width 128 by default: every linear layer then reads a whole number
of 64-weight blocks, which bitsandbytes' CPU 4-bit kernel needs (bench/models/quant.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from conftest import VOCAB, pretrained_like
from torch import nn

# Grouped-query attention where the architecture has it (2 key/value heads for 4 query heads), so
# that head counts, not just widths, decide every fused split and every count.
_COMMON: dict[str, Any] = {"vocab_size": VOCAB}


def _llama_like(config_name: str, model_name: str, **extra: Any) -> Callable[[int], nn.Module]:
    def build(hidden: int) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(
            hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=2 * hidden,
            max_position_embeddings=64, **_COMMON, **extra,
        )
        return getattr(transformers, model_name)(config)

    return build


def _phi(hidden: int) -> nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    return PhiForCausalLM(PhiConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                                    max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **_COMMON))


def _gpt_neox(hidden: int) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
                                            max_position_embeddings=64, **_COMMON))


def _gpt2(hidden: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=64, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON))


def _falcon(hidden: int) -> nn.Module:
    from transformers import FalconConfig, FalconForCausalLM

    # Falcon-7B's layout: multi-query attention (one key/value head) in one fused projection.
    return FalconForCausalLM(FalconConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, multi_query=True,
                                          hidden_dropout=0.0, attention_dropout=0.0, **_COMMON))


def _opt(hidden: int) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, ffn_dim=2 * hidden,
                                    word_embed_proj_dim=hidden, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, **_COMMON))


def _bert(hidden: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=2,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_COMMON))


BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "llama": _llama_like("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _llama_like("MistralConfig", "MistralForCausalLM"),
    "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM"),
    "gemma3": _llama_like("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16),
    "phi": _phi,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "falcon": _falcon,
    "opt": _opt,
    "bert": _bert,
}
ARCHS = tuple(BUILDERS)


def build_arch(arch: str, hidden: int = 64) -> nn.Module:
    """A tiny float32 model of this architecture in eval mode; the same arch always gets the same weights."""
    torch.manual_seed(0)
    return pretrained_like(BUILDERS[arch](hidden)).float().eval()


def arch_batch(arch: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token ids with labels: next-token labels for causal LMs, class labels for BERT."""
    from conftest import make_batch

    return make_batch("bert" if arch == "bert" else "llama", batch=batch, seq=seq, seed=seed)
