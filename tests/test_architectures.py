"""Every registered method on ten architectures, on a float and on a 4-bit base: the compatibility matrix.

Each cell runs apply -> one optimizer step (train mode) -> save -> apply to a fresh copy -> load,
and the loaded model's outputs must equal the trained one's; the cell says "trains" (or "applies"
for a method that trains nothing), or "refuses" with the one-line ConfigError the method raised
before touching the model. Anything else (another exception, a refusal after the model was
changed, outputs that differ after loading) fails the test.

The matrix is committed (results/compat/architectures.md) and shown in the README between the
matrix markers; both must equal what this run produces. After a change of a method or a layout:

    PEFTBENCH_UPDATE_MATRIX=1 python -m pytest tests/test_architectures.py   # or: python tests/test_architectures.py

rewrites both. Also here: the fused q|k|v splits checked against the attention they feed, the
layout's roles on each architecture, and LoRA's trainable counts against Hugging Face peft's.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import VOCAB
from tiny_archs import ARCHS, arch_batch, build_arch
from torch import Tensor, nn

import methods
from methods.arch import layout
from methods.base import Adapted, ConfigError, MethodContext
from methods.layers import Conv1D, resolve_targets

ROOT = Path(__file__).resolve().parents[1]
MATRIX_FILE = ROOT / "results" / "compat" / "architectures.md"
README = ROOT / "README.md"
START, END = "<!-- matrix:start -->", "<!-- matrix:end -->"
BASES = ("float", "4-bit")
UPDATE = os.environ.get("PEFTBENCH_UPDATE_MATRIX") == "1"


@dataclass(frozen=True)
class Cell:
    status: str
    """"trains", "applies" (nothing to train) or "refuses"."""
    reason: str = ""


# A lighter config where the first battery config costs seconds per cell: LQ-LoRA's plan searches
# every (bits, block) configuration with 100 decomposition iterations per layer.
MATRIX_CONFIGS: dict[str, dict[str, Any]] = {
    "lqlora": {"r": 4, "targets": "qv", "budget": 3.0, "iters": 2, "bits_choices": [2, 4], "block_choices": [64],
               "scale_bits_choices": [8], "scale_dtype_choices": ["fp32"], "scale_block_choices": [256]},
}


def config_values(name: str) -> dict[str, Any]:
    """The method's first battery config (small, and what tests/test_methods.py runs on Llama), or its MATRIX_CONFIGS entry."""
    return MATRIX_CONFIGS.get(name, getattr(methods.get(name), "battery_configs", [{}])[0])


def context() -> MethodContext:
    from bench.models import _tiny_tokenizer

    return MethodContext(tokenizer=_tiny_tokenizer(VOCAB), train=tuple((f"Q{i}:", f" A{i}") for i in range(8)))


def quantized(model: nn.Module) -> nn.Module:
    """The trials' own 4-bit path ([model] quant = "nf4"): every linear layer but the head, float32 compute."""
    from bench.models.quant import quantize

    quantize(model, "nf4", compute_dtype=torch.float32)
    return model


def apply(name: str, model: nn.Module) -> Adapted:
    method = methods.get(name)
    cfg = method.Config.from_dict(config_values(name))
    if getattr(method, "needs_context", False):
        return method.apply(model, cfg, context=context())
    return method.apply(model, cfg)


def fingerprint(model: nn.Module) -> list[tuple[str, str, bool]]:
    """What a refusal must leave as it was: every module's type and every tensor's trainability."""
    modules = [(n, type(m).__name__, False) for n, m in model.named_modules()]
    return modules + [(n, "", p.requires_grad) for n, p in model.named_parameters()]


