"""Tiny but real Russian checkpoints that quantkit builds itself: the ``demo`` model and the test fixtures.

Each checkpoint has a tokenizer trained here on the built-in Russian text and configured like the real
family (byte-level BPE with the Llama-3, Qwen2, tekken, SmolLM or GPT-2 pre-tokenizer; SentencePiece for Mistral,
YandexGPT and Gemma 3), a bf16 safetensors model whose transformers config comes from the architecture registry
(`quantkit.arch`), and optionally a short training run so that perplexity, KL-divergence and the effect of an
importance matrix mean something.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit import __version__

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
)

# a curly apostrophe in the contractions: an equivalent regex whose text no table knows (for the pre-tokenizer trial)
REWRITTEN_PATTERN = QWEN2_PATTERN.replace("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?i:'(?:s|t|re|ve|m|ll|d))")
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n<think>\n\n'"
    " + '</think>\n\n' + message['content'] + '<|im_end|>\n' }}{% else %}{{ '<|im_start|>' + message['role'] + "
    "'\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}"
)


@dataclass(frozen=True)
class Fixture:
    """A tiny checkpoint kind: the HF architecture (its config comes from the registry), the tokenizer style, and
    config overrides."""

    architecture: str
    tokenizer: str  # llama3 | qwen2 | qwen3 | tekken | smollm | gpt2 | rewritten | unrunnable | spm | gemma
    config: dict[str, Any] = field(default_factory=dict)
    trimmed_vocab: int = 0  # config vocab_size larger than the tokenizer (Gemma 3 pads its embeddings)


FIXTURES: dict[str, Fixture] = {
    "llama3": Fixture("LlamaForCausalLM", "llama3"),
    "llama31": Fixture("LlamaForCausalLM", "llama3", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}}),
    "qwen2": Fixture("Qwen2ForCausalLM", "qwen2"),
    "qwen3": Fixture("Qwen3ForCausalLM", "qwen3"),
    "mistral": Fixture("MistralForCausalLM", "spm"),
    "nemo": Fixture("MistralForCausalLM", "tekken", {"head_dim": "2x"}),  # head_dim ≠ hidden / heads
    "yandexgpt": Fixture("LlamaForCausalLM", "spm"),  # a SentencePiece Llama (build it with a large vocab_size)
    "gemma3": Fixture("Gemma3ForCausalLM", "gemma", trimmed_vocab=64),
    "gemma3mm": Fixture("Gemma3ForConditionalGeneration", "gemma", trimmed_vocab=64),
    # GigaChat 3 style: MLA (with and without query compression), 2 dense layers then routed + shared experts
    "gigachat3": Fixture("DeepseekV3ForCausalLM", "llama3"),
    # no query compression: llama.cpp allows it only with 26 or 27 layers (GigaChat3-10B has 26); build it so
    "gigachat3-noq": Fixture("DeepseekV3ForCausalLM", "llama3", {"q_lora_rank": None, "n_routed_experts": 4}),
    "smollm": Fixture("LlamaForCausalLM", "smollm"),  # Digits + ByteLevel, no Split regex
    "gpt2": Fixture("LlamaForCausalLM", "gpt2"),  # GPT-2's ByteLevel regex
    # on Llama: transformers 5's AutoTokenizer would give a qwen2 checkpoint Qwen2's pre-tokenizer, whatever its file
    "rewritten": Fixture("LlamaForCausalLM", "rewritten"),  # no hash and no known regex text: found by trial
    "unrunnable": Fixture("LlamaForCausalLM", "unrunnable"),  # nothing in llama.cpp reproduces it
}
FAMILIES = tuple(FIXTURES)


def cache_root() -> Path:
    return Path(os.environ.get("QUANTKIT_CACHE", Path.home() / ".cache" / "quantkit"))


def builtin_texts() -> list[str]:
    """Paragraphs of the built-in Russian calibration set (training text for the demo tokenizer and model)."""
    from quantkit.calibration import builtin_documents

    return [doc for doc in builtin_documents("ru-mix", chat=False)]


# -- tokenizers ------------------------------------------------------------------------------------------

def _train_bpe(texts: list[str], vocab_size: int, pattern: str, specials: list[str], nfc: bool) -> Any:
    """A byte-level BPE tokenizer; `pattern` is a Split regex, or ``smollm`` (Digits + ByteLevel), ``gpt2``
    (ByteLevel with its own regex) or ``whitespace`` (WhitespaceSplit + ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    if pattern == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    elif pattern == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    elif pattern == "whitespace":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(specials)
    return tok


_GPT2_STYLE = {"smollm": "smollm", "gpt2": "gpt2"}
# unrunnable: BERT-style whitespace splitting drops the spaces, which no llama.cpp pre-tokenizer does
_QWEN_STYLE = {"qwen2": QWEN2_PATTERN, "qwen3": QWEN2_PATTERN, "rewritten": REWRITTEN_PATTERN,
               "unrunnable": "whitespace"}


def _write_bpe_tokenizer(out: Path, style: str, texts: list[str], vocab_size: int, instruct: bool) -> int:
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if style in _GPT2_STYLE:  # SmolLM / GPT-2 style: <|endoftext|> for everything, no BOS added
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = _train_bpe(texts, vocab_size, _GPT2_STYLE[style], specials, nfc=False)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        eos = "<|im_end|>" if instruct else "<|endoftext|>"
        kwargs: dict[str, Any] = dict(bos_token="<|endoftext|>", eos_token=eos)
        template = CHATML_TEMPLATE
    elif style == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>", "<|reserved_special_token_0|>"]
        tok = _train_bpe(texts, vocab_size, LLAMA3_PATTERN, specials, nfc=False)
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A",
                                          special_tokens=[(bos, tok.token_to_id(bos))]),
        ])
        kwargs = dict(bos_token=bos, eos_token="<|eot_id|>" if instruct else "<|end_of_text|>")
        template = LLAMA3_CHAT_TEMPLATE
    elif style == "tekken":  # Mistral-Nemo's tekken: byte-level BPE, BOS added, [INST] control tokens
        specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
        tok = _train_bpe(texts, vocab_size, TEKKEN_PATTERN, specials, nfc=False)
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
        kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        template = MISTRAL_CHAT_TEMPLATE
    elif style in _QWEN_STYLE:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = _train_bpe(texts, vocab_size, _QWEN_STYLE[style], specials, nfc=True)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        kwargs = dict(bos_token=None, eos_token="<|im_end|>" if instruct else "<|endoftext|>",
                      pad_token="<|endoftext|>")
        template = QWEN3_CHAT_TEMPLATE if style == "qwen3" else CHATML_TEMPLATE
    else:
        raise ValueError(f"unknown tokenizer style {style}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    if instruct:
        fast.chat_template = template
    fast.model_max_length = 4096
    fast.save_pretrained(out)
    return len(tok.get_vocab())


def _write_spm_tokenizer(out: Path, texts: list[str], vocab_size: int, instruct: bool, gemma: bool = False) -> int:
    """A SentencePiece BPE model (``tokenizer.model``) plus the equivalent ``tokenizer.json``: like Mistral 7B and
    YandexGPT-5 (a ``▁`` prefix, <unk> <s> </s>), or with `gemma` like Gemma 3 (no prefix, <pad> <eos> <bos> <unk>,
    turn markers). A vocabulary larger than the text supports is allowed (``hard_vocab_limit`` off)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    corpus = out / "_spm_corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in texts), encoding="utf-8")
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False, bos_piece="<bos>", eos_piece="<eos>",
               user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]) if gemma else dict(
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "_spm"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", hard_vocab_limit=False,
        num_threads=max(1, os.cpu_count() or 1), minloglevel=2, max_sentence_length=1 << 16, **ids,
    )
    corpus.unlink()
    (out / "_spm.vocab").unlink()
    model_file = out / "tokenizer.model"
    (out / "_spm.model").rename(model_file)
    sp = spm.SentencePieceProcessor()
    sp.Load(str(model_file))
    vocab = {sp.IdToPiece(i): i for i in range(sp.vocab_size())}
    specials = ("<pad>", "<eos>", "<bos>", "<unk>") if gemma else ("<unk>", "<s>", "</s>")
    unk, bos, eos = ("<unk>", "<bos>", "<eos>") if gemma else ("<unk>", "<s>", "</s>")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=generate_merges(vocab), unk_token=unk, fuse_unk=True,
                               byte_fallback=True, dropout=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never" if gemma else "first",
                                                 split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps if gemma else [*steps, decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if gemma:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<start_of_turn>", "<end_of_turn>")])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                       special_tokens=[(bos, vocab[bos])])
    extra = {"pad_token": "<pad>"} if gemma else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   clean_up_tokenization_spaces=False, **extra)
    if instruct:
        fast.chat_template = GEMMA_CHAT_TEMPLATE if gemma else MISTRAL_CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(out)
    return sp.vocab_size()


# -- models ----------------------------------------------------------------------------------------------

def _config(fixture: Fixture, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int,
            bos_id: int | None, eos_id: int, pad_id: int | None) -> Any:
    """The transformers config of a fixture, from its architecture's class in the registry."""
    from quantkit.arch import lookup

    arch = lookup(fixture.architecture)
    assert arch is not None, fixture.architecture
    common: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
    )
    extra = dict(fixture.config)
    if extra.get("head_dim") == "2x":
        extra["head_dim"] = 2 * hidden // heads
    text = arch.fixture_config(common, **extra)
    if fixture.architecture == "Gemma3ForConditionalGeneration":
        from transformers import Gemma3Config, SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14)
        config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                              boi_token_index=bos_id, eoi_token_index=eos_id, image_token_index=eos_id)
        config.architectures = [fixture.architecture]
        return config
    text.architectures = [fixture.architecture]
    return text


