"""Serving many LoRA adapters from one base model, mixed in one batch.

S-LoRA: Serving Thousands of Concurrent LoRA Adapters (Sheng et al. 2023, arXiv 2311.03285), with
the batched gather-matmul of Punica: Multi-Tenant LoRA Serving (Chen et al. 2023, arXiv 2310.18547).

The base layers run once for the whole batch; each row then adds its own adapter's update
x A^T (s B)^T, with A and B gathered per row from slabs of adapter slots on the compute device
(index_select once per batch, then two batched matmuls per layer and step, the add fused into the
second). Adapters live in host memory (AdapterPool) and are
copied into device slots on demand (DeviceCache); the number of slots follows from a byte budget,
and a new adapter evicts the least recently used one that the current batch does not need.

Semantics of bad input: registering an adapter whose rank exceeds the slot rank, whose tensors do
not fit the served layers' shapes, or which names a layer the server does not serve raises
ServingError naming the adapter, the layer and both shapes, and leaves the pool unchanged. An
adapter of a lower rank is zero-padded to the slot rank, which adds exact zeros. In
`Server.generate`, a request naming an unknown adapter or carrying a bad prompt gets a Result with
`error` set; the other requests of the batch run and return their outputs.

Differences from the paper: one fixed-size slot per adapter instead of unified paging shared with
the KV cache; no custom kernels, so the per-row copies of A and B are gathered once per batch
(batch x slot bytes while it runs) where S-LoRA's kernels read the slots in place; the caller
forms the batches (no iteration-level scheduling).
"""

from __future__ import annotations

import difflib
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from methods.base import Targets, load_safetensors
from methods.layers import resolve_targets
from methods.lora import CONFIG_FILE, PEFT_PREFIX, WEIGHTS_FILE, LoRALinear, features, lora_layers, read_adapter_config


class ServingError(ValueError):
    """An adapter or a request the server cannot serve; the message names it and says why."""