def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def run_cell(name: str, arch: str, base: str, bases: dict[tuple[str, str], nn.Module]) -> Cell:
    """apply -> one AdamW step -> save -> load into a fresh copy -> same outputs."""
    model = copy.deepcopy(bases[arch, base])
    before = fingerprint(model)
    try:
        adapted = apply(name, model)
    except ConfigError as exc:
        assert fingerprint(model) == before, f"{name} on {arch} ({base}) changed the model before refusing"
        assert "\n" not in str(exc), f"{name} on {arch} ({base}): a refusal is one line, got {exc}"
        return Cell("refuses", str(exc))
    batch = arch_batch(arch)
    status = "applies"
    if adapted.trainable:
        status = "trains"
        old = [p.detach().clone() for p in adapted.trainable]
        adapted.model.train()
        optimizer = torch.optim.AdamW(adapted.trainable, lr=1e-2)
        loss = adapted.model(**batch).loss
        assert torch.isfinite(loss), f"{name} on {arch} ({base}): loss {loss}"
        loss.backward()
        optimizer.step()
        assert any(not torch.equal(p, o) for p, o in zip(adapted.trainable, old)), f"{name} on {arch} ({base}): the step changed nothing"
    with tempfile.TemporaryDirectory() as tmp:
        adapted.save(tmp)
        fresh = apply(name, copy.deepcopy(bases[arch, base]))
        fresh.load(tmp)
    torch.testing.assert_close(outputs(fresh.model, batch), outputs(adapted.model, batch), atol=1e-5, rtol=0,
                               msg=lambda m: f"{name} on {arch} ({base}): loaded outputs differ: {m}")
    return Cell(status)


def general(reason: str) -> str:
    """A refusal without the names of the model's own modules (model.layers.0.self_attn.q_proj,
    transformer.h.0.attn.c_attn.weight): the same reason on every architecture reads the same."""
    return re.sub(r"\b[A-Za-z_]\w*(\.\w+){2,}\b", "<layer>", reason)


