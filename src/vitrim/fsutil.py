"""Atomic file and directory output, output locks, and up-front checks of output paths.

Files are written beside the target and renamed over it. A directory (a model, a checkpoint, a
report) is built in a hidden temporary sibling and swapped into place in one step
(``renameat2(RENAME_EXCHANGE)`` on Linux), so a reader — or a run killed at any point — sees
the previous directory or the new one, never a mix. A run that writes a directory holds a lock
beside it, so a second run to the same place is refused instead of silently losing one result.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from vitrim.errors import OutputError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s directory; on success rename it to ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600; use the usual mode
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(target: str | Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def write_text(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_output_dir(target: str | Path, what: str = "output directory") -> Path:
    """Refuse, before any work, a ``target`` that is a file or whose nearest existing parent is
    not a writable directory. The directory itself need not exist yet."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{what} {target} exists and is not a directory; choose another path or remove it")
    probe = target if target.exists() else target.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot create {what} {target}: {probe} is a file; choose another path")
    if not _can_create_in(probe):
        raise OutputError(f"cannot write {what} {target}: {probe} is not writable; choose a writable location")
    if target.exists() and not _can_create_in(target.parent):  # the new directory is built beside it
        raise OutputError(f"cannot replace {what} {target}: its parent {target.parent} is not writable")
    return target


def _can_create_in(directory: Path) -> bool:
    """Whether a file can really be created in ``directory`` (permissions, read-only mounts, root)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".vitrim-probe."):
            return True
    except OSError:
        return False


def check_output_file(target: str | Path, what: str = "output file") -> Path:
    """Like :func:`check_output_dir` for a file: not a directory, in a writable (or creatable) place."""
    target = Path(target)
    if target.is_dir():
        raise OutputError(f"{what} {target} is a directory; name a file")
    check_output_dir(target.parent, f"directory of the {what}")
    return target


def _lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a hidden sibling lock file, released when the process
    ends, even by a kill, and removed on release); a second holder is refused at once with
    :class:`OutputError`."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    path = _lock_path(target)
    fd = _acquire(path, target)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: a waiter that opened this file sees it is stale
        os.close(fd)


def _acquire(path: Path, target: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise OutputError(f"{target} is being written by another vitrim run (pid {holder}); wait for it "
                              f"to finish or choose another output path") from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == os.fstat(fd).st_ino:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)  # the previous holder removed this file on release: lock the new one


@contextlib.contextmanager
def locked_output(target: str | Path, held: bool = False) -> Iterator[None]:
    """:func:`output_lock`, unless the caller already ``held`` it (re-entrant use in one run)."""
    if held:
        yield
    else:
        with output_lock(target):
            yield


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (then the caller renames twice)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):  # tmp now holds the previous directory
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    os.rmdir(old)
    os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _clean_stale(target: Path) -> None:
    """Remove temporary siblings that an earlier, killed run left (the lock is held here)."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[A-Za-z0-9_]+\.(part|old)")  # mkdtemp's names
    for stale in target.parent.iterdir():
        if pattern.fullmatch(stale.name) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, *, carry: Iterable[str] = (), locked: bool = False) -> Iterator[Path]:
    """Build a directory in a temporary sibling and swap it into ``target`` on success.

    The previous ``target`` stays whole until the new one is complete; on an exception nothing
    changes. ``carry`` names entries of the previous directory (e.g. ``checkpoint``) that the new
    one keeps: they are hard-linked (copied where links fail) into the new directory first.
    ``locked`` says the caller already holds :func:`output_lock` on ``target``.
    """
    target = check_output_dir(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with locked_output(target, held=locked):
        _clean_stale(target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
        try:
            for name in carry:
                source = target / name
                if source.is_dir():
                    shutil.copytree(source, tmp / name, copy_function=_link_or_copy)
                elif source.is_file():
                    _link_or_copy(source, tmp / name)
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; use the usual mode
            _swap_into_place(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _link_or_copy(source: str | Path, dest: str | Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
