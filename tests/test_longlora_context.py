"""benchmarks/longlora_context.py on a tiny Llama (seconds): both variants end to end, S²-Attn against full
attention where they must agree and where they must not, position interpolation, and the table the README
and the report render from its JSON."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_archs import build_arch

import benchmarks.longlora_context as bench
from reports import longlora_context as table
from reports import render
from reports.results import ResultFileError

SETUP = bench.Setup(rank=4, group_size_ratio=0.25)
LENGTHS = (16, 32)  # the tiny Llama's max_position_embeddings is 64


def tiny(setup: bench.Setup) -> torch.nn.Module:
    return build_arch("llama")  # the same weights every call


def tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))


def test_s2_attn_agrees_with_full_attention_only_before_the_first_shifted_group() -> None:
    """Position p attends [0, p] under full attention. With groups of G, unshifted heads see [0, p] while
    p < G and shifted heads while p < G/2; causality carries that through the layers. So the logits agree
    at p < G/2 (equal in exact arithmetic: a tolerance) and differ from p = G/2 on, where the shifted heads
    start their second group."""
    n = 32
    group = math.ceil(SETUP.group_size_ratio * n)
    ids = tokens(n)
    out = {}
    for variant in bench.VARIANTS:
        model, _ = bench.build(variant, n, SETUP, tiny)
        assert model.training  # S²-Attn runs in training mode only
        with torch.no_grad():
            out[variant] = model(input_ids=ids).logits[0]
    gap = (out["s2"] - out["full"]).abs().amax(dim=-1)  # per position
    scale = out["full"].abs().amax()
    assert gap[: group // 2].max() <= 1e-5 * scale
    assert gap[group // 2 :].min() > 1e-3 * scale, gap


def test_both_variants_run_end_to_end_at_two_lengths_each_in_its_own_process(tmp_path: Path, capsys) -> None:
    text = {"source": "random ids", "tokens_available": max(LENGTHS), "repeated": False}
    record = bench.header(SETUP, "tiny-llama", LENGTHS, 64, text)
    record["rows"] = [bench.measure_length(n, SETUP, tokens(n), reps=1, max_positions=64, load=tiny) for n in LENGTHS]
    for row in record["rows"]:
        assert row["group_size"] == row["length"] // 4 and row["rope_factor"] == 1.0
        for v in bench.VARIANTS:
            m = row["variants"][v]
            assert m["status"] == "ok", m
            assert len(m["step_s"]) == 1 and m["step_s_median"] > 0 and m["saved_bytes"] > 0
            assert m["peak_source"] in ("rss", "rss_getrusage")
        # The fairness the benchmark states: S²-Attn calls the kernel full attention calls, forward and backward.
        kernels = row["variants"]["s2"]["attention_kernels"]
        assert kernels == row["variants"]["full"]["attention_kernels"]
        assert any("scaled_dot_product" in k and "backward" in k for k in kernels), kernels

    path = tmp_path / "longlora_context.json"
    bench.write_json(str(path), record)
    assert bench.main(["--markdown", str(path)]) == 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(LENGTHS)  # header and one row per length
    assert all(line.rstrip(" |").endswith("same") for line in lines[1:])


def test_positions_are_interpolated_past_max_position_embeddings_only() -> None:
    model = tiny(SETUP)
    before = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")).inv_freq.clone()
    assert bench.interpolate_positions(model, 64) == 1.0
    assert bench.interpolate_positions(model, 130) == 3.0  # ceil(130 / 64), as LongLoRA's fine-tune.py
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    assert model.config.rope_parameters["rope_type"] == "linear"
    torch.testing.assert_close(rotary.inv_freq, before / 3)
    with torch.no_grad():  # the model runs at the longer length
        assert model(input_ids=tokens(130)).logits.shape == (1, 130, 128)


def test_text_is_real_passages_and_repeated_only_when_there_are_too_few(monkeypatch) -> None:
    from bench import models

    tokenizer = models.load_tokenizer({"name": "synthetic:llama-tiny"})
    ids, source = bench.text_ids(tokenizer, 500)
    assert ids.shape == (1, 500) and not source["repeated"] and source["tokens_available"] >= 500
    monkeypatch.setattr(bench, "forgetting_texts", lambda n: ["a few words", "and some more"][:n])
    ids, source = bench.text_ids(tokenizer, 100)
    assert ids.shape == (1, 100) and source["repeated"] and source["tokens_available"] < 100


def record_with() -> dict[str, Any]:
    """A constructed record: two lengths, S²-Attn half full attention's step at 2048, full attention out of memory at 4096."""
    def variant(step: float, peak: int, saved: int) -> dict[str, Any]:
        return {"status": "ok", "step_s": [step, step], "step_s_median": step, "step_s_min": step, "peak_delta_bytes": peak,
                "saved_bytes": saved, "peak_source": "rss", "warmup_s": step,
                "attention_kernels": ["aten::_scaled_dot_product_flash_attention_for_cpu"]}

    return {
        "benchmark": "longlora_context",
        "config": {"model": "smollm2-135m", "device": "cpu", "dtype": "float32", "rank": 8, "group_size_ratio": 0.25,
                   "attn_implementation": "sdpa", "max_position_embeddings": 8192},
        "env": {"device": "cpu: Intel(R) Xeon(R) Processor", "threads": 2},
        "text": {"source": "LAMBADA", "tokens_available": 10_000, "repeated": False},
        "rows": [{"length": 2048, "group_size": 512, "rope_factor": 1.0, "reps": 2,
                  "variants": {"s2": variant(3.0, 3 * 2**30, 2**30), "full": variant(6.0, 4 * 2**30, 2**29)}},
                 {"length": 16384, "group_size": 4096, "rope_factor": 2.0, "reps": 1,
                  "variants": {"s2": variant(30.0, 20 * 2**30, 9 * 2**30),
                               "full": {"status": "killed", "error": "memory process exited with code -9 (out of memory?)"}}}],
    }


def test_report_shows_the_table_from_a_constructed_record(tmp_path: Path) -> None:
    (tmp_path / "longlora_context.json").write_text(json.dumps(record_with()))
    html = render.html([tmp_path])
    section = re.search(r'<section id="longlora-context">(.*?)</section>', html, re.S)
    assert section, "the LongLoRA section is missing or empty"
    cells = [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S) for row in re.findall(r"<tr>(.*?)</tr>", section.group(1), re.S)[1:]]
    assert cells[0][:8] == ["2,048", "512", "3.00 s", "6.00 s", "0.50x", "3,072 MiB", "4,096 MiB", "0.75x"]
    assert cells[0][8:] == ["1,024 MiB / 512 MiB", "same"]
    assert cells[1][2:5] == ["30.00 s", "killed", "—"]  # out of memory: shown as such, no ratio
    assert "16,384 tokens x1/2" in section.group(1)  # position interpolation stated


def test_markdown_matches_the_report_table_and_bad_records_name_the_key(tmp_path: Path, capsys) -> None:
    record = record_with()
    text = table.markdown(record)
    assert text.splitlines()[2].startswith("| 2,048 | 512 | 3.00 s | 6.00 s | 0.50x |")
    broken = copy.deepcopy(record)
    del broken["rows"][0]["variants"]["s2"]["step_s_median"]
    cases = {"missing.json": None, "not_json.json": "{", "other.json": json.dumps({"benchmark": "lora_step"}),
             "broken.json": json.dumps(broken)}
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        assert bench.main(["--markdown", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {tmp_path / name}:") and "\n" not in err, err
    assert "rows[0].variants.s2.step_s_median" in str(pytest.raises(ResultFileError, table.read, tmp_path / "broken.json").value)
