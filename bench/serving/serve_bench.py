"""Many adapters on one base model: bench.serving.engine against the alternatives, side by side in one run.

    peftbench serve-bench suites/serving.toml [--out results/reference/serving] [--device cuda]

For each cell of the grid (number of adapters x request mix x batch size) the same requests, all
queued at once and cut into batches in arrival order, go through four engines, interleaved rep by
rep so that machine noise hits all of them alike:

  slora   bench.serving.engine: the base layers once per batch, each row's A and B gathered from device slots
  peft    Hugging Face peft's mixed batch: a PeftModel holding every adapter, `adapter_names=`
  switch  merge the adapter into the base weights and switch per request (the rows of a batch that
          name the same adapter share one merge: the most favourable order for it)
  merged  one adapter merged into the base serves every row: the upper bound, no LoRA cost at all

Every engine decodes exactly `new_tokens` greedy tokens per request. Throughput is generated
tokens per second of wall time in the fastest rep (the least disturbed by other load; the median
is recorded too); a request's latency runs from the start of its batch to the moment its tokens
are done (p50 / p95 over all requests and reps). Engines take turns batch by batch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import methods
from bench.records import results as bench_results
from bench.trial.measure import weight_bytes
from bench.serving.engine import Request, Server, greedy, left_pad, pad_id
from methods.base import Config, ConfigError, Targets
from methods.lora import lora_layers

ENGINES = ("slora", "peft", "switch", "merged")
MIXES = ("uniform", "zipf")


@dataclass(frozen=True, kw_only=True)
class ServingSuite(Config):
    """The grid of suites/serving.toml."""

    name: str = "serving"
    """The result file is <out>/<name>.json."""
    model: str = "smollm2-135m"
    """A model bench.models can load (packaged, synthetic:<name>, a path)."""
    dtype: str = "float32"
    """Base model dtype."""
    targets: Targets = "attention"
    """Layers every adapter adapts (S-LoRA's experiments adapt q, k, v, o)."""
    rank: int = 8
    """Rank of every adapter."""
    alpha: float = 16
    """LoRA alpha of every adapter."""
    adapters: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    """Numbers of distinct adapters the requests are spread over."""
    mixes: list[str] = field(default_factory=lambda: list(MIXES))
    """uniform: every adapter equally likely; zipf: adapter k with probability proportional to 1 / k^zipf_s."""
    zipf_s: float = 1.0
    """Exponent of the Zipf mix."""
    batch_sizes: list[int] = field(default_factory=lambda: [8, 32])
    """Requests per batch."""
    batches: int = 2
    """Batches per measurement (requests = batches x batch size)."""
    prompt_tokens: int = 32
    """Prompt length of every request (real text windows)."""
    new_tokens: int = 16
    """Greedy tokens generated per request."""
    budget_mib: float = 256
    """Device memory for bench.serving.engine's adapter slots; fewer slots than adapters exercises eviction."""
    reps: int = 2
    """Repetitions per cell; throughput is taken from the fastest (the least disturbed by other load)."""
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    """Which engines to run (slora is always run)."""
    seed: int = 0

    def validate(self) -> None:
        for key in ("rank", "batches", "prompt_tokens", "new_tokens", "reps"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("adapters", "batch_sizes"):
            values = getattr(self, key)
            if not values or min(values) < 1:
                raise ConfigError(key, f"must be a non-empty list of integers >= 1, got {values}")
        for key, allowed in (("mixes", MIXES), ("engines", ENGINES)):
            unknown = [v for v in getattr(self, key) if v not in allowed]
            if unknown or not getattr(self, key):
                raise ConfigError(key, f"unknown {unknown}; choose from {', '.join(allowed)}")
        if self.alpha <= 0 or self.zipf_s <= 0 or self.budget_mib <= 0:
            raise ConfigError("alpha/zipf_s/budget_mib", "must be > 0")


def load_suite(path: str | Path) -> ServingSuite:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (OSError, ValueError) as exc:  # ValueError: invalid TOML, or bytes that are not UTF-8
        raise ConfigError(str(path), f"cannot read the suite: {exc}") from None
    try:
        return ServingSuite.from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.key}", exc.message) from None


# ---- Workload --------------------------------------------------------------------------------------


def adapter_mix(n_adapters: int, mix: str, n_requests: int, zipf_s: float, rng: np.random.Generator) -> list[str]:
    if mix == "uniform":
        p = np.full(n_adapters, 1 / n_adapters)
    else:
        p = 1 / np.arange(1, n_adapters + 1) ** zipf_s
        p /= p.sum()
    return [f"a{k}" for k in rng.choice(n_adapters, size=n_requests, p=p)]


def prompts(model_name: str, tokenizer: Any, n: int, length: int, vocab: int, rng: np.random.Generator) -> list[list[int]]:
    """Real text windows (held-out book passages); random ids for a synthetic model."""
    if model_name.startswith("synthetic:"):
        return rng.integers(3, vocab, size=(n, length)).tolist()
    from bench.trial.evaluate import forgetting_texts

    ids = tokenizer("\n\n".join(forgetting_texts(64)))["input_ids"]
    starts = rng.integers(0, len(ids) - length, size=n)
    return [ids[s : s + length] for s in starts]


def make_adapters(base: nn.Module, suite: ServingSuite, n: int, directory: Path) -> list[Path]:
    """n random LoRA adapters made with methods.lora and saved in peft's format. B is random too
    (not zero as at initialisation), so that every adapter changes the outputs."""
    lora = methods.get("lora")
    adapted = lora.apply(copy.deepcopy(base), lora.Config(r=suite.rank, alpha=suite.alpha, targets=suite.targets))
    gen = torch.Generator().manual_seed(suite.seed)
    paths = []
    for i in range(n):
        with torch.no_grad():
            for layer in lora_layers(adapted.model).values():
                layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.in_features**0.5)
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.02)
        paths.append(adapted.save(directory / f"a{i}"))
    return paths


