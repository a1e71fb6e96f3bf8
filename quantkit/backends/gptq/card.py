"""What the card and the publish layout say about GPTQ: the recommended variant on ``main`` (so
``from_pretrained(repo)`` works) and each other variant on a branch named after its folder, transformers / vLLM
usage (GPTQModel for a mixture of experts), advice by bits, and offline size estimates."""

from __future__ import annotations

from quantkit.backends.base import RECOMMENDED, CardContext, FormatInfo, bits_of
from quantkit.backends.branches import FolderPerBranch
from quantkit.backends.snippets import transformers_generate, vllm_generate
from quantkit.workspace import Workspace


class GPTQSections(FolderPerBranch):
    """GPTQ's format knowledge (`GPTQBackend` subclasses it)."""

    name = "gptq"

    def format_info(self) -> FormatInfo:
        return FormatInfo(title="GPTQ", library="transformers", tag="gptq", repo_suffix="GPTQ",
                          runtimes="transformers and vLLM", calibrated="GPTQ was calibrated on Russian text")

    def advice(self, quant: str, bpw: float | None) -> str:
        bits = bits_of(quant, bpw)
        if bits is None:
            return ""
        if bits >= 8:
            return "highest quality"
        if bits >= 4:
            return f"{RECOMMENDED}: best balance, fast kernels in vLLM and transformers"
        return "smallest, noticeable quality loss"

    def card_usage(self, ctx: CardContext) -> str:
        others = sorted(b for b in ctx.branches.values() if b != ctx.branch)
        text = usage(ctx.repo, ctx.branch, ctx.instruct, others, fmt=self.format_info().title)
        return moe_note(ctx.repo, ctx.branch) + text if routed_experts(ctx.ws) else text


def routed_experts(ws: Workspace) -> bool:
    """The model is a mixture of experts with routed experts."""
    from quantkit.arch import lookup

    cls = lookup(str(ws.model.get("architecture") or ""))
    return bool(cls and cls.routed_experts)


def moe_note(repo: str, branch: str) -> str:
    """transformers 5 fuses a mixture of experts' weights and cannot load per-expert GPTQ weights into them."""
    rev = f', revision="{branch}"' if branch != "main" else ""
    return f"""**GPTQModel** (a mixture of experts: transformers 5 fuses the experts and would leave the quantized ones
unloaded; GPTQModel keeps one module per expert, and so do vLLM and SGLang):

```python
from gptqmodel import GPTQModel

model = GPTQModel.load("{repo}"{rev})
```

"""


def usage(repo: str, branch: str, instruct: bool, others: list[str], fmt: str = "GPTQ") -> str:
    rev = f', revision="{branch}"' if branch != "main" else ""
    rev_cli = f" --revision {branch}" if branch != "main" else ""
    gen, vllm = transformers_generate(instruct), vllm_generate(repo, instruct, rev)
    return f"""**transformers** (needs `pip install gptqmodel` for the {fmt} kernels):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}"{rev})
model = AutoModelForCausalLM.from_pretrained("{repo}"{rev}, device_map="auto")
{gen}
```

**vLLM** (reads the {fmt} settings from `config.json`):

```bash
vllm serve {repo}{rev_cli}
```

```python
{vllm}
```""" + (f"""

The other variants live in branches ({", ".join(f"`{b}`" for b in others)}): pass `revision="{others[0]}"` to
`from_pretrained` and `LLM`, or `--revision {others[0]}` to `vllm serve`.""" if others else "")
