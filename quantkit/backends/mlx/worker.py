"""The child process that runs mlx_lm.convert (``python -m quantkit.backends.mlx JOB.json``): mlx and mlx-lm (which
imports transformers and torch) load there, never in quantkit's own process, and the memory of the conversion
goes back to the system when it ends."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def unquantizable(source: Path, group_size: int) -> list[tuple[str, int]]:
    """Modules mlx-lm would quantize but cannot with this group size (their input width is not a multiple): it
    would keep them in 16 bits without a word. Read from mlx-lm's own model built lazily (no weights are read)."""
    from mlx_lm.utils import load_model

    model, _ = load_model(source, lazy=True)
    return [(name, int(m.weight.shape[-1])) for name, m in model.named_modules()
            if hasattr(m, "to_quantized") and "weight" in m and int(m.weight.shape[-1]) % group_size]


def convert(job: dict[str, Any]) -> dict[str, Any]:
    """mlx_lm.convert exactly as ``mlx_lm.convert --hf-path SRC --mlx-path OUT -q --q-bits B --q-group-size G``
    runs it; a width the group size does not divide is refused first."""
    source, output = Path(job["source"]), Path(job["output"])
    bad = unquantizable(source, job["group_size"])
    if bad:
        name, width = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return {"error": f"--group-size {job['group_size']} does not divide the input width {width} of mlx-lm's "
                         f"{name}{more}: mlx-lm would leave it unquantized"}
    from mlx_lm.convert import convert as mlx_convert

    mlx_convert(hf_path=str(source), mlx_path=str(output), quantize=True, q_bits=job["bits"],
                q_group_size=job["group_size"])
    index = json.loads((output / "model.safetensors.index.json").read_text(encoding="utf-8"))
    meta = index.get("metadata") or {}
    quantized = sorted({k.rsplit(".", 1)[0] for k in index["weight_map"] if k.endswith(".scales")})
    return {"total_size": meta.get("total_size"), "total_parameters": meta.get("total_parameters"),
            "quantized_modules": len(quantized)}


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m quantkit.backends.mlx JOB.json")
    job = json.loads(Path(argv[1]).read_text(encoding="utf-8"))
    result = convert(job)
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")
    if "error" in result:
        sys.exit(3)
