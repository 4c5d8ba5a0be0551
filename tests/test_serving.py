"""S-LoRA-style serving (bench/serving/engine.py) and its benchmark (bench/serving/serve_bench.py), on tiny models.

The reference for every output is the same request alone through a model holding only that
adapter (methods.lora's LoRALinear, unmerged): logits within 1e-5, identical greedy tokens.
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import methods
from bench.serving import serve_bench, engine as serving
from bench.serving.engine import Request, Server, ServingError
from methods.base import AdapterFileError, ConfigError
from reports import serving as serving_report
from reports.results import ResultFileError
from tests.conftest import VOCAB, build_model

ATOL = 1e-5
TARGETS = "attention"


def random_adapter(base: torch.nn.Module, seed: int, r: int = 4, targets: str = TARGETS):
    """A model adapted by methods.lora with random A and B (B is zero at init: outputs would not differ)."""
    lora = methods.get("lora")
    adapted = lora.apply(copy.deepcopy(base), lora.Config(r=r, alpha=2 * r, targets=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.trainable:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return adapted


def requests(names: list[str], seed: int = 0, new: int = 4) -> list[Request]:
    """Prompts of different lengths, so batches are left-padded."""
    rnd = random.Random(seed)
    return [Request(n, [rnd.randrange(3, VOCAB) for _ in range(rnd.randint(2, 9))], new) for n in names]


def assert_alone(result: serving.Result, reference_model: torch.nn.Module, request: Request) -> None:
    ref = serving.alone(reference_model, request)
    assert result.ok, result.error
    assert result.tokens == ref.tokens
    assert result.logits.shape == ref.logits.shape
    torch.testing.assert_close(result.logits, ref.logits, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def llama():
    return build_model("llama")


@pytest.fixture(scope="module")
def adapters(llama):
    return {f"a{i}": random_adapter(llama, seed=i) for i in range(8)}


def server_with(base, adapters: dict, max_rank: int = 4, slots: int = 16, targets: str = TARGETS) -> Server:
    probe = Server.build(copy.deepcopy(base), targets, max_rank, budget_bytes=10**9)
    srv = Server.build(copy.deepcopy(base), targets, max_rank, budget_bytes=slots * probe.cache.slot_bytes)
    for name, adapted in adapters.items():
        srv.pool.add_lora(name, adapted.model)
    return srv


# ---- Each request's output equals its adapter alone --------------------------------------------------


@pytest.mark.parametrize("n_adapters", [1, 3, 8])
@pytest.mark.parametrize("mix", ["uniform", "zipf", "sorted"])
def test_mixed_batch_equals_each_adapter_alone(llama, adapters, n_adapters, mix):
    chosen = dict(list(adapters.items())[:n_adapters])
    srv = server_with(llama, chosen)
    names = serve_bench.adapter_mix(n_adapters, "zipf" if mix == "zipf" else "uniform", 10, 1.0, np.random.default_rng(n_adapters))
    if mix == "sorted":  # rows of one adapter together: the layout of a grouped batch
        names = sorted(names)
    batch = requests(names, seed=n_adapters)
    out = srv.generate(batch, return_logits=True)
    for result, request in zip(out, batch):
        assert_alone(result, chosen[request.adapter].model, request)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_batch_on_cuda_equals_each_adapter_alone(llama, adapters):
    cuda = {k: copy.deepcopy(v) for k, v in list(adapters.items())[:5]}
    for a in cuda.values():
        a.model.cuda()
    srv = Server.build(copy.deepcopy(llama).cuda(), TARGETS, 4, budget_bytes=10**7)
    assert srv.pool.pin_memory and srv.cache.At["model.layers.0.self_attn.q_proj"].is_cuda
    for name, a in cuda.items():
        srv.pool.add_lora(name, a.model)
    batch = requests(["a0", "a3", "a1", "a4", "a3", "a2", "a0"], seed=2)
    for result, request in zip(srv.generate(batch, return_logits=True), batch):
        assert_alone(result, cuda[request.adapter].model, request)


def test_gpt2_conv1d_layers_fused_qkv(tmp_path):
    base = build_model("gpt2")
    ads = {f"g{i}": random_adapter(base, seed=10 + i, targets="all-linear") for i in range(3)}
    srv = server_with(base, ads, targets="all-linear")
    batch = requests(["g0", "g2", "g1", "g0", "g2"], seed=3)
    for result, request in zip(srv.generate(batch, return_logits=True), batch):
        assert_alone(result, ads[request.adapter].model, request)


def test_single_adapter_batch_takes_the_plain_path_and_matches(llama, adapters):
    srv = server_with(llama, adapters)
    batch = requests(["a5"] * 4, seed=7)
    with srv.adapters(["a5"] * 4):
        assert srv.state.rows["model.layers.0.self_attn.q_proj"][0].dim() == 2
    for result, request in zip(srv.generate(batch, return_logits=True), batch):
        assert_alone(result, adapters["a5"].model, request)


def test_lower_rank_adapters_are_zero_padded_exactly(llama, adapters):
    low = random_adapter(llama, seed=99, r=2)
    srv = server_with(llama, {"a0": adapters["a0"], "low": low}, max_rank=4)
    assert srv.pool["low"].rank == 2
    batch = requests(["low", "a0", "low", "a0"], seed=5)
    for result, request in zip(srv.generate(batch, return_logits=True), batch):
        assert_alone(result, {"a0": adapters["a0"], "low": low}[request.adapter].model, request)


def test_adapter_on_fewer_layers_gets_zeros_elsewhere(llama, adapters):
    qv = random_adapter(llama, seed=42, targets="qv")
    srv = server_with(llama, {"a1": adapters["a1"], "qv": qv})
    batch = requests(["qv", "a1", "qv"], seed=8)
    for result, request in zip(srv.generate(batch, return_logits=True), batch):
        assert_alone(result, {"a1": adapters["a1"], "qv": qv}[request.adapter].model, request)


# ---- Host pool, device slots, LRU ------------------------------------------------------------------


def test_budget_sets_slots_and_lru_evicts_the_least_recently_used(llama, adapters):
    srv = server_with(llama, adapters, slots=3)
    cache = srv.cache
    assert cache.n_slots == 3 and cache.nbytes == 3 * cache.slot_bytes
    cache.slots(["a0", "a1"])
    cache.slots(["a2"])
    cache.slots(["a0"])  # a0 is now the most recent: a1 is the least recently used
    assert list(cache.resident) == ["a1", "a2", "a0"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 3, 0)
    freed = cache.resident["a1"]
    slots = cache.slots(["a3", "a0"])
    assert "a1" not in cache.resident and cache.resident["a3"] == freed
    assert slots.tolist() == [freed, cache.resident["a0"]]
    assert cache.stats.evictions == 1
    assert cache.stats.bytes_in == sum(srv.pool[n].nbytes for n in ["a0", "a1", "a2", "a3"])


def test_eviction_never_takes_an_adapter_the_batch_needs(llama, adapters):
    srv = server_with(llama, adapters, slots=2)
    srv.cache.slots(["a0", "a1"])
    srv.cache.slots(["a1", "a2"])  # evicts a0, the only one outside the batch
    assert set(srv.cache.resident) == {"a1", "a2"}
    with pytest.raises(ServingError, match="3 distinct adapters; the device budget holds 2"):
        srv.cache.slots(["a3", "a4", "a5"])


def test_outputs_stay_exact_through_eviction_and_reload(llama, adapters):
    """Two slots, batches naming up to five adapters: the server cuts them into chunks that fit,
    evicts and reloads, and every output still equals its adapter alone."""
    srv = server_with(llama, adapters, slots=2)
    for seed, names in enumerate([["a0", "a1", "a2", "a0", "a3"], ["a4", "a0", "a4", "a1"], ["a2", "a2", "a5"]]):
        batch = requests(names, seed=20 + seed)
        for result, request in zip(srv.generate(batch, return_logits=True), batch):
            assert_alone(result, adapters[request.adapter].model, request)
    assert srv.cache.stats.evictions > 0
    assert len(srv.cache.resident) == 2


def test_chunks_respect_the_slot_count(llama, adapters):
    srv = server_with(llama, adapters, slots=2)
    assert srv._chunks(["a0", "a1", "a0", "a2", "a2", "a1", "a3"]) == [[0, 1, 2], [3, 4, 5], [6]]


def test_budget_below_one_slot_is_an_error(llama):
    with pytest.raises(ServingError, match="holds no adapter: one slot needs"):
        Server.build(copy.deepcopy(llama), TARGETS, 4, budget_bytes=10)


# ---- Bad input: clear errors, and the rest of the batch completes -----------------------------------


def test_bad_requests_get_errors_and_do_not_poison_the_batch(llama, adapters):
    srv = server_with(llama, adapters)
    good = requests(["a0", "a3", "a1", "a3"], seed=11)
    bad = [Request("a9", [5, 6, 7], 4), Request("a1", [], 4), Request("a1", [5, VOCAB + 3], 4), Request("a0", [5], 0)]
    batch = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3]]
    out = srv.generate(batch, return_logits=True)
    assert "unknown adapter 'a9' (8 registered; did you mean" in out[1].error
    assert out[3].error == "empty prompt"
    assert f"prompt token {VOCAB + 3} is not an id in [0, {VOCAB})" == out[5].error
    assert "max_new_tokens must be an integer >= 1" in out[7].error
    for i in (1, 3, 5, 7):
        assert not out[i].ok and out[i].tokens is None
    for i, request in zip((0, 2, 4, 6), good):
        assert_alone(out[i], adapters[request.adapter].model, request)


def test_a_failing_batch_reports_errors_for_its_rows_only(llama, adapters, monkeypatch):
    srv = server_with(llama, adapters, slots=1)
    real = srv._decode

    def decode(reqs, return_logits):
        if reqs[0].adapter == "a1":
            raise RuntimeError("device fell over")
        return real(reqs, return_logits)

    monkeypatch.setattr(srv, "_decode", decode)
    batch = requests(["a0", "a1", "a2"], seed=12)
    out = srv.generate(batch, return_logits=True)
    assert out[1].error == "batch failed: RuntimeError: device fell over"
    assert_alone(out[0], adapters["a0"].model, batch[0])
    assert_alone(out[2], adapters["a2"].model, batch[2])


def test_higher_rank_than_the_slots_is_rejected_and_the_pool_is_unchanged(llama, adapters):
    srv = server_with(llama, {"a0": adapters["a0"]}, max_rank=4)
    with pytest.raises(ServingError, match=r"adapter 'big': rank 8 does not fit the server's slot rank 4"):
        srv.pool.add_lora("big", random_adapter(llama, seed=3, r=8).model)
    assert "big" not in srv.pool and len(srv.pool) == 1
    out = srv.generate([Request("big", [4, 5], 2), *requests(["a0"], seed=1)], return_logits=True)
    assert "unknown adapter 'big'" in out[0].error
    assert_alone(out[1], adapters["a0"].model, requests(["a0"], seed=1)[0])


def test_adapter_for_another_base_shape_is_rejected(llama):
    srv = server_with(llama, {})
    other = random_adapter(build_model("llama", hidden=48), seed=1)
    with pytest.raises(
        ServingError,
        match=r"adapter 'wide', layer 'model\.layers\.0\.self_attn\.q_proj': A \(4, 48\) and B "
        r"\(48, 4\) do not fit the served layer \(in 32, out 32\)",
    ):
        srv.pool.add_lora("wide", other.model)
    assert len(srv.pool) == 0


def test_adapter_naming_an_unserved_layer_is_rejected(llama):
    srv = server_with(llama, {}, targets="qv")
    with pytest.raises(ServingError, match=r"layer 'model\.layers\.0\.self_attn\.k_proj' is not served by this model"):
        srv.pool.add_lora("kv", random_adapter(llama, seed=1, targets="kv").model)


def test_mixed_ranks_inside_one_adapter_and_duplicates_are_rejected(llama, adapters):
    srv = server_with(llama, {"a0": adapters["a0"]})
    layer = "model.layers.0.self_attn.q_proj"
    weights = {layer: (torch.zeros(4, 32), torch.zeros(32, 4)), "model.layers.1.self_attn.q_proj": (torch.zeros(2, 32), torch.zeros(32, 2))}
    with pytest.raises(ServingError, match=r"its layers have different ranks \[2, 4\]"):
        srv.pool.add("mixed", weights, 1.0)
    with pytest.raises(ServingError, match="'a0' is already registered"):
        srv.pool.add_lora("a0", adapters["a1"].model)


def test_server_refuses_a_model_that_already_has_lora_layers(adapters):
    with pytest.raises(ServingError, match="already holds LoRA layers"):
        Server.build(adapters["a0"].model, TARGETS, 4, 10**6)


# ---- peft's on-disk format --------------------------------------------------------------------------


def test_loads_adapters_saved_by_methods_lora(llama, adapters, tmp_path):
    srv = server_with(llama, {})
    for name in ("a2", "a6"):
        adapters[name].save(tmp_path / name)
        srv.pool.load(name, tmp_path / name)
    batch = requests(["a6", "a2", "a6"], seed=13)
    for result, request in zip(srv.generate(batch, return_logits=True), batch):
        assert_alone(result, adapters[request.adapter].model, request)


def test_loads_adapters_saved_by_peft_and_matches_peft(llama, tmp_path):
    peft = pytest.importorskip("peft")
    saved = {}
    for i, (r, rslora) in enumerate([(4, False), (2, True)]):
        model = peft.get_peft_model(
            copy.deepcopy(llama),
            peft.LoraConfig(r=r, lora_alpha=8, use_rslora=rslora, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(tmp_path / f"p{i}")
        saved[f"p{i}"] = model.eval()
    srv = server_with(llama, {})
    for name in saved:
        srv.pool.load(name, tmp_path / name)
    batch = requests(["p1", "p0", "p1", "p0"], seed=14)
    out = srv.generate(batch, return_logits=True)
    for result, request in zip(out, batch):
        ids, mask = serving.left_pad([list(request.prompt)], serving.pad_id(llama), torch.device("cpu"))
        with torch.no_grad():
            ref = serving.greedy(saved[request.adapter], ids, mask, request.max_new_tokens, True)
        assert result.tokens == ref.sequences[0, ids.shape[1] :].tolist()
        torch.testing.assert_close(result.logits, torch.stack(ref.logits, 1)[0], atol=ATOL, rtol=0)


def test_corrupt_or_foreign_adapter_files_are_clear_errors(llama, adapters, tmp_path):
    srv = server_with(llama, {})
    with pytest.raises(AdapterFileError, match="adapter config not found"):
        srv.pool.load("x", tmp_path / "nothing")
    adapters["a0"].save(tmp_path / "a0")
    (tmp_path / "a0" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        srv.pool.load("x", tmp_path / "a0")
    adapters["a1"].save(tmp_path / "a1")
    cfg = json.loads((tmp_path / "a1" / "adapter_config.json").read_text())
    (tmp_path / "a1" / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": "IA3"}))
    with pytest.raises(AdapterFileError, match="peft_type is 'IA3', expected 'LORA'"):
        srv.pool.load("x", tmp_path / "a1")
    (tmp_path / "a1" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(ServingError, match="use_dora set; only plain LoRA"):
        srv.pool.load("x", tmp_path / "a1")
    assert len(srv.pool) == 0


# ---- The benchmark -------------------------------------------------------------------------------------


def test_suite_file_loads_and_bad_keys_name_the_field(tmp_path):
    suite = serve_bench.load_suite(Path(__file__).resolve().parents[1] / "suites" / "serving.toml")
    assert 32 in suite.adapters and set(suite.engines) == set(serve_bench.ENGINES)
    bad = tmp_path / "bad.toml"
    bad.write_text("adapters = [1, 0]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: adapters: must be a non-empty list of integers >= 1"):
        serve_bench.load_suite(bad)
    bad.write_text('mixes = ["pareto"]\n')
    with pytest.raises(ConfigError, match=r"mixes: unknown \['pareto'\]"):
        serve_bench.load_suite(bad)
    bad.write_text("batchsize = 3\n")
    with pytest.raises(ConfigError, match="batchsize: unknown key"):
        serve_bench.load_suite(bad)


def test_zipf_mix_is_skewed_and_uniform_is_not():
    zipf = serve_bench.adapter_mix(32, "zipf", 4000, 1.0, np.random.default_rng(0))
    uniform = serve_bench.adapter_mix(32, "uniform", 4000, 1.0, np.random.default_rng(0))
    assert zipf.count("a0") / 4000 == pytest.approx(1 / sum(1 / k for k in range(1, 33)), abs=0.03)
    assert max(uniform.count(f"a{k}") for k in range(32)) < 3 * 4000 / 32


def test_benchmark_runs_every_engine_side_by_side(tmp_path):
    suite = serve_bench.ServingSuite.from_dict(
        dict(
            model="synthetic:llama-tiny",
            adapters=[1, 6],
            mixes=["uniform"],
            batch_sizes=[4],
            batches=2,
            prompt_tokens=6,
            new_tokens=3,
            reps=2,
            rank=4,
            alpha=8,
            budget_mib=0.1,
        )
    )
    seen = []
    result = serve_bench.run(suite, torch.device("cpu"), log=lambda _: None, on_cell=lambda r: seen.append(len(r["cells"])))
    assert seen == [1, 2] and result["complete"]
    assert [c["adapters"] for c in result["cells"]] == [1, 6]
    for cell in result["cells"]:
        assert set(cell["engines"]) == set(serve_bench.ENGINES)
        for e in cell["engines"].values():
            assert e["tokens"] == 8 * 3 and len(e["wall_s"]) == 2 and e["tokens_per_s"] > 0
            assert e["latency_p95_s"] >= e["latency_p50_s"] > 0
        # peft and merge-and-switch serve each request's own adapter: the same greedy tokens as ours
        assert cell["engines"]["peft"]["tokens_agree_with_slora"] == 1.0
        assert cell["engines"]["switch"]["tokens_agree_with_slora"] == 1.0
        assert set(cell["ratios"]) == {"slora_over_peft", "slora_over_switch", "slora_over_merged"}
    six = result["cells"][1]
    assert six["slora_cache"]["slots"] < 6 and six["slora_cache"]["evictions"] > 0  # the budget forces eviction
    assert result["memory"]["slora"]["adapters_host"] > 0

    (tmp_path / "serving.json").write_text(json.dumps(result | {"command": "test"}))
    page = serving_report.html(tmp_path)
    assert "against the targets" in page and "This run has no cell with 32 adapters" in page
    assert page.count("<svg") == 1 and "S-LoRA-style batch (ours)" in page and "evictions" in page
    assert "published.toml" not in page  # no published serving figures are compared here


def test_report_reads_result_files_only(tmp_path):
    code = "import reports.serving, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    (tmp_path / "x.json").write_text('{"kind": "trial"}')
    with pytest.raises(ResultFileError, match="not a serving result"):
        serving_report.load(tmp_path)
