"""EXL2 through exllamav2's converter (see `quantkit.backends.exl2.backend`): options, the config fix, the converter's
working folders and subprocess, the backend, the scorer and the card section, one module each."""

from quantkit.backends.exl2.backend import EXL2Backend
from quantkit.backends.exl2.calib import (
    CalibrationFile,
    count_tokens,
    load_tokenizer,
    read_parquet_texts,
    texts_fingerprint,
)
from quantkit.backends.exl2.card import EXL2Sections
from quantkit.backends.exl2.config import SOURCE_EXTRA_FILES, fix_config, fix_config_file, prepare_source
from quantkit.backends.exl2.converter import (
    CONVERTER_MODULE,
    calibration_perplexity,
    converter_args,
    converter_failed,
    parse_status,
    run_converter,
)
from quantkit.backends.exl2.options import (
    CONFIG_FIX_VERSION,
    HEAD_BITS,
    HEAD_BPW,
    INSTALL_HINT,
    NO_CUDA,
    EXL2Options,
    Settings,
    bits_name,
    estimate_size,
    settings,
)
from quantkit.backends.exl2.scorer import EXL2Scorer
from quantkit.backends.exl2.work import (
    clear_work,
    output_complete,
    quant_method,
    read_job,
    reset_work,
    work_state,
)

__all__ = [
    "CONFIG_FIX_VERSION", "CONVERTER_MODULE", "HEAD_BITS", "HEAD_BPW", "INSTALL_HINT", "NO_CUDA", "SOURCE_EXTRA_FILES",
    "CalibrationFile", "EXL2Backend", "EXL2Options", "EXL2Scorer", "EXL2Sections", "Settings", "bits_name",
    "calibration_perplexity", "clear_work", "converter_args", "converter_failed", "count_tokens", "estimate_size",
    "fix_config", "fix_config_file", "load_tokenizer", "output_complete", "parse_status", "prepare_source",
    "quant_method", "read_job", "read_parquet_texts", "reset_work", "run_converter", "settings", "texts_fingerprint",
    "work_state",
]
