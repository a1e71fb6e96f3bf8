"""sha256 of a file while it is being written, its pieces in any order, from any thread.

A writer that places pieces at known offsets (a quantizer writing tensors where the header says they go) hands each
piece to `OrderedHash.add` as it writes it; a piece is hashed as soon as everything before it has been, so only
pieces that arrive early are held. The workspace then records the digest without reading the file again.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any


class OrderedHash:
    """The sha256 of a `size`-byte file whose bytes arrive as pieces; `extents` are the (start, end) ranges that
    will be added (sorted, not overlapping), and every byte outside them is zero (padding)."""

    def __init__(self, extents: list[tuple[int, int]], size: int, *, limit: int = 512 << 20) -> None:
        self._h = hashlib.sha256()
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        self._pos = 0
        self._size = size
        self._held = 0
        self._limit = limit  # bytes held before giving up (the workspace then reads the file instead)
        self._draining = False
        self.failed = False
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
            if self.failed:
                return
            self._pending[at] = view
            self._held += len(view)
            if self._held > self._limit:
                self.failed = True
                self._pending.clear()
                return
            if self._draining:
                return
            self._draining = True
        while True:
            with self._lock:
                nxt = self._pending.pop(self._pos, None) if not self.failed else None
                if nxt is None:
                    self._draining = False
                    return
            self._h.update(nxt)  # outside the lock: hashlib lets other threads run meanwhile
            with self._lock:
                self._pos += len(nxt)
                self._held -= len(nxt)

    def hexdigest(self) -> str | None:
        """The digest once every byte has been hashed; None when pieces are missing or too many were held."""
        with self._lock:
            if self.failed or self._draining or self._pos != self._size:
                return None
            return self._h.hexdigest()
