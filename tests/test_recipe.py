"""Recipes: validation with line numbers, plans (offline estimates), and real runs of a tiny checkpoint that resume,
skip finished work, gate and publish to the Hub API server on 127.0.0.1 (tests/hub_server.py).

Runs go through `quantkit run` in a fresh process, like a user's, so that the Hub client reads ``HF_ENDPOINT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_server import USER, WRITE_TOKEN, FakeHub
from typer.testing import CliRunner

from quantkit.cli.app import app
from quantkit.errors import EXIT_GATE
from quantkit.recipe import ESTIMATED, RecipeError, load_recipe
from quantkit.workspace import Workspace

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub.running() as server:
        yield server


def cli(*args: str) -> Any:
    """`quantkit ARGS` in this process (for what does not touch the Hub)."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})


def quantkit(*args: str, cwd: Path, hub: FakeHub | None = None) -> subprocess.CompletedProcess[str]:
    """`quantkit ARGS` in a fresh process; with `hub`, publishing goes to the fake Hub with a write token."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QUANTKIT_DEBUG")}
    env |= {"NO_COLOR": "1", "COLUMNS": "200"}
    if hub is not None:
        env |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": WRITE_TOKEN}
    return subprocess.run([sys.executable, "-m", "quantkit.cli.app", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=1800)


def write_recipe(folder: Path, *, types: list[str], gptq: bool = False, publish: bool = False,
                 max_kld: float = 0.5, verify: bool = True) -> Path:
    """A recipe for the tiny checkpoint linked at ``folder/models/tiny`` (a path relative to the recipe)."""
    model: dict[str, Any] = {"source": "models/tiny", "name": "tiny",
                             "gguf": {"types": types, "verify": verify}, "exl2": {"bits": [4.0]}}
    if gptq:
        model["gptq"] = {"bits": 4, "group_size": 64}
    recipe = {
        "defaults": {"calib_samples": 8, "calib_seq_len": 128, "ctx": 128, "workspace": "ws", "namespace": USER,
                     "publish": publish, "gates": {"max_ppl_increase": 0.5, "max_kld": max_kld}},
        "models": [model],
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def link_checkpoint(folder: Path, ckpt: Path) -> None:
    (folder / "models").mkdir(parents=True, exist_ok=True)
    if not (folder / "models" / "tiny").exists():
        (folder / "models" / "tiny").symlink_to(ckpt, target_is_directory=True)


def steps(ws_root: Path) -> dict[str, tuple[str, str]]:
    return {k: (v["fingerprint"], v["finished"]) for k, v in Workspace(ws_root).steps.items()}


def rows(stdout: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["format"], r["quant"]): r for r in json.loads(stdout)["rows"]}


def can_run(fmt: str) -> str | None:
    from quantkit.backends.base import get_backend

    return get_backend(fmt).check()


# -- validation -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["t-lite.yaml", "vikhr.yaml", "demo.yaml", "t-bank-2.yaml"])
def test_shipped_recipes_validate(name: str) -> None:
    result = cli("recipe", "validate", str(RECIPES / name))
    assert result.exit_code == 0, result.output
    n = {"t-lite.yaml": 3, "vikhr.yaml": 2, "demo.yaml": 1, "t-bank-2.yaml": 2}[name]
    assert result.output.startswith(f"ok: {n} models, "), result.output
    assert int(result.output.split(", ")[1].split()[0]) > 3 * n


BAD = """\
defaults:
  calib_samples: 8
  gates:
    max_kld: 0.1
models:
  - source: T-lite-0.1
    gguf:
      tyeps: [Q4_K_M]
