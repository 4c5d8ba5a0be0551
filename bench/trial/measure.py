"""Measurement: peak memory (allocator on CUDA, process RSS on CPU), an accounted breakdown,
parameter counts and timing. The breakdown is computed, not sampled, so it is deterministic and
CI can hold it tightly; it also says *why* a method needs the memory it does.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn


def trial_device() -> torch.device:
    """Where trials train: the GPU when there is one, else the CPU (the worker, the runner's
    forecasts and its peak timing all ask here, so they agree)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores (its storage as allocated), so packed 4-bit weights count as stored."""
    return t.untyped_storage().nbytes()


def _unique(tensors) -> dict[int, torch.Tensor]:
    """One tensor per storage (tied weights count once); meta tensors, which have no storage, by identity."""
    out: dict[int, torch.Tensor] = {}
    for t in tensors:
        if t is not None:
            out.setdefault(id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr(), t)
    return out


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Stored bytes of parameters and buffers by dtype, each storage counted once (tied weights)."""
    by_dtype: dict[str, int] = {}
    tensors = list(model.parameters()) + list(model.buffers())
    # bitsandbytes keeps 4-bit quantization constants beside the packed weight.
    for p in model.parameters():
        tensors.append(getattr(p, "SCB", None))  # LLM.int8(): one fp32 scale per output row
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [getattr(state, "absmax", None), getattr(state, "code", None)]
            nested = getattr(state, "state2", None)
            if nested is not None:
                tensors += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    for t in _unique(tensors).values():
        key = str(t.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0) + tensor_bytes(t)
    return by_dtype


def grad_bytes(params: list[nn.Parameter]) -> int:
    return sum(tensor_bytes(t) for t in _unique(p.grad for p in params).values())


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(tensor_bytes(t) for t in _unique(tensors).values())


def storage_key(t: torch.Tensor) -> int:
    """What identifies a tensor's storage: its address, or on the meta device (no addresses) the
    storage object itself, which views share, so a forecast on a meta model counts as a real step does."""
    storage = t.untyped_storage()
    return storage._cdata if t.device.type == "meta" else storage.data_ptr()


@contextlib.contextmanager
def saved_for_backward(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Bytes autograd saves for backward inside the block: unique storages that are not
    parameters or buffers (saved weights are already counted as weights). Works on a meta model
    too (bench/trial/forecast.py), counting what a real step would store."""
    known = {storage_key(t) for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}
    result: dict[str, Any] = {"bytes": 0}

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in known:
            seen[key] = tensor_bytes(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result["bytes"] = sum(seen.values())
    result["sizes"] = list(seen.values())  # per storage: a forecast splits them by how the allocator serves them


def _proc_status(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field_name)


class PeakMemory:
    """Peak memory over a region. CUDA: allocator peaks. CPU: the process's resident-set
    high-water mark, reset at the start (Linux clear_refs) so model loading does not count."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "cuda_max_allocated" if device.type == "cuda" else "rss"

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.before_reserved = torch.cuda.memory_reserved(self.device)
        else:
            try:  # "5" resets VmHWM to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
                self.source = "rss"
            except OSError:
                self.source = "rss_getrusage"  # peak since process start; includes loading
            self.before = _proc_status("VmRSS")

    def stop(self) -> dict[str, int | str]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            return {"peak_bytes": peak, "peak_delta_bytes": peak - self.before, "before_bytes": self.before,
                    "peak_reserved_bytes": reserved, "peak_reserved_delta_bytes": reserved - self.before_reserved,
                    "peak_source": self.source}
        if self.source == "rss":
            peak = _proc_status("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": peak, "peak_delta_bytes": peak - self.before, "before_bytes": self.before,
                "peak_source": self.source}


@dataclass
class StepTimer:
    """Wall time per optimizer step; the median skips warm-up steps (allocator, caches)."""

    warmup: int = 2
    times: list[float] = field(default_factory=list)
    _t0: float = 0.0

    def __enter__(self) -> "StepTimer":
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)

    def median(self) -> float | None:
        steady = self.times[self.warmup :] or self.times
        return statistics.median(steady) if steady else None


def param_counts(model: nn.Module, trainable: list[nn.Parameter]) -> dict[str, int]:
    total = sum(_numel_stored(p) for p in _unique(model.parameters()).values())
    return {"trainable": sum(p.numel() for p in _unique(trainable).values()), "total": total}


def _numel_stored(p: torch.Tensor) -> int:
    # A packed 4-bit parameter holds two weights per byte; count weights, not bytes.
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
