"""Steps are what runs: the dry run of a command lists, key for key, the steps its run then records; a run killed
inside any step and run again redoes that step and the ones after it, nothing before; every key follows one scheme.

Commands run in fresh processes like a user's (`test_consistency.qk`); a kill is a real SIGKILL of the process,
sent while the step it aims at has its staging folder (the step is under way).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_consistency import qk

from quantkit.workspace import Workspace

QK = [sys.executable, "-m", "quantkit.cli.app"]
SMALL = ["--calib-samples", "4", "--calib-seq-len", "64"]
KEY = re.compile(r"^(model|[a-z0-9_]+)/[a-z]+(/[\w.\-]+)?$")


def planned(*args: str, cwd: Path) -> dict[str, str]:
    """The dry run's steps: key → status."""
    proc = qk(*args, "--dry-run", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {s["key"]: s["status"] for s in json.loads(proc.stdout)["plan"]}


def recorded(ws: Path) -> dict[str, str]:
    """The workspace's finished steps: key → when."""
    return {k: v["finished"] for k, v in Workspace(ws).steps.items()}


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["gguf", "--q4_k_m", "--q8_0", "--target-bpw", "5", "--eval"],
    ["gptq", "--bits", "8", "--group-size", "32", "--eval"],
])
def test_the_dry_run_lists_the_steps_the_run_records(command: list[str], llama3_ckpt: Path,
                                                     tmp_path: Path) -> None:
    fmt, *flags = command
    args = [fmt, str(llama3_ckpt), *flags, *SMALL, "-w", str(tmp_path / "ws")]
    plan = planned(*args, cwd=tmp_path)
    assert set(plan.values()) == {"to do"} and all(KEY.match(k) for k in plan), plan
    ran = qk(*args, "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert set(recorded(tmp_path / "ws")) == set(plan)  # key for key
    again = planned(*args, cwd=tmp_path)
    assert set(again.values()) == {"done"}, again
    more = planned(fmt, str(llama3_ckpt), *flags, *(["--q6_k"] if fmt == "gguf" else ["--desc-act"]), *SMALL, "-w",
                   str(tmp_path / "ws"), cwd=tmp_path)
    new = {k for k, s in more.items() if s == "to do"}
    assert new and not new & {k for k, s in again.items()} - {f"{fmt}/evaluate"}, more  # only the new work


@pytest.mark.slow
def test_a_recipe_plans_the_steps_it_records(llama3_ckpt: Path, qwen2_ckpt: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "defaults": {"workspace": "ws", "eval": False, "calib_samples": 4, "calib_seq_len": 64},
        "models": [{"source": str(llama3_ckpt), "name": "a", "gguf": {"types": ["Q8_0"]},
                    "gptq": {"bits": 8, "group_size": 32}},
                   {"source": str(qwen2_ckpt), "name": "b", "gguf": [{"types": ["Q4_K_M"]},
                                                                     {"types": ["Q8_0"], "verify": False}]}]}),
        encoding="utf-8")
    proc = qk("run", str(recipe), "--dry-run", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = {m["model"]: {s["key"] for s in m["steps"]} for m in json.loads(proc.stdout)["models"]}
    ran = qk("run", str(recipe), "--json", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    for model, keys in plan.items():
        assert set(recorded(tmp_path / "ws" / model)) == keys, model
    # two variants of one format share their conversion: one step, recorded once
    assert sum(k.startswith("gguf/convert/") for k in plan["b"]) == 1


def _kill_inside(args: list[str], ws: Path, key: str, cwd: Path) -> bool:
    """Run `quantkit ARGS` and SIGKILL it while step `key` is under way (its staging folder exists). Returns
    whether the kill landed inside that step (a quick step may finish between two looks)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "QUANTKIT_DEBUG")} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([*QK, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    mark = f".{key.replace('/', '--')}."
    inside = False
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            staging = ws / ".staging"
            try:
                names = os.listdir(staging)
            except OSError:
                names = []
            if any(n.startswith(mark) for n in names):
                inside = key not in recorded(ws)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and every worker it started
        proc.wait()
    return inside


@pytest.mark.slow
def test_a_run_killed_in_any_step_redoes_only_that_step_and_the_ones_after(llama3_ckpt: Path,
                                                                          tmp_path: Path) -> None:
    args = ["gguf", str(llama3_ckpt), "--q4_k_m", "--q8_0", *SMALL]
    order = list(planned(*args, "-w", str(tmp_path / "plan"), cwd=tmp_path))
    landed = 0
    # resolve only records where the checkpoint came from; the quantizations are made inside the conversion's pass
    aimed = [k for k in order[1:] if not k.startswith("gguf/quantize/")]
    for key in aimed:
        i = order.index(key)
        ws = tmp_path / f"ws{i}"
        run = [*args, "-w", str(ws)]
        landed += _kill_inside(run, ws, key, tmp_path)
        before = recorded(ws)
        assert set(before) <= set(order[:i]) | {key}, (key, before)  # nothing after the step it died in
        assert not [p for p in ws.rglob("*") if p.is_file() and ".partial" in p.name and "staging" not in str(p)]
        again = qk(*run, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
        after = recorded(ws)
        assert set(after) == set(order), key
        assert {k: after[k] for k in before} == before, key  # what had finished was not done again
        assert not (ws / ".staging").exists()
    assert landed >= len(aimed) // 2, f"only {landed} of {len(aimed)} kills landed inside their step"
