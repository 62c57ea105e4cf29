"""Crash-safe writes: everything convlora saves is written under a temporary name, then renamed.

A write that fails (disk full, no permission, ...) raises :class:`WriteError` naming the destination and
leaves whatever was there before untouched; no temporary file or folder is left behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError


class WriteError(OSError):
    """Saving ``path`` failed; what was at ``path`` before is unchanged.

    Args:
        path: the destination that was not written.
        reason: the underlying error (its ``errno``, e.g. ``ENOSPC``, is kept on this one).
    """

    def __init__(self, path: str | Path, reason: BaseException) -> None:
        super().__init__(f"{path} was not saved ({reason}); anything already there is unchanged")
        self.errno = getattr(reason, "errno", None)
        self.path = Path(path)
        self.reason = reason


def _reraise(path: Path, error: BaseException) -> None:
    """Re-raise a failed write's error; I/O failures become one ``WriteError`` naming ``path``."""
    if isinstance(error, WriteError):  # a nested write into a temporary folder: name the real destination
        raise WriteError(path, error.reason) from error.reason
    if isinstance(error, (OSError, SafetensorError)):  # safetensors reports ENOSPC as SafetensorError
        raise WriteError(path, error) from error
    raise error


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, racing other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    current = os.umask(0o022)  # no /proc (not Linux): read it by setting and restoring it
    os.umask(current)
    return current


