"""Issue 17: interrupts, concurrent runs, stale locks, changed outputs, secrets and machine paths in published files,
incomplete checkpoints, full disks, bad inputs. Real processes, real llama.cpp, a real tmpfs where mounting one
is allowed, the loopback Hub of tests/hub_server.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import USER, FakeHub
from test_card import MODEL, build_workspace
from test_cli import QK, one_line_error, qk
from test_publish import GGUF_REPO, SECRET, error_line, push
from test_publish import hub as hub  # noqa: F401 - the fixture

from quantkit.errors import QuantkitError
from quantkit.workspace import Workspace

ROOT = Path(__file__).resolve().parent.parent
PROSE = ROOT / "calibration" / "ru-mix" / "prose.txt"


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "NO_COLOR": "1", **extra}


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*QK, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def wait_for(what: Callable[[], Any], timeout: float = 300, proc: subprocess.Popen[str] | None = None) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended first (rc {proc.returncode}): {proc.communicate()[1]}")
        time.sleep(0.005)
    raise AssertionError("timed out")


def lock_pid(ws: Path) -> int | None:
    try:
        return int((ws / ".quantkit.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def last_line(err: str) -> list[str]:
    """stderr without warnings."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]


def manifest(ws: Path) -> dict[str, Any]:
    return json.loads((ws / "manifest.json").read_text(encoding="utf-8"))


def assert_recorded_outputs_intact(ws: Path) -> None:
    """Every output the manifest records is there with its size and hash; every GGUF parses and loads."""
    from quantkit.backends.gguf.convert.check import check_gguf
    from quantkit.backends.gguf.llamacpp import LlamaModel
    from quantkit.workspace import output_check

    data = manifest(ws)
    for step, rec in data["steps"].items():
        for rel in rec["outputs"]:
            assert output_check(ws / rel) == rec["checks"][rel], (step, rel)
            if rel.endswith(".gguf"):
                check_gguf(ws / rel)
                if "imatrix" not in rel:
                    LlamaModel(ws / rel).close()


# -- 1. one writer per workspace; stale locks; per-process temporary names; checked outputs ---------------------------
def test_two_runs_one_workspace(llama3_ckpt: Path, tmp_path: Path) -> None:
    ws = tmp_path / "w"
    calib = tmp_path / "private" / "calib.txt"
    calib.parent.mkdir()
    calib.write_text(PROSE.read_text(encoding="utf-8"), encoding="utf-8")
    args = ["gguf", str(llama3_ckpt), "--q4_k_m", "--calibration", str(calib), "--calib-samples", "4",
            "--calib-seq-len", "64", "-w", str(ws)]
    first = start(*args)
    wait_for(lambda: lock_pid(ws) == first.pid, proc=first)
    second = qk(*args)
    assert first.poll() is None, "the first run ended before the second started: the race was not tested"
    one_line_error(second, f"another quantkit run (PID {first.pid}) is using the workspace {ws}")
    assert second.returncode == 2
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert_recorded_outputs_intact(ws)
    assert not list(ws.rglob("*.partial"))
    # the importance matrix names the calibration file, not where it lies on this machine
    from quantkit.backends.gguf.convert.check import metadata_strings

    strings = dict(metadata_strings(ws / "gguf" / "imatrix.gguf"))
    assert strings.get("imatrix.datasets") == "calib.txt", strings
    assert not any(str(tmp_path) in v for v in strings.values())


def test_killed_run_leaves_a_stale_lock_that_is_taken_over(llama3_ckpt: Path, tmp_path: Path) -> None:
    ws = tmp_path / "w"
    args = ["gguf", str(llama3_ckpt), "--q8_0", "--no-imatrix", "--no-verify", "-w", str(ws)]
    run = start(*args)
    wait_for(lambda: lock_pid(ws) == run.pid, proc=run)
    time.sleep(0.3)
    run.kill()
    run.wait()
    # what a step killed mid-write leaves behind: work files named after the dead process
    (ws / "gguf").mkdir(exist_ok=True)
    (ws / "gguf" / f".{MODEL}-Q8_0.gguf.{run.pid}.partial").mkdir()
    (ws / "gguf" / f".{MODEL}-Q8_0.gguf.{run.pid}.partial" / "x.gguf").write_bytes(b"GGUF")
    assert lock_pid(ws) == run.pid
    again = qk(*args, "--json")
    assert again.returncode == 0, again.stderr
    assert not list(ws.rglob("*.partial"))
    assert_recorded_outputs_intact(ws)


def test_changed_or_missing_outputs_rerun_their_step(llama3_ckpt: Path, tmp_path: Path) -> None:
    ws = tmp_path / "w"
    args = ["gguf", str(llama3_ckpt), "--q4_k_m", "--no-imatrix", "--no-verify", "-w", str(ws), "--json"]
    assert qk(*args).returncode == 0
    q4 = ws / "gguf" / "tiny-llama3-Q4_K_M.gguf"
    bf16 = ws / "gguf" / "tiny-llama3-BF16.gguf"
    good_q4, good_bf16 = q4.read_bytes(), bf16.read_bytes()

    data = bytearray(good_q4)
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    q4.write_bytes(bytes(data))
    bf16.write_bytes(good_bf16[:24])  # the 24-byte "finished" BF16 of the issue
    run = qk(*args)
    assert run.returncode == 0, run.stderr
    assert bf16.read_bytes() == good_bf16 and q4.read_bytes() == good_q4

    q4.unlink()
    assert qk(*args).returncode == 0 and q4.read_bytes() == good_q4
    assert_recorded_outputs_intact(ws)