# ---- Engines ---------------------------------------------------------------------------------------


@dataclass
class Engine:
    name: str
    model: nn.Module
    run: Callable[[list[Request]], list[tuple[float, list[int]]]]
    """Serve one batch: each request's finish time (seconds after the batch started) and tokens."""
    memory: dict[str, int]
    stats: Callable[[], dict[str, Any]] = dict


def slora_engine(base: nn.Module, suite: ServingSuite, paths: list[Path], device: torch.device) -> Engine:
    server = Server.build(copy.deepcopy(base), suite.targets, suite.rank, int(suite.budget_mib * 2**20), device)
    for i, p in enumerate(paths):
        server.pool.load(f"a{i}", p)

    def run(batch: list[Request]) -> list[tuple[float, list[int]]]:
        t0 = time.perf_counter()
        out = server.generate(batch)
        sync(device)
        done = time.perf_counter() - t0
        bad = [r.error for r in out if not r.ok]
        if bad:
            raise RuntimeError(f"slora engine: {bad[0]}")
        return [(done, r.tokens) for r in out]

    def stats() -> dict[str, Any]:
        c = server.cache
        return {
            "slots": c.n_slots,
            "hits": c.stats.hits,
            "misses": c.stats.misses,
            "evictions": c.stats.evictions,
            "bytes_in": c.stats.bytes_in,
        }

    memory = {
        "weights": sum(weight_bytes(server.model).values()),
        "adapters_device": server.cache.nbytes,
        "adapters_host": server.pool.nbytes,
    }
    return Engine("slora", server.model, run, memory, stats)


def peft_engine(base: nn.Module, suite: ServingSuite, paths: list[Path], device: torch.device) -> Engine:
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name="a0")
    for i, p in enumerate(paths[1:], start=1):
        model.load_adapter(str(p), adapter_name=f"a{i}")
    model.eval()

    def run(batch: list[Request]) -> list[tuple[float, list[int]]]:
        return timed(model, batch, device, adapter_names=[r.adapter for r in batch])

    return Engine("peft", model, run, {"weights": sum(weight_bytes(model).values())})


def host_states(paths: list[Path]) -> dict[str, dict[str, torch.Tensor]]:
    from methods.base import load_safetensors
    from methods.lora import WEIGHTS_FILE

    return {f"a{i}": load_safetensors(p / WEIGHTS_FILE) for i, p in enumerate(paths)}


def lora_model(base: nn.Module, suite: ServingSuite):
    lora = methods.get("lora")
    cfg = lora.Config(r=suite.rank, alpha=suite.alpha, targets=suite.targets)
    return lora.apply(copy.deepcopy(base), cfg)


