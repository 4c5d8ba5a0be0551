"""Base quantization with bitsandbytes (bench/models/quant.py) and QLoRA = LoRA on a 4-bit base.

The central test is the repacking trap of DESIGN.md section 6: on CPUs with AVX512-BF16 an
eval-mode no-grad forward repacks 4-bit weights for an inference kernel, after which training
gets silently wrong gradients. LoRA's gradients on our quantized base must equal those of the
same model computed with the dequantized weights in plain torch, after such a forward.
"""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

bnb = pytest.importorskip("bitsandbytes")

import methods  # noqa: E402
from bench import models  # noqa: E402
from bench.models import quant  # noqa: E402
from bench.run import suite  # noqa: E402
from bench.trial.measure import weight_bytes  # noqa: E402
from bench.trial.train import OPTIMIZERS, train  # noqa: E402
from methods.lora import lora_layers  # noqa: E402

QUANT_CASES = [("nf4", False), ("nf4", True), ("fp4", True), ("int8", False)]


def _case(q: tuple[str, bool]) -> str:
    return q[0] + ("-dq" if q[1] else "")


def tiny_llama() -> nn.Module:
    """llama-tiny (hidden 64, MLP 128): its layers are whole multiples of the 64-weight block,
    which the repacking path needs to run at all (smaller layers crash there instead)."""
    return models.build_synthetic("llama-tiny").eval()


def tokens(batch: int = 2, seq: int = 12, vocab: int = 512, seed: int = 1) -> dict[str, Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("q", QUANT_CASES, ids=_case)
def test_quantized_forward_close_to_float(q: tuple[str, bool], kind: str, tiny_model, batch_for) -> None:
    reference = tiny_model(kind, hidden=64)
    model = copy.deepcopy(reference)
    info = quant.quantize(model, q[0], q[1], torch.float32)
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    quantized = [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    # Every linear layer (GPT-2's Conv1D included) except the head; the head stays float.
    assert info.layers == len(quantized) > 0
    assert info.skipped == sorted(set(linear) - set(quantized)) and len(info.skipped) == 1
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.rpartition(".")[0] in quantized)
    batch = batch_for(kind)
    with torch.no_grad():
        want, got = reference(**batch).logits, model(**batch).logits
    # 4-bit weights of a random model move logits by about 15%; int8 by a few percent at most.
    assert F.cosine_similarity(got.flatten(), want.flatten(), dim=0) > (0.97 if q[0] != "int8" else 0.999)
    assert (got - want).norm() / want.norm() < (0.3 if q[0] != "int8" else 0.05)


@pytest.mark.parametrize("q", [q for q in QUANT_CASES if q[0] != "int8"], ids=_case)
def test_a_shape_bitsandbytes_dequantizes_wrongly_on_cpu_is_refused(q: tuple[str, bool], tiny_model) -> None:
    """bitsandbytes 0.50.2's CPU kernel dequantizes 32-wide layers wrongly (codes right, weights
    wrong): quantizing must fail naming the layer, not train on wrong weights."""
    with pytest.raises(quant.QuantError, match=r"model\.quant: .*in=32.*layer model\.layers\.0\.self_attn\.q_proj"):
        quant.quantize(tiny_model("llama"), q[0], q[1], torch.float32)


@pytest.mark.parametrize("q", [q for q in QUANT_CASES if q[0] != "int8"], ids=_case)
def test_block_aligned_bf16_layers_pass_the_dequantize_check(q: tuple[str, bool], tiny_model) -> None:
    """The check must not refuse what the kernel gets right: bf16 weights decode to bf16."""
    info = quant.quantize(tiny_model("llama", hidden=64).to(torch.bfloat16), q[0], q[1], torch.bfloat16)
    assert info.layers == 14


class Dequantized(nn.Module):
    """A linear layer computing as bitsandbytes' 4-bit layer does, in plain torch: the
    dequantized weight, input and weight cast to the compute dtype, output cast back."""

    def __init__(self, layer: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(quant.dequantized_weight(layer).clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype)).to(x.dtype)


def qlora(compute_dtype: torch.dtype, repack_guard: bool = True):
    """llama-tiny on nf4 + double quant, LoRA on all linear layers with B made nonzero (at
    init B = 0 and A gets no gradient), and the same model with dequantized float weights."""
    model = tiny_llama()
    quant.quantize(model, "nf4", True, compute_dtype)
    if not repack_guard:  # what bitsandbytes does by default
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = bnb.functional.has_avx512bf16()
    torch.manual_seed(0)
    lora = methods.get("lora")
    lora.apply(model, lora.Config(r=4, alpha=8, targets="all-linear"))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    reference = copy.deepcopy(model)
    for name, layer in lora_layers(reference).items():
        layer.base_layer = Dequantized(layer.base_layer, compute_dtype)
    return model, reference


def lora_grads(model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    model.train()
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def max_rel_error(got: dict[str, Tensor], want: dict[str, Tensor]) -> float:
    assert got.keys() == want.keys() and got
    return max(((got[k] - want[k]).norm() / want[k].norm()).item() for k in want)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qlora_gradients_match_dequantized_reference_after_eval_forward(compute_dtype: torch.dtype) -> None:
    model, reference = qlora(compute_dtype)
    batch = tokens()
    model.eval()
    with torch.no_grad():  # what lm-eval or a held-out loss does before training
        model(**batch)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), "weight was repacked"
    got, want = lora_grads(model, batch), lora_grads(reference, batch)
    assert all(g.dtype == torch.float32 for g in got.values())  # adapters stay float32
    assert max_rel_error(got, want) < 1e-4


def test_qlora_gradients_match_dequantized_reference_after_a_real_lm_eval_pass(tmp_path, monkeypatch) -> None:
    """As above, but the model first goes through lm-eval itself (HFLM, loglikelihood requests of
    the sst2 task), exactly as a trial evaluates before and after training."""
    from bench.trial import evaluate

    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    model, reference = qlora(torch.float32)
    tokenizer = models.load({"name": "synthetic:llama-tiny"}).tokenizer
    scores = evaluate.lm_eval_scores(model, tokenizer, ["sst2"], limit=4)
    assert 0.0 <= scores["sst2"]["acc"] <= 1.0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False), "lm-eval's pass repacked a weight"
    batch = tokens()
    assert max_rel_error(lora_grads(model, batch), lora_grads(reference, batch)) < 1e-4


