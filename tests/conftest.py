"""Shared fixtures: tiny real checkpoints of every registered architecture (Llama-3, Llama-3.1, Qwen2, Qwen3,
Mistral, Mistral-Nemo, a SentencePiece Llama like YandexGPT-5, Gemma 3 text and multimodal) and of the tokenizer
styles llama.cpp must recognise, built once per test session.

Set QUANTKIT_TEST_CACHE to a folder to reuse the built checkpoints across runs while developing.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from quantkit.demo import build_checkpoint

# Widths are multiples of 256 so K-quants apply to every matrix (see FACTS.md).
TINY = dict(vocab_size=2048, hidden=256, layers=2, heads=4, kv_heads=2, ffn=768)


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cached = os.environ.get("QUANTKIT_TEST_CACHE")
    if cached:
        root = Path(cached)
        root.mkdir(parents=True, exist_ok=True)
        return root
    return tmp_path_factory.mktemp("checkpoints")


def _build(root: Path, name: str, family: str, **kw: object) -> Path:
    out = root / name
    if not (out / "config.json").exists():
        build_checkpoint(out, family, **{**TINY, **kw})  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def llama3_ckpt(ckpt_root: Path) -> Path:
    """Llama-3-style base model, trained briefly so quality measurements mean something."""
    return _build(ckpt_root, "tiny-llama3", "llama3", train_steps=120)


@pytest.fixture(scope="session")
def llama31_ckpt(ckpt_root: Path) -> Path:
    """Llama-3.1-style instruct model with llama3 rope scaling."""
    return _build(ckpt_root, "tiny-llama31", "llama31", instruct=True, train_steps=60)


@pytest.fixture(scope="session")
def qwen2_ckpt(ckpt_root: Path) -> Path:
    """Qwen2-style instruct model: attention biases, tied embeddings, ChatML."""
    return _build(ckpt_root, "tiny-qwen2", "qwen2", instruct=True, train_steps=60)


@pytest.fixture(scope="session")
def mistral_ckpt(ckpt_root: Path) -> Path:
    """Mistral-style instruct model with a SentencePiece tokenizer."""
    return _build(ckpt_root, "tiny-mistral", "mistral", instruct=True, train_steps=60)


@pytest.fixture(autouse=True)
def _quantkit_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep every test offline and away from the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("QUANTKIT_CACHE", os.environ.get("QUANTKIT_TEST_DEMO_CACHE", str(tmp_path / "qk-cache")))
    monkeypatch.delenv("HF_TOKEN", raising=False)


def llama_tool(name: str) -> Path | None:
    """A llama.cpp tool (llama-quantize, llama-perplexity) built with llama-cpp-python by scripts/install.sh."""
    import llama_cpp

    path = Path(llama_cpp.__file__).parent.parent / "bin" / name
    return path if path.exists() else None


def run_tool(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    import llama_cpp

    tool = llama_tool(name)
    assert tool is not None, f"{name} is missing: run scripts/install.sh (it builds llama.cpp's tools)"
    lib = Path(llama_cpp.__file__).parent / "lib"
    env = {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{Path(llama_cpp.__file__).parent.parent / 'lib'}"}
    return subprocess.run([str(tool), *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="session")
def nemo_ckpt(ckpt_root: Path) -> Path:
    """Mistral-Nemo-style instruct model: tekken byte-level BPE, head_dim ≠ hidden / heads."""
    return _build(ckpt_root, "tiny-nemo", "nemo", instruct=True, train_steps=60)


@pytest.fixture(scope="session")
def qwen3_ckpt(ckpt_root: Path) -> Path:
    """Qwen3-style instruct model: q/k norms, no biases, head_dim (128) ≠ hidden / heads (64), a thinking template."""
    return _build(ckpt_root, "tiny-qwen3", "qwen3", instruct=True, train_steps=30)


@pytest.fixture(scope="session")
def gemma3_ckpt(ckpt_root: Path) -> Path:
    """Gemma3ForCausalLM: +1 norms, scaled embeddings, 5 sliding-window layers (window 64) and 1 global, SentencePiece
    without a space prefix, embeddings padded past the vocabulary."""
    return _build(ckpt_root, "tiny-gemma3", "gemma3", instruct=True, layers=6, train_steps=30)


@pytest.fixture(scope="session")
def gemma3mm_ckpt(ckpt_root: Path) -> Path:
    """Gemma3ForConditionalGeneration (like saiga_gemma3_12b): the text model under language_model, a vision tower."""
    return _build(ckpt_root, "tiny-gemma3mm", "gemma3mm", instruct=True, layers=6)


@pytest.fixture(scope="session")
def yandexgpt_ckpt(ckpt_root: Path) -> Path:
    """A Llama with a large SentencePiece vocabulary (32,000 pieces) and a ▁ prefix, like YandexGPT-5-Lite."""
    return _build(ckpt_root, "tiny-yandexgpt", "yandexgpt", instruct=True, vocab_size=32000)


def tokenizer_ckpt(root: Path, style: str) -> Path:
    """An untrained Llama whose tokenizer has one of the pre-tokenizer styles of `quantkit.demo.FIXTURES`."""
    return _build(root, f"tiny-tok-{style}", style, train_steps=0)


@pytest.fixture(scope="session")
def gigachat3_ckpt(ckpt_root: Path) -> Path:
    """GigaChat 3 style DeepseekV3ForCausalLM: MLA with query compression, 2 dense layers then 8 routed experts
    (2 per token, 2 groups, sigmoid scores with a correction bias) and a shared expert."""
    return _build(ckpt_root, "tiny-gigachat3", "gigachat3", instruct=True, layers=4, kv_heads=4, train_steps=12)


@pytest.fixture(scope="session")
def gigachat3_noq_ckpt(ckpt_root: Path) -> Path:
    """MLA without query compression, as GigaChat3-10B has it: llama.cpp allows that only with 26 layers (or 27)."""
    return _build(ckpt_root, "tiny-gigachat3-noq", "gigachat3-noq", instruct=True, layers=26, kv_heads=4)
