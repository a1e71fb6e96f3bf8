"""Quantization through llama.cpp's ``llama_model_quantize``, with importance-matrix data and per-tensor types.

Files quantized this way are byte-identical to ``llama-quantize``'s for the same input, imatrix and options.
"""

from __future__ import annotations

import ctypes
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np

from quantkit.backends.gguf.llamacpp import default_threads, lib
from quantkit.backends.gguf.quantize.fallback import fit_rows
from quantkit.errors import MissingDependency, QuantkitError
from quantkit.workspace import DiskFull, staging_dir


def _file_types() -> dict[str, int]:
    """Every llama.cpp file type a user can ask for (name → LLAMA_FTYPE_MOSTLY_* value), read from the llama.cpp that
    llama-cpp-python binds, in llama.cpp's own order (empty without it: `parse_file_type` then says what to
    install)."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    prefix = "LLAMA_FTYPE_MOSTLY_"
    found = {n[len(prefix):]: int(getattr(llama_cpp, n)) for n in dir(llama_cpp) if n.startswith(prefix)}
    return dict(sorted(found.items(), key=lambda kv: kv[1]))


FILE_TYPES: dict[str, int] = _file_types()
# llama.cpp's own rule (`tensor_requires_imatrix` in src/llama-quant.cpp): a tensor other than token_embd and
# output needs an importance matrix when its type is one of these, or Q2_K inside a Q2_K_S file. The file types
# whose tensor choices (`llama_tensor_get_type`) land on such a type without one: their default type does, or
# (IQ3_XS) their attention Q/K do. Q2_K, IQ3_S, IQ3_M and IQ4_* files are made without one, as llama-quantize does.
IMATRIX_TENSOR_TYPES = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"})


def needs_imatrix(file_type: str, tensor_types: list[tuple[str, int]] | None = None) -> bool:
    """Whether llama.cpp would refuse to make `file_type` (with these per-tensor overrides) without an importance
    matrix: its rule, applied to the types it picks and to the overrides."""
    if file_type in NEEDS_IMATRIX:
        return True
    named = {int(gguf.GGMLQuantizationType[t]) for t in IMATRIX_TENSOR_TYPES}
    q2k = int(gguf.GGMLQuantizationType.Q2_K)
    return any(t in named or (t == q2k and file_type == "Q2_K_S") for _, t in tensor_types or [])

RECOMMENDS_IMATRIX = {t for t in FILE_TYPES if t.startswith(("IQ", "Q2", "Q3"))}


def parse_file_type(name: str) -> str:
    """``q4_k_m`` / ``Q4_K_M`` → ``Q4_K_M``; a clear error naming the valid types otherwise."""
    key = name.strip().upper().replace("-", "_")
    if not FILE_TYPES:
        raise MissingDependency("GGUF file types need llama-cpp-python", "pip install 'quantkit-ru[gguf]'")
    if key not in FILE_TYPES:
        raise QuantkitError(f"unknown quant type '{name}'", f"choose from {', '.join(FILE_TYPES)}")
    return key


def parse_ggml_type(name: str) -> int:
    """A tensor type name (``q8_0``, ``f16``, ``q6_k``) → its GGML type id."""
    key = name.strip().upper()
    try:
        return int(gguf.GGMLQuantizationType[key])
    except KeyError:
        valid = ", ".join(t.name.lower() for t in gguf.GGMLQuantizationType if t.name not in ("I8", "I16", "I32",
                                                                                                "I64", "F64"))
        raise QuantkitError(f"unknown tensor type '{name}'", f"choose from {valid}") from None


def parse_tensor_types(specs: list[str]) -> list[tuple[str, int]]:
    """``PATTERN=TYPE`` (as llama-quantize's ``--tensor-type``) → (regex, type id)."""
    out = []
    for spec in specs:
        if "=" not in spec:
            raise QuantkitError(f"bad --tensor-type '{spec}'", "use PATTERN=TYPE, e.g. attn_v=q8_0")
        pattern, type_name = spec.rsplit("=", 1)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise QuantkitError(f"bad --tensor-type pattern '{pattern}': {exc}", "use a regular expression") from exc
        out.append((pattern, parse_ggml_type(type_name)))
    return out


@dataclass
class QuantizeOptions:
    file_type: str
    imatrix: dict[str, np.ndarray] | None = None
    tensor_types: list[tuple[str, int]] = field(default_factory=list)
    output_type: int | None = None
    embedding_type: int | None = None
    threads: int = 0
    keep_split: bool = False
    need: int | None = None  # an upper bound of the output's size, for the disk-full message


def quantize(src: Path, dst: Path, opts: QuantizeOptions, *, on_done: Callable[[], None] | None = None) -> list[Path]:
    """Quantize `src` (a GGUF, or the first part of a split one) to `dst`; returns the files written.

    The result is written into a hidden ``.partial`` folder beside `dst` and moved into place when complete.
    """
    L = lib()
    ftype = opts.file_type
    types, output_type, embedding_type = fit_rows(src, opts.tensor_types, opts.output_type, opts.embedding_type)
    opts = replace(opts, tensor_types=types, output_type=output_type, embedding_type=embedding_type)
    if needs_imatrix(ftype, opts.tensor_types) and not opts.imatrix:
        raise QuantkitError(f"{ftype} needs an importance matrix",
                            "drop --no-imatrix, or pass --imatrix FILE")
    params = L.llama_model_quantize_default_params()
    params.nthread = opts.threads or default_threads()
    params.ftype = FILE_TYPES[ftype]
    params.keep_split = opts.keep_split
    if opts.output_type is not None:
        params.output_tensor_type = opts.output_type
    if opts.embedding_type is not None:
        params.token_embedding_type = opts.embedding_type
    keep: list[object] = []  # keep ctypes buffers alive for the duration of the call
    if opts.imatrix:
        entries = (L.llama_model_imatrix_data * (len(opts.imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(opts.imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            bname = name.encode()
            keep.append(bname)
            entries[i].name = bname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(opts.imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(L.llama_model_imatrix_data))
    if opts.tensor_types:
        overrides = (L.llama_model_tensor_override * (len(opts.tensor_types) + 1))()
        for i, (pattern, type_id) in enumerate(opts.tensor_types):
            bpat = pattern.encode()
            keep.append(bpat)
            overrides[i].pattern = bpat
            overrides[i].type = type_id
        overrides[len(opts.tensor_types)].pattern = None
        overrides[len(opts.tensor_types)].type = _ggml_type_count()
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(L.llama_model_tensor_override))

    full = False
    try:
        with staging_dir(dst, need=opts.need) as stage:
            target = stage.work / (dst.name[: -len(".gguf")] if opts.keep_split else dst.name)
            rc = L.llama_model_quantize(str(src).encode(), str(target).encode(), ctypes.byref(params))
            if rc != 0:
                full = _disk_was_full(stage.work, opts.need)
                raise QuantkitError(f"llama.cpp failed to quantize {src.name} to {ftype} (code {rc})",
                                    "QUANTKIT_DEBUG=1 shows llama.cpp's log")
            if not any(stage.work.iterdir()):
                raise QuantkitError(f"llama.cpp wrote no file for {ftype}", "QUANTKIT_DEBUG=1 shows llama.cpp's log")
    except QuantkitError as exc:
        if full:
            raise DiskFull(dst.parent, opts.need) from exc
        raise
    del keep
    if on_done:
        on_done()
    return stage.files


def _disk_was_full(work: Path, need: int | None) -> bool:
    """llama.cpp reports a failed write only as a non-zero code: look at the disk while its partial file is there.
    The disk was full when what is free is less than what was still to write (`need` is an upper bound)."""
    written = sum(f.stat().st_size for f in work.iterdir() if f.is_file())
    free = shutil.disk_usage(work).free
    return free < max((need or 0) - written, 1 << 20)


def _ggml_type_count() -> int:
    """GGML_TYPE_COUNT, the terminator of ``tt_overrides``, from the llama.cpp that llama-cpp-python binds."""
    import llama_cpp

    return int(llama_cpp.GGML_TYPE_COUNT)
