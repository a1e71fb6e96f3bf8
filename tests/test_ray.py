"""The Ray executor on a local Ray cluster (2 CPUs; a custom resource, ``fake_gpu``, stands in for GPUs):

- two fixture models × two formats (GGUF Q8_0, GPTQ 8-bit) come out as the local executor makes them: the same
  manifest (steps, fingerprints, checks, artifacts; timestamps aside) and byte-identical artifacts;
- one model's independent steps run side by side (two quantizations from a kept conversion both start before
  either finishes);
- a worker killed mid-step (SIGKILL of the Ray worker running the conversion) is retried by Ray and finishes only
  what was left: finished steps keep their timestamps and their files are not rewritten;
- killing the whole `quantkit run --executor ray` process tree (driver, local cluster, workers) and rerunning
  finishes the rest without redoing finished steps;
- on a cluster started with `ray start --head` and joined with `--address`, killing the driver alone stops its
  tasks (Ray's fate sharing) and the rerun finishes the rest and publishes (from the driver, which holds the token);
- a node that cannot read the driver's probe file in the workspace folder (a cluster in its own mount namespace
  with an empty file system over that folder) stops the run in one line before any work;
- a task that raises fails its model with the message (not retried); `strict` re-raises it;
- the Hub token reaches the workers but never Ray's session logs nor a process's command line;
- an address nothing answers at is one line after the connect timeout; a malformed one is one line at once;
- the plan (`--dry-run --executor ray`) says which step runs where and what each asks for.

One thread per task (``threads: 1``) in the comparison: GPTQ's bytes depend on torch's thread count (a local run
with 2 threads and one with 1 differ), and a Ray task uses as many threads as the CPUs it asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hub_server import USER, WRITE_TOKEN, FakeHub

from quantkit import console
from quantkit.backends.exl2.options import EXL2Options
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gptq.options import GPTQOptions
from quantkit.errors import QuantkitError
from quantkit.pipeline import FormatJob, Job, LocalExecutor, Resources, Settings, get_executor
from quantkit.pipeline.ray_executor import PROBE_PREFIX, RayExecutor
from quantkit.pipeline.ray_tasks import ray_options, task_plan, with_threads

QK = [sys.executable, "-m", "quantkit.cli.app"]
QUICK = Settings(calib_samples=4, calib_seq_len=64, threads=1)  # one thread: GPTQ's bytes depend on the count
GGUF = FormatJob("gguf", (GGUFOptions(types=["Q8_0"], verify=False),))
GPTQ = FormatJob("gptq", (GPTQOptions(bits=8, group_size=32),))


def local_cluster(**kw: Any) -> RayExecutor:
    return RayExecutor(num_cpus=2, resources={"fake_gpu": 1}, gpu_resource="fake_gpu", **kw)


def manifest(ws: Path) -> Any:
    """The manifest without times: when steps finished, how many seconds they took."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("finished", "seconds")}
        return [strip(v) for v in node] if isinstance(node, list) else node

    return strip(json.loads((ws / "manifest.json").read_text(encoding="utf-8")))


def finished(ws: Path) -> dict[str, str]:
    path = ws / "manifest.json"
    if not path.exists():
        return {}
    try:
        return {k: v["finished"] for k, v in json.loads(path.read_text(encoding="utf-8"))["steps"].items()}
    except (json.JSONDecodeError, KeyError):
        return {}


