"""The benchmark result format: one JSON file per experiment, tagged with ``SCHEMA``, read back by ``load_results``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA = "convlora-benchmark/1"


def load_results(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every benchmark result file in ``results_dir`` (with the benchmark schema): quality, instances, cost, by name."""
    found = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            found.append(data)
    order = {"quality": 0, "instances": 1, "cost": 2}
    return sorted(found, key=lambda r: (order.get(r["kind"], 2), r["name"]))
