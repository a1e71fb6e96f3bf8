"""Is a GGUF file complete? Its header parses and every tensor's data lies inside the file.

Used before a step is recorded as finished (a 24-byte or truncated file never is), and by `quantkit push`'s
scan of metadata strings.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError

MAGIC = b"GGUF"


def check_gguf(path: Path) -> None:
    """Raise a `QuantkitError` when `path` is not a complete GGUF file."""
    from quantkit.backends.gguf.ggufinfo import read_info

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise QuantkitError(f"{path.name} is not a GGUF file ({size} bytes)", "run the same command again")
    try:
        reader = read_info(path)  # the tensor table only: a 152k-token vocabulary is skipped, not decoded
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, IndexError, struct errors... for broken files
        raise QuantkitError(f"{path.name} is an incomplete GGUF file ({size} bytes): {type(exc).__name__}",
                            "run the same command again") from exc
    if not reader.tensors:
        raise QuantkitError(f"{path.name} is an incomplete GGUF file ({size} bytes, no tensors)",
                            "run the same command again")
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise QuantkitError(f"{path.name} is truncated: tensor {t.name} ends at byte {end} of {size}",
                                "run the same command again")


def metadata_strings(path: Path, *, vocabulary: bool = False) -> list[tuple[str, str]]:
    """(key, value) for every string (or list of strings) in a GGUF's metadata; the tokenizer's pieces and merges
    only with `vocabulary`."""
    import gguf

    out: list[tuple[str, str]] = []
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if not vocabulary and field.name.startswith("tokenizer.ggml.") and field.name != "tokenizer.ggml.pre":
            continue  # token pieces, merges: not free text
        if not field.types or field.types[0] not in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            continue
        if field.types[0] == gguf.GGUFValueType.ARRAY and (len(field.types) < 2
                                                           or field.types[1] != gguf.GGUFValueType.STRING):
            continue
        for idx in field.data:
            out.append((field.name, bytes(field.parts[idx]).decode("utf-8", errors="replace")))
    return out


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == MAGIC
