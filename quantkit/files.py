"""Files, safely: temporary names that belong to one process, writes that are atomic, a full disk said in one line,
content hashes taken once, and the checks that decide whether an output is complete.

Every module that writes something a user may see under its final name goes through here (`atomic_path`,
`staging_dir`), so a failure or an interrupt never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

TMP_MARK = ".partial"


def temp_name(path: Path) -> Path:
    """A stable temporary name beside `path` (for work a later run resumes, like EXL2's conversion folder)."""
    return path.with_name(f".{path.name}{TMP_MARK}")


def private_temp_name(path: Path) -> Path:
    """This process's temporary name for `path`: ``.<name>.<pid>.partial`` (never shared with another run)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_MARK}")


class DiskFull(QuantkitError):
    """The disk under `folder` filled up (or would) while writing. The free space is measured when the message is
    read, that is after the partial files were removed."""

    def __init__(self, folder: Path, need: int | None = None, written: int = 0) -> None:
        self.folder = Path(folder)
        self.need = need
        self.written = written  # when `need` is unknown: what was written before the disk filled (a lower bound)
        super().__init__("disk full", "free some space or pass --workspace on a larger disk")

    @property
    def free(self) -> int:
        return shutil.disk_usage(_existing(self.folder)).free

    @property  # type: ignore[override]
    def message(self) -> str:
        need_text = (f"need about {human_size(self.need)}" if self.need
                     else f"need more than {human_size(self.written)}" if self.written else "need more space")
        return f"disk full at {self.folder}: {need_text}, free {human_size(self.free)}"

    @message.setter
    def message(self, value: str) -> None:
        pass


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, or numpy's ways of saying it without an errno, anywhere in the chain."""
    cur: BaseException | None = exc
    seen = 0
    while cur is not None and seen < 10:
        if isinstance(cur, DiskFull):
            return True
        text = str(cur)
        if isinstance(cur, OSError) and (cur.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text
                                         or "Not enough free space" in text  # numpy 2's tofile
                                         or ("requested and" in text and "written" in text)):  # numpy 1's
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


@contextlib.contextmanager
def disk_guard(folder: Path, need: int | None = None, written: list[Path] | None = None) -> Iterator[None]:
    """Turn a full disk, however it surfaces inside the block, into one `DiskFull` naming `folder` and `need`
    (or, when unknown, how much of `written` was on disk already)."""
    try:
        yield
    except DiskFull as exc:
        if need and not exc.need:
            raise DiskFull(exc.folder, need) from exc
        raise
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFull(Path(folder), need, _bytes_in(written)) from exc
        raise


def _bytes_in(paths: list[Path] | None) -> int:
    total = 0
    for p in paths or []:
        with contextlib.suppress(OSError):
            files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
            total += sum(f.stat().st_size for f in files)
    return total


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], need: int | None = None) -> Iterator[Path]:
    """Yield this process's temporary path next to `path`; rename it to `path` only if the block succeeds.

    Whatever is left at the temporary name after a failure or an interrupt is removed, so a file with a final name
    is always complete. A full disk is reported as one `DiskFull` line.
    """
    from quantkit.interrupts import removing_on_kill

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_temp_name(final)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        with removing_on_kill(tmp), disk_guard(final.parent, need, [tmp]):
            yield tmp
            os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@dataclass
class Staging:
    """A hidden work folder; after the ``staging_dir`` block, `files` are the final paths of what was written."""

    work: Path
    files: list[Path] = field(default_factory=list)


@contextlib.contextmanager
def staging_dir(dest: Path, need: int | None = None) -> Iterator[Staging]:
    """A hidden ``.<name>.<pid>.partial`` folder beside `dest` for tools that write one or several files (split
    GGUF parts); when the block succeeds every file in it is moved next to `dest`, otherwise (failure, interrupt,
    full disk) nothing is left behind."""
    from quantkit.interrupts import removing_on_kill

    work = private_temp_name(dest)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stage = Staging(work)
    try:
        with removing_on_kill(work), disk_guard(dest.parent, need, [work]):
            yield stage
            for f in sorted(work.iterdir()):
                final = dest.parent / f.name
                os.replace(f, final)
                stage.files.append(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, ensure_ascii=False, indent=2, default=str) + "\n")


