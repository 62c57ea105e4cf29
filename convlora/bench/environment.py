"""Where a benchmark ran: machine, library versions, git commit, threads and load.

Timings mean little without the machine and its load next to them, so every result file records them.

>>> env = environment(threads=1)
>>> sorted(env) == ["commit", "device", "machine", "threads", "versions"]
True
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .._version import __version__

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "safetensors", "einops")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine() -> dict[str, Any]:
    """CPU model, logical cores (and how many this process may use), memory, GPU, operating system."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory = round(props.total_memory / 2**30, 1)
        gpu = {"name": props.name, "memory_gib": memory, "count": torch.cuda.device_count()}
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": _memory_gib(),
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict[str, str | None]:
    """Versions of Python, convlora and the libraries that decide the numbers."""
    found: dict[str, str | None] = {"python": platform.python_version(), "convlora": __version__}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def git_commit(directory: str | Path | None = None) -> dict[str, Any]:
    """``git rev-parse HEAD`` of the convlora checkout and whether its tree had uncommitted changes.

    Args:
        directory: a folder inside the repository; the package's parent folder by default.
    """
    directory = Path(directory) if directory else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"sha": commit, "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch (and in OpenMP for processes started from here)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU.

    >>> pick_device("cpu").type
    'cpu'
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA GPU; use 'auto' or 'cpu'")
    return torch.device(name)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: ``"auto"`` means bf16 on CUDA and fp32 on CPU (bf16 was slower on the CPUs we tried).

    >>> pick_dtype("auto", torch.device("cpu"))
    torch.float32
    """
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def environment(threads: int, device: str = "auto") -> dict[str, Any]:
    """Everything about the run's environment that goes into a result file."""
    chosen = pick_device(device)
    return {
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "threads": threads,
        "device": chosen.type,
    }
