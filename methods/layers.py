"""Finding the parts of a model that methods act on: linear layers by role, blocks, the head.

Roles inside the blocks come from the model's structure and config (methods.arch.layout: any
transformers architecture with attention blocks, fused q|k|v or not); the name patterns below
only serve layers outside the blocks (the head) and models without attention blocks.
"""

from __future__ import annotations

import re
from typing import TypeVar

from torch import nn

from methods.base import ConfigError, Targets

try:  # GPT-2's linear layers are Conv1D (weight stored as in x out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

LINEAR_TYPES = (nn.Linear, Conv1D)

# Role of a linear layer by the end of its qualified name; order matters (first match wins).
_ROLES: list[tuple[str, str]] = [
    (r"(^|\.)(q_proj|query|q_lin)$", "q"),
    (r"(^|\.)(k_proj|key|k_lin)$", "k"),
    (r"(^|\.)(v_proj|value|v_lin)$", "v"),
    (r"(^|\.)(c_attn|qkv_proj|query_key_value|Wqkv)$", "qkv"),
    (r"(^|\.)(o_proj|out_proj|out_lin|attn\.c_proj|attention\.output\.dense)$", "o"),
    (r"(^|\.)(gate_proj|up_proj|down_proj|c_fc|mlp\.c_proj|intermediate\.dense|output\.dense|fc1|fc2|lin1|lin2|w1|w2|w3)$", "mlp"),
]
_HEAD_NAMES = re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|cls\.predictions\.decoder|embed_out)$")

ALIASES: dict[str, set[str]] = {
    "q": {"q", "qkv"},
    "v": {"v", "qkv"},
    "qv": {"q", "v", "qkv"},
    "kv": {"k", "v", "qkv"},
    "attention": {"q", "k", "v", "qkv", "o"},
    "mlp": {"mlp"},
    "all-linear": {"q", "k", "v", "qkv", "o", "mlp", "other"},
}


def role(name: str) -> str:
    """The role of a linear layer ("q", "k", "v", "qkv", "o", "mlp", "head" or "other")."""
    if _HEAD_NAMES.search(name):
        return "head"
    for pattern, r in _ROLES:
        if re.search(pattern, name):
            return r
    return "other"


def roles(model: nn.Module) -> dict[str, str]:
    """The role of every linear layer of the model, by qualified name: from its structure
    (methods.arch.layout) inside the blocks, from its name elsewhere (the head, a second stack of
    blocks) and in models whose layout cannot be read (a CNN, say)."""
    from methods.arch import layout

    try:
        structural = layout(model).roles()
    except ConfigError:
        structural = {}
    named = {name: role(name) for name, _ in linear_modules(model)}
    return {name: "head" if found == "head" else structural.get(name, found) for name, found in named.items()}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule called `name` is."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


M = TypeVar("M", bound=nn.Module)


def modules_of(model: nn.Module, kind: type[M]) -> dict[str, M]:
    """The model's modules of this type (a method's adapter layers, say), by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]


def resolve_targets(model: nn.Module, targets: Targets, key: str = "targets") -> list[tuple[str, nn.Module]]:
    """Linear layers selected by `targets`; a selection that matches nothing is an error."""
    layers = linear_modules(model)
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items:
        raise ConfigError(key, "empty target list")
    chosen: dict[str, nn.Module] = {}
    by_role = roles(model) if any(item in ALIASES for item in items) else {}
    for item in items:
        if item in ALIASES:
            wanted = ALIASES[item]
            hits = [(n, m) for n, m in layers if by_role[n] in wanted]
        elif isinstance(targets, list) and re.fullmatch(r"[\w.]+", item):
            hits = [(n, m) for n, m in layers if n == item or n.endswith("." + item)]
        else:
            try:
                rx = re.compile(item)
            except re.error as exc:
                raise ConfigError(key, f"{item!r} is not an alias ({', '.join(ALIASES)}) nor a valid regex: {exc}") from exc
            hits = [(n, m) for n, m in layers if rx.search(n)]
        if not hits:
            sample = ", ".join(sorted({n.split(".")[-1] for n, _ in layers})[:12])
            raise ConfigError(key, f"{item!r} matches no linear module of {type(model).__name__} (its layer names: {sample})")
        chosen.update(hits)
    return list(chosen.items())


def blocks(model: nn.Module) -> nn.ModuleList:
    """The repeated transformer blocks (the longest ModuleList of same-type modules)."""
    best: nn.ModuleList | None = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1:
            if best is None or len(m) > len(best):
                best = m
    if best is None:
        raise ConfigError("model", f"{type(model).__name__} has no list of repeated blocks")
    return best


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the output head (tied input embeddings included when tied) and the final norm."""
    params: dict[int, nn.Parameter] = {}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        for n, m in model.named_modules():
            if _HEAD_NAMES.search(n):
                head = m
    if head is None:
        raise ConfigError("model", f"{type(model).__name__} has no recognisable output head")
    for p in head.parameters():
        params[id(p)] = p
    for n, m in model.named_modules():
        if re.search(r"(^|\.)(norm|ln_f|final_layer_norm|final_layernorm)$", n):
            for p in m.parameters():
                params[id(p)] = p
    # Sequence classifiers often have a pooler before the classifier.
    for n, m in model.named_modules():
        if n.endswith("pooler"):
            for p in m.parameters():
                params[id(p)] = p
    return list(params.values())