def render(cells: dict[tuple[str, str, str], Cell]) -> str:
    """The matrix as Markdown: one table per base, methods x architectures, refusals numbered."""
    reasons: dict[str, int] = {}
    lines = []
    for base in BASES:
        lines += [f"**{base} base**", "", "| method | " + " | ".join(ARCHS) + " |", "|---|" + "---|" * len(ARCHS)]
        for name in methods.names():
            row = []
            for arch in ARCHS:
                cell = cells[name, arch, base]
                if cell.status == "refuses":
                    row.append(f"refuses [{reasons.setdefault(general(cell.reason), len(reasons) + 1)}]")
                else:
                    row.append(cell.status)
            lines.append(f"| `{name}` | " + " | ".join(row) + " |")
        lines.append("")
    counts = {s: sum(c.status == s for c in cells.values()) for s in ("trains", "applies", "refuses")}
    summary = f"{counts['trains']} train, {counts['applies']} apply (nothing to train), {counts['refuses']} refuse"
    lines.append(f"{len(cells)} cells: {summary}. Refusals:")
    lines.append("")
    lines += [f"{i}. {reason.replace('|', '/')}" for reason, i in reasons.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def matrix() -> dict[tuple[str, str, str], Cell | str]:
    """Every cell, run once for the module; a cell that fails holds its error text instead."""
    started = time.perf_counter()
    bases = {}
    for arch in ARCHS:
        bases[arch, "float"] = build_arch(arch)
        bases[arch, "4-bit"] = quantized(copy.deepcopy(bases[arch, "float"]))
    out: dict[tuple[str, str, str], Cell | str] = {}
    for name in methods.names():
        for arch in ARCHS:
            for base in BASES:
                try:
                    out[name, arch, base] = run_cell(name, arch, base, bases)
                except Exception as exc:  # noqa: BLE001 - every failure is reported by the test below
                    out[name, arch, base] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    print(f"matrix: {len(out)} cells in {time.perf_counter() - started:.1f} s")
    return out


def test_every_method_trains_or_refuses_on_every_architecture(matrix: dict[tuple[str, str, str], Cell | str]) -> None:
    failed = {f"{n}/{a}/{b}": v for (n, a, b), v in matrix.items() if isinstance(v, str)}
    assert not failed, f"{len(failed)} cells neither train nor refuse cleanly: {failed}"


def readme_matrix() -> str:
    text = README.read_text()
    if START not in text or END not in text:
        return ""
    return text[text.index(START) + len(START) : text.index(END)].strip("\n") + "\n"


def test_committed_matrix_and_readme_equal_this_run(matrix: dict[tuple[str, str, str], Cell | str]) -> None:
    if any(isinstance(v, str) for v in matrix.values()):
        pytest.fail("cells failed (see the test above): no matrix to compare")
    produced = render(matrix)  # type: ignore[arg-type]
    if UPDATE:
        MATRIX_FILE.parent.mkdir(parents=True, exist_ok=True)
        MATRIX_FILE.write_text(produced)
        text = README.read_text()
        README.write_text(text[: text.index(START) + len(START)] + "\n" + produced + text[text.index(END) :])
    update = "regenerate with: PEFTBENCH_UPDATE_MATRIX=1 python -m pytest tests/test_architectures.py"
    assert MATRIX_FILE.exists() and MATRIX_FILE.read_text() == produced, f"{MATRIX_FILE.relative_to(ROOT)} differs from this run; {update}"
    assert readme_matrix() == produced, f"README.md's matrix (between {START} and {END}) differs from this run; {update}"


# ---------------------------------------------------------------- layouts


EXPECTED_ROLES = {
    # (q, k, v or qkv, o, mlp) as each architecture's modeling file names them: an independent
    # statement of what methods.arch must find from structure and head counts.
    "llama": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"},
    "gemma3": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"},
    "phi": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "dense": "o", "fc1": "mlp", "fc2": "mlp"},
    "gpt_neox": {"query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"},
    "gpt2": {"c_attn": "qkv", "attn.c_proj": "o", "c_fc": "mlp", "mlp.c_proj": "mlp"},
    "falcon": {"query_key_value": "qkv", "dense": "o", "dense_h_to_4h": "mlp", "dense_4h_to_h": "mlp"},
    "opt": {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o", "fc1": "mlp", "fc2": "mlp"},
    "bert": {"query": "q", "key": "k", "value": "v", "attention.output.dense": "o", "intermediate.dense": "mlp", "output.dense": "mlp"},
}


def hand_role(arch: str, name: str) -> str | None:
    """The role EXPECTED_ROLES gives a module name (its longest matching suffix), None if none."""
    roles = (EXPECTED_ROLES | {"mistral": EXPECTED_ROLES["llama"], "qwen2": EXPECTED_ROLES["llama"]})[arch]
    suffixes = [s for s in roles if name.endswith("." + s)]
    return roles[max(suffixes, key=len)] if suffixes else None


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_finds_each_architectures_projections(arch: str) -> None:
    found = layout(build_arch(arch)).roles()
    assert len(found) == 2 * len(EXPECTED_ROLES.get(arch, EXPECTED_ROLES["llama"]))
    assert {name: hand_role(arch, name) for name in found} == found


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "falcon", "falcon_grouped"])
def test_fused_qkv_split_matches_the_attention_it_feeds(arch: str) -> None:
    """Scaling the rows called q by 2 and those called k by 1/2 leaves every score q.k, hence the
    logits, unchanged (rotary positions are linear); scaling those called v by 2 doubles the
    attention output exactly as doubling the output projection's weight does. A wrong split
    (q rows taken for v, heads mixed up) breaks one of the two."""
    if arch == "falcon_grouped":
        from transformers import FalconConfig, FalconForCausalLM

        torch.manual_seed(0)
        model = FalconForCausalLM(FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
                                               new_decoder_architecture=True, num_kv_heads=2)).eval()
    else:
        model = build_arch(arch)
    batch = arch_batch("llama")
    reference = outputs(model, batch)
    attn = layout(model).blocks[0].attention
    assert attn.heads.kv_heads == {"falcon": 1, "falcon_grouped": 2}.get(arch, 4)

    def scaled(parts: dict[str, float], o_factor: float = 1.0) -> Tensor:
        changed = copy.deepcopy(model)
        layer, out = changed.get_submodule(attn.qkv), changed.get_submodule(attn.o)
        with torch.no_grad():
            for part, factor in parts.items():
                rows = attn.rows(part)
                if isinstance(layer, Conv1D):  # GPT-2's Conv1D stores (in, out)
                    layer.weight[:, rows] *= factor
                else:
                    layer.weight[rows] *= factor
                if layer.bias is not None:
                    layer.bias[rows] *= factor
            out.weight *= o_factor
        return outputs(changed, batch)

    torch.testing.assert_close(scaled({"q": 2.0, "k": 0.5}), reference, atol=1e-5, rtol=0)
    assert not torch.allclose(scaled({"q": 2.0}), reference, atol=1e-3)
    torch.testing.assert_close(scaled({"v": 2.0}), scaled({}, o_factor=2.0), atol=1e-5, rtol=0)
    assert not torch.allclose(scaled({"v": 2.0}), reference, atol=1e-3)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "falcon"])
