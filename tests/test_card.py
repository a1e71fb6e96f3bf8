"""The model card: metadata the Hub understands, a table of every file, usage, provenance, the original card.

Two kinds of workspace feed these tests:

- `measured_workspace` (slow): a real, measured one. A tiny Llama-3-style checkpoint (the `llama3_ckpt` session
  fixture) goes through the real GGUF pipeline and `quantkit eval`; the golden card in tests/data/example-card.md
  is rendered from it, so every figure in that file was measured. Sizes and scores may differ in the last digits
  on another CPU, so the comparison masks the numbers in the file table and the bf16 reference score (and tool
  versions and machine paths). Run this file with QUANTKIT_UPDATE_GOLDEN=1 to rewrite the golden card after an
  intended change; the committed file keeps the real numbers of the machine that wrote it.
- `build_workspace`: a synthetic example ("synthetic-example", "example-org/synthetic-example") for what a tiny
  checkpoint cannot show cheaply: EXL2 and GPTQ cards, a gate-failed row, a BF16 file split in parts. Its sizes,
  perplexities and KL-divergences are synthetic test inputs, not measurements of any model. test_publish.py uses
  it too.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
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

# -- the synthetic example: made-up model, made-up numbers (test inputs, not measurements) -------------------------
MODEL = "synthetic-example"
HUB_ID = "example-org/synthetic-example"

SOURCE_CARD = """---
language:
- ru
license: apache-2.0
base_model: example-org/synthetic-base
pipeline_tag: text-generation
---
# synthetic-example

![logo](./logo.png)

**🚨 A synthetic example model card** for quantkit's tests; no such model exists.

## Usage

```python
# the model is used with transformers
from transformers import AutoModelForCausalLM
```

## Benchmarks

