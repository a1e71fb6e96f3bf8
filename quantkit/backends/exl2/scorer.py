"""Scoring an EXL2 model for `quantkit eval` (exllamav2 on CUDA, imported only here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantkit.backends.exl2.options import INSTALL_HINT
from quantkit.errors import MissingDependency, QuantkitError


class EXL2Scorer:
    """Logits of an EXL2 model through exllamav2 on CUDA, for `quantkit eval`."""

    def __init__(self, path: Path, *, n_ctx: int) -> None:
        try:
            import torch
            from exllamav2 import ExLlamaV2, ExLlamaV2Config
        except ImportError as exc:
            raise MissingDependency(f"cannot load exllamav2: {exc}", INSTALL_HINT) from exc
        except Exception as exc:  # noqa: BLE001 - building its CUDA kernels at import fails in many ways
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise QuantkitError(f"exllamav2 could not build or load its CUDA kernels: {first}",
                                "check the CUDA toolkit (nvcc, CUDA_HOME) matches your torch build") from exc
        self._torch = torch
        self.name = f"exl2:{path.name}"
        config = ExLlamaV2Config(str(path))
        config.max_seq_len = n_ctx
        config.max_input_len = n_ctx
        config.max_attention_size = n_ctx * n_ctx
        self.config = config
        self.model = ExLlamaV2(config)
        self.model.load()
        self.n_vocab = int(config.vocab_size)
        self.n_ctx = n_ctx

    def chunk_logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 ``[len(tokens) - first, n_vocab]``: logits at positions ``first .. len(tokens) - 1``."""
        torch = self._torch
        ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).reshape(1, -1)
        if ids.shape[1] > self.n_ctx:
            raise QuantkitError(f"a chunk of {ids.shape[1]} tokens is longer than the context {self.n_ctx}")
        with torch.inference_mode():
            logits = self.model.forward(ids, cache=None)
        return logits[0, first:, : self.n_vocab].float().cpu().numpy()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` by exllamav2's tokenizer for this folder (without a BOS: the check ignores it)."""
        from exllamav2 import ExLlamaV2Tokenizer

        ids = ExLlamaV2Tokenizer(self.config).encode(text, add_bos=False, encode_special_tokens=False)
        return [int(i) for i in ids.reshape(-1).tolist()]

    def close(self) -> None:
        model = getattr(self, "model", None)
        if model is not None:
            model.unload()
            self.model = None
            self._torch.cuda.empty_cache()
