"""Llama (Llama-2/3/3.1, T-lite-0.1, Vikhr-Llama, Saiga-Llama, YandexGPT-5-Lite) and Mistral (7B, Nemo)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from quantkit.arch.base import DENSE_LAYER, Architecture
from quantkit.arch.registry import register

if TYPE_CHECKING:
    import gguf


@register
class Llama(Architecture):
    hf_names = ("LlamaForCausalLM",)
    family = "llama"
    gguf_arch = "LLAMA"
    permute_qk = True
    rope_freqs_tensor = True
    layer_tensors = DENSE_LAYER
    config_defaults: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                                 "max_position_embeddings": 2048, "tie_word_embeddings": False}

    def complete(self, hp: dict[str, Any]) -> None:
        if hp.get("head_dim") is None:
            hp["head_dim"] = hp["hidden_size"] // hp["num_attention_heads"]

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_vocab_size(self.vocab_size)
        w.add_rope_dimension_count(self.head_dim)

    def write_vocab_overrides(self, w: gguf.GGUFWriter, n_tokens: int) -> None:
        # llama.cpp's converter: Llama-architecture models with a 49,152-token vocabulary (Granite and SmolLM2 small
        # models) add no BOS, stated in the file rather than left to llama.cpp's default for the vocabulary type
        if self.hparams.get("vocab_size", 32000) == 49152:
            w.add_add_bos_token(False)

    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(**{"rope_theta": 500000.0, "tie_word_embeddings": False, **common, **extra})


@register
class Mistral(Llama):
    hf_names = ("MistralForCausalLM",)
    family = "mistral"
    config_defaults: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                                                 "max_position_embeddings": 131072, "tie_word_embeddings": False}

    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        from transformers import MistralConfig

        kw = {"rope_theta": 1000000.0, "tie_word_embeddings": False, "sliding_window": None,
              "head_dim": common["hidden_size"] // common["num_attention_heads"], **common, **extra}
        return MistralConfig(**kw)