def build_checkpoint(
    out: Path,
    family: str = "llama3",
    *,
    instruct: bool = False,
    vocab_size: int = 2048,
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 768,
    train_steps: int = 0,
    seed: int = 0,
    texts: list[str] | None = None,
) -> Path:
    """Write a tiny bf16 checkpoint of `family` (a key of `FIXTURES`) to `out` and return it."""
    import torch
    from transformers import AutoTokenizer

    if family not in FIXTURES:
        raise ValueError(f"family must be one of {', '.join(FIXTURES)}")
    fixture = FIXTURES[family]
    texts = texts if texts is not None else builtin_texts()
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")  # per process: two builds may race
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if fixture.tokenizer in ("spm", "gemma"):
        _write_spm_tokenizer(tmp, texts, vocab_size, instruct, gemma=fixture.tokenizer == "gemma")
    else:
        _write_bpe_tokenizer(tmp, fixture.tokenizer, texts, vocab_size, instruct)
    tok = AutoTokenizer.from_pretrained(tmp)
    vocab = len(tok) + fixture.trimmed_vocab
    torch.manual_seed(seed)
    config = _config(fixture, vocab, hidden, layers, heads, kv_heads, ffn, tok.bos_token_id, tok.eos_token_id,
                     tok.pad_token_id)
    model = _model_from_config(config)
    _randomize_small_weights(model)
    if train_steps > 0:
        _train(model, tok, texts, train_steps, seed)
    model = model.to(torch.bfloat16)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' own shard bar: quantkit's output decides what is shown
    model.save_pretrained(tmp, safe_serialization=True)
    card = (f"---\nlanguage:\n- ru\nlicense: apache-2.0\n---\n# quantkit demo ({family})\n\n"
            f"A tiny {family} model built by quantkit {__version__} for demos and tests: "
            f"{layers} layers, hidden size {hidden}, vocabulary {vocab}, trained {train_steps} steps on "
            "quantkit's built-in Russian text.\n")
    (tmp / "README.md").write_text(card, encoding="utf-8")
    if (out / "config.json").exists():  # another process finished the same build first
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    shutil.rmtree(out, ignore_errors=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _model_from_config(config: Any) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(config, "model_type", "") == "gemma3":  # the multimodal checkpoint
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration(config).float()
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _randomize_small_weights(model: Any) -> None:
    """Give biases and norms non-trivial values, as trained models have: real Qwen2 has non-zero q/k/v biases, and
    Gemma's zero-initialised norms would hide a converter that forgets their +1; make the converter prove it."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_proj.bias"):
                param.normal_(0.0, 0.5)
            elif name.endswith("norm.weight") and "vision" not in name:
                param.add_(torch.randn_like(param) * 0.1)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # a trained router's bias steers expert choice
                buf.normal_(0.0, 0.05)


def _train(model: Any, tok: Any, texts: list[str], steps: int, seed: int, seq: int = 128, batch: int = 8) -> None:
    import torch

    ids: list[int] = []
    for text in texts:
        ids.extend(tok(text, add_special_tokens=False)["input_ids"])
        if tok.eos_token_id is not None:
            ids.append(tok.eos_token_id)
    data = torch.tensor(ids, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps,
                                                pct_start=min(0.3, max(0.1, 2.5 / steps)))
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


DEMO_SPEC = dict(family="llama3", instruct=False, vocab_size=4096, hidden=256, layers=2, heads=4, kv_heads=2,
                 ffn=768, train_steps=150)


def demo_folder() -> Path:
    """Where the demo model is (or will be) cached; nothing is built or created."""
    import hashlib

    key = json.dumps(DEMO_SPEC, sort_keys=True)
    return cache_root() / f"demo-{hashlib.sha256((key + __version__).encode()).hexdigest()[:10]}"


def ensure_demo_model() -> Path:
    """The built-in demo model (a small trained Llama-3-style Russian model), built once and cached."""
    folder = demo_folder()
    if (folder / "config.json").exists():
        return folder
    from quantkit import console

    console.info("building the demo model (a tiny Llama-3-style model trained on quantkit's Russian text)…")
    return build_checkpoint(folder, **DEMO_SPEC)  # type: ignore[arg-type]
