"""Qwen2 / Qwen2.5 (T-lite-it-1.0, T-pro-it-1.0) and Qwen3 (T-lite-it-2.1, T-pro-it-2.x, QVikhr-3, RuadaptQwen3)."""

from __future__ import annotations

from typing import Any, ClassVar

from quantkit.arch.base import DENSE_LAYER, Architecture
from quantkit.arch.registry import register


@register
class Qwen2(Architecture):
    hf_names = ("Qwen2ForCausalLM",)
    family = "qwen2"
    gguf_arch = "QWEN2"
    space_prefix = "never"
    layer_tensors = (*DENSE_LAYER, "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
    config_defaults: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                                 "max_position_embeddings": 32768, "tie_word_embeddings": False}

    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        from transformers import Qwen2Config

        kw = {"rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False, **common, **extra}
        return Qwen2Config(**kw)


@register
class Qwen3(Qwen2):
    """Qwen2 without attention biases, with per-head RMS norms on Q and K and ``head_dim`` from the config (the 32B
    has 64 heads × 128 = 8192 ≠ hidden 5120). Its thinking chat template needs nothing here: calibration renders
    finished conversations, which it writes with an empty think block."""

    hf_names = ("Qwen3ForCausalLM",)
    family = "qwen3"
    gguf_arch = "QWEN3"
    config_defaults: ClassVar[dict[str, Any]] = {**Qwen2.config_defaults, "head_dim": 128}
    layer_tensors = (*DENSE_LAYER, "self_attn.q_norm.weight", "self_attn.k_norm.weight")

    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        from transformers import Qwen3Config

        kw = {"rope_theta": 1000000.0, "tie_word_embeddings": True, "use_sliding_window": False,
              "head_dim": 2 * common["hidden_size"] // common["num_attention_heads"], **common, **extra}
        return Qwen3Config(**kw)
