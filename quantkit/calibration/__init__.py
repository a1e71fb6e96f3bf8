"""Calibration data: a `CalibrationSpec` → documents → deterministic token rows, and exports for each backend.

Specs: ``builtin:ru-mix`` (default), ``builtin:ru-eval`` (the held-out evaluation text), a path to a
``.txt`` (paragraphs split on blank lines), ``.jsonl`` (a ``text`` field or ``messages``) or ``.parquet``
(a text column) file, or ``hf:DATASET[:SPLIT[:COLUMN]]`` (through ``datasets``; needs the network).
Dialogue is rendered with the model's chat template when the model is an instruct model.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import console
from quantkit.errors import MissingDependency, QuantkitError

DEFAULT_CALIBRATION = "builtin:ru-mix"
DEFAULT_EVAL = "builtin:ru-eval"
DEFAULT_SAMPLES = 64
DEFAULT_SEQ_LEN = 512
BUILTIN_SETS = ("ru-mix", "ru-eval")
_CYRILLIC = re.compile(r"[\u0400-\u04FF]")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class CalibrationSpec:
    """Where calibration text comes from."""

    kind: str  # builtin | file | hf
    name: str  # builtin set name, file path, or dataset id
    split: str = "train"
    column: str = "text"

    @classmethod
    def parse(cls, spec: str | None) -> CalibrationSpec:
        spec = (spec or DEFAULT_CALIBRATION).strip()
        if spec.startswith("builtin:"):
            name = spec.split(":", 1)[1]
            if name not in BUILTIN_SETS:
                raise QuantkitError(f"unknown built-in calibration set '{name}'",
                                    f"built-in sets: {', '.join('builtin:' + s for s in BUILTIN_SETS)}")
            return cls("builtin", name)
        if spec.startswith("hf:"):
            parts = spec[3:].split(":")
            if not parts[0]:
                raise QuantkitError(f"bad calibration spec '{spec}'", "use hf:DATASET[:SPLIT[:COLUMN]]")
            return cls("hf", parts[0], parts[1] if len(parts) > 1 and parts[1] else "train",
                       parts[2] if len(parts) > 2 and parts[2] else "text")
        path = Path(spec).expanduser()
        if path.suffix.lower() not in (".txt", ".jsonl", ".parquet"):
            raise QuantkitError(f"bad calibration spec '{spec}'",
                                "use builtin:ru-mix, a .txt/.jsonl/.parquet file, or hf:DATASET[:SPLIT[:COLUMN]]")
        return cls("file", str(path))

    def __str__(self) -> str:
        if self.kind == "builtin":
            return f"builtin:{self.name}"
        if self.kind == "hf":
            return f"hf:{self.name}:{self.split}:{self.column}"
        return self.name


@dataclass
class Document:
    """One calibration document: plain text, or a dialogue (a list of {role, content})."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None
    domain: str = "text"

    def plain(self) -> str:
        if self.text is not None:
            return self.text
        names = {"user": "Пользователь", "assistant": "Ассистент", "system": "Система"}
        return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in self.messages or [])


