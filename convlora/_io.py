"""Crash-safe writes: everything convlora saves is written under a temporary name, then renamed.

A write that fails (disk full, no permission, ...) raises :class:`WriteError` naming the destination and
leaves whatever was there before untouched; no temporary file or folder is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
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
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it takes the place of ``path``.

    An existing ``path`` is replaced only once the new directory is complete; on error the temporary
    directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as error:
        raise WriteError(path, error) from error
    try:
        yield tmp
        _settle(tmp)
        _fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old.rmdir()
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
