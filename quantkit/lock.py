"""One writer per workspace: an advisory lock on ``<workspace>/.quantkit.lock`` that holds the owner's PID.

The lock is an ``flock`` on the file, so the kernel releases it when its process ends in any way (kill -9
included): a lock file left by a dead process is simply taken over by the next run. A live owner makes a second
run refuse in one line that names the owner's PID. Within one process the lock is re-entrant (several
`Workspace` objects for the same folder share it); a command takes it for the whole run (`acquire`), while a
library caller that only saves a manifest holds it just for that write (`holding`).

Work files of a process (``.<name>.<pid>.partial``) that a killed run left behind are removed when the next run
takes the lock: only the lock holder writes there, so whatever belongs to a dead PID is garbage.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from quantkit.errors import QuantkitError

LOCK_NAME = ".quantkit.lock"
_held: dict[Path, int] = {}
_PARTIAL = re.compile(r"^\..+\.(\d+)\.partial$")


class WorkspaceBusy(QuantkitError):
    """Another live process holds the workspace lock."""


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(os.pread(fd, 32, 0).decode().split()[0])
    return None


def acquire(root: Path, *, clean: bool = True) -> None:
    """Take the lock of the workspace at `root` for this process (no-op when it already holds it)."""
    root = Path(root).resolve()
    if root in _held:
        return
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = _read_pid(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or (owner and pid_alive(owner)
                                                                            and owner != os.getpid()):
            os.close(fd)
            who = f"PID {owner}" if owner else "another process"
            raise WorkspaceBusy(
                f"another quantkit run ({who}) is using the workspace {root}",
                "wait for it to finish or stop it; a run with another --workspace can go on in parallel") from None
        # a file system without flock (some network mounts): the PID in the file decides, as above
    previous = _read_pid(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[root] = fd
    if clean:
        if previous and previous != os.getpid():
            from quantkit import console

            console.info(f"[dim]took over the workspace lock left by PID {previous} (no longer running)[/]",
                         markup=True)
        remove_stale_partials(root)


@contextlib.contextmanager
def holding(root: Path, *, clean: bool = False) -> Iterator[None]:
    """The lock for the duration of the block, unless this process holds it already (then it is kept);
    `clean` removes what dead runs left, as `acquire` does."""
    if held(root):
        yield
        return
    acquire(root, clean=clean)
    try:
        yield
    finally:
        release(root)


def held(root: Path) -> bool:
    return Path(root).resolve() in _held


def release(root: Path) -> None:
    """Give the lock up before the process ends (tests, long-lived callers)."""
    fd = _held.pop(Path(root).resolve(), None)
    if fd is not None:
        os.close(fd)


def remove_stale_partials(root: Path) -> list[Path]:
    """Delete ``.<name>.<pid>.partial`` files and folders under `root` whose process is gone."""
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            m = _PARTIAL.match(name)
            if not m or pid_alive(int(m.group(1))):
                continue
            p = Path(dirpath) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                with contextlib.suppress(ValueError):
                    dirnames.remove(name)
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            removed.append(p)
    return removed
