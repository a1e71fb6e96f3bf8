"""MLX through mlx-lm's converter (see `quantkit.backends.mlx.backend`): options and offline estimates, the source
config fix, the child worker, the backend, the scorer and the card section, one module each. Nothing here imports
mlx or mlx-lm at import time."""

from quantkit.backends.mlx.backend import MLXBackend
from quantkit.backends.mlx.card import MLXSections
from quantkit.backends.mlx.config import fix_config, prepare_source
from quantkit.backends.mlx.options import (
    BITS,
    GROUP_SIZES,
    INSTALL_HINT,
    MLXOptions,
    bits_name,
    check_widths,
    estimate_size,
    quantized_widths,
)
from quantkit.backends.mlx.scorer import MLXScorer, is_mlx_folder

__all__ = ["BITS", "GROUP_SIZES", "INSTALL_HINT", "MLXBackend", "MLXOptions", "MLXScorer", "MLXSections",
           "bits_name", "check_widths", "estimate_size", "fix_config", "is_mlx_folder", "prepare_source",
           "quantized_widths"]
