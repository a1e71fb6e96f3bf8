"""A third-party format, end to end, with no change in quantkit: a plugin distribution built here (module +
``*.dist-info`` with an entry point in ``quantkit.backends``) gets its own command generated from its options model,
its card section, a recipe section, and publishing to the loopback Hub; the pipeline runs it like a built-in.

The plugin (``f16copy``) writes the checkpoint's weights as float16 safetensors: a real (if trivial) format.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from hub_server import USER, WRITE_TOKEN, FakeHub
from plugin_dist import write_distribution
from test_publish import hub  # noqa: F401 - fixture used by name

PLUGIN = '''
"""f16copy: the checkpoint's weights as float16 safetensors (a test plugin for quantkit), written as steps only."""
import json
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from quantkit.backends.base import BackendBase, FormatInfo
from quantkit.steps import RESOLVE, Step, StepResult
from quantkit.workspace import fingerprint


class F16Options(BaseModel):
    dtype: str = Field("float16", description="Target dtype: float16 or float32.")
    keep_tokenizer: bool = Field(True, description="Copy the tokenizer files too.")


class F16Backend(BackendBase):
    name = "f16copy"
    description = "Weights as float16 safetensors (test plugin)."
    options_model = F16Options

    def check(self):
        return None

    def steps(self, ctx, options):
        ckpt = ctx.checkpoint
        size = ctx.n_params * (2 if options.dtype == "float16" else 4) if ctx.n_params else None
        return [Step(f"f16copy/convert/{options.dtype}", "convert", f"convert → {options.dtype}",
                     inputs=(RESOLVE,), outputs=(f"f16copy/{options.dtype}/",), artifact=options.dtype,
                     fingerprint=fingerprint(ckpt.fingerprint, options.model_dump()) if ckpt else "",
                     estimated_size=size, action=lambda run: self._convert(run, options))]

    def _convert(self, run, options):
        import torch
        from safetensors.torch import load_file, save_file

        ckpt = run.ctx.checkpoint
        out = run.path(f"f16copy/{options.dtype}")
        out.mkdir()
        dtype = getattr(torch, options.dtype)
        for shard in sorted(Path(ckpt.path).glob("*.safetensors")):
            save_file({k: v.to(dtype) for k, v in load_file(str(shard)).items()}, str(out / shard.name))
        config = json.loads((Path(ckpt.path) / "config.json").read_text())
        config["torch_dtype"] = options.dtype
        (out / "config.json").write_text(json.dumps(config))
        (out / "f16copy.json").write_text(json.dumps({"dtype": options.dtype}))
        if options.keep_tokenizer:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(ckpt.path) / name).exists():
                    shutil.copy(Path(ckpt.path) / name, out / name)
        bpw = 16.0 if options.dtype == "float16" else 32.0
        return StepResult(artifacts=run.artifact(options.dtype, out, bpw=bpw))

    def owns(self, path):
        return (Path(path) / "f16copy.json").is_file()

    def scorer(self, path, *, n_ctx):  # its files load in transformers: quantkit's scorer for such folders
        from quantkit.quality.scorers import TransformersScorer

        return TransformersScorer(Path(path), n_ctx=n_ctx)

    def format_info(self):
        return FormatInfo(title="F16 copy", library="transformers", tag="f16copy", repo_suffix="F16")

    def card_usage(self, ctx):
        return f"Load it with `AutoModelForCausalLM.from_pretrained('{ctx.repo}', revision='{ctx.branch}')`."
'''


def install_plugin(root: Path) -> Path:
    """The plugin as an installed distribution: a package and its dist-info, in a folder for PYTHONPATH."""
    return write_distribution(root / "site", "qk-f16copy", {"qk_f16copy/__init__.py": PLUGIN},
                              {"f16copy": "qk_f16copy:F16Backend"})


def qk(*args: str, site: Path, cwd: Path, hub: FakeHub | None = None  # noqa: F811 - not the fixture
       ) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QUANTKIT_DEBUG")}
    env |= {"PYTHONPATH": str(site), "NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    if hub is not None:
        env |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": WRITE_TOKEN}
    return subprocess.run([sys.executable, "-m", "quantkit.cli.app", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=600)


def test_plugin_format_command_card_recipe_and_publish(tmp_path: Path, llama3_ckpt: Path,
                                                       hub: FakeHub) -> None:  # noqa: F811
    site = install_plugin(tmp_path)
    # its command, generated from its options model
    helped = qk("f16copy", "--help", site=site, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "--dtype" in helped.stdout and "--keep-tokenizer" in helped.stdout and "--push" in helped.stdout
    bad = qk("f16copy", str(llama3_ckpt), "--dtype", "--nonsense", site=site, cwd=tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr

    # a plan, then a run, through the same pipeline as a built-in
    ws = tmp_path / "ws"
    plan = qk("f16copy", str(llama3_ckpt), "--dry-run", "--json", "-w", str(ws), site=site, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr[-2000:]
    steps = json.loads(plan.stdout)["plan"]
    assert [s["kind"] for s in steps] == ["resolve", "convert", "verify"] and not ws.exists()
    made = qk("f16copy", str(llama3_ckpt), "--json", "-w", str(ws), site=site, cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    (art,) = json.loads(made.stdout)["artifacts"]
    assert art["format"] == "f16copy" and art["path"] == "f16copy/float16"
    from safetensors import safe_open

    with safe_open(str(ws / "f16copy" / "float16" / "model.safetensors"), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_tensor(name).dtype) == "torch.float16"
    again = qk("f16copy", str(llama3_ckpt), "--dry-run", "--json", "-w", str(ws), site=site, cwd=tmp_path)
    assert json.loads(again.stdout)["plan"][-1]["status"] == "done"

    # its card section
    card = qk("card", str(ws), "--format", "f16copy", "--repo", f"{USER}/tiny-F16", site=site, cwd=tmp_path)
    assert card.returncode == 0, card.stderr[-2000:]
    text = (ws / "f16copy" / "README.md").read_text(encoding="utf-8")
    assert f"from_pretrained('{USER}/tiny-F16'" in text and "library_name: transformers" in text

    # a recipe with a section for it, published to the loopback Hub
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "defaults": {"workspace": "rws", "namespace": USER, "publish": True, "eval": False},
        "models": [{"source": str(llama3_ckpt), "name": "tiny", "f16copy": {"dtype": "float16"}}]}),
        encoding="utf-8")
    ran = qk("run", str(recipe), "--json", site=site, cwd=tmp_path, hub=hub)
    assert ran.returncode == 0, ran.stderr[-3000:]
    (row,) = json.loads(ran.stdout)["rows"]
    assert row["status"] == "ok" and row["format"] == "f16copy" and row["repo"] == f"{USER}/tiny-F16"
    files = hub.files(f"{USER}/tiny-F16")
    assert "README.md" in files and any(p.endswith("model.safetensors") for p in files), sorted(files)
    assert b"from_pretrained" in files["README.md"]
