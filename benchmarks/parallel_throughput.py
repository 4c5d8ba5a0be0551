"""Two one-thread trials side by side against one two-thread trial at a time, on this machine.

    python benchmarks/parallel_throughput.py [--suite suites/lora_sweep.toml] [-k 4] [--ids ID,ID] [--repeats 1] [--json out.json]

Takes K trials of the suite (the K shortest by the runner's estimate, or those --ids names), and
runs them twice through the real runner into two temp result folders: `[run] parallel = 1,
threads = 2` (one trial at a time, two threads) and `parallel = 2, threads = 1` (two trials at
once, each pinned to its own core). Prints each mode's wall time (the runner's, from lock to
last publish) and the ratio one-at-a-time / side-by-side: above 1, side by side has the higher
throughput. With --repeats R the modes alternate which goes first and the ratio is the median.
Both modes pay the same process starts. Before either is timed, a warm-up trial (the first one cut
to one step and two scored rows) starts the fork server and fills this machine's caches (tokenized
rows, the base model's held-out loss, per-machine calibrations), which would otherwise land on
whichever mode runs first. Run it on a quiet machine: another process on a core slows whichever
mode uses that core.

--max-steps and --eval-limit shrink the trials (and so change them) to check the script end to end
in seconds; they are not for the measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench.run import runner, suite  # noqa: E402

# (parallel, threads): one trial at a time on two threads, then two trials at once on one each.
MODES = {"one_at_a_time": (1, 2), "side_by_side": (2, 1)}


def pick(s: suite.Suite, k: int, ids: list[str] | None) -> list[suite.Trial]:
    """The trials --ids names (ids or unique prefixes), else the k shortest by runner.estimate."""
    if ids:
        chosen = []
        for prefix in ids:
            found = [t for t in s.trials if t.id.startswith(prefix)]
            if len(found) != 1:
                raise SystemExit(f"error: --ids {prefix!r}: matches {len(found)} trials of {s.path}, not one")
            chosen.append(found[0])
        return chosen
    est = {row["trial_id"]: row["est_s"] for row in runner.estimate(s)}
    return sorted(s.trials, key=lambda t: est[t.id])[:k]


def shrink(trial: suite.Trial, max_steps: int | None, eval_limit: int | None) -> suite.Trial:
    """The trial cut to max_steps steps and eval_limit scored rows per task (None: as it is)."""
    spec = json.loads(json.dumps(trial.spec))
    if max_steps:
        spec["train"]["max_steps"] = max_steps
    if eval_limit:
        spec["eval"]["limit"] = eval_limit
    return dataclasses.replace(trial, spec=spec)


def measure(s: suite.Suite, trials: list[suite.Trial], mode: str, root: Path) -> dict:
    parallel, threads = MODES[mode]
    sub = suite.Suite(name=f"{s.name}-{mode}", path=s.path,
                      trials=[dataclasses.replace(t, run={**t.run, "threads": threads, "parallel": parallel}) for t in trials])
    report = runner.run(sub, root, progress=False, save_adapters=False, parallel=parallel)
    found = {p.stem: json.loads(p.read_text()) for p in (root / sub.name).glob("*.json")}
    return {"parallel": parallel, "threads": threads, "wall_s": report.wall_s, "statuses": report.statuses,
            "train_s": sum(r["runtime"].get("train_s") or 0 for r in found.values()),
            "eval_s": sum(r["runtime"].get("eval_s") or 0 for r in found.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="suites/lora_sweep.toml")
    ap.add_argument("-k", "--trials", type=int, default=4, help="how many of the suite's shortest trials (default 4)")
    ap.add_argument("--ids", help="comma-separated trial ids (or unique prefixes) to run instead of the shortest")
    ap.add_argument("--repeats", type=int, default=1, help="runs of both modes, alternating which goes first")
    ap.add_argument("--max-steps", type=int, help="smoke check only: cut every trial to this many steps")
    ap.add_argument("--eval-limit", type=int, help="smoke check only: score this many rows per task")
    ap.add_argument("--no-warmup", action="store_true", help="time from cold: the first mode pays the caches")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    if args.trials < 1 or args.repeats < 1:
        ap.error("-k and --repeats must be >= 1")
    try:
        s = suite.load(args.suite)
    except suite.SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    trials = [shrink(t, args.max_steps, args.eval_limit) for t in pick(s, args.trials, args.ids.split(",") if args.ids else None)]
    cores = len(os.sched_getaffinity(0))
    print(f"{s.path}: {len(trials)} trials on {cores} cores: {', '.join(t.label for t in trials)}", flush=True)

    runs: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="peftbench-parallel-") as tmp:
        if not args.no_warmup:
            warm = suite.Suite(name="warmup", path=s.path, trials=[shrink(trials[0], 1, 2)])
            runner.run(warm, Path(tmp) / "warmup", progress=False, save_adapters=False, parallel=1)
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            runs.append({})
            for mode in order:
                out = measure(s, trials, mode, Path(tmp) / f"r{repeat}")
                runs[-1][mode] = out
                bad = {i: st for i, st in out["statuses"].items() if st != "success"}
                print(f"repeat {repeat} {mode} (parallel {out['parallel']}, threads {out['threads']}): wall {out['wall_s']:.1f} s, "
                      f"train {out['train_s']:.1f} s, eval {out['eval_s']:.1f} s summed over trials"
                      + (f"; NOT successful: {bad}" if bad else ""), flush=True)
    ratios = [r["one_at_a_time"]["wall_s"] / r["side_by_side"]["wall_s"] for r in runs]
    ratio = statistics.median(ratios)
    better = "side_by_side (parallel 2, threads 1)" if ratio > 1 else "one_at_a_time (parallel 1, threads 2)"
    print(f"one_at_a_time / side_by_side wall: {ratio:.3f} (median of {', '.join(f'{r:.3f}' for r in ratios)}): "
          f"higher throughput: {better}")
    if args.json:
        Path(args.json).write_text(json.dumps({"benchmark": "parallel_throughput",  # how reports/results.py tells it from trial results
            "suite": str(s.path), "cores": cores, "trials": [{"id": t.id, "label": t.label} for t in trials],
            "shrunk": {"max_steps": args.max_steps, "eval_limit": args.eval_limit}, "runs": runs,
            "ratios": ratios, "ratio": ratio, "better": better.split()[0]}, indent=1, sort_keys=True))
    ok = all(st == "success" for r in runs for m in r.values() for st in m["statuses"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
