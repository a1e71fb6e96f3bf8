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

BINARY_SUFFIXES = frozenset({".safetensors", ".gguf", ".bin", ".pt", ".pth", ".parquet", ".npy", ".npz", ".dat"})
_PATHLIKE = re.compile(r"^(?:~|\.{1,2})?/|^[A-Za-z]:[\\/]")


def _public_path(value: str, replace: dict[str, str]) -> str:
    if value in replace:
        return replace[value]
    if _PATHLIKE.match(value):
        name = PurePosixPath(value.replace("\\", "/").rstrip("/")).name
        return name or value
    return value


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


def _texts(path: Path) -> list[tuple[str, str]]:
    """(where, text) pieces of a file worth scanning."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"GGUF":
        from quantkit.backends.gguf.check import metadata_strings

        try:  # the vocabulary is searched for the token only (a piece like "/tmp" is nobody's path)
            return [(f"metadata {k}", v) for k, v in metadata_strings(path, vocabulary=True)]
        except Exception:  # noqa: BLE001 - not a readable GGUF: scan its first megabyte as bytes
            return [("", path.open("rb").read(1 << 20).decode("utf-8", errors="replace"))]
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
    return [("", path.read_bytes().decode("utf-8", errors="replace"))]


def scan_files(files: Iterable[tuple[str, Path]], *, token: str | None, paths: list[str]) -> None:
    """Raise a `QuantkitError` for the first file (shown by its name in the repo) holding the token or a path."""
    for shown, local in files:
        for where, text in _texts(local):
            at = f"{shown}" + (f" ({where})" if where else "")
            if token and token in text:
                raise QuantkitError(f"{at} contains your Hugging Face token; refusing to upload it",
                                    "remove the token from that file (and revoke the token if it was ever shared)")
            if where.startswith("metadata tokenizer.ggml.") and where != "metadata tokenizer.ggml.pre":
                continue
            for p in paths:
                if _mentions(text, p):
                    raise QuantkitError(f"{at} mentions the local path {p}; refusing to publish it",
                                        "remove the path from that file (or from the original model card) and "
                                        "run the same command again")
