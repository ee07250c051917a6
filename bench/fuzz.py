"""Longer fuzzing runs of the properties CI runs briefly (``tests/test_fuzz_*.py``).

Prints one JSON object: examples per property, outcome and seconds. Usage::

    python bench/fuzz.py [--examples 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    files = sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_fuzz_*.py"))
    env = {**os.environ, "FEDVAULT_FUZZ_EXAMPLES": str(args.examples)}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    print(
        json.dumps(
            {
                "benchmark": "fuzz",
                "files": files,
                "examples_per_property": args.examples,
                "passed": done.returncode == 0,
                "summary": summary,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
