from __future__ import annotations

import json
import math

import pytest
import torch
from lm_eval.api.model import LM

from bench.trial import evaluate
from bench.tasks.data import collate, examples
from bench.models import load


# Module-scoped fixtures run before the function-scoped `cache`, so the real model still
# comes from the real cache, while rendered tasks go to a temporary one.
@pytest.fixture(scope="module")
def tiny():
    return load({"name": "synthetic:llama-tiny"})


@pytest.fixture(scope="module")
def smollm2():
    return load({"name": "smollm2-135m"})


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTBENCH_CACHE", str(tmp_path))
    return tmp_path


class GoldLM(LM):
    """Answers every request with the gold continuation of its prompt."""

    max_length = 2048

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        self.gold = {e.prompt: e.answer for task in tasks for e in examples(task, "eval")}

    def loglikelihood(self, requests):
        return [(0.0 if self.gold[r.args[0]] == r.args[1] else -1.0, True) for r in requests]

    def generate_until(self, requests):
        return [self.gold[r.args[0]] for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_render_tasks_fills_in_the_data(cache) -> None:
    folder, names = evaluate.render_tasks(["piqa"])
    assert names == {"piqa": "piqa"}
    yaml = (folder / "piqa.yaml").read_text()
    assert "$DATA_FILE" not in yaml and json.dumps(str(folder / "piqa.jsonl")) in yaml
    rows = [json.loads(line) for line in (folder / "piqa.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == examples("piqa", "eval")[0].prompt and len(rows) == 1838


def test_gold_answers_score_one() -> None:
    # Checks the templates' plumbing: targets, delimiters, the "####" filter and the metric keys.
    tasks = ["boolq", "gsm8k"]
    scores = evaluate.harness_scores(GoldLM(tasks), tasks, limit=5)
    assert scores["boolq"]["acc"] == scores["boolq"]["acc_norm"] == 1.0
    assert scores["gsm8k"]["exact_match"] == 1.0


def test_lm_eval_scores_on_a_synthetic_model(tiny) -> None:
    tiny.model.train()
    scores = evaluate.lm_eval_scores(tiny.model, tiny.tokenizer, ["sst2", "gsm8k"], limit=4)
    assert tiny.model.training
    for metric in ("acc", "acc_norm"):
        assert 0.0 <= scores["sst2"][metric] <= 1.0
    assert 0.0 <= scores["gsm8k"]["exact_match"] <= 1.0


def test_lm_loss_ignores_padding(tiny) -> None:
    texts = evaluate.forgetting_texts(6)
    assert len(set(texts)) == 6 and all(len(t) > 100 for t in texts)
    batched = evaluate.lm_loss(tiny.model, tiny.tokenizer, texts, max_length=128, batch_size=4)
    one_by_one = evaluate.lm_loss(tiny.model, tiny.tokenizer, texts, max_length=128, batch_size=1)
    assert batched == pytest.approx(one_by_one, rel=1e-4)
    # A freshly initialised model is close to uniform over its vocabulary.
    assert batched == pytest.approx(math.log(tiny.model.config.vocab_size), abs=0.5)


@pytest.mark.slow
def test_smollm2_scores_match_a_direct_computation(smollm2) -> None:
    model, tokenizer = smollm2.model, smollm2.tokenizer
    scores = evaluate.lm_eval_scores(model, tokenizer, ["sst2"], limit=8)
    # The same accuracy by hand: the choice with the highest log-likelihood after the prompt,
    # all (example, choice) pairs in one right-padded batch.
    rows = examples("sst2", "eval", n=8)
    pairs = [(tokenizer(e.prompt)["input_ids"], tokenizer(e.prompt + c)["input_ids"]) for e in rows for c in e.choices]
    batch = collate([{"input_ids": whole, "labels": whole} for _, whole in pairs], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    choice_scores = [logprobs[i, len(prompt) - 1:len(whole) - 1].gather(1, torch.tensor(whole[len(prompt):])[:, None]).sum()
                     for i, (prompt, whole) in enumerate(pairs)]
    correct = [max(range(2), key=lambda c, i=i: choice_scores[2 * i + c]) == e.gold for i, e in enumerate(rows)]
    assert scores["sst2"]["acc"] == pytest.approx(sum(correct) / len(rows))
    assert 0.0 <= scores["sst2"]["acc_norm"] <= 1.0
