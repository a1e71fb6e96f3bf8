"""Scorers that run a format's real engine: next-token logits from a Hugging Face model folder (bf16, GPTQ, AWQ,
compressed-tensors) through transformers, for evaluation and verification."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Loader = Callable[[Path, str], Any]


class TransformersScorer:
    """Next-token logits from a Hugging Face model folder through transformers, on CUDA when available, else the CPU.
    A format whose folders transformers cannot load by itself passes its own `load(path, device)` (GPTQ's picks
    GPTQModel's loader or a kernel that runs on this CPU). Library output is sent to stderr."""

    def __init__(self, path: Path, *, n_ctx: int, name: str | None = None, load: Loader | None = None) -> None:
        import torch

        self.name = name or Path(path).name
        self.path = Path(path)
        self.n_ctx = n_ctx
        self._tokenizer: Any = None
        self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        with contextlib.redirect_stdout(sys.stderr):
            self.model = (load or load_plain)(Path(path), self.device)
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        import torch

        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) > self.n_ctx:
            raise ValueError(f"chunk of {len(tokens)} tokens is longer than n_ctx={self.n_ctx}")
        if not 0 <= first < len(tokens):
            raise ValueError(f"first={first} is outside the chunk of {len(tokens)} tokens")
        ids = torch.from_numpy(tokens).unsqueeze(0).to(self.device)
        with torch.inference_mode(), contextlib.redirect_stdout(sys.stderr):
            logits = self.model(input_ids=ids, use_cache=False).logits[0, first:]
        return logits.float().cpu().numpy()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` by the artifact's own tokenizer files (what transformers, vLLM and TGI will use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        return list(self._tokenizer(text)["input_ids"])

    def close(self) -> None:
        import gc

        self.model = None
        gc.collect()


def load_plain(path: Path, device: str) -> Any:
    """A model folder as transformers loads it (bf16, and whatever quantized layout it reads by itself)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), device_map=device).eval()