See the [report](report.pdf) and the [licence](https://example.org/licence).
"""

# Synthetic test inputs, not measurements of any model:
# quant, bits/weight, size on the Hub (bytes), ppl, kld_mean, top-1; the bf16 reference PPL is 6.812
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
                    local: bool = False, verified: bool = True) -> Workspace:
    """The synthetic example: fake artifacts of one format (small files) and manifest entries whose numbers are
    synthetic test inputs, not measurements.

    `gate_fail` makes the smallest artifact fail the quality gate; `local` makes the model a local folder (no
    Hub id); `verified` records every file's hash and a passed verification of those bytes, as a run would.
    """
    ws = Workspace(root)
    ws.set_model({
        "name": MODEL, "source": f"./models/{MODEL}" if local else HUB_ID, "hub_id": None if local else HUB_ID,
        "path": f"/home/someone/.cache/quantkit/{MODEL}", "architecture": "Qwen2ForCausalLM",
        "family": "qwen2", "dtype": "bfloat16", "instruct": True, "license": "apache-2.0", "params": 7_615_616_512,
        "fingerprint": "0c4d1e7f9a2b3c5d", "readme": "source-README.md",
    })
    (ws.root / "source-README.md").write_text(SOURCE_CARD, encoding="utf-8")
    common = {"calibration": CALIBRATION}
    if fmt == "gguf":
        tools = {"quantkit": "0.1.0", "llama.cpp": "0c1e570", "llama-cpp-python": "0.3.36", "gguf": "0.19.0"}
        command = f"quantkit gguf {HUB_ID} --types q8_0,q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k --eval"
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
                "tools": tools, "command": f"quantkit exl2 {HUB_ID} --bits 4.0,5.0,6.5 --eval", "eval": ev,
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
                "tools": tools, "command": f"quantkit gptq {HUB_ID} --bits {name[0]} --group-size 128 --eval",
                "eval": ev, "gate": _gate(ev), **common}
    if verified:
        mark_verified(ws)
    ws.save()
    return ws


def mark_verified(ws: Workspace) -> None:
    """Each artifact's files hashed, and verified as those bytes (what a run records)."""
    from quantkit.quality.verify import current_hashes

    for entry in ws.artifacts.values():
        hashes = current_hashes(ws, entry)
        entry.update(sha256=hashes, verify={"passed": True, "sha256": hashes})


def front_matter(text: str) -> dict[str, Any]:
    m = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert m, "the card must start with a YAML block"
    return yaml.safe_load(m.group(1))


_NUMBER = r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?"


def normalise(text: str, paths: dict[str, str] | None = None) -> str:
    """What the golden comparison ignores: tool versions, machine paths and the command, and the measured numbers
    (file sizes and scores in the table rows, the bf16 reference score), which may differ in the last digits on
    another CPU. Everything else (words, types, file names, links, columns, tokens and context) must match."""
    for path, placeholder in (paths or {}).items():
        text = text.replace(path, placeholder)

    def tools_line(m: re.Match[str]) -> str:
        return re.sub(r"(\w[\w.-]*) [^,]+?(?=,|\.$)", r"\1 <version>", m.group(0))

    text = re.sub(r"^- \*\*Tools:\*\* .*$", tools_line, text, flags=re.M)
    text = re.sub(r"\bquantkit v?\d[\w.+-]*\d", "quantkit <version>", text)  # the demo model's own card
    text = re.sub(r"(that made these files:\n\n```bash\n).*?(\n```)", r"\1<command>\2", text, flags=re.S)
    text = re.sub(r"^\| \[.*$", lambda m: re.sub(_NUMBER, "<n>", m.group(0)), text, flags=re.M)
    return re.sub(r"(The bf16 original scores )" + _NUMBER, r"\1<n>", text)


# -- tests --------------------------------------------------------------------------------------------------------
def test_gguf_card_metadata_and_table(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "ws")
    text = render_card(ws, "gguf", repo="me/synthetic-example-GGUF")
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
    for snippet in ("llama-cli -hf me/synthetic-example-GGUF:Q4_K_M", "Llama.from_pretrained(",
                    "ollama run hf.co/me/synthetic-example-GGUF:Q4_K_M", "LM Studio"):
        assert snippet in text
    # how it was made
    assert "64 samples × 512 tokens" in text and "builtin:ru-mix" in text
    assert "llama-cpp-python 0.3.36" in text
    assert f"quantkit gguf {HUB_ID} --types" in text
    # the original card, without its metadata, headings nested under ours, relative links made absolute
    original = text.split("## Original model card", 1)[1]
    assert "base_model: example-org/synthetic-base" not in text
    assert "### synthetic-example" in original and "#### Usage" in original
    assert "\n# the model is used with transformers" in original  # a comment in code is not a heading
    assert "https://huggingface.co/example-org/synthetic-example/resolve/main/logo.png" in original
    assert "https://huggingface.co/example-org/synthetic-example/blob/main/report.pdf" in original
    assert "(https://example.org/licence)" in original
    assert "/home/someone" not in text  # no machine paths


def test_exl2_and_gptq_cards(tmp_path: Path) -> None:
    ws = build_workspace(tmp_path / "exl2", "exl2")
    text = render_card(ws, "exl2", repo="me/synthetic-example-EXL2")
    meta = front_matter(text)
    assert meta["library_name"] == "exllamav2" and "exl2" in meta["tags"] and "imatrix" not in meta["tags"]
    assert "hf download me/synthetic-example-EXL2 --revision 4.0bpw" in text
    assert "huggingface-cli download me/synthetic-example-EXL2 --revision 4.0bpw" in text
    assert "[4.0bpw](https://huggingface.co/me/synthetic-example-EXL2/tree/4.0bpw)" in text
    assert "ExLlamaV2DynamicGenerator" in text and "TabbyAPI" in text and "measurement.json" in text

    ws = build_workspace(tmp_path / "gptq", "gptq")
    text = render_card(ws, "gptq", repo="me/synthetic-example-GPTQ")
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and "gptq" in meta["tags"]
    assert 'AutoModelForCausalLM.from_pretrained("me/synthetic-example-GPTQ", device_map="auto")' in text
    assert "vllm serve me/synthetic-example-GPTQ" in text
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
    assert f"YOUR-USERNAME/{MODEL}-GGUF" in text
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
                          "--repo", "me/synthetic-example-GGUF"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    card = ws.root / "gguf" / "README.md"
    assert Path(out["path"]) == card and card.is_file()
    assert ModelCard.load(card).data.library_name == "gguf"
    assert "llama-cli -hf me/synthetic-example-GGUF:Q4_K_M" in card.read_text(encoding="utf-8")


# -- the measured example: a real tiny model through the real pipeline --------------------------------------------
GOLDEN_REPO = "example-user/tiny-llama3-GGUF"


@pytest.fixture(scope="module")
def measured_workspace(llama3_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """tiny-llama3 quantized to Q4_K_M and Q8_0 (plus the BF16 reference) with a small imatrix, then evaluated:
    every size and score in it was measured here."""
    from quantkit.backends.base import JobContext
    from quantkit.backends.gguf.backend import GGUFOptions
    from quantkit.pipeline import make
    from quantkit.quality.evaluate import evaluate_workspace
    from quantkit.source import load_local
    from quantkit.workspace import record_model

    root = tmp_path_factory.mktemp("measured")
    with pytest.MonkeyPatch.context() as mp:  # offline and away from the user's caches, as conftest does per test
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.setenv("HF_HOME", str(root / "hf-home"))
        mp.setenv("QUANTKIT_CACHE", os.environ.get("QUANTKIT_TEST_DEMO_CACHE", str(root / "qk-cache")))
        mp.delenv("HF_TOKEN", raising=False)
        ws = Workspace(root / "ws")
        ckpt = load_local(llama3_ckpt, name="tiny-llama3", source=str(llama3_ckpt))
        ctx = JobContext.of(ckpt, ws, calib_samples=8, calib_seq_len=128)
        make(ctx, "gguf", GGUFOptions(types=["Q4_K_M", "Q8_0"], verify=False))
        record_model(ws, ckpt)
        evaluate_workspace(ws, n_ctx=128, chunks=4)
        yield ws


def _machine_paths(ws: Workspace, ckpt: Path) -> dict[str, str]:
    return {str(ws.root): "<workspace>", str(ckpt): "<checkpoint>"}


@pytest.mark.slow
def test_measured_card_shows_the_measurements(measured_workspace: Workspace, llama3_ckpt: Path) -> None:
    from quantkit.workspace import human_size

    ws = measured_workspace
    path = write_card(ws, "gguf", repo=GOLDEN_REPO)
    text = path.read_text(encoding="utf-8")
    assert path == ws.root / "gguf" / "README.md" and text == render_card(ws, "gguf", repo=GOLDEN_REPO)
    meta = front_matter(text)
    assert meta["base_model"] == "tiny-llama3"  # a local model: its name
    assert meta["library_name"] == "gguf" and {"gguf", "imatrix", "quantkit", "russian"} <= set(meta["tags"])
    assert "conversational" not in meta["tags"]  # a base model
    assert meta["license"] == "apache-2.0"

    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| [")}
    assert set(rows) == {"BF16", "Q8_0", "Q4_K_M"}
    for entry in ws.artifacts.values():  # every figure in the table is the workspace's own measurement
        ev, row = entry["eval"], rows[entry["quant"]]
        for cell in (human_size(entry["size"]), f"{entry['bpw']:.2f}", f"{ev['ppl']:.3f}",
                     f"{ev['delta_ppl'] * 100:+.2f}%", f"{ev['kld_mean']:.4f}", f"{ev['top1'] * 100:.1f}%"):
            assert f"| {cell} |" in row, (cell, row)
        assert "✗" not in row
    ref = ws.artifacts["gguf/tiny-llama3-BF16.gguf"]["eval"]["ppl_ref"]
    assert f"The bf16 original scores {ref:.3f}." in text
    assert "рекомендуется" in rows["Q4_K_M"] and "highest quality" in rows["Q8_0"]
    assert f"llama-cli -hf {GOLDEN_REPO}:Q4_K_M -no-cnv" in text  # a base model continues text
    assert "8 samples × 128 tokens = 1,024 tokens" in text and "context 128" in text
    assert "### quantkit demo (llama3)" in text.split("## Original model card", 1)[1]
    assert str(ws.root) not in text and str(llama3_ckpt) not in text  # no machine paths


@pytest.mark.slow
def test_golden_card(measured_workspace: Workspace, llama3_ckpt: Path) -> None:
    text = render_card(measured_workspace, "gguf", repo=GOLDEN_REPO)
    if os.environ.get("QUANTKIT_UPDATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    paths = _machine_paths(measured_workspace, llama3_ckpt)
    assert normalise(text, paths) == normalise(GOLDEN.read_text(encoding="utf-8"), paths)


def test_golden_normalisation_masks_only_measurements() -> None:
    """The masking stays narrow: measured numbers may move, words, types and the evaluation setup may not."""
    golden = GOLDEN.read_text(encoding="utf-8")
    row = next(line for line in golden.splitlines() if line.startswith("| [") and "| Q4_K_M |" in line)
    moved = re.sub(r"\| (\d+)\.(\d+) MB \|", lambda m: f"| {int(m.group(1)) + 1}.{m.group(2)} MB |", row)
    assert moved != row
    assert normalise(golden.replace(row, moved)) == normalise(golden)
    assert normalise(re.sub(r"scores \d+\.\d+\.", "scores 1.000.", golden)) == normalise(golden)
    for before, after in ((row, row.replace("| Q4_K_M |", "| Q4_K_S |")), ("context 128", "context 256"),
                          ("tiny-llama3-Q8_0.gguf", "tiny-llama3-Q8_1.gguf"), ("= 1,024 tokens", "= 2,048 tokens")):
        assert before in golden
        assert normalise(golden.replace(before, after)) != normalise(golden), before
