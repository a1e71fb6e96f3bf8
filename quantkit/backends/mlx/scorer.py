"""Scoring and greedy generation of an MLX model for verification, `quantkit eval` and the drift check, through
mlx-lm's own loader and quantized kernels (imported only here, lazily: ``import mlx_lm`` takes seconds).

The quantized weights stay as mlx-lm packed them; the scales, biases and the other 16-bit parameters are widened
to float32 before use (exact), so activations are computed in float32. On a CPU mlx's bf16 quantized matmul is
about 8x slower than the float32 one (measured), and float32 activations give the quantization's own error, which
is what the bf16 reference (float32 too) is compared against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.backends.mlx.options import INSTALL_HINT
from quantkit.errors import MissingDependency, QuantkitError


class MLXScorer:
    """Next-token logits and greedy answers of an MLX model folder through mlx-lm."""

    def __init__(self, path: Path, *, n_ctx: int) -> None:
        try:
            import mlx.core as mx
            from mlx_lm.utils import load_model
        except ImportError as exc:
            raise MissingDependency(f"cannot load mlx-lm: {exc}", INSTALL_HINT) from exc
        self._mx = mx
        self.path = Path(path)
        self.name = f"mlx:{self.path.name}"
        self.n_ctx = n_ctx
        try:
            self._model, config = load_model(self.path)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise QuantkitError(f"mlx-lm cannot load {self.path.name}: {first}", "rebuild it with quantkit mlx") \
                from exc
        self._model.set_dtype(mx.float32)  # floating parameters only: the packed uint32 weights stay
        self.n_vocab = int(config.get("vocab_size") or (config.get("text_config") or {})["vocab_size"])
        self._tokenizer: Any = None

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 ``[len(tokens) - first, n_vocab]``: logits at positions ``first .. len(tokens) - 1``."""
        mx = self._mx
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) > self.n_ctx:
            raise ValueError(f"chunk of {len(tokens)} tokens is longer than n_ctx={self.n_ctx}")
        if not 0 <= first < len(tokens):
            raise ValueError(f"first={first} is outside the chunk of {len(tokens)} tokens")
        logits = self._model(mx.array(tokens.astype(np.int32))[None])[0, first:, : self.n_vocab]
        return np.array(logits.astype(mx.float32))

    def generate(self, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
        """Greedy decoding with mlx-lm's KV cache: up to `max_new` tokens, the stop token included."""
        from mlx_lm.models.cache import make_prompt_cache

        mx = self._mx
        cache = make_prompt_cache(self._model)
        logits = self._model(mx.array([prompt], dtype=mx.int32), cache=cache)
        out: list[int] = []
        for _ in range(max_new):
            tok = int(mx.argmax(logits[0, -1, : self.n_vocab]).item())
            out.append(tok)
            if tok in stop or len(out) == max_new:
                break
            logits = self._model(mx.array([[tok]], dtype=mx.int32), cache=cache)
        return out

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` by the folder's own tokenizer files, through transformers (as mlx-lm loads them)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        return list(self._tokenizer(text)["input_ids"])

    def close(self) -> None:
        import gc

        self._model = None
        gc.collect()
        self._mx.clear_cache()


def is_mlx_folder(path: Path) -> bool:
    """A folder mlx_lm.convert wrote: config.json with a ``quantization`` table, safetensors marked ``format: mlx``."""
    from quantkit.safetensors_io import read_header

    path = Path(path)
    if not (path / "config.json").is_file():
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        shard = next(iter(sorted(path.glob("model*.safetensors"))), None)
        meta = read_header(shard)[1] if shard is not None else {}
    except (OSError, ValueError, QuantkitError):
        return False
    return isinstance(config.get("quantization"), dict) and (meta or {}).get("format") == "mlx"