@dataclass(frozen=True)
class HostAdapter:
    """One adapter in host memory, laid out for the batched matmuls."""

    name: str
    rank: int
    factors: dict[str, tuple[Tensor, Tensor]]
    """Per served layer: A^T (in x r) and scaling * B^T (r x out)."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.factors.values() for t in pair)


class AdapterPool:
    """Adapters in host memory, each checked against the served layers when it is added."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], max_rank: int, dtype: torch.dtype = torch.float32, pin_memory: bool = False):
        if max_rank < 1:
            raise ServingError(f"max_rank must be >= 1, got {max_rank}")
        self.shapes = dict(shapes)
        self.max_rank = max_rank
        self.dtype = dtype
        # Pinned pages let a CUDA copy run asynchronously; on a CPU-only machine there is nothing to pin for.
        self.pin_memory = pin_memory
        self.adapters: dict[str, HostAdapter] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def __getitem__(self, name: str) -> HostAdapter:
        return self.adapters[name]

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.adapters.values())

    def add(self, name: str, weights: Mapping[str, tuple[Tensor, Tensor]], scaling: float | Mapping[str, float]) -> None:
        """Add an adapter given as {layer: (A (r x in), B (out x r))} in methods.lora's layout, with
        the scale alpha / r (one number, or one per layer)."""
        where = f"adapter {name!r}"
        if not isinstance(name, str) or not name:
            raise ServingError(f"adapter names must be non-empty strings, got {name!r}")
        if name in self.adapters:
            raise ServingError(f"{where} is already registered")
        if not weights:
            raise ServingError(f"{where} has no LoRA tensors")
        ranks = set()
        factors = {}
        for layer, (a, b) in weights.items():
            if layer not in self.shapes:
                close = difflib.get_close_matches(layer, list(self.shapes), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ServingError(
                    f"{where}: layer {layer!r} is not served by this model{hint}; "
                    f"served: {len(self.shapes)} layers such as {next(iter(self.shapes))!r}"
                )
            n_in, n_out = self.shapes[layer]
            r = a.shape[0] if a.dim() == 2 else -1
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != n_in or b.shape != (n_out, r):
                raise ServingError(
                    f"{where}, layer {layer!r}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit the "
                    f"served layer (in {n_in}, out {n_out}): expected A (r, {n_in}) and B ({n_out}, r); "
                    "an adapter trained for another base model?"
                )
            ranks.add(r)
            s = scaling[layer] if isinstance(scaling, Mapping) else scaling
            if not math.isfinite(s):
                raise ServingError(f"{where}, layer {layer!r}: scaling is {s}")
            factors[layer] = (a.detach().T.to("cpu", self.dtype).contiguous(), (b.detach() * s).T.to("cpu", self.dtype).contiguous())
        if len(ranks) > 1:
            raise ServingError(f"{where}: its layers have different ranks {sorted(ranks)}")
        rank = ranks.pop()
        if not 1 <= rank <= self.max_rank:
            raise ServingError(
                f"{where}: rank {rank} does not fit the server's slot rank {self.max_rank} "
                "(lower ranks are zero-padded; raise max_rank to serve higher ones)"
            )
        if self.pin_memory:
            factors = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in factors.items()}
        self.adapters[name] = HostAdapter(name, rank, factors)

    def add_lora(self, name: str, model: nn.Module) -> None:
        """Add the adapter held by a model that methods.lora adapted (its LoRALinear layers)."""
        layers = lora_layers(model)
        if not layers:
            raise ServingError(f"adapter {name!r}: the model has no LoRA layers")
        for key, m in layers.items():
            if type(m) is not LoRALinear:  # DoRA and kin add more than B A: a gathered B A would drop it
                raise ServingError(f"adapter {name!r}, layer {key!r}: a {type(m).__name__}; only plain LoRA (B A) updates can be served")
        self.add(name, {k: (m.lora_A, m.lora_B) for k, m in layers.items()}, {k: m.scaling for k, m in layers.items()})

    def load(self, name: str, directory: str | Path) -> None:
        """Add an adapter saved in peft's format (methods.lora saves it; so does peft)."""
        directory = Path(directory)
        saved = read_adapter_config(directory / CONFIG_FILE)
        r, alpha = saved.get("r"), saved.get("lora_alpha")
        if not isinstance(r, int) or not isinstance(alpha, (int, float)) or r < 1:
            raise ServingError(
                f"{directory / CONFIG_FILE}: needs an integer r >= 1 and a number lora_alpha, got r={r!r}, lora_alpha={alpha!r}"
            )
        extras = [k for k in ("use_dora", "lora_bias") if saved.get(k)]
        if extras:
            raise ServingError(f"{directory / CONFIG_FILE}: {', '.join(extras)} set; only plain LoRA (B A) updates can be served")
        scaling = alpha / math.sqrt(r) if saved.get("use_rslora") else alpha / r
        state = load_safetensors(directory / WEIGHTS_FILE)
        weights: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            body = key.removeprefix(PEFT_PREFIX)
            for which in ("A", "B"):
                suffix = f".lora_{which}.weight"
                if body.endswith(suffix):
                    weights.setdefault(body.removesuffix(suffix), {})[which] = value
                    break
            else:
                raise ServingError(f"{directory / WEIGHTS_FILE}: tensor {key!r} is not a LoRA A or B weight")
        for layer, pair in weights.items():
            if set(pair) != {"A", "B"}:
                raise ServingError(f"{directory / WEIGHTS_FILE}: layer {layer!r} has lora_{''.join(pair)} but not both")
        try:
            self.add(name, {k: (p["A"], p["B"]) for k, p in weights.items()}, scaling)
        except ServingError as exc:
            raise ServingError(f"{directory}: {exc}") from None


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_in: int = 0
    """Bytes copied from the host pool into device slots."""


