"""Bad inputs and faults a user can hit, each tried as a real `quantkit` command, and how quantkit answers them.

Every case runs `quantkit ...` in a fresh child process (in its own folder under a temp directory) and is judged
on three checks:

- ``one_line``: stderr, less progress bars and ``warning:`` lines, is one ``error:`` line (an interrupt's one
  ``interrupted: ...`` / ``stopped by ...`` line), possibly followed by one hint line; never a ``Traceback``, and not
  ``error: unexpected failure: ...`` (quantkit's line for an exception nothing turned into a message, which it asks
  the user to report: a bug). For a case that should succeed: no ``error:`` line and no traceback.
- ``nonzero``: the exit code is not 0 (for a case that should succeed, marked "0 wanted": it is 0; "either": a clean
  refusal or success are both fine). A case that runs past its time limit fails this check.
- ``clean``: nothing that looks finished is left behind: every file the command wrote under the case's folders has
  a temporary name (``.staging``, ``*.partial``, ``.tmp``) or is recorded as a finished step's output in the
  workspace's ``manifest.json`` (the manifest itself, model cards ``README.md``, ``*.log`` files and the evaluation's
  fingerprint-named reference caches ``eval/reference-<fp>.npz`` are not artifacts and are not counted); every step
  record the command added or changed names outputs that exist with the recorded size and sha256; a ``--dry-run``
  writes nothing; a Hub token never appears in stdout, stderr or a written file, and a refused push leaves the Hub
  untouched.

Some cases also say what their error line should name (the full disk's folder, the missing file): a line that
passes the three checks but misses it is listed apart, under the table.

Categories: path, checkpoint, options, recipe, hub/publish (a fake Hub from ``tests/hub_server.py`` on 127.0.0.1),
cluster (Ray), interrupt (SIGINT / SIGTERM / SIGKILL, then a rerun), disk (a tiny tmpfs; needs root's mount rights,
otherwise those cases are marked "not tried").

Inputs are the tests' tiny checkpoints (``/work/scratch/testck``, or ``--checkpoints DIR``), copied before anything is
corrupted. Each case gets ``NO_COLOR=1 COLUMNS=200 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_XET=1``, an empty ``HF_HOME`` and
no ``HF_TOKEN`` unless the case sets them.

Run (about 15 minutes on 2 cores):

    .venv/bin/python benchmarks/bad_inputs.py                      # every case; a markdown table on stdout
    .venv/bin/python benchmarks/bad_inputs.py --json rows.json     # also every row, with full commands and stderr
    .venv/bin/python benchmarks/bad_inputs.py --only hub --keep    # a category or an id substring; keep the files

The exit status is 0 when every case passes all three checks, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = Path("/work/scratch/testck")
BASE = "tiny-llama3"
_EXE = Path(sys.executable).parent / "quantkit"
QK = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "quantkit"]
TIMEOUT = 180.0
DROP_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QUANTKIT_DEBUG", "RAY_ADDRESS", "HF_ENDPOINT", "HF_HOME",
            "QUANTKIT_THREADS")
TEMP = re.compile(r"^\.staging$|\.partial|\.tmp|\.write-test|^\.quantkit\.lock$")
META = {"manifest.json", "source-README.md", "README.md"}  # the workspace's own records; model cards
# caches named by their content's fingerprint, which quantkit documents as written atomically (a whole file or none)
CACHE = re.compile(r"^(drift-)?reference-[0-9a-f]+\.(npz|json)$")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"[━╸╺█▏▎▍▌▋▊▉]|\d+%\||\d(it/s|s/it)\]")  # rich bars, tqdm bars
GIB = 1 << 30

Hook = Callable[[], None]


# -- cases and rows -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One thing a user can type or hit: `args` after ``quantkit``, run in `cwd` after `setup`."""

    id: str
    category: str
    args: list[str]
    what: str = ""  # the setup in words, for the reproduction
    expect: str = "fail"  # fail | ok | either
    setup: Hook | None = None
    env: dict[str, str] = field(default_factory=dict)
    roots: list[Path] = field(default_factory=list)  # more folders to check (beside cwd)
    secret: str | None = None  # a token that must never be shown or written
    hub: Any = None  # a FakeHub that a refused push must leave untouched
    signals: list[tuple[int, float, bool]] = field(default_factory=list)  # (signal, after seconds, whole group)
    rerun: list[str] | None = None  # run this after the first command; it must succeed
    between: Hook | None = None  # before the rerun
    during: Callable[[subprocess.Popen[bytes]], None] | None = None
    settle: Hook | None = None  # after the command, before the checks (another process of the case finishes)
    teardown: Hook | None = None
    timeout: float = TIMEOUT
    limit: float | None = None  # it must end within this many seconds
    says: str | None = None  # a regex the error line should match (reported apart from the three checks)
    skip: str | None = None
    cwd: Path = Path(".")


@dataclass
class Row:
    id: str
    category: str
    command: str
    rc: str
    first: str
    one_line: bool | None
    nonzero: bool | None
    clean: bool | None
    expect: str
    seconds: float
    problems: list[str]
    argv: list[str]
    env: dict[str, str]
    what: str
    cwd: str
    stderr: str
    stdout_tail: str
    message_note: str = ""  # the error line misses what `says` wants

    @property
    def passed(self) -> bool:
        return bool(self.one_line and self.nonzero and self.clean)


@dataclass
class Ran:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    leftover: bool  # processes of its group outlived it


# -- safetensors and checkpoint surgery ---------------------------------------------------------------------------
Tensors = dict[str, tuple[str, list[int], bytes]]


