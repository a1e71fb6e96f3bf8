"""What mlx_lm.convert reads: links to the weights and tokenizer, and a config.json that mlx-lm 0.32 reads right.

mlx-lm's model classes read the transformers-4 names of a config; transformers 5 writes other ones, and mlx-lm then
silently builds a different model (measured: Llama-3 and Mistral logits are wrong with RoPE base 10000). So:

- ``rope_parameters`` → top-level ``rope_theta`` and, for a non-default RoPE type, ``rope_scaling`` (Llama, Mistral,
  Qwen2, DeepSeek-V3 read only those); Gemma 3's per-layer-type RoPE → ``rope_theta``, ``rope_local_base_freq``
  and ``rope_scaling`` (of the global layers);
- Gemma 3: ``sliding_window_pattern`` from ``layer_types`` (mlx-lm ignores ``layer_types`` and assumes 6); a layer
  layout mlx-lm cannot express (no global layer, or an irregular one) is refused;
- Gemma 3 multimodal: a top-level ``vocab_size`` (mlx-lm assumes 262208 otherwise); the output is text-only;
- ``dtype`` → ``torch_dtype`` (mlx_lm.convert casts only to a ``torch_dtype``).

The fixed values land in the output's config.json too, which is what mlx-lm and LM Studio read back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from quantkit.child import link
from quantkit.errors import QuantkitError
from quantkit.source import TOKENIZER_FILES, Checkpoint
from quantkit.workspace import temp_name

SOURCE_EXTRA_FILES = ("generation_config.json",)
_DTYPES = ("bfloat16", "float16", "float32")


def _rope(cfg: dict[str, Any], fixes: list[str], where: str) -> None:
    """Top-level RoPE keys of one (text) config from its ``rope_parameters``, in place."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return
    if isinstance(params.get("full_attention"), dict):  # Gemma 3: one entry per layer type
        full, local = params["full_attention"], params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise QuantkitError(f"mlx-lm 0.32 cannot scale the sliding-window layers' RoPE ({local['rope_type']})",
                                "quantize this checkpoint to GGUF instead")
        pairs = [("rope_theta", full.get("rope_theta")), ("rope_local_base_freq", local.get("rope_theta"))]
    else:
        full = params
        pairs = [("rope_theta", params.get("rope_theta"))]
    for key, value in pairs:
        if cfg.get(key) is None and value is not None:
            cfg[key] = value
            fixes.append(where + key)
    if full.get("rope_type", full.get("type", "default")) not in (None, "default") and not cfg.get("rope_scaling"):
        cfg["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
        fixes.append(where + "rope_scaling")


def _gemma_pattern(cfg: dict[str, Any], fixes: list[str], where: str) -> None:
    """Gemma 3's ``sliding_window_pattern`` as mlx-lm needs it: every p-th layer global, at least p layers."""
    n = int(cfg.get("num_hidden_layers") or 0)
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        if "full_attention" not in types:
            raise QuantkitError(f"mlx-lm 0.32 runs Gemma 3 only with a global-attention layer; all {n} layers of "
                                "this checkpoint use a sliding window", "quantize it to GGUF instead")
        p = types.index("full_attention") + 1
        want = ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(len(types))]
        if types != want:
            raise QuantkitError(f"mlx-lm 0.32 needs Gemma 3's global layers every {p}th layer; this checkpoint's "
                                "layer_types are irregular", "quantize it to GGUF instead")
    else:
        p = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        if n < p:
            raise QuantkitError(f"mlx-lm 0.32 needs at least {p} layers in Gemma 3 (one global layer every {p}); "
                                f"this checkpoint has {n}", "quantize it to GGUF instead")
    if cfg.get("sliding_window_pattern") != p:
        cfg["sliding_window_pattern"] = p
        fixes.append(where + "sliding_window_pattern")


def fix_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A copy of a Hugging Face config that mlx-lm 0.32 reads as transformers does, and the keys set (see the module
    docstring); `QuantkitError` for a layout mlx-lm cannot run."""
    fixed = json.loads(json.dumps(config))
    fixes: list[str] = []
    text = fixed.get("text_config")
    for cfg, where in ((fixed, ""), *(((text, "text_config."),) if isinstance(text, dict) else ())):
        _rope(cfg, fixes, where)
        if str(cfg.get("model_type", "")).startswith("gemma3"):
            if cfg is fixed and isinstance(text, dict):
                continue  # the multimodal wrapper: its text_config has the layers
            _gemma_pattern(cfg, fixes, where)
    if isinstance(text, dict) and fixed.get("vocab_size") is None and text.get("vocab_size") is not None:
        fixed["vocab_size"] = text["vocab_size"]
        fixes.append("vocab_size")
    if fixed.get("torch_dtype") is None and fixed.get("dtype") in _DTYPES:
        fixed["torch_dtype"] = fixed["dtype"]
        fixes.append("torch_dtype")
    return fixed, fixes


def prepare_source(ckpt: Checkpoint, dest: Path) -> list[str]:
    """`dest` as mlx_lm.convert's input: links to the weights (named ``model*.safetensors``, the only ones mlx-lm
    reads), tokenizer files and generation config, and a fixed config.json; returns the keys it fixed. No README
    and no ``*.py``: mlx_lm.convert copies those into its output."""
    fixed, fixes = fix_config(ckpt.config)
    tmp = temp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = ckpt.tensors.files
    for file in [f for f in files if f.name.startswith("model")] or files:
        link(file, tmp / (file.name if file.name.startswith("model") else f"model-{file.name}"))
    for name in (*TOKENIZER_FILES, *SOURCE_EXTRA_FILES):
        if (ckpt.path / name).exists():
            link(ckpt.path / name, tmp / name)
    (tmp / "config.json").write_text(json.dumps(fixed, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return fixes