def test_incomplete_gguf_is_never_recorded(tmp_path: Path) -> None:
    import quantkit.backends.gguf.backend  # noqa: F401 - registers the GGUF output check

    ws = Workspace(tmp_path / "w")
    stub = ws.dir("gguf") / "m-BF16.gguf"
    stub.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 16)  # 24 bytes
    with pytest.raises(QuantkitError, match="incomplete GGUF|truncated"):
        ws.record_step("gguf/convert/BF16", "fp", [stub])
    assert "gguf/convert/BF16" not in Workspace(ws.root).steps
    from quantkit.lock import release

    release(ws.root)


def test_temporary_names_belong_to_one_process(tmp_path: Path) -> None:
    from quantkit.workspace import atomic_path, staging_dir

    with atomic_path(tmp_path / "manifest.json") as tmp:
        assert tmp.name == f".manifest.json.{os.getpid()}.partial"
        tmp.write_text("{}")
    with staging_dir(tmp_path / "m.gguf") as stage:
        assert stage.work.name == f".m.gguf.{os.getpid()}.partial"


# -- 2. interrupts ----------------------------------------------------------------------------------------------------
BIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
           num_key_value_heads=4, head_dim=128)


@pytest.fixture(scope="module")
def big_ckpt(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 186M-parameter Llama-3 checkpoint (the tiny fixture's tokenizer): big enough that quantizing it
    takes seconds, so a signal can land inside llama.cpp."""
    import shutil

    import torch
    from safetensors.torch import save_file

    root = Path(os.environ.get("QUANTKIT_TEST_CACHE") or tmp_path_factory.mktemp("big"))
    out = root / "big-llama3"
    if (out / "model.safetensors").exists():
        return out
    tmp = root / "big-llama3.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(llama3_ckpt / f, tmp)
    config = json.loads((llama3_ckpt / "config.json").read_text()) | BIG
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    h, f, v, kv = BIG["hidden_size"], BIG["intermediate_size"], config["vocab_size"], 4 * 128
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for i in range(BIG["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                    p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                    p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                    p + "mlp.down_proj.weight": rnd(h, f),
                    p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    tmp.rename(out)
    return out


def _in_staging(ws: Path, text: str, min_size: int) -> list[Path]:
    """Files a step is writing (under the workspace's staging folder) whose name holds `text`."""
    try:
        return [f for f in (ws / ".staging").rglob(f"*{text}*") if f.is_file() and f.stat().st_size >= min_size]
    except OSError:  # the folder went away between two looks
        return []


def _quant_partial(ws: Path, quant: str, min_size: int) -> list[Path]:
    return _in_staging(ws, quant, min_size)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_quantization(big_ckpt: Path, tmp_path: Path, sig: int) -> None:
    """SIGINT while the one pass converts and quantizes (worker threads); SIGTERM while llama.cpp quantizes the
    converted file (a C call), which is how a type is made when the conversion is already there."""
    ws = tmp_path / "signal-ws"
    if sig == signal.SIGTERM:
        done = qk("gguf", str(big_ckpt), "--types", "bf16", "--no-imatrix", "--no-verify", "-q", "-w", str(ws))
        assert done.returncode == 0, done.stderr
    run = start("gguf", str(big_ckpt), "--types", "iq4_xs", "--no-imatrix", "--no-verify", "-t", "1", "-w", str(ws))
    wait_for(lambda: _quant_partial(ws, "IQ4_XS", 1 << 20), proc=run)
    run.send_signal(sig)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 128 + sig, err
    lines = last_line(err)
    assert len(lines) == 1, err
    assert ("interrupted" if sig == signal.SIGINT else "stopped by SIGTERM") in lines[0]
    assert "run the same command to resume" in lines[0]
    assert "Traceback" not in err and "Exception ignored" not in err
    assert not list((ws / "gguf").glob("*IQ4_XS*")), "a final-named file was left"
    assert not (ws / ".staging").exists(), "a staging folder was left"
    assert "gguf/quantize/IQ4_XS" not in manifest(ws)["steps"]


def test_sigint_during_conversion(big_ckpt: Path, tmp_path: Path) -> None:
    ws = tmp_path / "w"
    run = start("gguf", str(big_ckpt), "--q8_0", "--no-imatrix", "--no-verify", "-w", str(ws))
    wait_for(lambda: _in_staging(ws, "BF16", 20 << 20), proc=run)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 130, err
    assert last_line(err) == ["interrupted: finished steps are kept, unfinished files removed; run the same command "
                              "to resume"], err
    assert not (ws / "gguf").exists() or not list((ws / "gguf").iterdir())
    assert not (ws / ".staging").exists()
    assert "gguf/convert/BF16" not in manifest(ws)["steps"]


def _catches_sigterm(pid: int) -> bool:
    """quantkit's entry has run (it catches SIGTERM, which Python itself leaves alone): /proc's caught-signal mask."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(mask & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.8])
def test_sigint_while_starting_is_one_line(llama3_ckpt: Path, tmp_path: Path, delay: float) -> None:
    """An interrupt while the commands and backends are imported (the first second) is one line and exit 130,
    never Python's traceback. (Before the interpreter reaches quantkit's first line, about
    50 ms, an interrupt is Python's own.)"""
    run = start("gguf", str(llama3_ckpt), "--q4_k_m", "-w", str(tmp_path / "ws"))
    wait_for(lambda: _catches_sigterm(run.pid), timeout=60, proc=run)
    time.sleep(delay)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert len(last_line(err)) == 1 and "interrupted" in err and "Traceback" not in err, err


def test_interrupt_inside_a_finalizer_is_not_lost(tmp_path: Path) -> None:
    """Python swallows an exception raised in ``__del__`` ("Exception ignored"): an interrupt handled there is
    delivered again once the finalizer returns, so the run still stops with 130 instead of finishing with 0."""
    code = (
        "import gc, time\n"
        "from quantkit import interrupts\n"
        "interrupts.install()\n"
        "class Slow:\n"
        "    def __del__(self):\n"
        "        print('in del', flush=True)\n"
        "        time.sleep(1.0)\n"
        "try:\n"
        "    Slow()\n"
        "    gc.collect()\n"
        "    time.sleep(2.0)\n"
        "except interrupts.Interrupted:\n"
        "    raise SystemExit(130)\n"
        "raise SystemExit(0)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout is not None and run.stdout.readline().strip() == "in del"
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Exception ignored" not in err, err


# -- 3. secrets and machine paths, checked after the card is written ------------------------------------------------
def _no_upload(hub: FakeHub) -> None:
    assert not [r for r in hub.requests if r.method == "PUT" or "/commit/" in r.path or "/preupload/" in r.path]


def test_token_in_the_original_card_is_refused(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    with open(ws.root / "source-README.md", "a", encoding="utf-8") as f:
        f.write(f"\n\nDownload with `HF_TOKEN={SECRET} hf download ...`\n")
    run = push(hub, ws.root / "gguf", token=SECRET)
    assert run.returncode == 2
    assert "README.md contains your Hugging Face token" in error_line(run)
    assert SECRET not in run.stderr + run.stdout
    _no_upload(hub)
    assert GGUF_REPO not in hub.repos


def test_home_path_in_gguf_metadata_is_refused(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    import gguf
    import numpy as np

    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    target = ws.root / "gguf" / f"{MODEL}-Q8_0.gguf"
    writer = gguf.GGUFWriter(target, "llama")
    writer.add_string("general.source.url", f"{Path.home()}/models/{MODEL}")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = push(hub, ws.root / "gguf")
    assert run.returncode == 2
    line = error_line(run)
    assert f"{MODEL}-Q8_0.gguf (metadata general.source.url) mentions the local path {Path.home()}" in line, line
    _no_upload(hub)


def test_workspace_path_in_a_text_file_is_refused(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    ws = build_workspace(tmp_path / "ws", "exl2", gate_fail=False)
    (ws.root / "exl2" / "4.0bpw" / "config.json").write_text(
        json.dumps({"quantization_config": {"offload": str(ws.root / "exl2" / "work")}}), encoding="utf-8")
    run = push(hub, ws.root / "exl2")
    assert run.returncode == 2 and "config.json mentions the local path" in error_line(run)
    _no_upload(hub)


def test_card_command_has_no_machine_paths(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    from quantkit.card import render_card

    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    for entry in ws.artifacts.values():
        entry["command"] = (f"quantkit gguf {Path.home()}/.cache/huggingface/hub/models--x/snapshots/abc --q4_k_m "
                            f"--calibration {Path.home()}/private/calib.jsonl --workspace={tmp_path}/w")
    ws.save()
    card = render_card(ws, "gguf")
    assert str(Path.home()) not in card and str(tmp_path) not in card
    assert "--calibration calib.jsonl --workspace=w" in card
    run = push(hub, ws.root / "gguf", "--json")
    assert run.returncode == 0, run.stderr
    assert str(Path.home()).encode() not in hub.files(GGUF_REPO)["README.md"]


def test_public_command() -> None:
    from quantkit.scan import public_command

    assert public_command(["quantkit", "gguf", "/home/me/models/T-lite", "--imatrix", "~/im.gguf", "-w", "./q/x",
                           "--types", "q4_k_m"], {"/home/me/models/T-lite": "org/T-lite"}) == \
        "quantkit gguf org/T-lite --imatrix im.gguf -w x --types q4_k_m"


# -- 4. verification failures stay home -------------------------------------------------------------------------------
def test_push_refuses_artifacts_that_failed_verification(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    bad = next(k for k, e in ws.artifacts.items() if e["quant"] == "Q4_K_M")
    ws.artifacts[bad]["verify"] = {"passed": False, "error": "llama.cpp could not load it"}
    ws.save()
    mixed = push(hub, ws.root / "gguf", "--json")
    assert mixed.returncode == 0, mixed.stderr
    assert [r["quant"] for r in json.loads(mixed.stdout)["refused"]] == ["Q4_K_M"]
    assert "not publishing Q4_K_M: it failed verification" in mixed.stderr
    assert f"{MODEL}-Q4_K_M.gguf" not in hub.files(GGUF_REPO)

    only = build_workspace(tmp_path / "ws2", gate_fail=False)
    for key in [k for k in only.artifacts if k != bad]:
        del only.artifacts[key]
    only.artifacts[bad]["verify"] = {"passed": False, "error": "llama.cpp could not load it"}
    only.save()
    refused = push(hub, only.root / "gguf", "--repo", "only-bad")
    assert refused.returncode == 2
    assert "failed verification" in error_line(refused) and "--force" in error_line(refused)
    assert f"{USER}/only-bad" not in hub.repos
    forced = push(hub, only.root / "gguf", "--repo", "only-bad", "--force")
    assert forced.returncode == 0, forced.stderr
    assert f"{MODEL}-Q4_K_M.gguf" in hub.files(f"{USER}/only-bad")


# -- 5. incomplete sharded checkpoints --------------------------------------------------------------------------------
def _sharded(src: Path, dest: Path, weight_map_edit: Callable[[dict[str, str]], None]) -> Path:
    import shutil

    from quantkit.safetensors_io import read_header

    shutil.copytree(src, dest)
    shard = "model-00001-of-00002.safetensors"
    (dest / "model.safetensors").rename(dest / shard)
    names = read_header(dest / shard)[0]
    weight_map = dict.fromkeys(names, shard)
    weight_map_edit(weight_map)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def test_missing_shard_refused_before_conversion(llama3_ckpt: Path, tmp_path: Path) -> None:
    missing = _sharded(llama3_ckpt, tmp_path / "missing", lambda m: m.update(
        {"model.layers.0.self_attn.v_proj.weight": "model-00002-of-00002.safetensors"}))
    ws = tmp_path / "w"
    one_line_error(qk("gguf", str(missing), "--q4_k_m", "-w", str(ws)),
                   "incomplete checkpoint", "model-00002-of-00002.safetensors named in model.safetensors.index.json "
                   "is missing", "download the checkpoint again")
    assert not list(ws.rglob("*.gguf"))

    lacking = _sharded(llama3_ckpt, tmp_path / "lacking", lambda m: m.update(
        {"model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}))
    one_line_error(qk("gguf", str(lacking), "--q4_k_m", "-w", str(ws)),
                   "model-00001-of-00002.safetensors lacks tensor model.layers.9.mlp.up_proj.weight")
    assert not list(ws.rglob("*.gguf"))


# -- 6. full disks ----------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount tmpfs file systems of a given size (root only; skipped where mounting is not allowed)."""
    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _fill(folder: Path, leave: int) -> Path:
    """Take all but `leave` bytes of the file system under `folder` (fallocate: instant on tmpfs)."""
    import shutil

    filler = folder / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        for _ in range(50):  # the run keeps writing meanwhile
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size + max(1, shutil.disk_usage(folder).free - leave))
                break
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


FREE = r"free \d+(\.\d\d)? [KMG]?B \(free some space or pass --workspace on a larger disk\)"


def test_disk_full_during_conversion_and_quantization(big_ckpt: Path, small_disk: Callable[[int], Path]) -> None:
    import re

    # conversion and quantization in one pass: the pre-check passes (≈ 380 + 110 MB needed + margin), then
    # something else takes the disk
    disk = small_disk(560)
    ws = disk / "w"
    run = start("gguf", str(big_ckpt), "--q4_k_m", "--no-imatrix", "--no-verify", "-w", str(ws))
    wait_for(lambda: _in_staging(ws, "BF16", 50 << 20), proc=run)
    _fill(disk, 8 << 20)
    _, err = run.communicate(timeout=300)
    lines = last_line(err)
    assert run.returncode == 2 and len(lines) == 1, err
    assert re.fullmatch(rf"error: disk full at {re.escape(str(ws / 'gguf'))}: need about 4\d\d\.\d\d MB, {FREE}",
                        lines[0]), lines[0]
    assert not list((ws / "gguf").glob("*.gguf")) and not list((ws / "gguf").glob(".*"))
    assert not (ws / ".staging").exists()

    # quantization of a converted file: llama.cpp's write fails; its return code is read with the disk checked
    disk = small_disk(620)
    ws = disk / "w"
    done = qk("gguf", str(big_ckpt), "--types", "bf16", "--no-imatrix", "--no-verify", "-q", "-w", str(ws))
    assert done.returncode == 0, done.stderr
    run = start("gguf", str(big_ckpt), "--types", "iq4_xs", "--no-imatrix", "--no-verify", "-t", "1", "-w", str(ws))
    wait_for(lambda: _quant_partial(ws, "IQ4_XS", 1 << 20), proc=run)
    _fill(disk, 1 << 20)
    _, err = run.communicate(timeout=300)
    lines = last_line(err)
    assert run.returncode == 2 and len(lines) == 1, err
    assert re.fullmatch(rf"error: disk full at {re.escape(str(ws / 'gguf'))}: need about \d+\.\d\d MB, {FREE}",
                        lines[0]), lines[0]
    assert not list((ws / "gguf").glob("*IQ4_XS*"))
    assert "gguf/quantize/IQ4_XS" not in manifest(ws)["steps"]


@pytest.mark.parametrize("message", ["1048576 requested and 402928 written",
                                     "Not enough free space to write 23068672 bytes"])
def test_short_write_is_a_full_disk(tmp_path: Path, message: str) -> None:
    """numpy's ``tofile`` reports a full disk without an errno (the first text is numpy 1's, from the issue)."""
    from quantkit.workspace import DiskFull, staging_dir

    with pytest.raises(DiskFull) as err, staging_dir(tmp_path / "m.gguf", need=5_000_000):
        raise OSError(message)
    assert str(err.value).startswith(f"disk full at {tmp_path}: need about 5.00 MB, free ")
    assert not list(tmp_path.iterdir())


def test_size_bound_is_an_upper_bound(llama3_ckpt: Path, qwen2_ckpt: Path, tmp_path: Path) -> None:
    """The disk pre-check's estimate against what llama.cpp really writes, for many types (untied and tied
    embeddings; an all-ones importance matrix lets the types that need one run)."""
    import gguf
    import numpy as np

    from quantkit.backends.gguf.quantize.core import QuantizeOptions, quantize
    from quantkit.backends.gguf.quantize.sizes import quantized_size_bound

    types = ["Q2_K", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ2_XXS", "IQ3_XXS", "IQ4_XS"]
    ratios = {}
    for ckpt in (llama3_ckpt, qwen2_ckpt):
        ws = tmp_path / ckpt.name
        assert qk("gguf", str(ckpt), "--q8_0", "--no-imatrix", "--no-verify", "-w", str(ws)).returncode == 0
        bf16 = ws / "gguf" / f"{ckpt.name}-BF16.gguf"
        reader = gguf.GGUFReader(bf16)
        imatrix = {t.name: np.ones(int(t.shape[0]), np.float32) for t in reader.tensors if len(t.shape) >= 2}
        for q in types:
            out = quantize(bf16, ws / "gguf" / f"x-{q}.gguf", QuantizeOptions(q, imatrix=imatrix))
            real = sum(f.stat().st_size for f in out)
            bound = quantized_size_bound(bf16, q)
            ratios[f"{ckpt.name} {q}"] = round(bound / real, 3)
            assert bound >= real, (ckpt.name, q, bound, real)
            assert bound <= 1.35 * real, (ckpt.name, q, bound, real)  # and not too loose to be useful
    print(ratios)


# -- 7. bad inputs: one line naming the problem and what to do, before any expensive step -----------------------------
def test_bad_calibration_files(llama3_ckpt: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "list.jsonl").write_text('{"text": "привет"}\n["a", "b"]\n', encoding="utf-8")
    (bad / "norole.jsonl").write_text('{"messages": [{"content": "привет"}]}\n', encoding="utf-8")
    (bad / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet")
    (bad / "folder.txt").mkdir()
    ws = tmp_path / "w"
    for name, needle in [("list.jsonl", "list.jsonl:2 is a JSON list, not an object"),
                         ("norole.jsonl", "norole.jsonl:1: message 1 has no 'role' and 'content' strings"),
                         ("corrupt.parquet", "corrupt.parquet is not a readable parquet file"),
                         ("folder.txt", "folder.txt is a folder, not a file"),
                         ("missing.txt", "missing.txt does not exist")]:
        path = str(bad / name)
        one_line_error(qk("gguf", str(llama3_ckpt), "--q4_k_m", "--calibration", path, "-w", str(ws)), needle)
        one_line_error(qk("calib", "show", path), needle)
    assert not list(ws.rglob("*.gguf"))


def test_gguf_options_are_checked_before_conversion(llama3_ckpt: Path, tmp_path: Path) -> None:
    ws = tmp_path / "w"
    cases = [
        (["--tensor-type", "attn_v"], ["bad --tensor-type 'attn_v'", "PATTERN=TYPE"]),
        (["--tensor-type", "attn_v=q9_9"], ["--tensor-type", "unknown tensor type 'q9_9'", "q8_0"]),
        (["--output-type", "bogus"], ["bad --output-type: unknown tensor type 'bogus'"]),
        (["--embedding-type", "bogus"], ["bad --embedding-type: unknown tensor type 'bogus'"]),
        (["--imatrix", str(tmp_path / "none.gguf")], ["none.gguf does not exist"]),
        (["--types", ","], ["--types ',' names no quant type", "--types q4_k_m,q8_0"]),
        (["--calib-sample", "4"], ["no such option: --calib-sample", "did you mean --calib-samples?"]),
        (["--q4_z"], ["unknown quant type 'q4_z'", "Q4_K_M"]),
    ]
    for extra, needles in cases:
        one_line_error(qk("gguf", str(llama3_ckpt), *extra, "-w", str(ws)), *needles)
    assert not list(ws.rglob("*.gguf"))


def test_usage_errors_are_one_line() -> None:
    one_line_error(qk("gguf"), "Missing argument", "see quantkit gguf --help")
    one_line_error(qk("eval", "--bogus"), "No such option: --bogus", "see quantkit eval --help")
    one_line_error(qk("push", "x", "--private", "maybe"), "see quantkit push --help")


def test_recipe_problems_point_at_lines(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults:\n  calibration: data/missing.jsonl\nmodels:\n  - source: demo\n"
                      "    gguf: {types: [Q4_K_M, Q9_X]}\n", encoding="utf-8")
    run = qk("recipe", "validate", str(recipe))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert any(f"{recipe}:2: defaults.calibration: calibration file" in line and "missing.jsonl does not exist"
               in line for line in lines), run.stderr
    assert any(f"{recipe}:5:" in line and "unknown quant type 'Q9_X'" in line for line in lines), run.stderr
    assert len(lines) == 2, run.stderr


def test_card_and_push_arguments(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    folder = tmp_path / "cards"
    folder.mkdir()
    run = qk("card", str(ws.root / "gguf"), "--output", str(folder))
    assert run.returncode == 0, run.stderr
    assert (folder / "README.md").read_text(encoding="utf-8").startswith("---")
    one_line_error(qk("card", str(ws.root), "--format", "bogus"), "unknown format 'bogus'", "gguf")
    assert "quantkit bogus" not in qk("card", str(ws.root), "--format", "bogus").stderr

    ws.model["name"] = "Сайга Мистраль 7B (тест)"
    ws.save()
    plan = qk("push", str(ws.root / "gguf"), "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["repo"] == "<your-username>/Sayga-Mistral-7B-test-GGUF"


def test_truncated_safetensors_in_a_folder_output_is_never_recorded(llama3_ckpt: Path, tmp_path: Path) -> None:
    """A GPTQ/EXL2-style folder output is checked file by file before it is recorded."""
    import shutil

    ws = Workspace(tmp_path / "w")
    out = ws.dir("gptq", "4bit-g128")
    shutil.copy(llama3_ckpt / "config.json", out)
    data = (llama3_ckpt / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(QuantkitError, match="truncated"):
        ws.record_step("gptq:4bit-g128", "fp", [out])
    (out / "model.safetensors").write_bytes(data)
    ws.record_step("gptq:4bit-g128", "fp", [out])
    assert ws.is_done("gptq:4bit-g128", "fp")
    (out / "config.json").write_text("{}")
    assert not ws.is_done("gptq:4bit-g128", "fp")


def test_token_in_gguf_vocabulary_is_refused(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    import gguf
    import numpy as np

    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    writer = gguf.GGUFWriter(ws.root / "gguf" / f"{MODEL}-Q8_0.gguf", "llama")
    writer.add_token_list(["<s>", "/tmp", f"x{SECRET}"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run = push(hub, ws.root / "gguf", token=SECRET)
    assert run.returncode == 2 and "contains your Hugging Face token" in error_line(run)
    assert SECRET not in run.stderr + run.stdout
    _no_upload(hub)


def test_hub_names_are_ascii() -> None:
    from quantkit.hubname import hub_safe_name
    from quantkit.publish import _repo_id

    assert hub_safe_name("Сайга Мистраль 7B (тест)") == "Sayga-Mistral-7B-test"
    assert hub_safe_name("Щука/ёж") == "Shchuka-ezh"
    with pytest.raises(QuantkitError, match="not a Hub repo id"):
        _repo_id("me/Сайга", "me", None, "gguf")  # type: ignore[arg-type]


# == the second hardening round (issue 25) ===========================================================================
def _one_line(proc: subprocess.CompletedProcess[str], code: int = 2) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "unexpected failure" not in lines[0], proc.stderr
    return lines[0]


# -- 1. what is published was made and verified, byte for byte ------------------------------------------------------
def test_push_refuses_unverified_and_changed_files(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    never = build_workspace(tmp_path / "never", gate_fail=False, verified=False)
    refused = push(hub, never.root / "gguf", "--repo", "never")
    line = error_line(refused)
    assert refused.returncode == 2 and "never verified" in line and "--force" in line, line
    assert f"{USER}/never" not in hub.repos

    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    q4 = ws.root / "gguf" / f"{MODEL}-Q4_K_M.gguf"
    data = bytearray(q4.read_bytes())
    data[len(data) // 2] ^= 0xFF  # verified, then one byte flipped
    q4.write_bytes(bytes(data))
    changed = push(hub, ws.root / "gguf", "--repo", "changed")
    line = error_line(changed)
    assert changed.returncode == 2 and f"not publishing gguf/{MODEL}-Q4_K_M.gguf" in line, line
    assert "changed since it was made" in line and "--force" in line
    assert f"{USER}/changed" not in hub.repos or f"{MODEL}-Q4_K_M.gguf" not in hub.files(f"{USER}/changed")
    forced = push(hub, ws.root / "gguf", "--repo", "changed", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "although it changed since it was made" in forced.stderr and "(--force)" in forced.stderr


def test_a_run_never_publishes_an_unverified_file(llama3_ckpt: Path, tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    """`--push` with `--no-verify` (a BF16 with a wrong pre-tokenizer would have been uploaded): nothing goes up."""
    from test_publish import WRITE_TOKEN

    e = env(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_TOKEN=WRITE_TOKEN)
    run = subprocess.run([*QK, "gguf", str(llama3_ckpt), "--q8_0", "--no-imatrix", "--no-verify", "--push",
                          "--repo", "unverified", "-w", str(tmp_path / "ws")], capture_output=True, text=True, env=e)
    assert run.returncode == 2 and "never verified" in run.stderr, run.stderr[-3000:]
    assert f"{USER}/unverified" not in hub.repos


# -- 2. a tensor missing inside a checkpoint file ---------------------------------------------------------------------
def _without(src: Path, dest: Path, drop: str) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(str(dest / "model.safetensors"))
    assert drop in tensors, sorted(tensors)[:20]
    del tensors[drop]
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("imatrix", [True, False])
def test_a_tensor_missing_inside_a_file_is_refused_before_work(llama3_ckpt: Path, tmp_path: Path,
                                                               imatrix: bool) -> None:
    bad = _without(llama3_ckpt, tmp_path / "bad", "model.layers.1.self_attn.v_proj.weight")
    ws = tmp_path / "ws"
    proc = qk("gguf", str(bad), "--q8_0", *([] if imatrix else ["--no-imatrix"]), "-w", str(ws))
    line = _one_line(proc)
    assert "incomplete checkpoint" in line and "model.layers.1.self_attn.v_proj.weight" in line, line
    assert not ws.exists() or not list(ws.rglob("*.gguf"))


def test_an_expert_missing_inside_a_file_is_refused_before_work(gigachat3_ckpt: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(gigachat3_ckpt / "model.safetensors"), "pt") as f:
        expert = next(k for k in f.keys() if ".mlp.experts.3.down_proj.weight" in k)
    bad = _without(gigachat3_ckpt, tmp_path / "bad", expert)
    proc = qk("gguf", str(bad), "--q8_0", "-w", str(tmp_path / "ws"))
    line = _one_line(proc)
    assert "incomplete checkpoint" in line and expert in line, line


# -- 3. bad --workspace paths ---------------------------------------------------------------------------------------
def test_bad_workspace_paths_are_one_line(llama3_ckpt: Path, tmp_path: Path) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("x")
    cases = {afile: "is a file", afile / "below": "is a file", Path("/proc/quantkit-ws"): "cannot be created there"}
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    if mounted.returncode == 0:
        cases[ro / "ws"] = "read-only file system"
    try:
        for ws, words in cases.items():
            line = _one_line(qk("gguf", str(llama3_ckpt), "--q8_0", "-w", str(ws)))
            assert words in line and str(ws) in line, line
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# -- 4. user text is never read as console markup -------------------------------------------------------------------
def test_paths_with_brackets_cyrillic_and_spaces_are_shown_as_they_are(llama3_ckpt: Path, tmp_path: Path) -> None:
    odd = tmp_path / "in [ray] Модель [bold]"
    odd.mkdir()
    cal = odd / "[ray]cal.txt"
    cal.write_text("", encoding="utf-8")  # empty: refused, and the message names the file exactly
    line = _one_line(qk("gguf", str(llama3_ckpt), "--calibration", str(cal), "-w", str(tmp_path / "w")))
    assert str(cal) in line, line
    missing = odd / "[" / "]model"  # a path that reads "[/]model"
    line = _one_line(qk("gguf", str(missing), "--q8_0"))
    assert str(missing) in line, line
    ws = odd / "ws [" / "x]"  # "ws [/x]"
    ok = qk("gguf", str(llama3_ckpt), "--q8_0", "--no-imatrix", "--no-verify", "-w", str(ws), "--json")
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr[-3000:]
    assert json.loads(ok.stdout)["workspace"] == str(ws)


# -- 5. two recipe entries, one workspace ---------------------------------------------------------------------------
def test_two_recipe_entries_that_share_a_workspace_are_refused(llama3_ckpt: Path, tmp_path: Path) -> None:
    import shutil

    for name in ("Модель тест", "Модель_тест"):  # two folders whose names make one workspace folder
        shutil.copytree(llama3_ckpt, tmp_path / "m" / name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""models:
  - source: m/Модель тест
    gguf: {}
  - source: m/Модель_тест
    gguf: {}
""", encoding="utf-8")
    for args in (["recipe", "validate", str(recipe)], ["run", str(recipe)]):
        proc = qk(*args)
        assert proc.returncode == 2 and "would share the workspace Модель_тест/" in proc.stderr, proc.stderr
        assert "line 2" in proc.stderr and "line 4" in proc.stderr, proc.stderr
    assert not (tmp_path / "quants").exists()


# -- rough edges ------------------------------------------------------------------------------------------------------
def test_a_child_process_dies_with_its_parent(llama3_ckpt: Path, tmp_path: Path) -> None:
    """GPTQModel's worker is killed with the run that started it (SIGKILL of the parent): nothing of a dead run
    keeps writing into its staging folder."""
    run = start("gptq", str(llama3_ckpt), "--bits", "4", "--group-size", "64", "--calib-samples", "4",
                "--calib-seq-len", "64", "-w", str(tmp_path / "ws"))

    def child() -> int | None:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    cmd = (entry / "cmdline").read_bytes()
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if b"quantkit.backends.gptq" in cmd and ppid == run.pid:
                    return int(entry.name)
        return None

    pid = wait_for(child, proc=run)
    run.kill()
    run.wait()
    gone = False
    for _ in range(200):
        if not Path(f"/proc/{pid}").exists() or (Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"):
            gone = True
            break
        time.sleep(0.05)
    assert gone, "GPTQModel's worker outlived the run"


def test_card_waits_for_the_lock(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from quantkit.lock import acquire; "
                               "acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(ws.root)],
                              stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        line = _one_line(qk("card", str(ws.root / "gguf")))
        assert "another quantkit run" in line, line
    finally:
        holder.kill()
        holder.wait()
    assert qk("card", str(ws.root / "gguf")).returncode == 0


def test_cheap_checks_come_before_any_work(llama3_ckpt: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    line = _one_line(qk("gguf", str(llama3_ckpt), "--target-size", "0", "-w", str(tmp_path / "w")))
    assert "--target-size 0" in line and time.monotonic() - started < 20, line
    assert not (tmp_path / "w").exists()
    line = _one_line(qk("gguf", str(llama3_ckpt), "--q2_k_s", "--no-imatrix", "-w", str(tmp_path / "w")))
    assert "Q2_K_S needs an importance matrix" in line, line


def test_q2_k_needs_no_importance_matrix(llama3_ckpt: Path, tmp_path: Path) -> None:
    """As llama.cpp decides per tensor: Q2_K tensors need a matrix only inside a Q2_K_S file."""
    proc = qk("gguf", str(llama3_ckpt), "--q2_k", "--no-imatrix", "-w", str(tmp_path / "w"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {a["quant"] for a in json.loads(proc.stdout)["artifacts"]} == {"BF16", "Q2_K"}


def test_a_size_target_is_a_bound_and_the_name_says_what_was_asked_and_got(llama3_ckpt: Path,
                                                                            tmp_path: Path) -> None:
    import re

    proc = qk("gguf", str(llama3_ckpt), "--q4_k_m", "--target-bpw", "4.5", "--no-verify", "--calib-samples", "4",
              "--calib-seq-len", "64", "-w", str(tmp_path / "w"), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (art,) = [a for a in json.loads(proc.stdout)["artifacts"] if a.get("target")]
    m = re.fullmatch(r"gguf/tiny-llama3-target-4\.5bpw-(\d+\.\d\d)bpw\.gguf", art["path"])
    assert m and float(m.group(1)) <= 4.5 and art["bpw"] <= 4.5, art["path"]


def test_the_card_says_only_what_was_measured(tmp_path: Path) -> None:
    from quantkit.card import render_card

    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    assert "Every file was scored against the bf16 original" in render_card(ws, "gguf", repo="me/x")
    for entry in ws.artifacts.values():
        entry.pop("eval", None)
        entry.pop("gate", None)
    ws.save()
    text = render_card(Workspace(ws.root), "gguf", repo="me/x")
    assert "scored against" not in text and "измерено" not in text


def test_a_non_ascii_token_is_named(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    run = push(hub, ws.root / "gguf", token="hf_abcdefghijkl\u043cnop")
    line = error_line(run)
    assert run.returncode == 2 and "HF_TOKEN holds characters no Hub token has" in line, line
    assert "same command again" not in line and "\u043c" not in line


def test_a_49152_token_llama_states_it_adds_no_bos(tmp_path: Path) -> None:
    """llama.cpp's converter writes add_bos_token = false for a Llama with a 49,152-token vocabulary (SmolLM2,
    Granite); without it llama.cpp falls back to its own default for the vocabulary type."""
    from quantkit.backends.gguf.convert.converter import Converter
    from quantkit.demo import build_checkpoint
    from quantkit.source import load_local

    src = build_checkpoint(tmp_path / "smol", "smollm", vocab_size=49152, hidden=256, layers=1, heads=4, kv_heads=2,
                           ffn=256)
    ck = load_local(src, name="smol", source=str(src))
    (out,) = Converter(ck).write(tmp_path / "smol.gguf")
    import gguf

    field = gguf.GGUFReader(out).fields.get("tokenizer.ggml.add_bos_token")
    assert field is not None and bool(field.parts[-1][0]) is False


def test_the_pre_tokenizer_and_how_it_was_found_are_recorded(llama3_ckpt: Path, tmp_path: Path) -> None:
    from quantkit.card import render_card

    ws = tmp_path / "w"
    proc = qk("gguf", str(llama3_ckpt), "--q8_0", "--no-imatrix", "-w", str(ws), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (bf16,) = [a for a in json.loads(proc.stdout)["artifacts"] if a["quant"] == "BF16"]
    assert bf16["tokenizer"]["pre"] == "llama-bpe" and bf16["tokenizer"]["found_by"] in ("hash", "structure")
    assert "llama.cpp pre-tokenizer `llama-bpe`, found " in render_card(Workspace(ws), "gguf", repo="me/x")


# -- found by benchmarks/bad_inputs.py ---------------------------------------------------------------------------
def test_a_dry_run_refuses_what_the_run_would_refuse(llama3_ckpt: Path, tmp_path: Path) -> None:
    """An unknown alias, a folder that is not there or holds no checkpoint, a file, a malformed Hub id: `--dry-run`
    printed a plan and exited 0 for each; a Hub id that is merely not downloaded yet is still planned."""
    (tmp_path / "empty").mkdir()
    for spec, words in (("T-lite-0.2", "unknown model or alias 'T-lite-0.2'"), ("./models/nope", "no such folder"),
                        ("org/name/extra/more", "no such folder"), (str(tmp_path / "empty"), "has no config.json"),
                        (str(llama3_ckpt / "config.json"), "is a file, not a checkpoint folder")):
        proc = qk("gguf", spec, "--dry-run", "-w", str(tmp_path / "ws"), cwd=tmp_path)
        assert words in _one_line(proc), (spec, proc.stderr)
    planned = qk("gguf", "someorg/not-downloaded-yet", "--dry-run", "-w", str(tmp_path / "ws"), cwd=tmp_path)
    assert planned.returncode == 0 and "downloaded on the first run" in planned.stdout, planned.stderr
    assert not (tmp_path / "ws").exists()


def _copy(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_configs_tokenizers_and_shapes_that_do_not_fit_are_one_line_before_work(llama3_ckpt: Path,
                                                                                 tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    cases: list[tuple[Path, str]] = []
    listed = _copy(llama3_ckpt, tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    cases.append((listed, "is not a Hugging Face model config"))
    nameless = _copy(llama3_ckpt, tmp_path / "nameless")
    config = json.loads((nameless / "config.json").read_text())
    (nameless / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "architectures"}))
    cases.append((nameless, "names no architecture"))
    claimed = _copy(llama3_ckpt, tmp_path / "claimed")  # Llama weights under a Qwen2 name: no q/k/v biases
    (claimed / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    cases.append((claimed, "needs model.layers.0.self_attn.q_proj.bias"))
    shaped = _copy(llama3_ckpt, tmp_path / "shaped")
    tensors = load_file(str(shaped / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:64].clone()
    save_file(tensors, str(shaped / "model.safetensors"), metadata={"format": "pt"})
    cases.append((shaped, "model.layers.0.self_attn.k_proj.weight in shaped is [64, 256], but config.json implies "
                          "[128, 256]"))
    damaged = _copy(llama3_ckpt, tmp_path / "damaged")
    (damaged / "tokenizer.json").write_bytes((llama3_ckpt / "tokenizer.json").read_bytes()[:5000])
    cases.append((damaged, "tokenizer.json is damaged"))
    for folder, words in cases:
        ws = tmp_path / f"ws-{folder.name}"
        line = _one_line(qk("gguf", str(folder), "--q4_k_m", "-w", str(ws), cwd=tmp_path))
        assert words in line, (folder.name, line)
        assert not ws.exists(), folder.name


def test_a_bad_repo_name_is_refused_before_any_work(llama3_ckpt: Path, tmp_path: Path) -> None:
    proc = qk("gguf", str(llama3_ckpt), "--push", "--repo", "bad repo name!", "--dry-run", cwd=tmp_path)
    assert "--repo 'bad repo name!' is not a Hub repo id" in _one_line(proc)


def test_the_hub_clients_own_retry_chatter_stays_quiet(tmp_path: Path, hub: FakeHub) -> None:  # noqa: F811
    """Each failed attempt is quantkit's one warning line, not huggingface_hub's 'HTTP Error 500 thrown while
    requesting ...' per internal retry."""
    ws = build_workspace(tmp_path / "ws", gate_fail=False)
    hub.fail("POST", r"/preupload/", 500, times=1000)
    proc = push(hub, ws.root / "gguf", "--repo", "down")
    assert proc.returncode == 2 and "thrown while requesting" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert all(ln.startswith(("warning:", "error:")) for ln in lines), lines
