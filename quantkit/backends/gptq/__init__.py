"""GPTQ through GPTQModel (see `quantkit.backends.gptq.backend`): options and header-only estimates, the backend, the
child worker, the scorer and the card section, one module each."""

from quantkit.backends.gptq.backend import GPTQBackend
from quantkit.backends.gptq.card import GPTQSections
from quantkit.backends.gptq.options import (
    ALLOWED_BITS,
    COMMON_GROUPS,
    COPIED_FILES,
    CPU_INT4_GROUPS,
    GPTQ_EXTRA_HINT,
    GPTQOptions,
    bits_per_weight,
    check_group_size,
    estimate_size,
    is_gptq_folder,
    quantized_layers,
)
from quantkit.quality.scorers import TransformersScorer

__all__ = ["ALLOWED_BITS", "COMMON_GROUPS", "COPIED_FILES", "CPU_INT4_GROUPS", "GPTQ_EXTRA_HINT", "GPTQBackend",
           "GPTQOptions", "GPTQSections", "TransformersScorer", "bits_per_weight", "check_group_size",
           "estimate_size", "is_gptq_folder", "quantized_layers"]