class DeviceCache:
    """Adapter slots on the compute device: one (in x r) and one (r x out) slab per served layer.

    The number of slots is the byte budget divided by one slot's bytes. A batch pins the slots
    of the adapters it names; a missing adapter takes a free slot or evicts the least recently
    used adapter outside the batch."""

    def __init__(self, pool: AdapterPool, budget_bytes: int, device: torch.device | str = "cpu"):
        self.pool = pool
        self.device = torch.device(device)
        itemsize = torch.empty((), dtype=pool.dtype).element_size()
        self.slot_bytes = sum((i + o) * pool.max_rank * itemsize for i, o in pool.shapes.values())
        self.n_slots = int(budget_bytes // self.slot_bytes)
        if self.n_slots < 1:
            raise ServingError(f"a device budget of {budget_bytes} bytes holds no adapter: one slot needs {self.slot_bytes} bytes")
        r = pool.max_rank
        self.At = {k: torch.zeros(self.n_slots, i, r, dtype=pool.dtype, device=self.device) for k, (i, o) in pool.shapes.items()}
        self.Bt = {k: torch.zeros(self.n_slots, r, o, dtype=pool.dtype, device=self.device) for k, (i, o) in pool.shapes.items()}
        self.resident: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def slots(self, names: Sequence[str]) -> Tensor:
        """The slot of each name (one per batch row), loading missing adapters first."""
        wanted = list(dict.fromkeys(names))
        if len(wanted) > self.n_slots:
            raise ServingError(f"a batch names {len(wanted)} distinct adapters; the device budget holds {self.n_slots}")
        for name in wanted:
            if name in self.resident:
                self.resident.move_to_end(name)
                self.stats.hits += 1
        for name in wanted:
            if name not in self.resident:
                self.stats.misses += 1
                self.resident[name] = slot = self._take_slot()
                self._copy_in(self.pool[name], slot)
        return torch.tensor([self.resident[n] for n in names], device=self.device)

    def _take_slot(self) -> int:
        if self.free:
            return self.free.pop()
        # Adapters of this batch were moved to the end: the first entry is outside the batch.
        _, slot = self.resident.popitem(last=False)
        self.stats.evictions += 1
        return slot

    @torch.no_grad()
    def _copy_in(self, adapter: HostAdapter, slot: int) -> None:
        r = adapter.rank
        for layer in self.pool.shapes:
            at, bt = self.At[layer][slot], self.Bt[layer][slot]
            if layer not in adapter.factors:  # an adapter on fewer layers: zeros elsewhere
                at.zero_()
                bt.zero_()
                continue
            a, b = adapter.factors[layer]
            at[:, :r].copy_(a, non_blocking=True)
            bt[:r].copy_(b, non_blocking=True)
            if r < self.pool.max_rank:  # padding: exact zeros in the sums
                at[:, r:].zero_()
                bt[r:].zero_()
        self.stats.bytes_in += adapter.nbytes


@dataclass
class BatchState:
    """The running batch's adapter factors, gathered once per batch for every wrapped layer: the
    rows stay the same through prefill and every decode step, so no step gathers again."""

    rows: dict[str, tuple[Tensor, Tensor]] | None = None
    """Per layer: A^T and B^T per row, (batch x in x r) and (batch x r x out); or, when every row
    names the same adapter, that adapter's (in x r) and (r x out) alone (plain matmuls)."""


class BatchedLoRALinear(nn.Module):
    """A frozen base layer plus, per batch row, the LoRA update of the adapter that row names."""

    def __init__(self, base_layer: nn.Module, name: str, state: BatchState):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.__dict__["state"] = state  # shared, not a submodule

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.state.rows is None:
            return out
        a, b = self.state.rows[self.name]
        if a.dim() == 2:  # one adapter for the whole batch: plain matmuls
            lhs, acc, matmul, addmatmul = x.reshape(-1, x.shape[-1]), out.reshape(-1, out.shape[-1]), torch.mm, torch.addmm
        else:
            n = a.shape[0]
            lhs, acc, matmul, addmatmul = x.reshape(n, -1, x.shape[-1]), out.reshape(n, -1, out.shape[-1]), torch.bmm, torch.baddbmm
        xa = matmul(lhs.to(a.dtype), a)
        if out.dtype == a.dtype:  # the add fused into the second matmul
            return addmatmul(acc, xa, b).view(out.shape)
        return out + matmul(xa, b).view(out.shape).to(out.dtype)


@dataclass(frozen=True)
class Request:
    adapter: str
    prompt: Sequence[int]
    max_new_tokens: int = 16


@dataclass
class Result:
    adapter: str
    tokens: list[int] | None = None
    logits: Tensor | None = None
    """(new tokens x vocab) raw logits, when asked for."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class Server:
    """A causal LM whose targeted linear layers serve any adapter of the pool, row by row."""

    model: nn.Module
    pool: AdapterPool
    cache: DeviceCache
    state: BatchState = field(default_factory=BatchState)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        targets: Targets,
        max_rank: int,
        budget_bytes: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Server:
        """Wrap `model`'s target layers in place (the model must hold no LoRA layers)."""
        if lora_layers(model) or any(isinstance(m, BatchedLoRALinear) for m in model.modules()):
            raise ServingError("the model already holds LoRA layers: serve from a plain base model")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        layers = resolve_targets(model, targets)
        pool = AdapterPool({n: features(m) for n, m in layers}, max_rank, dtype, pin_memory=device.type == "cuda")
        server = cls(model.eval(), pool, DeviceCache(pool, budget_bytes, device))
        for name, layer in layers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, BatchedLoRALinear(layer, name, server.state))
        return server

    @contextmanager
    def adapters(self, names: Sequence[str]) -> Iterator[None]:
        """Inside, row i of any forward uses adapter names[i] (all must be in the pool)."""
        slots = self.cache.slots(names)
        At, Bt = self.cache.At, self.cache.Bt
        if len(set(names)) == 1:
            s = int(slots[0])
            self.state.rows = {k: (At[k][s], Bt[k][s]) for k in At}
        else:
            self.state.rows = {k: (At[k].index_select(0, slots), Bt[k].index_select(0, slots)) for k in At}
        try:
            yield
        finally:
            self.state.rows = None

    def check(self, request: Request) -> str | None:
        """Why a request cannot be served, or None."""
        if request.adapter not in self.pool:
            known = list(self.pool.adapters)
            close = difflib.get_close_matches(str(request.adapter), known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(map(repr, close))}?" if close else f"registered: {', '.join(known[:5]) or 'none'}"
            return f"unknown adapter {request.adapter!r} ({len(known)} registered; {hint})"
        vocab = self.model.get_input_embeddings().num_embeddings
        if len(request.prompt) == 0:
            return "empty prompt"
        bad = [t for t in request.prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            return f"prompt token {bad[0]!r} is not an id in [0, {vocab})"
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            return f"max_new_tokens must be an integer >= 1, got {request.max_new_tokens!r}"
        return None

    def generate(self, requests: Sequence[Request], return_logits: bool = False) -> list[Result]:
        """Greedy decoding of every servable request, batched; the others get an error result."""
        results = [Result(r.adapter) for r in requests]
        good = []
        for i, r in enumerate(requests):
            results[i].error = self.check(r)
            if results[i].error is None:
                good.append(i)
        for chunk in self._chunks([requests[i].adapter for i in good]):
            rows = [good[j] for j in chunk]
            try:
                outs = self._decode([requests[i] for i in rows], return_logits)
            except Exception as exc:  # one failed batch must not take the server, or other batches, down
                outs = [Result(requests[i].adapter, error=f"batch failed: {type(exc).__name__}: {exc}") for i in rows]
            for i, out in zip(rows, outs):
                results[i] = out
        return results

    def _chunks(self, names: list[str]) -> list[list[int]]:
        """Consecutive runs of requests whose distinct adapters fit the device slots together."""
        chunks: list[list[int]] = []
        seen: set[str] = set()
        for i, name in enumerate(names):
            if not chunks or (name not in seen and len(seen) == self.cache.n_slots):
                chunks.append([])
                seen = set()
            chunks[-1].append(i)
            seen.add(name)
        return chunks

    @torch.no_grad()
    def _decode(self, requests: list[Request], return_logits: bool) -> list[Result]:
        ids, mask = left_pad([list(r.prompt) for r in requests], pad_id(self.model), self.cache.device)
        steps = max(r.max_new_tokens for r in requests)
        with self.adapters([r.adapter for r in requests]):
            out = greedy(self.model, ids, mask, steps, return_logits)
        new = out.sequences[:, ids.shape[1] :]
        logits = torch.stack(out.logits, dim=1) if return_logits else None
        return [
            Result(
                r.adapter, new[i, : r.max_new_tokens].tolist(), logits[i, : r.max_new_tokens].float().cpu() if logits is not None else None
            )
            for i, r in enumerate(requests)
        ]


def pad_id(model: nn.Module) -> int:
    cfg = model.generation_config if getattr(model, "generation_config", None) is not None else model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return 0 if pad is None else int(pad)


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths in one batch: left padding keeps every row's last token last."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def greedy(model: nn.Module, ids: Tensor, mask: Tensor, steps: int, return_logits: bool = False, **kwargs):
    """Exactly `steps` greedy tokens per row (EOS does not stop a row: every engine does equal work)."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        pad_token_id=pad_id(model),
        eos_token_id=None,
        output_logits=return_logits,
        return_dict_in_generate=True,
    )
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **kwargs)


def alone(model: nn.Module, request: Request) -> Result:
    """One request through a model that holds one adapter (methods.lora, or merged): the reference."""
    ids, mask = left_pad([list(request.prompt)], pad_id(model), next(model.parameters()).device)
    with torch.no_grad():
        out = greedy(model, ids, mask, request.max_new_tokens, True)
    return Result(request.adapter, out.sequences[0, ids.shape[1] :].tolist(), torch.stack(out.logits, 1)[0].float().cpu())
