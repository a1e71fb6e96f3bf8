"""Next-token logits from a Hugging Face model folder (bf16, or GPTQ) for `quantkit eval`."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.backends.gptq.options import CPU_INT4_GROUPS, GPTQ_EXTRA_HINT, is_gptq_folder
from quantkit.errors import MissingDependency

_HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


@contextlib.contextmanager
def _hub_env_kept() -> Iterator[None]:
    """GPTQModel's dependency tokenicer sets HF_HOME (to /tmp/tokenicer_hf_home when unset) and HF_HUB_CACHE in
    ``os.environ`` when it is imported; put them back, so later Hub downloads in this process (the next model of a
    recipe) still use the user's cache."""
    saved = {k: os.environ.get(k) for k in _HUB_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_routed_experts(path: Path) -> bool:
    """transformers 5 holds routed experts fused in 3-D tensors and cannot load GPTQ's per-expert weights into them
    (it would leave the experts randomly initialised); GPTQModel's own loader keeps one module per expert."""
    from quantkit.arch import lookup

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cls = lookup((config.get("architectures") or [""])[0])
    return bool(cls and cls.routed_experts)


class TransformersScorer:
    """Next-token logits from a Hugging Face model folder (bf16, or GPTQ through optimum + GPTQModel kernels);
    CUDA when available, else CPU. GPTQModel's console output is sent to stderr."""

    def __init__(self, path: Path, *, n_ctx: int, name: str | None = None) -> None:
        import torch

        self.name = name or Path(path).name
        self.path = Path(path)
        self.n_ctx = n_ctx
        self._tokenizer: Any = None
        self.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        with contextlib.redirect_stdout(sys.stderr), _hub_env_kept():
            self.model = self._load(Path(path))
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def _load(self, path: Path) -> Any:
        quantized = is_gptq_folder(path)
        if quantized and (importlib.util.find_spec("optimum") is None or _has_routed_experts(path)):
            from gptqmodel import GPTQModel  # transformers needs optimum for GPTQ; GPTQModel loads it alone

            return GPTQModel.load(str(path), device=self.device).model.eval()
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {}
        if quantized and self.device == "cpu":
            qcfg = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
            if not (qcfg.get("bits") == 4 and qcfg.get("group_size") in CPU_INT4_GROUPS):
                from transformers import GPTQConfig

                # GPTQModel 7.6 picks its CPU int4pack kernel for g-1/g16 too, which then fails at the first
                # forward ("expect qGroupSize to be 32, 64, 128 or 256"); its plain torch kernel takes any layout
                kwargs["quantization_config"] = GPTQConfig(bits=qcfg.get("bits", 4), backend="gptq_torch")
        try:
            with warnings.catch_warnings():  # "the quantization_config from the model will be used": intended
                warnings.filterwarnings("ignore", message=".*passed `quantization_config`", category=UserWarning)
                return AutoModelForCausalLM.from_pretrained(str(path), device_map=self.device, **kwargs).eval()
        except ImportError as exc:
            raise MissingDependency(f"cannot load {path.name}: {exc}", GPTQ_EXTRA_HINT) from exc

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
