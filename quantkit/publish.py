"""Publish one format of a workspace to the Hugging Face Hub.

What goes where (`layout`, no network): GGUF files, the importance matrix and the card on ``main``; EXL2 keeps the
card and ``measurement.json`` on ``main`` and puts every bitrate on its own branch (``4.0bpw``); GPTQ puts the
recommended variant on ``main`` and any other on a branch named after its folder. Artifacts that failed the quality
gate stay home unless forced; a single file over the Hub's 50 GB limit is refused.

How (`publish_format`): the token comes from ``HF_TOKEN`` or the saved login and is checked (present, not
read-only) before anything else; the repo is created if needed, the card rendered, then each artifact is committed
on its own. Before every commit the remote tree is compared with the local files (size, then sha256 for LFS files
or the git blob id for small ones), so a rerun after a failure sends only what is missing; LFS objects uploaded by
a failed attempt are reported present by the Hub and not sent again. The commit POST, which the client does not
retry, is retried here on 429 and 5xx (honouring Retry-After) and on dropped connections. The token is never
printed, logged or written anywhere, and is scrubbed from every error message.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from quantkit import console
from quantkit.card import (
    CARD_NAME,
    artifacts_for,
    branches,
    default_repo_name,
    formats_in,
    gate_failed,
    render_card,
    write_card,
)
from quantkit.errors import GateFailed, QuantkitError
from quantkit.workspace import MANIFEST, TMP_MARK, Workspace, human_size

MAX_FILE_SIZE = 50 * 1000**3  # the Hub refuses single files over 50 GB
SMALL_FILE = 10 * 1000**2  # files the Hub may keep in plain git (compared by git blob id)
COMMIT_TRIES = 5
MAX_WAIT = 60.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
SKIP_NAMES = frozenset({"job_new.json", "job.json", CARD_NAME})  # EXL2 progress files; our card replaces any README
SKIP_DIRS = frozenset({"out_tensor", "__pycache__"})
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", re.ASCII)  # the Hub takes ASCII names only
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$", re.ASCII)

T = TypeVar("T")


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


def _expand(ws: Workspace, rels: list[str]) -> list[Path]:
    """Files of an artifact: folders are walked, leaving out hidden, partial and progress files."""
    out: list[Path] = []
    for rel in rels:
        p = ws.abs(rel)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                parts = f.relative_to(p).parts
                if (f.is_file() and not any(x.startswith(".") or x in SKIP_DIRS for x in parts)
                        and f.name not in SKIP_NAMES and not f.name.endswith(TMP_MARK)):
                    out.append(f)
        else:
            out.append(p)
    return out


def layout(ws: Workspace, fmt: str, *, force: bool = False, planned: list[dict[str, Any]] | None = None) -> Layout:
    """Decide what goes where (no network). `planned` adds outputs a dry-run backend plan would write."""
    arts = artifacts_for(ws, fmt)
    arts += _planned_artifacts(ws, fmt, planned or [], {k for k, _ in arts})
    if not arts:
        raise QuantkitError(f"no {fmt} artifacts in the workspace {ws.root}",
                            f"run `quantkit {fmt} ...` first, or pass another format folder")
    refused = [_refusal(k, e) for k, e in arts if _blocked(e) and not force]
    kept = [(k, e) for k, e in arts if not (_blocked(e) and not force)]
    if not kept:
        what = "; ".join(f"{r['quant']} ({', '.join(r['reasons']) or 'failed'})" for r in refused)
        if any(r["failed_verification"] for r in refused):
            raise QuantkitError(f"every {fmt} artifact failed verification or the quality gate: {what}",
                                "rerun the command that made them to rebuild and verify them, or pass --force to "
                                "publish them anyway")
        raise GateFailed(f"every {fmt} artifact failed the quality gate: {what}",
                         "pass --force to publish them anyway, or quantize with a larger type")
    where = branches(fmt, kept)
    per_branch: dict[str, list[tuple[str, str, list[Item]]]] = {}
    for key, entry in kept:
        branch = where[key]
        base = ws.root / fmt if fmt == "gguf" else ws.abs(key)
        if entry.get("_planned"):
            items = [Item(PurePosixPath(key).name if fmt == "gguf" else f"({PurePosixPath(key).name}, to be made)",
                          ws.abs(key), int(entry.get("size") or 0), key, planned=True)]
        else:
            files = _expand(ws, list(entry.get("files") or [key]))
            missing = [f for f in files if not f.is_file()]
            if missing or not files:
                raise QuantkitError(
                    f"{key}: {ws.rel(missing[0]) if missing else 'no files'} listed in the manifest is missing",
                    f"run the same `quantkit {fmt}` command again to rebuild it")
            items = [Item(f.relative_to(base).as_posix() if f.is_relative_to(base) else f.name, f, f.stat().st_size,
                          key) for f in files]
        per_branch.setdefault(branch, []).append((branch, f"Add {entry.get('quant') or key}", items))
    # shared files and the card: last on main (and the card on every branch), so the card lands with the files
    card = ws.root / fmt / CARD_NAME
    extras: list[Item] = []
    for name in {"gguf": ["imatrix.gguf"], "exl2": ["measurement.json"]}.get(fmt, []):
        p = ws.root / fmt / name
        if p.is_file():
            extras.append(Item(name, p, p.stat().st_size))
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
            hint = ("convert again with --split-max-size 48G: llama.cpp split files (…-00001-of-0000N.gguf) load as "
                    "one model" if fmt == "gguf" else "save the model in smaller shards")
            raise QuantkitError(f"{it.path_in_repo} is {human_size(it.size)}; the Hub takes at most "
                                f"{human_size(MAX_FILE_SIZE)} per file", hint)
    return lay


def verify_failed(entry: dict[str, Any]) -> bool:
    return (entry.get("verify") or {}).get("passed") is False


def _blocked(entry: dict[str, Any]) -> bool:
    return gate_failed(entry) or verify_failed(entry)


def _refusal(key: str, entry: dict[str, Any]) -> dict[str, Any]:
    reasons = list((entry.get("gate") or {}).get("reasons") or []) if gate_failed(entry) else []
    if verify_failed(entry):
        reasons.insert(0, "failed verification: " + str((entry.get("verify") or {}).get("error") or "")[:200])
    return {"artifact": key, "quant": entry.get("quant"), "reasons": reasons,
            "failed_verification": verify_failed(entry)}


def _planned_artifacts(ws: Workspace, fmt: str, planned: list[dict[str, Any]],
                       known: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """Artifacts a backend's dry-run plan says it would write (``gguf/M-Q4_K_M.gguf``, ``exl2/4.0bpw/``,
    ``gptq/4bit-g128``), as manifest-like entries; shared and intermediate outputs are left out."""
    out: list[tuple[str, dict[str, Any]]] = []
    prefix = f"{ws.model.get('name') or ''}-"
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
        name = parts[1]
        if fmt == "gguf":
            if not name.endswith(".gguf") or name == "imatrix.gguf":
                continue
            quant = name.removesuffix(".gguf").removeprefix(prefix)
        elif name.endswith((".json", ".parquet", ".dat", ".txt", ".safetensors")):
            continue
        else:
            quant = name
        out.append((rel, {"format": fmt, "quant": quant, "size": int(step.get("estimated_size") or 0),
                          "bpw": step.get("bits"), "files": [rel], "_planned": True}))
    return out


# -- plans --------------------------------------------------------------------------------------------------------
def plan_publish(ws: Workspace, fmt: str, *, repo: str | None, private: bool,
                 planned: list[dict[str, Any]] | None = None, force: bool = False) -> dict[str, Any]:
    """What `publish_format` would upload where, with sizes. No network and no token needed.

    `planned` is a backend's dry-run plan: what it would write is included (marked ``planned``)."""
    try:
        lay = layout(ws, fmt, force=force, planned=planned)
    except GateFailed:
        raise
    except QuantkitError as exc:
        if planned is None:
            raise
        target = _repo_id(repo, None, ws, fmt)
        return {"repo": target, "url": f"{_endpoint()}/{target}", "private": private, "format": fmt, "branches": [],
                "total_size": 0, "refused": [], "dry_run": True, "note": exc.message}
    card_size = 0
    with contextlib.suppress(QuantkitError):  # nothing to render before the first artifact exists
        card_size = len(render_card(ws, fmt, repo=repo, include=lay.included).encode())
    target = _repo_id(repo, None, ws, fmt)
    out_branches = []
    for branch in lay.branches:
        files = [{"path": it.path_in_repo, "size": it.size or (card_size if it.path_in_repo == CARD_NAME else 0),
                  "artifact": it.artifact, **({"planned": True} if it.planned else {})}
                 for b, it in lay.items() if b == branch]
        out_branches.append({"name": branch, "files": files, "size": sum(f["size"] for f in files)})
    return {"repo": target, "url": f"{_endpoint()}/{target}", "private": private, "format": fmt,
            "branches": out_branches, "total_size": sum(b["size"] for b in out_branches),
            "refused": lay.refused, "dry_run": True}


