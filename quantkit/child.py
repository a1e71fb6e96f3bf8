"""Worker processes that quantkit starts for engines it keeps out of its own process (GPTQModel, mlx-lm): their
output goes to a log (and to stderr unless quiet), Ctrl-C stops them, and a failure is told by its telling line."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from quantkit import console


def run_logged(cmd: list[str], *, cwd: Path, env: dict[str, str], log_path: Path) -> int:
    """Run `cmd`; every line it prints goes to `log_path`, and to stderr unless quiet. Returns its exit code; an
    interrupt terminates it (then kills it after 10 s) and is raised again."""
    show = not console.is_quiet()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if show:
                    sys.stderr.write(line)
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


def last_error(log: Path) -> str:
    """The most telling line of a failed worker's log: the last exception line, else the last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*", ln):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def why_failed(rc: int, log: Path) -> str:
    """A worker's failure in words: the signal that killed it, else its log's telling line."""
    if rc < 0:
        return f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    return last_error(log)


def link(src: Path, dst: Path) -> None:
    """`dst` as a symlink to `src`; a hard link, else a copy, where symlinks are not allowed."""
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
