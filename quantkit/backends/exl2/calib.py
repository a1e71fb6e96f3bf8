"""The calibration parquet the converter reads, and the token counts that decide whether it is long enough."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.backends.exl2.options import INSTALL_HINT
from quantkit.errors import MissingDependency
from quantkit.source import Checkpoint


@dataclass
class CalibrationFile:
    """The calibration parquet and what the converter will find in it."""

    path: Path
    fingerprint: str  # hash of the texts in it, in order
    tokens: int  # tokens for the model's tokenizer, texts concatenated as the converter does
    documents: int
    chat: bool
    spec: str
    content_hash: str
    cyrillic_share: float
    text_bytes: int = 0


def load_tokenizer(ckpt: Checkpoint) -> Any:
    """The checkpoint's tokenizer through transformers (chat template included)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise MissingDependency("EXL2 calibration needs transformers to read the tokenizer", INSTALL_HINT) from exc
    return AutoTokenizer.from_pretrained(str(ckpt.path))


def count_tokens(texts: list[str], tokenizer: Any) -> int:
    """Tokens of the texts encoded one by one without special tokens and concatenated, as the converter does."""
    if not texts:
        return 0
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


def texts_fingerprint(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()[:16]


def read_parquet_texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if isinstance(t, str)]