# -- publishing ---------------------------------------------------------------------------------------------------
def publish_format(ws: Workspace, fmt: str, *, repo: str | None = None, private: bool = False, force: bool = False,
                   dry_run: bool = False) -> dict[str, Any]:
    """Publish `fmt` to the Hub; returns {repo, url, files, branches, skipped, refused, ...}."""
    if dry_run:
        return plan_publish(ws, fmt, repo=repo, private=private, force=force)
    from quantkit.lock import holding

    token = hub_token()
    with holding(ws.root):
        lay = layout(ws, fmt, force=force)
        with hub_errors(token, "checking the Hub token"):
            api = _api(token)
            who = _retrying(lambda: api.whoami(), "whoami")
        user = str(who.get("name") or "")
        target = _repo_id(repo, user, ws, fmt)
        _check_role(who, target)
        return publish_folder(ws, lay, api=api, repo=target, private=private, token=token)


def publish_folder(ws: Workspace, lay: Layout, *, api: Any, repo: str, private: bool, token: str) -> dict[str, Any]:
    """Render the card, create the repo and branches, and commit every group that is not on the Hub yet."""
    fmt = lay.fmt
    write_card(ws, fmt, repo=repo, include=lay.included)
    for _, it in lay.items():  # the card was just (re)written
        if it.path_in_repo == CARD_NAME:
            it.size = it.local.stat().st_size
    check_files(ws, lay, token)  # after the card is written: it carries the original model card
    for r in lay.refused:
        why = "failed verification" if r.get("failed_verification") else "failed the quality gate"
        console.warn(f"not publishing {r['quant']}: it {why}"
                     + (f" ({', '.join(r['reasons'])})" if r["reasons"] else "") + "; --force publishes it")
    if console.is_quiet():
        with contextlib.suppress(Exception):
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
    uploaded: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    made_branches: set[str] = {"main"}
    with hub_errors(token, f"publishing to {repo}"):
        url = str(_retrying(lambda: api.create_repo(repo, private=private, exist_ok=True, repo_type="model"),
                            "create the repo"))
        if private and getattr(_retrying(lambda: api.model_info(repo), "read the repo"), "private", None) is False:
            raise QuantkitError(f"{repo} already exists and is public; --private does not change an existing repo",
                                "make it private in the repo's settings on the Hub, or drop --private")
        console.info(f"publishing {fmt} to {repo}" + (" (private)" if private else ""))
        for branch, message, items in lay.groups:
            if branch not in made_branches:
                _retrying(lambda b=branch: api.create_branch(repo, branch=b, exist_ok=True), "create a branch")
                made_branches.add(branch)
            sent, kept = _commit_missing(api, repo, branch, items, message)
            uploaded += [{"path": it.path_in_repo, "branch": branch, "size": it.size} for it in sent]
            skipped += [{"path": it.path_in_repo, "branch": branch, "size": it.size} for it in kept]
    url = url if url.startswith("http") else f"{_endpoint()}/{repo}"
    record = {"repo": repo, "url": url, "private": private, "branches": lay.branches,
              "artifacts": lay.included, "published": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    ws.data.setdefault("published", {})[fmt] = record
    ws.save()
    return {"repo": repo, "url": url, "private": private, "format": fmt, "files": uploaded,
            "branches": lay.branches, "skipped": skipped, "refused": lay.refused,
            "uploaded_size": sum(f["size"] for f in uploaded)}


def _commit_missing(api: Any, repo: str, branch: str, items: list[Item], message: str) -> tuple[list[Item], list[Item]]:
    """Commit the items the branch lacks (or has with other content); retries transient failures.

    Every attempt starts from the remote tree, so a commit that went through but whose answer was lost is not
    made twice, and objects uploaded by an earlier attempt are not sent again.
    """
    from huggingface_hub import CommitOperationAdd

    present: list[Item] | None = None
    for attempt in range(1, COMMIT_TRIES + 1):
        try:
            remote = _remote_files(api, repo, branch)
            todo = [it for it in items if not _same(it, remote.get(it.path_in_repo))]
            if present is None:
                present = [it for it in items if it not in todo]
                if present:
                    console.info(f"{branch}: {len(present)} file(s) already on the Hub, not sent again")
            if not todo:
                return [], present
            size = sum(it.size for it in todo)
            console.info(f"{branch}: {message} ({len(todo)} file(s), {human_size(size)})")
            ops = [CommitOperationAdd(path_in_repo=it.path_in_repo, path_or_fileobj=str(it.local)) for it in todo]
            api.create_commit(repo, ops, commit_message=message, revision=branch)
            return [it for it in items if it not in present], present
        except Exception as exc:  # noqa: BLE001 - classified below; anything not transient is re-raised
            wait = _retry_wait(exc, attempt)
            if wait is None or attempt == COMMIT_TRIES:
                raise
            console.warn(f"{branch}: {_happened(exc)}; retrying in {wait:.0f} s "
                         f"(attempt {attempt + 1} of {COMMIT_TRIES})")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _remote_files(api: Any, repo: str, branch: str) -> dict[str, Any]:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        return {f.path: f for f in api.list_repo_tree(repo, revision=branch, recursive=True)
                if isinstance(f, RepoFile)}
    except (RevisionNotFoundError, RepositoryNotFoundError):
        return {}


def _same(item: Item, remote: Any) -> bool:
    """True when the remote file has this item's content (size, then sha256 or git blob id)."""
    if remote is None or remote.size != item.size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == item.sha256()
    if item.size > SMALL_FILE:  # a big file without LFS details: let the client's own checks decide
        return False
    from huggingface_hub.utils.sha import git_hash

    return remote.blob_id == git_hash(item.local.read_bytes())


# -- token, identity, repo ----------------------------------------------------------------------------------------
def hub_token() -> str:
    """The Hub token (``HF_TOKEN`` or the saved login); one clear error when there is none."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise QuantkitError("no Hugging Face token: publishing needs one with write access",
                            "set HF_TOKEN or run `hf auth login` (create a write token at "
                            "https://huggingface.co/settings/tokens)")
    return token


def _check_role(who: dict[str, Any], repo: str) -> None:
    """Refuse read-only tokens, and fine-grained tokens that cannot write to the repo's namespace."""
    access = ((who.get("auth") or {}).get("accessToken") or {})
    role = access.get("role")
    if role == "read":
        raise QuantkitError("the Hugging Face token is read-only: publishing needs write access",
                            "create a token with the 'write' role at https://huggingface.co/settings/tokens and "
                            "set HF_TOKEN or run `hf auth login`")
    if role == "fineGrained":
        scoped = ((access.get("fineGrained") or {}).get("scoped")) or []
        namespace = repo.split("/")[0]
        if not any("repo.write" in (s.get("permissions") or []) and (s.get("entity") or {}).get("name") == namespace
                   for s in scoped):
            raise QuantkitError(f"the fine-grained Hugging Face token cannot write repos of '{namespace}'",
                                "give the token 'Write access to contents/settings of all repos' for that "
                                "namespace, or use a write token")


def _repo_id(repo: str | None, user: str | None, ws: Workspace, fmt: str) -> str:
    namespace = user or "<your-username>"
    if not repo:
        return f"{namespace}/{default_repo_name(ws, fmt)}"
    if _REPO_ID.match(repo):
        return repo
    if _NAME.match(repo):
        return f"{namespace}/{repo}"
    raise QuantkitError(f"'{repo}' is not a Hub repo id", "use NAMESPACE/NAME, e.g. me/T-lite-0.1-GGUF")


def _api(token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="quantkit")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def check_files(ws: Workspace, lay: Layout, token: str | None) -> None:
    """Every file about to be uploaded is scanned for the token and for paths of this machine (`quantkit.scan`)."""
    from quantkit.scan import machine_paths, scan_files

    extra: list[str] = []
    local = ws.model.get("path")
    if local and Path(str(local)).is_dir():
        extra += [str(local), str(Path(str(local)).parent)]
    for entry in ws.artifacts.values():
        spec = str((entry.get("calibration") or {}).get("spec") or "")
        if spec and not spec.startswith(("builtin:", "hf:")) and "/" in spec:
            extra.append(str(Path(spec).expanduser().resolve().parent))
    files = {(it.path_in_repo, it.local) for _, it in lay.items() if not it.planned and it.local.is_file()}
    scan_files(sorted(files), token=token, paths=machine_paths(ws.root, extra))


# -- errors and retries ---------------------------------------------------------------------------------------------
def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            mod = __import__(name)
            found.append(mod.TransportError)
    return tuple(found)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _status(exc: BaseException) -> int | None:
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        code = getattr(resp, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _retry_wait(exc: BaseException, attempt: int) -> float | None:
    """Seconds to wait before retrying `exc`, or None when it is not worth retrying."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    if any(isinstance(e, OfflineModeIsEnabled) for e in _chain(exc)):
        return None
    transport = _transport_errors()
    status = _status(exc)
    if status is None and not any(isinstance(e, transport) for e in _chain(exc)):
        return None
    if status is not None and status not in RETRY_STATUS:
        return None
    for e in _chain(exc):
        headers = getattr(getattr(e, "response", None), "headers", None) or {}
        value = headers.get("Retry-After") if hasattr(headers, "get") else None
        if value is not None:
            with contextlib.suppress(ValueError):
                return min(MAX_WAIT, max(0.0, float(value)))
    return min(MAX_WAIT, 2.0 ** (attempt - 1))


def _retrying(call: Callable[[], T], what: str) -> T:
    """Run one Hub call, retrying transient failures (the client does not retry these calls itself)."""
    for attempt in range(1, COMMIT_TRIES + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below; anything not transient is re-raised
            wait = _retry_wait(exc, attempt)
            if wait is None or attempt == COMMIT_TRIES:
                raise
            console.warn(f"{what}: {_happened(exc)}; retrying in {wait:.0f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _short(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        server = next((getattr(e, "server_message", None) for e in _chain(exc) if getattr(e, "server_message", None)),
                      None)
        return f"HTTP {status}" + (f": {server}" if server else "")
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _happened(exc: BaseException) -> str:
    text = f"the Hub answered {_short(exc)}" if _status(exc) is not None else f"no answer ({_short(exc)})"
    return scrub(text, None)


def scrub(text: str, token: str | None) -> str:
    """`text` without the token (or anything shaped like a bearer credential)."""
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}\b", "hf_***", text)


@contextlib.contextmanager
def hub_errors(token: str | None, doing: str) -> Iterator[None]:
    """Turn Hub, network and metadata failures into one-line `QuantkitError`s without the token."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except QuantkitError:
        raise
    except OfflineModeIsEnabled as exc:
        raise QuantkitError("HF_HUB_OFFLINE is set, so the Hub cannot be reached",
                            "unset HF_HUB_OFFLINE to publish") from exc
    except Exception as exc:  # noqa: BLE001 - the boundary between the Hub client and our one-line errors
        status = _status(exc)
        resume = "run the same command again: files already on the Hub are not sent twice"
        if status == 401:
            err = QuantkitError(f"{doing}: the Hub rejected the token (HTTP 401)",
                                "check HF_TOKEN, or run `hf auth login` again")
        elif status == 403:
            err = QuantkitError(f"{doing}: the token may not do this (HTTP 403: {_server(exc)})",
                                "use a token with write access to that namespace")
        elif status is not None:
            err = QuantkitError(f"{doing} failed: {_short(exc)}", resume if status >= 429 else None)
        elif any(isinstance(e, _transport_errors()) for e in _chain(exc)):
            err = QuantkitError(f"{doing}: cannot reach the Hub at {_endpoint()} ({_short(exc)})",
                                f"check the network (and HF_ENDPOINT), then {resume}")
        elif isinstance(exc, ValueError) and "metadata" in str(exc).lower():
            err = QuantkitError(f"the Hub refused the model card's metadata: {_short(exc)}",
                                "report this as a quantkit bug")
        elif isinstance(exc, HfHubHTTPError | OSError | ValueError | RuntimeError):
            err = QuantkitError(f"{doing} failed: {_short(exc)}", resume)
        else:
            raise
        raise QuantkitError(scrub(err.message, token)[:400], err.hint) from exc


def _server(exc: BaseException) -> str:
    return next((str(e.server_message) for e in _chain(exc) if getattr(e, "server_message", None)), "forbidden")
