"""Image classification for the surgical fine-tuning reproduction (Lee et al., ICLR 2023, arXiv 2210.11466).

A small ResNet-style CNN with four stages is pretrained once on a source task and cached; the
target tasks then shift the data the way the paper does:

- input-level: the same classes under a corruption at high severity (like CIFAR-10-C);
- feature-level: superclasses whose subclasses differ between source and target (like BREEDS);
- output-level: the same images under a fixed label permutation (like CIFAR-Flip).

Images come from Fashion-MNIST (Debian package dataset-fashion-mnist); where it is missing, from
scikit-learn's 8x8 digits scaled to 28x28, and every result records which one ran.

The splits never overlap: the source model trains on the first 50,000 train images; target
train and validation rows come from the other 10,000 (validation fixed, training rows drawn by
the trial's seed), test rows from the official test split. Validation picks the learning rate
(in the report); test is only ever reported.

Decoding the images and shifting them cost a trial more than a second, the same work every time:
both are done once per machine and kept as tensor files under bench.paths.cache_dir() (keyed by
the image files and everything the shift depends on), so a trial reads a few MB instead.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import uuid
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bench.paths import cache_dir
from bench.tasks import registry

FMNIST_DIR = Path(os.environ.get("PEFTBENCH_FMNIST", "/usr/share/datasets/fashion-mnist"))
VERSION = 2
"""Bump when the architecture or the source training changes: cached source models are rebuilt."""
DATA_VERSION = 1
"""Bump when decoding, a shift or the choice of rows changes: cached images and target sets are rebuilt."""
FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SOURCE_TRAIN = 50_000
"""Fashion-MNIST train images the source model sees; the rest is the target pool."""
VAL_SIZE = 1_000
TEST_SIZE = 2_000
PIXEL_MEAN, PIXEL_STD = 0.286, 0.353  # Fashion-MNIST statistics, used for both sources
TOKENS_PER_IMAGE = 53.0
"""For the dry-run's cost estimate (FLOPs ~ 6 x params x tokens): each conv weight is applied at
49 (7x7) to 196 (14x14) positions per image, 53 on average over this CNN's weights."""


class VisionError(ValueError):
    """An unknown vision model or task, or a task that does not fit the model."""


# ---- the model ------------------------------------------------------------------------------


@dataclass
class ClassifierOutput:
    loss: Tensor | None
    logits: Tensor


class Stage(nn.Module):
    """A strided 3x3 conv into `out` channels, then one residual block; stage 1's conv is the stem."""

    def __init__(self, inp: int, out: int, stride: int):
        super().__init__()
        # Not named "norm": methods.layers.head_parameters takes a module named norm for the final norm.
        self.conv0 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.gn0 = nn.GroupNorm(8, out)
        self.conv1 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.gn1 = nn.GroupNorm(8, out)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(8, out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.gn0(self.conv0(x)))
        return F.relu(x + self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x))))))


class ResNet4(nn.Module):
    """Four stages (28 -> 14 -> 7 -> 7 -> 7 pixels), global average pooling, a linear classifier.

    GroupNorm rather than BatchNorm: a frozen block then stays exactly frozen in train mode
    (BatchNorm would keep adapting its running statistics in every block, a change of its own)."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 48, 64), strides: tuple[int, ...] = (2, 2, 1, 1)):
        super().__init__()
        self.stages = nn.ModuleList(Stage(i, o, s) for i, o, s in zip((1, *widths[:-1]), widths, strides, strict=True))
        self.classifier = nn.Linear(widths[-1], num_classes)
        self.register_buffer("mean", torch.tensor(PIXEL_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(PIXEL_STD), persistent=False)

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None) -> ClassifierOutput:
        x = (pixel_values - self.mean) / self.std
        for stage in self.stages:
            x = stage(x)
        logits = self.classifier(x.mean(dim=(2, 3)))
        return ClassifierOutput(F.cross_entropy(logits, labels) if labels is not None else None, logits)


# ---- images ---------------------------------------------------------------------------------


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def source_name() -> str:
    """The image source that runs here: fashion-mnist if its files exist, else sklearn-digits."""
    return "fashion-mnist" if all((FMNIST_DIR / f).exists() for f in FMNIST_FILES) else "sklearn-digits"


class CacheWarning(UserWarning):
    """A cached tensor file that could not be read back (truncated, corrupted): it is rebuilt."""


def _fingerprint(source: str) -> list[Any]:
    """What decoded images depend on, cheap enough to check on every read: each Fashion-MNIST file's
    path, size and modification time (a reinstalled or replaced dataset rebuilds the cache), or
    scikit-learn's version for the digits it bundles."""
    if source == "fashion-mnist":
        return [[str(FMNIST_DIR / f), (st := (FMNIST_DIR / f).stat()).st_size, st.st_mtime_ns] for f in FMNIST_FILES]
    from importlib import metadata

    try:
        return [metadata.version("scikit-learn")]
    except metadata.PackageNotFoundError:
        return [None]  # decoding then fails with the import error itself