def test_full_and_top_k_refuse_a_quantized_base() -> None:
    for name, values in [("full", {}), ("top_k", {"k": 1})]:
        model = tiny_llama()
        quant.quantize(model, "nf4", True, torch.float32)
        method = methods.get(name)
        with pytest.raises(methods.ConfigError, match="quantized") as info:
            method.apply(model, method.Config.from_dict(values))
        assert info.value.key == "model.quant"
        assert not any(p.requires_grad for p in model.parameters() if not p.is_floating_point())


@pytest.mark.parametrize("name", methods.names())
def test_every_method_trains_on_a_4bit_base_or_refuses_it_by_name(name: str) -> None:
    """Each registered method, with each battery config, on an nf4 base: it either trains
    (finite loss, the packed weights untouched and frozen) or raises a ConfigError naming the
    key before changing the model; never a torch error from deep inside (as surgical, Auto-RGN
    and GLoRA raised before this test)."""
    method = methods.get(name)
    for values in getattr(method, "battery_configs", None) or [{}]:
        model = models.load({"name": "synthetic:llama-tiny", "quant": "nf4", "compute_dtype": "float32"}).model
        packed = {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}
        before = {n: p.requires_grad for n, p in model.named_parameters()}
        cfg = method.Config.from_dict(values)
        try:
            adapted = method.apply(model, cfg)
        except methods.ConfigError as exc:
            assert exc.key in ("model.quant", "targets") and "quantized" in exc.message, exc
            assert {n: p.requires_grad for n, p in model.named_parameters()} == before
            continue
        rows = [{k: v[0] for k, v in tokens(1, 16, seed=i).items()} for i in range(2)]
        t = suite.TrainSpec(lr=1e-3, batch_size=2, max_steps=2).to_dict()
        result = train(adapted, rows, t, lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}, torch.device("cpu"))
        # Nothing to train (frozen, hard prompts): the loop takes no step.
        assert result.steps == (2 if adapted.trainable else 0), values
        assert all(torch.isfinite(torch.tensor(result.loss_curve))), values
        after = dict(adapted.model.named_parameters())
        for n, p in packed.items():
            # Wrapping methods move the layer under base_layer: find the packed weight by suffix.
            [(_, q)] = [(m, t) for m, t in after.items() if m.replace(".base_layer", "") == n]
            assert not q.requires_grad and torch.equal(q, p), n


