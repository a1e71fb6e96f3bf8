"""What the card and the publish layout say about MLX: one ``<Model>-MLX`` repo, the recommended bit width on
``main`` (what ``mlx_lm.generate --model REPO`` and LM Studio download: neither picks a branch) and every other on a
branch named after it (``8bit``); mlx-lm and LM Studio usage."""

from __future__ import annotations

from quantkit.backends.base import COMPLETION, PROMPT, CardContext, Entries, FormatInfo
from quantkit.backends.branches import FolderPerBranch
from quantkit.workspace import Workspace


class MLXSections(FolderPerBranch):
    """MLX's format knowledge (`MLXBackend` subclasses it); advice by nominal bits (4 recommended)."""

    name = "mlx"

    def format_info(self) -> FormatInfo:
        return FormatInfo(title="MLX", library="mlx", tag="mlx", repo_suffix="MLX",
                          runtimes="mlx-lm and LM Studio on Apple silicon",
                          calibrated="MLX's round-to-nearest quantization uses no calibration text",
                          uses_calibration=False,
                          choose_hint=" More bits need more unified memory and lose less.")

    def advice(self, quant: str, bpw: float | None) -> str:
        """By the nominal bit width: the measured bits per weight include the per-group scales."""
        return super().advice(quant, None)

    def card_usage(self, ctx: CardContext) -> str:
        others = sorted(b for b in ctx.branches.values() if b != ctx.branch)
        text = usage(ctx.model_name, ctx.repo, ctx.branch, ctx.instruct, others)
        return TEXT_ONLY + text if text_only(ctx.ws) else text

    def card_provenance(self, ws: Workspace, arts: Entries) -> list[str]:
        groups = sorted({int(e["group_size"]) for _, e in arts if e.get("group_size")})
        lines = [f"- **Conversion:** `mlx_lm.convert -q` (affine, group size {', '.join(map(str, groups)) or '?'}): "
                 "every linear layer and the embeddings quantized, one bf16 scale and bias per group."]
        fixes = sorted({f for _, e in arts for f in e.get("config_fixes") or []})
        if fixes:
            told = ", ".join(f"`{f}` (from `{_FIX_SOURCES.get(f.rsplit('.', 1)[-1], '?')}`)" for f in fixes)
            lines.append(f"- **config.json:** {told} added: mlx-lm reads these names only, not the ones "
                         "transformers 5 writes.")
        return lines


_FIX_SOURCES = {"rope_theta": "rope_parameters", "rope_scaling": "rope_parameters",
                "rope_local_base_freq": "rope_parameters", "sliding_window_pattern": "layer_types",
                "vocab_size": "text_config", "torch_dtype": "dtype"}
TEXT_ONLY = ("These MLX files hold the **text model only**: mlx-lm leaves the vision tower out, so the model reads "
             "no images here.\n\n")


def text_only(ws: Workspace) -> bool:
    """The original has parts mlx-lm leaves out (a vision tower)."""
    from quantkit.arch import lookup

    cls = lookup(str(ws.model.get("architecture") or ""))
    return bool(cls and cls.skip_tensors is not None)


def usage(model: str, repo: str, branch: str, instruct: bool, others: list[str]) -> str:
    """mlx-lm's command line and Python API, LM Studio, and where the other bit widths are."""
    prompt = PROMPT if instruct else COMPLETION
    tokens = 256 if instruct else 128
    rev = f', revision="{branch}"' if branch != "main" else ""
    if instruct:
        python_prompt = (f'messages = [{{"role": "user", "content": "{PROMPT}"}}]\n'
                         "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)\n")
        template = "; `mlx_lm.generate` applies the chat template shipped with the files"
    else:
        python_prompt = f'prompt = "{COMPLETION}"\n'
        template = ""
    target = repo if branch == "main" else f"{model}-MLX-{branch}"
    fetch = "" if branch == "main" else (f"hf download {repo} --revision {branch} --local-dir {target}\n")
    text = f"""**mlx-lm** on a Mac with Apple silicon (`pip install mlx-lm`){template}:

```bash
{fetch}mlx_lm.generate --model {target} --prompt "{prompt}" --max-tokens {tokens}
```

```python
from mlx_lm import generate, load

model, tokenizer = load("{repo}"{rev})
{python_prompt}print(generate(model, tokenizer, prompt=prompt, max_tokens={tokens}))
```

**LM Studio** (Apple silicon; it runs MLX models through mlx-lm): search for `{repo}` in its model search and
download it; it takes the `main` branch."""
    if others:
        first = others[0]
        text += f"""

The other bit widths live in branches ({", ".join(f"`{b}`" for b in others)}). `mlx_lm.generate --model` and LM
Studio read `main` only, so download a branch first, then point `--model` at the folder (or put it into LM Studio's
models folder, `~/.lmstudio/models/<publisher>/<name>`); in Python, `load("{repo}", revision="{first}")`:

```bash
hf download {repo} --revision {first} --local-dir {model}-MLX-{first}
mlx_lm.generate --model {model}-MLX-{first} --prompt "{prompt}" --max-tokens {tokens}
```"""
    return text
