"""The GGUF backend: llama.cpp's K- and I-quants with a Russian importance matrix. Its steps are declared in
`quantkit.backends.gguf.steps`; this module is what the registry loads (check, steps, scorer, card sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.card import GGUFSections
from quantkit.backends.gguf.ggufinfo import gguf_stats
from quantkit.backends.gguf.options import APPROX_BPW, GGUFOptions, cli_extra, parse_size
from quantkit.steps import Step
from quantkit.workspace import OUTPUT_CHECKS

__all__ = ["APPROX_BPW", "GGUFBackend", "GGUFOptions", "gguf_stats", "parse_size"]

def _check_gguf(path: Path) -> None:
    from quantkit.backends.gguf.convert.check import check_gguf

    check_gguf(path)


OUTPUT_CHECKS[".gguf"] = _check_gguf  # no GGUF is recorded as finished unless it parses and holds all its data


class GGUFBackend(GGUFSections):
    """llama.cpp GGUF: K- and I-quants with a Russian importance matrix."""

    name = "gguf"
    description = "GGUF for llama.cpp / ollama / LM Studio (K- and I-quants, imatrix)"
    command_help = ("Convert to GGUF, compute a Russian importance matrix, and quantize with llama.cpp. Pick types "
                    "with flags (--q4_k_m --q5_k_m --q8_0 --iq4_xs ...) or --types; default Q4_K_M.")
    options_model = GGUFOptions
    cli_extra = staticmethod(cli_extra)
    generic_verify = False  # its own verify steps compare llama.cpp with transformers (--no-verify leaves them out)

    def check(self) -> str | None:
        try:
            import gguf  # noqa: F401
            import llama_cpp  # noqa: F401
        except ImportError:
            return "GGUF needs llama-cpp-python and gguf: pip install 'quantkit-ru[gguf]'"
        return None

    def steps(self, ctx: JobContext, options: GGUFOptions) -> list[Step]:
        from quantkit.backends.gguf.steps import GGUFSteps

        return GGUFSteps(ctx, options).steps()

    # -- eval --------------------------------------------------------------------------------------------
    def owns(self, path: Path) -> bool:
        path = Path(path)
        if not (path.is_file() and path.suffix == ".gguf") or path.name.startswith("imatrix"):
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == b"GGUF"

    def scorer(self, path: Path, *, n_ctx: int) -> Any:
        from quantkit.backends.gguf.llamacpp import LlamaScorer

        return LlamaScorer(path, n_ctx=n_ctx)
