"""The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al. 2021, arXiv 2104.08691).

A soft prompt P, n trainable "virtual token" embeddings (n x hidden), goes before the embedded
input of every sequence; the whole model stays frozen. The paper's three inits (§3): random
uniform in [-0.5, 0.5]; embeddings of tokens sampled from the 5,000 most common of the
vocabulary; embeddings of a text's tokens (its class labels), here repeated or cut to n.

"Most common" is, in the paper, T5's SentencePiece vocabulary, which lists pieces by likelihood,
and the authors' code draws from its first 5,000 rows (google-research/prompt-tuning, commit
72285ee: prompt_tuning/prompts.py `from_sample_of_embeddings` "limit the drawing to the first
`population_size` vectors", configs/prompts/from_sampled_vocab.gin population_size = 5000).
vocab_top does the same with the model's own vocabulary; a byte-level BPE vocabulary (GPT-2,
Llama) is ordered by merge, which only roughly follows frequency. Two differences, documented
rather than changed: the paper's default prompt is 100 tokens (Figure 3's caption: "a prompt
length of 100 tokens"; the authors' configs/models/t5_1_1_prompt.gin PROMPT_LENGTH = 100), ours
20 (set n_tokens = 100 for the paper's), and its class-label init fills the tokens the labels do
not cover by sampling the vocabulary (configs/prompts/from_class_labels.gin), where "text" here
repeats the text.

`Prefix` is the mechanism, shared with the hard prompt (methods/hard_prompt.py): a submodule of
the model plus a forward pre-hook and a forward hook on the model itself, so that the training
loop, `generate` and lm-eval all call the same, ordinary model object. On a forward whose cache
is empty the prefix goes in: embeddings [P; E x], attention mask [1; m], labels [-100; y],
position ids [0..n-1; p + n]. On a later forward the cache already holds the prefix, so only
the mask and the position ids are extended. The logits of the prefix are dropped: the model
returns exactly one logit row per input position, as without the prompt (peft keeps them).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.base import Adapted, ConfigError, MethodConfig, MethodContext, freeze

INITS = ("random", "vocab", "text")


class Prefix(nn.Module):
    """Embeddings put before every sequence the model reads, and taken off the logits it returns."""

    prepends_positions = True
    """The model's loss also scores the input's first token, from the prefix's last position, which
    a choice of positions over the input cannot name: bench.trial.loss chooses positions over the
    prefix and the input together (`n` + the input's length), and rows are never packed."""

    def __init__(self) -> None:
        super().__init__()
        self._length = 0  # input length of the forward in flight, between the two hooks
        self._positional: tuple[str, ...] = ()

    def embeddings(self, embed: nn.Module) -> Tensor:
        """The prefix as an (n, hidden) tensor; `embed` is the model's input embedding layer."""
        raise NotImplementedError

    @property
    def n(self) -> int:
        raise NotImplementedError

    def attach(self, model: nn.Module, name: str) -> None:
        model.add_module(name, self)
        # Positional arguments become keywords, so that the hook finds input_ids wherever it sits.
        self._positional = tuple(inspect.signature(model.forward).parameters)
        model.register_forward_pre_hook(self._before, with_kwargs=True)
        model.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = {**dict(zip(self._positional, args)), **kwargs}
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise ValueError(f"{type(self).__name__}: the model was called without input_ids or inputs_embeds")
        batch, length = (ids if embeds is None else embeds).shape[:2]
        self._length, n = length, self.n
        if n == 0:
            return (), kwargs
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            embed = model.get_input_embeddings()
            embeds = embed(ids) if embeds is None else embeds
            prompt = self.embeddings(embed).to(embeds.dtype).expand(batch, -1, -1)
            kwargs.update(input_ids=None, inputs_embeds=torch.cat([prompt, embeds], dim=1))
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() == 2 and labels.shape[1] == length:  # token labels; class labels stay as they are
                kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
            keep = kwargs.get("logits_to_keep")
            if isinstance(keep, Tensor) and keep.dtype == torch.bool:
                if keep.shape[-1] == length:  # positions chosen over the input: the prompt's own rows are not kept
                    kwargs["logits_to_keep"] = torch.cat([keep.new_zeros(*keep.shape[:-1], n), keep], dim=-1)
                # n + length: chosen over the prompt and the input already (bench.trial.loss.loss)
            elif isinstance(keep, Tensor):
                kwargs["logits_to_keep"] = keep + n
            if (types := kwargs.get("token_type_ids")) is not None:
                kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
            if (positions := kwargs.get("position_ids")) is not None:
                head = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], n)
                kwargs["position_ids"] = torch.cat([head, positions + n], dim=-1)
        elif (positions := kwargs.get("position_ids")) is not None:
            kwargs["position_ids"] = positions + n
        if (mask := kwargs.get("attention_mask")) is not None:
            if mask.dim() != 2:
                raise ValueError(f"{type(self).__name__}: only 2-D attention masks can be extended, got {mask.dim()}-D")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        return (), kwargs

    def _after(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        logits = getattr(output, "logits", None)
        # The last `length` rows belong to the input even when logits_to_keep kept fewer than all;
        # a decoding step, its prefix already in the cache, returns no prefix rows to drop.
        if isinstance(logits, Tensor) and logits.dim() == 3 and logits.shape[1] > self._length:
            output.logits = logits[:, -self._length :]
        return output


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's input embedding layer, or a ConfigError when a prompt cannot go in front of its inputs."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            "model", f"{type(model).__name__} is an encoder-decoder; prompts are supported on decoder-only and encoder-only models"
        )
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embed, nn.Embedding) or "inputs_embeds" not in inspect.signature(model.forward).parameters:
        raise ConfigError("model", f"{type(model).__name__} takes no inputs_embeds through an input embedding layer")
    if any(isinstance(m, Prefix) for m in model.modules()):
        raise ConfigError("model", f"{type(model).__name__} already carries a prompt")
    return embed


