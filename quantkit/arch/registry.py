"""The registry: HF architecture name → `Architecture` class. The single place that says what quantkit supports."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from quantkit.arch.base import Architecture
from quantkit.errors import QuantkitError

_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: register `cls` under each of its ``hf_names``."""
    for name in cls.hf_names:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise RuntimeError(f"{name} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        _REGISTRY[name] = cls
    return cls


FAMILY_MODULES = ("llama", "qwen", "gemma", "deepseek")  # registration happens at import, in this order


def _load_all() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(f"quantkit.arch.{module}")


def registered() -> dict[str, type[Architecture]]:
    """Every supported HF architecture name → its class, in registration order."""
    _load_all()
    return dict(_REGISTRY)


def supported_names() -> list[str]:
    return list(registered())


def lookup(hf_name: str) -> type[Architecture] | None:
    return registered().get(hf_name)


def unsupported(hf_name: str) -> QuantkitError:
    return QuantkitError(f"unsupported architecture {hf_name}", f"supported: {', '.join(supported_names())}")


def for_checkpoint(folder: Path, config: dict[str, Any]) -> Architecture:
    """The architecture of a checkpoint folder; a one-line refusal when quantkit does not know it."""
    if not config.get("architectures"):
        raise QuantkitError(f"{folder / 'config.json'} names no architecture (no `architectures` list)",
                            "download the checkpoint's config.json again")
    name = config["architectures"][0]
    cls = lookup(name)
    if cls is None:
        raise unsupported(name)
    return cls(folder, config)
