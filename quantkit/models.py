"""The table of known Russian models: short alias → Hub id, architecture, base or instruct, licence, size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    alias: str
    hub_id: str
    architecture: str  # the `architectures[0]` of its config.json
    family: str  # llama / qwen2 / mistral
    instruct: bool
    license: str
    params_b: float  # parameter count in billions, for size estimates when the model cannot be reached
    note: str = ""


KNOWN_MODELS: tuple[KnownModel, ...] = (
    KnownModel("T-lite-0.1", "AnatoliiPotapov/T-lite-0.1", "LlamaForCausalLM", "llama", False, "wtfpl", 8.03,
               "T-Bank, Llama-3 8B continued pre-training"),
    KnownModel("T-lite-instruct-0.1", "AnatoliiPotapov/T-lite-instruct-0.1", "LlamaForCausalLM", "llama", True,
               "wtfpl", 8.03, "T-Bank, instruct version of T-lite-0.1"),
    KnownModel("T-lite-it-1.0", "t-tech/T-lite-it-1.0", "Qwen2ForCausalLM", "qwen2", True, "apache-2.0", 7.62,
               "T-Bank, Qwen2.5-7B based"),
    KnownModel("T-pro-it-1.0", "t-tech/T-pro-it-1.0", "Qwen2ForCausalLM", "qwen2", True, "apache-2.0", 32.8,
               "T-Bank, Qwen2.5-32B based"),
    KnownModel("Vikhr-Llama3.1-8B-Instruct-R-21-09-24", "Vikhrmodels/Vikhr-Llama3.1-8B-Instruct-R-21-09-24",
               "LlamaForCausalLM", "llama", True, "llama3.1", 8.03, "Vikhr, Llama-3.1 8B"),
    KnownModel("Vikhr-Nemo-12B-Instruct-R-21-09-24", "Vikhrmodels/Vikhr-Nemo-12B-Instruct-R-21-09-24",
               "MistralForCausalLM", "mistral", True, "apache-2.0", 12.2, "Vikhr, Mistral-Nemo 12B"),
    KnownModel("saiga_llama3_8b", "IlyaGusev/saiga_llama3_8b", "LlamaForCausalLM", "llama", True, "other", 8.03,
               "Saiga, Llama-3 8B"),
    KnownModel("saiga_nemo_12b", "IlyaGusev/saiga_nemo_12b", "MistralForCausalLM", "mistral", True, "apache-2.0",
               12.2, "Saiga, Mistral-Nemo 12B"),
)

DEMO_ALIAS = "demo"


def find_known(name: str) -> KnownModel | None:
    """Look up by alias or Hub id, case-insensitively."""
    low = name.lower()
    for model in KNOWN_MODELS:
        if low in (model.alias.lower(), model.hub_id.lower()):
            return model
    return None
