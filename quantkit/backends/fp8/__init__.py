"""FP8_DYNAMIC in the compressed-tensors format (see `quantkit.backends.fp8.backend`): options and header-only
planning, the streamed recipe and writer, the backend and the card section, one module each."""

from quantkit.backends.fp8.backend import FP8Backend, load_fp8
from quantkit.backends.fp8.card import FP8Sections
from quantkit.backends.fp8.options import (
    FP8_EXTRA_HINT,
    FP8Options,
    bits_per_weight,
    estimate_size,
    ignored_modules,
    is_fp8_folder,
    plan_items,
    quantization_config,
    quantized_names,
)

__all__ = ["FP8_EXTRA_HINT", "FP8Backend", "FP8Options", "FP8Sections", "bits_per_weight", "estimate_size",
           "ignored_modules", "is_fp8_folder", "load_fp8", "plan_items", "quantization_config", "quantized_names"]
