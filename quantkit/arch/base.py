"""The base of the architecture registry: what quantkit needs to know about one Hugging Face architecture family.

A family is one `Architecture` subclass registered under the ``architectures[0]`` names of its ``config.json``
(llama.cpp's converter registers its model classes the same way). Variants are small subclasses: Qwen3 over Qwen2,
Mistral over Llama. The class answers, for every part of quantkit:

- the converter: the GGUF architecture, the hyper-parameters llama.cpp's converter reads (``config.json`` as
  transformers completes it, ``text_config`` merged in), extra metadata keys, tensor renaming and transforms
  (Q/K permutation, norm offsets, embedding trimming), which tensors are left out (a vision tower);
- the tokenizer writer: SentencePiece or byte-level BPE first, and the ``add_space_prefix`` policy;
- the layer-by-layer forward (imatrix, bf16 reference, verification): the transformers text model, buffers that a
  model built on the ``meta`` device must have refilled, per-layer keyword arguments;
- the format backends: which Linear layers GPTQ quantizes and whether GPTQModel / exllamav2 support the family;
- the fixtures: the transformers config of a tiny checkpoint of the family.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import gguf


# what every decoder layer of a Llama-style model holds
DENSE_LAYER = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


class Architecture:
    """One HF architecture family. Subclasses override class attributes first, methods where a table is not enough."""

    hf_names: ClassVar[tuple[str, ...]] = ()
    family: ClassVar[str] = "?"
    gguf_arch: ClassVar[str] = ""  # a gguf.MODEL_ARCH member name: LLAMA, QWEN2, ...
    permute_qk: ClassVar[bool] = False  # HF rotate-half Q/K rows → llama.cpp's interleaved order
    rope_freqs_tensor: ClassVar[bool] = False  # Llama-3.1's rope scaling becomes a ``rope_freqs`` tensor
    norm_shift: ClassVar[float] = 0.0  # added to every ``*norm.weight`` (Gemma's RMSNorm computes x * (1 + w))
    sentencepiece_first: ClassVar[bool] = True  # use tokenizer.model when present (else tokenizer.json)
    space_prefix: ClassVar[str] = "tokenizer_config"  # tokenizer_config | spm_false | never
    gptq: ClassVar[bool] = True  # GPTQModel 7.6 quantizes it
    gptq_note: ClassVar[str] = ""
    routed_experts: ClassVar[bool] = False  # a mixture of experts (transformers 5 fuses the experts' weights)
    exl2: ClassVar[bool] = True  # exllamav2 0.3.2 loads it
    exl2_note: ClassVar[str] = ""
    mlx: ClassVar[bool] = True  # mlx-lm 0.32 runs it (a checkpoint's layout may still be refused: Gemma 3's layers)
    mlx_note: ClassVar[str] = ""
    # Linear layers GPTQ quantizes, as canonical tensor names (``model.layers.N.…``)
    gptq_layers: ClassVar[re.Pattern[str]] = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight$")
    # tensors that are not part of the text model (a vision tower, an audio encoder): left out, with one note
    skip_tensors: ClassVar[re.Pattern[str] | None] = None
    # the tensors every decoder layer must hold (``self_attn.q_proj.weight``); empty: checked against peers only
    layer_tensors: ClassVar[tuple[str, ...]] = ()
    skip_note: ClassVar[str] = ""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.config = config  # config.json as written

    # -- identity ------------------------------------------------------------------------------------------------
    @property
    def hf_name(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    @classmethod
    def describe(cls) -> str:
        return f"{'/'.join(cls.hf_names)} ({cls.family})"

    # -- hyper-parameters ---------------------------------------------------------------------------------------
    # The defaults transformers' config class of the family fills in for keys a config.json may leave out (those
    # that reach the GGUF metadata); `tests/test_arch.py` checks the result against transformers' AutoConfig.
    config_defaults: ClassVar[dict[str, Any]] = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0}

    @cached_property
    def hparams(self) -> dict[str, Any]:
        """``config.json`` completed the way transformers' config class completes it (defaults filled in, like
        ``head_dim``), ``text_config`` merged into the top level: the values llama.cpp's converter reads. Done from
        the family's defaults, without importing transformers (and torch): conversion needs neither."""
        raw = dict(self.config)
        if isinstance(raw.get("text_config"), dict):
            raw = {**raw, **raw["text_config"]}
        full = {**self.config_defaults, **raw}
        if full.get("num_key_value_heads") is None and full.get("num_attention_heads") is not None:
            full["num_key_value_heads"] = full["num_attention_heads"]
        self.complete(full)
        return full

    def complete(self, hp: dict[str, Any]) -> None:
        """Values the family's config class derives from others (in place)."""

    @property
    def n_layer(self) -> int:
        return int(self.hparams["num_hidden_layers"])

    @property
    def n_head(self) -> int:
        return int(self.hparams["num_attention_heads"])

    @property
    def n_kv(self) -> int:
        return int(self.hparams.get("num_key_value_heads") or self.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.hparams.get("head_dim") or self.hparams["hidden_size"] // self.n_head)

    @property
    def vocab_size(self) -> int:
        return int(self.hparams["vocab_size"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.hparams.get("tie_word_embeddings"))

    def gguf_model_arch(self) -> gguf.MODEL_ARCH:
        import gguf

        return gguf.MODEL_ARCH[self.gguf_arch]

    # -- tensors -------------------------------------------------------------------------------------------------
    def canonical_name(self, hf_name: str) -> str | None:
        """The text model's tensor name for a checkpoint tensor (``model.layers.0…``); None to leave it out."""
        if self.skip_tensors is not None and self.skip_tensors.search(hf_name):
            return None
        if hf_name.endswith(("rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")):
            return None
        return hf_name.replace("language_model.", "") if "language_model." in hf_name else hf_name

    def transform(self, name: str, data: np.ndarray, f32: bool) -> np.ndarray:
        """A tensor on its way into the GGUF (`name` canonical). `f32` says the data is float32 (else raw storage)."""
        if self.norm_shift and name.endswith("norm.weight"):
            data = data + np.float32(self.norm_shift)
        if self.permute_qk:
            if name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute(data, self.n_head)
            elif name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute(data, self.n_kv)
        return data

    def needs_f32(self, name: str) -> bool:
        """Whether `transform` must see float32 data (arithmetic, not only a reordering of rows)."""
        return bool(self.norm_shift) and name.endswith("norm.weight")

    def gguf_key(self, name: str) -> str:
        """The name to look up in gguf's tensor map (llama.cpp's converter renames a few tensors first)."""
        return name

    def merge_key(self, name: str) -> tuple[str, str, int, int] | None:
        """For a tensor that is one slice of a stacked GGUF tensor (an expert's matrix): (its group, the stacked
        tensor's canonical name, its index, tensors in the group); None for an ordinary tensor."""
        return None

    def expert_sources(self, stacked: str) -> list[str]:
        """The canonical names a stacked tensor is made of, in order."""
        raise NotImplementedError(stacked)

    def split_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]] | None:
        """For a tensor llama.cpp stores as several: each part's canonical name and shape; None otherwise."""
        return None

    def split(self, name: str, data: np.ndarray) -> list[np.ndarray]:
        """The parts of a tensor `split_shapes` names, in the same order."""
        raise NotImplementedError(name)

    def fused_parameter(self, name: str, read: Any) -> np.ndarray | None:
        """A parameter the transformers model holds fused (3-D experts) that the checkpoint stores in pieces,
        built with `read(canonical_name) -> float32 array`; None for an ordinary parameter."""
        return None

    def embedding_rows(self, vocab_tokens: int) -> int | None:
        """Rows of ``token_embd`` to keep (None: all). `vocab_tokens` is the size of the tokenizer's vocabulary."""
        return None

    def missing_tensors(self, names: set[str]) -> list[str]:
        """What the text model needs that the checkpoint (its canonical tensor names) lacks: the embeddings, the
        final norm, the output head unless tied, and every layer."""
        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.tied_embeddings:
            needed.append("lm_head.weight")
        missing = [n for n in needed if n not in names]
        layers = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.") and n.split(".")[2].isdigit()}
        missing += [f"model.layers.{i}.*" for i in range(self.n_layer) if i not in layers]
        missing += [f"model.layers.{i}.{t}" for i in sorted(layers) for t in self.layer_tensors
                    if f"model.layers.{i}.{t}" not in names]
        return missing + _missing_in_peers(names)

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes config.json implies for a Llama-style layer's projections (``self_attn.q_proj.weight`` →
        ``(heads × head_dim, hidden)``); empty for a family without `DENSE_LAYER`."""
        if not set(DENSE_LAYER) <= set(self.layer_tensors):
            return {}
        hidden, ffn = int(self.hparams["hidden_size"]), int(self.hparams["intermediate_size"])
        q, kv = self.n_head * self.head_dim, self.n_kv * self.head_dim
        return {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
                "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
                "mlp.gate_proj.weight": (ffn, hidden), "mlp.up_proj.weight": (ffn, hidden),
                "mlp.down_proj.weight": (hidden, ffn)}


    def check_gguf(self) -> None:
        """Raise a `QuantkitError` when llama.cpp cannot run this checkpoint although the family is registered."""

    # -- GGUF metadata --------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        """Keys beyond the common ones (written by the converter) that llama.cpp's converter writes for this family."""

    def write_vocab_overrides(self, w: gguf.GGUFWriter, n_tokens: int) -> None:
        """Tokenizer keys llama.cpp's converter sets for this family after the vocabulary's own (a key written twice
        keeps its place and takes the later value, as gguf's writer does)."""

    # -- the layer-by-layer transformers forward ------------------------------------------------------------------
    def text_config(self, config: Any) -> Any:
        """The transformers config of the text model inside `config` (itself for a plain causal LM)."""
        return getattr(config, "text_config", None) or config

    def fix_buffers(self, module_name: str, module: Any) -> None:
        """Refill buffers of a module materialised from ``meta`` (not stored in the checkpoint)."""

    # -- fixtures -----------------------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.hf_name}>"

    @classmethod
    def fixture_config(cls, common: dict[str, Any], **extra: Any) -> Any:
        """A transformers config for a tiny checkpoint of this family (`common`: sizes and token ids)."""
        raise NotImplementedError(cls.__name__)


