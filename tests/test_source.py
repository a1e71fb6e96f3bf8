"""Sources: a Hub id is fetched through huggingface_hub (only weights, configs and tokenizer files), cached, and
usable offline afterwards. The Hub is the loopback server of tests/hub_server.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from hub_server import USER, WRITE_TOKEN, FakeHub

from quantkit.models import find_known

REPO = f"{USER}/tiny-llama3-bf16"


def _env(hub: FakeHub, home: Path, offline: bool) -> dict[str, str]:
    drop = ("HF_TOKEN", "QUANTKIT_DEBUG", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN": WRITE_TOKEN, "COLUMNS": "200"}
    return env


def test_hub_id_downloads_only_what_is_needed(llama3_ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "upload"
    shutil.copytree(llama3_ckpt, src)
    (src / "pytorch_model.bin").write_bytes(b"decoy: a pickle quantkit must not fetch")
    (src / "optimizer.pt").write_bytes(b"decoy")
    home = tmp_path / "hf-home"
    with FakeHub.running() as hub:
        upload = ("from huggingface_hub import HfApi; import sys; api = HfApi(endpoint=sys.argv[1], token=sys.argv[2]);"
                  "api.create_repo(sys.argv[3]); api.upload_folder(repo_id=sys.argv[3], folder_path=sys.argv[4])")
        subprocess.run([sys.executable, "-c", upload, hub.url, WRITE_TOKEN, REPO, str(src)], check=True,
                       env=_env(hub, home, offline=False), capture_output=True, timeout=120)
        # a real run downloads (a --dry-run plans from what is known and fetches nothing)
        cmd = [sys.executable, "-m", "quantkit.cli.app", "gguf", REPO, "--q8_0", "--no-imatrix", "--no-verify",
               "--json", "-w", str(tmp_path / "ws")]
        online = subprocess.run(cmd, env=_env(hub, home, offline=False), capture_output=True, text=True, timeout=300)
    assert online.returncode == 0, online.stderr
    assert json.loads(online.stdout)["model"] == "tiny-llama3-bf16"
    cmd = [*cmd[:5], "--q8_0", "--dry-run", "--json", "-w", str(tmp_path / "ws")]
    fetched = {p.name for p in (home / "hub").rglob("*") if p.is_file() and "snapshots" in p.parts}
    everything = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= fetched, (
        everything, online.stderr[-2000:])
    assert not fetched & {"pytorch_model.bin", "optimizer.pt"}
    # the Hub is gone now: the cache serves the same id offline
    offline = subprocess.run(cmd, env=_env(hub, home, offline=True), capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stderr


def test_known_aliases() -> None:
    assert find_known("t-lite-it-1.0").hub_id == "t-tech/T-lite-it-1.0"
    assert find_known("Vikhrmodels/Vikhr-Nemo-12B-Instruct-R-21-09-24").architecture == "MistralForCausalLM"
    assert find_known("nope") is None