def sublayer_outputs(model: nn.Module, sublayer: str) -> list[tuple[str, nn.Module]]:
    """The output projection of every block's attention ("attention") or feed-forward ("ffn")
    sublayer, one per block, found from the structure (methods.arch.layout): o_proj / down_proj
    (Llama), attn.c_proj / mlp.c_proj (GPT-2), attention.dense / dense_4h_to_h (GPT-NeoX),
    self_attn.dense / fc2 (Phi), attention.output.dense / output.dense (BERT), ..."""
    from methods.arch import layout

    try:
        found = layout(model)
    except ConfigError as exc:
        raise ConfigError("model", f"cannot find the {sublayer} output projections: {exc.message}") from None
    return [(n, model.get_submodule(n)) for n in found.sublayer_outputs(sublayer)]


def block_norms(model: nn.Module) -> list[nn.Module]:
    """The normalisation layers inside the repeated blocks (LayerNorm, RMSNorm), in model order."""
    return [m for block in blocks(model) for m in block.modules() if "norm" in type(m).__name__.lower()]


def _mean_centering(norm: nn.Module) -> bool:
    # LayerNorm subtracts each token's mean over features; RMSNorm (Llama, Gemma) does not.
    return isinstance(norm, nn.LayerNorm)


def shift_invariant_layers(model: nn.Module) -> dict[str, str]:
    """Linear layers whose outputs the architecture reads in a way that ignores some shifts, by
    qualified name, with the shift they ignore:

    - "token": a key projection in attention without rotary positions. Softmax over keys ignores a
      shift shared by every key (q·(k_j + c) = q·k_j + q·c, the same for every j), so anything that
      adds the same vector to every token's key (the layer's bias, a bias-like adapter term) gets a
      zero gradient in exact arithmetic. Rotary embeddings rotate that vector differently at each
      position, which breaks the invariance, so models with them (Llama, Qwen2) are left out.
    - "feature": a block's attention or feed-forward output projection in a model whose every
      normalisation is a mean-centring LayerNorm (GPT-2, BERT): each reader of the residual stream
      subtracts the token's mean over features, so a per-token shift that is the same for every
      feature (a scalar times the ones vector) is removed before anything reads it.
    """
    out: dict[str, str] = {}
    names = [type(m).__name__.lower() for m in model.modules()]
    if not any("rotary" in n for n in names):
        out.update({n: "token" for n, r in roles(model).items() if r == "k"})
    norms = [m for m in model.modules() if "norm" in type(m).__name__.lower() and not isinstance(m, nn.ModuleList)]
    if norms and all(_mean_centering(m) for m in norms):
        for sublayer in ("attention", "ffn"):
            try:
                out.update({n: "feature" for n, _ in sublayer_outputs(model, sublayer)})
            except ConfigError:  # a layout whose output projections we cannot name: claim nothing
                pass
    return out


SHIFT_REASONS = {
    "token": "adds the same vector to every key, which softmax over keys ignores",
    "feature": "adds a per-token shift shared by all features, which the mean-centring LayerNorms reading it remove",
}


def inert_parameters(model: nn.Module, trainable: list[nn.Parameter], declared: dict[str, str] | None = None) -> dict[str, str]:
    """Trainable tensors whose gradient the architecture makes zero in exact arithmetic, by name, with
    the reason: the method's own declarations plus the biases of key projections (a bias is a
    shift shared by every token), which full fine-tuning and block-wise methods train."""
    ids = {id(p) for p in trainable}
    invariant = shift_invariant_layers(model)
    out = {}
    for name, p in model.named_parameters():
        layer, _, leaf = name.rpartition(".")
        if id(p) in ids and leaf == "bias" and invariant.get(layer) == "token":
            out[name] = f"bias of {layer}: {SHIFT_REASONS['token']}"
    out.update(declared or {})
    return out
