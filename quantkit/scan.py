"""What must never be published: the Hub token and paths of this machine.

`public_command` writes a command line fit for a model card (local paths reduced to names). `scan_files` checks
every file about to be uploaded, after the card is written: text files whole, GGUF files' metadata strings,
safetensors headers; anything holding the token or a machine path (home, workspace, temporary folder, caches,
the checkpoint and calibration folders) stops the upload with one line naming the file and what it holds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from quantkit.errors import QuantkitError

BINARY_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".parquet", ".npy", ".npz", ".dat"})
_PATHLIKE = re.compile(r"^(?:~|\.{1,2})?/|^[A-Za-z]:[\\/]")


def _public_path(value: str, replace: dict[str, str]) -> str:
    if value in replace:
        return replace[value]
    if _PATHLIKE.match(value) or (("/" in value or "\\" in value) and _exists(value)):
        name = PurePosixPath(value.replace("\\", "/").rstrip("/")).name
        return name or value
    return value


def _exists(value: str) -> bool:
    """A relative path of this machine (``quants/x``, ``models/a``): one that is there (a Hub id is not)."""
    try:
        return Path(value).expanduser().exists()
    except (OSError, ValueError):
        return False


def public_command(argv: Iterable[str], replace: dict[str, str] | None = None) -> str:
    """A command line without machine paths: each path argument (``/a/b/c.jsonl``, ``--opt=/x/y``, ``~/m``) is
    reduced to its last part; `replace` maps exact arguments to what to show instead (a model folder → its Hub id)."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, _, value = arg.partition("=")
            out.append(f"{key}={_public_path(value, replace or {})}")
        else:
            out.append(_public_path(arg, replace or {}))
    return shlex.join(out)


def public_command_text(command: str) -> str:
    """`public_command` for a command already joined into one string (older manifests)."""
    try:
        return public_command(shlex.split(command))
    except ValueError:
        return command


def machine_paths(ws_root: Path, extra: Iterable[str | os.PathLike[str] | None] = ()) -> list[str]:
    """Folders of this machine that a published file must not mention (longest first)."""
    found: set[str] = set()
    candidates: list[Any] = [Path.home(), ws_root, tempfile.gettempdir(), os.environ.get("TMPDIR"),
                             os.environ.get("HF_HOME"), os.environ.get("HF_HUB_CACHE"),
                             os.environ.get("QUANTKIT_CACHE"), *extra]
    for c in candidates:
        if not c:
            continue
        for p in {str(c), str(Path(c).expanduser().resolve())}:
            p = p.rstrip("/")
            if len(p) > 1 and p.count("/") >= 1:
                found.add(p)
    return sorted(found, key=len, reverse=True)


def _mentions(text: str, path: str) -> bool:
    """`path` as a whole path in `text` (``/root`` in ``/root/x`` or ``"/root"``, not in ``/rooted``).

    The shared temporary folder counts only with a part below it that exists here (``/tmp/tmpab12/w``): ``/tmp/out``
    in an example of the original card is nobody's secret."""
    shared = {tempfile.gettempdir().rstrip("/"), "/tmp", "/var/tmp"}
    for m in re.finditer(re.escape(path) + r"(?![\w.\-])(/[^\s'\"`)\]<>|,;]*)?", text):
        if path not in shared:
            return True
        below = (m.group(1) or "").strip("/").split("/")[0]
        if below and (Path(path) / below).exists():
            return True
    return False


def _texts(path: Path, fmt: str | None = None) -> list[tuple[str, str, bool]]:
    """(where, text, whether machine paths matter there) pieces of a file worth scanning: the format's backend reads
    its own files (`BackendBase.file_texts`), the rest is read here."""
    if fmt:
        from quantkit.backends.base import sections_for

        own = sections_for(fmt).file_texts(path)
        if own is not None:
            return own
    return [(where, text, True) for where, text in _generic_texts(path)]


def _generic_texts(path: Path) -> list[tuple[str, str]]:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if path.suffix == ".safetensors" and len(head) == 8:
        (n,) = struct.unpack("<Q", head)
        if n < 100_000_000:
            with open(path, "rb") as fh:
                fh.seek(8)
                header = fh.read(n).decode("utf-8", errors="replace")
            try:
                meta = json.loads(header).get("__metadata__") or {}
            except (ValueError, AttributeError):
                meta = {}
            return [(f"metadata {k}", str(v)) for k, v in meta.items()]
    if path.suffix in BINARY_SUFFIXES:
        return []
    if path.stat().st_size > 64 << 20:  # a large file no backend reads: its first megabyte, as text
        with open(path, "rb") as fh:
            return [("", fh.read(1 << 20).decode("utf-8", errors="replace"))]
    return [("", path.read_bytes().decode("utf-8", errors="replace"))]


def scan_files(files: Iterable[tuple[str, Path]], *, token: str | None, paths: list[str],
               fmt: str | None = None) -> None:
    """Raise a `QuantkitError` for the first file (shown by its name in the repo) holding the token or a path;
    `fmt`'s backend reads its own files."""
    for shown, local in files:
        for where, text, paths_matter in _texts(local, fmt):
            at = f"{shown}" + (f" ({where})" if where else "")
            if token and token in text:
                raise QuantkitError(f"{at} contains your Hugging Face token; refusing to upload it",
                                    "remove the token from that file (and revoke the token if it was ever shared)")
            if not paths_matter:
                continue
            for p in paths:
                if _mentions(text, p):
                    raise QuantkitError(f"{at} mentions the local path {p}; refusing to publish it",
                                        "remove the path from that file (or from the original model card) and "
                                        "run the same command again")