def test_glora_on_a_4bit_base_with_forms_that_act_through_the_layer_output() -> None:
    """A vector A and no C need only W0 x, which the 4-bit layer computes: allowed, and at
    init the model's output is unchanged."""
    model = models.load({"name": "synthetic:llama-tiny", "quant": "nf4", "compute_dtype": "float32"}).model
    batch = tokens()
    with torch.no_grad():
        before = model(**batch).logits
    glora = methods.get("glora")
    adapted = glora.apply(model, glora.Config(a="vector", b="lora", c="none", targets="qv"))
    with torch.no_grad():
        assert torch.equal(adapted.model(**batch).logits, before)
    with pytest.raises(methods.ConfigError, match="W0 itself") as info:
        glora.apply(models.load({"name": "synthetic:llama-tiny", "quant": "nf4"}).model, glora.Config(targets="qv"))
    assert info.value.key == "targets"


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking path exists on AVX512-BF16 CPUs only")
def test_without_the_guard_the_trap_is_real() -> None:
    """The control for the test above: bitsandbytes' default silently corrupts the gradients
    here. If this starts failing, bitsandbytes has fixed the trap (the guard can stay)."""
    model, reference = qlora(torch.float32, repack_guard=False)
    batch = tokens()
    model.eval()
    with torch.no_grad():
        model(**batch)
    assert max_rel_error(lora_grads(model, batch), lora_grads(reference, batch)) > 0.1


def test_lora_wraps_4bit_layers() -> None:
    """resolve_targets finds Linear4bit (an nn.Linear subclass); the adapter takes the layer's
    true shape, not the packed weight's; merging into packed bytes is refused."""
    model = tiny_llama()
    quant.quantize(model, "nf4", True, torch.bfloat16)
    lora = methods.get("lora")
    cfg = lora.Config(r=4, targets="qv")
    expected = lora.expected_trainable(model, cfg)
    adapted = lora.apply(model, cfg)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (64, 4) and q.lora_A.dtype == torch.float32
    assert sum(p.numel() for p in adapted.trainable) == expected == 4 * 4 * ((64 + 64) + (64 + 32))
    with pytest.raises(NotImplementedError, match="quantized"):
        adapted.merge()


@pytest.mark.parametrize("q, bits", [(("nf4", True), 4 + 8 / 64 + 32 / (64 * 256)), (("nf4", False), 4.5),
                                     (("fp4", True), 4 + 8 / 64 + 32 / (64 * 256)), (("int8", False), 8 + 32 / 2048)],
                         ids=["nf4-dq", "nf4", "fp4-dq", "int8"])
def test_bits_per_parameter_as_stored(q: tuple[str, bool], bits: float) -> None:
    """QLoRA's figures from our own accounting (bench.trial.measure.weight_bytes): 4-bit codes plus
    one absmax per 64 weights, fp32 (0.5 bit) or, double-quantized, 8-bit with one fp32
    constant per 256 of them (0.127 bit)."""
    layer = nn.Sequential(nn.Linear(2048, 2048, bias=False))
    quant.quantize(layer, *q)
    stored = sum(weight_bytes(layer).values())
    assert stored * 8 / 2048**2 == pytest.approx(bits, rel=1e-3)


def test_a_double_quantized_forecast_on_meta_leaves_real_quantization_working(monkeypatch) -> None:
    # The memory forecast quantizes a meta-device model first, in the trial's own process.
    monkeypatch.delitem(bnb.functional.name2qmap, "dynamic", raising=False)
    quant.quantize(models.build_synthetic("llama-tiny").to("meta"), "nf4", double_quant=True)
    model = models.build_synthetic("llama-tiny")
    info = quant.quantize(model, "nf4", double_quant=True)
    assert info.layers == 28
    assert bnb.functional.name2qmap["dynamic"].device.type == "cpu"


