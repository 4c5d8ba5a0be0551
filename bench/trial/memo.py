"""Results of a trial's slow, deterministic side computations, kept on disk so a sweep computes each once.

A surgical CNN trial trains for ~8 s; its memory forecast (a meta forward and backward, ~0.2 s) and
its FLOP count (traced forwards) would otherwise be a few per cent of every trial, and most trials
of a sweep share them: trials that differ only in the learning rate forecast and count the same.
So each is stored under <cache>/<kind>/<sha256 of its key>.json with the key beside the value. The
key is everything the value depends on: the spec sections that matter, the package versions, and a
digest of the code that computes it (code_digest), so a changed method, model loader or counting
rule computes afresh. A file that cannot be read, or holds another key, is computed again, never
trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.paths import REPO, cache_dir


def code_digest(paths: Iterable[Path]) -> str:
    """sha256 over the names and bytes of these files (sorted; a missing one counts as empty)."""
    digest = hashlib.sha256()
    for path in sorted(set(paths)):
        digest.update(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path).encode())
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()


def sources(*patterns: str) -> list[Path]:
    """The repository's files matching these glob patterns (relative to the checkout)."""
    return [path for pattern in patterns for path in REPO.glob(pattern)]


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of these packages (None: not installed), for a key."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@dataclass(frozen=True)
class Memo:
    """One kind of stored result (a folder of the cache)."""

    kind: str

    def path(self, key: Any) -> Path:
        canonical = json.dumps(key, sort_keys=True, default=str)
        return cache_dir() / self.kind / f"{hashlib.sha256(canonical.encode()).hexdigest()[:24]}.json"

    def get(self, key: Any) -> Any | None:
        """The value stored under `key`, or None (absent, unreadable, or stored for another key)."""
        try:
            stored = json.loads(self.path(key).read_text())
            # The key round-trips through JSON as it was stored: compare it that way.
            if stored["key"] == json.loads(json.dumps(key, sort_keys=True, default=str)):
                return stored["value"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def put(self, key: Any, value: Any) -> None:
        """Store `value` under `key`, atomically (trials side by side may write the same file)."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, sort_keys=True, default=str))
        tmp.replace(path)
