"""Third-party backends through the ``quantkit.backends`` entry point, installed for real: a distribution folder
(module + ``*.dist-info`` with METADATA and entry_points.txt) on ``sys.path`` / ``PYTHONPATH``.

One healthy plugin (``toyq``, which implements only the core protocol plus its own usage text) gets a working
card, publish layout and plan estimate from the generic defaults; one whose constructor raises and one whose module
fails to import are listed as "cannot load: <reason>" and break nothing for the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import USER
from plugin_dist import write_distribution
from test_card import HUB_ID, MODEL, SOURCE_CARD, front_matter
from test_publish import download, hub, push  # noqa: F401 - fixtures used by name

from quantkit.backends.base import BackendLoadError, backend_for, describe_backends, get_backend, sections_for
from quantkit.card import render_card
from quantkit.errors import QuantkitError
from quantkit.publish import layout, plan_publish
from quantkit.quality.verify import current_hashes
from quantkit.workspace import Workspace

PLUGIN = '''
from pathlib import Path

from pydantic import BaseModel

from quantkit.steps import Step


class ToyOptions(BaseModel):
    bits: int = 4


class ToyBackend:
    """Implements the core protocol only, plus its own usage text."""

    name = "toyq"
    description = "toy quantization (a test plugin)"
    options_model = ToyOptions

    def check(self):
        return None

    def steps(self, ctx, options):
        return [Step(f"toyq/quantize/{options.bits}bit", "quantize", f"toy {options.bits} bits",
                     outputs=(f"toyq/{options.bits}bit/",), estimated_size=10, artifact=f"{options.bits}bit")]

    def owns(self, path):
        return (Path(path) / "toy.json").is_file()

    def scorer(self, path, *, n_ctx):
        raise NotImplementedError("not needed by these tests")

    def card_usage(self, ctx):
        return f"Run it with `toyq-run {ctx.repo} --revision {ctx.branch}`."


class HalfBackend:
    """Not a backend: no options, no run."""

    name = "halfq"
    description = "half a backend"


class BrokenBackend(ToyBackend):
    name = "brokenq"

    def __init__(self):
        raise RuntimeError("the toy GPU driver is missing")
'''

ENTRY_POINTS = {"toyq": "toy_quant:ToyBackend", "brokenq": "toy_quant:BrokenBackend",
                "importq": "toy_quant_missing:Backend", "halfq": "toy_quant:HalfBackend"}


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The plugin distribution, importable in this process and in child processes."""
    root = write_distribution(tmp_path / "site", "toy-quant", {
        "toy_quant.py": PLUGIN, "toy_quant_missing.py": "import quantkit_no_such_engine  # noqa\n"}, ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    return root


def toy_workspace(root: Path) -> Workspace:
    """A workspace with three toyq artifacts (folders), verified, the smallest one failing the quality gate."""
    ws = Workspace(root)
    ws.set_model({"name": MODEL, "source": HUB_ID, "hub_id": HUB_ID, "architecture": "Qwen2ForCausalLM",
                  "instruct": True, "license": "apache-2.0", "readme": "source-README.md"})
    (ws.root / "source-README.md").write_text(SOURCE_CARD, encoding="utf-8")
    for bits, passed in ((8, True), (4, True), (2, False)):
        folder = ws.dir("toyq", f"{bits}bit")
        (folder / "toy.json").write_text(json.dumps({"bits": bits}), encoding="utf-8")
        (folder / "weights.bin").write_bytes(bytes([bits]) * (100 * bits))
        (folder / "README.md").write_text("the engine's own readme: replaced by our card", encoding="utf-8")
        ws.artifacts[f"toyq/{bits}bit"] = {
            "format": "toyq", "quant": f"{bits}bit", "files": [f"toyq/{bits}bit"], "size": 100 * bits + 12,
            "bpw": float(bits), "calibration": {"spec": "builtin:ru-mix", "samples": 8, "seq_len": 64},
            "gate": {"passed": passed, "reasons": [] if passed else ["KLD 0.9 > 0.1"]},
            "command": f"quantkit toyq {HUB_ID} --bits {bits}",
        }
        hashes = current_hashes(ws, ws.artifacts[f"toyq/{bits}bit"])
        ws.artifacts[f"toyq/{bits}bit"].update(sha256=hashes, verify={"passed": True, "sha256": hashes})
    ws.save()
    return Workspace(root)


def test_backends_command_lists_broken_plugins_and_the_rest(plugin_dir: Path) -> None:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    run = subprocess.run([sys.executable, "-m", "quantkit.cli.app", "backends", "--json"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {r["name"]: r for r in json.loads(run.stdout)}
    assert {"gguf", "gptq", "exl2", "toyq", "brokenq", "importq", "halfq"} <= set(rows)
    assert rows["toyq"]["available"] and rows["toyq"]["description"] == "toy quantization (a test plugin)"
    assert rows["brokenq"]["reason"] == "cannot load: RuntimeError: the toy GPU driver is missing"
    assert rows["importq"]["reason"].startswith("cannot load: ModuleNotFoundError: ")
    assert "quantkit_no_such_engine" in rows["importq"]["reason"]
    assert rows["halfq"]["reason"] == "cannot load: it lacks options_model, check, steps, owns, scorer"
    assert not rows["brokenq"]["available"] and not rows["importq"]["available"] and not rows["halfq"]["available"]
    for name in ("gguf", "gptq", "exl2"):  # the built-ins are described as always
        assert rows[name]["description"] and "cannot load" not in str(rows[name]["reason"])

    table = subprocess.run([sys.executable, "-m", "quantkit.cli.app", "backends"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert table.returncode == 0, table.stderr
    assert "cannot load: RuntimeError: the toy GPU driver is missing" in table.stdout
    assert "toy quantization" in table.stdout and "gguf" in table.stdout


def test_registry_skips_and_names_broken_plugins(plugin_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendLoadError, match="backend 'brokenq' cannot load: RuntimeError") as err:
        get_backend("brokenq")
    assert isinstance(err.value, QuantkitError) and isinstance(err.value, ImportError)  # old `except` clauses hold
    rows = {r["name"]: r for r in describe_backends()}
    assert rows["importq"]["reason"].startswith("cannot load: ModuleNotFoundError")

    folder = tmp_path / "model-toy"
    folder.mkdir()
    (folder / "toy.json").write_text("{}", encoding="utf-8")
    assert backend_for(folder).name == "toyq"  # found past the broken plugins
    with pytest.raises(QuantkitError, match="is not an artifact quantkit knows"):
        backend_for(tmp_path)
    # format knowledge of a plugin that cannot load at all: the generic defaults
    assert sections_for("brokenq").format_info().title == "BROKENQ"
    assert sections_for("brokenq").branches([("brokenq/a", {})]) == {"brokenq/a": "main"}


def test_plugin_card_from_generic_sections(plugin_dir: Path, tmp_path: Path) -> None:
    ws = toy_workspace(tmp_path / "ws")
    text = render_card(ws, "toyq", repo=f"{USER}/toy-TOYQ")
    meta = front_matter(text)
    assert meta["library_name"] == "toyq" and meta["tags"][:3] == ["toyq", "quantkit", "russian"]
    assert meta["base_model"] == HUB_ID and meta["base_model_relation"] == "quantized"
    assert f"# {MODEL} — TOYQ" in text
    # generic advice by bits: 4 bits is the recommended start, 2 bits failed the gate
    assert "Start with **4bit**." in text
    assert f"| [main (4bit)](https://huggingface.co/{USER}/toy-TOYQ/tree/main) | 4bit |" in text
    assert "| ✓ рекомендуется: best balance of size and quality |" in text
    assert "✗ failed the quality gate (KLD 0.9 > 0.1)" in text
    # the plugin's own usage hook is used; nothing of another format leaks in
    assert f"Run it with `toyq-run {USER}/toy-TOYQ --revision main`." in text
    for other in ("llama.cpp", "ExLlamaV2", "vLLM", "imatrix", "measurement.json"):
        assert other not in text
    assert f"quantkit toyq {HUB_ID} --bits 4" in text and "## Original model card" in text


def test_plugin_publish_layout_and_plan_estimate(plugin_dir: Path, tmp_path: Path) -> None:
    ws = toy_workspace(tmp_path / "ws")
    lay = layout(ws, "toyq")
    assert lay.branches == ["main"] and [r["quant"] for r in lay.refused] == ["2bit"]
    paths = [it.path_in_repo for _, it in lay.items()]
    # every file of each artifact folder, kept apart by folder on main; the engine's README stays home; the card last
    assert paths == ["8bit/toy.json", "8bit/weights.bin", "4bit/toy.json", "4bit/weights.bin", "README.md"]
    assert [it.artifact for _, it in lay.items()][:4] == ["toyq/8bit", "toyq/8bit", "toyq/4bit", "toyq/4bit"]

    plan = plan_publish(ws, "toyq", repo=None, private=False,
                        planned=[{"output": "toyq/3bit", "estimated_size": 300}, {"output": "toyq/calib.json"}])
    files = plan["branches"][0]["files"]
    assert {"path": "(3bit, to be made)", "size": 300, "artifact": "toyq/3bit", "planned": True} in files
    assert plan["repo"] == f"<your-username>/{MODEL}-TOYQ"

    # a model that is not here: the plugin's steps, estimated, plus the verification every format gets
    from quantkit.pipeline import FormatJob, Job, plan_job

    job = Job(source="t-tech/T-lite-it-2.1", formats=(FormatJob("toyq", (get_backend("toyq").options_model(),)),))
    steps = plan_job(job)["steps"]
    assert [(s.key, s.estimated_size, s.status) for s in steps] == [
        ("model/resolve", 2 * 8_190_000_000, "to do"), ("toyq/quantize/4bit", 10, "to do"),
        ("toyq/verify/4bit", None, "to do")]


def test_plugin_publishes_to_the_hub(plugin_dir: Path, tmp_path: Path, hub, download) -> None:  # noqa: ANN001, F811
    ws = toy_workspace(tmp_path / "ws")
    repo = f"{USER}/toy-TOYQ"
    run = push(hub, ws.root / "toyq", "--repo", repo, "--json")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["branches"] == ["main"] and [r["quant"] for r in result["refused"]] == ["2bit"]
    assert set(hub.files(repo)) == {"8bit/toy.json", "8bit/weights.bin", "4bit/toy.json", "4bit/weights.bin",
                                    "README.md", ".gitattributes"}
    assert download(repo, "4bit/weights.bin") == bytes([4]) * 400
    assert download(repo, "8bit/weights.bin") == bytes([8]) * 800
    assert "Run it with `toyq-run" in download(repo, "README.md").decode()