def test_models_load_quantizes_after_loading() -> None:
    loaded = models.load({"name": "synthetic:llama-tiny", "quant": "nf4", "double_quant": True, "compute_dtype": "bfloat16"})
    assert loaded.quant == {"quant": "nf4", "double_quant": True, "compute_dtype": "bfloat16", "blocksize": 64,
                            "layers": 4 * 7, "params": 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128), "skipped": ["lm_head"]}
    layers = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 28 and all(not m.support_avx512bf16_for_cpu for m in layers)
    assert all(m.compute_dtype == torch.bfloat16 for m in layers)
    assert models.load({"name": "synthetic:llama-tiny"}).quant is None


def test_qlora_trains_through_the_training_loop_with_paged_fallback() -> None:
    """One loop for every base: a QLoRA trial trains, and a paged optimizer on the CPU runs
    unpaged with a note in the result."""
    model = models.load({"name": "synthetic:llama-tiny", "quant": "nf4", "double_quant": True}).model
    lora = methods.get("lora")
    adapted = lora.apply(model, lora.Config(r=4, targets="qv"))
    rows = [{k: v[0] for k, v in tokens(1, 16, seed=i).items()} for i in range(4)]
    t = suite.TrainSpec(optimizer="paged-adamw", lr=1e-2, batch_size=2, max_steps=2).to_dict()
    result = train(adapted, rows, t, lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}, torch.device("cpu"))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.loss_curve)))
    assert result.optimizer_class == "bitsandbytes.optim.adamw.AdamW"
    assert "need CUDA" in result.optimizer_note


def test_paged_optimizers_are_registered() -> None:
    p = nn.Parameter(torch.zeros(8))
    for name in ("paged-adamw", "paged-adamw-8bit"):
        optimizer = OPTIMIZERS[name]([{"params": [p]}], {"lr": 1e-3, "weight_decay": 0.0})
        assert not getattr(optimizer, "is_paged", False) and "cpu" in optimizer.peftbench_note


SUITE = """
name = "q"
[model]
name = "synthetic:llama-tiny"
{model}
[data]
task = "sst2"
train_examples = 8
[[sweep]]
method = "lora"
"""


def load_suite(tmp_path: Path, model_lines: str) -> suite.Suite:
    path = tmp_path / "q.toml"
    path.write_text(textwrap.dedent(SUITE.format(model=model_lines)))
    return suite.load(path)


def test_suite_with_nf4_validates(tmp_path: Path) -> None:
    spec = load_suite(tmp_path, 'quant = "nf4"\ndouble_quant = true\ncompute_dtype = "bfloat16"').trials[0].spec
    assert spec["model"] == {"name": "synthetic:llama-tiny", "dtype": "float32", "quant": "nf4",
                             "double_quant": True, "compute_dtype": "bfloat16"}
    # Unquantized specs keep their old shape, so the ids of finished trials do not change.
    assert load_suite(tmp_path, "").trials[0].spec["model"] == {"name": "synthetic:llama-tiny", "dtype": "float32"}


@pytest.mark.parametrize("lines, key", [('quant = "nf5"', "model.quant"),
                                        ("double_quant = true", "model.double_quant"),
                                        ('quant = "int8"\ncompute_dtype = "bfloat16"', "model.compute_dtype"),
                                        ('quant = "nf4"\ncompute_dtype = "float8"', "model.compute_dtype")])
def test_bad_quant_settings_name_the_key(tmp_path: Path, lines: str, key: str) -> None:
    with pytest.raises(suite.SuiteError, match=key.replace(".", r"\.")):
        load_suite(tmp_path, lines)


def test_a_compute_dtype_the_device_lacks_is_named(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    spec = {"name": "synthetic:llama-tiny", "quant": "nf4", "compute_dtype": "bfloat16"}
    with pytest.raises(models.ModelError, match=r"model\.compute_dtype: bfloat16 is not supported by this GPU \(Tesla V100\)"):
        models.load(spec, device="cuda")
