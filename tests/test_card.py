"""The model card: metadata the Hub understands, a table of every file, usage, provenance, the original card.

`build_workspace` makes a small fake workspace (a manifest written through `Workspace` and a few small files
standing in for the artifacts); test_publish.py uses it too. The golden card in tests/data/example-card.md is
rendered from it: run this file with QUANTKIT_UPDATE_GOLDEN=1 to rewrite it after an intended change.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard

from quantkit.card import render_card, write_card
from quantkit.errors import QuantkitError
from quantkit.workspace import Workspace

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "example-card.md"
MODEL = "T-lite-it-1.0"
HUB_ID = "t-tech/T-lite-it-1.0"

SOURCE_CARD = """---
language:
- ru
license: apache-2.0
base_model: Qwen/Qwen2.5-7B
pipeline_tag: text-generation
---
# T-lite-it-1.0

![T-lite](./logo.png)

**🚨 T-lite is designed to build AI assistants.** It was trained from Qwen 2.5 7B on Russian data.

## Usage

```python
# the model is used with transformers
from transformers import AutoModelForCausalLM
```

## Benchmarks

See the [technical report](report.pdf) and the [Qwen licence](https://huggingface.co/Qwen/Qwen2.5-7B).
"""

# quant, bits/weight, size on the Hub (bytes), ppl, kld_mean, top-1; bf16 reference PPL is 6.812
GGUF_ROWS = [
    ("BF16", 16.0, 15_231_233_024, 6.812, 0.0, 1.0),
    ("Q8_0", 8.5, 8_098_525_184, 6.815, 0.0009, 0.989),
    ("Q6_K", 6.56, 6_254_197_760, 6.824, 0.0041, 0.976),
    ("Q5_K_M", 5.7, 5_444_831_232, 6.851, 0.0113, 0.961),
    ("Q4_K_M", 4.91, 4_683_073_536, 6.958, 0.0312, 0.938),
    ("Q3_K_M", 3.99, 3_808_391_168, 7.342, 0.0935, 0.895),
    ("Q2_K", 3.17, 3_015_939_072, 8.671, 0.3102, 0.792),
]
EXL2_ROWS = [("6.5bpw", 6.5, 6.826, 0.0049, 0.974), ("5.0bpw", 5.0, 6.871, 0.0142, 0.955),
             ("4.0bpw", 4.0, 7.011, 0.0398, 0.931)]
GPTQ_ROWS = [("4bit-g128", 4.25, 7.003, 0.0361, 0.935), ("8bit-g128", 8.25, 6.816, 0.0011, 0.987)]
PPL_REF = 6.812
GATE = {"max_ppl_increase": 0.15, "max_kld": 0.2}
CALIBRATION = {"spec": "builtin:ru-mix", "samples": 64, "seq_len": 512, "tokens": 32768,
               "fingerprint": "5f1c0a9e2b7d4c31", "chat": True}


def _bytes(seed: str, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _eval(ppl: float, kld: float, top1: float) -> dict[str, Any]:
    return {"ppl": ppl, "ppl_ref": PPL_REF, "delta_ppl": round(ppl / PPL_REF - 1, 4), "kld_mean": kld,
            "kld_p99": round(kld * 9.5, 4), "top1": top1, "tokens": 20480, "ctx": 512,
            "eval_set": "builtin:ru-eval", "kld_mode": "the full vocabulary"}


def _gate(ev: dict[str, Any]) -> dict[str, Any]:
    reasons = []
    if ev["delta_ppl"] > GATE["max_ppl_increase"]:
        reasons.append(f"ΔPPL {ev['delta_ppl'] * 100:+.1f}% > {GATE['max_ppl_increase'] * 100:+.0f}%")
    if ev["kld_mean"] > GATE["max_kld"]:
        reasons.append(f"KLD {ev['kld_mean']:.3f} > {GATE['max_kld']}")
    return {"passed": not reasons, "reasons": reasons, **GATE}


def build_workspace(root: Path, fmt: str = "gguf", *, file_size: int = 3000, gate_fail: bool = True,
                    local: bool = False) -> Workspace:
    """A workspace with fake artifacts of one format: small files, realistic manifest entries.

    `gate_fail` makes the smallest artifact fail the quality gate; `local` makes the model a local folder (no
    Hub id).
    """
    ws = Workspace(root)
    ws.set_model({
        "name": MODEL, "source": "./models/T-lite-it-1.0" if local else MODEL, "hub_id": None if local else HUB_ID,
        "path": "/home/someone/.cache/quantkit/T-lite-it-1.0", "architecture": "Qwen2ForCausalLM",
        "family": "qwen2", "dtype": "bfloat16", "instruct": True, "license": "apache-2.0", "params": 7_615_616_512,
        "fingerprint": "0c4d1e7f9a2b3c5d", "readme": "source-README.md",
    })
    (ws.root / "source-README.md").write_text(SOURCE_CARD, encoding="utf-8")
    common = {"calibration": CALIBRATION}
    if fmt == "gguf":
        tools = {"quantkit": "0.1.0", "llama.cpp": "0c1e570", "llama-cpp-python": "0.3.36", "gguf": "0.19.0"}
        command = "quantkit gguf T-lite-it-1.0 --types q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k --eval"
        (ws.dir("gguf") / "imatrix.gguf").write_bytes(_bytes("imatrix", 700))
        for quant, bpw, size, ppl, kld, top1 in GGUF_ROWS:
            if quant == "BF16":  # a llama.cpp split file in two parts
                files = [f"gguf/{MODEL}-BF16-0000{i}-of-00002.gguf" for i in (1, 2)]
            else:
                files = [f"gguf/{MODEL}-{quant}.gguf"]
            for i, rel in enumerate(files):
                ws.abs(rel).write_bytes(_bytes(rel, file_size + 17 * i + len(quant)))
            ev = _eval(ppl, kld, top1)
            entry: dict[str, Any] = {"format": "gguf", "quant": quant, "files": files, "size": size, "bpw": bpw,
                                     "tools": tools, "command": command, "eval": ev}
            if quant != "BF16":
                entry |= common | {"imatrix": True}
                entry["gate"] = _gate(ev) if gate_fail else {"passed": True, "reasons": [], **GATE}
            ws.artifacts[files[0]] = entry
    elif fmt == "exl2":
        tools = {"quantkit": "0.1.0", "exllamav2": "0.3.2", "torch": "2.13.0"}
        (ws.dir("exl2") / "measurement.json").write_text(json.dumps({"measurement": [0.1, 0.2]}), encoding="utf-8")
        for name, bpw, ppl, kld, top1 in EXL2_ROWS:
            folder = ws.dir("exl2", name)
            files = []
            for fname, data in (("config.json", json.dumps({"quantization_config": {"bits": bpw}}).encode()),
                                ("output.safetensors", _bytes(name, file_size)),
                                ("tokenizer.json", b'{"model": {"type": "BPE"}}')):
                (folder / fname).write_bytes(data)
                files.append(f"exl2/{name}/{fname}")
            ev = _eval(ppl, kld, top1)
            ws.artifacts[f"exl2/{name}"] = {
                "format": "exl2", "quant": name, "files": files, "size": int(bpw / 8 * 7.6e9), "bpw": bpw,
                "tools": tools, "command": "quantkit exl2 T-lite-it-1.0 --bits 4.0,5.0,6.5 --eval", "eval": ev,
                "gate": _gate(ev), **common}
    elif fmt == "gptq":
        tools = {"quantkit": "0.1.0", "gptqmodel": "7.6.0", "torch": "2.13.0", "transformers": "5.23.0"}
        for name, bpw, ppl, kld, top1 in GPTQ_ROWS:
            folder = ws.dir("gptq", name)
            files = []
            for fname, data in (("config.json", json.dumps({"quantization_config": {"quant_method": "gptq"}})
                                 .encode()), ("model.safetensors", _bytes(name, file_size))):
                (folder / fname).write_bytes(data)
                files.append(f"gptq/{name}/{fname}")
            ev = _eval(ppl, kld, top1)
            ws.artifacts[f"gptq/{name}"] = {
                "format": "gptq", "quant": name, "files": files, "size": int(bpw / 8 * 7.6e9), "bpw": bpw,
                "tools": tools, "command": f"quantkit gptq T-lite-it-1.0 --bits {name[0]} --group-size 128 --eval",
                "eval": ev, "gate": _gate(ev), **common}
    ws.save()
    return ws


def front_matter(text: str) -> dict[str, Any]:
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "the card must start with a YAML block"
    return yaml.safe_load(m.group(1))


def normalise(text: str) -> str:
    """Tool versions change with every upgrade; the golden card compares everything else."""
    def tools_line(m: re.Match[str]) -> str:
        return re.sub(r"(\w[\w.-]*) [^,]+?(?=,|\.$)", r"\1 <version>", m.group(0))

    return re.sub(r"^- \*\*Tools:\*\* .*$", tools_line, text, flags=re.M)


# -- tests --------------------------------------------------------------------------------------------------------
def test_gguf_card_metadata_and_table(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws")
    text = render_card(ws, "gguf", repo="me/T-lite-it-1.0-GGUF")
    meta = front_matter(text)
    assert meta["base_model"] == HUB_ID
    assert meta["base_model_relation"] == "quantized"
    assert meta["language"] == ["ru"]
    assert meta["license"] == "apache-2.0"
    assert meta["library_name"] == "gguf"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["quantized_by"] == "quantkit"
    assert {"gguf", "imatrix", "quantkit", "russian"} <= set(meta["tags"])
    card = ModelCard(text)
    assert card.data.base_model == HUB_ID and card.data.get("base_model_relation") == "quantized"

    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| [")}
    assert set(rows) == {q for q, *_ in GGUF_ROWS}
    assert "рекомендуется" in rows["Q4_K_M"] and "best balance" in rows["Q4_K_M"]
    assert "рекомендуется" in rows["Q5_K_M"]
    assert "highest quality" in rows["Q8_0"]
    assert "✗" in rows["Q2_K"] and "+27.29%" in rows["Q2_K"]
    assert "4.68 GB" in rows["Q4_K_M"] and "4.91" in rows["Q4_K_M"] and "6.958" in rows["Q4_K_M"]
    assert "+2.14%" in rows["Q4_K_M"] and "0.0312" in rows["Q4_K_M"] and "93.8%" in rows["Q4_K_M"]
    assert "(2 parts)" in rows["BF16"]
    # usage for every GGUF runtime, with the recommended type
    for snippet in ("llama-cli -hf me/T-lite-it-1.0-GGUF:Q4_K_M", "Llama.from_pretrained(",
                    "ollama run hf.co/me/T-lite-it-1.0-GGUF:Q4_K_M", "LM Studio"):
        assert snippet in text
    # how it was made
    assert "64 samples × 512 tokens" in text and "builtin:ru-mix" in text
    assert "llama-cpp-python 0.3.36" in text
    assert "quantkit gguf T-lite-it-1.0 --types" in text
    # the original card, without its metadata, headings nested under ours, relative links made absolute
    original = text.split("## Original model card", 1)[1]
    assert "base_model: Qwen/Qwen2.5-7B" not in text
    assert "### T-lite-it-1.0" in original and "#### Usage" in original
    assert "\n# the model is used with transformers" in original  # a comment in code is not a heading
    assert "https://huggingface.co/t-tech/T-lite-it-1.0/resolve/main/logo.png" in original
    assert "https://huggingface.co/t-tech/T-lite-it-1.0/blob/main/report.pdf" in original
    assert "/home/someone" not in text  # no machine paths


def test_exl2_and_gptq_cards(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "exl2", "exl2")
    text = render_card(ws, "exl2", repo="me/T-lite-it-1.0-EXL2")
    meta = front_matter(text)
    assert meta["library_name"] == "exllamav2" and "exl2" in meta["tags"] and "imatrix" not in meta["tags"]
    assert "hf download me/T-lite-it-1.0-EXL2 --revision 4.0bpw" in text
    assert "huggingface-cli download me/T-lite-it-1.0-EXL2 --revision 4.0bpw" in text
    assert "[4.0bpw](https://huggingface.co/me/T-lite-it-1.0-EXL2/tree/4.0bpw)" in text
    assert "ExLlamaV2DynamicGenerator" in text and "TabbyAPI" in text and "measurement.json" in text

    ws = build_workspace(tmp_path / "gptq", "gptq")
    text = render_card(ws, "gptq", repo="me/T-lite-it-1.0-GPTQ")
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and "gptq" in meta["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("me/T-lite-it-1.0-GPTQ", device_map="auto")' in text
    assert "vllm serve me/T-lite-it-1.0-GPTQ" in text
    assert "tree/8bit-g128" in text and "main (4bit-g128)" in text


def test_card_without_eval_gate_or_source(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws", local=True)
    for entry in ws.artifacts.values():
        for key in ("eval", "gate", "calibration", "tools", "imatrix"):
            entry.pop(key, None)
    ws.save()
    (ws.root / "source-README.md").unlink()
    (ws.root / "gguf" / "imatrix.gguf").unlink()
    text = render_card(ws, "gguf")
    meta = front_matter(text)
    assert meta["base_model"] == MODEL  # a local model: its name
    assert "imatrix" not in meta["tags"]
    assert "have not been evaluated yet" in text
    assert "YOUR-USERNAME/T-lite-it-1.0-GGUF" in text
    assert "original model card was not available" in text
    assert "| — | — | — | — |" in text


def test_card_refuses_an_empty_format(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws")
    with pytest.raises(QuantkitError, match="no exl2 artifacts"):
        render_card(ws, "exl2")


def test_card_cli_writes_into_the_format_folder(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    run = subprocess.run([sys.executable, "-m", "quantkit.cli.app", "card", str(ws.root / "gguf"), "--json",
                          "--repo", "me/T-lite-it-1.0-GGUF"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    card = ws.root / "gguf" / "README.md"
    assert Path(out["path"]) == card and card.is_file()
    assert ModelCard.load(card).data.library_name == "gguf"
    assert "llama-cli -hf me/T-lite-it-1.0-GGUF:Q4_K_M" in card.read_text(encoding="utf-8")


def test_golden_card(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws")
    path = write_card(ws, "gguf", repo="quantkit/T-lite-it-1.0-GGUF")
    text = path.read_text(encoding="utf-8")
    if os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert normalise(text) == normalise(GOLDEN.read_text(encoding="utf-8"))