def _checksum(tensors: dict[str, Tensor]) -> str:
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(tensors[name].contiguous().numpy(), crc)
    return f"{crc:08x}"


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """A cached tensor file, checked against the checksum stored in it; anything else raises ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    raw = path.read_bytes()
    try:
        tensors = load(raw)  # checks the header against the file's length
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    except (SafetensorError, ValueError, RuntimeError) as exc:  # ValueError covers bad UTF-8 or JSON in the header
        raise ValueError(f"unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    stored = (header.get("__metadata__") or {}).get("crc32")
    if stored != (found := _checksum(tensors)):
        raise ValueError(f"checksum {found} does not match the stored {stored}")
    return tensors


def cached_tensors(kind: str, key: list[Any], build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """`build()`'s tensors, built once per machine: later calls read them back from
    cache_dir()/data/vision/<kind>-<hash of DATA_VERSION and key>.safetensors, bit for bit. A file
    that cannot be read back or fails its checksum is rebuilt, with a CacheWarning."""
    from safetensors.torch import save_file

    digest = hashlib.sha256(json.dumps([DATA_VERSION, kind, key]).encode()).hexdigest()[:16]
    path = cache_dir() / "data" / "vision" / f"{kind}-{digest}.safetensors"
    if path.exists():
        try:
            return _read_tensors(path)
        except (OSError, ValueError) as exc:
            warnings.warn(f"{path}: {exc}; rebuilding it", CacheWarning, stacklevel=2)
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:  # each tensor in its own storage: safetensors refuses views that share one
        save_file({k: v.clone() for k, v in tensors.items()}, str(tmp), metadata={"crc32": _checksum(tensors)})
        tmp.replace(path)  # a reader sees the whole file or none; two builders write identical files
    finally:
        tmp.unlink(missing_ok=True)
    return tensors


@functools.cache
def images(source: str) -> dict[str, tuple[Tensor, Tensor]]:
    """{"source", "pool", "test"}: (images N x 1 x 28 x 28 in [0, 1], labels), disjoint; decoded once
    per machine (cached_tensors), then read back."""
    if source not in ("fashion-mnist", "sklearn-digits"):
        raise VisionError(f"unknown image source {source!r} (known: fashion-mnist, sklearn-digits)")
    flat = cached_tensors(f"images-{source}", [source, _fingerprint(source), SOURCE_TRAIN],
                          lambda: {f"{part}.{k}": t for part, rows in _decode(source).items() for k, t in zip("xy", rows)})
    return {part: (flat[f"{part}.x"], flat[f"{part}.y"]) for part in ("source", "pool", "test")}


def _decode(source: str) -> dict[str, tuple[Tensor, Tensor]]:
    if source == "fashion-mnist":
        x = torch.from_numpy(_idx(FMNIST_DIR / "train-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
        y = torch.from_numpy(_idx(FMNIST_DIR / "train-labels-idx1-ubyte.gz").copy()).long()
        xt = torch.from_numpy(_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz").copy()).float().div(255).unsqueeze(1)
        yt = torch.from_numpy(_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz").copy()).long()
        return {"source": (x[:SOURCE_TRAIN], y[:SOURCE_TRAIN]), "pool": (x[SOURCE_TRAIN:], y[SOURCE_TRAIN:]), "test": (xt, yt)}
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = F.interpolate(torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1), size=28, mode="bilinear")
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    a, b = int(0.6 * len(y)), int(0.8 * len(y))  # 60% source, 20% target pool, 20% test
    return {"source": (x[:a], y[:a]), "pool": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}


# ---- shifts ---------------------------------------------------------------------------------

# Superclasses for the feature-level shift: (source subclasses, target subclasses), disjoint.
HIERARCHY: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    # Fashion-MNIST: 0 T-shirt, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot
    "fashion-mnist": {"short-sleeved top": ((0,), (6,)), "warm top": ((2,), (4,)), "shoe": ((5, 7), (9,)), "long garment": ((1,), (3,))},
    "sklearn-digits": {"round": ((0,), (6,)), "stroke": ((1,), (7,)), "curve": ((2,), (5,)), "loop": ((3,), (8,))},
}


def _generator(*key: Any) -> torch.Generator:
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def gaussian_noise(x: Tensor, sigma: float, key: Any) -> Tensor:
    return (x + sigma * torch.randn(x.shape, generator=_generator("noise", key))).clamp(0, 1)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


def contrast(x: Tensor, c: float) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean


def flip_labels(y: Tensor, n_classes: int) -> Tensor:
    """The fixed permutation y -> n - 1 - y (CIFAR-Flip's): a derangement for an even class count."""
    return n_classes - 1 - y


@dataclass(frozen=True)
class Task:
    level: str
    """input, feature or output: the kind of shift, as the paper names them."""
    source: str
    """The source training the task's model needs: "classes" (all classes) or "super" (superclasses)."""
    describe: str
    corrupt: Callable[[Tensor, Any], Tensor] | None = None
    flip: bool = False


# Severities chosen high (severity 5 of CIFAR-10-C / ImageNet-C in spirit): each cuts the source
# model's test accuracy by tens of points; the suite's frozen trials measure it ("No tuning").
TASKS: dict[str, Task] = {
    "fmnist-noise": Task("input", "classes", "Gaussian noise, sigma 0.5", lambda x, k: gaussian_noise(x, 0.5, k)),
    "fmnist-blur": Task("input", "classes", "Gaussian blur, sigma 2", lambda x, k: gaussian_blur(x, 2.0)),
    "fmnist-contrast": Task("input", "classes", "contrast x0.05", lambda x, k: contrast(x, 0.05)),
    "fmnist-subpop": Task("feature", "super", "superclasses, target subclasses unseen in pretraining"),
    "fmnist-flip": Task("output", "classes", "labels permuted y -> 9 - y", flip=True),
}


def _superclass_rows(x: Tensor, y: Tensor, source: str, side: int) -> tuple[Tensor, Tensor]:
    """Rows of the source (side 0) or target (side 1) subclasses, relabelled by superclass."""
    mapping = {sub: i for i, (_, sides) in enumerate(HIERARCHY[source].items()) for sub in sides[side]}
    keep = torch.tensor([int(v) in mapping for v in y])
    return x[keep], torch.tensor([mapping[int(v)] for v in y[keep]], dtype=torch.long)


def num_classes(source_kind: str, source: str) -> int:
    return len(HIERARCHY[source]) if source_kind == "super" else 10


def source_rows(kind: str, source: str) -> tuple[Tensor, Tensor]:
    x, y = images(source)["source"]
    return _superclass_rows(x, y, source, 0) if kind == "super" else (x, y)


def candidates(task: str, part: str, source: str) -> tuple[Tensor, Tensor]:
    """A task's rows of the target pool or the test split ("pool", "test"), before the shift
    (the feature-level task keeps the target subclasses, labelled by superclass)."""
    x, y = images(source)[part]
    return _superclass_rows(x, y, source, 1) if get_task(task).level == "feature" else (x, y)


def shift(task: str, x: Tensor, y: Tensor, key: Any) -> tuple[Tensor, Tensor]:
    """Apply a task's input corruption and label permutation; `key` seeds the noise, so the same
    rows with the same key always give the same images."""
    t = get_task(task)
    if t.corrupt is not None:
        x = t.corrupt(x, key)
    return x, flip_labels(y, 10) if t.flip else y


def get_task(name: str) -> Task:
    if name not in TASKS:
        import difflib

        close = difflib.get_close_matches(name, TASKS, n=2)
        raise VisionError(
            f"unknown vision task {name!r}{'; did you mean ' + ' or '.join(close) + '?' if close else ''} (known: {', '.join(TASKS)})"
        )
    return TASKS[name]


class Rows(torch.utils.data.Dataset):
    """Images and labels as the rows the training loop batches: {"pixel_values", "labels"}."""

    def __init__(self, x: Tensor, y: Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def collate(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def target_sets(task: str, n_train: int, seed: int) -> tuple[Rows, dict[str, Rows], dict[str, Any]]:
    """(train, {"val", "test"}, info): validation is the pool's first VAL_SIZE rows, training rows
    are drawn from the rest by `seed`, test is the first TEST_SIZE rows of the test split. Each set
    is shifted once per machine and read back from the cache after that (cached_tensors)."""
    source = source_name()
    t = get_task(task)
    # Everything the rows depend on besides the code (DATA_VERSION): the images, the task, the split sizes.
    key = [task, t.describe, t.level, t.flip, source, _fingerprint(source), SOURCE_TRAIN, VAL_SIZE, HIERARCHY[source]]
    scored = cached_tensors(f"{task}-scored", [*key, TEST_SIZE], lambda: _scored_rows(task, source))
    train = cached_tensors(f"{task}-train", [*key, n_train, seed], lambda: _train_rows(task, source, n_train, seed))
    info = {
        "source": source,
        "task": task,
        "shift": t.level,
        "describe": t.describe,
        "train_rows": len(train["y"]),
        "train_rows_asked": n_train,
        "val_rows": len(scored["val.y"]),
        "test_rows": len(scored["test.y"]),
    }
    return Rows(train["x"], train["y"]), {part: Rows(scored[f"{part}.x"], scored[f"{part}.y"]) for part in ("val", "test")}, info


def _val_size(pool_rows: int) -> int:
    return min(VAL_SIZE, pool_rows // 3)  # the small digits pool keeps two thirds for training


def _train_rows(task: str, source: str, n_train: int, seed: int) -> dict[str, Tensor]:
    x, y = candidates(task, "pool", source)
    n_val = _val_size(len(y))
    order = n_val + torch.randperm(len(y) - n_val, generator=torch.Generator().manual_seed(seed))[:n_train]
    # Shift only the rows used: corrupting whole splits would cost seconds.
    x, y = shift(task, x[order], y[order], [task, source, "train", seed])
    return {"x": x, "y": y}


def _scored_rows(task: str, source: str) -> dict[str, Tensor]:
    x, y = candidates(task, "pool", source)
    n_val = _val_size(len(y))
    xt, yt = candidates(task, "test", source)
    val = shift(task, x[:n_val], y[:n_val], [task, source, "val"])
    test = shift(task, xt[:TEST_SIZE], yt[:TEST_SIZE], [task, source, "test"])
    return {"val.x": val[0], "val.y": val[1], "test.x": test[0], "test.y": test[1]}


@dataclass(eq=False)
class VisionTask(registry.Task):
    """An image task in the task registry: its rows are target_sets, scored by accuracy."""

    name: str
    needs_tokenizer = False

    def prepare(self, spec: dict[str, Any], tokenizer: Any, seed: int) -> registry.Prepared:
        train, scored, info = target_sets(self.name, spec["train_examples"], seed)
        return registry.Prepared(train, collate, scored, info)


for _name in TASKS:
    registry.register(VisionTask(_name))


# ---- pretrained source models, cached ---------------------------------------------------------

MODELS: dict[str, str] = {"cnn4-fmnist": "classes", "cnn4-fmnist-super": "super"}
"""Model name -> the source training it gets (all ten classes, or the superclasses of the source subclasses)."""
PRETRAIN = {"epochs": 2, "min_steps": 600, "batch_size": 128, "lr": 2e-3, "weight_decay": 1e-4, "seed": 0}
"""Source training; small sources (the digits fallback) get more epochs, up to min_steps steps."""


def mismatch(model: str, task: str, lm_eval_tasks: list[str]) -> str | None:
    """Why a model cannot run a task (None when it can): a vision task needs the vision model
    pretrained for it, and a vision model has no tokenizer for text tasks or lm-eval."""
    if task in TASKS:
        wanted = [m for m, kind in MODELS.items() if kind == TASKS[task].source]
        if model not in wanted:
            return f"vision task {task!r} needs the model pretrained for it ({' or '.join(wanted)}), not {model!r}"
    elif model in MODELS:
        return f"vision model {model!r} runs the vision tasks only ({', '.join(t for t in TASKS if TASKS[t].source == MODELS[model])})"
    if model in MODELS and lm_eval_tasks:
        return f"vision model {model!r} has no tokenizer for lm-eval tasks ({', '.join(lm_eval_tasks)}): leave eval.tasks empty"
    return None


def build(name: str, device: torch.device | str = "cpu") -> nn.Module:
    """The untrained architecture of a vision model (also on the meta device, for suite validation)."""
    if name not in MODELS:
        raise VisionError(f"unknown vision model {name!r} (known: {', '.join(MODELS)})")
    with torch.device(device):
        return ResNet4(num_classes(MODELS[name], source_name()))


def _cache_path(name: str, source: str) -> Path:
    key = json.dumps([VERSION, name, source, PRETRAIN])
    return cache_dir() / "models" / "vision" / f"{name}-{source}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def pretrained(name: str) -> tuple[nn.Module, dict[str, Any]]:
    """The source model, trained once and then read from the cache (about a second)."""
    from safetensors.torch import load_file, save_file

    source = source_name()
    path = _cache_path(name, source)
    if not (path / "model.safetensors").exists():
        # The initial weights are part of the source training: seeded, and without touching the
        # caller's random state.
        with torch.random.fork_rng():
            torch.manual_seed(PRETRAIN["seed"])
            model = build(name)
            info = _pretrain(model, MODELS[name], source)
        tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex}")
        tmp.mkdir(parents=True)
        save_file(model.state_dict(), str(tmp / "model.safetensors"))
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, path)
        except OSError:  # another process cached it first; the two are identical (fixed seed)
            import shutil

            shutil.rmtree(tmp)
    with torch.random.fork_rng():  # the random init is overwritten: leave the caller's state alone
        model = build(name)
    model.load_state_dict(load_file(str(path / "model.safetensors")))
    model.eval()
    return model, {**json.loads((path / "info.json").read_text()), "cache": str(path)}


def _pretrain(model: nn.Module, kind: str, source: str) -> dict[str, Any]:
    import time

    start = time.perf_counter()
    x, y = source_rows(kind, source)
    p = PRETRAIN
    torch.manual_seed(p["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    per_epoch = math.ceil(len(y) / p["batch_size"])
    epochs = max(p["epochs"], math.ceil(p["min_steps"] / per_epoch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p["lr"], total_steps=epochs * per_epoch)
    gen = torch.Generator().manual_seed(p["seed"])
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(p["batch_size"]):
            model(x[idx], y[idx]).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = images(source)["test"]
    if kind == "super":
        xt, yt = _superclass_rows(xt, yt, source, 0)
    acc = accuracy(model, Rows(xt, yt))
    return {
        "source": source,
        "kind": kind,
        "pretrain": p,
        "epochs": epochs,
        "source_rows": len(y),
        "source_test_accuracy": acc,
        "pretrain_s": time.perf_counter() - start,
    }


def accuracy(model: nn.Module, rows: Any, collate_fn: Callable[[list[Any]], dict[str, Tensor]] = collate,
             batch_size: int = 500) -> float:
    """Top-1 accuracy of a classifier (`model(**batch).logits` against batch["labels"]) over `rows`:
    how the image tasks' scored splits are measured."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                batch = collate_fn([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
                labels = batch.pop("labels").to(device)
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                correct += int((logits.argmax(-1) == labels).sum())
    finally:
        model.train(was_training)
    return correct / len(rows)
