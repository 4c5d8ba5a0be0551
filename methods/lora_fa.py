"""LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning (Zhang et al. 2023, arXiv 2308.03303).

LoRA with the down-projection A frozen at its random init and only B (out x r, zero at init)
trained: h = W x + scaling * B A x. Training B needs only A x (r values per token); training A
would need x itself (in values per token). With A frozen, autograd keeps A and A x but not x, so
the activation memory of the branch drops by a factor in / r. No `no_grad` is needed for that,
and it would be wrong: A x must stay in the graph so that the gradient still reaches x (and every
layer below) through the branch, d(loss)/dx += scaling * A^T B^T g. tests/test_lora_variants.py
checks both: no input-sized tensor is saved for backward, and the input gradients equal LoRA's.

The adapter is a plain LoRA adapter in peft's format, A included (it is random, so it must be
saved for the adapter to reproduce); peft's `PeftModel.from_pretrained` loads it as a LoRA.

Relation to peft: `peft.optimizers.create_lorafa_optimizer` (peft 0.21) freezes the same
`lora_A` tensors and builds `LoraFAOptimizer`, an AdamW (Hugging Face variant: eps added to the
un-corrected second moment, decoupled decay applied after the step) that also replaces B's
gradient g by g (A A^T)^-1 / scaling^2 before the update, so that the low-rank step best
approximates the full fine-tuning step. That projection is not in the 2023 paper, which trains
B with plain AdamW; here the optimizer is the suite's one training loop's, as for every method.
Same model, same forward and same B gradient as peft's LoRA with A frozen (tested).
"""

from __future__ import annotations


from torch import nn

from methods.layers import resolve_targets
from methods.lora import LoRA, LoRAConfig, LoRALinear, features


class LoRAFA(LoRA):
    name = "lora_fa"
    version = "1"

    def wrap(self, layer: nn.Module, cfg: LoRAConfig) -> LoRALinear:
        wrapped = super().wrap(layer, cfg)
        wrapped.lora_A.requires_grad_(False)
        return wrapped

    def expected_trainable(self, model: nn.Module, cfg: LoRAConfig) -> int:
        """r * out per target (B only)."""
        return sum(cfg.r * features(layer)[1] for _, layer in resolve_targets(model, cfg.targets))