def artifact_hashes(ws: Path) -> dict[str, str]:
    """sha256 of every artifact file (logs, the lock and the manifest aside)."""
    out = {}
    for p in sorted(ws.rglob("*")):
        rel = p.relative_to(ws)
        if p.is_file() and rel.parts[0] in ("gguf", "gptq") and "logs" not in rel.parts:
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def lock_holder(ws: Path) -> int | None:
    """The PID in the workspace lock, while that process is alive (the lock holder writes it after taking it)."""
    try:
        pid = int((ws / ".quantkit.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def wait_until_converted(proc: subprocess.Popen[str], ws: Path) -> None:
    """Until the run `proc` has converted one of the models a and b (it is then mid-run)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any("gguf/convert/BF16" in finished(ws / m) for m in ("a", "b")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""


def task_pids(text: str) -> list[int]:
    """Ray workers running a task whose name (quantkit's: ``quantkit <model> <step key>``) contains `text`: Ray
    shows it as the worker's process title."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "quantkit" in cmd and text in cmd and cmd.startswith("ray::"):
                out.append(int(entry.name))
    return out


def session_pids(sid: int) -> list[int]:
    """Every live process of session `sid` (the `quantkit run` started in a new session and all it started)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def test_plan_says_which_task_runs_which_steps_and_what_it_asks(tmp_path: Path, llama3_ckpt: Path) -> None:
    exl2 = FormatJob("exl2", (EXL2Options(bits=[4.0]),))
    job = Job(source=str(llama3_ckpt), formats=(GGUF, exl2, GPTQ), settings=Settings(threads=3),
              workspace_root=tmp_path / "ws")
    rows = {r["step"]: r for r in task_plan([job], gpu_resource="fake_gpu")}
    assert rows["model/resolve"]["asks"] == "the driver" and rows["model/resolve"]["ray"] == {}
    assert rows["gguf/convert/BF16"]["ray"] == {"num_cpus": 3}  # the job's threads are its CPU request
    assert rows["gguf/quantize/Q8_0"]["after"] == ["gguf/convert/BF16", "gguf/imatrix"]  # each when its inputs are
    assert rows["exl2/measure"]["ray"] == {"num_cpus": 3, "resources": {"fake_gpu": 1.0}}
    assert rows["exl2/quantize/4.0bpw"]["asks"] == "3 CPU, 1 fake_gpu"
    assert rows["gptq/quantize/8bit-g32"]["ray"]["resources"] == {"fake_gpu": 1.0}
    real = {r["step"]: r for r in task_plan([job])}
    assert real["exl2/measure"]["ray"] == {"num_cpus": 3, "num_gpus": 1.0}  # a real cluster's GPUs
    assert not list((tmp_path / "ws").glob("*/manifest.json")), "a plan writes nothing"


def test_requests_no_node_could_meet_are_fitted_to_the_cluster() -> None:
    largest = {"CPU": 8.0, "GPU": 0.0, "memory": 16 * 2**30}
    opts, notes = ray_options(Resources(cpus=32, gpus=1, memory=64 * 2**30), None, {"CPU": 16.0}, largest)
    assert opts == {"num_cpus": 8.0} and len(notes) == 3  # GPU dropped: EXL2 then refuses on the worker as here
    assert "the cluster has none" in notes[1]
    opts, notes = ray_options(Resources(cpus=2, gpus=1), "fake_gpu", {"fake_gpu": 2.0},
                              {"CPU": 8.0, "fake_gpu": 2.0, "memory": 0.0})
    assert opts == {"num_cpus": 2, "resources": {"fake_gpu": 1}} and notes == []
    # a job's tasks use its threads when set, else the most CPUs any of its steps asks for
    job = Job(source="x", formats=(GGUF,), settings=Settings(threads=8))
    assert with_threads(job, []).settings.threads == 8
    from quantkit.steps import Step

    steps = [Step("a/b", "b", "b", resources=Resources(cpus=2)), Step("a/c", "c", "c")]
    assert with_threads(replace(job, settings=Settings()), steps).settings.threads == 2


def test_dry_run_with_the_ray_executor_shows_the_tasks(tmp_path: Path, llama3_ckpt: Path) -> None:
    recipe = write_recipe(tmp_path, {"a": llama3_ckpt})
    env = {**os.environ, "QUANTKIT_RAY_GPU_RESOURCE": "fake_gpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*QK, "run", str(recipe), "--dry-run", "--executor", "ray", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = {t["task"]: t["asks"] for t in json.loads(proc.stdout)["tasks"]}
    assert tasks["a model/resolve"] == "the driver" and tasks["a gguf/convert/BF16"] == "1 CPU"
    assert tasks["a gptq/quantize/8bit-g32"] == "1 CPU, 1 fake_gpu"
    assert not (tmp_path / "ws").exists(), "a dry run starts nothing and writes nothing"


@pytest.mark.slow
def test_an_error_is_a_failure_not_a_crash_to_retry(tmp_path: Path, llama3_ckpt: Path) -> None:
    """A task that raises (here: a calibration file that is not there) fails its model with the message (Ray is
    told not to retry exceptions: only a dead worker is retried); the other model still runs; a one-model command
    (`strict`) gets the error itself. A cluster the caller is connected to already is used and left running."""
    bad = Job(source=str(llama3_ckpt), formats=(GGUF,), workspace_root=tmp_path / "ws", name="bad",
              settings=Settings(calibration=str(tmp_path / "missing.txt"), calib_samples=4, calib_seq_len=64))
    good = Job(source=str(llama3_ckpt), formats=(GGUF,), settings=QUICK, workspace_root=tmp_path / "ws")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        first, second = RayExecutor().run([bad, good], keep_going=True)
        assert ray.is_initialized()
        assert first.failed and first.rows[0]["status"] == "failed"
        assert "missing.txt does not exist" in first.rows[0]["note"], first.rows
        assert not second.failed and {r["quant"] for r in second.rows} == {"BF16", "Q8_0"}
        with pytest.raises(QuantkitError, match="missing.txt does not exist"):
            RayExecutor().run([bad], strict=True)
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_makes_what_the_local_executor_makes(tmp_path: Path, llama3_ckpt: Path, qwen2_ckpt: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def jobs(root: Path) -> list[Job]:
        return [Job(source=str(ckpt), formats=(GGUF, GPTQ), settings=QUICK, workspace_root=root)
                for ckpt in (llama3_ckpt, qwen2_ckpt)]

    local = LocalExecutor().run(jobs(tmp_path / "local"))
    console.configure(quiet=False)  # the progress lines are shown
    started = time.monotonic()
    remote = get_executor("ray", num_cpus=2, resources={"fake_gpu": 1}, gpu_resource="fake_gpu").run(
        jobs(tmp_path / "ray"))
    wall = time.monotonic() - started
    err = capsys.readouterr().err
    assert not ray.is_initialized(), "the local cluster started for the run is shut down after it"
    assert [r.rows for r in remote] == [r.rows for r in local]
    assert not any(r.failed for r in remote)
    for name in ("tiny-llama3", "tiny-qwen2"):
        a, b = tmp_path / "local" / name, tmp_path / "ray" / name
        assert manifest(b) == manifest(a), name
        hashes = artifact_hashes(b)
        assert hashes == artifact_hashes(a) and len(hashes) >= 4, name  # BF16, Q8_0, imatrix, GPTQ files
        # progress: one line as each step's task starts (with what it asked for) and as it finishes
        assert f"{name} gptq/quantize/8bit-g32: started (1 CPU, 1 fake_gpu)" in err, err
        assert f"{name} gguf/convert/BF16: done" in err, err
    assert not list((tmp_path / "ray").glob(f"{PROBE_PREFIX}*")), "the storage probe is removed"
    print(f"ray executor: {wall:.1f} s")


@pytest.mark.slow
def test_a_worker_killed_mid_step_is_retried_and_redoes_nothing_finished(tmp_path: Path, llama3_ckpt: Path) -> None:
    ws = tmp_path / "ws" / "tiny-llama3"
    types = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M"]
    job = Job(source=str(llama3_ckpt), formats=(FormatJob("gguf", (GGUFOptions(types=types, verify=False),)),),
              settings=Settings(calib_samples=16, calib_seq_len=128, threads=1), workspace_root=tmp_path / "ws")
    steps = {"model/resolve", "gguf/convert/BF16", "model/calibrate", "gguf/imatrix",
             *(f"gguf/quantize/{t}" for t in types)}
    seen: dict[str, Any] = {}

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = finished(ws)
            pids = task_pids("gguf/convert/BF16")
            # the importance matrix is done and the one pass that converts and quantizes is under way
            if pids and "gguf/imatrix" in done and "gguf/convert/BF16" not in done:
                seen.update(pid=pids[0], done=done, mtime=(ws / "gguf" / "imatrix.gguf").stat().st_mtime_ns)
                os.kill(pids[0], signal.SIGKILL)  # the Ray worker running the step
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer)
    thread.start()
    result = local_cluster().run([job])[0]
    thread.join()
    assert seen, "the worker was never caught mid-run"
    assert not result.failed, result.rows  # Ray ran the task again
    now = finished(ws)
    assert set(now) == steps != set(seen["done"])  # what was left when it died is done now
    assert {k: now[k] for k in seen["done"]} == seen["done"]  # finished steps kept their timestamps...
    assert (ws / "gguf" / "imatrix.gguf").stat().st_mtime_ns == seen["mtime"]  # ...and were not rewritten
    assert not task_pids("gguf/convert/BF16") and not (ws / ".staging").exists()
    assert sorted(r["quant"] for r in result.rows) == sorted(["BF16", *types])


@pytest.mark.slow
def test_one_models_independent_steps_run_side_by_side(tmp_path: Path, llama3_ckpt: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """With the conversion kept, two more types are two independent steps: both start before either is done."""
    def job(types: list[str]) -> Job:
        return Job(source=str(llama3_ckpt), settings=QUICK, workspace_root=tmp_path / "ws",
                   formats=(FormatJob("gguf", (GGUFOptions(types=types, imatrix=False, verify=False),)),))

    LocalExecutor().run([job(["Q8_0"])])
    console.configure(quiet=False)
    (result,) = local_cluster().run([job(["Q8_0", "Q6_K", "Q4_0"])])
    assert not result.failed
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "gguf/quantize/" in ln]
    first_done = next(i for i, ln in enumerate(lines) if ": done" in ln)
    started = {ln.split()[2].rstrip(":") for ln in lines[:first_done] if "started" in ln}
    assert started == {"gguf/quantize/Q6_K", "gguf/quantize/Q4_0"}, lines


@pytest.mark.slow
def test_the_token_never_reaches_rays_logs_or_command_lines(tmp_path: Path, llama3_ckpt: Path) -> None:
    """The Hub token goes to each task as an argument: the workers have it (a Hub download there would need it),
    but no file of Ray's session folder and no process's command line or environment file shows it."""
    token = "hf_" + "Planted" + "Token0123456789abcdef"
    job = Job(source=str(llama3_ckpt), formats=(GGUF,), settings=QUICK, workspace_root=tmp_path / "ws")
    seen_in_ps: list[str] = []

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stop.is_set():
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        if token.encode() in (entry / "cmdline").read_bytes():
                            seen_in_ps.append(entry.name)
            time.sleep(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=watch)
    os.environ["HF_TOKEN"] = token
    try:
        watcher.start()
        (result,) = local_cluster().run([job])
    finally:
        stop.set()
        watcher.join()
        del os.environ["HF_TOKEN"]
    assert not result.failed, result.rows
    assert not seen_in_ps, "the token was on a command line"
    sessions = sorted(Path("/tmp/ray").glob("session_2*"), key=lambda p: p.stat().st_mtime)
    assert sessions, "no Ray session folder to look in"
    leaked = [str(f) for f in sessions[-1].rglob("*") if f.is_file() and f.stat().st_size < 200_000_000
              and token.encode() in f.read_bytes()]
    assert leaked == [], leaked


def test_a_bad_ray_address_is_one_line(tmp_path: Path, llama3_ckpt: Path) -> None:
    recipe = write_recipe(tmp_path, {"a": llama3_ckpt}, gptq=False)
    base = [*QK, "run", str(recipe), "--executor", "ray"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    proc = subprocess.run([*base, "--address", "127.0.0.1:1", "--connect-timeout", "2"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in lines[0] and time.monotonic() - started < 60
    bad = subprocess.run([*base, "--address", "not an address"], cwd=tmp_path, capture_output=True, text=True,
                         env=env, timeout=120)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "is not a Ray cluster address" in lines[0], bad.stderr
    assert not (tmp_path / "ws").exists()


@pytest.mark.slow
def test_killing_the_whole_run_then_rerunning_finishes_only_the_rest(tmp_path: Path, llama3_ckpt: Path,
                                                                      qwen2_ckpt: Path) -> None:
    recipe = write_recipe(tmp_path, {"a": llama3_ckpt, "b": qwen2_ckpt}, gptq=False)
    cmd = [*QK, "run", str(recipe), "--executor", "ray", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    ws = tmp_path / "ws"
    try:
        wait_until_converted(proc, ws)
    finally:
        for pid in session_pids(proc.pid):  # the driver, its local cluster and the workers
            os.kill(pid, signal.SIGKILL)
        proc.wait()
    for _ in range(100):
        if not session_pids(proc.pid):
            break
        time.sleep(0.1)
    assert not session_pids(proc.pid)
    before = {m: finished(ws / m) for m in ("a", "b")}  # what was recorded when everything died
    assert any(before.values()) and not all("gguf/quantize/Q8_0" in v for v in before.values()), before  # mid-run
    mtimes = {p: p.stat().st_mtime_ns for p in ws.glob("*/gguf/*.gguf")}
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    after = {m: finished(ws / m) for m in ("a", "b")}
    for m in after:  # every step of both models is done now
        assert {"gguf/convert/BF16", "gguf/imatrix", "gguf/quantize/Q8_0"} <= set(after[m]), after
    for m, steps in before.items():
        assert {k: after[m][k] for k in steps} == steps  # finished steps were not run again
    for p, mtime in mtimes.items():
        if p.name.endswith("-BF16.gguf") and "gguf/convert/BF16" in before[p.parent.parent.name]:
            assert p.stat().st_mtime_ns == mtime, p
    rows = json.loads(again.stdout)["rows"]
    assert {(r["model"], r["quant"], r["status"]) for r in rows} == {
        (m, q, "ok") for m in ("a", "b") for q in ("BF16", "Q8_0")}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub.running() as server:
        yield server


@contextlib.contextmanager
def head_node(tmp_path: Path, hidden: Path | None = None) -> Iterator[str]:
    """A Ray cluster started as a user starts one (`ray start --head`, 2 CPUs, 1 fake_gpu); its address. With
    `hidden`, the cluster runs in its own mount namespace where an empty file system is mounted over that folder:
    a node that does not see the driver's storage."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port), "--num-cpus", "2",
           "--resources", '{"fake_gpu": 1}', "--include-dashboard", "false", "--disable-usage-stats", "--block"]
    if hidden is not None:
        hidden.mkdir(parents=True, exist_ok=True)
        cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs none "$0" && exec "$@"',
               str(hidden), *cmd]
    log = tmp_path / "ray-head.log"
    with open(log, "w", encoding="utf-8") as out:
        head = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log.read_text(encoding="utf-8", errors="replace"):
            assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        for pid in session_pids(head.pid):  # the head and every process it started
            os.kill(pid, signal.SIGKILL)
        head.wait()
        current = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would remove: ray.init() must not find it
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[str]:
    with head_node(tmp_path) as address:
        yield address


@pytest.mark.slow
def test_a_node_that_does_not_see_the_workspace_stops_the_run_before_work(tmp_path: Path,
                                                                          llama3_ckpt: Path) -> None:
    """The driver writes a probe file in the workspace folder; a node that cannot read it (here: the cluster runs
    where an empty file system hides that folder) stops the run in one line, before any work."""
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no mount namespace here (unshare -m needs root): cannot hide the workspace from a node")
    recipe = write_recipe(tmp_path, {"a": llama3_ckpt}, gptq=False)
    recipe.write_text(recipe.read_text().replace("workspace: ws", "workspace: shared/ws"), encoding="utf-8")
    with head_node(tmp_path, hidden=tmp_path / "shared") as address:
        proc = subprocess.run([*QK, "run", str(recipe), "--executor", "ray", "--address", address], cwd=tmp_path,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: node "), proc.stderr  # one line, naming the node
    assert f"cannot read {tmp_path / 'shared' / 'ws'}" in lines[0] and "shared file system" in lines[0]
    assert os.listdir(tmp_path / "shared" / "ws") == [], "no work, and the probe file is removed"


@pytest.mark.slow
def test_a_run_on_a_cluster_whose_driver_dies_resumes(tmp_path: Path, llama3_ckpt: Path, qwen2_ckpt: Path,
                                                     ray_head: str, hub: FakeHub) -> None:
    """`--address` of a cluster started with `ray start --head`: when the driver dies, Ray stops its tasks (no
    writer is left in the workspaces) and the same command finishes only what was left, publishing included (the
    driver publishes with the Hub settings of its shell; the cluster was started without them)."""
    recipe = write_recipe(tmp_path, {"a": llama3_ckpt, "b": qwen2_ckpt}, gptq=False, publish=True)
    cmd = [*QK, "run", str(recipe), "--executor", "ray", "--address", ray_head, "--json"]
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
           "HF_TOKEN": WRITE_TOKEN}
    driver = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    ws = tmp_path / "ws"
    try:
        wait_until_converted(driver, ws)
        holders = {m: lock_holder(ws / m) for m in ("a", "b")}
    finally:
        driver.kill()  # the driver alone: the cluster lives on
        driver.wait()
    for _ in range(300):
        if not any(lock_holder(ws / m) for m in ("a", "b")) and not task_pids("quantkit "):
            break
        time.sleep(0.1)
    assert set(holders.values()) == {driver.pid}, holders  # the driver is the one writer of every workspace
    assert not any(lock_holder(ws / m) for m in ("a", "b")) and not task_pids("quantkit "), "a task lived on"
    before = {m: finished(ws / m) for m in ("a", "b")}
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for m, steps in before.items():
        after = finished(ws / m)
        assert {"gguf/convert/BF16", "gguf/imatrix", "gguf/quantize/Q8_0"} <= set(after), after
        assert {k: after[k] for k in steps} == steps  # finished steps were not run again
        assert {f"{m}-Q8_0.gguf", "README.md"} <= set(hub.files(f"{USER}/{m}-GGUF"))
    assert {r["url"] for r in json.loads(again.stdout)["rows"]} == {f"{hub.url}/{USER}/{m}-GGUF" for m in "ab"}


def write_recipe(folder: Path, models: dict[str, Path], *, gptq: bool = True, publish: bool = False) -> Path:
    """A recipe of fixture models (linked under ``folder/models``), GGUF Q8_0 (and GPTQ 8-bit), no evaluation;
    published under the fake Hub's user with `publish`."""
    (folder / "models").mkdir(parents=True, exist_ok=True)
    entries = []
    for name, ckpt in models.items():
        (folder / "models" / name).symlink_to(ckpt, target_is_directory=True)
        # what is published must have been verified
        entry: dict[str, Any] = {"source": f"models/{name}", "name": name,
                                 "gguf": {"types": ["Q8_0"], "verify": publish}}
        if gptq:
            entry["gptq"] = {"bits": 8, "group_size": 32}
        entries.append(entry)
    recipe = {"defaults": {"calib_samples": 4, "calib_seq_len": 64, "threads": 1, "eval": False, "workspace": "ws",
                           "publish": publish, "namespace": USER}, "models": entries}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path
