"""benchmarks/methods_vs_peft.py's builders on a tiny Llama: for every method, ours and peft's train
the same number of parameters (the count the method states in closed form), the benchmark's loop
trains both, and no variant writes the frozen weights the variants share."""

from __future__ import annotations

import pytest
import torch
from tiny_archs import arch_batch, build_arch

import methods
from benchmarks.methods_vs_peft import Built, build, optimizer, PAIRS, parse, Settings, SIDES, step

# The tiny Llama has 2 layers, hidden 64, 4 query and 2 key/value heads.
TINY = Settings(rank=4, vera_rank=16, prompt_tokens=3, prefix_tokens=3, adapter_len=3, adapter_layers=2)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return build_arch("llama")


@pytest.mark.parametrize("method", list(PAIRS))
def test_ours_and_peft_train_the_same_count(method: str, base: torch.nn.Module) -> None:
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    built: dict[str, Built] = {side: build(method, side, base, TINY) for side in SIDES}
    impl = methods.get(method)
    expected = impl.expected_trainable(build_arch("llama"), impl.Config.from_dict(PAIRS[method].ours(TINY)))
    assert built["ours"].count == built["peft"].count == expected

    ids = arch_batch("llama", batch=2, seq=8)["input_ids"]
    for side, variant in built.items():
        before = [p.detach().clone() for p in variant.trainable]
        step(variant, optimizer(variant), ids)
        assert any(not torch.equal(b, p) for b, p in zip(before, variant.trainable)), f"{side}: nothing trained"
    for name, p in base.named_parameters():
        assert torch.equal(p, weights[name]), f"{name}: a variant wrote the shared frozen weights"


def test_bad_methods_option_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--methods", "dora,lora_plus"])
    assert exc.value.code == 2
    assert "--methods: unknown lora_plus" in capsys.readouterr().err
    assert parse(["--methods", "ia3, vera", "--vera-rank", "32"]).methods == ["ia3", "vera"]
