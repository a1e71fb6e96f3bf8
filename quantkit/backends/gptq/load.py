"""Loading a GPTQ folder for scoring: transformers with optimum where it can (and a kernel that runs on this CPU),
GPTQModel's own loader for mixtures of experts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantkit.backends.gptq.options import CPU_INT4_GROUPS, GPTQ_EXTRA_HINT, is_gptq_folder
from quantkit.errors import MissingDependency

_HUB_ENV = ("HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE")


@contextlib.contextmanager
def _hub_env_kept() -> Iterator[None]:
    """GPTQModel's dependency tokenicer sets HF_HOME (to /tmp/tokenicer_hf_home when unset) and HF_HUB_CACHE in
    ``os.environ`` when it is imported; put them back, so later Hub downloads in this process (the next model of a
    recipe) still use the user's cache."""
    saved = {k: os.environ.get(k) for k in _HUB_ENV}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_routed_experts(path: Path) -> bool:
    """transformers 5 holds routed experts fused in 3-D tensors and cannot load GPTQ's per-expert weights into them
    (it would leave the experts randomly initialised); GPTQModel's own loader keeps one module per expert."""
    from quantkit.arch import lookup

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    cls = lookup((config.get("architectures") or [""])[0])
    return bool(cls and cls.routed_experts)


def load_gptq(path: Path, device: str) -> Any:
    """A GPTQ (or plain) model folder, ready to score on `device`."""
    with _hub_env_kept():
        return _load(path, device)


def _load(path: Path, device: str) -> Any:
    quantized = is_gptq_folder(path)
    if quantized and (importlib.util.find_spec("optimum") is None or _has_routed_experts(path)):
        from gptqmodel import GPTQModel  # transformers needs optimum for GPTQ; GPTQModel loads it alone

        return GPTQModel.load(str(path), device=device).model.eval()
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    if quantized and device == "cpu":
        qcfg = json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"]
        if not (qcfg.get("bits") == 4 and qcfg.get("group_size") in CPU_INT4_GROUPS):
            from transformers import GPTQConfig

            # GPTQModel 7.6 picks its CPU int4pack kernel for g-1/g16 too, which then fails at the first
            # forward ("expect qGroupSize to be 32, 64, 128 or 256"); its plain torch kernel takes any layout
            kwargs["quantization_config"] = GPTQConfig(bits=qcfg.get("bits", 4), backend="gptq_torch")
    try:
        with warnings.catch_warnings():  # "the quantization_config from the model will be used": intended
            warnings.filterwarnings("ignore", message=".*passed `quantization_config`", category=UserWarning)
            return AutoModelForCausalLM.from_pretrained(str(path), device_map=device, **kwargs).eval()
    except ImportError as exc:
        raise MissingDependency(f"cannot load {path.name}: {exc}", GPTQ_EXTRA_HINT) from exc
