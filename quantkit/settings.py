"""The settings of a run that are not a backend's options: calibration, evaluation and its gates, publishing.

One model, read by the command-line flags, a recipe's ``defaults:`` (and per-model overrides) and every backend
(`quantkit.backends.base.JobContext.settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.calibration import DEFAULT_CALIBRATION, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

DEFAULT_CTX = 512
DEFAULT_MAX_PPL_INCREASE = 0.05
DEFAULT_MAX_KLD = 0.05
DEFAULT_MAX_DRIFT = 0.1


@dataclass(frozen=True)
class Settings:
    """Everything about a run that is not a backend option: calibration, evaluation and gates, publishing."""

    calibration: str = DEFAULT_CALIBRATION
    calib_samples: int = DEFAULT_SAMPLES
    calib_seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    threads: int = 0  # 0 = every core
    eval: str | None = None  # evaluation text spec; None = no evaluation and no gate
    ctx: int = DEFAULT_CTX
    chunks: int | None = None
    max_ppl_increase: float = DEFAULT_MAX_PPL_INCREASE
    max_kld: float = DEFAULT_MAX_KLD
    drift: bool = False
    max_drift: float = DEFAULT_MAX_DRIFT
    publish: bool = False
    private: bool = False
    force: bool = False  # publish artifacts that failed the gate too

    def gate_text(self) -> str:
        text = f"gate ΔPPL ≤ {self.max_ppl_increase:.0%}, KLD ≤ {self.max_kld:g}"
        return text + (f"; drift check, ≤ {self.max_drift:.0%} of answers leaving Russian" if self.drift else "")