def _settle(folder: Path) -> None:
    """Flush a finished temporary folder's files to disk and give everything the usual permissions.

    Without the flush, a power loss just after the rename could leave empty files under the final name.
    ``mkdtemp`` makes the folder 0700 and safetensors writes its files 0600: left so, an adapter copied to
    a shared machine could not be read by another user; ``open``/``mkdir`` would apply the umask instead.
    """
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        if path.is_symlink():
            continue
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` is left as it was.

    >>> with atomic_file("/tmp/convlora-doc.txt", "w") as f:
    ...     _ = f.write("hello")
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the usual permissions
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        _reraise(path, error)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks.

    >>> len(sha256_file(__file__))
    64
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_file(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serialisable")


@contextlib.contextmanager
def atomic_dir(path: str | Path, kind: str, *, option: str = "output") -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is replaced only if convlora wrote it as the same ``kind`` of folder (or it is
    empty): anything else is refused before anything is written (see :func:`check_owned`). It is replaced
    only once the new directory is complete; on error the temporary directory is removed and ``path`` is
    untouched. Temporary folders that killed processes left beside ``path`` are removed first.

    Args:
        path: the folder to write.
        kind: what it holds, a key of ``FOLDER_KINDS``; recorded in the folder's marker file.
        option: how the user named the folder, for the refusal.

    >>> import tempfile
    >>> with atomic_dir(Path(tempfile.mkdtemp()) / "out", "predictions") as tmp:
    ...     _ = (tmp / "predictions.json").write_text("{}")
    """
    path = Path(path)
    check_owned(path, kind, option=option)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = _temporary_dir(path)
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        yield tmp
        write_marker(tmp, kind)
        _settle(tmp)
        _fsync_dir(tmp)
        if path.exists():
            old = tmp.with_suffix(".old")  # as unique as the temporary folder, and removed as stale like it
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        _reraise(path, error)


def read_versioned_json(
    path: str | Path, *, known: set[str] | None, version: int, what: str, version_key: str = "format_version"
) -> dict[str, Any]:
    """Read a JSON object written by convlora, refusing what this version cannot read faithfully.

    One reader for every versioned file (task files, checkpoint progress, ...), so the refusals read alike:
    a missing or damaged file, a file from a newer convlora (``version_key`` above ``version``), or fields
    this convlora does not know (``known``; ``None`` accepts any) are each a ``ValueError`` naming the file.

    Args:
        path: the JSON file.
        known: the field names this convlora understands, or ``None``.
        version: the newest format this convlora reads.
        what: what the file is, for the messages (e.g. ``"a convlora model folder's task file"``).
        version_key: the field holding the format version; a file without it is version 0.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.json"
    >>> _ = path.write_text('{"format_version": 2, "a": 1}')
    >>> read_versioned_json(path, known={"a", "format_version"}, version=1, what="a test file")
    Traceback (most recent call last):
    ...
    ValueError: ... was written by a newer convlora (format 2); this convlora reads format <= 1. Upgrade convlora.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing (expected {what})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({what}): {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), found {type(data).__name__}")
    check_versioned(data, path, known=known, version=version, version_key=version_key)
    return data


def check_versioned(
    data: dict[str, Any], source: Any, *, known: set[str] | None, version: int, version_key: str = "format_version"
) -> None:
    """The checks of :func:`read_versioned_json` on an object already read from ``source``."""
    found = data.get(version_key, 0)
    if not isinstance(found, int) or isinstance(found, bool) or found > version:
        raise ValueError(
            f"{source} was written by a newer convlora (format {found}); this convlora reads format <= {version}. "
            "Upgrade convlora."
        )
    unknown = sorted(set(data) - known) if known is not None else []
    if unknown:
        raise ValueError(f"{source} has unknown fields {unknown}; it was probably written by a newer convlora")


# --- Folders convlora owns -------------------------------------------------------------------------------------
#
# Replacing a folder as a whole (atomic_dir) or writing a run or predictions into one is right for folders
# convlora made, and never for anything else: `--output home` must not delete a user's home. A folder
# convlora writes carries a small marker naming what it is; a folder is replaced or written into only when
# it does not exist, is empty, carries the marker of the same kind, or (written before markers existed)
# holds nothing but what that kind of folder holds, including its signature file.

OUTPUT_MARKER = ".convlora-output.json"


@dataclass(frozen=True)
class FolderKind:
    """One kind of folder convlora writes, and how an unmarked folder of that kind from earlier versions looks.

    Args:
        what: how messages name such a folder (``"a prediction folder"``).
        signatures: names of which a folder of this kind written by an earlier convlora holds at least one
            (empty: no legacy form).
        entries: glob patterns of every top-level name such a folder may hold.
    """

    what: str
    signatures: tuple[str, ...] = ()
    entries: tuple[str, ...] = ()


FOLDER_KINDS: dict[str, FolderKind] = {
    "model": FolderKind(
        "a trained or merged model folder", ("convlora_task.json",), ("*.json", "*.safetensors", "*.md")
    ),
    "adapter": FolderKind("an adapter folder"),
    "merged": FolderKind("a merged model folder"),
    "checkpoint": FolderKind("a checkpoint", ("progress.json",), ("*.json", "*.safetensors")),
    "onnx": FolderKind("an ONNX export", ("deploy.json",), ("*.onnx", "*.json", "*.data", "*.onnx_data")),
    "dataset": FolderKind("a synthetic dataset", ("dataset.json",), ("train", "val", "test", "*.json")),
    "tradeoff": FolderKind(
        "a strength trade-off folder", ("tradeoff.json",), ("tradeoff.json", "tradeoff.md", "tradeoff.png")
    ),
    "predictions": FolderKind(
        "a prediction folder",
        ("predictions.json", "predictions.jsonl"),
        ("masks", "overlays", "instances", "predictions.json*"),
    ),
    "run": FolderKind(
        "a training run folder",
        ("config.json", "checkpoints"),
        (
            "config.json",
            "checkpoints",
            "adapter",
            "metrics.json",
            "comparison.json",
            "logs",
            "embedding_cache",
            "*.png",
            ".convlora-run.lock",
            ".*.tmp",
        ),
    ),
}


def folder_kind(path: str | Path) -> str | None:
    """The kind of convlora folder ``path`` is (see ``FOLDER_KINDS``), or ``None`` if convlora did not write it.

    >>> import tempfile
    >>> folder_kind(tempfile.mkdtemp()) is None
    True
    """
    path = Path(path)
    marker = path / OUTPUT_MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError):
            kind = json.loads(marker.read_text()).get("kind")
            if kind in FOLDER_KINDS:
                return kind
    names = [entry.name for entry in path.iterdir() if entry.name != OUTPUT_MARKER] if path.is_dir() else []
    for kind, spec in FOLDER_KINDS.items():
        if set(spec.signatures) & set(names) and all(_matches(name, spec.entries) for name in names):
            return kind
    return None


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def check_owned(path: str | Path, kind: str, *, option: str = "output") -> None:
    """Refuse, in one line, to replace or write into ``path`` unless it is missing, empty or a ``kind`` folder.

    Args:
        path: the folder about to be written.
        kind: what will be written there (a key of ``FOLDER_KINDS``).
        option: how the user named the folder (``"--output"``), for the message.

    Raises:
        ValueError: ``path`` is a file, or a folder holding anything else.

    >>> import tempfile
    >>> home = Path(tempfile.mkdtemp())
    >>> _ = (home / "thesis.tex").write_text("years of work")
    >>> check_owned(home, "predictions", option="--output")
    Traceback (most recent call last):
    ...
    ValueError: --output ... holds files convlora did not write (thesis.tex); ...
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise ValueError(f"{option} {path} is a file; expected a folder to write {FOLDER_KINDS[kind].what} into")
    entries = sorted(entry.name for entry in path.iterdir())
    if not entries:
        return
    found = folder_kind(path)
    if found == kind:
        return
    if found is not None:
        raise ValueError(
            f"{option} {path} holds {FOLDER_KINDS[found].what}, not {FOLDER_KINDS[kind].what}; refusing to replace "
            "it. Choose a new or empty folder"
        )
    # name first what a folder of this kind would never hold: the user's own files
    foreign = [name for name in entries if not _matches(name, FOLDER_KINDS[kind].entries)] or entries
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    raise ValueError(
        f"{option} {path} holds files convlora did not write ({shown}); refusing to replace or write into it. "
        "Choose a new or empty folder"
    )


def write_marker(directory: str | Path, kind: str, **extra: Any) -> None:
    """Mark ``directory`` as a ``kind`` folder written by convlora (see :func:`check_owned`)."""
    write_json(Path(directory) / OUTPUT_MARKER, {"kind": kind, **extra})


def claim_folder(path: str | Path, kind: str, *, option: str = "output") -> Path:
    """Create ``path`` (or accept an empty folder or a ``kind`` folder convlora wrote) and mark it as ``kind``.

    For folders written in place, file by file (a training run, predictions), rather than replaced whole.

    Args:
        path: the folder.
        kind: a key of ``FOLDER_KINDS``.
        option: how the user named the folder, for the message.

    Raises:
        ValueError: see :func:`check_owned`.
    """
    path = Path(path)
    check_owned(path, kind, option=option)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not (path / OUTPUT_MARKER).is_file():
            write_marker(path, kind)
    except OSError as error:
        raise WriteError(path, error) from error
    return path


def check_apart(output: str | Path, inputs: dict[str, str | Path | None], *, option: str = "--output") -> None:
    """Refuse an output folder that is, contains, or lies inside one of the inputs (one line naming both).

    Args:
        output: the folder about to be written.
        inputs: the inputs by option name (``{"--images": ..., "--model": ...}``); ``None`` and names that
            are not paths on this machine (a hub id, an embedded model) are skipped.
        option: how the user named ``output``.

    >>> import tempfile
    >>> data = tempfile.mkdtemp()
    >>> check_apart(f"{data}/out", {"--images": data})
    Traceback (most recent call last):
    ...
    ValueError: --output .../out lies inside --images ...; write the output somewhere else
    """
    out = Path(output).resolve()
    for name, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        source = Path(value).resolve()
        if source == out:
            raise ValueError(f"{option} {output} is {name} {value} itself; write the output somewhere else")
        if out in source.parents:
            raise ValueError(f"{option} {output} contains {name} {value}; write the output somewhere else")
        if source.is_dir() and source in out.parents:
            raise ValueError(f"{option} {output} lies inside {name} {value}; write the output somewhere else")


def check_json_output(path: str | Path, *, option: str) -> None:
    """Refuse, in one line, a JSON output path where a folder or a file that is not JSON already stands.

    A command that writes one JSON file (``evaluate --output``, ``inspect --json``) replaces an earlier JSON
    result, never a user's other files.

    Args:
        path: the file about to be written.
        option: how the user named it, for the message.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; expected the path of a JSON file to write")
    if path.exists():
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(
                f"{option} {path} already exists and is not a JSON file convlora wrote; refusing to overwrite it"
            ) from None


# Temporary folders are named `.NAME.HOST-PID-XXXXXXXX.tmp`, so that a later write can tell those of killed
# processes on this host (removed) from those of live ones or of other hosts sharing the disk (kept).
_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def _temporary_dir(path: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary folders that killed convlora processes on this host left beside ``path``.

    Returns:
        The folders removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.{re.escape(_HOST)}-(\d+)-[^.]+\.(tmp|old)$")
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            found = pattern.match(entry.name)
            if found and entry.is_dir() and not entry.is_symlink() and not _alive(int(found.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


# --- One process per folder ------------------------------------------------------------------------------------

LOCK_FILE = ".convlora-run.lock"


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), to tell it from a reused pid."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    return None


def _busy(path: Path, holder: dict[str, Any], command: str, option: str) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
    return (
        f"{option} {path} is in use by another convlora {holder.get('command', command)} ({who}); wait for it "
        "to end or choose another folder"
    )


@contextlib.contextmanager
def owned_folder(path: str | Path, kind: str, command: str, *, option: str = "output") -> Iterator[Path]:
    """Claim ``path`` for one convlora process writing ``kind`` into it, for the duration of the block.

    The folder must be missing, empty or a ``kind`` folder convlora wrote (see :func:`check_owned`). While
    the block runs, ``path/.convlora-run.lock`` names this process (pid, host, start time) and holds an
    exclusive ``flock``: a second process is refused in one line naming the holder. The lock is released on
    every exit; after a kill the kernel drops the ``flock``, so the file left behind is recognised as stale
    and taken over.

    Args:
        path: the folder.
        kind: what is written there (a key of ``FOLDER_KINDS``).
        command: the command writing it, for the refusal (``"train"``).
        option: how the user named the folder.

    Raises:
        ValueError: the folder holds something else, or another live process holds it.
    """
    import fcntl
    import time

    path = claim_folder(path, kind, option=option)
    lock = path / LOCK_FILE
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_lock(fd)
            os.close(fd)
            raise ValueError(_busy(path, holder, command, option)) from None
        except OSError:  # a file system without flock: fall back to the recorded pid and its start time
            holder = _read_lock(fd)
            pid = holder.get("pid")
            same_host = holder.get("host") == socket.gethostname()
            live = isinstance(pid, int) and same_host and pid != os.getpid() and _alive(pid)
            if live and holder.get("start_ticks") in (None, _process_start(pid)):
                os.close(fd)
                raise ValueError(_busy(path, holder, command, option)) from None
        try:  # the holder may have removed the file between our open and flock: lock the current one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "start_ticks": _process_start(os.getpid()),
        "command": command,
    }
    data = (json.dumps(info) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _read_lock(fd: int) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        if isinstance(data, dict):
            return data
    return {}