def test_ia3_value_vector_on_a_fused_projection_scales_the_values(arch: str) -> None:
    """IA3's l_v at 2 everywhere (l_k at 1) doubles every value, so the attention output doubles:
    the same logits as the base model with its attention output projections' weights doubled."""
    from methods.ia3 import IA3, IA3Config, ia3_layers

    batch = arch_batch(arch)
    adapted = IA3().apply(build_arch(arch), IA3Config(vectors=["k", "v"]))
    for layer in ia3_layers(adapted.model).values():
        with torch.no_grad():
            layer.ia3_l[layer.ia3_l.numel() // 2 :] = 2.0  # [k heads | v heads]: equal widths
    doubled = build_arch(arch)
    with torch.no_grad():
        for block in layout(doubled).blocks:
            doubled.get_submodule(block.attention.o).weight.mul_(2.0)
    torch.testing.assert_close(outputs(adapted.model, batch), outputs(doubled, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(outputs(adapted.model, batch), outputs(build_arch(arch), batch), atol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_reads_a_weightless_skeleton(arch: str) -> None:
    """Suite validation applies methods to a model built on the meta device, before any trial runs:
    the layout (hence every refusal) is the same there."""
    with torch.device("meta"):
        skeleton = build_arch(arch)
    assert layout(skeleton) == layout(build_arch(arch))


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma3", "phi", "gpt_neox"])
def test_longlora_runs_shifted_sparse_attention_beyond_llama(arch: str) -> None:
    """In train mode the adapted model attends within (shifted) groups, so its logits differ from
    the full attention it keeps in eval mode, where it is exactly the base model (B = 0)."""
    from methods.longlora import LongLoRA, LongLoRAConfig

    batch = arch_batch(arch, seq=16)
    model = LongLoRA().apply(build_arch(arch), LongLoRAConfig(r=2)).model
    # Equal in exact arithmetic, computed along two code paths: a tolerance, not bit-equality, holds on any CPU.
    torch.testing.assert_close(outputs(model, batch), outputs(build_arch(arch), batch), atol=1e-5, rtol=0)
    model.train()
    with torch.no_grad():
        grouped = model(**batch).logits
    assert not torch.allclose(grouped, outputs(model, batch), atol=1e-3)


# ---------------------------------------------------------------- LoRA against peft


# Each alias as peft is told it: "all-linear" is peft's own alias, the others are module names
# (suffixes) from EXPECTED_ROLES, written by hand per architecture.
ALIAS_ROLES = {"qv": {"q", "v", "qkv"}, "mlp": {"mlp"}, "attention": {"q", "k", "v", "qkv", "o"}}


def peft_targets(arch: str, targets: str, model: nn.Module) -> str | list[str]:
    if targets == "all-linear":
        return targets
    return [n for n, _ in model.named_modules() if hand_role(arch, n) in ALIAS_ROLES[targets]]


@pytest.mark.parametrize("targets", ["qv", "attention", "mlp", "all-linear"])
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trainable_count_equals_peft(arch: str, targets: str) -> None:
    """The same layers and the same count as peft's LoRA on every architecture and target set. One
    pinned difference: peft's all-linear leaves out only what get_output_embeddings() returns, which
    for BERT's sequence classifier is nothing, so peft also adapts its classifier head; ours never
    adapts a head (its role is "head"), so there the counts differ by exactly that layer's r (in + out)."""
    peft = pytest.importorskip("peft")
    from methods.lora import LoRA, LoRAConfig, features

    base = build_arch(arch)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets(arch, targets, base)))
    ours = LoRA().apply(build_arch(arch), LoRAConfig(r=4, alpha=8, targets=targets))
    their_layers = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    our_layers = {n for n, _ in resolve_targets(build_arch(arch), targets)}
    heads = {"classifier"} if (arch, targets) == ("bert", "all-linear") else set()
    assert our_layers == their_layers - heads
    extra = sum(4 * sum(features(build_arch(arch).get_submodule(n))) for n in heads)
    assert sum(p.numel() for p in ours.trainable) + extra == theirs.get_nb_trainable_parameters()[0] > 0


if __name__ == "__main__":  # the --update path: rewrite the committed matrix and the README section
    os.environ["PEFTBENCH_UPDATE_MATRIX"] = "1"
    sys.exit(pytest.main([__file__, "-q", "-k", "committed", "-p", "no:cacheprovider"]))
