"""The converter's input folder: links to the weights and tokenizer, and a config.json exllamav2 reads correctly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from quantkit.child import link
from quantkit.source import TOKENIZER_FILES, Checkpoint
from quantkit.workspace import temp_name, write_json_atomic

SOURCE_EXTRA_FILES = ("generation_config.json",)


def fix_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a Hugging Face config that exllamav2 reads correctly.

    transformers 5 saves RoPE settings under ``rope_parameters``; exllamav2 reads top-level ``rope_theta`` and
    ``rope_scaling`` and silently falls back to a base of 10000. Both are copied to the top level (``rope_scaling``
    only for a non-default RoPE type). exllamav2 also ignores ``use_sliding_window: false``, so the window is
    dropped then.
    """
    fixed = dict(config)
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if fixed.get("rope_theta") is None and params.get("rope_theta") is not None:
            fixed["rope_theta"] = params["rope_theta"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in (None, "default") and not fixed.get("rope_scaling"):
            fixed["rope_scaling"] = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
        if fixed.get("partial_rotary_factor") is None and params.get("partial_rotary_factor") is not None:
            fixed["partial_rotary_factor"] = params["partial_rotary_factor"]
        if (rope_type in ("longrope", "su") and "original_max_position_embeddings" in params
                and "original_max_position_embeddings" not in fixed):
            fixed["original_max_position_embeddings"] = params["original_max_position_embeddings"]
    if fixed.get("use_sliding_window") is False and fixed.get("sliding_window"):
        fixed["sliding_window"] = None
    return fixed


def fix_config_file(path: Path) -> None:
    """Apply `fix_config` to a config.json in place (atomically)."""
    config = json.loads(path.read_text(encoding="utf-8"))
    fixed = fix_config(config)
    if fixed != config:
        write_json_atomic(path, fixed)


def prepare_source(ckpt: Checkpoint, dest: Path) -> Path:
    """`dest` as the converter's input: links to the weights and tokenizer files and a fixed config.json.

    No safetensors index and no README: the converter copies every non-weight file into its output.
    """
    tmp = temp_name(dest)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in sorted(ckpt.path.glob("*.safetensors")):
        link(file, tmp / file.name)
    for name in (*TOKENIZER_FILES, *SOURCE_EXTRA_FILES):
        if (ckpt.path / name).exists():
            link(ckpt.path / name, tmp / name)
    config = json.loads((ckpt.path / "config.json").read_text(encoding="utf-8"))
    (tmp / "config.json").write_text(json.dumps(fix_config(config), indent=2, ensure_ascii=False) + "\n",
                                     encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
