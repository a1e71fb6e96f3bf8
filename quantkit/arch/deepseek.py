"""DeepSeek-V3-style mixture of experts with multi-head latent attention: GigaChat 3 (GigaChat3-10B-A1.8B).

What differs from a dense Llama, as llama.cpp writes it (its ``deepseek2`` architecture):

- MLA attention becomes MQA with one KV head: ``kv_b_proj`` is split per head into ``k_b`` (transposed, applied to
  the query's non-rotary part) and ``v_b``; the query is compressed (``q_a_proj`` → norm → ``q_b_proj``) or not
  (``q_proj``);
- the first ``first_k_dense_replace`` layers are dense; the others route each token to ``num_experts_per_tok`` of
  ``n_routed_experts`` experts (sigmoid scores plus ``e_score_correction_bias``, group-limited) beside shared experts;
  the per-expert matrices are stacked into one 3-D tensor per projection, streamed one expert at a time;
- the multi-token-prediction layers after the last block are left out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from quantkit.arch.base import Architecture, overwrite
from quantkit.arch.registry import register

if TYPE_CHECKING:
    import gguf

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@register
class DeepseekV3(Architecture):
    hf_names = ("DeepseekV3ForCausalLM",)
    family = "deepseek3"
    gguf_arch = "DEEPSEEK2"
    sentencepiece_first = False  # llama.cpp's converter writes its byte-level BPE vocabulary only
    space_prefix = "never"
    routed_experts = True
    exl2 = False
    exl2_note = "exllamav2 0.3.2 has no DeepSeek architecture (MLA attention, routed experts): use GGUF or GPTQ"
    gptq_layers: ClassVar[re.Pattern[str]] = re.compile(
        r"^model\.layers\.(\d+)\.(self_attn\.\w+_proj(_with_mqa)?|mlp\.(\w+_proj|shared_experts\.\w+_proj"
        r"|experts\.\d+\.\w+_proj))\.weight$")
    config_defaults: ClassVar[dict[str, Any]] = {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}

    def complete(self, hp: dict[str, Any]) -> None:
        hp["head_dim"] = hp["qk_rope_head_dim"]  # what transformers' DeepseekV3Config sets (for its rotary)

    def check_gguf(self) -> None:
        """llama.cpp (0c1e570) reads ``q_lora_rank`` unless the model has 26 or 27 layers (GigaChat3-10B,
        DeepSeek-V2-Lite) or 48 with a 128,256-token vocabulary: only those may leave the query uncompressed."""
        if self.hparams.get("q_lora_rank") is not None:
            return
        n, vocab = self.n_layer, self.vocab_size
        if n in (26, 27) or (n == 48 and vocab == 128256):
            return
        from quantkit.errors import QuantkitError

        raise QuantkitError(
            f"llama.cpp cannot run this {self.hf_name}: no query compression (q_lora_rank) with {n} layers",
            "llama.cpp's deepseek2 code expects q_lora_rank except for 26/27-layer models (GigaChat3-10B, "
            "DeepSeek-V2-Lite); use GPTQ for this model")

    # -- tensors -------------------------------------------------------------------------------------------------
    def canonical_name(self, hf_name: str) -> str | None:
        name = super().canonical_name(hf_name)
        if name is None:
            return None
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= self.n_layer:
            return None  # multi-token-prediction layers
        return name

    def gguf_key(self, name: str) -> str:
        return name.replace("e_score_correction_bias", "e_score_correction.bias")

    @property
    def n_experts(self) -> int:
        return int(self.hparams.get("n_routed_experts") or 0)

    def merge_key(self, name: str) -> tuple[str, str, int, int] | None:
        """For a per-expert matrix: (the layer's group, the stacked tensor's name, expert index, tensors in the
        group). The group is written when all its tensors have been seen, stacked per projection."""
        m = _EXPERT.match(name)
        if not m:
            return None
        layer, expert, proj = m.groups()
        return (f"model.layers.{layer}.mlp.experts", f"model.layers.{layer}.mlp.experts.{proj}.weight", int(expert),
                3 * self.n_experts)

    def split_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        """``kv_b_proj`` → ``k_b_proj`` [heads, kv_lora, nope] and ``v_b_proj`` [heads, v, kv_lora]."""
        if not name.endswith("kv_b_proj.weight"):
            return None
        h = self.hparams
        heads, nope, v = int(h["num_key_value_heads"]), int(h["qk_nope_head_dim"]), int(h["v_head_dim"])
        if shape[0] != heads * (nope + v):
            from quantkit.errors import QuantkitError

            raise QuantkitError(f"{name} has {shape[0]} rows, not heads × (qk_nope + v) = {heads * (nope + v)}",
                                "the checkpoint's config.json does not match its weights")
        return [(name.replace("kv_b_proj", "k_b_proj"), (heads, shape[1], nope)),
                (name.replace("kv_b_proj", "v_b_proj"), (heads, v, shape[1]))]

    def split(self, name: str, data: np.ndarray) -> list[np.ndarray]:
        h = self.hparams
        heads, nope, v = int(h["num_key_value_heads"]), int(h["qk_nope_head_dim"]), int(h["v_head_dim"])
        kv = data.reshape(heads, nope + v, data.shape[-1])
        return [np.ascontiguousarray(kv[:, :nope].swapaxes(1, 2)), np.ascontiguousarray(kv[:, nope:])]

    def expert_sources(self, stacked: str) -> list[str]:
        """The per-expert canonical names a stacked tensor is made of, in expert order."""
        base, proj = stacked.rsplit(".", 2)[0], stacked.rsplit(".", 2)[1]
        return [f"{base}.{e}.{proj}.weight" for e in range(self.n_experts)]

    # -- metadata ------------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        from quantkit.backends.gguf.convert.converter import rope_parameters

        h = self.hparams
        kv_lora = int(h.get("kv_lora_rank") or 512)
        rope_dim = int(h["qk_rope_head_dim"])
        for key in ("attention.head_count_kv", "attention.key_length", "attention.value_length", "expert_count"):
            overwrite(w, f"{w.arch}.{key}")
        w.add_head_count_kv(1)  # MLA runs as MQA with one latent KV head
        has_moe = h.get("n_routed_experts") is not None
        dense = h.get("first_k_dense_replace")
        w.add_leading_dense_block_count(dense if dense is not None else (0 if has_moe else self.n_layer))
        w.add_vocab_size(self.vocab_size)
        if h.get("q_lora_rank") is not None:
            w.add_q_lora_rank(int(h["q_lora_rank"]))
        w.add_kv_lora_rank(kv_lora)
        w.add_key_length(kv_lora + rope_dim)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(int(h["qk_nope_head_dim"]) + rope_dim)
        w.add_value_length_mla(int(h["v_head_dim"]))
        w.add_expert_feed_forward_length(int(h.get("moe_intermediate_size") or h["intermediate_size"]))
        if has_moe:
            w.add_expert_count(int(h["n_routed_experts"]))
        w.add_expert_shared_count(int(h.get("n_shared_experts") or 0))
        if h.get("routed_scaling_factor") is not None:
            w.add_expert_weights_scale(h["routed_scaling_factor"])
        if h.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_rope_dimension_count(rope_dim)
        if (mscale := rope_parameters(h).get("mscale_all_dim")) is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * mscale)

    # -- the layer-by-layer forward ------------------------------------------------------------------------------
    def fused_parameter(self, name: str, read: Any) -> np.ndarray | None:
        """transformers 5 holds a layer's experts as 3-D ``gate_up_proj`` / ``down_proj``; the checkpoint per
        expert. `read(canonical_name)` gives float32 arrays; one layer's experts are in memory at a time."""
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name.removesuffix(".gate_up_proj")
            return np.stack([np.concatenate([read(f"{base}.{e}.gate_proj.weight"), read(f"{base}.{e}.up_proj.weight")])
                             for e in range(self.n_experts)])
        if name.endswith("mlp.experts.down_proj"):
            base = name.removesuffix(".down_proj")
            return np.stack([read(f"{base}.{e}.down_proj.weight") for e in range(self.n_experts)])
        return None

    # -- fixtures ------------------------------------------------------------------------------------------------
    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        from transformers import DeepseekV3Config

        hidden = common["hidden_size"]
        kw: dict[str, Any] = {
            "moe_intermediate_size": hidden, "first_k_dense_replace": 2, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "q_lora_rank": 128,
            "kv_lora_rank": 128, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
            "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "tie_word_embeddings": False, **common, **extra}
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # MLA: one latent KV shared by every head
        kw.pop("rms_norm_eps", None)
        return DeepseekV3Config(**kw)

