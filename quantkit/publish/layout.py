"""What goes where when a format is published (no network): the format's backend decides the branches, the path of
each file in the repo, the shared files beside the card and what never leaves the machine; GGUF files and the
importance matrix all on ``main``, EXL2 bitrates on their own branches, GPTQ's recommended variant on ``main``.
Artifacts that failed verification or the quality gate stay home unless forced; a single file over the Hub's 50 GB
limit is refused."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from quantkit.backends.base import BackendBase, gate_failed, sections_for
from quantkit.card import CARD_NAME, artifacts_for, formats_in
from quantkit.card.quality_csv import QUALITY_CSV, evaluated
from quantkit.errors import GateFailed, QuantkitError
from quantkit.workspace import MANIFEST, TMP_MARK, Workspace, human_size

MAX_FILE_SIZE = 50 * 1000**3  # the Hub refuses single files over 50 GB
SKIP = frozenset({CARD_NAME, QUALITY_CSV, "__pycache__"})  # ours replace any README or table in artifact folders


@dataclass
class Item:
    """One file to upload."""

    path_in_repo: str
    local: Path
    size: int
    artifact: str | None = None  # the artifact key; None for the card and shared files
    planned: bool = False  # not written yet (a --dry-run of a run that has not happened)
    _sha256: str | None = field(default=None, repr=False)

    def sha256(self) -> str:
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.local, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            self._sha256 = h.hexdigest()
        return self._sha256


@dataclass
class Layout:
    """What goes to which branch, in commit-sized groups."""

    fmt: str
    groups: list[tuple[str, str, list[Item]]]  # (branch, commit message, items)
    included: list[str]  # artifact keys published
    refused: list[dict[str, Any]]  # {artifact, quant, reasons}

    @property
    def branches(self) -> list[str]:
        seen: list[str] = []
        for branch, _, _ in self.groups:
            if branch not in seen:
                seen.append(branch)
        return seen

    def items(self) -> list[tuple[str, Item]]:
        return [(branch, it) for branch, _, items in self.groups for it in items]


# -- where things are ---------------------------------------------------------------------------------------------
def resolve_target(path: str | os.PathLike[str], fmt: str | None) -> tuple[Workspace, str]:
    """A workspace or a folder inside one (``quants/M/gguf``) → (workspace, format)."""
    if fmt is not None:
        from quantkit.backends.base import list_backends

        if fmt not in list_backends():
            raise QuantkitError(f"unknown format '{fmt}'", f"--format takes one of {', '.join(list_backends())}")
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise QuantkitError(f"{path} does not exist", "pass a workspace (quants/<model>) or its format folder")
    root = next((d for d in (p, *p.parents) if (d / MANIFEST).is_file()), None)
    if root is None:
        raise QuantkitError(f"{path} is not inside a quantkit workspace (no {MANIFEST} found)",
                            "pass a workspace (quants/<model>) or its format folder (quants/<model>/gguf)")
    ws = Workspace(root)
    if p != root:
        inner = p.relative_to(root).parts[0]
        if fmt and fmt != inner:
            raise QuantkitError(f"{path} is the {inner} folder but --format says {fmt}", "drop --format")
        fmt = inner
    if fmt is None:
        found = formats_in(ws)
        if len(found) != 1:
            raise QuantkitError(
                f"the workspace {root} holds {'no artifacts' if not found else 'several formats: ' + ', '.join(found)}",
                "pass the format folder (quants/<model>/gguf) or --format" if found else "quantize something first")
        fmt = found[0]
    return ws, fmt


def _expand(ws: Workspace, rels: list[str], skip: frozenset[str]) -> list[Path]:
    """Files of an artifact: folders are walked, leaving out hidden, partial and progress files (`skip`)."""
    out: list[Path] = []
    for rel in rels:
        p = ws.abs(rel)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                parts = f.relative_to(p).parts
                if (f.is_file() and not any(x.startswith(".") or x in skip for x in parts)
                        and not f.name.endswith(TMP_MARK)):
                    out.append(f)
        else:
            out.append(p)
    return out


def layout(ws: Workspace, fmt: str, *, force: bool = False, planned: list[dict[str, Any]] | None = None) -> Layout:
    """Decide what goes where (no network), as the format's backend says. `planned` adds outputs a dry-run backend
    plan would write."""
    backend = sections_for(fmt)
    arts = artifacts_for(ws, fmt)
    arts += _planned_artifacts(ws, backend, planned or [], {k for k, _ in arts})
    if not arts:
        raise QuantkitError(f"no {fmt} artifacts in the workspace {ws.root}",
                            f"run `quantkit {fmt} ...` first, or pass another format folder")
    refused = [_refusal(k, e) for k, e in arts if _blocked(e) and not force]
    kept = [(k, e) for k, e in arts if not (_blocked(e) and not force)]
    if not kept:
        what = "; ".join(f"{r['quant']} ({', '.join(r['reasons']) or 'failed'})" for r in refused)
        if any(r["unverified"] for r in refused):
            raise QuantkitError(f"every {fmt} artifact failed (or never had) verification, or failed the quality "
                                f"gate: {what}",
                                "rerun the command that made them to rebuild and verify them, or pass --force to "
                                "publish them anyway")
        raise GateFailed(f"every {fmt} artifact failed the quality gate: {what}",
                         "pass --force to publish them anyway, or quantize with a larger type")
    where = backend.branches(kept)
    skip = SKIP | backend.publish_skip
    per_branch: dict[str, list[tuple[str, str, list[Item]]]] = {}
    for key, entry in kept:
        branch = where[key]
        if entry.get("_planned"):
            items = [Item(backend.repo_path(ws, key, None), ws.abs(key), int(entry.get("size") or 0), key,
                          planned=True)]
        else:
            files = _expand(ws, list(entry.get("files") or [key]), skip)
            missing = [f for f in files if not f.is_file()]
            if missing or not files:
                raise QuantkitError(
                    f"{key}: {ws.rel(missing[0]) if missing else 'no files'} listed in the manifest is missing",
                    f"run the same `quantkit {fmt}` command again to rebuild it")
            items = [Item(backend.repo_path(ws, key, f), f, f.stat().st_size, key) for f in files]
        per_branch.setdefault(branch, []).append((branch, f"Add {entry.get('quant') or key}", items))
    # shared files and the card: last on main (and the card on every branch), so the card lands with the files
    card = ws.root / fmt / CARD_NAME
    extras: list[Item] = []
    for name, in_repo in backend.shared_files(ws).items():
        p = ws.root / fmt / name
        if p.is_file():
            extras.append(Item(in_repo, p, p.stat().st_size))
    if any(evaluated(e) for _, e in kept):  # written with the card, from the same entries
        p = ws.root / fmt / QUALITY_CSV
        extras.append(Item(QUALITY_CSV, p, p.stat().st_size if p.is_file() else 0))
    groups: list[tuple[str, str, list[Item]]] = list(per_branch.pop("main", []))
    groups.append(("main", "Add the model card" + (" and " + ", ".join(i.path_in_repo for i in extras)
                                                   if extras else ""),
                   [*extras, Item(CARD_NAME, card, card.stat().st_size if card.is_file() else 0)]))
    for branch in sorted(per_branch):
        groups += per_branch[branch]
        groups.append((branch, "Add the model card", [Item(CARD_NAME, card, card.stat().st_size
                                                           if card.is_file() else 0)]))
    lay = Layout(fmt, groups, [k for k, _ in kept], refused)
    for _, it in lay.items():
        if it.size > MAX_FILE_SIZE:
            raise QuantkitError(f"{it.path_in_repo} is {human_size(it.size)}; the Hub takes at most "
                                f"{human_size(MAX_FILE_SIZE)} per file", backend.format_info().too_big_hint)
    return lay


def verify_failed(entry: dict[str, Any]) -> bool:
    """Its verification ran and failed."""
    return (entry.get("verify") or {}).get("passed") is False


def unverified(entry: dict[str, Any]) -> bool:
    """It was never verified (made with --no-verify, or its verification never ran)."""
    return not entry.get("_planned") and (entry.get("verify") or {}).get("passed") is not True


def _blocked(entry: dict[str, Any]) -> bool:
    return gate_failed(entry) or unverified(entry)


def _refusal(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    reasons = list((entry.get("gate") or {}).get("reasons") or []) if gate_failed(entry) else []
    if verify_failed(entry):
        reasons.insert(0, "failed verification: " + str((entry.get("verify") or {}).get("error") or "")[:200])
    elif unverified(entry):
        reasons.insert(0, "never verified (made with --no-verify, or its check did not run)")
    return {"artifact": key, "quant": entry.get("quant"), "reasons": reasons,
            "failed_verification": verify_failed(entry), "unverified": unverified(entry)}


def _planned_artifacts(ws: Workspace, backend: BackendBase, planned: list[dict[str, Any]],
                       known: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Artifacts a backend's dry-run plan says it would write (``gguf/M-Q4_K_M.gguf``, ``exl2/4.0bpw/``,
    ``gptq/4bit-g128``), as manifest-like entries; shared and intermediate outputs are left out."""
    out: list[tuple[str, dict[str, Any]]] = []
    fmt = backend.name
    for step in planned:
        output = step.get("output")
        if not output or step.get("done"):
            continue
        p = Path(str(output))
        if p.is_absolute():
            if not p.resolve().is_relative_to(ws.root):
                continue
            p = p.resolve().relative_to(ws.root)
        rel = p.as_posix()
        parts = PurePosixPath(rel).parts
        if len(parts) != 2 or parts[0] != fmt or rel in known:
            continue
        quant = backend.planned_quant(parts[1], str(ws.model.get("name") or ""))
        if quant is None:
            continue
        out.append((rel, {"format": fmt, "quant": quant, "size": int(step.get("estimated_size") or 0),
                          "bpw": step.get("bits"), "files": [rel], "_planned": True}))
    return out
