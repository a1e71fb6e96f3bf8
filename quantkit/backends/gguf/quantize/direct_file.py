"""A large output written front to back around the page cache (``O_DIRECT``), by a thread of its own.

For files this run does not read again. Filling the page cache is not free: on this project's build machine (a
virtual machine) it cost about a second of kernel time per GB written, the same again to read a file back in, and
nothing with ``O_DIRECT`` (``dd`` of 3.8 GB: 2.3–7.2 s of system time through the cache, 0.2 s around it). That is
time the quantizer's threads want, and a conversion that goes through the cache also evicts what the user had cached.

Bytes are appended into aligned blocks; each full block goes to a writer thread, which writes it while the caller
goes on. Where the platform has no ``O_DIRECT`` or the file system refuses it (the first write says so), the same
calls write through the page cache. `to_random` turns the file into one written piece by piece at any offset, for a
caller that can no longer keep its pieces in order.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from pathlib import Path
from typing import Any

import numpy as np

BLOCK = 4 << 20  # bytes per write
ALIGN = 4096  # O_DIRECT's alignment of buffers, offsets and lengths (4 KiB covers 512-byte and 4K devices)


class DirectFile:
    """Appends to `path` (created or truncated) from offset 0; `close(size)` ends it at `size` bytes.

    `append` and `to_random` are called by one thread at a time; `write_at` (after `to_random`) by any."""

    def __init__(self, path: Path, *, direct: bool = True) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._dfd = -1
        flag = getattr(os, "O_DIRECT", 0)
        if direct and flag:
            try:
                self._dfd = os.open(self.path, os.O_WRONLY | flag)
            except OSError:
                self._dfd = -1
        self.direct = self._dfd >= 0  # False once the file system refused a direct write too
        self._pos = 0  # bytes appended so far
        self._block: np.ndarray | None = None  # the block being filled: bytes [_pos - _fill, _pos)
        self._fill = 0
        self._random = False
        self._free: list[np.ndarray] = []
        self._free_lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, np.ndarray, int] | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="quantkit-direct-write", daemon=True)
        self._thread.start()

    # -- appending ---------------------------------------------------------------------------------------
    def append(self, data: Any) -> None:
        """Bytes (anything with the buffer protocol) at the end of what was appended so far."""
        view = memoryview(data).cast("B")
        src = np.frombuffer(view, np.uint8)
        addr = src.ctypes.data if src.size else 0
        done = 0
        while done < src.size:
            self._raise_error()
            if self._block is None:
                self._block = self._take()
                self._fill = 0
            n = min(src.size - done, BLOCK - self._fill)
            ctypes.memmove(self._block.ctypes.data + self._fill, addr + done, n)  # lets other threads run
            self._fill += n
            self._pos += n
            done += n
            if self._fill == BLOCK:
                self._queue.put((self._pos - BLOCK, self._block, BLOCK))
                self._block = None

    def to_random(self) -> None:
        """From now on pieces come through `write_at`; what was appended is written (the last block through the
        page cache, as it is not a whole block)."""
        if self._random:
            return
        self._random = True
        if self._block is not None and self._fill:
            pwrite_all(self._fd, memoryview(self._block)[: self._fill], self._pos - self._fill)
        self._block = None

    def write_at(self, at: int, data: Any) -> None:
        """Bytes at offset `at`, through the page cache (after `to_random`)."""
        assert self._random
        self._raise_error()
        pwrite_all(self._fd, memoryview(data).cast("B"), at)

    # -- ending ------------------------------------------------------------------------------------------
    def close(self, size: int) -> None:
        """Write what is left, wait for the writer, and end the file at `size` bytes; raises the writer's error."""
        try:
            if not self._random and self._block is not None and self._fill:
                length = -(-self._fill // ALIGN) * ALIGN  # whole aligned blocks: the file is cut to size below
                self._block[self._fill : length] = 0
                self._queue.put((self._pos - self._fill, self._block, length))
                self._block = None
            self._stop()
            self._raise_error()
            os.ftruncate(self._fd, size)
        finally:
            self._close_fds()

    def abort(self) -> None:
        """Stop without finishing the file (the caller removes it)."""
        try:
            self._error = self._error or InterruptedError("aborted")
            self._stop()
        finally:
            self._close_fds()

    # -- internals ---------------------------------------------------------------------------------------
    def _take(self) -> np.ndarray:
        with self._free_lock:
            if self._free:
                return self._free.pop()
        raw = np.empty(BLOCK + ALIGN, np.uint8)
        skip = (-raw.ctypes.data) % ALIGN
        return raw[skip : skip + BLOCK]

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            at, block, length = item
            try:
                if self._error is None:
                    self._write_block(at, memoryview(block)[:length])
            except BaseException as exc:  # noqa: BLE001 - handed to the appending thread
                self._error = exc
            with self._free_lock:
                self._free.append(block)

    def _write_block(self, at: int, view: memoryview) -> None:
        if self.direct:
            try:
                pwrite_all(self._dfd, view, at)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False  # the file system takes O_DIRECT at open but not at write
        pwrite_all(self._fd, view, at)

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _close_fds(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


def pwrite_all(fd: int, buf: memoryview, at: int) -> None:
    """`os.pwrite` until all of `buf` is written (it may write less than asked)."""
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], at + done)