@dataclass
class CalibrationData:
    spec: CalibrationSpec
    documents: list[Document] = field(default_factory=list)
    content_hash: str = ""

    def characters(self) -> int:
        return sum(len(d.plain()) for d in self.documents)

    def cyrillic_share(self) -> float:
        letters = cyr = 0
        for d in self.documents:
            t = d.plain()
            letters += len(_LETTER.findall(t))
            cyr += len(_CYRILLIC.findall(t))
        return cyr / letters if letters else 0.0

    def domains(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for d in self.documents:
            slot = out.setdefault(d.domain, {"documents": 0, "characters": 0})
            slot["documents"] += 1
            slot["characters"] += len(d.plain())
        return dict(sorted(out.items()))


# -- loading ---------------------------------------------------------------------------------------------

def builtin_dir() -> Path:
    """The installed built-in data folder (``quantkit.calibration_data``)."""
    return Path(str(resources.files("quantkit.calibration_data")))


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise QuantkitError(f"calibration file {path} does not exist", "check the path")
    if not path.is_file():
        raise QuantkitError(f"calibration path {path} is a folder, not a file",
                            "give one .txt, .jsonl or .parquet file")


def _read_text(path: Path) -> str:
    _check_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantkitError(f"calibration file {path} is not UTF-8 text", "convert it to UTF-8") from exc
    if not text.strip():
        raise QuantkitError(f"calibration file {path} is empty", "give a file with text in it")
    return text


def _load_jsonl(path: Path, domain: str | None = None) -> list[Document]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantkitError(f"{path}:{lineno} is not valid JSON", "one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise QuantkitError(f"{path}:{lineno} is a JSON {type(obj).__name__}, not an object",
                                'each line needs {"text": ...} or {"messages": [{"role": ..., "content": ...}]}')
        dom = str(obj.get("domain") or domain or "text")
        if isinstance(obj.get("messages"), list):
            msgs = []
            for i, m in enumerate(obj["messages"], 1):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise QuantkitError(f"{path}:{lineno}: message {i} has no 'role' and 'content' strings",
                                        'write each message as {"role": "user", "content": "..."}')
                msgs.append({"role": m["role"], "content": m["content"]})
            docs.append(Document(messages=msgs, domain=dom if domain is None else f"{domain}"))
        elif isinstance(obj.get("text"), str):
            docs.append(Document(text=obj["text"], domain=dom))
        else:
            raise QuantkitError(f"{path}:{lineno} has neither a 'text' field nor 'messages'",
                                'each line needs {"text": ...} or {"messages": [...]}')
    return docs


def _load_parquet(path: Path, column: str = "text") -> list[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependency("reading .parquet needs pyarrow", "pip install pyarrow") from exc
    _check_file(path)
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError...: all mean "not readable"
        raise QuantkitError(f"calibration file {path} is not a readable parquet file ({type(exc).__name__})",
                            "write it again, or give a .txt or .jsonl file") from exc
    if column not in table.column_names:
        raise QuantkitError(f"{path} has no column '{column}'", f"columns: {', '.join(table.column_names)}")
    return [Document(text=t) for t in table.column(column).to_pylist() if isinstance(t, str) and t.strip()]


def _load_hf(spec: CalibrationSpec) -> list[Document]:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise QuantkitError(f"calibration spec hf:{spec.name} needs the network, but offline mode is on",
                            "use builtin:ru-mix or a local file")
    try:
        import datasets
    except ImportError as exc:
        raise MissingDependency("hf: calibration specs need the datasets package", "pip install datasets") from exc
    try:
        ds = datasets.load_dataset(spec.name, split=spec.split)
    except Exception as exc:  # datasets raises many kinds; all mean the same to the user
        raise QuantkitError(f"cannot load dataset {spec.name} ({spec.split}): {type(exc).__name__}",
                            "check the id and the network, or use a local file") from exc
    if spec.column not in ds.column_names:
        raise QuantkitError(f"dataset {spec.name} has no column '{spec.column}'",
                            f"columns: {', '.join(ds.column_names)}")
    docs = []
    for value in ds[spec.column]:
        if isinstance(value, list) and value and isinstance(value[0], dict):
            docs.append(Document(messages=[{"role": m["role"], "content": m["content"]} for m in value]))
        elif isinstance(value, str) and value.strip():
            docs.append(Document(text=value))
    return docs


def load(spec: CalibrationSpec | str | None) -> CalibrationData:
    """Read the documents of a spec; raises a clear `QuantkitError` on missing, empty or non-UTF-8 input."""
    spec = spec if isinstance(spec, CalibrationSpec) else CalibrationSpec.parse(spec)
    docs: list[Document] = []
    h = hashlib.sha256(str(spec).encode())
    if spec.kind == "builtin":
        folder = builtin_dir() / spec.name
        files = sorted(folder.glob("*.txt")) + sorted(folder.glob("*.jsonl"))
        if not files:
            raise QuantkitError(f"the built-in set {spec} is missing from the installed package",
                                "reinstall quantkit-ru")
        for f in files:
            h.update(f.read_bytes())
            if f.suffix == ".jsonl":
                docs.extend(_load_jsonl(f, domain=f.stem))
            else:
                docs.extend(Document(text=p, domain=f.stem) for p in split_paragraphs(_read_text(f)))
    elif spec.kind == "file":
        path = Path(spec.name)
        _check_file(path)
        h.update(path.read_bytes())
        if path.suffix.lower() == ".jsonl":
            docs = _load_jsonl(path)
        elif path.suffix.lower() == ".parquet":
            docs = _load_parquet(path, spec.column)
        else:
            docs = [Document(text=p, domain=path.stem) for p in split_paragraphs(_read_text(path))]
    else:
        docs = _load_hf(spec)
        for d in docs:
            h.update(d.plain().encode())
    if not docs:
        raise QuantkitError(f"calibration set {spec} has no text", "give a set with text in it")
    return CalibrationData(spec=spec, documents=docs, content_hash=h.hexdigest()[:16])


def spec_hash(spec: CalibrationSpec | str | None) -> str:
    """What identifies a set's content without parsing it: the same hash as `load` gives a built-in set or a file
    (its bytes); an ``hf:`` set by its spec (planning never downloads)."""
    spec = spec if isinstance(spec, CalibrationSpec) else CalibrationSpec.parse(spec)
    h = hashlib.sha256(str(spec).encode())
    if spec.kind == "builtin":
        folder = builtin_dir() / spec.name
        for f in sorted(folder.glob("*.txt")) + sorted(folder.glob("*.jsonl")):
            h.update(f.read_bytes())
    elif spec.kind == "file":
        path = Path(spec.name)
        _check_file(path)
        h.update(path.read_bytes())
    else:
        h.update(b"hf")
    return h.hexdigest()[:16]


def check(spec: str | None) -> None:
    """Validate a calibration spec before any expensive step: a local file is read and parsed in full (cheap next
    to a conversion); built-in and ``hf:`` sets are checked when used."""
    parsed = CalibrationSpec.parse(spec)
    if parsed.kind == "file":
        load(parsed)


def builtin_documents(name: str, chat: bool = False) -> list[str]:
    """Plain texts of a built-in set (dialogues included as plain text unless `chat` is False → skipped)."""
    data = load(f"builtin:{name}")
    return [d.plain() for d in data.documents if d.text is not None or chat]


# -- token rows ------------------------------------------------------------------------------------------

def render(doc: Document, tokenizer: Any, chat: bool) -> str:
    """A document as the text the model will see: dialogue in the chat template for instruct models, rendered as a
    finished conversation (Qwen3's thinking template then writes each answer with an empty think block; thinking
    stays off: ``enable_thinking`` is ignored by templates that do not use it)."""
    if doc.messages is not None and chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(doc.messages, tokenize=False, enable_thinking=False)
    return doc.plain()


def token_stream(data: CalibrationData, tokenizer: Any, *, chat: bool, seed: int) -> list[int]:
    """All documents shuffled with `seed`, tokenized, joined by the end-of-text token."""
    docs = list(data.documents)
    random.Random(seed).shuffle(docs)
    texts = [render(d, tokenizer, chat) for d in docs]
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if sep is not None:
            ids.append(sep)
    return ids


def token_rows(
    spec: CalibrationSpec | str | None,
    tokenizer: Any,
    *,
    n_samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    chat: bool = False,
    data: CalibrationData | None = None,
) -> np.ndarray:
    """Deterministic calibration rows, ``int64[n_samples, seq_len]``; a clear error when the text is too short."""
    data = data or load(spec)
    share = data.cyrillic_share()
    if share < 0.5:
        console.warn(f"calibration set {data.spec} is only {share:.0%} Cyrillic; quantkit is tuned for Russian text")
    ids = token_stream(data, tokenizer, chat=chat, seed=seed)
    need = n_samples * seq_len
    if len(ids) < need:
        raise QuantkitError(
            f"calibration set {data.spec} has {len(ids):,} tokens for this tokenizer, but {n_samples} samples × "
            f"{seq_len} tokens need {need:,}",
            f"lower --calib-samples to {max(1, len(ids) // seq_len)} or --calib-seq-len, or give more text",
        )
    return np.asarray(ids[:need], dtype=np.int64).reshape(n_samples, seq_len)


def rows_fingerprint(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]


# -- exports ---------------------------------------------------------------------------------------------

def export_text(rows: np.ndarray, tokenizer: Any, path: Path) -> Path:
    """The rows decoded to one text file (what llama.cpp's ``llama-imatrix -f`` reads)."""
    from quantkit.files import write_text_atomic

    write_text_atomic(path, "\n".join(tokenizer.decode(list(map(int, r)), skip_special_tokens=False) for r in rows))
    return path


def export_parquet(data: CalibrationData, tokenizer: Any, path: Path, *, chat: bool, seed: int = 0) -> Path:
    """A parquet with one ``text`` column, documents rendered and shuffled as for the rows (for exllamav2)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependency("the EXL2 calibration parquet needs pyarrow", "pip install pyarrow") from exc
    from quantkit.files import atomic_path

    docs = list(data.documents)
    random.Random(seed).shuffle(docs)
    table = pa.table({"text": [render(d, tokenizer, chat) for d in docs]})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def summary(data: CalibrationData, tokenizer: Any | None = None, *, chat: bool = False,
            seq_len: int = DEFAULT_SEQ_LEN) -> dict[str, Any]:
    """What `quantkit calib show` prints: size, Cyrillic share, domains, tokens and the rows they yield."""
    out: dict[str, Any] = {
        "spec": str(data.spec),
        "documents": len(data.documents),
        "dialogues": sum(1 for d in data.documents if d.messages is not None),
        "characters": data.characters(),
        "bytes": sum(len(d.plain().encode()) for d in data.documents),
        "cyrillic_share": round(data.cyrillic_share(), 4),
        "domains": data.domains(),
        "fingerprint": data.content_hash,
    }
    if tokenizer is not None:
        n = len(token_stream(data, tokenizer, chat=chat, seed=0))
        out.update(tokens=n, seq_len=seq_len, rows=n // seq_len, chat_template_applied=bool(
            chat and getattr(tokenizer, "chat_template", None)))
    return out
