"""AWQ through GPTQModel: our Russian calibration rows in, a ``quant_method: awq`` (GEMM) folder out.

The folder (``<ws>/awq/<bits>bit-g<group>[-sym]``) holds ``qweight/qzeros/scales`` in AutoAWQ's GEMM layout, which
vLLM, SGLang and transformers load, with the source's tokenizer and generation config and a ``config.json`` whose
``quantization_config`` says ``quant_method: awq``. It is made exactly as GPTQ is (`GPTQBackend`: the child
process, the logs, the sanitized config, the restored tensors), with AWQ's QuantizeConfig; on a machine without
CUDA GPTQModel runs its torch AWQ kernel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from quantkit.arch import Architecture
from quantkit.backends.awq.card import AWQSections
from quantkit.backends.awq.options import AWQ_EXTRA_HINT, AWQOptions, bits_per_weight, estimate_size, is_awq_folder
from quantkit.backends.gptq.backend import GPTQBackend
from quantkit.source import Checkpoint

# checked on each family's fixture: GPTQModel quantizes it and transformers loads the result with every weight
VERIFIED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"})


class AWQBackend(AWQSections, GPTQBackend):
    """AWQ 4-bit (GPTQModel) with quantkit's calibration rows; output loads in vLLM, SGLang and transformers."""

    name = "awq"
    description = "AWQ 4-bit (GEMM) through GPTQModel (vLLM, SGLang, transformers)"
    command_help = ("Quantize a model to AWQ 4-bit (GPTQModel), calibrated on Russian text; loads in vLLM, SGLang "
                    "and transformers.")
    options_model = AWQOptions
    quant_method = "awq"
    version = 1
    article, install_hint = "an", AWQ_EXTRA_HINT

    def check(self) -> str | None:
        return None if super().check() is None else f"AWQ needs the gptq extra: {AWQ_EXTRA_HINT}"

    def supports(self, arch: type[Architecture]) -> str | None:
        """None for the families whose AWQ files were checked to load; else why not, before any download."""
        if set(arch.hf_names) & VERIFIED:
            return None
        return (f"AWQ of {'/'.join(arch.hf_names)} has not been checked to load in transformers; quantize its "
                "GPTQ or GGUF")

    @staticmethod
    def _options(options: BaseModel) -> AWQOptions:  # type: ignore[override]
        return options if isinstance(options, AWQOptions) else AWQOptions.model_validate(options.model_dump())

    @staticmethod
    def artifact_fields(opts: Any) -> dict[str, Any]:
        return {"bits": opts.bits, "group_size": opts.group_size, "zero_point": opts.zero_point}

    @staticmethod
    def bits_per_weight(folder: Path) -> float | None:
        return bits_per_weight(folder)

    @staticmethod
    def estimate_size(ckpt: Checkpoint, opts: Any) -> int:
        return estimate_size(ckpt, opts)

    def owns(self, path: Path) -> bool:
        return is_awq_folder(path)