def check_disk(folder: Path, needed_bytes: int, what: str) -> None:
    """Refuse to start writing `what` when the disk under `folder` has less than `needed_bytes` free."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise QuantkitError(
            f"not enough disk space for {what}: {human_size(needed_bytes)} needed, {human_size(free)} free "
            f"in {folder}",
            "free some space or pass --workspace on a larger disk",
        )


# -- output checks ------------------------------------------------------------------------------------------------
_hashes: dict[tuple[str, int, int, int], str] = {}
def _check_safetensors(path: Path) -> None:
    from quantkit.safetensors_io import read_header

    read_header(path)  # refuses a truncated file: every tensor must end inside it


# suffix → a check that raises `QuantkitError` when a file of that kind is incomplete (formats add theirs)
OUTPUT_CHECKS: dict[str, Callable[[Path], None]] = {".safetensors": _check_safetensors}


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime, inode) within the process."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def remember_sha256(path: Path, digest: str) -> None:
    """Record the sha256 of a file just written by a writer that hashed what it wrote (GGUF's `ordered_hash`),
    so that recording its step does not read it again."""
    st = path.stat()
    _hashes[(str(path), st.st_size, st.st_mtime_ns, st.st_ino)] = digest


def output_check(path: Path) -> dict[str, Any] | None:
    """Size and hash of a file, or of every visible file in a folder; None when `path` is missing."""
    if path.is_file():
        return {"size": path.stat().st_size, "sha256": file_sha256(path)}
    if path.is_dir():
        h = hashlib.sha256()
        size = 0
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = f.relative_to(path)
            if any(part.startswith(".") for part in rel.parts):
                continue
            size += f.stat().st_size
            h.update(f"{rel.as_posix()}\0{file_sha256(f)}\n".encode())
        return {"size": size, "sha256": h.hexdigest()}
    return None


def stage_checks(step: str, staging: Path, outputs: list[str]) -> dict[str, Any]:
    """The checks of a step's outputs while they are still in `staging`: each must exist, be non-empty and pass
    its kind's check (a GGUF parses and holds all its data); then its size and sha256, keyed by final path."""
    checks: dict[str, Any] = {}
    for rel in outputs:
        path = staging / rel.rstrip("/")
        if not path.exists():
            raise QuantkitError(f"step {step}: its output {rel} is missing", "run the same command again")
        files = [path] if path.is_file() else sorted(
            f for f in path.rglob("*") if f.is_file() and not any(
                part.startswith(".") for part in f.relative_to(path).parts))
        for f in files:
            if f.stat().st_size == 0 and (f == path or f.suffix in OUTPUT_CHECKS):
                raise QuantkitError(f"step {step}: its output {f.name} is empty", "run the same command again")
            check = OUTPUT_CHECKS.get(f.suffix)
            if check is not None:
                check(f)
        checks[rel.rstrip("/")] = output_check(path)
    return checks


def _move_into_place(src: Path, dst: Path) -> None:
    """Rename a staged file or folder to its final name (replacing what was there), keeping the sha256 memo."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    digests = {}
    for f in [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]:
        st = f.stat()
        digest = _hashes.get((str(f), st.st_size, st.st_mtime_ns, st.st_ino))
        if digest:
            digests[f.relative_to(src) if f != src else Path()] = digest
    if src.is_dir() and dst.exists():
        old = private_temp_name(dst.with_name(dst.name + ".old"))
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
    for rel, digest in digests.items():
        remember_sha256(dst / rel if rel != Path() else dst, digest)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