def switch_engine(base: nn.Module, suite: ServingSuite, paths: list[Path], device: torch.device) -> Engine:
    from methods.lora import PEFT_PREFIX

    adapted = lora_model(base, suite)
    layers = lora_layers(adapted.model)
    states = {name: {k: v.to(device) for k, v in s.items()} for name, s in host_states(paths).items()}
    current: list[str | None] = [None]

    @torch.no_grad()
    def switch(name: str) -> None:
        if current[0] == name:
            return
        state = states[name]
        for key, layer in layers.items():
            layer.unmerge()
            layer.lora_A.copy_(state[f"{PEFT_PREFIX}{key}.lora_A.weight"])
            layer.lora_B.copy_(state[f"{PEFT_PREFIX}{key}.lora_B.weight"])
            layer.merge()
        current[0] = name

    def run(batch: list[Request]) -> list[tuple[float, list[int]]]:
        t0 = time.perf_counter()
        out: list[tuple[float, list[int]]] = [(0.0, [])] * len(batch)
        for name in dict.fromkeys(r.adapter for r in batch):
            rows = [i for i, r in enumerate(batch) if r.adapter == name]
            switch(name)
            group = timed(adapted.model, [batch[i] for i in rows], device)
            for i, (_, tokens) in zip(rows, group):
                out[i] = (time.perf_counter() - t0, tokens)
        return out

    host = sum(t.numel() * t.element_size() for s in states.values() for t in s.values())
    return Engine("switch", adapted.model, run, {"weights": sum(weight_bytes(adapted.model).values()), "adapters_host": host})


def merged_engine(base: nn.Module, suite: ServingSuite, paths: list[Path], device: torch.device) -> Engine:
    adapted = lora_model(base, suite)
    adapted.load(paths[0])
    model = adapted.merge()

    def run(batch: list[Request]) -> list[tuple[float, list[int]]]:
        return timed(model, batch, device)

    return Engine("merged", model, run, {"weights": sum(weight_bytes(model).values())})


def timed(model: nn.Module, batch: list[Request], device: torch.device, **kwargs) -> list[tuple[float, list[int]]]:
    """One batched greedy decode; every row finishes when the batch does."""
    t0 = time.perf_counter()
    ids, mask = left_pad([list(r.prompt) for r in batch], pad_id(model), device)
    with torch.no_grad():
        seqs = greedy(model, ids, mask, max(r.max_new_tokens for r in batch), **kwargs).sequences[:, ids.shape[1] :]
    sync(device)
    done = time.perf_counter() - t0
    return [(done, seqs[i, : r.max_new_tokens].tolist()) for i, r in enumerate(batch)]


BUILDERS = {"slora": slora_engine, "peft": peft_engine, "switch": switch_engine, "merged": merged_engine}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- The run ---------------------------------------------------------------------------------------


