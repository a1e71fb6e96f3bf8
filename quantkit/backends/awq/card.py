"""What the card and the publish layout say about AWQ: GPTQ's layout (the recommended variant on ``main``, others on
branches), AWQ's words."""

from __future__ import annotations

from quantkit.backends.base import RECOMMENDED, FormatInfo
from quantkit.backends.gptq.card import GPTQSections


class AWQSections(GPTQSections):
    """AWQ's format knowledge (`AWQBackend` subclasses it)."""

    name = "awq"

    def format_info(self) -> FormatInfo:
        return FormatInfo(title="AWQ", library="transformers", tag="awq", repo_suffix="AWQ",
                          runtimes="vLLM, SGLang and transformers",
                          calibrated="AWQ's activation-aware scales were searched on Russian text")

    def advice(self, quant: str, bpw: float | None) -> str:
        return f"{RECOMMENDED}: 4-bit with fast kernels in vLLM and SGLang"
