"""Gemma 3 (saiga_gemma3_12b): the text model of Gemma3ForCausalLM and of Gemma3ForConditionalGeneration.

What differs from Llama: RMS norms compute ``x · (1 + w)`` (llama.cpp stores ``w + 1``), the embeddings are scaled by
√hidden inside the model, layers alternate sliding-window and global attention with two RoPE bases, Q and K have their
own norms, and the vocabulary is SentencePiece written without a space prefix. The multimodal checkpoint's vision
tower and projector are left out (llama.cpp puts them in a separate mmproj file).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from quantkit.arch.base import DENSE_LAYER, Architecture, overwrite
from quantkit.arch.registry import register

if TYPE_CHECKING:
    import gguf


@register
class Gemma3(Architecture):
    hf_names = ("Gemma3ForCausalLM",)
    family = "gemma3"
    gguf_arch = "GEMMA3"
    norm_shift = 1.0
    layer_tensors = (*DENSE_LAYER, "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
                     "self_attn.q_norm.weight", "self_attn.k_norm.weight")
    space_prefix = "spm_false"
    config_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "max_position_embeddings": 131072,
        "sliding_window": 4096, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
        "tie_word_embeddings": True}
    exl2 = False
    exl2_note = "exllamav2 0.3.2 loads Gemma 3 only as Gemma3ForConditionalGeneration, not Gemma3ForCausalLM"

    def embedding_rows(self, vocab_tokens: int) -> int | None:
        return vocab_tokens

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        h = self.hparams
        rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
        rope = rope.get("full_attention", rope)
        for key in ("context_length", "attention.head_count", "attention.layer_norm_rms_epsilon",
                    "attention.key_length", "attention.value_length", "rope.freq_base", "attention.head_count_kv"):
            overwrite(w, f"{w.arch}.{key}")
        w.add_context_length(h.get("max_position_embeddings", 131072))
        w.add_head_count(h.get("num_attention_heads", 8))
        w.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
        w.add_key_length(h.get("head_dim", 256))
        w.add_value_length(h.get("head_dim", 256))
        w.add_rope_freq_base(rope.get("rope_theta", 1_000_000.0))
        if h.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(h["final_logit_softcapping"])
        if h.get("sliding_window_pattern") != 1:
            w.add_sliding_window(h["sliding_window"])
        w.add_head_count_kv(h.get("num_key_value_heads", 4))

    def fix_buffers(self, module_name: str, module: Any) -> None:
        import torch

        if module_name == "embed_tokens" and hasattr(module, "embed_scale"):
            module.embed_scale = torch.tensor(float(self.hparams["hidden_size"]) ** 0.5, device=module.weight.device)

    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        from transformers import Gemma3TextConfig

        kw = {"head_dim": 2 * common["hidden_size"] // common["num_attention_heads"], "sliding_window": 64,
              "query_pre_attn_scalar": 2 * common["hidden_size"] // common["num_attention_heads"],
              "tie_word_embeddings": True, **common, **extra}
        kw.pop("rms_norm_eps", None)
        return Gemma3TextConfig(**kw)


@register
class Gemma3Multimodal(Gemma3):
    """Gemma3ForConditionalGeneration: the same text model under ``language_model``, beside a vision tower."""

    hf_names = ("Gemma3ForConditionalGeneration",)
    exl2 = True
    exl2_note = ""
    gptq = False
    gptq_note = "GPTQ of Gemma 3's multimodal checkpoint is not supported yet; quantize its GGUF or EXL2"
    skip_tensors = re.compile(r"(^|\.)(vision_tower|multi_modal_projector)\.")
    skip_note = "the vision tower and projector are left out (text model only; llama.cpp keeps them in an mmproj file)"
