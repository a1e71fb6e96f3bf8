"""The table of known Russian models: short alias → Hub id, architecture, base or instruct, licence, size.

The architecture is the ``architectures[0]`` of the model's ``config.json``; everything quantkit knows about it lives
in the architecture registry (`quantkit.arch`), which is how a refusal (an EXL2 of a Gemma3ForCausalLM, say) can be
said before anything is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    alias: str
    hub_id: str
    architecture: str  # the `architectures[0]` of its config.json (a key of the architecture registry)
    instruct: bool
    license: str
    params_b: float  # parameter count in billions, for size estimates when the model cannot be reached
    note: str = ""
    license_note: str = ""  # said by `quantkit models` and in the card when the licence restricts use
    builder: str = ""  # a model quantkit builds itself: "module:function" that builds it and returns its folder
    locator: str = ""  # and "module:function" that says where it is (or will be), building nothing
    file_name: str = ""  # the name its files and workspace get (default: the alias)

    @property
    def name(self) -> str:
        return self.file_name or self.alias

    @property
    def built_here(self) -> bool:
        """quantkit builds this model itself (nothing is downloaded)."""
        return bool(self.builder)

    def folder(self) -> Path | None:
        """Where a model quantkit builds lives once built (None for a Hub model); nothing is built."""
        return _call(self.locator) if self.locator else None

    def build(self) -> Path:
        """Build (once; cached) a model quantkit builds itself, and return its folder."""
        return _call(self.builder)

    @property
    def family(self) -> str:
        from quantkit.arch import lookup

        cls = lookup(self.architecture)
        return cls.family if cls else "?"


_YANDEX_LICENSE = ("YandexGPT-5-Lite licence: not an open-source licence; commercial use is limited (read the "
                   "licence on the model page before publishing or deploying)")

KNOWN_MODELS: tuple[KnownModel, ...] = (
    # 2024: Llama-3, Qwen2.5, Mistral
    KnownModel("T-lite-0.1", "AnatoliiPotapov/T-lite-0.1", "LlamaForCausalLM", False, "wtfpl", 8.03,
               "T-Bank, Llama-3 8B continued pre-training"),
    KnownModel("T-lite-instruct-0.1", "AnatoliiPotapov/T-lite-instruct-0.1", "LlamaForCausalLM", True,
               "wtfpl", 8.03, "T-Bank, instruct version of T-lite-0.1"),
    KnownModel("T-lite-it-1.0", "t-tech/T-lite-it-1.0", "Qwen2ForCausalLM", True, "apache-2.0", 7.62,
               "T-Bank, Qwen2.5-7B based"),
    KnownModel("T-pro-it-1.0", "t-tech/T-pro-it-1.0", "Qwen2ForCausalLM", True, "apache-2.0", 32.8,
               "T-Bank, Qwen2.5-32B based"),
    KnownModel("Vikhr-Llama3.1-8B-Instruct-R-21-09-24", "Vikhrmodels/Vikhr-Llama3.1-8B-Instruct-R-21-09-24",
               "LlamaForCausalLM", True, "llama3.1", 8.03, "Vikhr, Llama-3.1 8B"),
    KnownModel("Vikhr-Nemo-12B-Instruct-R-21-09-24", "Vikhrmodels/Vikhr-Nemo-12B-Instruct-R-21-09-24",
               "MistralForCausalLM", True, "apache-2.0", 12.2, "Vikhr, Mistral-Nemo 12B"),
    KnownModel("saiga_llama3_8b", "IlyaGusev/saiga_llama3_8b", "LlamaForCausalLM", True, "other", 8.03,
               "Saiga, Llama-3 8B"),
    KnownModel("saiga_nemo_12b", "IlyaGusev/saiga_nemo_12b", "MistralForCausalLM", True, "apache-2.0",
               12.2, "Saiga, Mistral-Nemo 12B"),
    # 2025-26: Qwen3, YandexGPT-5 (Llama with a 129k SentencePiece vocabulary), Gemma 3
    KnownModel("T-lite-it-2.1", "t-tech/T-lite-it-2.1", "Qwen3ForCausalLM", True, "apache-2.0", 8.19,
               "T-Bank, Qwen3-8B based"),
    KnownModel("T-pro-it-2.0", "t-tech/T-pro-it-2.0", "Qwen3ForCausalLM", True, "apache-2.0", 32.8,
               "T-Bank, Qwen3-32B based, Cyrillic-dense tokenizer"),
    KnownModel("T-pro-it-2.1", "t-tech/T-pro-it-2.1", "Qwen3ForCausalLM", True, "apache-2.0", 32.8,
               "T-Bank, Qwen3-32B based, Cyrillic-dense tokenizer"),
    KnownModel("QVikhr-3-8B-Instruction", "Vikhrmodels/QVikhr-3-8B-Instruction", "Qwen3ForCausalLM", True,
               "apache-2.0", 8.19, "Vikhr, Qwen3-8B based"),
    KnownModel("QVikhr-3-4B-Instruction", "Vikhrmodels/QVikhr-3-4B-Instruction", "Qwen3ForCausalLM", True,
               "apache-2.0", 4.02, "Vikhr, Qwen3-4B based"),
    KnownModel("QVikhr-3-1.7B-Instruction-noreasoning", "Vikhrmodels/QVikhr-3-1.7B-Instruction-noreasoning",
               "Qwen3ForCausalLM", True, "apache-2.0", 2.03, "Vikhr, Qwen3-1.7B based"),
    KnownModel("RuadaptQwen3-32B-Instruct", "RefalMachine/RuadaptQwen3-32B-Instruct", "Qwen3ForCausalLM", True,
               "apache-2.0", 32.7, "RefalMachine, Qwen3-32B with its vocabulary replaced"),
    KnownModel("YandexGPT-5-Lite-8B-instruct", "yandex/YandexGPT-5-Lite-8B-instruct", "LlamaForCausalLM", True,
               "other", 8.04, "Yandex, Llama architecture, 129k SentencePiece vocabulary", _YANDEX_LICENSE),
    KnownModel("saiga_yandexgpt_8b", "IlyaGusev/saiga_yandexgpt_8b", "LlamaForCausalLM", True, "other", 8.04,
               "Saiga, YandexGPT-5-Lite 8B based", _YANDEX_LICENSE),
    KnownModel("GigaChat3-10B-A1.8B", "ai-sage/GigaChat3-10B-A1.8B", "DeepseekV3ForCausalLM", True, "mit", 10.7,
               "Sber, mixture of experts (1.8B active), MLA attention, trained from scratch"),
    KnownModel("GigaChat3.1-10B-A1.8B", "ai-sage/GigaChat3.1-10B-A1.8B", "DeepseekV3ForCausalLM", True, "mit",
               10.7, "Sber, GigaChat 3.1 update of the 10B mixture of experts"),
    KnownModel("saiga_gemma3_12b", "IlyaGusev/saiga_gemma3_12b", "Gemma3ForConditionalGeneration", True, "gemma",
               12.2, "Saiga, Gemma 3 12B based (text model; the vision tower is left out)",
               "Gemma terms of use: redistribution must pass the terms on"),
)

DEMO_ALIAS = "demo"
# the embedded default: a tiny Llama-3-style model quantkit trains on its own Russian text (README's first command)
DEMO = KnownModel(DEMO_ALIAS, "", "LlamaForCausalLM", False, "apache-2.0", 0.0013,
                  "built locally: a tiny Llama-3-style model trained on quantkit's Russian text",
                  builder="quantkit.demo:ensure_demo_model", locator="quantkit.demo:demo_folder",
                  file_name="quantkit-demo-ru")
KNOWN_MODELS = (*KNOWN_MODELS, DEMO)


def find_known(name: str) -> KnownModel | None:
    """Look up by alias or Hub id, case-insensitively."""
    low = name.lower()
    if not low:
        return None
    for model in KNOWN_MODELS:
        if low == model.alias.lower() or (model.hub_id and low == model.hub_id.lower()):
            return model
    return None


def default_name(spec: str) -> str:
    """The name `resolve` gives a source, without resolving it."""
    known = find_known(spec)
    if known is not None and known.built_here:
        return known.name
    local = Path(spec).expanduser()
    if local.exists():
        return local.resolve().name
    if known is not None:
        return known.name
    return spec.rstrip("/").split("/")[-1]


def _call(target: str) -> Path:
    from importlib import import_module

    module, _, func = target.partition(":")
    return Path(getattr(import_module(module), func)())
