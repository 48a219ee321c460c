"""Write a file so that a crash or an error never leaves a half-written one behind.

A write goes to a temporary file beside the output, named ``.<output name>.refghost-<pid>-<random>.tmp``,
renamed onto the output when complete and deleted on any error. A process killed mid-write
(``kill -9``, power loss) cannot delete its temporary file; the next write of the same output
does: it removes the temporary files of that output whose writer process no longer exists. Only
names of exactly that pattern are touched, so nothing refghost did not write is ever removed,
and never the file of a write still running.
"""

from __future__ import annotations

import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path

from .errors import RefghostError

#: Marker in every temporary name: ``.<name>.refghost-<pid>-<16 hex digits>.tmp``.
TEMP_MARKER = "refghost"


def _temp_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.{TEMP_MARKER}-(\d+)-[0-9a-f]{{16}}\.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OverflowError:
        return False
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Delete the temporary files an interrupted write of ``path`` left; return what was removed.

    A file is removed only if its name matches this module's temporary pattern for ``path`` and
    the process id in it is no longer running.
    """
    path = Path(path)
    pattern = _temp_pattern(path.name)
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass  # another cleaner got it first, or the folder is not ours to change
    return removed


def check_writable(path, what: str = "--out") -> None:
    """Raise RefghostError unless ``path`` can be written by :func:`atomic_path`: its folder
    exists and accepts a new file, and ``path`` itself is not a directory."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise RefghostError(f"{what} {path}: is a directory; give a file path")
    if not folder.is_dir():
        raise RefghostError(f"{what} {path}: folder {folder} does not exist")
    if path.exists() and not path.is_file():
        raise RefghostError(f"{what} {path}: exists and is not a regular file")
    try:
        with atomic_path(path, commit=False) as tmp:
            Path(tmp).write_bytes(b"")
    except (OSError, RefghostError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise RefghostError(f"{what} {path}: cannot write in folder {folder} ({reason})") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path, *, commit: bool = True):
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.

    The rename is atomic on POSIX filesystems: readers see the old file or the new one, never a
    partial one. Stale temporaries of earlier killed writes of ``path`` are removed first.
    ``commit=False`` deletes the temporary file even on success (a writability probe).
    """
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.{TEMP_MARKER}-{os.getpid()}-{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise RefghostError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode open() would give
    try:
        yield str(tmp)
        if not commit:
            os.unlink(tmp)
            return
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise RefghostError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
