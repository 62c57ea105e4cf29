"""Wall time of every ``convlora <command> --help`` (and of a usage error), each a fresh process.

    python tools/cli_startup.py [--runs 5] [--output benchmarks/results/cli_startup.json]

Help and usage errors come from the parser's snapshot (convlora/_cli_spec.py) without importing torch; for
scale, the same process importing torch, and importing the full package API (``import convlora.inference``).
The median and the minimum of ``--runs`` runs are reported; the machine's load average before and after is
recorded with them, because a busy machine stretches every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from convlora._io import write_json
from convlora.bench.environment import environment

COMMANDS = [
    ["--help"],
    *[[name, "--help"] for name in ("demo", "synth", "train", "evaluate", "predict", "merge", "export", "inspect")],
    ["params", "--help"],
    ["tradeoff", "--help"],
    ["benchmark", "--help"],
    ["benchmark", "run", "--help"],
    ["predict"],  # a usage error: required options missing
]
REFERENCES = {"import torch": "import torch", "import convlora.inference": "import convlora.inference"}


def wall(argv: list[str], runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        times.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", default=None, help="write the result JSON here")
    args = parser.parse_args()
    from convlora._cli_spec import load_spec

    known = set(load_spec()["actions"][-1]["parsers"]) if load_spec()["actions"] else set()
    commands = [c for c in COMMANDS if c[0].startswith("-") or c[0] in known]
    load_before = os.getloadavg()
    result = {
        "command": "python tools/cli_startup.py " + " ".join(sys.argv[1:]),
        "runs": args.runs,
        "help": {" ".join(c): wall([sys.executable, "-m", "convlora", *c], args.runs) for c in commands},
        "references": {k: wall([sys.executable, "-c", v], args.runs) for k, v in REFERENCES.items()},
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "environment": environment(threads=int(os.environ.get("OMP_NUM_THREADS", "0") or 0)),
    }
    print(json.dumps({k: result[k] for k in ("help", "references", "load_before")}, indent=1))
    if args.output:
        write_json(Path(args.output), result)


if __name__ == "__main__":
    main()