class SoftPrompt(Prefix):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)

    @property
    def n(self) -> int:
        return self.weight.shape[0]

    def embeddings(self, embed: nn.Module) -> Tensor:
        return self.weight


@dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(MethodConfig):
    n_tokens: int = 20
    """Virtual tokens in the soft prompt (the paper tries 1 to 150; its default is 100)."""
    init: str = "vocab"
    """random (uniform in [-0.5, 0.5]), vocab (embeddings of sampled tokens) or text (of init_text or init_ids)."""
    vocab_top: int = 5000
    """vocab init: tokens are drawn from the first vocab_top ids (vocabularies list frequent pieces
    first; the paper samples from T5's 5,000 most common tokens)."""
    init_text: str = ""
    """text init: the text whose tokens' embeddings start the prompt, repeated or cut to n_tokens."""
    init_ids: list[int] = field(default_factory=list)
    """text init: the same given as token ids (no tokenizer needed)."""

    def validate(self) -> None:
        if self.n_tokens < 1:
            raise ConfigError("n_tokens", f"must be >= 1, got {self.n_tokens}")
        if self.init not in INITS:
            raise ConfigError("init", f"must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.vocab_top < 1:
            raise ConfigError("vocab_top", f"must be >= 1, got {self.vocab_top}")
        if any(i < 0 for i in self.init_ids):
            raise ConfigError("init_ids", f"token ids must be >= 0, got {self.init_ids}")
        given = [key for key in ("init_text", "init_ids") if getattr(self, key)]
        if self.init == "text" and len(given) != 1:
            raise ConfigError("init_text", "init = 'text' needs exactly one of init_text and init_ids")
        if self.init != "text" and given:  # a setting that does nothing would give one experiment two ids
            raise ConfigError(given[0], f"applies to init = 'text' only, init is {self.init!r}")


def _initial(cfg: PromptTuningConfig, embed: nn.Embedding, context: MethodContext | None) -> Tensor:
    weight = embed.weight
    n = cfg.n_tokens
    if cfg.init == "random":
        return torch.empty(n, embed.embedding_dim, dtype=weight.dtype, device=weight.device).uniform_(-0.5, 0.5)
    if cfg.init == "vocab":
        ids = torch.randint(0, min(cfg.vocab_top, embed.num_embeddings), (n,))
    else:
        if cfg.init_ids:
            tokens = cfg.init_ids
        elif context is not None:
            # Without special tokens: a BOS among the init tokens would only dilute them.
            tokens = context.tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ConfigError("init_text", f"{cfg.init_text!r} tokenizes to no tokens")
        elif weight.is_meta:  # suite validation on a skeleton: the runner brings the tokenizer later
            return weight.new_empty(n, embed.embedding_dim)
        else:
            raise ConfigError("init_text", "needs the tokenizer: apply(model, cfg, context=MethodContext(tokenizer))")
        if max(tokens) >= embed.num_embeddings:
            raise ConfigError("init_ids", f"token id {max(tokens)} is outside the model's {embed.num_embeddings}-token vocabulary")
        ids = torch.tensor((tokens * math.ceil(n / len(tokens)))[:n])
    return weight[ids.to(weight.device)].detach().clone()


class PromptTuning:
    name = "prompt_tuning"
    version = "1"
    init_atol: ClassVar[float | None] = None  # the prompt changes every output
    packs: ClassVar[bool] = False  # its prompt goes in front of every row (bench.trial.loss.packs)
    needs_context: ClassVar[bool] = True  # for init = "text" with init_text
    # The paper's 0.3 is for Adafactor, whose steps scale with the weights; AdamW's do not, and
    # embeddings are small: 0.3 overshoots on the tiny models, 3e-2 (peft's examples) does not.
    battery_lr: ClassVar[float] = 3e-2
    Config = PromptTuningConfig
    battery_configs: ClassVar[list[dict[str, Any]]] = [
        {"n_tokens": 8, "init": "vocab"},
        {"n_tokens": 8, "init": "text", "init_ids": [5, 6, 7]},
    ]

    def apply(self, model: nn.Module, cfg: PromptTuningConfig, context: MethodContext | None = None) -> Adapted:
        embed = input_embeddings(model)
        prompt = SoftPrompt(_initial(cfg, embed, context))
        freeze(model)
        prompt.attach(model, "prompt_tuning")
        return Adapted(model=model, trainable=[prompt.weight])

    def expected_trainable(self, model: nn.Module, cfg: PromptTuningConfig) -> int:
        """n_tokens * d, d the width of the input embeddings (the paper's 5 x 4096 = 20,480 on T5-XXL)."""
        return cfg.n_tokens * model.get_input_embeddings().embedding_dim
