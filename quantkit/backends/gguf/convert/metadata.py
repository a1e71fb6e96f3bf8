"""The hyper-parameter keys every text model's GGUF gets, exactly as llama.cpp's converter derives them from
``config.json`` as transformers completes it."""

from __future__ import annotations

from typing import Any

import gguf

from quantkit.errors import QuantkitError

_SCORE_FUNCS = {"sigmoid": "SIGMOID", "softmax": "SOFTMAX"}


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings as llama.cpp's converter reads them: ``rope_parameters`` (transformers 5) or ``rope_scaling``,
    with the top-level theta, type and original context mirrored in when there is no per-attention-type split."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "full_attention" not in params and "sliding_attention" not in params:
        local = _first(config, "local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                       "rope_local_base_freq")
        if local is not None:
            params["sliding_attention"] = {"rope_theta": local}
        for key in ("rope_theta", "original_max_position_embeddings", "partial_rotary_factor"):
            if key not in params and config.get(key) is not None:
                params[key] = config[key]
        if "rope_type" not in params and params.get("type") is not None:
            params["rope_type"] = params["type"]
    return params


def _first(hp: dict[str, Any], *keys: str) -> Any:
    return next((hp[k] for k in keys if k in hp and hp[k] is not None), None)


def write_common_metadata(w: gguf.GGUFWriter, hp: dict[str, Any], ftype: gguf.LlamaFileType) -> None:
    """The hyper-parameter keys every text model gets, exactly as llama.cpp's converter derives them."""
    w.add_block_count(int(hp["num_hidden_layers"]))
    if (n_ctx := _first(hp, "max_position_embeddings", "n_ctx", "n_positions", "max_length")) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _first(hp, "hidden_size", "n_embd", "dim")) is not None:
        w.add_embedding_length(n_embd)
    n_ff = _first(hp, "prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size")
    if n_ff is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _first(hp, "num_attention_heads", "n_head", "n_heads")) is not None:
        w.add_head_count(n_head)
    if (n_kv := _first(hp, "num_key_value_heads", "n_kv_heads")) is not None:
        w.add_head_count_kv(n_kv)
    rope_all = rope_parameters(hp)
    rope = rope_all.get("full_attention", rope_all)
    if (rope_type := rope.get("rope_type")) is not None:
        factor = rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for key, adder in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                               ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                               ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    adder(rope[key])
            if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(attn)
        elif str(rope_type).lower() not in ("default", "llama3"):
            raise QuantkitError(f"unsupported RoPE scaling type {rope_type}", "supported: none, linear, yarn, llama3")
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (theta_swa := rope_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(theta_swa)
    if (eps := _first(hp, "rms_norm_eps", "norm_eps")) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _first(hp, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon")) is not None:
        w.add_layer_norm_eps(eps)
    if (n_exp := _first(hp, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
        w.add_expert_count(n_exp)
    if (n_used := _first(hp, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
        w.add_expert_used_count(n_used)
    if hp.get("n_group") is not None:
        w.add_expert_group_count(hp["n_group"])
    if hp.get("topk_group") is not None:
        w.add_expert_group_used_count(hp["topk_group"])
    if (score := _first(hp, "score_function", "scoring_func", "score_func")) is not None:
        if score not in _SCORE_FUNCS:
            raise QuantkitError(f"unsupported expert gating function {score}", "supported: sigmoid, softmax")
        w.add_expert_gating_func(gguf.ExpertGatingFuncType[_SCORE_FUNCS[score]])
    if hp.get("head_dim") is not None:
        w.add_key_length(int(hp["head_dim"]))
        w.add_value_length(int(hp["head_dim"]))
    w.add_file_type(ftype)
