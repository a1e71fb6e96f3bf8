"""What the card and the publish layout say about GPTQ: the recommended variant on ``main`` (so
``from_pretrained(repo)`` works) and each other variant on a branch named after its folder, transformers / vLLM
usage (GPTQModel for a mixture of experts), advice by bits, and offline size estimates."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from quantkit.backends.base import RECOMMENDED, BackendBase, CardContext, Entries, FormatInfo, bits_of, relative_path
from quantkit.workspace import Workspace

PROMPT = "Расскажи в двух предложениях, чем знаменит Байкал."
COMPLETION = "Байкал — самое глубокое озеро на планете. Его вода"


class GPTQSections(BackendBase):
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

    def branches(self, arts: Entries) -> dict[str, str]:
        """The recommended variant on ``main``, any other on a branch named after its folder (``8bit-g128``)."""
        if not arts:
            return {}
        main = self.recommended(arts)[0]
        return {k: "main" if k == main else PurePosixPath(k).name for k, _ in arts}

    def repo_path(self, ws: Workspace, key: str, file: Path | None) -> str:
        """Inside the artifact's folder: each variant is a whole model on its own branch."""
        return super().repo_path(ws, key, file) if file is None else relative_path(file, ws.abs(key))

    def card_usage(self, ctx: CardContext) -> str:
        others = sorted(b for b in ctx.branches.values() if b != ctx.branch)
        text = usage(ctx.repo, ctx.branch, ctx.instruct, others)
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


def usage(repo: str, branch: str, instruct: bool, others: list[str]) -> str:
    rev = f', revision="{branch}"' if branch != "main" else ""
    rev_cli = f" --revision {branch}" if branch != "main" else ""
    if instruct:
        gen = (
            f'messages = [{{"role": "user", "content": "{PROMPT}"}}]\n'
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",\n"
            "                                       return_dict=True).to(model.device)\n"
            "out = model.generate(**inputs, max_new_tokens=256)\n"
            "print(tokenizer.decode(out[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"
        )
        vllm = (
            "from vllm import LLM, SamplingParams\n\n"
            f'llm = LLM(model="{repo}"{rev})\n'
            f'out = llm.chat([{{"role": "user", "content": "{PROMPT}"}}], SamplingParams(max_tokens=256))\n'
            "print(out[0].outputs[0].text)"
        )
    else:
        gen = (
            f'inputs = tokenizer("{COMPLETION}", return_tensors="pt").to(model.device)\n'
            "out = model.generate(**inputs, max_new_tokens=128)\n"
            "print(tokenizer.decode(out[0], skip_special_tokens=True))"
        )
        vllm = (
            "from vllm import LLM, SamplingParams\n\n"
            f'llm = LLM(model="{repo}"{rev})\n'
            f'out = llm.generate(["{COMPLETION}"], SamplingParams(max_tokens=128))\n'
            "print(out[0].outputs[0].text)"
        )
    return f"""**transformers** (needs `pip install gptqmodel` for the GPTQ kernels):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo}"{rev})
model = AutoModelForCausalLM.from_pretrained("{repo}"{rev}, device_map="auto")
{gen}
```

**vLLM** (reads the GPTQ settings from `config.json`):

```bash
vllm serve {repo}{rev_cli}
```

```python
{vllm}
```""" + (f"""

The other variants live in branches ({", ".join(f"`{b}`" for b in others)}): pass `revision="{others[0]}"` to
`from_pretrained` and `LLM`, or `--revision {others[0]}` to `vllm serve`.""" if others else "")
