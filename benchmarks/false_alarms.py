"""Does the regression check hold under conditions a sibling machine brings? False alarms and misses.

    python benchmarks/false_alarms.py [--conditions quiet,neighbour,cold[,two-threads]]
                                      [--slowdown 1.3] [--runs 1] [--suite suites/ci.toml] [--baseline DIR]

For each condition, runs the regression suite twice into fresh folders, once unchanged and once
with every trained step slowed down by --slowdown (bench/trial/inject.py, the calibration untouched), and
compares each run with the committed baseline under the default rules of `peftbench compare`. An
unchanged run must raise no alarm, a slowed run must be caught in every trained trial. Conditions:

    quiet        nothing else done on purpose
    neighbour    a process multiplying matrices on one thread for the whole run
    cold         the page cache of torch, transformers and this project dropped before the run
                 (posix_fadvise DONTNEED, no root needed): every import reads from disk
    two-threads  the suite's trials on two torch threads instead of one (not a default condition:
                 suites/ci.toml pins one thread because two threads on a 2-core machine stall on
                 any other process, and then step and calibration no longer move together)

Prints one table row per condition and run kind (markdown), and exits 1 on a false alarm or a miss.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.regression import compare  # noqa: E402
from bench.trial import inject  # noqa: E402

NEIGHBOUR = "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = (a @ a).tanh()\n"


@contextlib.contextmanager
def neighbour() -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def drop_page_cache() -> int:
    """Ask the kernel to forget the cached pages of every file the run imports or reads."""
    import torch
    import transformers

    dropped = 0
    for top in (Path(torch.__file__).parent, Path(transformers.__file__).parent, ROOT / "bench", ROOT / "methods"):
        for path in top.rglob("*"):
            if path.is_file():
                with contextlib.suppress(OSError), open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                    dropped += 1
    return dropped


def with_threads(suite: Path, threads: int, folder: Path) -> Path:
    """The same suite (same name, so the same trial ids: run settings are not part of an id) on N threads."""
    text = re.sub(r"(?m)^threads\s*=.*$", f"threads = {threads}", suite.read_text())
    out = folder / suite.name
    out.write_text(text)
    return out


def run_once(condition: str, suite: Path, out: Path, slowdown: float | None) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if slowdown:
        env[inject.SLOWDOWN] = str(slowdown)
    cmd = [sys.executable, "-m", "bench.cli", "run", str(suite), "--results", str(out), "--no-progress"]
    if condition == "two-threads":
        cmd[cmd.index(str(suite))] = str(with_threads(suite, 2, out.parent))
    if condition == "cold":
        drop_page_cache()
    with neighbour() if condition == "neighbour" else contextlib.nullcontext():
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conditions", default="quiet,neighbour,cold")
    parser.add_argument("--slowdown", type=float, default=1.3, help="factor on every trained step in the injected runs")
    parser.add_argument("--runs", type=int, default=1, help="unchanged and injected runs per condition")
    parser.add_argument("--suite", type=Path, default=ROOT / "suites" / "ci.toml")
    parser.add_argument("--baseline", type=Path, help="default: results/baselines/<machine class>/ci")
    parser.add_argument("--keep", type=Path, help="keep every run's results here (default: a temporary folder)")
    parser.add_argument("--fail", action="append", default=[], metavar="METRIC:PCT", help="limits, as for `peftbench compare`")
    args = parser.parse_args()
    if args.baseline is None:
        from bench.regression.calibrate import machine_class

        args.baseline = ROOT / "results" / "baselines" / machine_class() / "ci"
    baseline = compare.load(args.baseline)
    suite_name = tomllib.loads(args.suite.read_text()).get("name", args.suite.stem)
    limits = compare.parse_limits(args.fail)
    bad = 0
    print(f"limits: {', '.join(f'{m.rsplit(chr(46), 1)[-1]} +{p:g}%' for m, p in limits.items() if p is not None)}; "
          f"injected slowdown {args.slowdown}x")
    print("| condition | run | trials | time alarms | memory alarms | step-ratio change (min .. max) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() if args.keep is None else contextlib.nullcontext(str(args.keep)) as tmp:
        for condition in args.conditions.split(","):
            for kind, slowdown in (("unchanged", None), (f"injected {args.slowdown}x", args.slowdown)):
                for rep in range(args.runs):
                    out = Path(tmp) / f"{condition}-{slowdown}-{rep}" / "results"
                    shutil.rmtree(out.parent, ignore_errors=True)  # a kept folder from before would resume, not rerun
                    out.parent.mkdir(parents=True)
                    run_once(condition, args.suite, out, slowdown)
                    current = compare.load(out / suite_name)
                    compare.check_comparable(current, baseline, out, args.baseline)
                    report = compare.compare(current, baseline, limits)
                    time_checks = [c for c in report.checks if c.metric == compare.RATIO and c.verdict != "n/a"]
                    time_alarms = sum(c.verdict == "REGRESSION" for c in time_checks)
                    other = len(report.regressions) - time_alarms + len(report.failures)
                    changes = [c.change for c in time_checks if c.change is not None and not math.isinf(c.change)]
                    span = f"{min(changes):+.1%} .. {max(changes):+.1%}" if changes else "-"
                    print(f"| {condition} | {kind} | {len(time_checks)} | {time_alarms} | {other} | {span} |", flush=True)
                    missed = slowdown is not None and time_alarms < len(time_checks)
                    bad += int(missed or other > 0 or (slowdown is None and time_alarms > 0))
    print("no false alarm, no miss" if not bad else f"{bad} runs with a false alarm or a miss")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
