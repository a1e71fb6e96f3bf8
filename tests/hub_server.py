"""A fake Hugging Face Hub on 127.0.0.1, speaking the HTTP API that `huggingface_hub` uses to publish and download.

It serves what a publish needs: ``GET /api/whoami-v2``, ``POST /api/repos/create``, ``POST
/api/models/{repo}/preupload/{rev}``, the LFS batch API (``POST /{repo}.git/info/lfs/objects/batch``, then a ``PUT``
to the href it returns, on this same server), ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, file,
lfsFile, deletedFile), ``POST /api/models/{repo}/branch/{branch}``, ``GET /api/models/{repo}[/revision/{rev}]`` with
siblings, ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``GET /api/models/{repo}/refs``, ``HEAD|GET
/{repo}/resolve/{rev}/{path}`` and ``POST /api/validate-yaml``. Files are kept in memory per repo and branch, LFS
objects per repo (so an object uploaded by a commit that then failed is "already present" next time, as on the Hub).

Tokens map to (user, role); write calls need a write token of the repo's namespace. `fail()` makes matching
requests answer an error (after letting `after` of them through), and `requests` records every request.
Use with Xet disabled (``HF_HUB_DISABLE_XET=1``): the fake speaks plain LFS only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

WRITE_TOKEN = "hf_quantkitFakeWriteToken0123456789abcdef"
READ_TOKEN = "hf_quantkitFakeReadToken0123456789abcdefgh"
USER = "tester"
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".onnx", ".parquet", ".npy", ".npz", ".model",
                ".h5", ".msgpack", ".zip", ".tar", ".gz")
REGULAR_MAX = 10 * 1024 * 1024
GITATTRIBUTES = b"*.gguf filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def oid(self) -> str:
        """The git blob id: of the content, or of the LFS pointer for LFS files."""
        return git_oid(self.pointer if self.lfs else self.data)


@dataclass
class Repo:
    id: str
    private: bool
    branches: dict[str, dict[str, StoredFile]] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    lfs: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    status: int = 0
    body_size: int = 0
    authorized: bool = False
    detail: Any = None  # commits: the paths committed; LFS PUT: the oid


@dataclass
class Failure:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int
    after: int
    headers: dict[str, str]


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """The server and its state; `url` is the endpoint to give the client (``HF_ENDPOINT``)."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None) -> None:
        self.tokens = tokens or {WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read")}
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.failures: list[Failure] = []
        self.lock = threading.RLock()
        self._counter = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @classmethod
    @contextlib.contextmanager
    def running(cls, **kw: Any) -> Iterator[FakeHub]:
        hub = cls(**kw).start()
        try:
            yield hub
        finally:
            hub.stop()

    # -- test controls -----------------------------------------------------------------------------------------
    def fail(self, method: str, pattern: str, status: int = 500, *, times: int = 1, after: int = 0,
             retry_after: str | None = "0") -> None:
        """The next `times` requests matching (after `after` of them pass) answer `status`."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self.lock:
            self.failures.append(Failure(method.upper(), re.compile(pattern), status, times, after, headers))

    def clear_failures(self) -> None:
        with self.lock:
            self.failures.clear()

    def calls(self, method: str, pattern: str = "") -> list[Request]:
        rx = re.compile(pattern)
        with self.lock:
            return [r for r in self.requests if r.method == method.upper() and rx.search(r.path)]

    def files(self, repo: str, branch: str = "main") -> dict[str, bytes]:
        with self.lock:
            return {p: f.data for p, f in self.repos[repo].branches[branch].items()}

    def lfs_puts(self) -> list[str]:
        """The oids of every successful LFS upload, in order."""
        return [r.detail for r in self.calls("PUT", r"^/__lfs/") if r.status == 200]

    # -- internals ---------------------------------------------------------------------------------------------
    def _next_oid(self, *parts: str) -> str:
        self._counter += 1
        return hashlib.sha1("/".join((*parts, str(self._counter))).encode()).hexdigest()

    def _injected(self, method: str, path: str) -> Failure | None:
        with self.lock:
            for f in self.failures:
                if f.method == method and f.times > 0 and f.pattern.search(path):
                    if f.after > 0:
                        f.after -= 1
                        return None
                    f.times -= 1
                    return f
        return None


_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), name) for m, p, name in [
        ("GET", r"^/api/whoami-v2$", "whoami"),
        ("GET", r"^/api/agent-harnesses$", "harnesses"),
        ("POST", r"^/api/repos/create$", "create_repo"),
        ("POST", r"^/api/validate-yaml$", "validate_yaml"),
        ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$", "preupload"),
        ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$", "commit"),
        ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$", "branch_create"),
        ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$", "tree"),
        ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/refs$", "refs"),
        ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)$", "info"),
        ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)$", "info"),
        ("POST", r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$", "lfs_batch"),
        ("PUT", r"^/__lfs/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})$", "lfs_put"),
        ("GET", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
        ("HEAD", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$", "resolve"),
    ]
]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's signature
            pass

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        # -- plumbing ------------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None,
                  content_type: str = "application/json", length: int | None = None) -> None:
            if isinstance(payload, bytes):
                body = payload
            else:
                body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body) if length is None else length))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _dispatch(self, method: str) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            body = self._body()
            auth = self.headers.get("Authorization", "")
            rec = Request(method, path, query, body_size=len(body), authorized=auth.startswith("Bearer "))
            with hub.lock:
                hub.requests.append(rec)
            failure = hub._injected(method, path)
            if failure is not None:
                rec.status = failure.status
                self._send(failure.status, {"error": f"injected failure {failure.status}"}, failure.headers)
                return
            for m, rx, name in _ROUTES:
                match = rx.match(path)
                if m == method and match:
                    args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    try:
                        status, payload, headers = getattr(self, f"_{name}")(rec, body, query, **args)
                    except HubError as exc:
                        rec.status = exc.status
                        extra = {"X-Error-Code": exc.code} if exc.code else {}
                        self._send(exc.status, {"error": exc.message}, {"X-Error-Message": exc.message, **extra})
                        return
                    rec.status = status
                    if isinstance(payload, StoredFile):
                        self._send(status, payload.data, headers, "application/octet-stream")
                    else:
                        ctype = (headers or {}).pop("Content-Type", "application/json")
                        self._send(status, payload, headers, ctype)
                    return
            rec.status = 404
            self._send(404, {"error": f"fake hub: no route for {method} {path}"})

        # -- auth and lookup -------------------------------------------------------------------------------------
        def _user(self, required: bool = True) -> tuple[str, str] | None:
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                if required:
                    raise HubError(401, "Invalid credentials in Authorization header")
                return None
            who = hub.tokens.get(auth[len("Bearer "):])
            if who is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return who

        def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
            who = self._user(required=write)
            repo = hub.repos.get(repo_id)
            owner = repo_id.split("/")[0]
            if repo is None or (repo.private and (who is None or who[0] != owner)):
                raise HubError(404, "Repository not found", "RepoNotFound")
            if write and (who is None or who[0] != owner or who[1] != "write"):
                raise HubError(403, "You don't have the rights to write to this repository")
            return repo

        @staticmethod
        def _branch(repo: Repo, rev: str) -> dict[str, StoredFile]:
            if rev in repo.branches:
                return repo.branches[rev]
            for name, head in repo.heads.items():
                if head == rev:
                    return repo.branches[name]
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

        # -- endpoints ---------------------------------------------------------------------------------------------
        def _whoami(self, rec: Request, body: bytes, query: Any) -> tuple[int, Any, dict[str, str]]:
            user, role = self._user()  # type: ignore[misc]
            return 200, {"type": "user", "id": hashlib.md5(user.encode()).hexdigest()[:24], "name": user,
                         "fullname": user.title(), "email": f"{user}@example.com", "orgs": [],
                         "auth": {"type": "access_token", "accessToken": {
                             "displayName": "quantkit tests", "role": role,
                             "createdAt": "2026-01-01T00:00:00.000Z"}}}, {}

        def _harnesses(self, rec: Request, body: bytes, query: Any) -> tuple[int, Any, dict[str, str]]:
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}

        def _create_repo(self, rec: Request, body: bytes, query: Any) -> tuple[int, Any, dict[str, str]]:
            user, role = self._user()  # type: ignore[misc]
            data = json.loads(body or b"{}")
            namespace = data.get("organization") or user
            repo_id = f"{namespace}/{data['name']}"
            if data.get("type") not in (None, "model"):
                raise HubError(400, "the fake hub only hosts models")
            if role != "write" or namespace != user:
                raise HubError(403, "You don't have the rights to create a model under this namespace")
            with hub.lock:
                if repo_id in hub.repos:
                    return 409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}, {}
                private = data.get("visibility") == "private" or bool(data.get("private"))
                repo = Repo(repo_id, private)
                repo.branches["main"] = {".gitattributes": StoredFile(GITATTRIBUTES, lfs=False)}
                repo.heads["main"] = hub._next_oid(repo_id, "main")
                hub.repos[repo_id] = repo
            return 200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo.heads["main"][:24]}, {}

        def _validate_yaml(self, rec: Request, body: bytes, query: Any) -> tuple[int, Any, dict[str, str]]:
            content = json.loads(body).get("content", "")
            m = re.match(r"\A---\r?\n(.*?)\r?\n---\r?\n", content, re.S)
            errors = []
            try:
                meta = yaml.safe_load(m.group(1)) if m else {}
            except yaml.YAMLError as exc:
                meta, errors = None, [f"YAML: {exc}"]
            if meta is not None and not isinstance(meta, dict):
                errors.append("metadata must be a mapping")
            elif isinstance(meta, dict):
                for key in ("license", "library_name", "pipeline_tag", "base_model_relation"):
                    if key in meta and not isinstance(meta[key], str):
                        errors.append(f'"{key}" must be a string')
                for key in ("tags", "language", "base_model"):
                    value = meta.get(key)
                    if value is not None and not (isinstance(value, str) or (
                            isinstance(value, list) and all(isinstance(v, str) for v in value))):
                        errors.append(f'"{key}" must be a string or a list of strings')
            if errors:
                return 400, {"errors": [{"message": e} for e in errors], "warnings": []}, {}
            return 200, {"errors": [], "warnings": []}, {}

        def _preupload(self, rec: Request, body: bytes, query: Any, repo: str, rev: str
                       ) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo, write=True)
            with hub.lock:
                files = self._branch(r, rev)
                out = []
                for f in json.loads(body)["files"]:
                    sample = base64.b64decode(f.get("sample", ""))
                    lfs = (f["path"].endswith(LFS_SUFFIXES) or f["size"] > REGULAR_MAX or b"\x00" in sample)
                    old = files.get(f["path"])
                    oid = None if old is None else (old.sha256 if old.lfs else old.oid)
                    out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                                "oid": oid})
            return 200, {"files": out, "commitOid": r.heads.get(rev)}, {}

        def _lfs_batch(self, rec: Request, body: bytes, query: Any, repo: str) -> tuple[int, Any, dict[str, str]]:
            repo = repo.removesuffix(".git")
            r = self._repo(repo, write=True)
            data = json.loads(body)
            objects = []
            with hub.lock:
                for obj in data.get("objects", []):
                    entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                    if obj["oid"] not in r.lfs:
                        entry["actions"] = {"upload": {"href": f"{hub.url}/__lfs/{repo}/{obj['oid']}", "header": {}}}
                    objects.append(entry)
            rec.detail = [o["oid"] for o in objects if "actions" in o]
            return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}, {
                "Content-Type": "application/vnd.git-lfs+json"}

        def _lfs_put(self, rec: Request, body: bytes, query: Any, repo: str, oid: str
                     ) -> tuple[int, Any, dict[str, str]]:
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, "the uploaded content does not match its oid")
            with hub.lock:
                hub.repos[repo].lfs[oid] = body
            rec.detail = oid
            return 200, {}, {"ETag": f'"{oid[:32]}"'}

        def _commit(self, rec: Request, body: bytes, query: Any, repo: str, rev: str
                    ) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo, write=True)
            if "create_pr" in query:
                raise HubError(400, "the fake hub does not do pull requests")
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                raise HubError(400, "the commit payload must start with a header")
            with hub.lock:
                files = dict(self._branch(r, rev))
                paths = []
                for line in lines[1:]:
                    key, value = line["key"], line["value"]
                    if key == "file":
                        files[value["path"]] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                    elif key == "lfsFile":
                        data = r.lfs.get(value["oid"])
                        if data is None:
                            raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                        files[value["path"]] = StoredFile(data, lfs=True)
                    elif key == "deletedFile":
                        if files.pop(value["path"], None) is None:
                            raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    else:
                        raise HubError(400, f"the fake hub does not support {key}")
                    paths.append(value["path"])
                oid = hub._next_oid(repo, rev, *paths)
                r.branches[rev] = files
                r.heads[rev] = oid
                r.commits.append({"oid": oid, "branch": rev, "summary": lines[0]["value"].get("summary"),
                                  "paths": paths})
            rec.detail = paths
            return 200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True,
                         "hookOutput": "", "pullRequestUrl": None}, {}

        def _branch_create(self, rec: Request, body: bytes, query: Any, repo: str, rev: str
                           ) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo, write=True)
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            with hub.lock:
                if rev in r.branches:
                    raise HubError(409, "Reference already exists")
                r.branches[rev] = dict(self._branch(r, start))
                r.heads[rev] = r.heads.get(start) or hub._next_oid(repo, rev)
            return 200, {}, {}

        def _tree(self, rec: Request, body: bytes, query: Any, repo: str, rev: str, path: str = ""
                  ) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo)
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            prefix = f"{path.strip('/')}/" if path.strip("/") else ""
            with hub.lock:
                files = self._branch(r, rev)
                if prefix and not any(p.startswith(prefix) for p in files):
                    raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
                out: list[dict[str, Any]] = []
                dirs: set[str] = set()
                for p in sorted(files):
                    if not p.startswith(prefix):
                        continue
                    rest = p[len(prefix):].split("/")
                    for i in range(1, len(rest)):
                        d = prefix + "/".join(rest[:i])
                        if (recursive or i == 1) and d not in dirs:
                            dirs.add(d)
                            out.append({"type": "directory", "oid": git_oid(d.encode()), "size": 0, "path": d})
                    if len(rest) > 1 and not recursive:
                        continue
                    f = files[p]
                    entry: dict[str, Any] = {"type": "file", "oid": f.oid, "size": len(f.data), "path": p}
                    if f.lfs:
                        entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
                    out.append(entry)
            return 200, out, {}

        def _refs(self, rec: Request, body: bytes, query: Any, repo: str) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo)
            with hub.lock:
                branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": r.heads[b]} for b in r.branches]
            return 200, {"branches": branches, "converts": [], "tags": []}, {}

        def _info(self, rec: Request, body: bytes, query: Any, repo: str, rev: str = "main"
                  ) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo)
            with hub.lock:
                files = self._branch(r, rev)
                siblings = []
                for p, f in sorted(files.items()):
                    s: dict[str, Any] = {"rfilename": p, "size": len(f.data), "blobId": f.oid}
                    if f.lfs:
                        s["lfs"] = {"size": len(f.data), "sha256": f.sha256, "pointerSize": len(f.pointer)}
                    siblings.append(s)
                head = r.heads.get(rev, rev)
            return 200, {"id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": head,
                         "private": r.private, "disabled": False, "gated": False, "tags": [],
                         "siblings": siblings}, {}

        def _resolve(self, rec: Request, body: bytes, query: Any, repo: str, rev: str, path: str
                     ) -> tuple[int, Any, dict[str, str]]:
            r = self._repo(repo)
            with hub.lock:
                files = self._branch(r, rev)
                f = files.get(path)
                head = r.heads.get(rev, rev)
            if f is None:
                raise HubError(404, "Entry not found", "EntryNotFound")
            etag = f.sha256 if f.lfs else f.oid
            headers = {"X-Repo-Commit": head, "ETag": f'"{etag}"', "Accept-Ranges": "none"}
            if f.lfs:
                headers |= {"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(f.data))}
            return 200, f, headers

    return Handler