def measure_cell(
    engines: dict[str, Engine], requests: list[Request], batch_size: int, reps: int, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Batch by batch, every engine serves the same batch before the next batch starts (the order
    rotates): a burst of load from elsewhere on the machine hits the engines alike."""
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    tokens = sum(r.max_new_tokens for r in requests)
    walls: dict[str, list[float]] = {e: [0.0] * reps for e in engines}
    latencies: dict[str, list[float]] = {e: [] for e in engines}
    tokens_of: dict[str, list[list[int]]] = {e: [] for e in engines}
    peaks: dict[str, int] = {}
    order = list(engines)
    for rep in range(reps):
        for b, batch in enumerate(batches):
            k = (rep * len(batches) + b) % len(order)
            for name in order[k:] + order[:k]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                served = engines[name].run(batch)
                walls[name][rep] += time.perf_counter() - t0
                latencies[name] += [finish for finish, _ in served]
                if rep == reps - 1:
                    tokens_of[name] += [tokens for _, tokens in served]
                if device.type == "cuda":
                    peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device) - before)
    out = {}
    for name in engines:
        lat = np.array(latencies[name])
        out[name] = {
            # Load from elsewhere only ever slows a rep down: the fastest rep is the least disturbed one.
            "tokens_per_s": tokens / min(walls[name]),
            "tokens_per_s_median": tokens / statistics.median(walls[name]),
            "wall_s": walls[name],
            "requests": len(requests),
            "tokens": tokens,
            "latency_p50_s": float(np.percentile(lat, 50)),
            "latency_p95_s": float(np.percentile(lat, 95)),
        }
        if name in peaks:
            out[name]["peak_activation_bytes"] = peaks[name]
        if name in ("peft", "switch"):  # they serve every request's own adapter, as slora does
            same = [a == b for ours, theirs in zip(tokens_of["slora"], tokens_of[name]) for a, b in zip(ours, theirs)]
            out[name]["tokens_agree_with_slora"] = sum(same) / len(same)
    return out


def run(
    suite: ServingSuite, device: torch.device, log: Callable[[str], None] = print, on_cell: Callable[[dict[str, Any]], None] | None = None
) -> dict[str, Any]:
    """The whole grid; `on_cell` gets the result so far after each cell (complete: false until the end)."""
    from bench import models

    torch.manual_seed(suite.seed)
    start = time.perf_counter()
    loaded = models.load({"name": suite.model, "dtype": suite.dtype}, seed=suite.seed, device=device)
    base = loaded.model.eval()
    rng = np.random.default_rng(suite.seed)
    vocab = base.get_input_embeddings().num_embeddings
    n_max = max(suite.adapters)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        t = time.perf_counter()
        paths = make_adapters(base, suite, n_max, Path(tmp))
        log(f"{n_max} adapters saved in peft format in {time.perf_counter() - t:.1f} s")
        engines = {}
        for name in ["slora"] + [e for e in suite.engines if e != "slora"]:
            t = time.perf_counter()
            engines[name] = BUILDERS[name](base, suite, paths, device)
            log(f"engine {name} ready in {time.perf_counter() - t:.1f} s")
    cells: list[dict[str, Any]] = []
    result = {
        "schema": 1,
        "kind": "serving",
        "benchmark": "serving",  # how reports/results.py tells it from trial results
        "complete": False,
        "suite": suite.to_dict(),
        "model": {"name": suite.model, "source": loaded.source, "synthetic": loaded.synthetic, "dtype": suite.dtype},
        "device": device.type,
        "threads": torch.get_num_threads(),
        "memory": {name: e.memory for name, e in engines.items()},
        "cells": cells,
        "wall_s": None,
        "env": bench_results.environment(torch.cuda.get_device_name(device) if device.type == "cuda" else None),
    }
    for n_adapters in suite.adapters:
        for mix in suite.mixes:
            for batch in suite.batch_sizes:
                n_requests = batch * suite.batches
                names = adapter_mix(n_adapters, mix, n_requests, suite.zipf_s, rng)
                texts = prompts(suite.model, loaded.tokenizer, n_requests, suite.prompt_tokens, vocab, rng)
                requests = [Request(a, p, suite.new_tokens) for a, p in zip(names, texts)]
                for e in engines.values():  # warm-up, untimed: allocator, caches, kernels
                    e.run(requests[: min(batch, 4)] if e.name != "switch" else requests[:1])
                before = engines["slora"].stats()
                res = measure_cell(engines, requests, batch, suite.reps, device)
                after = engines["slora"].stats()
                cache = {k: after[k] - before[k] for k in ("hits", "misses", "evictions", "bytes_in")} | {"slots": after["slots"]}
                ratios = {f"slora_over_{e}": res["slora"]["tokens_per_s"] / res[e]["tokens_per_s"] for e in res if e != "slora"}
                cell = {
                    "adapters": n_adapters,
                    "mix": mix,
                    "batch_size": batch,
                    "distinct_adapters": len(set(names)),
                    "engines": res,
                    "ratios": ratios,
                    "slora_cache": cache,
                }
                cells.append(cell)
                log(format_cell(cell))
                result["wall_s"] = time.perf_counter() - start
                if on_cell is not None:
                    on_cell(result)
    result["complete"] = True
    return result


def format_cell(cell: dict[str, Any]) -> str:
    head = f"{cell['adapters']:4d} adapters {cell['mix']:7s} batch {cell['batch_size']:3d}:"
    parts = [
        f"{e} {v['tokens_per_s']:7.1f} tok/s p50 {v['latency_p50_s']:.2f}s p95 {v['latency_p95_s']:.2f}s"
        for e, v in cell["engines"].items()
    ]
    ratios = "  ".join(f"{k.removeprefix('slora_over_')} x{v:.2f}" for k, v in cell["ratios"].items())
    return f"{head} " + " | ".join(parts) + f"\n      slora / {ratios}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="peftbench serve-bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return cmd(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", help="a serving suite, e.g. suites/serving.toml")
    parser.add_argument("--out", default="results/reference/serving", help="folder for <suite name>.json")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def cmd(args: argparse.Namespace) -> int:
    try:
        suite = load_suite(args.suite)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(args.out) / f"{suite.name}.json"
    command = f"peftbench serve-bench {args.suite} --out {args.out}" + (f" --device {args.device}" if args.device else "")

    def write(result: dict[str, Any]) -> None:  # after every cell: a killed run keeps what it measured
        bench_results.write(path, result | {"command": command})

    write(run(suite, device, on_cell=write))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
