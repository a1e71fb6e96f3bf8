"""The converter's working folders: whether to start, resume or finish one (the resume state machine), and whether
an output folder is complete."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any

from quantkit.workspace import write_json_atomic


def read_job(work: Path) -> dict[str, Any] | None:
    """The converter's ``job_new.json`` in `work`, or None when there is none (or it is unreadable)."""
    try:
        job = json.loads((work / "job_new.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return job if isinstance(job, dict) else None


def _stamp(work: Path) -> Path:
    return work.with_name(work.name + ".quantkit.json")


def work_state(work: Path, fp: str, output_complete: bool) -> str:
    """What to do with a converter working folder: ``new``, ``resume`` or ``finished``.

    ``resume``: an unfinished job of the same inputs (the converter resumes when given the same ``-o``).
    ``finished``: the job finished and its output is complete, only the final rename is left.
    ``new``: anything else; a stale or broken folder must be cleared first (`reset_work`).
    """
    try:
        stamp = json.loads(_stamp(work).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "new"
    job = read_job(work)
    if not isinstance(stamp, dict) or stamp.get("fingerprint") != fp or job is None or "invalid" in job:
        return "new"
    if job.get("progress") == "finished":
        return "finished" if output_complete else "new"
    return "resume"


def reset_work(work: Path, fp: str, *extra: Path) -> None:
    """Clear a working folder (and `extra`: partial outputs, old logs) and stamp it with its inputs' fingerprint."""
    for path in (work, *extra):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    work.mkdir(parents=True)
    write_json_atomic(_stamp(work), {"fingerprint": fp})


def clear_work(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _stamp(work).unlink()


def output_complete(folder: Path) -> bool:
    """A converter output folder with weights and a config.json marked ``quant_method: exl2``."""
    if not folder.is_dir() or not any(folder.glob("output*.safetensors")):
        return False
    if any(folder.glob("output_temp_*.safetensors")):
        return False
    return quant_method(folder) == "exl2"


def quant_method(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    return qcfg.get("quant_method") if isinstance(qcfg, dict) else None
