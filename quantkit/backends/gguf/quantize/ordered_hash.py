"""sha256 of a file while it is being written, its pieces in any order, from any thread.

A writer that places pieces at known offsets (a quantizer writing tensors where the header says they go) hands each
piece to `OrderedHash.add` as it writes it; a piece is hashed as soon as everything before it has been, so only
pieces that arrive early are held. The workspace then records the digest without reading the file again.

Given a `DirectFile`, it also writes the pieces, in order, so that they can go around the page cache; past its
memory limit it gives up the hash and writes each piece where it goes instead.
"""

from __future__ import annotations

import hashlib
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantkit.backends.gguf.quantize.direct_file import DirectFile


class OrderedHash:
    """The sha256 of a `size`-byte file whose bytes arrive as pieces; `extents` are the (start, end) ranges that
    will be added (sorted, not overlapping), and every byte outside them is zero (padding)."""

    def __init__(self, extents: list[tuple[int, int]], size: int, *, limit: int = 512 << 20,
                 writer: DirectFile | None = None) -> None:
        self._h = hashlib.sha256()
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        self._pos = 0
        self._size = size
        self._held = 0
        self._limit = limit  # bytes held before giving up (the workspace then reads the file instead)
        self._draining = False
        self._writer = writer  # writes the pieces too, in order (until the hash gives up, then as they come)
        self._spilled = False  # given up, and everything held has been handed to the writer
        self.failed = False
        self.peak = 0  # the most bytes held at once (pieces that came before their turn)
        at = 0
        for start, end in [*extents, (size, size)]:
            if start > at:
                self._pending[at] = bytes(start - at)
                self._held += start - at
            at = max(at, end)

    def add(self, at: int, piece: Any) -> None:
        """Bytes `piece` (bytes, memoryview or a contiguous numpy array) written at offset `at`."""
        view = memoryview(piece).cast("B")
        with self._lock:
            spilled = self._spilled
            if not spilled:
                self._pending[at] = view
                self._held += len(view)
                self.peak = max(self.peak, self._held)
                if self._held > self._limit:
                    self.failed = True
                if self._draining:
                    return
                self._draining = True
        if spilled:
            if self._writer is not None:
                self._writer.write_at(at, view)
            return
        try:
            self._drain()
        except BaseException:
            with self._lock:
                self._draining = False
            raise

    def _drain(self) -> None:
        ready = False
        while True:
            with self._lock:
                failing = self.failed
                if failing:
                    spill = sorted(self._pending.items())
                    self._pending.clear()
                    self._held = 0
                    if not spill and ready:
                        self._spilled = True
                        self._draining = False
                        return
                else:
                    nxt = self._pending.pop(self._pos, None)
                    if nxt is None:
                        self._draining = False
                        return
            if failing:  # what is held is written where it goes, and so is every later piece
                if self._writer is not None:
                    self._writer.to_random()
                    for at, view in spill:
                        self._writer.write_at(at, view)
                ready = True
                continue
            self._h.update(nxt)  # outside the lock: hashlib lets other threads run meanwhile
            if self._writer is not None:
                self._writer.append(nxt)
            with self._lock:
                self._pos += len(nxt)
                self._held -= len(nxt)

    @property
    def held(self) -> int:
        """Bytes that came before their turn, or that wait for the thread that hashes (and writes) them."""
        return self._held

    def hexdigest(self) -> str | None:
        """The digest once every byte has been hashed; None when pieces are missing or too many were held."""
        with self._lock:
            if self.failed or self._draining or self._pos != self._size:
                return None
            return self._h.hexdigest()
