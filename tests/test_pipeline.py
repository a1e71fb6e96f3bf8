"""The one pipeline: typed, wired plans; a format command and a recipe run the same steps to the same files; the
manifest is checked against its schema at every read and write."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from test_consistency import QUICK, error_line, qk

from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.pipeline import FormatJob, Job, Settings, plan_job
from quantkit.workspace import Workspace


def test_plan_is_typed_and_wired(tmp_path: Path, llama3_ckpt: Path) -> None:
    job = Job(source=str(llama3_ckpt), settings=Settings(eval="builtin:ru-eval", publish=True),
              formats=(FormatJob("gguf", (GGUFOptions(types=["Q8_0", "Q4_K_M"]),), repo="me/tiny-GGUF"),),
              workspace=tmp_path / "ws")
    steps = plan_job(job)["steps"]
    assert [s.kind for s in steps] == ["resolve", "calibrate", "imatrix", "convert", "quantize", "quantize",
                                       "verify", "verify", "verify", "evaluate", "publish"]
    keys = [s.key for s in steps]
    assert keys[:6] == ["model/resolve", "model/calibrate", "gguf/imatrix", "gguf/convert/BF16",
                        "gguf/quantize/Q8_0", "gguf/quantize/Q4_K_M"]
    assert len(set(keys)) == len(keys)
    for i, s in enumerate(steps):  # every input is an earlier step: the plan is in dependency order
        assert set(s.inputs) <= set(keys[:i]), (s.key, s.inputs)
        assert s.fingerprint, s.key  # the checkpoint is here: every step knows what its outputs depend on
    by_kind = {s.kind: s for s in steps}
    assert by_kind["convert"].key in steps[4].inputs and by_kind["imatrix"].key in steps[4].inputs
    assert by_kind["convert"].fuses == ("gguf/quantize/Q8_0", "gguf/quantize/Q4_K_M")  # made in the one pass
    assert set(by_kind["evaluate"].inputs) >= {"gguf/quantize/Q8_0", "gguf/verify/BF16"}  # after verification
    assert by_kind["publish"].inputs == (by_kind["evaluate"].key,) and by_kind["publish"].repo == "me/tiny-GGUF"
    assert all(s.status == "to do" for s in steps) and not (tmp_path / "ws").exists()


def test_format_command_and_recipe_run_the_same_steps(tmp_path: Path, llama3_ckpt: Path) -> None:
    one = qk("gguf", str(llama3_ckpt), "--q8_0", *QUICK, "-w", str(tmp_path / "cmd"), cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "defaults": {"workspace": "rws", "eval": False, "calib_samples": 4, "calib_seq_len": 64},
        "models": [{"source": str(llama3_ckpt), "gguf": {"types": ["Q8_0"], "verify": False}}]}), encoding="utf-8")
    many = qk("run", str(recipe), "--json", cwd=tmp_path)
    assert many.returncode == 0, many.stderr[-3000:]
    a, b = Workspace(tmp_path / "cmd"), Workspace(tmp_path / "rws" / llama3_ckpt.name)
    assert {k: v["fingerprint"] for k, v in a.steps.items()} == {k: v["fingerprint"] for k, v in b.steps.items()}
    assert {k: v["checks"] for k, v in a.steps.items()} == {k: v["checks"] for k, v in b.steps.items()}
    assert set(a.artifacts) == set(b.artifacts) == {f"gguf/{llama3_ckpt.name}-BF16.gguf",
                                                    f"gguf/{llama3_ckpt.name}-Q8_0.gguf"}
    for key in a.artifacts:  # byte for byte
        assert (a.root / key).read_bytes() == (b.root / key).read_bytes(), key


def test_manifest_is_checked_when_read(tmp_path: Path, llama3_ckpt: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "manifest.json").write_text(json.dumps({"version": 1, "steps": {"gguf.convert": {
        "fingerprint": "abc", "outputs": "gguf/x.gguf"}}}), encoding="utf-8")
    proc = qk("gguf", str(llama3_ckpt), "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert proc.returncode != 0
    line = error_line(proc)
    assert "manifest" in line and "corrupt" in line and "steps.gguf.convert.outputs" in line
    (ws / "manifest.json").write_text(json.dumps({"version": 99}), encoding="utf-8")
    newer = qk("gguf", str(llama3_ckpt), "--q8_0", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert newer.returncode != 0 and "newer quantkit" in error_line(newer)


def test_calibration_rows_are_built_once_and_shared(tmp_path: Path, llama3_ckpt: Path) -> None:
    """One calibrate step per workspace: the importance matrix and GPTQ read the same rows, and a second format
    (or another run) does not tokenize again."""
    import numpy as np

    from quantkit.calibration import rows_fingerprint

    ws = tmp_path / "ws"
    made = qk("gguf", str(llama3_ckpt), "--q4_k_m", *QUICK, "-w", str(ws), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    w = Workspace(ws)
    rows = np.load(ws / "calibration" / "rows.npy")
    assert rows.shape == (4, 64)
    assert w.steps["gguf/imatrix"]["info"]["fingerprint"] == rows_fingerprint(rows)  # the imatrix read these rows
    finished = w.steps["model/calibrate"]["finished"]
    plan = qk("gptq", str(llama3_ckpt), "--bits", "8", "--group-size", "32", "--calib-samples", "4",
              "--calib-seq-len", "64", "-w", str(ws), "--dry-run", "--json", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-3000:]
    status = {s["key"]: s["status"] for s in json.loads(plan.stdout)["plan"]}
    assert status["model/calibrate"] == "done" and status["gptq/quantize/8bit-g32"] == "to do"
    other = qk("gguf", str(llama3_ckpt), "--q4_k_m", "--calib-samples", "2", "--calib-seq-len", "64", "-w",
               str(ws), "--dry-run", "--json", cwd=tmp_path)  # another shape is another calibration
    assert {s["key"]: s["status"] for s in json.loads(other.stdout)["plan"]}["model/calibrate"] == "to do"
    assert Workspace(ws).steps["model/calibrate"]["finished"] == finished


def test_gptq_step_follows_the_thread_count(tmp_path: Path, llama3_ckpt: Path) -> None:
    """GPTQ's CPU output depends on torch's thread count, so the count is part of its fingerprint: same threads,
    skipped; other threads, made again (never an old file under a fingerprint that promises the new one)."""
    ws = tmp_path / "ws"
    args = ("gptq", str(llama3_ckpt), "--bits", "8", "--group-size", "32", "--calib-samples", "4",
            "--calib-seq-len", "64", "-w", str(ws))
    first = qk(*args, "--threads", "1", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    step = "gptq/quantize/8bit-g32"
    before = Workspace(ws).steps[step]
    again = qk(*args, "--threads", "1", cwd=tmp_path)
    assert again.returncode == 0 and Workspace(ws).steps[step]["finished"] == before["finished"]
    other = qk(*args, "--threads", "2", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]
    assert Workspace(ws).steps[step]["fingerprint"] != before["fingerprint"]
