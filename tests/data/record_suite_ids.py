"""Record the trial ids every committed suite expands to, into tests/data/suite_ids.json.

tests/test_layout.py compares each suite's expansion against this record: a refactor that
changes how a suite resolves (and so orphans its committed results) fails there. Rerun this
script only when a suite is added or a change of ids is intended:

    python tests/data/record_suite_ids.py
"""

from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECORD = Path(__file__).with_name("suite_ids.json")


def expansion(path: Path) -> list[str] | dict:
    """A training suite's trial ids, in expansion order; a serving suite (no [[sweep]], see
    bench/serving/serve_bench.py) has no trials, so its resolved grid stands in for them."""
    sys.path.insert(0, str(ROOT))
    from bench.serving.serve_bench import load_suite as load_serving
    from bench.run.suite import load

    if "sweep" not in tomllib.loads(path.read_text(encoding="utf-8")):
        return load_serving(path).to_dict()
    return [t.id for t in load(path, check_models=False).trials]


def suite_ids() -> dict[str, list[str] | dict]:
    """Suite path (relative to the repository) -> its expansion, for every committed suite."""
    return {str(path.relative_to(ROOT)): expansion(path) for path in sorted((ROOT / "suites").rglob("*.toml"))}


if __name__ == "__main__":
    RECORD.write_text(json.dumps(suite_ids(), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {RECORD.relative_to(ROOT)}")
