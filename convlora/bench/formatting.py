"""How benchmark numbers are written in tables: counts, sizes, times, ratios, means with spread."""

from __future__ import annotations

from typing import Any

from ..evaluation.metrics import higher_is_better

ARROWS = {True: "↑", False: "↓"}
# the ways of getting objects a trained model is scored by, as tables and plots name them (AMG has a row of its own)
INSTANCE_WAYS = {"ais": "AIS", "apg": "APG", "binary_cc": "binary-CC"}


def fmt_count(value: int | None) -> str:
    """``1234567 -> '1.23 M'``.

    >>> fmt_count(163616), fmt_count(912)
    ('163.6 k', '912')
    """
    if value is None:
        return "–"
    if value >= 1e6:
        return f"{value / 1e6:.2f} M"
    if value >= 1e3:
        return f"{value / 1e3:.1f} k"
    return str(value)


def fmt_bytes(value: float | None) -> str:
    """Bytes in KiB, MiB or GiB.

    >>> fmt_bytes(3 * 2**20)
    '3.0 MiB'
    """
    if value is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def fmt_seconds(value: float | None) -> str:
    """Seconds as ms below one second.

    >>> fmt_seconds(0.01234), fmt_seconds(12.3)
    ('12.3 ms', '12.30 s')
    """
    if value is None:
        return "–"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def fmt_ratio(value: float | None) -> str:
    """``2.5 -> '2.50×'``, ``None`` (no value) as a dash."""
    return "–" if value is None else f"{value:.2f}×"


def fmt_stat(stat: dict[str, Any]) -> str:
    """``mean ± std`` with a precision that suits the metric's scale."""
    if not stat or stat.get("mean") is None:
        return "–"
    digits = 3 if abs(stat["mean"]) < 2 else 2
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def fmt_value(value: float | None) -> str:
    """One metric value with the precision of :func:`fmt_stat`, a dash when missing."""
    if value is None:
        return "–"
    return f"{value:.{3 if abs(value) < 2 else 2}f}"


def fmt_delta(entry: dict[str, Any] | None) -> str:
    """A difference to the baseline: ``Δ ± standard error (verdict)``."""
    if not entry:
        return "–"
    digits = 3 if abs(entry["delta"]) < 2 else 2
    return f"{entry['delta']:+.{digits}f} ± {entry['se']:.{digits}f} ({entry['verdict']})"


def metric_label(metric: str) -> str:
    """The metric's name with an arrow saying which direction is better."""
    try:
        return f"{metric} {ARROWS[higher_is_better(metric)]}"
    except (KeyError, ValueError):
        return metric


def environment_line(result: dict[str, Any]) -> str:
    """One line: machine, threads, versions, commit, wall time and load."""
    env = result["environment"]
    m, v, c = env["machine"], env["versions"], env["commit"]
    gpu = f", GPU {m['gpu']['name']}" if m.get("gpu") else ""
    sha = (c.get("sha") or "unknown")[:10]
    dirty = " + uncommitted changes" if c.get("dirty") else ""
    loads = f"load (1 min) {_first(result.get('load_before'))} before, {_first(result.get('load_after'))} after"
    return (
        f"Machine: {m['cpu']} ({m['cores']} cores{gpu}), device {env['device']}, {env['threads']} torch thread(s); "
        f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"convlora {v['convlora']}; commit {sha}{dirty}; wall time {result['wall_seconds'] / 60:.1f} min; {loads}."
    )


def _first(values: list[float] | None) -> str:
    return "?" if not values else f"{values[0]:.2f}"


def _load_range(entries: list[dict[str, Any]]) -> str:
    loads = [e[k][0] for e in entries for k in ("load_before", "load_after") if e.get(k)]
    return "unknown" if not loads else f"{min(loads):.2f}–{max(loads):.2f}"
