"""What the card and the publish layout say about FP8: one model folder on ``main`` (so ``vllm serve REPO`` and
``from_pretrained(REPO)`` work), vLLM and transformers usage, and how the weights were made."""

from __future__ import annotations

from pathlib import Path

from quantkit.backends.base import (
    RECOMMENDED,
    BackendBase,
    CardContext,
    Entries,
    FormatInfo,
    relative_path,
)
from quantkit.backends.snippets import transformers_generate, vllm_generate
from quantkit.workspace import Workspace


class FP8Sections(BackendBase):
    """FP8's format knowledge (`FP8Backend` subclasses it)."""

    name = "fp8"

    def format_info(self) -> FormatInfo:
        return FormatInfo(title="FP8", library="transformers", tag="fp8", repo_suffix="FP8",
                          runtimes="vLLM (and transformers with compressed-tensors)",
                          calibrated="FP8_DYNAMIC needs no calibration data; the files were checked on Russian text",
                          uses_calibration=False)

    def advice(self, quant: str, bpw: float | None) -> str:
        return f"{RECOMMENDED}: near-lossless, half the size of bf16; fast on GPUs with FP8 (Ada, Hopper and newer)"

    def card_tags(self, ws: Workspace, arts: Entries) -> list[str]:
        return ["compressed-tensors", "vllm", "8-bit"]

    def repo_path(self, ws: Workspace, key: str, file: Path | None) -> str:
        """Inside the artifact's folder: the repo is the model folder itself."""
        return super().repo_path(ws, key, file) if file is None else relative_path(file, ws.abs(key))

    def card_usage(self, ctx: CardContext) -> str:
        return usage(ctx.repo, ctx.instruct)

    def card_provenance(self, ws: Workspace, arts: Entries) -> list[str]:
        ignore = next((e.get("ignore") for _, e in arts if e.get("ignore")), None) or ["lm_head"]
        kept = ", ".join(f"`{i}`" for i in ignore)
        return ["- **Scheme:** FP8_DYNAMIC in the compressed-tensors format, as llm-compressor writes it: every "
                "Linear layer of the decoder as float8 E4M3 with one bf16 scale per output channel (symmetric "
                "min-max, no calibration data), activations quantized per token at run time; embeddings, norms "
                f"and the modules in `ignore` ({kept}) stay in the original dtype."]


def usage(repo: str, instruct: bool) -> str:
    """vLLM first (it runs FP8 kernels), then transformers (which needs compressed-tensors)."""
    vllm, gen = vllm_generate(repo, instruct), transformers_generate(instruct)
    return f"""**vLLM** (reads the FP8 settings from `config.json`; its FP8 kernels need an Ada, Hopper or newer GPU;
on Ampere it runs the weights weight-only through its FP8 Marlin kernel):

```bash
vllm serve {repo}
```

```python
{vllm}
```

**transformers** (needs `pip install compressed-tensors`; keeps the FP8 weights and quantizes activations the same
way, slower than vLLM):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}")
model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")
{gen}
```"""