"""


def test_unknown_key_points_to_its_line(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(BAD, encoding="utf-8")
    result = cli("recipe", "validate", str(path))
    assert result.exit_code == 2
    assert f"{path}:8: models[0].gguf: unknown key 'tyeps'" in result.output
    assert "did you mean 'types'?" in result.output
    # the same through `run`, which refuses before doing anything
    result = cli("run", str(path), "--dry-run")
    assert result.exit_code == 2 and f"{path}:8:" in result.output


def test_wrong_types_point_to_their_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(BAD.replace("calib_samples: 8", "calib_samples: many").replace("tyeps", "types")
                    .replace("max_kld: 0.1", "max_kld: [0.1]") + "    gptq: {bits: 5}\n    onnx: {bits: 4}\n",
                    encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    found = {(p.line, p.where): p for p in info.value.problems}
    assert "valid integer, got 'many'" in found[(2, "defaults.calib_samples")].message
    assert found[(2, "defaults.calib_samples")].hint == "calib_samples: calibration rows"
    assert "valid number, got a list" in found[(4, "defaults.gates.max_kld")].message
    assert "--bits must be one of 2, 3, 4, 8, not 5" in found[(9, "models[0].gptq.bits")].message
    unknown = found[(10, "models[0]")]
    assert unknown.message == "unknown key 'onnx'" and "gguf" in (unknown.hint or "")
    assert [p.line for p in info.value.problems] == [2, 4, 9, 10]


def test_yaml_errors_duplicates_and_missing_folders_have_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("models:\n  - source: T-lite-0.1\n    gguf: {types: [Q4_K_M]\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems[0].line is not None and "not valid YAML" in str(info.value)

    path.write_text("models:\n  - source: ./nowhere\n    gguf: {}\n  - source: T-lite-0.1\n    source: x/y\n"
                    "    gguf: {}\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"{path}:2: models[0].source: no such folder: {tmp_path / 'nowhere'}" in text
    assert f"{path}:5: models[1]: duplicate key 'source'" in text

    path.write_text("models:\n  - name: x\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:2: models[0]: 'source' is required (source: alias")
    path.write_text("models:\n  - source: demo\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:2: models[0]: no format to make: add one of gguf:")


# -- plans ------------------------------------------------------------------------------------------------------------
def test_dry_run_plans_unreachable_models_from_known_sizes() -> None:
    """Offline and with an empty Hub cache, the T-lite recipe is still planned, with estimated sizes."""
    result = cli("run", str(RECIPES / "t-lite.yaml"), "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [m["model"] for m in plan["models"]] == ["T-lite-0.1", "T-lite-instruct-0.1", "T-lite-it-1.0"]
    first = plan["models"][0]
    assert first["estimated"] and ESTIMATED in first["note"] and first["params"] == 8_030_000_000
    by_step = {(s["format"], s["step"]): s for s in first["steps"]}
    q4 = by_step[("gguf", "quantize → Q4_K_M")]
    assert q4["output"] == "gguf/T-lite-0.1-Q4_K_M.gguf" and 4.5e9 < q4["estimated_size"] < 5.5e9
    assert by_step[("gguf", "publish")]["repo"] == "quantkit-ru/T-lite-0.1-GGUF"
    by_key = {s["key"]: s for s in first["steps"]}
    assert 5e9 < by_key["gptq/quantize/4bit-g128"]["estimated_size"] < 6.5e9
    assert [s["status"] for s in first["steps"]].count("done") == 0
    exl2 = next(f for f in first["formats"] if f["format"] == "exl2")
    assert exl2["can_run"] == (can_run("exl2") is None)

    result = cli("run", str(RECIPES / "t-lite.yaml"), "--dry-run", "--only", "gguf", "--model", "T-lite-it-1.0")
    assert result.exit_code == 0, result.output
    assert "T-lite-it-1.0-Q6_K.gguf" in result.stdout and "T-lite-0.1" not in result.stdout
    assert "gptq" not in result.stdout and "estimated from known parameter count" in result.stdout


def test_continue_on_error_goes_on_with_the_next_model(tmp_path: Path) -> None:
    for name in ("broken-a", "broken-b"):  # a config but no weights: resolving fails
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}', encoding="utf-8")
    path = tmp_path / "r.yaml"
    path.write_text("defaults: {workspace: ws}\nmodels:\n  - source: ./broken-a\n    gguf: {}\n"
                    "  - source: ./broken-b\n    gguf: {}\n", encoding="utf-8")
    stop = cli("run", str(path), "--json")
    assert stop.exit_code == 2
    assert [r["status"] for r in json.loads(stop.stdout)["rows"]] == ["failed", "not run"]
    go_on = cli("run", str(path), "--json", "--continue-on-error")
    assert go_on.exit_code == 2
    got = json.loads(go_on.stdout)["rows"]
    assert [r["status"] for r in got] == ["failed", "failed"]
    assert all("has no *.safetensors weights" in r["note"] for r in got)


def test_backends_that_cannot_run_here_are_skipped_unless_required(tmp_path: Path) -> None:
    """Nothing is fetched for a model whose formats cannot run here (T-lite-0.1 is not in the empty, offline cache)."""
    reason = can_run("exl2")
    if reason is None:
        pytest.skip("EXL2 can run on this machine")
    path = tmp_path / "r.yaml"
    path.write_text("defaults: {workspace: ws}\nmodels:\n  - source: T-lite-0.1\n    exl2: {bits: [4.0]}\n",
                    encoding="utf-8")
    skipped = cli("run", str(path), "--json")
    assert skipped.exit_code == 0, skipped.output
    assert [(r["format"], r["status"], r["note"]) for r in json.loads(skipped.stdout)["rows"]] == [
        ("exl2", "skipped", reason)]
    path.write_text(path.read_text(encoding="utf-8").replace("bits: [4.0]", "bits: [4.0], required: true"),
                    encoding="utf-8")
    required = cli("run", str(path), "--json")
    assert required.exit_code == 2
    row = json.loads(required.stdout)["rows"][0]
    assert row["status"] == "failed" and row["note"] == f"required by the recipe but cannot run here: {reason}"
    assert not (tmp_path / "ws").exists()


# -- runs -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_recipe_runs_offline_resumes_and_publishes(tmp_path: Path, llama3_ckpt: Path, hub: FakeHub) -> None:
    link_checkpoint(tmp_path, llama3_ckpt)
    recipe = write_recipe(tmp_path, types=["Q8_0"], gptq=True, publish=True)
    cwd = tmp_path / "elsewhere"  # relative paths in the recipe are the recipe's, not the current directory's
    cwd.mkdir()
    ws_root = tmp_path / "ws" / "tiny"

    first = quantkit("run", str(recipe), "--json", cwd=cwd, hub=hub)
    assert first.returncode == 0, first.stderr[-3000:]
    got = rows(first.stdout)
    q8 = got[("gguf", "Q8_0")]
    assert q8["status"] == "ok" and q8["ppl"] > 0 and q8["kld"] < 0.5 and 2.0e6 < q8["size"] < 4e6
    assert q8["url"] == f"{hub.url}/{USER}/tiny-GGUF"
    exl2 = got[("exl2", "-")] if ("exl2", "-") in got else None
    if can_run("exl2") is not None:
        assert exl2 is not None and exl2["status"] == "skipped" and exl2["note"] == can_run("exl2")
    if can_run("gptq") is None:
        g = got[("gptq", "4bit-g64")]
        assert g["status"] == "ok" and g["kld"] < 0.5 and g["url"] == f"{hub.url}/{USER}/tiny-GPTQ"
    else:
        assert got[("gptq", "-")]["status"] == "skipped"
    assert {"tiny-Q8_0.gguf", "tiny-imatrix.gguf", "README.md"} <= set(hub.files(f"{USER}/tiny-GGUF"))
    assert ws_root.joinpath("gguf", "tiny-Q8_0.gguf").is_file() and not (cwd / "quants").exists()

    # the plan now knows what is done
    plan = json.loads(quantkit("run", str(recipe), "--dry-run", "--json", cwd=cwd).stdout)
    gguf_steps = [s for s in plan["models"][0]["steps"] if s["format"] == "gguf"]
    assert gguf_steps and all(s["status"] == "done" for s in gguf_steps), gguf_steps

    # a second run has nothing to do, and says so
    before, commits = steps(ws_root), len(hub.repos[f"{USER}/tiny-GGUF"].commits)
    again = quantkit("run", str(recipe), cwd=cwd, hub=hub)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stdout
    assert steps(ws_root) == before and len(hub.repos[f"{USER}/tiny-GGUF"].commits) == commits

    # a run stopped after its first quant: rerun with the full list of types; only the missing one is made
    write_recipe(tmp_path, types=["Q8_0", "Q4_K_M"], gptq=True, publish=True)
    puts = len(hub.lfs_puts())
    resumed = quantkit("run", str(recipe), "--json", cwd=cwd, hub=hub)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = steps(ws_root)
    changed = {k for k in after if before.get(k) != after[k]} - {"gguf/publish"}  # published again: new file
    # the new type, its check, and the evaluation of the format (its set of files changed; the others' scores come
    # from their records)
    assert changed == {"gguf/quantize/Q4_K_M", "gguf/verify/Q4_K_M", "gguf/evaluate"}, changed
    assert rows(resumed.stdout)[("gguf", "Q4_K_M")]["status"] == "ok"
    assert "tiny-Q4_K_M.gguf" in hub.files(f"{USER}/tiny-GGUF")
    assert len(hub.lfs_puts()) - puts == 1  # only the new file went up

    # an output lost since: only that file is made again
    ws_root.joinpath("gguf", "tiny-Q8_0.gguf").unlink()
    before = after
    rebuilt = quantkit("run", str(recipe), cwd=cwd, hub=hub)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    after = steps(ws_root)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"gguf/quantize/Q8_0"}, changed
    assert ws_root.joinpath("gguf", "tiny-Q8_0.gguf").is_file()


@pytest.mark.slow
def test_gate_keeps_failing_artifacts_off_the_hub(tmp_path: Path, llama3_ckpt: Path, hub: FakeHub) -> None:
    link_checkpoint(tmp_path, llama3_ckpt)
    recipe = write_recipe(tmp_path, types=["Q4_K_M"], publish=True, max_kld=1e-9)
    run = quantkit("run", str(recipe), "--json", "--only", "gguf", cwd=tmp_path, hub=hub)
    assert run.returncode == EXIT_GATE, run.stderr[-3000:]
    q4 = rows(run.stdout)[("gguf", "Q4_K_M")]
    assert q4["status"] == "failed gate" and q4["url"] is None and "KLD" in q4["note"]
    assert q4["repo"] == "not published (failed the gate)"
    published = hub.files(f"{USER}/tiny-GGUF") if f"{USER}/tiny-GGUF" in hub.repos else {}
    assert "tiny-Q4_K_M.gguf" not in published
    assert "failed the quality gate" in run.stderr


@pytest.mark.slow
def test_recipe_with_every_new_format_publishes_and_resumes(tmp_path: Path, llama3_ckpt: Path,
                                                            hub: FakeHub) -> None:
    """AWQ, FP8 and MLX beside GGUF in one recipe: each made, scored against bf16, gated and published to its own
    repo; a second run has nothing to do and changes no step; a lost AWQ file is the only thing made again."""
    link_checkpoint(tmp_path, llama3_ckpt)
    recipe = write_recipe(tmp_path, types=["Q8_0"], publish=True)
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    model = data["models"][0]
    del model["exl2"]
    model |= {"awq": {"group_size": 64}, "fp8": {}, "mlx": {"bits": [4]}}
    recipe.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    ws_root = tmp_path / "ws" / "tiny"
    first = quantkit("run", str(recipe), "--json", cwd=tmp_path, hub=hub)
    assert first.returncode == 0, first.stderr[-3000:]
    got = rows(first.stdout)
    runnable = [f for f in ("awq", "fp8", "mlx") if can_run(f) is None]
    assert runnable, "none of AWQ, FP8, MLX can run here"
    for fmt in runnable:
        (row,) = [r for (f, _), r in got.items() if f == fmt]
        assert row["status"] == "ok" and row["kld"] is not None and row["kld"] < 0.5, row
        assert row["url"] and "README.md" in hub.files(row["url"].removeprefix(f"{hub.url}/")), row
    before = steps(ws_root)
    again = quantkit("run", str(recipe), cwd=tmp_path, hub=hub)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    assert steps(ws_root) == before
    if "awq" in runnable:
        (weights,) = ws_root.joinpath("awq").glob("*/model.safetensors")
        weights.unlink()
        rebuilt = quantkit("run", str(recipe), cwd=tmp_path, hub=hub)
        assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
        changed = {k for k, v in steps(ws_root).items() if before.get(k) != v}
        assert changed and all(k.startswith("awq/") for k in changed), changed
        assert weights.is_file()
