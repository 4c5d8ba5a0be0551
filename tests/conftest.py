"""Shared fixtures: tiny randomly initialised models of the three layouts, built from configs (no downloads)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

# Before anything imports huggingface_hub (transformers is imported lazily below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The suite runs from a checkout, not an installed package: make `import methods` work.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL_KINDS = ("llama", "gpt2", "bert")
VOCAB = 128
SEED = 0


def build_model(kind: str, hidden: int = 32) -> nn.Module:
    """A tiny float32 model in eval mode; the same kind always gets the same weights. `hidden` 64
    gives layers whose widths are whole 64-weight quantization blocks (bench/models/quant.py)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(SEED)
    # Dropout off everywhere so that outputs are comparable between calls.
    if kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=hidden,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=2 * hidden,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=hidden,
                n_layer=2,
                n_head=4,
                vocab_size=VOCAB,
                n_positions=64,
                bos_token_id=VOCAB - 1,
                eos_token_id=VOCAB - 1,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    elif kind == "bert":
        model = BertForSequenceClassification(
            BertConfig(
                hidden_size=hidden,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=2 * hidden,
                vocab_size=VOCAB,
                max_position_embeddings=64,
                num_labels=2,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
        )
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; known: {MODEL_KINDS}")
    return pretrained_like(model).float().eval()


@torch.no_grad()
def pretrained_like(model: nn.Module) -> nn.Module:
    """Norm gains and biases away from their init values (1 and 0), as in any trained model.
    At init, a LayerNorm's outputs sum to exactly zero over features and every bias is zero, so
    some adapter terms (a pooled or summed input, a bias scale) would get a zero gradient in exact
    arithmetic that no real model gives them, and tests would pass or fail on rounding."""
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            module.bias.normal_(0.0, 0.05)
        if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
            module.weight.normal_(1.0, 0.1)
    return model


def make_batch(kind: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict[str, Tensor]:
    """Random token ids with labels, so that `model(**batch).loss` is defined."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if kind == "bert":
        out["labels"] = torch.randint(0, 2, (batch,), generator=gen)
    else:
        out["labels"] = input_ids.clone()
    return out


def logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    with torch.no_grad():
        return model(**batch).logits


def with_4bit_q_proj(model: nn.Module) -> nn.Module:
    """Replace layer 0's q_proj of a tiny Llama by an nf4 bitsandbytes layer (needs bitsandbytes)."""
    import bitsandbytes as bnb

    layer = model.model.layers[0].self_attn.q_proj
    q4 = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q4.weight = bnb.nn.Params4bit(layer.weight.data.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    model.model.layers[0].self_attn.q_proj = q4
    return model


@pytest.fixture(params=MODEL_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each test that takes `kind` runs once per tiny model layout."""
    return request.param


@pytest.fixture
def tiny_model() -> Callable[[str], nn.Module]:
    return build_model


@pytest.fixture
def batch_for() -> Callable[..., dict[str, Tensor]]:
    return make_batch
