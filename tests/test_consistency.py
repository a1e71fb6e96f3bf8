"""The format commands and recipes behave the same (issue 13's defects): a backend that cannot run here is refused
before anything is resolved or downloaded; ``--dry-run`` changes nothing on disk; one exit code for a failed gate;
the shipped demo recipe plans; a plan's "done" uses the run's fingerprints; the checkpoint fingerprint follows the
weights (Hub blob hashes, cached content hashes for a local folder); ``--threads`` reaches torch and llama.cpp.

Commands run in fresh processes like a user's; the Hub is tests/hub_server.py on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_server import USER, WRITE_TOKEN, FakeHub, Repo, StoredFile

from quantkit.errors import EXIT_GATE, GateFailed, QuantkitError
from quantkit.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
QK = [sys.executable, "-m", "quantkit.cli.app"]
QUICK = ["--calib-samples", "4", "--calib-seq-len", "64", "--no-verify"]


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub.running() as server:
        yield server


def qk(*args: str, cwd: Path, hub: FakeHub | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`quantkit ARGS` in a fresh process; with `hub`, the Hub client talks to the loopback server."""
    e = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QUANTKIT_DEBUG")}
    e |= {"NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **env}
    if hub is not None:
        e |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": WRITE_TOKEN}
    return subprocess.run([*QK, *args], cwd=cwd, capture_output=True, text=True, env=e, timeout=900)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def snapshot(root: Path) -> dict[str, Any]:
    """Every path under `root` with its kind, and for files their bytes' hash and mtime."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath) / d
            out[p.relative_to(root).as_posix()] = "link" if p.is_symlink() else "dir"
        for f in filenames:
            p = Path(dirpath) / f
            st = p.lstat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns,
                                                   hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def seed_repo(hub: FakeHub, repo_id: str, folder: Path) -> None:
    """Put a checkpoint folder on the loopback Hub as a new commit of `repo_id` (weights as LFS files)."""
    files = {p.name: StoredFile(p.read_bytes(), lfs=p.suffix == ".safetensors") for p in sorted(folder.iterdir())
             if p.is_file()}
    head = hashlib.sha1(b"".join(f.data for f in files.values())).hexdigest()
    with hub.lock:
        repo = hub.repos.setdefault(repo_id, Repo(id=repo_id, private=False))
        repo.branches["main"] = files
        repo.heads["main"] = head


def nudge_one_weight(folder: Path) -> None:
    """Change one bf16 weight's low mantissa byte in place: same size, same header, different weights."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n] ^= 0x01
    path.write_bytes(bytes(data))


def weight_requests(hub: FakeHub) -> list[str]:
    return [r.path for r in hub.requests if r.path.endswith(".safetensors")]


# -- 1. a backend that cannot run here is refused before the source is resolved -------------------------------------
def _cannot_run(fmt: str) -> str | None:
    from quantkit.backends.base import get_backend

    try:
        return get_backend(fmt).check()
    except ImportError as exc:
        return str(exc)


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# EXL2 is the backend that cannot run on a machine without CUDA (every other one installed here can run); the
# refusal-before-resolving code path is the same for every backend
@pytest.mark.skipif(_has_cuda(), reason="with CUDA, EXL2 can run: the refusal needs a machine without a GPU")
def test_backend_that_cannot_run_is_refused_before_any_download(tmp_path: Path, llama3_ckpt: Path,
                                                                 hub: FakeHub) -> None:
    fmt = "exl2"
    reason = _cannot_run(fmt)
    assert reason is not None
    # offline, a Hub id that is not in the cache: the backend's reason, not a download error
    offline = qk(fmt, "AnatoliiPotapov/T-lite-0.1", "-w", str(tmp_path / "w1"), cwd=tmp_path)
    assert offline.returncode == 2
    line = error_line(offline)
    assert reason.split("(")[0].strip() in line and "cannot download" not in line, line
    # a model the Hub has: not one request, let alone for its weights
    seed_repo(hub, f"{USER}/tiny", llama3_ckpt)
    online = qk(fmt, f"{USER}/tiny", "-w", str(tmp_path / "w2"), cwd=tmp_path, hub=hub)
    assert online.returncode == 2
    assert reason.split("(")[0].strip() in error_line(online)
    assert weight_requests(hub) == [] and hub.requests == []
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
    # --dry-run still shows the plan, and says why it cannot run here
    plan = qk(fmt, str(llama3_ckpt), "--dry-run", "--json", "-w", str(tmp_path / "w3"), cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["reason"] == reason


# -- 2. --dry-run changes nothing on disk ----------------------------------------------------------------------------
def test_dry_run_leaves_the_filesystem_unchanged(tmp_path: Path, llama3_ckpt: Path, hub: FakeHub) -> None:
    tree = tmp_path / "tree"
    (tree / "models").mkdir(parents=True)
    shutil.copytree(llama3_ckpt, tree / "models" / "tiny")  # a copy inside the tree: its hash cache would show
    recipe = tree / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "defaults": {"workspace": "ws", "publish": True, "namespace": USER},
        "models": [{"source": "models/tiny", "gguf": {"types": ["Q4_K_M", "Q8_0"]},
                    "gptq": {"bits": 4, "group_size": 64}, "exl2": {"bits": [4.0]}}]}), encoding="utf-8")
    env = {"QUANTKIT_CACHE": str(tree / "qk-cache"), "HF_HOME": str(tree / "hf-home")}
    model = str(tree / "models" / "tiny")
    before = snapshot(tree)
    runs = [
        ("gguf", model, "--q4_k_m", "--q8_0", "--dry-run", "-w", str(tree / "ws-gguf")),
        ("gguf", model, "--dry-run", "--json", "--push", "--repo", f"{USER}/tiny-GGUF"),  # ./quants/tiny
        ("gptq", model, "--group-size", "64", "--dry-run", "-w", str(tree / "ws-gptq")),
        ("exl2", model, "--dry-run", "-w", str(tree / "ws-exl2")),
        ("run", str(recipe), "--dry-run"),
        ("run", str(recipe), "--dry-run", "--json"),
        ("gguf", "T-lite-0.1", "--dry-run"),  # an alias not in the (empty) Hub cache: planned, not downloaded
        ("gguf", "demo", "--dry-run"),  # the demo model is not built yet: planned, not built
    ]
    for args in runs:
        proc = qk(*args, cwd=tree, **env)
        assert proc.returncode == 0, (args, proc.stderr[-3000:])
        assert snapshot(tree) == before, (args, sorted(set(snapshot(tree)) ^ set(before)))
    # a Hub id the Hub has: planned from what is known, nothing fetched
    seed_repo(hub, f"{USER}/tiny", llama3_ckpt)
    proc = qk("gptq", f"{USER}/tiny", "--dry-run", "--json", cwd=tree, hub=hub, **env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    assert plan["estimated"] and plan["plan"][0]["step"] == f"download {USER}/tiny"
    assert [r.path for r in hub.requests if r.path != "/api/agent-harnesses"] == []
    # huggingface_hub itself caches the Hub's agent registry once a day when it may go online: not quantkit's file
    after = {k: v for k, v in snapshot(tree).items() if k not in ("hf-home", "hf-home/.agent_harnesses.json")}
    assert after == before


def test_dry_run_of_an_existing_workspace_reads_it_and_writes_nothing(tmp_path: Path, llama3_ckpt: Path) -> None:
    ws = tmp_path / "ws"
    made = qk("gguf", str(llama3_ckpt), "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    before = snapshot(tmp_path)
    plan = qk("gguf", str(llama3_ckpt), "--q8_0", "--q4_k_m", *QUICK[:4], "--dry-run", "--json", "-w", str(ws),
              cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert snapshot(tmp_path) == before
    status = {s["output"]: s["done"] for s in json.loads(plan.stdout)["plan"]}
    assert status["gguf/tiny-llama3-Q8_0.gguf"] is True and status["gguf/tiny-llama3-Q4_K_M.gguf"] is False


# -- 3. one exit code for a failed quality gate ----------------------------------------------------------------------
def test_one_exit_code_for_a_failed_gate(tmp_path: Path, llama3_ckpt: Path) -> None:
    assert GateFailed("x").exit_code == EXIT_GATE != QuantkitError("x").exit_code
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert f"exit {EXIT_GATE}" in readme  # documented
    ws = tmp_path / "ws"
    # ternary weights everywhere, head and embeddings included: far past the default gate (KLD ~0.28 > 0.05)
    made = qk("gguf", str(llama3_ckpt), "--tq1_0", "--output-type", "tq1_0", "--embedding-type", "tq1_0",
              "--no-imatrix", "--no-verify", "--eval", "-w", str(ws), cwd=tmp_path)
    assert made.returncode == EXIT_GATE, made.stderr[-3000:]
    assert "failed the quality gate" in error_line(made)
    again = qk("eval", str(ws), "--ctx", "128", "--chunks", "2", "--max-kld", "1e-9", cwd=tmp_path)
    assert again.returncode == EXIT_GATE, again.stderr[-3000:]
    assert "failed the quality gate" in error_line(again)


# -- 4. the shipped demo recipe plans ---------------------------------------------------------------------------------
def test_demo_recipe_dry_run(tmp_path: Path) -> None:
    cache = tmp_path / "empty-cache"
    proc = qk("run", str(REPO_ROOT / "recipes" / "demo.yaml"), "--dry-run", "--json", cwd=tmp_path,
              QUANTKIT_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    (model,) = plan["models"]
    assert model["model"] == "quantkit-demo-ru" and "built on the first run" in model["note"]
    assert {s["format"] for s in model["steps"]} >= {"gguf", "gptq", "exl2", "awq", "fp8", "mlx"}
    assert not cache.exists() and not (tmp_path / "quants").exists()  # planning did not build the demo


# -- 5. a plan says publishing is done only when the run would skip it -----------------------------------------------
def test_plan_publish_done_follows_the_repo(tmp_path: Path, llama3_ckpt: Path, hub: FakeHub) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(llama3_ckpt, target_is_directory=True)
    recipe = tmp_path / "recipe.yaml"

    def write(repo: str) -> None:
        recipe.write_text(yaml.safe_dump({
            "defaults": {"workspace": "ws", "namespace": USER, "publish": True, "eval": False,
                         "calib_samples": 4, "calib_seq_len": 64},
            "models": [{"source": "models/tiny", "name": "tiny", "gguf": {"types": ["Q8_0"]},
                        "publish": {"repos": {"gguf": repo}}}]}), encoding="utf-8")

    def publish_step() -> dict[str, Any]:
        proc = qk("run", str(recipe), "--dry-run", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(s for s in json.loads(proc.stdout)["models"][0]["steps"] if s["step"].startswith("publish"))

    write("tiny-first")
    run = qk("run", str(recipe), "--json", cwd=tmp_path, hub=hub)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{USER}/tiny-first" in hub.repos
    assert publish_step()["status"] == "done"
    write("tiny-renamed")
    step = publish_step()
    assert step["repo"] == f"{USER}/tiny-renamed" and step["status"] == "to do"
    again = qk("run", str(recipe), "--json", cwd=tmp_path, hub=hub)  # and the run does publish it
    assert again.returncode == 0, again.stderr[-3000:]
    assert "tiny-Q8_0.gguf" in hub.files(f"{USER}/tiny-renamed")
    assert publish_step()["status"] == "done"


# -- 6. the checkpoint fingerprint follows the weights ----------------------------------------------------------------
def _steps(ws: Path) -> dict[str, tuple[str, str]]:
    return {k: (v["fingerprint"], v["finished"]) for k, v in Workspace(ws).steps.items()}


def test_changed_weights_rerun_every_step_local_folder(tmp_path: Path, llama3_ckpt: Path) -> None:
    model = tmp_path / "tiny"
    shutil.copytree(llama3_ckpt, model)
    ws = tmp_path / "ws"
    first = qk("gguf", str(model), "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _steps(ws)
    assert {"gguf/convert/BF16", "gguf/imatrix", "gguf/quantize/Q8_0"} <= set(before)
    # the content hash is cached by (path, size, mtime): a rerun does not read the weights again
    cache = json.loads((Path(os.environ["QUANTKIT_CACHE"]) / "weight-hashes.json").read_text(encoding="utf-8"))
    entry = cache[str((model / "model.safetensors").resolve())]
    assert entry["sha256"] == hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
    same = qk("gguf", str(model), "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert same.returncode == 0 and _steps(ws) == before

    header = (model / "model.safetensors").read_bytes()[:4096]
    size = (model / "model.safetensors").stat().st_size
    nudge_one_weight(model)
    assert (model / "model.safetensors").stat().st_size == size
    assert (model / "model.safetensors").read_bytes()[:4096][:8] == header[:8]
    again = qk("gguf", str(model), "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    after = _steps(ws)
    assert all(after[k][0] != before[k][0] and after[k][1] != before[k][1] for k in before), (before, after)


def test_changed_weights_on_the_hub_rerun_every_step(tmp_path: Path, llama3_ckpt: Path, hub: FakeHub) -> None:
    model = tmp_path / "tiny"
    shutil.copytree(llama3_ckpt, model)
    seed_repo(hub, f"{USER}/tiny", model)
    ws = tmp_path / "ws"
    hf_home = tmp_path / "hf"
    first = qk("gguf", f"{USER}/tiny", "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path, hub=hub, HF_HOME=str(hf_home))
    assert first.returncode == 0, first.stderr[-3000:]
    before = _steps(ws)
    # the weights were identified by their blob's name (its sha256), without hashing them
    (snap,) = (hf_home / "hub").glob("models--*/snapshots/*/model.safetensors")
    assert snap.is_symlink() and snap.resolve().name == hashlib.sha256(snap.read_bytes()).hexdigest()
    cache = Path(os.environ["QUANTKIT_CACHE"]) / "weight-hashes.json"
    assert not cache.exists() or str(snap.resolve()) not in json.loads(cache.read_text(encoding="utf-8"))

    nudge_one_weight(model)  # a retrained revision with the same layout
    seed_repo(hub, f"{USER}/tiny", model)
    again = qk("gguf", f"{USER}/tiny", "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path, hub=hub, HF_HOME=str(hf_home))
    assert again.returncode == 0, again.stderr[-3000:]
    after = _steps(ws)
    assert all(after[k][0] != before[k][0] for k in before), (before, after)


# -- 7. --threads reaches torch and llama.cpp ------------------------------------------------------------------------
def test_threads_reach_torch_and_llamacpp(tmp_path: Path, llama3_ckpt: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    import torch
    from typer.testing import CliRunner

    from quantkit.backends.gguf.llamacpp import default_threads
    from quantkit.cli.app import app
    from quantkit.threads import cores

    n = 1 if cores() >= 2 else 2  # a count that differs from "every core" on any machine (one core included)
    other = 2 if n == 1 else 1  # what torch is set to before, so the assertion sees the command's setting
    monkeypatch.setenv("QUANTKIT_THREADS", "0")  # 0: every core; the variable is removed again after the test
    was = torch.get_num_threads()
    torch.set_num_threads(other)
    try:
        assert default_threads() != n
        result = CliRunner().invoke(app, ["gguf", str(llama3_ckpt), "--q8_0", *QUICK, "--threads", str(n),
                                          "-w", str(tmp_path / "ws")], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == n  # the imatrix's torch forward ran on n threads
        assert default_threads() == n  # llama.cpp's quantization and scorers
        # `quantkit eval --threads`: the bf16 reference (torch) and the GGUF scorers
        os.environ["QUANTKIT_THREADS"] = "0"
        torch.set_num_threads(other)
        result = CliRunner().invoke(app, ["eval", str(tmp_path / "ws"), "--ctx", "128", "--chunks", "2",
                                          "--threads", str(n)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == n and default_threads() == n
    finally:
        torch.set_num_threads(was)
