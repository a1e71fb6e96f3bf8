"""Bad input gets one clear line, a non-zero exit, no traceback, and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.workspace import atomic_path, check_disk

QK = [sys.executable, "-m", "quantkit"]  # the console script's entry (quantkit.cli.entry)


def qk(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run([*QK, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def test_unknown_alias_and_missing_folder(tmp_path: Path) -> None:
    one_line_error(qk("gguf", "T-lite-9000", "--q4_k_m"), "unknown model or alias", "quantkit models")
    one_line_error(qk("gguf", "./no/such/folder", "--q4_k_m"), "no such folder")
    one_line_error(qk("gguf", "AnatoliiPotapov/T-lite-0.1", "--q4_k_m", "-w", str(tmp_path / "w")),
                   "cannot download")


def test_bad_checkpoints(llama3_ckpt: Path, tmp_path: Path) -> None:
    nost = tmp_path / "nost"
    nost.mkdir()
    shutil.copy(llama3_ckpt / "config.json", nost)
    (nost / "pytorch_model.bin").write_bytes(b"x")
    one_line_error(qk("gguf", str(nost)), "no *.safetensors", "pytorch_model.bin")

    arch = tmp_path / "arch"
    shutil.copytree(llama3_ckpt, arch)
    cfg = json.loads((arch / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (arch / "config.json").write_text(json.dumps(cfg))
    one_line_error(qk("gguf", str(arch)), "unsupported architecture GPT2LMHeadModel", "LlamaForCausalLM")

    corrupt = tmp_path / "corrupt"
    shutil.copytree(llama3_ckpt, corrupt)
    st = corrupt / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    one_line_error(qk("gguf", str(corrupt), "-w", str(tmp_path / "wc")), "corrupt safetensors", "truncated")
    assert not list((tmp_path / "wc").rglob("*.gguf"))


def test_int8_weights_refused(llama3_ckpt: Path, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    q = tmp_path / "int8"
    q.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama3_ckpt / f, q)
    save_file({"model.embed_tokens.weight": np.zeros((4, 4), np.int8)}, q / "model.safetensors")
    one_line_error(qk("gguf", str(q)), "I8", "not bf16/fp16/fp32")


def test_unknown_quant_type_and_imatrix_needed(llama3_ckpt: Path, tmp_path: Path) -> None:
    one_line_error(qk("gguf", str(llama3_ckpt), "--q4_z"), "unknown quant type 'q4_z'", "Q4_K_M")
    one_line_error(qk("gguf", str(llama3_ckpt), "--types", "q4_k_m,bogus"), "unknown quant type")
    one_line_error(qk("gguf", str(llama3_ckpt), "--iq2_xs", "--no-imatrix", "-w", str(tmp_path / "w")),
                   "IQ2_XS needs an importance matrix")
    assert not list((tmp_path / "w").rglob("*IQ2_XS*"))


def test_debug_shows_traceback() -> None:
    env = {**os.environ, "QUANTKIT_DEBUG": "1"}
    proc = subprocess.run([*QK, "gguf", "T-lite-9000"], capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_dry_run_plans_without_writing(llama3_ckpt: Path, tmp_path: Path) -> None:
    proc = qk("gguf", str(llama3_ckpt), "--q4_k_m", "--q8_0", "--dry-run", "--json", "-w", str(tmp_path / "w"))
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)["plan"]
    assert [s["output"] for s in plan if s["kind"] == "quantize"] == ["gguf/tiny-llama3-Q4_K_M.gguf",
                                                                     "gguf/tiny-llama3-Q8_0.gguf"]
    assert not list((tmp_path / "w").rglob("*.gguf"))


def test_models_and_backends_commands() -> None:
    proc = qk("models", "--json")
    aliases = {m["alias"] for m in json.loads(proc.stdout)}
    assert {"T-lite-0.1", "T-lite-instruct-0.1", "T-lite-it-1.0", "T-pro-it-1.0",
            "Vikhr-Llama3.1-8B-Instruct-R-21-09-24", "Vikhr-Nemo-12B-Instruct-R-21-09-24"} <= aliases
    rows = {b["name"]: b for b in json.loads(qk("backends", "--json").stdout)}
    assert rows["gguf"]["available"] is True


def test_full_disk_and_atomic_writes(tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="not enough disk space"):
        check_disk(tmp_path, 10**18, "a huge file")
    target = tmp_path / "out.bin"
    with pytest.raises(QuantkitError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")
    assert not target.exists() and not list(tmp_path.iterdir())
