"""Workspace layout, the manifest of finished steps, fingerprints, atomic writes and disk-space checks.

A workspace (``./quants/<model>/`` by default) holds one folder per format (``gguf/``, ``gptq/<name>/``,
``exl2/<bits>/``), shared inputs (``calibration/``, ``eval/``) and ``manifest.json``::

    {"version": 1,
     "model": {"name", "source", "hub_id", "architecture", "fingerprint", "license", "instruct", ...},
     "steps": {"<step>": {"fingerprint", "outputs": [relative paths], "checks": {path: {"size", "sha256"}},
                          "finished", "info": {...}}},
     "artifacts": {"<relative path>": {"format", "quant", "files": [relative paths], "size", "bpw",
                                       "eval": {...}, "gate": {...}}}}

A step whose recorded fingerprint matches and whose outputs are all still there with the recorded size and hash
is skipped on a rerun; a step is recorded only once its outputs exist and pass the check for their kind (a GGUF must
parse and hold all its tensor data). One process writes a workspace at a time (`quantkit.lock`); temporary names
carry the writer's PID, so nothing is ever shared between processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError
from quantkit.files import (  # noqa: F401 - re-exported: the workspace's file primitives
    OUTPUT_CHECKS,
    TMP_MARK,
    DiskFull,
    Staging,
    _hashes,
    _move_into_place,
    atomic_path,
    check_disk,
    disk_guard,
    file_sha256,
    human_size,
    is_disk_full,
    output_check,
    private_temp_name,
    remember_sha256,
    stage_checks,
    staging_dir,
    temp_name,
    write_json_atomic,
    write_text_atomic,
)
from quantkit.manifest import checked

MANIFEST = "manifest.json"
STAGING = ".staging"  # where steps write before their outputs get final names


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def safe_dir_name(name: str) -> str:
    """A model name usable as a folder name (Hub ids lose their namespace)."""
    return name.split("/")[-1].replace(" ", "_")


class Workspace:
    """One model's workspace folder and its manifest."""

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False) -> None:
        """`read_only` (plans, ``--dry-run``): nothing is created or written, the manifest is only read; changes
        stay in memory."""
        self.root = Path(root).expanduser().resolve()
        self.read_only = read_only
        if not read_only:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe = private_temp_name(self.root / ".write-test")  # a read-only mount says so here, not later
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o644))
                os.unlink(probe)
            except OSError as exc:
                from quantkit.errors import path_error

                raise path_error(exc, self.root) from None
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
            self.data.update(checked(loaded, str(self.manifest_path)))

    @classmethod
    def for_model(cls, name: str, workspace: str | os.PathLike[str] | None = None, *,
                  read_only: bool = False) -> Workspace:
        """`workspace` if given, else ``./quants/<name>``."""
        return cls(Path(workspace) if workspace else Path("quants") / safe_dir_name(name), read_only=read_only)

    # -- layout ------------------------------------------------------------------------------------------
    def dir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        if not self.read_only:
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

    def lock(self) -> None:
        """Become this workspace's only writer (refuses in one line while another live run holds it)."""
        from quantkit.lock import acquire

        if self.read_only:
            raise QuantkitError(f"the workspace {self.root} was opened read-only", "this is a bug in quantkit")
        acquire(self.root)

    def save(self) -> None:
        """Write the manifest; refused while another live process holds the workspace. A read-only workspace
        keeps its changes in memory."""
        from quantkit.lock import holding

        if self.read_only:
            return
        checked(self.data, str(self.manifest_path))  # nothing writes a manifest the next run cannot read
        with holding(self.root):
            write_json_atomic(self.manifest_path, self.data)

    def set_model(self, info: dict[str, Any]) -> None:
        self.data["model"] = dict(info)
        self.save()

    def is_done(self, step: str, fp: str) -> bool:
        """True when `step` finished with fingerprint `fp` and every output it recorded is still there, unchanged
        (same size and sha256). A record without checks (an older quantkit) does not count: the step runs again."""
        rec = self.steps.get(step)
        if not rec or rec.get("fingerprint") != fp:
            return False
        outputs = rec.get("outputs", [])
        checks = rec.get("checks")
        if outputs and not isinstance(checks, dict):
            return False
        for rel in outputs:
            want = (checks or {}).get(rel)
            path = self.abs(rel)
            if not want or not path.exists():
                return False
            size = path.stat().st_size if path.is_file() else None
            if size is not None and size != want.get("size"):
                return False
            if output_check(path) != want:
                return False
        return True

    def record_step(self, step: str, fp: str, outputs: list[Path], **info: Any) -> None:
        """Record `step` as finished, only after every output exists, passes its kind's check (a GGUF parses and
        holds all its tensor data), and its size and sha256 are taken."""
        rels = [self.rel(p) for p in outputs]
        self._record(step, fp, rels, stage_checks(step, self.root, rels), info)

    def step_info(self, step: str) -> dict[str, Any]:
        return dict(self.steps.get(step, {}).get("info", {}))

    # -- the executor's side: what is done, staging, committing a step's outputs ----------------------------
    def done(self, step: Any) -> bool:
        """A planned `Step` is done: its fingerprint is known and matches the record, whose outputs are intact."""
        return bool(step.fingerprint) and self.is_done(step.key, step.fingerprint)

    def recorded(self, key: str) -> Any:
        """A finished step's record (`quantkit.steps.Recorded`), or None."""
        from quantkit.steps import Recorded

        rec = self.steps.get(key)
        if not rec:
            return None
        return Recorded(key, rec["fingerprint"], [self.abs(o) for o in rec.get("outputs", [])],
                        dict(rec.get("info", {})), list(rec.get("artifacts", [])), dict(rec.get("checks") or {}))

    def history(self, fmt: str) -> list[tuple[str, str]]:
        """The recorded steps that made a format's files (the model's own and the format's), as (kind, title), in
        the order they finished: the card's account of how the files were made."""
        rows = [(rec.get("finished", ""), i, key, str(rec.get("title") or ""))
                for i, (key, rec) in enumerate(self.steps.items()) if key.split("/")[0] in ("model", fmt)]
        return [(key.split("/")[1] if "/" in key else key, title) for _, _, key, title in sorted(rows) if title]

    def staging(self, key: str, owner: int | None = None) -> Path:
        """A fresh staging folder for step `key`, named for the process that commits it (`owner`, default this
        one), so a run that dies leaves a folder the next run recognises as stale and removes."""
        safe = key.replace("/", "--")
        folder = self.root / STAGING / f".{safe}.{owner or os.getpid()}{TMP_MARK}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def commit(self, step: Any, result: Any, staging: Path, fused: tuple[Any, ...] = ()) -> None:
        """Give the outputs of `step` (and of the `fused` steps it made) their final names and record each step,
        its artifacts and the artifact updates; the staging folder is removed. Outputs are checked (kind, size,
        sha256) before anything is renamed, so nothing incomplete ever gets a final name."""
        parts = [(step, result), *((s, result.fused[s.key]) for s in fused if s.key in result.fused)]
        checked_parts = []
        for st, res in parts:
            outputs = list(res.outputs) if res.outputs is not None else [o for o in st.outputs if "<" not in o]
            checks = res.checks if res.checks is not None else stage_checks(st.key, staging, outputs)
            checked_parts.append((st, res, outputs, checks))
        try:
            for _st, _res, outputs, _checks in checked_parts:
                for rel in outputs:
                    _move_into_place(staging / rel.rstrip("/"), self.abs(rel.rstrip("/")))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with contextlib.suppress(OSError):
                staging.parent.rmdir()  # the last one out leaves no empty .staging behind
        for st, res, outputs, checks in checked_parts:
            self._record(st.key, st.fingerprint, [o.rstrip("/") for o in outputs], checks, res.info,
                         title=st.title, artifacts=list(res.artifacts))
            for key, entry in res.artifacts.items():
                self.record_artifact(self.abs(key), **entry)
            for key, fields in res.updates.items():
                self.update_artifact(key, **fields)

    def _record(self, step: str, fp: str, outputs: list[str], checks: dict[str, Any], info: dict[str, Any],
                **extra: Any) -> None:
        self.steps[step] = {"fingerprint": fp, "outputs": outputs, "checks": checks,
                            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "info": info}
        self.save()

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
    if ws.read_only:  # a plan: the card renderer gets the summary, nothing is written
        ws.data["model"] = info
        return
    if readme.exists():
        write_text_atomic(ws.root / "source-README.md", readme.read_text(encoding="utf-8", errors="replace"))
        info["readme"] = "source-README.md"
    if ws.model != info:
        ws.set_model(info)
