"""What identifies a checkpoint's weights, cheaply.

A file in the Hugging Face cache is a symlink to ``blobs/<hash>``, and the blob's name is the hash of its content
(sha256 for LFS files): that name is used, nothing is read. Any other file (a local folder) gets the sha256 of its
content, remembered in ``<quantkit cache>/weight-hashes.json`` by (path, size, mtime_ns), so a 60 GB checkpoint is
hashed once; a rewritten file (new size or mtime) is hashed again.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.files import file_sha256

CACHE_NAME = "weight-hashes.json"
_BLOB = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
_memo: dict[tuple[str, int, int], str] = {}
_read_only = False


@contextlib.contextmanager
def reading_only() -> Iterator[None]:
    """Inside the block, hashes are computed (and remembered in this process) but the cache file is not written:
    plans and ``--dry-run`` change nothing on disk."""
    global _read_only
    before, _read_only = _read_only, True
    try:
        yield
    finally:
        _read_only = before


def _cache_path() -> Path:
    from quantkit.demo import cache_root

    return cache_root() / CACHE_NAME


def hub_blob(path: Path) -> str | None:
    """The blob hash a Hugging Face cache symlink points at, or None for a plain file."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and _BLOB.match(target.name):
        return target.name
    return None


def _load_cache() -> dict[str, dict[str, object]]:
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def content_hash(path: Path) -> str:
    """sha256 of a file's content, from the cache while its size and mtime are unchanged."""
    real = Path(path).resolve()
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key in _memo:
        return _memo[key]
    cache = _load_cache()
    hit = cache.get(str(real))
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns \
            and isinstance(hit.get("sha256"), str):
        digest = str(hit["sha256"])
    else:
        digest = file_sha256(real)
        if not _read_only:
            _remember(str(real), st.st_size, st.st_mtime_ns, digest)
    _memo[key] = digest
    return digest


def _remember(path: str, size: int, mtime_ns: int, digest: str) -> None:
    """Add one entry to the cache file (re-read first, written atomically; entries of files gone are dropped)."""
    from quantkit.files import write_json_atomic

    cache = {k: v for k, v in _load_cache().items() if os.path.exists(k)}
    cache[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError, QuantkitError):  # a read-only or full cache disk: the hash is still right
        write_json_atomic(_cache_path(), cache)


def weights_identity(path: Path) -> str:
    """What identifies one weights file's content: ``blob:<hash>`` in the Hub cache, else ``sha256:<hash>``."""
    blob = hub_blob(Path(path))
    return f"blob:{blob}" if blob else f"sha256:{content_hash(Path(path))}"