def st_read(path: Path) -> tuple[Tensors, dict[str, Any]]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    return {k: (v["dtype"], list(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items()}, meta


def st_write(path: Path, tensors: Tensors, meta: dict[str, Any]) -> None:
    header: dict[str, Any] = {"__metadata__": meta}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"".join(d for _, _, d in tensors.values()))


def st_edit(folder: Path, edit: Callable[[Tensors], None]) -> None:
    tensors, meta = st_read(folder / "model.safetensors")
    edit(tensors)
    st_write(folder / "model.safetensors", tensors, meta)


def recast(dtype: str) -> Callable[[Tensors], None]:
    """bf16 tensors → `dtype` (F16 or F32), values kept."""
    import numpy as np

    def edit(t: Tensors) -> None:
        for name, (_dt, shape, data) in list(t.items()):
            f32 = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
            out = f32.astype(np.float16) if dtype == "F16" else f32
            t[name] = (dtype, shape, out.tobytes())
    return edit


def with_nan(t: Tensors) -> None:
    import numpy as np

    name = "model.layers.0.mlp.down_proj.weight"
    dt, shape, data = t[name]
    arr = np.frombuffer(data, np.uint16).copy()
    arr[::7] = 0x7FC0  # bf16 NaN
    t[name] = (dt, shape, arr.tobytes())


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """`edit` changes the parsed JSON in place (what it returns is ignored)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# -- what the command left behind ---------------------------------------------------------------------------------
def walk_files(roots: list[Path]) -> dict[Path, tuple[int, int]]:
    out: dict[Path, tuple[int, int]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                p = Path(dirpath) / name
                with contextlib.suppress(OSError):
                    st = p.lstat()
                    out[p] = (st.st_size, st.st_mtime_ns)
    return out


def manifests(roots: list[Path]) -> dict[Path, Any]:
    """Workspace folder → its manifest (None when unreadable)."""
    out: dict[Path, Any] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, _, filenames in os.walk(root):
            if "manifest.json" in filenames:
                try:
                    out[Path(dirpath)] = json.loads((Path(dirpath) / "manifest.json").read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    out[Path(dirpath)] = None
    return out


def is_temp(path: Path, root: Path) -> bool:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts = path.parts
    return any(TEMP.search(p) for p in parts)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recorded(data: dict[str, Any]) -> set[str]:
    """Workspace-relative paths the manifest names as finished (step outputs and artifact files)."""
    out: set[str] = set()
    for rec in (data.get("steps") or {}).values():
        out.update(str(o).rstrip("/") for o in rec.get("outputs", []))
    for key, art in (data.get("artifacts") or {}).items():
        out.add(key.rstrip("/"))
        out.update(str(f).rstrip("/") for f in art.get("files", []))
    return out


def clean_problems(roots: list[Path], before: dict[Path, tuple[int, int]], before_m: dict[Path, Any],
                   *, failed: bool, dry_run: bool) -> list[str]:
    """What the command left that looks finished but is not recorded, or is recorded but not intact."""
    problems: list[str] = []
    after = walk_files(roots)
    after_m = manifests(roots)
    for ws, data in after_m.items():
        if data is None:
            if before_m.get(ws, "absent") is not None:
                problems.append(f"{ws.name}/manifest.json is unreadable after the run")
            continue
        old = (before_m.get(ws) or {}).get("steps") or {}
        for key, rec in (data.get("steps") or {}).items():
            if old.get(key) == rec:
                continue
            checks = rec.get("checks") or {}
            for rel in rec.get("outputs", []):
                path = ws / rel
                want = checks.get(rel) or {}
                if not path.exists():
                    problems.append(f"step {key} recorded done but {rel} is missing")
                elif path.is_file() and want.get("size") is not None and path.stat().st_size != want["size"]:
                    problems.append(f"step {key} recorded done but {rel} has another size")
                elif path.is_file() and want.get("sha256") and sha256(path) != want["sha256"]:
                    problems.append(f"step {key} recorded done but {rel} has another sha256")
    for path, stat in sorted(after.items()):
        if before.get(path) == stat:
            continue
        owner = max((ws for ws in after_m if ws in path.parents), key=lambda w: len(w.parts), default=None)
        root = owner or next((r for r in roots if r in path.parents), path.parent)
        if is_temp(path, root) or path.name in META or CACHE.match(path.name) or path.suffix == ".log":
            continue
        if dry_run:
            problems.append(f"--dry-run wrote {path.relative_to(root)}")
            continue
        if not failed:
            continue
        if owner is not None and after_m.get(owner):
            rel = path.relative_to(owner).as_posix()
            names = recorded(after_m[owner])
            if rel in names or any(rel.startswith(n + "/") for n in names):
                continue
            problems.append(f"{rel} has a final name but no finished step records it")
        else:
            problems.append(f"{path.relative_to(root)} left behind with a final name (no manifest records it)")
    return problems


def one_line_check(stderr: str, *, rc: int | None, interrupted: bool) -> tuple[bool, str]:
    lines = [ln.rstrip() for ln in ANSI.sub("", stderr).splitlines() if ln.strip() and not PROGRESS.search(ln)]
    if any("Traceback" in ln for ln in lines):
        return False, "a Traceback on stderr"
    body = [ln for ln in lines if not ln.startswith("warning:")]
    if rc == 0:
        bad = [ln for ln in body if ln.startswith("error:") or ln.startswith("Exception")]
        return (not bad), (f"exit 0 but stderr says: {bad[0][:120]}" if bad else "")
    if not body:
        return False, "no message on stderr"
    head = body[0]
    if not (head.startswith("error:") or (interrupted and head.startswith(("interrupted", "stopped by")))):
        return False, f"first line is not an error line: {head[:120]}"
    if "unexpected failure:" in head:  # handle_errors' line for an exception nobody turned into a message: a bug
        return False, "an 'unexpected failure' (an uncaught exception, which quantkit asks to report)"
    if len(body) > 2:
        return False, f"{len(body)} lines of messages, not one (+ hint)"
    if len(body) == 2 and body[1].startswith(("error:", "Exception", "  File")):
        return False, f"a second error line: {body[1][:120]}"
    return True, ""


def first_line(stderr: str) -> str:
    for ln in ANSI.sub("", stderr).splitlines():
        if ln.strip() and not PROGRESS.search(ln):
            ln = ln.strip()
            return ln if len(ln) <= 110 else ln[:107] + "..."
    return ""


# -- running ----------------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.home = tmp / "hf-home"
        self.home.mkdir(parents=True, exist_ok=True)

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
        env |= {"NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_XET": "1",
                "HF_HOME": str(self.home), "PYTHONDONTWRITEBYTECODE": "1"}
        env |= extra
        return {k: v for k, v in env.items() if v is not None}

    def spawn(self, args: list[str], cwd: Path, env: dict[str, str], *, timeout: float,
              signals: list[tuple[int, float, bool]] | None = None,
              during: Callable[[subprocess.Popen[bytes]], None] | None = None) -> Ran:
        t0 = time.monotonic()
        proc = subprocess.Popen([*QK, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        timers = []
        for sig, after, group in signals or []:
            def send(sig: int = sig, group: bool = group) -> None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if group:
                        os.killpg(proc.pid, sig)  # Ctrl-C in a terminal: the whole foreground group
                    else:
                        os.kill(proc.pid, sig)  # `kill PID`
            timer = threading.Timer(after, send)
            timer.start()
            timers.append(timer)
        if during is not None:
            threading.Thread(target=during, args=(proc,), daemon=True).start()
        try:
            out, err = proc.communicate(timeout=timeout)
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            rc = None
        for timer in timers:
            timer.cancel()
        seconds = time.monotonic() - t0
        leftover = False
        for _ in range(20):  # a worker of a killed run must die with it (its parent-death signal)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            leftover = True
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if leftover:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 0)
                os.killpg(proc.pid, signal.SIGKILL)
        return Ran(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), seconds, leftover)

    def shown(self, text: str) -> str:
        return text.replace(str(self.tmp), "$T")

    def command(self, case: Case) -> str:
        """The command as the table shows it: paths in the case's folder (its working directory) relative."""
        here = str(case.cwd) + "/"
        args = [a.replace(here, "") if a.startswith(here) else a for a in case.args]
        text = self.shown(" ".join(["quantkit", *(shlex.quote(a) for a in args)]))
        envs = []
        for k, v in case.env.items():
            if k in ("HF_HUB_DISABLE_XET", "HF_HUB_OFFLINE") and v in ("0", "1"):
                if not (k == "HF_HUB_OFFLINE" and v == "1"):  # offline is every case's default: only shown if set
                    continue
            if k == "HF_ENDPOINT" and re.fullmatch(r"http://127\.0\.0\.1:\d{3,}", v):
                v = "<fake hub>"
            elif k == "HF_TOKEN":
                v = v if len(v) <= 14 else v[:11] + "…"
            envs.append(f"{k}={sh_quote(self.shown(v))}")
        for sig, after, _ in case.signals:
            text += f" (then {signal.Signals(sig).name} at {after:g}s)"
        if case.rerun is not None:
            text += "; rerun"
        text = " ".join([*envs, text])
        return text if len(text) <= 100 else text[:97] + "..."

    def _base(self, case: Case) -> dict[str, Any]:
        return dict(id=case.id, category=case.category, command=self.command(case), expect=case.expect,
                    argv=["quantkit", *[self.shown(a) for a in case.args]],
                    env={k: self.shown(v) for k, v in case.env.items()}, what=case.what, cwd=self.shown(str(case.cwd)))

    def run(self, case: Case) -> Row:
        case.cwd.mkdir(parents=True, exist_ok=True)
        base = self._base(case)
        if case.skip:
            return Row(**base, rc="", first=f"not tried: {case.skip}", one_line=None, nonzero=None, clean=None,
                       seconds=0.0, problems=[f"not tried: {case.skip}"], stderr="", stdout_tail="")
        try:
            if case.setup is not None:
                case.setup()
        except Exception as exc:  # noqa: BLE001 - a broken setup is reported as the case's result
            self._teardown(case)
            return Row(**base, rc="", first=f"not tried: setup failed: {exc}"[:110], one_line=None, nonzero=None,
                       clean=None, seconds=0.0, problems=[f"setup failed: {type(exc).__name__}: {exc}"], stderr="",
                       stdout_tail="")
        roots = [case.cwd, *case.roots]
        try:
            return self._run(case, roots, self._base(case))  # the setup may have filled in the environment
        finally:
            self._teardown(case)

    @staticmethod
    def _teardown(case: Case) -> None:
        if case.teardown is not None:
            with contextlib.suppress(Exception):
                case.teardown()

    def _run(self, case: Case, roots: list[Path], base: dict[str, Any]) -> Row:
        env = self.env(case.env)
        before, before_m = walk_files(roots), manifests(roots)
        hub_before = _hub_state(case.hub)
        dry = "--dry-run" in case.args
        first = self.spawn(case.args, case.cwd, env, timeout=case.timeout, signals=case.signals, during=case.during)
        if case.settle is not None:
            case.settle()
        problems: list[str] = []
        interrupted = bool(case.signals)
        if first.rc is None:
            problems.append(f"timed out after {case.timeout:g}s")
        if first.leftover:
            problems.append("processes of the run outlived it")
        clean = clean_problems(roots, before, before_m, failed=first.rc != 0, dry_run=dry)
        shown_rc = "timeout" if first.rc is None else str(first.rc)
        measured = first
        if case.rerun is not None:
            if case.between is not None:
                case.between()
            mid, mid_m = walk_files(roots), manifests(roots)
            second = self.spawn(case.rerun, case.cwd, env, timeout=case.timeout)
            clean += [f"after the rerun: {p}" for p in
                      clean_problems(roots, mid, mid_m, failed=second.rc != 0, dry_run=False)]
            shown_rc = f"{shown_rc} → {'timeout' if second.rc is None else second.rc}"
            measured, interrupted = second, False
            if second.rc is None:
                problems.append(f"the rerun timed out after {case.timeout:g}s")
        if case.secret:
            if any(case.secret in t for t in (first.stdout, first.stderr, measured.stdout, measured.stderr)):
                clean.append("the token appears in the output")
            for path in walk_files(roots):
                with contextlib.suppress(OSError):
                    if case.secret.encode() in path.read_bytes():
                        clean.append(f"the token is written in {path.name}")
        if case.hub is not None and _hub_state(case.hub) != hub_before:
            clean.append("the refused push changed the Hub: " + ", ".join(sorted(
                set(_hub_state(case.hub)) - set(hub_before)))[:120])
        ok_line, why_line = one_line_check(measured.stderr, rc=measured.rc, interrupted=interrupted)
        if case.rerun is not None and first.rc != 0:  # the killed run's own words count too
            lines = [ln for ln in ANSI.sub("", first.stderr).splitlines() if ln.strip()]
            if any("Traceback" in ln for ln in lines):
                ok_line, why_line = False, "the interrupted run printed a Traceback"
        if measured.rc is None:
            nonzero = False
        elif case.expect == "ok":
            nonzero = measured.rc == 0
        elif case.expect == "either":
            nonzero = True
        else:
            nonzero = measured.rc != 0
        if case.limit is not None and first.seconds > case.limit:
            nonzero = False
            problems.append(f"took {first.seconds:.0f}s (limit {case.limit:g}s)")
        if not nonzero and measured.rc is not None and not problems:
            problems.append(f"exit {measured.rc}, wanted " + ("0" if case.expect == "ok" else "non-zero"))
        if not ok_line:
            problems.append(why_line)
        problems += clean
        stderr = self.shown(measured.stderr)
        if case.rerun is not None:
            stderr = self.shown(first.stderr)[-3000:] + "\n--- rerun ---\n" + stderr
        shown_first = first_line(self.shown(first.stderr)) or first_line(self.shown(measured.stderr))
        note = ""
        if case.says:
            said = " ".join(ln for ln in ANSI.sub("", first.stderr).splitlines() if ln.startswith("error:"))
            if not re.search(case.says, said):
                note = f"the error line does not match /{case.says}/"
        return Row(**base, rc=shown_rc, first=shown_first, message_note=note,
                   one_line=ok_line, nonzero=nonzero, clean=not clean, seconds=round(first.seconds, 1),
                   problems=problems, stderr=stderr[-6000:], stdout_tail=self.shown(measured.stdout)[-1500:])


def _hub_state(hub: Any) -> dict[str, int]:
    if hub is None:
        return {}
    with hub.lock:
        return {f"{rid}@{b}:{p}": len(f.data) for rid, repo in hub.repos.items()
                for b, files in repo.branches.items() for p, f in files.items()}


# -- mounts (disk and read-only cases) ------------------------------------------------------------------------------
class Mounts:
    """tmpfs mounts under the temp folder; `why_not` says why there are none."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.mounted: list[Path] = []
        self.why_not = self._probe()

    def _probe(self) -> str | None:
        if os.geteuid() != 0:
            return "not root: cannot mount a small tmpfs"
        if shutil.which("mount") is None:
            return "no mount command"
        probe = self.tmp / "mount-probe"
        probe.mkdir(exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            return f"mount -t tmpfs refused: {done.stderr.strip()[:80]}"
        subprocess.run(["umount", str(probe)], capture_output=True)
        return None

    def mount(self, where: Path, options: str) -> None:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True, capture_output=True)
        self.mounted.append(where)

    def remount(self, where: Path, options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)

    def umount(self, where: Path) -> None:
        if where in self.mounted:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
            self.mounted.remove(where)

    def close(self) -> None:
        for where in list(reversed(self.mounted)):
            self.umount(where)


# -- the cases --------------------------------------------------------------------------------------------------------
class Cases:
    """Builds every case; `self.fx` holds the shared inputs (a good checkpoint, two finished workspaces)."""

    def __init__(self, tmp: Path, checkpoints: Path, runner: Runner, mounts: Mounts) -> None:
        self.tmp = tmp
        self.src = checkpoints
        self.runner = runner
        self.mounts = mounts
        self.fx = tmp / "fx"
        self.good = self.fx / "m"  # tiny-llama3, named m
        self.good_ws = self.fx / "good-ws"
        self.noverify_ws = self.fx / "noverify-ws"
        self.prep_problems: list[str] = []
        self.hub: Any = None
        self.tokens: dict[str, str] = {}

    # -- shared inputs
    def prepare(self) -> None:
        self.fx.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.src / BASE, self.good)
        for ws, extra in ((self.good_ws, []), (self.noverify_ws, ["--no-verify"])):
            ran = self.runner.spawn(["gguf", str(self.good), "--q4_k_m", "-w", str(ws), *extra], self.fx,
                                    self.runner.env({}), timeout=300)
            if ran.rc != 0:
                self.prep_problems.append(f"preparing {ws.name} failed (exit {ran.rc}): {first_line(ran.stderr)}")
        try:
            sys.path.insert(0, str(ROOT / "tests"))
            from hub_server import READ_TOKEN, USER, WRITE_TOKEN, FakeHub

            secret = "hf_badInputsSecretToken9f8e7d6c5b4a3210"
            self.tokens = {"write": WRITE_TOKEN, "read": READ_TOKEN, "secret": secret, "user": USER}
            self.hub = FakeHub(tokens={WRITE_TOKEN: (USER, "write"), READ_TOKEN: (USER, "read"),
                                       secret: (USER, "write")}).start()
        except Exception as exc:  # noqa: BLE001 - no fake Hub: its cases are marked not tried
            self.prep_problems.append(f"no fake Hub: {exc}")

    def close(self) -> None:
        if self.hub is not None:
            with contextlib.suppress(Exception):
                self.hub.stop()

    # -- helpers
    def d(self, cid: str) -> Path:
        return self.tmp / "cases" / cid

    def ck(self, dest: Path, name: str = BASE) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.src / name, dest)
        return dest

    def ws_copy(self, dest: Path, ws: Path | None = None) -> Path:
        shutil.copytree(ws or self.good_ws, dest, ignore=shutil.ignore_patterns(".quantkit.lock"))
        return dest

    def case(self, cid: str, category: str, args: list[str], **kw: Any) -> Case:
        return Case(cid, category, args, cwd=self.d(cid), **kw)

    def all(self) -> list[Case]:
        return [*self.paths(), *self.checkpoints(), *self.options(), *self.recipes(), *self.hubs(), *self.cluster(),
                *self.interrupts(), *self.disk()]

    # -- path --------------------------------------------------------------------------------------------------------
    def paths(self) -> list[Case]:
        cat, g = "path", str(self.good)
        out: list[Case] = []

        def add(cid: str, args: list[str], **kw: Any) -> Case:
            c = self.case(cid, cat, args, **kw)
            out.append(c)
            return c

        add("p-alias-unknown", ["gguf", "nosuchmodel", "--q4_k_m"], what="a name that is no alias")
        add("p-alias-typo", ["gguf", "T-lite-0.2", "--dry-run"], what="a misspelt alias (T-lite-0.1 exists)")
        add("p-hub-missing-offline", ["gguf", "someorg/does-not-exist-7f3a", "--q4_k_m"],
            what="a Hub id that does not exist, HF_HUB_OFFLINE=1")
        add("p-hub-missing-offline-dry", ["gguf", "someorg/does-not-exist-7f3a", "--dry-run"], expect="either",
            what="same, --dry-run (offline nothing can tell a missing repo from one not yet downloaded: a plan "
                 "that says 'not in the local Hub cache' is fine)")
        add("p-alias-offline-uncached", ["gguf", "T-lite-it-1.0", "--q4_k_m"],
            what="a known alias, offline and not in the (empty) HF cache")
        add("p-hub-id-bad", ["gguf", "org/name/extra/more", "--dry-run"], what="a Hub-id-like string with 3 slashes")
        d = self.d("p-no-config")
        add("p-no-config", ["gguf", str(d / "in" / "m"), "--q4_k_m"], what="a checkpoint folder without config.json",
            setup=lambda d=d: (self.ck(d / "in" / "m"), (d / "in" / "m" / "config.json").unlink()) and None)
        d = self.d("p-empty-folder")
        add("p-empty-folder", ["gguf", str(d / "in" / "empty"), "--dry-run"], what="an empty folder",
            setup=lambda d=d: (d / "in" / "empty").mkdir(parents=True))
        add("p-file-not-folder", ["gguf", str(self.good / "config.json"), "--dry-run"],
            what="a file (config.json) instead of the folder")
        add("p-local-missing", ["gguf", "./models/nope", "--dry-run"], what="a local path that does not exist")
        d = self.d("p-ws-is-file")
        add("p-ws-is-file", ["gguf", g, "--q4_k_m", "-w", str(d / "ws.txt")], what="--workspace names a file",
            setup=lambda d=d: (d / "ws.txt").write_text("not a folder\n"))
        d = self.d("p-ws-under-file")
        add("p-ws-under-file", ["gguf", g, "--q4_k_m", "-w", str(d / "ws.txt" / "sub")],
            what="--workspace under a file", setup=lambda d=d: (d / "ws.txt").write_text("not a folder\n"))
        d = self.d("p-ws-read-only")
        if self.mounts.why_not is None:
            add("p-ws-read-only", ["gguf", g, "--q4_k_m", "-w", str(d / "ro" / "ws")],
                what="--workspace on a read-only mount (tmpfs -o ro: root ignores chmod)",
                setup=lambda d=d: self.mounts.mount(d / "ro", "ro,size=1m"),
                teardown=lambda d=d: self.mounts.umount(d / "ro"))
        else:
            def ro(d: Path = d) -> None:
                (d / "ro").mkdir(parents=True)
                (d / "ro").chmod(0o555)
            add("p-ws-read-only", ["gguf", g, "--q4_k_m", "-w", str(d / "ro" / "ws")],
                what="--workspace in a chmod 555 folder", setup=ro,
                teardown=lambda d=d: (d / "ro").chmod(0o755))
        add("p-ws-proc", ["gguf", g, "--q4_k_m", "-w", "/proc/quantkit-bad-inputs"], what="--workspace under /proc")
        add("p-ws-sys", ["gguf", g, "--q4_k_m", "-w", "/sys/quantkit-bad-inputs"], what="--workspace under /sys")
        add("p-ws-dev-null", ["gguf", g, "--q4_k_m", "-w", "/dev/null"], what="--workspace /dev/null")
        add("p-ws-empty-string", ["gguf", g, "--dry-run", "-w", ""], expect="either",
            what='-w "" (an unset shell variable); a dry run')
        for cid, parts in (("p-brackets", ["models[1]", "m"]), ("p-brackets-slash", ["m[", "x]", "m"]),
                           ("p-cyrillic-spaces", ["Модели", "тестовая модель"]),
                           ("p-brackets-cyrillic", ["[v2] Модель", "m [q]"])):
            d = self.d(cid)
            target = d.joinpath("in", *parts)
            add(cid, ["gguf", str(target), "--q4_k_m", "--dry-run", "-w", str(d / "ws [1]" / "Папка")], expect="ok",
                what=f"a good checkpoint at in/{'/'.join(parts)}, workspace 'ws [1]/Папка'",
                setup=lambda t=target: self.ck(t) and None)
        d = self.d("p-weird-gguf-real")
        target = d / "in" / "Модели [тест]" / "m x"
        add("p-weird-gguf-real", ["gguf", str(target), "--q4_k_m", "-w", str(d / "ws [1]" / "Рабочая папка")],
            expect="ok", what="a real GGUF run, checkpoint and workspace paths with Cyrillic, spaces and []",
            setup=lambda t=target: self.ck(t) and None)
        d = self.d("p-weird-fp8-real")
        target = d / "in" / "m[" / "x]" / "Модель"
        add("p-weird-fp8-real", ["fp8", str(target), "-w", str(d / "ws [/x]" / "р")], expect="ok",
            what="a real FP8 run at paths with [, ], Cyrillic", setup=lambda t=target: self.ck(t) and None)

        # calibration files
        def calib(cid: str, name: str, data: bytes, args: list[str], what: str, expect: str = "fail") -> None:
            d = self.d(cid)
            p = d / "in" / name

            def setup(p: Path = p, data: bytes = data) -> None:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            add(cid, ["gguf", g, "--q4_k_m", "--calibration", str(p), *args, "-w", str(d / "ws")], what=what,
                setup=setup, expect=expect)

        ru = "Москва — столица России. Это большой город с долгой историей и множеством музеев.\n"
        add("p-calib-missing", ["gguf", g, "--q4_k_m", "--calibration", "missing.txt", "--dry-run"],
            what="--calibration names a missing file")
        calib("p-calib-empty", "empty.txt", b"", [], "an empty calibration .txt (real run)")
        calib("p-calib-binary", "binary.txt", os.urandom(200_000), [], "random bytes named .txt (real run)")
        calib("p-calib-non-utf8", "cp1251.txt", (ru * 400).encode("cp1251"), [],
              "Russian text in cp1251, not UTF-8 (real run)", expect="either")
        calib("p-calib-too-short", "short.txt", "Привет.\n".encode(), [], "one word of calibration text (real run)",
              expect="either")
        calib("p-calib-jsonl-broken", "rows.jsonl", b'{"text": "ok"}\n{not json\n', [],
              "a .jsonl file with a broken line (real run)")
        calib("p-calib-jsonl-no-text", "rows.jsonl", (json.dumps({"prompt": ru}) + "\n").encode() * 50, [],
              "a .jsonl without a text field (real run)")
        calib("p-calib-parquet-garbage", "rows.parquet", b"PAR1" + os.urandom(5000), [],
              "a .parquet file that is not parquet (real run)")
        calib("p-calib-pdf", "notes.pdf", b"%PDF-1.4\n" + os.urandom(1000), ["--dry-run"],
              "a .pdf as calibration (dry run)")
        add("p-calib-dir", ["gguf", g, "--q4_k_m", "--calibration", str(self.fx), "--dry-run"],
            what="--calibration names a folder")
        add("p-calib-hf-offline", ["gguf", g, "--q4_k_m", "--calibration", "hf:nobody/no-such-dataset",
                                   "-w", str(self.d("p-calib-hf-offline") / "ws")],
            what="hf:DATASET calibration while HF_HUB_OFFLINE=1 (real run)")
        add("p-calib-builtin-unknown", ["gguf", g, "--q4_k_m", "--calibration", "builtin:en-mix", "--dry-run"],
            what="an unknown builtin: calibration set")
        add("p-imatrix-missing", ["gguf", g, "--q4_k_m", "--imatrix", "missing.gguf", "--dry-run"],
            what="--imatrix names a missing file")
        for cid, data, what in (("p-imatrix-garbage", os.urandom(4096), "--imatrix of random bytes (real run)"),
                                ("p-imatrix-text", ru.encode() * 20, "--imatrix of a text file (real run)")):
            d = self.d(cid)
            p = d / "in" / "imatrix.gguf"
            add(cid, ["gguf", g, "--q4_k_m", "--imatrix", str(p), "-w", str(d / "ws")], what=what,
                setup=lambda p=p, data=data: (p.parent.mkdir(parents=True), p.write_bytes(data)) and None)
        d = self.d("p-imatrix-truncated")
        p = d / "in" / "imatrix.gguf"
        add("p-imatrix-truncated", ["gguf", g, "--q4_k_m", "--imatrix", str(p), "-w", str(d / "ws")],
            what="--imatrix: the good run's imatrix.gguf cut to 300 bytes (real run)",
            setup=lambda p=p: (p.parent.mkdir(parents=True),
                               p.write_bytes((self.good_ws / "gguf" / "imatrix.gguf").read_bytes()[:300])) and None)

        # eval / card / calib inputs on a finished workspace
        def on_ws(cid: str, args: Callable[[Path], list[str]], what: str, setup: Hook | None = None) -> None:
            d = self.d(cid)
            ws = d / "ws"

            def prep(ws: Path = ws, more: Hook | None = setup) -> None:
                self.ws_copy(ws)
                if more is not None:
                    more()
            add(cid, args(ws), what=what, setup=prep)

        on_ws("p-eval-file-missing", lambda ws: ["eval", str(ws), "--eval", "missing.txt"],
              "eval of a finished workspace with --eval missing.txt")
        de = self.d("p-eval-file-empty")
        on_ws("p-eval-file-empty", lambda ws: ["eval", str(ws), "--eval", str(de / "empty.txt")],
              "eval --eval of an empty file", setup=lambda: (de / "empty.txt").write_text(""))
        add("p-eval-target-missing", ["eval", "./quants/nope"], what="eval of a workspace that does not exist")
        on_ws("p-eval-model-missing", lambda ws: ["eval", str(ws), "--model", "./nope"],
              "eval --model names a missing folder")
        on_ws("p-drift-prompts-missing", lambda ws: ["eval", str(ws), "--drift-prompts", "missing.jsonl"],
              "eval --drift-prompts names a missing file")
        add("p-tensor-type-file-missing", ["gguf", g, "--q4_k_m", "--tensor-type-file", "missing.txt", "--dry-run"],
            what="--tensor-type-file names a missing file")
        add("p-card-target-missing", ["card", "./quants/nope"], what="card of a workspace that does not exist")
        dc = self.d("p-card-output-under-file")
        on_ws("p-card-output-under-file", lambda ws: ["card", str(ws), "-f", "gguf", "-o",
                                                      str(dc / "notes.txt" / "README.md")],
              "card -o under a file (notes.txt/README.md)", setup=lambda: (dc / "notes.txt").write_text("x"))
        add("p-calib-show-missing", ["calib", "show", "missing.txt"], what="calib show of a missing file")
        on_ws("p-manifest-corrupt", lambda ws: ["gguf", g, "--q4_k_m", "-w", str(ws)],
              "a workspace whose manifest.json is garbage (real run)",
              setup=lambda: (self.d("p-manifest-corrupt") / "ws" / "manifest.json").write_text("{garbage"))
        on_ws("p-manifest-newer", lambda ws: ["gguf", g, "--q4_k_m", "-w", str(ws)],
              "a workspace whose manifest says version 99 (real run)",
              setup=lambda: edit_json(self.d("p-manifest-newer") / "ws" / "manifest.json",
                                      lambda m: m.update(version=99)))
        return out

    # -- checkpoint --------------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Case]:
        cat = "checkpoint"
        out: list[Case] = []

        def bad(cid: str, what: str, edit: Callable[[Path], None], cmd: str = "gguf", extra: list[str] | None = None,
                expect: str = "fail", name: str = BASE, says: str | None = None) -> None:
            d = self.d(cid)
            m = d / "in" / "m"

            def setup(m: Path = m, edit: Callable[[Path], None] = edit, name: str = name) -> None:
                self.ck(m, name)
                edit(m)
            args = [cmd, str(m), *({"gguf": ["--q4_k_m"], "gptq": ["--calib-samples", "8", "--calib-seq-len", "64"]}
                                   .get(cmd, [])), *(extra or []), "-w", str(d / "ws")]
            out.append(self.case(cid, cat, args, what=what, setup=setup, expect=expect, says=says))

        cfg = "config.json"
        bad("c-config-invalid-json", "config.json is not valid JSON",
            lambda m: (m / cfg).write_text('{"architectures": ["LlamaForCausalLM"],'))
        bad("c-config-empty", "config.json is empty", lambda m: (m / cfg).write_text(""))
        bad("c-config-list", "config.json is a JSON list", lambda m: (m / cfg).write_text("[]"))
        bad("c-config-no-arch", "config.json without architectures",
            lambda m: edit_json(m / cfg, lambda c: c.pop("architectures")), says=r"architectures")
        bad("c-arch-unsupported", "architectures: GPT2LMHeadModel",
            lambda m: edit_json(m / cfg, lambda c: c.update(architectures=["GPT2LMHeadModel"])))
        bad("c-arch-unsupported-fp8", "fp8 of a checkpoint whose architecture is PhiForCausalLM",
            lambda m: edit_json(m / cfg, lambda c: c.update(architectures=["PhiForCausalLM"])), cmd="fp8")
        bad("c-arch-vs-weights", "architectures says Qwen2ForCausalLM, weights are Llama's (no q/k/v biases)",
            lambda m: edit_json(m / cfg, lambda c: c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")),
            expect="either")
        bad("c-fp16-weights", "float16 weights instead of bfloat16 (a valid checkpoint)",
            lambda m: st_edit(m, recast("F16")), expect="either")
        bad("c-fp32-weights", "float32 weights instead of bfloat16 (a valid checkpoint)",
            lambda m: st_edit(m, recast("F32")), expect="either")
        st = "model.safetensors"

        def truncate(m: Path, keep: float = 0.6) -> None:
            data = (m / st).read_bytes()
            (m / st).write_bytes(data[:int(len(data) * keep)])
        bad("c-truncated", "model.safetensors cut at 60% (an interrupted download)", truncate)
        bad("c-truncated-fp8", "fp8 of a model.safetensors cut at 60%", truncate, cmd="fp8")
        bad("c-truncated-gptq", "gptq of a model.safetensors cut at 60%", truncate, cmd="gptq")

        def garbage_header(m: Path) -> None:
            data = bytearray((m / st).read_bytes())
            (n,) = struct.unpack("<Q", data[:8])
            data[8:8 + n] = b"\x00\xff#garbage" * (n // 10) + b"x" * (n % 10)
            (m / st).write_bytes(bytes(data))
        bad("c-header-garbage", "model.safetensors header replaced by garbage", garbage_header)
        bad("c-header-huge-length", "model.safetensors header length says 1 TiB",
            lambda m: flip_prefix(m / st, struct.pack("<Q", 1 << 40)))
        bad("c-weights-empty", "model.safetensors is 0 bytes", lambda m: (m / st).write_bytes(b""))
        bad("c-weights-missing", "no weights file at all", lambda m: (m / st).unlink())
        bad("c-tensor-missing", "model.layers.1.self_attn.v_proj.weight dropped",
            lambda m: st_edit(m, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight")))
        bad("c-tensor-missing-gptq", "gptq with model.layers.1.self_attn.v_proj.weight dropped",
            lambda m: st_edit(m, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight")), cmd="gptq")
        bad("c-tensor-missing-fp8", "fp8 with model.layers.1.self_attn.v_proj.weight dropped",
            lambda m: st_edit(m, lambda t: t.pop("model.layers.1.self_attn.v_proj.weight")), cmd="fp8")

        def shape(t: Tensors) -> None:
            dt, _, data = t["model.layers.0.self_attn.k_proj.weight"]
            t["model.layers.0.self_attn.k_proj.weight"] = (dt, [64, 256], data[:64 * 256 * 2])
        bad("c-shape-mismatch", "model.layers.0.self_attn.k_proj.weight is [64, 256], config says [128, 256]",
            lambda m: st_edit(m, shape))
        bad("c-shape-mismatch-fp8", "fp8 with k_proj [64, 256] instead of [128, 256]",
            lambda m: st_edit(m, shape), cmd="fp8")
        def inv_freq(t: Tensors) -> None:
            for i in range(2):
                t[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = ("F32", [32], b"\x00" * 128)
        bad("c-rotary-inv-freq", "model.layers.N.self_attn.rotary_emb.inv_freq in every layer (as older Llama exports "
            "carry; transformers ignores them)", lambda m: st_edit(m, inv_freq), expect="ok")
        bad("c-unknown-tensor", "an extra tensor model.layers.0.self_attn.foo.weight", expect="either",
            says=r"layers\.0\.self_attn\.foo",
            edit=lambda m: st_edit(m, lambda t: t.update({"model.layers.0.self_attn.foo.weight":
                                                          ("BF16", [4, 4], b"\x00" * 32)})))

        def sharded(m: Path, *, missing: bool = True, broken: bool = False) -> None:
            shard = "model-00001-of-00002.safetensors"
            (m / st).rename(m / shard)
            tensors, _ = st_read(m / shard)
            names = sorted(tensors)
            index = {"metadata": {"total_size": sum(len(d) for _, _, d in tensors.values())},
                     "weight_map": {n: shard if i % 2 else "model-00002-of-00002.safetensors"
                                    for i, n in enumerate(names)}}
            text = json.dumps(index, indent=2)
            (m / "model.safetensors.index.json").write_text(text[: len(text) // 2] if broken else text)
        bad("c-index-missing-shard", "model.safetensors.index.json names a shard that is not there", sharded)
        bad("c-index-invalid-json", "model.safetensors.index.json is cut in half",
            lambda m: sharded(m, broken=True))
        bad("c-vocab-config-larger", "config vocab_size 4096, embeddings have 2048 rows",
            lambda m: edit_json(m / cfg, lambda c: c.update(vocab_size=4096)))

        def more_tokens(m: Path) -> None:
            def edit(t: dict[str, Any]) -> None:
                for i in range(8):
                    t["added_tokens"].append({"id": 2048 + i, "content": f"<|extra_{i}|>", "single_word": False,
                                              "lstrip": False, "rstrip": False, "normalized": False,
                                              "special": True})
            edit_json(m / "tokenizer.json", edit)
        bad("c-vocab-tokenizer-larger", "tokenizer.json has 8 tokens past the 2048 embedding rows", more_tokens)
        bad("c-tokenizer-missing", "tokenizer.json removed", lambda m: (m / "tokenizer.json").unlink(),
            says=r"tokenizer\.json (is )?(missing|not found|does not exist)|(has )?no tokenizer")
        bad("c-tokenizer-corrupt", "tokenizer.json is random bytes",
            lambda m: (m / "tokenizer.json").write_bytes(os.urandom(3000)))
        bad("c-tokenizer-truncated", "tokenizer.json cut in half",
            lambda m: (m / "tokenizer.json").write_bytes((m / "tokenizer.json").read_bytes()[:70_000]))
        bad("c-already-quantized", "config.json has a GPTQ quantization_config",
            lambda m: edit_json(m / cfg, lambda c: c.update(quantization_config={"quant_method": "gptq",
                                                                                   "bits": 4})))
        bad("c-nan-weights", "NaN in model.layers.0.mlp.down_proj.weight (a broken fine-tune)",
            lambda m: st_edit(m, with_nan), expect="either")

        def to_bin(m: Path) -> None:
            import torch
            from safetensors.torch import load_file

            torch.save(load_file(str(m / st)), m / "pytorch_model.bin")
            (m / st).unlink()
        bad("c-pytorch-bin-only", "pytorch_model.bin only, no safetensors (an older checkpoint)", to_bin,
            expect="either")
        for cid, name, cmd, what in (("c-gemma3mm-gptq", "tiny-gemma3mm", "gptq", "gptq of Gemma3 (multimodal)"),
                                     ("c-gemma3-awq", "tiny-gemma3", "awq", "awq of Gemma3ForCausalLM"),
                                     ("c-deepseek-exl2", "tiny-gigachat3", "exl2", "exl2 of GigaChat3 (DeepseekV3)"),
                                     ("c-deepseek-awq", "tiny-gigachat3", "awq", "awq of GigaChat3 (DeepseekV3)")):
            bad(cid, f"{what}: a format the architecture does not support", lambda m: None, cmd=cmd, name=name,
                extra=["--dry-run"])
        bad("c-truncated-dry-run", "--dry-run of a model.safetensors cut at 60%", truncate, extra=["--dry-run"],
            expect="either")
        return out

    # -- options -----------------------------------------------------------------------------------------------------
    def options(self) -> list[Case]:
        cat, g = "options", str(self.good)
        out: list[Case] = []

        def add(cid: str, args: list[str], what: str = "", **kw: Any) -> None:
            out.append(self.case(cid, cat, args, what=what, **kw))

        dry = ["--dry-run"]
        add("o-types-Q9_K", ["gguf", g, "--types", "Q9_K", *dry], "an unknown llama.cpp type")
        add("o-flag-q9_k", ["gguf", g, "--q9_k", *dry], "an unknown --TYPE flag")
        add("o-quant-Q9_K", ["gguf", g, "--quant", "Q9_K", *dry], "--quant (no such option) Q9_K")
        add("o-types-typo", ["gguf", g, "--types", "q4_km", *dry], "q4_km for q4_k_m")
        add("o-types-empty", ["gguf", g, "--types", "", *dry], '--types ""', expect="either")
        add("o-target-size-0", ["gguf", g, "--target-size", "0", *dry], "--target-size 0")
        add("o-target-size-1KB", ["gguf", g, "--target-size", "1KB", *dry], "a size no mix can reach")
        add("o-target-size-abc", ["gguf", g, "--target-size", "abc", *dry], "--target-size abc")
        add("o-target-size-neg", ["gguf", g, "--target-size", "-5G", *dry], "--target-size -5G")
        add("o-target-bpw-0.5", ["gguf", g, "--target-bpw", "0.5", *dry], "below any type")
        add("o-target-bpw-40", ["gguf", g, "--target-bpw", "40", *dry], "above bf16")
        add("o-target-bpw-nan", ["gguf", g, "--target-bpw", "nan", *dry], "--target-bpw nan")
        add("o-outtype-q4", ["gguf", g, "--outtype", "q4_0", *dry], "--outtype takes bf16, f16, f32")
        add("o-output-type-bad", ["gguf", g, "--output-type", "q99", *dry], "--output-type q99")
        add("o-tensor-type-bad", ["gguf", g, "--tensor-type", "attn_v=zz", *dry], "an unknown type in an override")
        add("o-tensor-type-no-eq", ["gguf", g, "--tensor-type", "attn_v", *dry], "an override without =TYPE")
        add("o-split-size-bad", ["gguf", g, "--split-max-size", "10X", *dry], "--split-max-size 10X")
        add("o-imatrix-and-no-imatrix", ["gguf", g, "--imatrix", str(self.good_ws / "gguf" / "imatrix.gguf"),
                                         "--no-imatrix", *dry], "both --imatrix FILE and --no-imatrix",
            expect="either")
        add("o-gptq-bits-5", ["gptq", g, "--bits", "5", *dry], "gptq --bits 5")
        add("o-gptq-group-100", ["gptq", g, "--group-size", "100", *dry], "a group size that divides no width")
        add("o-gptq-group-0", ["gptq", g, "--group-size", "0", *dry], "gptq --group-size 0")
        add("o-gptq-damp-neg", ["gptq", g, "--damp", "-1", *dry], "gptq --damp -1")
        add("o-gptq-bits-word", ["gptq", g, "--bits", "four", *dry], "gptq --bits four")
        add("o-exl2-cpu", ["exl2", g, "--bits", "4.0", "-w", str(self.d("o-exl2-cpu") / "ws")],
            "exl2 (needs CUDA) on a machine without a GPU (real run)")
        add("o-exl2-cpu-dry", ["exl2", g, "--bits", "4.0", *dry], "exl2 --dry-run without a GPU (plans, says why)",
            expect="either")
        add("o-exl2-bits-1", ["exl2", g, "--bits", "1.0", *dry], "exl2 --bits 1.0")
        add("o-exl2-bits-9", ["exl2", g, "--bits", "9", *dry], "exl2 --bits 9")
        add("o-exl2-head-bits-7", ["exl2", g, "--head-bits", "7", *dry], "exl2 --head-bits 7")
        add("o-awq-bits-3", ["awq", g, "--bits", "3", *dry], "awq --bits 3")
        add("o-awq-group-96", ["awq", g, "--group-size", "96", *dry], "awq --group-size 96")
        add("o-awq-group-0", ["awq", g, "--group-size", "0", *dry], "awq --group-size 0")
        add("o-fp8-scheme-bad", ["fp8", g, "--scheme", "NVFP4", *dry], "fp8 --scheme NVFP4")
        add("o-fp8-shard-0", ["fp8", g, "--shard-size", "0", *dry], "fp8 --shard-size 0")
        has_mlx = subprocess.run([*QK, "mlx", "--help"], capture_output=True, env=self.runner.env({}),
                                 cwd=self.tmp).returncode == 0
        if has_mlx:  # MLX takes 2, 3, 4, 5, 6 or 8 bits (its --help): 5 is valid, 7 and 1 are not
            add("o-mlx-bits-5", ["mlx", g, "--bits", "5", *dry], "mlx --bits 5 (listed as valid by mlx --help)",
                expect="either")
            add("o-mlx-bits-7", ["mlx", g, "--bits", "7", *dry], "mlx --bits 7")
            add("o-mlx-bits-1", ["mlx", g, "--bits", "1", *dry], "mlx --bits 1")
            add("o-mlx-group-96", ["mlx", g, "--group-size", "96", *dry], "mlx --group-size 96")
        else:
            add("o-mlx-bits-5", ["mlx", g, "--bits", "5"], "mlx (no such command in this build) --bits 5")
        add("o-threads-0", ["gguf", g, "--threads", "0", *dry], "--threads 0 (documented: every core)", expect="ok")
        add("o-threads-neg", ["gguf", g, "--threads", "-1", *dry], "--threads -1")
        add("o-calib-samples-0", ["gguf", g, "--calib-samples", "0", *dry], "--calib-samples 0")
        add("o-calib-seq-len-10", ["gguf", g, "--calib-seq-len", "10", *dry], "--calib-seq-len 10")
        add("o-calib-samples-abc", ["gguf", g, "--calib-samples", "abc", *dry], "--calib-samples abc")
        add("o-calib-seq-len-huge", ["gguf", g, "--calib-seq-len", "100000", *dry],
            "--calib-seq-len past the model's 4096 positions", expect="either")
        add("o-unknown-flag", ["gguf", g, "--frobnicate", *dry], "an unknown flag")
        add("o-no-model", ["gguf"], "no MODEL argument")
        add("o-unknown-command", ["quantise", g], "a misspelt command")
        add("o-extra-positional", ["gguf", g, "extra", *dry], "a second positional argument")
        add("o-gptq-unknown-flag", ["gptq", g, "--q4_k_m", *dry], "a GGUF flag given to gptq")
        ws = self.d("o-ws")

        def ws_copy(ws: Path = ws) -> None:
            if not ws.exists():
                self.ws_copy(ws)
        add("o-eval-ctx-8", ["eval", str(ws), "--ctx", "8"], "eval --ctx 8", setup=ws_copy)
        add("o-eval-chunks-1", ["eval", str(ws), "--chunks", "1"], "eval --chunks 1", setup=ws_copy)
        add("o-eval-max-drift-2", ["eval", str(ws), "--max-drift", "2"], "eval --max-drift 2", setup=ws_copy)
        add("o-eval-max-kld-neg", ["eval", str(ws), "--max-kld", "-1", "--chunks", "2"], "eval --max-kld -1",
            setup=ws_copy)
        add("o-push-format-unknown", ["push", str(ws), "-f", "nope", "--dry-run"], "push -f nope", setup=ws_copy)
        add("o-card-format-absent", ["card", str(ws), "-f", "exl2"], "card -f exl2 of a GGUF-only workspace",
            setup=ws_copy)
        recipe = self.d("o-run") / "r.yaml"

        def write_recipe(recipe: Path = recipe) -> None:
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(f"models:\n  - source: {json.dumps(g)}\n    fp8: {{}}\n", encoding="utf-8")
        add("o-run-only-unknown", ["run", str(recipe), "--only", "nope", *dry], "run --only nope",
            setup=write_recipe)
        add("o-run-model-unknown", ["run", str(recipe), "--model", "nope", *dry], "run --model nope",
            setup=write_recipe)
        add("o-repo-invalid-push-dry", ["gguf", g, "--push", "--repo", "bad repo name!", *dry],
            "gguf --push --repo 'bad repo name!' --dry-run")
        return out

    # -- recipe ------------------------------------------------------------------------------------------------------
    def recipes(self) -> list[Case]:
        cat, g = "recipe", json.dumps(str(self.good))
        out: list[Case] = []
        d0 = self.d("recipes")
        ok_model = f"  - source: {g}\n    gguf: {{types: [Q4_K_M]}}\n"
        files: dict[str, tuple[bytes | None, str]] = {
            "yaml-syntax": (f"models:\n  - source: {g}\n    gguf: {{types: [Q4_K_M\n".encode(),
                            "a YAML syntax error (unclosed [)"),
            "unknown-key": (f"defaults:\n  calibraton: builtin:ru-mix\nmodels:\n{ok_model}".encode(),
                            "defaults.calibraton (typo)"),
            "unknown-format": (f"models:\n  - source: {g}\n    ggml: {{}}\n".encode(), "a format 'ggml'"),
            "unknown-model": (b"models:\n  - source: NoSuchModel-7B\n    gguf: {}\n", "an unknown model alias"),
            "same-workspace": (b"models:\n  - source: m/\xd0\x9c\xd0\xbe\xd0\xb4\xd0\xb5\xd0\xbb\xd1\x8c "
                               b"\xd1\x82\xd0\xb5\xd1\x81\xd1\x82\n    fp8: {}\n  - source: m/\xd0\x9c\xd0\xbe\xd0\xb4"
                               b"\xd0\xb5\xd0\xbb\xd1\x8c_\xd1\x82\xd0\xb5\xd1\x81\xd1\x82\n    fp8: {}\n",
                               "two local models 'm/Модель тест' and 'm/Модель_тест' (one workspace folder)"),
            "empty": (b"", "an empty file"),
            "not-mapping": (b"- gguf\n- fp8\n", "a YAML list, not a mapping"),
            "bad-bits-list": (f"models:\n  - source: {g}\n    gptq: {{bits: [4, 5]}}\n".encode(),
                              "gptq bits: [4, 5] (one int expected)"),
            "bad-exl2-bits": (f"models:\n  - source: {g}\n    exl2: {{bits: [4.0, abc]}}\n".encode(),
                              "exl2 bits: [4.0, abc]"),
            "missing": (None, "a recipe file that does not exist"),
            "no-models": (b"models: []\n", "models: []"),
            "no-format": (f"models:\n  - source: {g}\n".encode(), "a model with no format"),
            "dup-key": (f"defaults:\n  calib_samples: 8\ndefaults:\n  calib_samples: 16\nmodels:\n{ok_model}".encode(),
                        "defaults: twice"),
            "non-utf8": (f"description: {'Рецепт'}\nmodels:\n{ok_model}".encode("cp1251"), "a cp1251 recipe"),
            "directory": (None, "the recipe path is a folder"),
            "calib-missing": (f"defaults:\n  calibration: missing.txt\nmodels:\n{ok_model}".encode(),
                              "defaults.calibration names a missing file"),
            "gates-negative": (f"defaults:\n  gates: {{max_kld: -1}}\nmodels:\n{ok_model}".encode(),
                               "gates.max_kld: -1"),
            "tabs": (f"models:\n\t- source: {g}\n\t  gguf: {{}}\n".encode(), "tab-indented YAML"),
        }
        for name, (data, what) in files.items():
            path = d0 / ("dir.yaml" if name == "directory" else f"{name}.yaml")

            def setup(path: Path = path, data: bytes | None = data, name: str = name) -> None:
                path.parent.mkdir(parents=True, exist_ok=True)
                if name == "directory":
                    path.mkdir(exist_ok=True)
                elif name == "same-workspace":
                    for sub in ("Модель тест", "Модель_тест"):
                        if not (path.parent / "m" / sub).exists():
                            self.ck(path.parent / "m" / sub)
                if data is not None:
                    path.write_bytes(data)
            out.append(self.case(f"r-{name}-validate", cat, ["recipe", "validate", str(path)], what=what,
                                 setup=setup, roots=[d0]))
            out.append(self.case(f"r-{name}-run", cat, ["run", str(path), "--dry-run"], what=what, setup=setup,
                                 roots=[d0]))
        return out

    # -- hub / publish -----------------------------------------------------------------------------------------------
    def hubs(self) -> list[Case]:
        cat = "hub/publish"
        out: list[Case] = []
        if self.hub is None or not self.tokens:
            return [self.case("h-all", cat, ["push"], skip="the fake Hub did not start")]
        hub, tok = self.hub, self.tokens

        def env(token: str | None, **more: str) -> dict[str, str]:
            e = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", **more}
            if token is not None:
                e["HF_TOKEN"] = token
            return e

        def push(cid: str, what: str, token: str | None, *, args: list[str] | None = None, source: Path | None = None,
                 edit: Callable[[Path], None] | None = None, refuse: bool = True, hub_: Any = None,
                 before: Hook | None = None, teardown: Hook | None = None, extra_env: dict[str, str] | None = None,
                 target: str = "gguf", expect: str = "fail", **kw: Any) -> None:
            d = self.d(cid)
            ws = d / "ws"

            def setup(ws: Path = ws) -> None:
                self.ws_copy(ws, source)
                if edit is not None:
                    edit(ws)
                if before is not None:
                    before()
            secret = token if token and len(token) >= 8 else None
            out.append(self.case(cid, cat, ["push", str(ws / target if target else ws), *(args or [])], what=what,
                                 env=env(token, **(extra_env or {})), setup=setup, secret=secret,
                                 hub=(hub_ or hub) if refuse else None, teardown=teardown, expect=expect, **kw))

        push("h-no-token", "push with no HF_TOKEN and an empty HF_HOME", None)
        push("h-read-token", "push with a read-only token", tok["read"])
        push("h-invalid-token", "push with a token the Hub does not know", tok["secret"] + "x")
        push("h-non-ascii-token", "push with a token holding a Cyrillic letter",
             "hf_quantkitТокен0123456789abcdefghij")
        push("h-token-newline", "a token with a trailing newline (pasted)", tok["write"] + "\n", expect="either",
             refuse=False, args=["--repo", f"{tok['user']}/bi-newline"])
        push("h-unverified", "push of a workspace made with --no-verify (nothing verified)", tok["secret"],
             source=self.noverify_ws)
        push("h-file-changed", "push after a byte of the verified Q4_K_M GGUF was flipped", tok["secret"],
             edit=lambda ws: flip_byte(ws / "gguf" / "m-Q4_K_M.gguf"))
        push("h-file-deleted", "push after the Q4_K_M GGUF was deleted", tok["secret"],
             edit=lambda ws: (ws / "gguf" / "m-Q4_K_M.gguf").unlink())
        push("h-repo-invalid", "push --repo 'bad repo name!'", tok["secret"], args=["--repo", "bad repo name!"])
        push("h-repo-three-parts", "push --repo a/b/c", tok["secret"], args=["--repo", "a/b/c"])
        push("h-repo-cyrillic", "push --repo tester/Модель-GGUF", tok["secret"], args=["--repo", "tester/Модель-GGUF"])
        push("h-repo-other-namespace", "push --repo someone-else/x with a token of user tester", tok["secret"],
             args=["--repo", "someone-else/x"])
        push("h-offline", "push with HF_HUB_OFFLINE=1", tok["secret"], extra_env={"HF_HUB_OFFLINE": "1"})
        push("h-endpoint-down", "HF_ENDPOINT=http://127.0.0.1:1 (nothing listens)", tok["secret"],
             extra_env={"HF_ENDPOINT": "http://127.0.0.1:1"}, refuse=False)
        push("h-endpoint-garbage", "HF_ENDPOINT=not-a-url", tok["secret"], extra_env={"HF_ENDPOINT": "not-a-url"},
             refuse=False)
        push("h-500-whoami", "the Hub answers 500 to whoami, always", tok["secret"],
             before=lambda: hub.fail("GET", r"whoami", 500, times=10_000), teardown=hub.clear_failures)
        push("h-500-commit", "the Hub answers 500 to every commit", tok["secret"], refuse=False,
             args=["--repo", f"{tok['user']}/bi-500-commit"],
             before=lambda: hub.fail("POST", r"/commit/", 500, times=10_000), teardown=hub.clear_failures)
        push("h-500-lfs-upload", "the Hub answers 500 to every LFS upload", tok["secret"], refuse=False,
             args=["--repo", f"{tok['user']}/bi-500-lfs"],
             before=lambda: hub.fail("PUT", r".", 500, times=10_000), teardown=hub.clear_failures)
        push("h-429-always", "the Hub answers 429 (Retry-After: 1) to every preupload", tok["secret"], refuse=False,
             args=["--repo", f"{tok['user']}/bi-429"],
             before=lambda: hub.fail("POST", r"/preupload/", 429, times=10_000, retry_after="1"),
             teardown=hub.clear_failures)

        # a second Hub, in its own process, that dies (os._exit: every connection drops) at the first LFS upload
        midway: dict[str, Any] = {}

        def start_midway() -> None:
            code = ("import os, sys, time; sys.path.insert(0, sys.argv[1]); from hub_server import FakeHub; "
                    "h = FakeHub(tokens={sys.argv[2]: (sys.argv[3], 'write')}).start(); print(h.url, flush=True)\n"
                    "while not h.calls('PUT'): time.sleep(0.005)\n"
                    "os._exit(0)")
            proc = subprocess.Popen([sys.executable, "-c", code, str(ROOT / "tests"), tok["secret"], tok["user"]],
                                    stdout=subprocess.PIPE, text=True, start_new_session=True)
            midway["proc"] = proc
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            if not url.startswith("http"):
                raise RuntimeError("the second fake Hub did not start")
            midway_case.env["HF_ENDPOINT"] = url

        def stop_midway() -> None:
            proc = midway.get("proc")
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        push("h-server-dies-midway", "the Hub process dies at the first LFS upload (all connections drop)",
             tok["secret"], refuse=False, extra_env={"HF_ENDPOINT": "(set when the server starts)"},
             before=start_midway, teardown=stop_midway)
        midway_case = out[-1]

        d = self.d("h-private-conflict")
        first_push = ["push", str(d / "ws" / "gguf"), "--repo", f"{tok['user']}/bi-public"]

        def publish_first(d: Path = d, first_push: list[str] = first_push) -> None:
            ran = self.runner.spawn(first_push, d, self.runner.env(env(tok["secret"])), timeout=120)
            if ran.rc != 0:
                raise RuntimeError(f"the first (public) push failed: {first_line(ran.stderr)}")
        push("h-private-conflict", "push --private to a repo the previous push made public", tok["secret"],
             args=["--repo", f"{tok['user']}/bi-public", "--private"], before=publish_first)
        push("h-manifest-corrupt", "push of a workspace whose manifest.json is garbage", tok["secret"],
             edit=lambda ws: (ws / "manifest.json").write_text("{garbage"))
        push("h-format-absent", "push -f gptq of a GGUF-only workspace", tok["secret"], target="",
             args=["-f", "gptq"])
        d = self.d("h-empty-folder")
        out.append(self.case("h-empty-folder", cat, ["push", str(d / "empty")], what="push of an empty folder",
                             env=env(tok["secret"]), secret=tok["secret"], hub=hub,
                             setup=lambda d=d: (d / "empty").mkdir(parents=True)))
        d = self.d("h-gguf-push-no-token")
        out.append(self.case("h-gguf-push-no-token", cat, ["gguf", str(self.good), "--q4_k_m", "--push", "-w",
                                                           str(d / "ws")],
                             what="gguf --push with no token (real run)", env=env(None), hub=hub))
        d = self.d("h-gguf-push-read-token")
        out.append(self.case("h-gguf-push-read-token", cat, ["fp8", str(self.good), "--push", "-w", str(d / "ws")],
                             what="fp8 --push with a read-only token (real run)", env=env(tok["read"]), hub=hub,
                             secret=tok["read"]))
        return out

    # -- cluster -----------------------------------------------------------------------------------------------------
    def cluster(self) -> list[Case]:
        cat = "cluster (Ray)"
        out: list[Case] = []
        recipe = self.d("k-recipe") / "r.yaml"
        g = json.dumps(str(self.good))

        def write(recipe: Path = recipe) -> None:
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(f"defaults:\n  workspace: ws\n  eval: false\nmodels:\n  - source: {g}\n    fp8: {{}}\n",
                              encoding="utf-8")
        r = str(recipe)
        roots = [recipe.parent]

        def add(cid: str, args: list[str], what: str, **kw: Any) -> None:
            out.append(self.case(cid, cat, args, what=what, setup=write, roots=roots, **kw))

        ct = ["--connect-timeout", "5"]
        add("k-ray-unreachable", ["run", r, "--executor", "ray", "--address", "127.0.0.1:1", *ct],
            "Ray at an address where nothing listens (must fail within the 5 s connect timeout)", limit=60)
        add("k-ray-unreachable-dry", ["run", r, "--dry-run", "--executor", "ray", "--address", "127.0.0.1:1", *ct],
            "the same, --dry-run", expect="either", limit=60)
        add("k-ray-malformed", ["run", r, "--executor", "ray", "--address", "ray://::::", *ct],
            "--address ray://::::", limit=60)
        add("k-ray-foo-bar", ["run", r, "--executor", "ray", "--address", "foo:bar", *ct], "--address foo:bar",
            limit=60)
        add("k-ray-port-text", ["run", r, "--executor", "ray", "--address", "127.0.0.1:abc", *ct],
            "--address 127.0.0.1:abc", limit=60)
        add("k-ray-http", ["run", r, "--executor", "ray", "--address", "http://127.0.0.1:1", *ct],
            "--address http://127.0.0.1:1 (a dashboard URL)", limit=60)
        add("k-ray-env-address", ["run", r, "--executor", "ray", *ct], "RAY_ADDRESS=127.0.0.1:1, no --address",
            env={"RAY_ADDRESS": "127.0.0.1:1"}, limit=60)
        add("k-ray-timeout-0", ["run", r, "--executor", "ray", "--address", "127.0.0.1:1", "--connect-timeout", "0"],
            "--connect-timeout 0 at a dead address", limit=60)
        add("k-ray-timeout-neg", ["run", r, "--executor", "ray", "--address", "127.0.0.1:1", "--connect-timeout",
                                  "-1"], "--connect-timeout -1")
        add("k-executor-unknown", ["run", r, "--executor", "slurm"], "--executor slurm")
        add("k-address-without-ray", ["run", r, "--address", "127.0.0.1:1", "--dry-run"],
            "--address with the local executor (--dry-run)", expect="either")
        return out

    # -- interrupt ---------------------------------------------------------------------------------------------------
    def interrupts(self) -> list[Case]:
        cat, g = "interrupt", str(self.good)
        out: list[Case] = []
        sigint, sigterm, sigkill = signal.SIGINT, signal.SIGTERM, signal.SIGKILL

        def add(cid: str, cmd: list[str], what: str, sigs: list[tuple[int, float, bool]], **kw: Any) -> None:
            ws = self.d(cid) / "ws"
            args = [*cmd, "-w", str(ws)] if cmd[0] != "run" else cmd
            rerun = args if kw.pop("rerun", False) else None
            out.append(self.case(cid, cat, args, what=what, signals=sigs, rerun=rerun,
                                 expect="ok" if rerun else "fail", **kw))

        gguf = ["gguf", g, "--q4_k_m"]
        add("i-sigint-gguf-3s", gguf, "Ctrl-C (SIGINT to the group) 3 s into a GGUF run", [(sigint, 3, True)])
        add("i-sigint-gguf-8s", gguf, "Ctrl-C 8 s into a GGUF run", [(sigint, 8, True)])
        add("i-sigint-gguf-14s", gguf, "Ctrl-C 14 s into a GGUF run", [(sigint, 14, True)])
        add("i-sigterm-gguf-3s", gguf, "kill PID (SIGTERM) 3 s into a GGUF run", [(sigterm, 3, False)])
        add("i-sigterm-gguf-10s", gguf, "kill PID (SIGTERM) 10 s into a GGUF run", [(sigterm, 10, False)])
        add("i-sigint-twice", gguf, "Ctrl-C twice (5 s and 5.3 s) into a GGUF run",
            [(sigint, 5, True), (sigint, 5.3, True)])
        add("i-sigkill-rerun", gguf, "kill -9 PID 6 s into a GGUF run, then the same command again",
            [(sigkill, 6, False)], rerun=True)
        add("i-sigint-rerun", gguf, "Ctrl-C 9 s into a GGUF run, then the same command again",
            [(sigint, 9, True)], rerun=True)
        add("i-sigint-fp8", ["fp8", g], "Ctrl-C 4 s into an FP8 run", [(sigint, 4, True)])
        add("i-sigint-gptq", ["gptq", g, "--calib-samples", "8", "--calib-seq-len", "64"],
            "Ctrl-C 8 s into a GPTQ run", [(sigint, 8, True)])
        add("i-sigint-dry-run", ["gguf", g, "--q4_k_m", "--dry-run"], "Ctrl-C 0.5 s into a --dry-run",
            [(sigint, 0.5, True)])
        for after in (0.1, 0.25):
            add(f"i-sigint-startup-{after:g}s", ["gguf", g, "--q4_k_m"],
                f"Ctrl-C {after:g} s after pressing Enter (while Python imports)", [(sigint, after, True)])
        d = self.d("i-sigint-recipe")
        recipe = d / "r.yaml"

        def write(recipe: Path = recipe) -> None:
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(f"defaults:\n  workspace: ws\n  eval: false\nmodels:\n  - source: {json.dumps(g)}\n"
                              f"    fp8: {{}}\n    gguf: {{types: [Q4_K_M]}}\n", encoding="utf-8")
        add("i-sigint-recipe", ["run", str(recipe)], "Ctrl-C 6 s into `quantkit run` of a recipe (fp8 + gguf)",
            [(sigint, 6, True)], setup=write)

        # a second run on a workspace a live run holds
        d = self.d("i-workspace-busy")
        holder: list[subprocess.Popen[bytes]] = []

        def start_holder(d: Path = d) -> None:
            d.mkdir(parents=True, exist_ok=True)
            (self.tmp / "logs").mkdir(exist_ok=True)
            with open(self.tmp / "logs" / "holder.log", "wb") as log:
                holder.append(subprocess.Popen([*QK, "fp8", g, "-w", str(d / "ws")], cwd=d,
                                               env=self.runner.env({}), stdout=log, stderr=log,
                                               start_new_session=True))
            for _ in range(200):
                if (d / "ws" / ".quantkit.lock").exists():
                    break
                time.sleep(0.05)
            time.sleep(0.5)

        def stop_holder() -> None:
            for p in holder:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=120)
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        out.append(self.case("i-workspace-busy", cat, ["gguf", g, "--q4_k_m", "-w", str(d / "ws")],
                             what="a second run on a workspace that a live fp8 run holds", setup=start_holder,
                             settle=stop_holder, teardown=stop_holder))
        d = self.d("i-stale-lock")

        def stale(d: Path = d) -> None:
            ws = d / "ws"
            ws.mkdir(parents=True)
            (ws / ".quantkit.lock").write_text("999999\n")
            (ws / ".manifest.json.999999.partial").write_text("{half")
        out.append(self.case("i-stale-lock", cat, ["fp8", g, "-w", str(d / "ws")], expect="ok", setup=stale,
                             what="a lock file and a .partial left by a dead PID 999999 (the run must go on)"))
        return out

    # -- disk --------------------------------------------------------------------------------------------------------
    def disk(self) -> list[Case]:
        cat, g = "disk", str(self.good)
        out: list[Case] = []
        why = self.mounts.why_not

        def add(cid: str, cmd: list[str], size: str, what: str, *, fill: int = 0, rerun_size: str | None = None,
                expect: str = "fail", ws_from: Path | None = None, mount_opts: str = "",
                says: str | None = r"/mnt\b") -> None:
            d = self.d(cid)
            mnt = d / "mnt"
            ws = mnt / "ws"
            args = [*cmd, str(ws)] if cmd[0] == "eval" else [*cmd, "-w", str(ws)]

            def setup(mnt: Path = mnt, ws: Path = ws) -> None:
                self.mounts.mount(mnt, f"size={size}{mount_opts}")
                if ws_from is not None:
                    self.ws_copy(ws, ws_from)
                if fill:
                    with open(mnt / "filler.bin", "wb") as f:
                        with contextlib.suppress(OSError):
                            f.write(b"\0" * fill)
            between = (lambda mnt=mnt, s=rerun_size: self.mounts.remount(mnt, f"size={s}")) if rerun_size else None
            out.append(self.case(cid, cat, args, what=what, setup=setup, rerun=args if rerun_size else None,
                                 between=between, teardown=lambda mnt=mnt: self.mounts.umount(mnt),
                                 expect="ok" if rerun_size else expect, skip=why, says=says))

        gguf = ["gguf", g, "--q4_k_m"]
        add("d-gguf-2m", gguf, "2m", "a GGUF run with its workspace on a 2 MB tmpfs")
        add("d-gguf-2m-resume", gguf, "2m", "GGUF on a 2 MB tmpfs (refused after the calibration step), then the "
            "tmpfs grown to 128 MB and the same command run again", rerun_size="128m")
        add("d-gguf-160k-resume", gguf, "160k", "GGUF on a 160 KB tmpfs (the first write, calibration rows, hits "
            "ENOSPC), then grown to 128 MB and run again", rerun_size="128m")
        add("d-fp8-2m", ["fp8", g], "2m", "an FP8 run with its workspace on a 2 MB tmpfs")
        add("d-fp8-3700k", ["fp8", g], "3700k", "FP8 on a 3.7 MB tmpfs: passes the 3.68 MB space check, the 3.84 MB "
            "output then hits ENOSPC mid-write")
        add("d-gptq-2m", ["gptq", g, "--calib-samples", "8", "--calib-seq-len", "64"], "2m",
            "a GPTQ run with its workspace on a 2 MB tmpfs")
        add("d-inodes", gguf, "64m", "a GGUF run on a tmpfs with 6 inodes", mount_opts=",nr_inodes=6")
        add("d-already-full", gguf, "1m", "a GGUF run on a tmpfs that is already full", fill=1 << 20)
        pages = sum(-(-p.stat().st_size // 4096) for p in self.good_ws.rglob("*") if p.is_file()) \
            if self.good_ws.exists() else 0
        add("d-eval-full", ["eval"], f"{pages * 4 + 192}k",
            "eval of a finished workspace on a tmpfs with about 150 KB free", ws_from=self.good_ws)
        return out


def sh_quote(value: str) -> str:
    """shlex.quote, with control characters written the bash way ($'...\\n')."""
    if not any(ch in value for ch in "\n\r\t"):
        return shlex.quote(value)
    text = value.replace("\\", "\\\\").replace("'", "\\'")
    return "$'" + text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + "'"


def flip_prefix(path: Path, prefix: bytes) -> None:
    data = path.read_bytes()
    path.write_bytes(prefix + data[len(prefix):])


# -- the report -------------------------------------------------------------------------------------------------------
def mark(value: bool | None, expect: str = "fail") -> str:
    if value is None:
        return "–"
    sign = "✓" if value else "✗"
    return sign + {"ok": " (0 wanted)", "either": " (either)"}.get(expect, "")


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def table(rows: list[Row]) -> str:
    out = ["| id | category | command | exit | first line of stderr | one_line | nonzero | clean |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.id} | {r.category} | `{cell(r.command)}` | {r.rc} | {cell(r.first)} | {mark(r.one_line)} | "
                   f"{mark(r.nonzero, r.expect)} | {mark(r.clean)} |")
    return "\n".join(out)


def source_state() -> str:
    """The commit under test, and how many files under quantkit/ differ from it (others may be editing)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else "?"
    changed = [ln for ln in git("status", "--porcelain", "--", "quantkit").splitlines() if ln.strip()]
    return f"commit {git('rev-parse', '--short', 'HEAD')} with {len(changed)} changed file(s) under quantkit/"


@contextlib.contextmanager
def temp_root(keep: bool) -> Iterator[Path]:
    tmp = Path(tempfile.mkdtemp(prefix="quantkit-bad-inputs-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"\nkept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write every row (full command, env, stderr) to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--only", action="append", default=[],
                    help="a category or an id substring (repeatable); default: every case")
    ap.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="the tests' tiny checkpoints")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    opts = ap.parse_args()
    if not (opts.checkpoints / BASE).is_dir():
        print(f"error: no {BASE} under {opts.checkpoints} (run the test suite once, or pass --checkpoints)",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with temp_root(opts.keep) as tmp:
        mounts = Mounts(tmp)
        runner = Runner(tmp)
        cases = Cases(tmp, opts.checkpoints, runner, mounts)
        try:
            if not opts.list:
                print(f"preparing (two real GGUF runs) in {tmp} ...", file=sys.stderr)
                cases.prepare()
                for p in cases.prep_problems:
                    print(f"warning: {p}", file=sys.stderr)
            else:
                sys.path.insert(0, str(ROOT / "tests"))
                cases.tokens = {"write": "w", "read": "r", "secret": "s", "user": "u"}
                cases.hub = type("NoHub", (), {"url": "http://127.0.0.1:0", "fail": None, "clear_failures": None})()
            todo = cases.all()
            if opts.only:
                todo = [c for c in todo if any(o == c.category or o in c.id for o in opts.only)]
            if opts.list:
                for c in todo:
                    print(f"{c.id:32} {c.category:14} {runner.command(c)}")
                print(f"{len(todo)} cases")
                return 0
            rows: list[Row] = []
            print(f"quantkit at {source_state()}; {len(todo)} cases", file=sys.stderr)
            for i, case in enumerate(todo, 1):
                row = runner.run(case)
                rows.append(row)
                state = "pass" if row.passed else "not tried" if row.nonzero is None else "FAIL"
                print(f"[{i}/{len(todo)}] {row.id}: {state} ({row.seconds:.1f}s) {'; '.join(row.problems)[:150]}",
                      file=sys.stderr, flush=True)
        finally:
            cases.close()
            mounts.close()
        print(f"quantkit at {source_state()}; temp folder shown as $T; the case's folder is its working directory\n")
        print(table(rows))
        passed = [r for r in rows if r.passed]
        print(f"\n**{len(passed)} of {len(rows)} cases pass all three checks** "
              f"({time.monotonic() - t0:.0f} s in all)")
        if cases.prep_problems:
            print("\npreparation problems: " + "; ".join(cases.prep_problems))
        notes = [r for r in rows if r.message_note]
        if notes:
            print("\nError lines that pass the checks but miss what they should say:\n")
            for r in notes:
                print(f"- **{r.id}**: {r.message_note}: {cell(r.first)}")
        failing = [r for r in rows if not r.passed]
        if failing:
            print("\nCases that do not pass:\n")
            for r in failing:
                checks = [n for n, v in (("one_line", r.one_line), ("nonzero", r.nonzero), ("clean", r.clean))
                          if v is False]
                head = "not tried" if r.nonzero is None else "fails " + ", ".join(checks)
                print(f"- **{r.id}** ({head}): {'; '.join(r.problems)}")
                print(f"  - setup: {r.what}")
                env = " ".join(f"{k}={sh_quote(v)}" for k, v in r.env.items())
                print(f"  - command: `{(env + ' ' if env else '')}{' '.join(shlex.quote(a) for a in r.argv)}`")
        if opts.json:
            opts.json.write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in rows], ensure_ascii=False,
                                            indent=2), encoding="utf-8")
        return 0 if len(passed) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
