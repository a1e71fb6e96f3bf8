"""Publish one format of a workspace to the Hugging Face Hub: the transport side (`quantkit.publish.layout` decides
what goes where).

The token comes from ``HF_TOKEN`` or the saved login and is checked (present, not read-only) before anything else;
the repo is created if needed, the card rendered, then each artifact is committed on its own. Before every commit
the remote tree is compared with the local files (size, then sha256 for LFS files or the git blob id for small
ones), so a rerun after a failure sends only what is missing; LFS objects uploaded by a failed attempt are reported
present by the Hub and not sent again. The commit POST, which the client does not retry, is retried here on 429 and
5xx (honouring Retry-After) and on dropped connections. The token is never printed, logged or written anywhere, and
is scrubbed from every error message; every file is scanned for it and for this machine's paths before upload.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

from quantkit import console
from quantkit.card import CARD_NAME, default_repo_name, render_card, write_card
from quantkit.card.quality_csv import QUALITY_CSV
from quantkit.errors import GateFailed, QuantkitError
from quantkit.hubname import HUB_ID, REPO_NAME
from quantkit.publish.layout import Item, Layout, layout
from quantkit.publish.retry import COMMIT_TRIES, endpoint, happened, hub_errors, retry_wait, retrying
from quantkit.workspace import Workspace, human_size

SMALL_FILE = 10 * 1000**2  # files the Hub may keep in plain git (compared by git blob id)


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
        return {"repo": target, "url": f"{endpoint()}/{target}", "private": private, "format": fmt, "branches": [],
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
    return {"repo": target, "url": f"{endpoint()}/{target}", "private": private, "format": fmt,
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
            who = retrying(lambda: api.whoami(), "whoami")
        user = str(who.get("name") or "")
        target = _repo_id(repo, user, ws, fmt)
        _check_role(who, target)
        return publish_folder(ws, lay, api=api, repo=target, private=private, token=token, force=force)


def publish_folder(ws: Workspace, lay: Layout, *, api: Any, repo: str, private: bool, token: str,
                   force: bool = False) -> dict[str, Any]:
    """Render the card, create the repo and branches, and commit every group that is not on the Hub yet."""
    fmt = lay.fmt
    write_card(ws, fmt, repo=repo, include=lay.included)
    for _, it in lay.items():  # the card and its quality table were just (re)written
        if it.path_in_repo in (CARD_NAME, QUALITY_CSV):
            it.size = it.local.stat().st_size
    check_files(ws, lay, token)  # after the card is written: it carries the original model card
    check_bytes(ws, lay, force=force)  # exactly what was made and verified, or nothing
    for r in lay.refused:
        why = ("failed verification" if r.get("failed_verification") else "was never verified"
               if r.get("unverified") else "failed the quality gate")
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
        url = str(retrying(lambda: api.create_repo(repo, private=private, exist_ok=True, repo_type="model"),
                            "create the repo"))
        if private and getattr(retrying(lambda: api.model_info(repo), "read the repo"), "private", None) is False:
            raise QuantkitError(f"{repo} already exists and is public; --private does not change an existing repo",
                                "make it private in the repo's settings on the Hub, or drop --private")
        console.info(f"publishing {fmt} to {repo}" + (" (private)" if private else ""))
        for branch, message, items in lay.groups:
            if branch not in made_branches:
                retrying(lambda b=branch: api.create_branch(repo, branch=b, exist_ok=True), "create a branch")
                made_branches.add(branch)
            sent, kept = _commit_missing(api, repo, branch, items, message)
            uploaded += [{"path": it.path_in_repo, "branch": branch, "size": it.size} for it in sent]
            skipped += [{"path": it.path_in_repo, "branch": branch, "size": it.size} for it in kept]
    url = url if url.startswith("http") else f"{endpoint()}/{repo}"
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
            wait = retry_wait(exc, attempt)
            if wait is None or attempt == COMMIT_TRIES:
                raise
            console.warn(f"{branch}: {happened(exc)}; retrying in {wait:.0f} s "
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
    if not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        where = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the saved Hub token"
        raise QuantkitError(f"{where} holds characters no Hub token has (non-ASCII, spaces or control characters)",
                            "copy the token again from https://huggingface.co/settings/tokens")
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
    if HUB_ID.match(repo):
        return repo
    if REPO_NAME.match(repo):
        return f"{namespace}/{repo}"
    raise QuantkitError(f"'{repo}' is not a Hub repo id", "use NAMESPACE/NAME, e.g. me/T-lite-0.1-GGUF")


def _api(token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="quantkit")


def check_bytes(ws: Workspace, lay: Layout, *, force: bool = False) -> None:
    """Every artifact file about to be uploaded is hashed again: it must be the bytes its step made and its
    verification checked. A file that changed since (or whose record has no hash) stops the upload in one line
    naming it, unless `force` (then it is said, and sent)."""
    for _, it in lay.items():
        if it.planned or it.artifact is None:
            continue
        entry = ws.artifacts.get(it.artifact) or {}
        rel = ws.rel(it.local)
        made = (entry.get("sha256") or {}).get(rel)
        checked = ((entry.get("verify") or {}).get("sha256") or {})
        checked = checked.get(rel) if isinstance(checked, dict) else None
        now = it.sha256()
        why = None
        if made is None:
            why = "the manifest has no hash of it (made by an older quantkit)"
        elif now != made:
            why = f"it changed since it was made (sha256 {now[:12]}…, recorded {made[:12]}…)"
        elif checked is not None and checked != now:
            why = f"it is not the file that was verified (sha256 {now[:12]}…, verified {checked[:12]}…)"
        if why is None:
            continue
        if force:
            console.warn(f"publishing {rel} although {why} (--force)")
            continue
        raise QuantkitError(f"not publishing {rel}: {why}",
                            "rerun the command that made it to rebuild and verify it, or pass --force")


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
    scan_files(sorted(files), token=token, paths=machine_paths(ws.root, extra), fmt=lay.fmt)

