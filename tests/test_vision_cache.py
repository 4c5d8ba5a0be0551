"""The per-machine cache of decoded and shifted images (bench/tasks/vision.py cached_tensors), and
what else a surgical trial no longer redoes: the frozen environment, the calibration blocks, and
calibrating after every Nth step only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.records import results
from bench.regression import calibrate, compare
from bench.run.suite import SuiteError, load
from bench.tasks import vision


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    return tmp_path / "data" / "vision"


@pytest.fixture
def small_images(monkeypatch):
    """A small stand-in for the decoded images (the real ones are 220 MB): the shifts and row
    choices run on it exactly as on Fashion-MNIST."""
    g = torch.Generator().manual_seed(0)

    def fake(source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {part: (torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
                for part, n in (("source", 64), ("pool", 1500), ("test", 600))}

    made = {source: fake(source) for source in ("fashion-mnist", "sklearn-digits")}
    monkeypatch.setattr(vision, "images", lambda source: made[source])
    return made


def _counted(tensors: dict[str, torch.Tensor]):
    calls = []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return tensors

    return build, calls


def test_built_once_then_read_back_bit_for_bit(cache) -> None:
    pool = torch.rand(10, 1, 28, 28)
    tensors = {"x": pool[2:7], "y": torch.arange(5)}  # a view into a larger tensor is stored as itself
    build, calls = _counted(tensors)
    first = vision.cached_tensors("t", ["key"], build)
    second = vision.cached_tensors("t", ["key"], build)
    assert calls == [1], "the second call must read the file, not rebuild"
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]  # no temp file left behind
    for name, value in tensors.items():
        assert torch.equal(second[name], value) and second[name].dtype == value.dtype and second[name].shape == value.shape
        assert torch.equal(first[name], value)
    vision.cached_tensors("t", ["another key"], build)
    assert len(calls) == 2 and len(list(cache.iterdir())) == 2, "another key is another file"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip a data byte"])
def test_a_damaged_file_is_rebuilt_with_a_warning(cache, damage: str) -> None:
    tensors = {"x": torch.rand(4, 1, 28, 28), "y": torch.arange(4)}
    build, calls = _counted(tensors)
    vision.cached_tensors("t", ["key"], build)
    (path,) = cache.iterdir()
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"\xff" * len(raw))
    else:  # a well-formed file whose data no longer matches its checksum
        raw[-5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.warns(vision.CacheWarning, match=str(path.name)):
        again = vision.cached_tensors("t", ["key"], build)
    assert len(calls) == 2 and all(torch.equal(again[k], v) for k, v in tensors.items())
    build_again, more = _counted(tensors)
    assert torch.equal(vision.cached_tensors("t", ["key"], build_again)["x"], tensors["x"]) and not more, "the rebuilt file reads back"


@pytest.mark.parametrize("task", list(vision.TASKS))
def test_cached_target_sets_equal_the_uncached_ones(cache, small_images, task: str) -> None:
    source = vision.source_name()
    built = vision.target_sets(task, 200, seed=1)  # a miss: shifts and stores
    read = vision.target_sets(task, 200, seed=1)  # a hit: reads back
    direct_train = vision._train_rows(task, source, 200, 1)  # the shift itself, no cache at all
    direct_scored = vision._scored_rows(task, source)
    for train, scored, _ in (built, read):
        assert torch.equal(train.x, direct_train["x"]) and torch.equal(train.y, direct_train["y"])
        for part in ("val", "test"):
            assert torch.equal(scored[part].x, direct_scored[f"{part}.x"]) and torch.equal(scored[part].y, direct_scored[f"{part}.y"])
            assert scored[part].x.dtype == torch.float32 and scored[part].y.dtype == torch.long
    assert built[2] == read[2] and read[2]["train_rows"] == 200 and read[2]["test_rows"] == len(direct_scored["test.y"])
    other = vision.target_sets(task, 200, seed=2)
    assert not torch.equal(other[0].x, read[0].x) or not torch.equal(other[0].y, read[0].y), "the seed draws other rows"
    assert torch.equal(other[1]["val"].x, read[1]["val"].x), "the scored rows are the task's, whatever the seed"


def test_frozen_environment_is_served_without_asking_git_again(monkeypatch) -> None:
    monkeypatch.setattr(results, "_FROZEN", None)
    fresh = results.environment()
    results.freeze_environment()
    monkeypatch.setattr(results, "_git", lambda *args: pytest.fail("git asked again after freeze_environment"))
    frozen = results.environment()
    assert frozen == fresh
    frozen["packages"]["torch"] = "changed by a caller"
    assert results.environment()["packages"] == fresh["packages"], "a caller's edit must not reach the next trial"
    assert results.environment("cuda: Some GPU")["device"] == "cuda: Some GPU"


def test_calibration_blocks_are_built_once_and_leave_the_seed_alone() -> None:
    rng = torch.get_rng_state()
    first = calibrate.Calibration(torch.device("cpu"))
    second = calibrate.Calibration(torch.device("cpu"))
    assert all(a is b for a, b in zip(first.blocks, second.blocks, strict=True))
    assert torch.equal(first.inputs, second.inputs) and torch.equal(torch.get_rng_state(), rng)


def test_calibrating_every_nth_step_pairs_each_calibration_with_its_step() -> None:
    steps = [0.1 * (i + 1) for i in range(10)]
    every_step = compare.ratios(steps, [0.1] * 10)
    # After steps 3, 6 and 9 (indices 2, 5, 8): each divided by the calibration timed after it.
    assert compare.ratios(steps, [0.1, 0.2, 0.3], every=3) == pytest.approx([3.0, 3.0, 3.0])
    assert compare.ratios(steps, [0.1, 0.1, 0.1], every=3) == pytest.approx([every_step[i - 2] for i in (2, 5, 8)])
    assert compare.step_ratio(steps, [0.1, 0.2, 0.3], 3) == pytest.approx(3.0)
    assert compare.ratios(steps, [], every=20) == [] and compare.step_ratio(steps, [], 20) is None


def test_calibrate_every_must_be_positive(tmp_path) -> None:
    suite = tmp_path / "s.toml"
    suite.write_text('name = "s"\n[model]\nname = "cnn4-fmnist"\n[data]\ntask = "fmnist-flip"\n[run]\ncalibrate_every = 0\n'
                     '[[sweep]]\nmethod = "frozen"\n')
    with pytest.raises(SuiteError, match="calibrate_every"):
        load(suite)