def overwrite(w: gguf.GGUFWriter, key: str) -> None:
    """Drop a key already written, so that the family's own value replaces the common one."""
    for kv in w.kv_data:
        kv.pop(key, None)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K row order → llama.cpp's interleaved order (works on raw bf16 bits too)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.+)$")


def _missing_in_peers(names: set[str]) -> list[str]:
    """Tensors one layer (or one expert) lacks that the others of its kind hold: every expert of a layer has the
    same tensors, and layers of one kind (dense or with experts) the same tensors outside the experts. A single
    tensor dropped from a shard is found this way, whatever the family."""
    missing: list[str] = []
    per_layer: dict[int, set[str]] = {}
    experts: dict[tuple[int, str], dict[int, set[str]]] = {}
    for name in names:
        m = _LAYER.match(name)
        if not m:
            continue
        layer, rest = int(m.group(1)), m.group(2)
        e = _EXPERT.match(rest)
        if e:
            experts.setdefault((layer, e.group(1)), {}).setdefault(int(e.group(2)), set()).add(e.group(3))
            rest = f"{e.group(1)}.*"
        per_layer.setdefault(layer, set()).add(rest)
    for (layer, where), by_index in sorted(experts.items()):
        every = set().union(*by_index.values())
        for index in range(max(by_index) + 1):
            missing += [f"model.layers.{layer}.{where}.{index}.{t}" for t in sorted(every - by_index.get(index, set()))]
    kinds: dict[bool, list[int]] = {}
    for layer, rests in per_layer.items():
        kinds.setdefault(any(r.endswith("experts.*") for r in rests), []).append(layer)
    for layers in kinds.values():
        if len(layers) < 2:
            continue
        # what most layers of this kind hold (a tensor only some layers have by design, like a sliding-window
        # norm, is held by more than half of them or by fewer than half: only a lone gap counts)
        counts: dict[str, int] = {}
        for layer in layers:
            for r in per_layer[layer]:
                counts[r] = counts.get(r, 0) + 1
        usual = {r for r, n in counts.items() if n == len(layers) - 1 or n == len(layers)}
        for layer in sorted(layers):
            missing += [f"model.layers.{layer}.{r}" for r in sorted(usual - per_layer[layer])]
    return missing
