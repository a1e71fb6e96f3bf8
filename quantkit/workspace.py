"""Workspace layout, the manifest of finished steps, fingerprints, atomic writes and disk-space checks.

A workspace (``./quants/<model>/`` by default) holds one folder per format (``gguf/``, ``gptq/<name>/``,
``exl2/<bits>/``), shared inputs (``calibration/``, ``eval/``) and ``manifest.json``::

    {"version": 1,
     "model": {"name", "source", "hub_id", "architecture", "fingerprint", "license", "instruct", ...},
     "steps": {"<step>": {"fingerprint", "outputs": [relative paths], "finished", "info": {...}}},
     "artifacts": {"<relative path>": {"format", "quant", "files": [relative paths], "size", "bpw",
                                       "eval": {...}, "gate": {...}}}}

A step whose recorded fingerprint matches and whose outputs all exist is skipped on a rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

MANIFEST = "manifest.json"
TMP_MARK = ".partial"


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def temp_name(path: Path) -> Path:
    """The temporary name a file is written under before it gets its final name."""
    return path.with_name(f".{path.name}{TMP_MARK}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` only if the block succeeds.

    Whatever is left at the temporary name after a failure is removed, so a file with a final name is always
    complete. A full disk is reported as a `QuantkitError`.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if exc.errno == 28:  # ENOSPC
            raise QuantkitError(
                f"disk full while writing {final}", "free some space or pass --workspace on a larger disk"
            ) from exc
        raise
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
def staging_dir(dest: Path) -> Iterator[Staging]:
    """A hidden ``.<name>.partial`` folder beside `dest` for tools that write one or several files (split GGUF
    parts); when the block succeeds every file in it is moved next to `dest`, otherwise nothing is left behind."""
    work = dest.parent / f".{dest.name}{TMP_MARK}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stage = Staging(work)
    try:
        yield stage
        for f in sorted(work.iterdir()):
            final = dest.parent / f.name
            os.replace(f, final)
            stage.files.append(final)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise QuantkitError(f"disk full while writing {dest.name}",
                                "free some space or pass --workspace on a larger disk") from exc
        raise
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


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def safe_dir_name(name: str) -> str:
    """A model name usable as a folder name (Hub ids lose their namespace)."""
    return name.split("/")[-1].replace(" ", "_")


class Workspace:
    """One model's workspace folder and its manifest."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / MANIFEST
        self.data: dict[str, Any] = {"version": 1, "model": {}, "steps": {}, "artifacts": {}}
        if self.manifest_path.exists():
            try:
                loaded = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise QuantkitError(
                    f"the workspace manifest {self.manifest_path} is corrupt",
                    "delete it to start this workspace afresh",
                ) from exc
            self.data.update(loaded)

    @classmethod
    def for_model(cls, name: str, workspace: str | os.PathLike[str] | None = None) -> Workspace:
        """`workspace` if given, else ``./quants/<name>``."""
        return cls(Path(workspace) if workspace else Path("quants") / safe_dir_name(name))

    # -- layout ------------------------------------------------------------------------------------------
    def dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()

    def abs(self, rel: str) -> Path:
        return self.root / rel

    # -- manifest ----------------------------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def steps(self) -> dict[str, Any]:
        return self.data["steps"]

    @property
    def artifacts(self) -> dict[str, Any]:
        return self.data["artifacts"]

    def save(self) -> None:
        write_json_atomic(self.manifest_path, self.data)

    def set_model(self, info: dict[str, Any]) -> None:
        self.data["model"] = dict(info)
        self.save()

    def is_done(self, step: str, fp: str) -> bool:
        """True when `step` finished with fingerprint `fp` and every output it recorded still exists."""
        rec = self.steps.get(step)
        if not rec or rec.get("fingerprint") != fp:
            return False
        return all(self.abs(rel).exists() for rel in rec.get("outputs", []))

    def record_step(self, step: str, fp: str, outputs: list[Path], **info: Any) -> None:
        self.steps[step] = {
            "fingerprint": fp,
            "outputs": [self.rel(p) for p in outputs],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "info": info,
        }
        self.save()

    def step_info(self, step: str) -> dict[str, Any]:
        return dict(self.steps.get(step, {}).get("info", {}))

    def record_artifact(self, main_file: Path, **info: Any) -> dict[str, Any]:
        """Add or replace an artifact entry; keeps any earlier `eval` / `gate` only if the files are unchanged."""
        key = self.rel(main_file)
        old = self.artifacts.get(key, {})
        entry = {**info}
        if old.get("size") == entry.get("size") and old.get("fingerprint") == entry.get("fingerprint"):
            for keep in ("eval", "gate", "verify"):
                if keep in old:
                    entry[keep] = old[keep]
        self.artifacts[key] = entry
        self.save()
        return entry

    def update_artifact(self, key: str, **fields: Any) -> None:
        self.artifacts.setdefault(key, {}).update(fields)
        self.save()


def record_model(ws: Workspace, ckpt: Any) -> None:
    """Keep the model's summary and its original card in the workspace (the card renderer needs both)."""
    info = ckpt.summary()
    readme = Path(ckpt.path) / "README.md"
    if readme.exists():
        write_text_atomic(ws.root / "source-README.md", readme.read_text(encoding="utf-8", errors="replace"))
        info["readme"] = "source-README.md"
    if ws.model != info:
        ws.set_model(info)
