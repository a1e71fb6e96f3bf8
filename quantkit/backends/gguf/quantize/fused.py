"""Convert and quantize in one pass over the checkpoint.

Each tensor is read from the checkpoint once. The converter writes it to the unquantized GGUF while worker threads
turn the same rows into every requested type with llama.cpp's own ``ggml_quantize_chunk`` (what
``llama_model_quantize`` calls per chunk of rows), check them with ``ggml_validate_row_data``, and write them at their
final offsets in each quantized file.

Which type each tensor gets is llama.cpp's decision, not a copy of its rules: ``llama_model_quantize`` runs once per
file type on a *skeleton* of the converted file (the same metadata, every matrix cut to two rows of zeros, the data
left as a hole in a sparse file) with the same options and importance matrix, and the tensor table of what it writes
gives the type and order of every tensor. The metadata is then what llama.cpp writes: the converted file's keys with
``general.quantization_version`` and ``general.file_type`` moved to the end. The files are byte-identical to
``llama-quantize`` run on the converted file (``tests/test_fused.py``). What this saves is the second pass: reading
the converted file back, converting it to float32 and checking it once per type, and the idle core while the
converter writes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from quantkit.backends.gguf.quantize.core import FILE_TYPES, QuantizeOptions, quantize
from quantkit.backends.gguf.quantize.direct_file import DirectFile, pwrite_all
from quantkit.backends.gguf.quantize.ordered_hash import OrderedHash
from quantkit.errors import QuantkitError
from quantkit.workspace import DiskFull, check_disk, remember_sha256, staging_dir

SLAB_BYTES = 16 << 20  # float32 bytes of rows converted and quantized by one task
HOLD_SOFT = 64 << 20  # bytes a file's ordered writer may hold before new work waits for it
_T = gguf.GGMLQuantizationType
STORAGE = {_T.BF16: np.uint16, _T.F16: np.float16, _T.F32: np.float32}  # unquantized types → numpy storage
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")

_ggml: Any = None
_ggml_lock = threading.Lock()


def ggml() -> Any:
    """ggml's C library as llama-cpp-python loaded it, with the signatures used here."""
    global _ggml
    with _ggml_lock:
        if _ggml is None:
            from quantkit.backends.gguf.llamacpp import lib

            folder = Path(lib().__file__).parent / "lib"
            names = ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")
            path = next((folder / n for n in names if (folder / n).exists()), None)
            if path is None:
                raise QuantkitError(f"llama-cpp-python's ggml library is not in {folder}",
                                    "reinstall llama-cpp-python (scripts/install.sh)")
            g = ctypes.CDLL(str(path))
            c_int64, c_void_p = ctypes.c_int64, ctypes.c_void_p
            g.ggml_quantize_chunk.restype = ctypes.c_size_t
            g.ggml_quantize_chunk.argtypes = [ctypes.c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p]
            g.ggml_validate_row_data.restype = ctypes.c_bool
            g.ggml_validate_row_data.argtypes = [ctypes.c_int, c_void_p, ctypes.c_size_t]
            g.ggml_row_size.restype = ctypes.c_size_t
            g.ggml_row_size.argtypes = [ctypes.c_int, c_int64]
            for name in ("ggml_bf16_to_fp32_row", "ggml_fp16_to_fp32_row"):
                getattr(g, name).argtypes = [c_void_p, c_void_p, c_int64]
                getattr(g, name).restype = None
            _ggml = g
    return _ggml


@dataclass
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: the row length last
    qtype: int  # ggml type id
    nbytes: int


def row_bytes(qtype: int, ncols: int) -> int:
    return int(ggml().ggml_row_size(int(qtype), int(ncols)))


def tensor_bytes(qtype: int, shape: tuple[int, ...]) -> int:
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return rows * row_bytes(qtype, shape[-1])


def gguf_header(pack: Callable[..., bytes], kv: list[tuple[str, gguf.GGUFValue]], tensors: list[TensorSpec],
                alignment: int) -> tuple[bytes, list[int], int]:
    """A GGUF v3 header (padded to `alignment`) laid out as gguf's and llama.cpp's writers lay it out; returns it,
    each tensor's offset in the data section, and the data section's size (every tensor padded to `alignment`)."""
    S = gguf.GGUFValueType.STRING
    out = bytearray(struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(tensors), len(kv)))
    for key, val in kv:
        out += pack(key, S, add_vtype=False)
        out += pack(val.value, val.type, add_vtype=True, sub_type=val.sub_type)
    offsets: list[int] = []
    at = 0
    for t in tensors:
        out += pack(t.name, S, add_vtype=False)
        out += struct.pack(f"<I{len(t.shape)}QIQ", len(t.shape), *reversed(t.shape), int(t.qtype), at)
        offsets.append(at)
        at += t.nbytes + (-t.nbytes) % alignment
    out += bytes((-len(out)) % alignment)
    return bytes(out), offsets, at


def quantized_kv(kv: list[tuple[str, gguf.GGUFValue]], file_type: str) -> list[tuple[str, gguf.GGUFValue]]:
    """The metadata llama.cpp writes into a quantized file: the source's keys, split keys dropped, the quantization
    version and file type set (llama.cpp's setters remove a key and append it, so both move to the end)."""
    u32 = gguf.GGUFValueType.UINT32
    drop = {"general.quantization_version", "general.file_type", *_SPLIT_KEYS}
    return [*((k, v) for k, v in kv if k not in drop),
            ("general.quantization_version", gguf.GGUFValue(gguf.GGML_QUANT_VERSION, u32)),
            ("general.file_type", gguf.GGUFValue(FILE_TYPES[file_type], u32))]


def llama_types(pack: Callable[..., bytes], kv: list[tuple[str, gguf.GGUFValue]], tensors: list[TensorSpec],
                alignment: int, opts: QuantizeOptions, scratch: Path) -> list[tuple[str, int]]:
    """llama.cpp's type for every tensor of a `opts.file_type` file, in the order it writes them: quantize a
    skeleton of the converted file (its metadata, each matrix cut to two rows) and read the result's tensor table.
    Type rules look at names, row lengths, expert counts and hyper-parameters, never at the number of rows."""
    from quantkit.backends.gguf.ggufinfo import read_info

    cut = []
    for t in tensors:
        shape = (*t.shape[:-2], min(t.shape[-2], 2), t.shape[-1]) if len(t.shape) >= 2 else t.shape
        cut.append(TensorSpec(t.name, shape, t.qtype, tensor_bytes(t.qtype, shape)))
    # the vocabulary's lists, most of the probe's cost on a 152k vocabulary, are left out; llama.cpp reads only
    # their length (some architectures' sizes depend on it), which `{arch}.vocab_size` gives it instead
    slim = [(k, v) for k, v in kv if not k.startswith("tokenizer.ggml.") or not isinstance(v.value, (list, tuple))]
    values = dict(kv)
    arch = values["general.architecture"].value
    if f"{arch}.vocab_size" not in values and "tokenizer.ggml.tokens" in values:
        n = len(values["tokenizer.ggml.tokens"].value)
        slim.append((f"{arch}.vocab_size", gguf.GGUFValue(n, gguf.GGUFValueType.UINT32)))
    head, _, data = gguf_header(pack, slim, cut, alignment)
    src = scratch / f"skeleton-{opts.file_type}.gguf"
    with open(src, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + data)  # zeros, as a hole
    files = quantize(src, scratch / f"types-{opts.file_type}.gguf", replace(opts, threads=1, need=None))
    entries = read_info(files[0]).tensors
    for f in (src, *files):
        f.unlink()
    return [(e.name, int(e.tensor_type)) for e in entries]


@dataclass
class _Output:
    quant: str
    dst: Path
    opts: QuantizeOptions
    types: dict[str, int] = field(default_factory=dict)
    offsets: dict[str, int] = field(default_factory=dict)  # absolute, in the file
    size: int = 0
    fd: int = -1
    files: list[Path] = field(default_factory=list)
    hash: OrderedHash | None = None
    writer: DirectFile | None = None  # when written around the page cache (through `hash`, in order)


class FusedQuantizer:
    """The quantized files of one conversion, written while it runs (`Converter.write(..., sink=...)`).

    Use as a context manager around the conversion: on success each file is moved into place when the block ends;
    on any error or interrupt nothing is left behind. With `direct`, every file (the converted one too, which it
    then writes itself: `writes_base`) goes around the page cache (`direct_file`): for a run that does not
    read them again."""

    def __init__(self, outputs: list[tuple[str, Path, QuantizeOptions]], *, threads: int, base_bytes: int = 0,
                 on_rows: Callable[[str, int], None] | None = None, direct: bool = False) -> None:
        self.outputs = [_Output(q, dst, opts) for q, dst, opts in outputs]
        self.base_bytes = base_bytes  # what the converted file still has to write, for the disk check
        self.threads = max(1, threads)
        self.on_rows = on_rows
        self._stack = ExitStack()
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(2 * self.threads + 1)  # tasks in flight: bounded memory
        self._futures: list[Future[None]] = []
        self._stages: list[Any] = []
        self.base_hash: OrderedHash | None = None
        self.direct = direct
        self._base_writer: DirectFile | None = None
        self._base_size = 0

    def __enter__(self) -> FusedQuantizer:
        # workers take the GIL back after each C call; a thread busy in Python (verification's imports) would make
        # each of them wait up to the 5 ms default switch interval
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, 0.0005))
        for out in self.outputs:
            self._stages.append(self._stack.enter_context(staging_dir(out.dst, need=out.opts.need)))
        self._scratch = self._stack.enter_context(staging_dir(self.outputs[0].dst.with_name(".types")))
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            for writer in [self._base_writer, *(o.writer for o in self.outputs)]:
                if writer is not None:
                    writer.abort()  # closed already when the pass finished
            for out in self.outputs:
                if out.fd >= 0:
                    os.close(out.fd)
                    out.fd = -1
            for f in list(self._scratch.work.iterdir()):  # nothing of the type probes is moved into place
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        finally:
            sys.setswitchinterval(self._interval)
            self._stack.__exit__(*exc)
        if isinstance(exc[1], DiskFull) and self.outputs[0].size:  # name all that the pass had to write
            raise DiskFull(exc[1].folder, self.base_bytes + sum(o.size for o in self.outputs)) from exc[1]
        if exc[0] is None:
            for out, stage in zip(self.outputs, self._stages, strict=True):
                out.files = list(stage.files)

    def files(self, quant: str) -> list[Path]:
        return next(o.files for o in self.outputs if o.quant == quant)

    def remember_hashes(self, base: Path) -> None:
        """Hand the sha256 of every file written (the converted `base` too) to the workspace, once in place."""
        pairs = [(o.files[0], o.hash) for o in self.outputs] + [(base, self.base_hash)]
        for path, h in pairs:
            digest = h.hexdigest() if h is not None else None
            if digest is not None:
                remember_sha256(path, digest)

    # -- called by the converter -------------------------------------------------------------------------
    def start(self, pack: Callable[..., bytes], kv: list[tuple[str, gguf.GGUFValue]], tensors: list[TensorSpec],
              alignment: int, base: Path | None = None) -> None:
        """Ask llama.cpp for every file's types, then write each file's header and size it. `base` is the
        converted file being written (its header already there): its data is hashed on the way too."""
        sizes = {t.name: t for t in tensors}
        self._base_at: dict[str, int] = {}
        if base is not None:
            head, offsets, data = gguf_header(pack, kv, tensors, alignment)
            with open(base, "rb") as fh:  # the writer pads before the first tensor: not there yet
                got = fh.read(len(head) + 1)
            same = head[: len(got)] == got and not any(head[len(got) :])
            if same:  # the converter's writer laid it out as expected: hash its tensors as they go by
                self._base_at = {t.name: len(head) + o for t, o in zip(tensors, offsets, strict=True)}
                self._base_size = len(head) + data
                if self.direct:  # and write them: the header again, then the data, around the page cache
                    self._base_writer = DirectFile(base)
                self.base_hash = OrderedHash(_extents(head, tensors, offsets), self._base_size,
                                             writer=self._base_writer)
                self.base_hash.add(0, head)
        self._specs = sizes
        for out, stage in zip(self.outputs, self._stages, strict=True):
            order = llama_types(pack, kv, tensors, alignment, out.opts, self._scratch.work)
            if sorted(n for n, _ in order) != sorted(sizes):
                raise QuantkitError(f"llama.cpp planned other tensors for {out.quant} than the converter wrote",
                                    "report it with the model id")
            specs = [TensorSpec(n, sizes[n].shape, q, tensor_bytes(q, sizes[n].shape)) for n, q in order]
            head, offsets, data = gguf_header(pack, quantized_kv(kv, out.quant), specs, alignment)
            out.types = dict(order)
            out.offsets = {s.name: len(head) + o for s, o in zip(specs, offsets, strict=True)}
            out.size = len(head) + data
            path = stage.work / out.dst.name
            if self.direct:
                out.writer = DirectFile(path)
            else:
                out.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                pwrite_all(out.fd, memoryview(head), 0)
            out.hash = OrderedHash(_extents(head, specs, offsets), out.size, writer=out.writer)
            out.hash.add(0, head)
        need = self.base_bytes + sum(out.size for out in self.outputs)
        check_disk(self.outputs[0].dst.parent, need + (16 << 20),
                   ", ".join([*(o.dst.name for o in self.outputs), "the converted file"]))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="quantkit-quantize")

    def tensor(self, name: str, qtype: int, data: np.ndarray, first_row: int = 0, *, quantize: bool = True,
               base: bool = True) -> None:
        """Rows of one tensor in the converter's storage type; `first_row` counts rows of the whole tensor (all
        its experts, for a stacked one). Each tensor is given twice (`quantize_order`): to be quantized
        (`base=False`), and for the converted file (`quantize=False`)."""
        shape = self._specs[name].shape
        n_cols = shape[-1]
        per = shape[-2] if len(shape) == 3 else 1 << 62  # llama.cpp takes the third dimension for experts
        rows = np.ascontiguousarray(data).view(STORAGE[_T(qtype)]).reshape(-1, n_cols)
        step = max(1, SLAB_BYTES // (4 * rows.shape[1]))
        a = 0
        while a < rows.shape[0]:
            row = first_row + a
            b = min(rows.shape[0], a + step, a + per - row % per)  # a slab never spans two experts
            self._raise_failed()
            self._wait_for_writers()
            self._slots.acquire()
            assert self._pool is not None
            self._futures.append(self._pool.submit(self._slab, name, qtype, rows[a:b], row,
                                                   row // per if len(shape) == 3 else None, quantize, base))
            a = b

    def finish(self) -> None:
        """Wait for every task; raise the first failure; give each file its final size."""
        for f in self._futures:
            f.result()
        self._futures.clear()
        for out in self.outputs:
            if out.writer is not None:
                out.writer.close(out.size)
                continue
            os.ftruncate(out.fd, out.size)  # the padding after the last tensor
            os.close(out.fd)
            out.fd = -1
        if self._base_writer is not None:
            self._base_writer.close(self._base_size)

    def quantize_order(self, tensors: list[Any]) -> list[Any]:
        """`tensors` (anything with a GGUF `name`) in the quantized files' order. llama.cpp writes the blocks in
        numeric order, each one's tensors by name; the converter follows the checkpoint (``blk.10`` before
        ``blk.2``, a block's MLP before its attention). Quantized in the files' order, each file's pieces arrive in
        order and its writer holds none of them; in the converter's, a 1B model's Q8_0 file held 430 MB (six
        blocks) and a 30B model's would pass the hash's limit. The converted file gets each tensor in its own
        order, loaded again: for bf16 a second view of the checkpoint."""
        rank = {name: i for i, name in enumerate(self.outputs[0].types)}  # the same order in every file
        return sorted(tensors, key=lambda t: rank.get(t.name, len(rank)))

    @property
    def writes_base(self) -> bool:
        """Whether the converted file's data is written here (around the page cache), not by the converter."""
        return self._base_writer is not None

    # -- workers -----------------------------------------------------------------------------------------
    def _wait_for_writers(self) -> None:
        """Hold back new work while a file's ordered writer lags (a slow disk under direct writes): its pieces
        would pile up in memory. Every piece a writer waits for is already submitted, so this always ends."""
        hashes = [h for h in (self.base_hash, *(o.hash for o in self.outputs)) if h is not None and not h.failed]
        while any(h.held > HOLD_SOFT for h in hashes):
            self._raise_failed()
            time.sleep(0.001)

    def _raise_failed(self) -> None:
        done = [f for f in self._futures if f.done()]
        for f in done:
            f.result()
        if done:
            self._futures = [f for f in self._futures if not f.done()]

    def _slab(self, name: str, qtype: int, rows: np.ndarray, first_row: int, expert: int | None, quantize: bool,
              base: bool) -> None:
        try:
            g = ggml()
            n_rows, n_cols = rows.shape
            rows = np.ascontiguousarray(rows)
            f32: np.ndarray | None = None
            if self.base_hash is not None and base:
                self.base_hash.add(self._base_at[name] + first_row * n_cols * rows.itemsize, rows)
            for out in self.outputs if quantize else ():
                target = out.types[name]
                if target == qtype:
                    buf = rows.view(np.uint8).reshape(-1)
                    at = out.offsets[name] + first_row * rows.shape[1] * rows.itemsize
                else:
                    if f32 is None:
                        f32 = _to_f32(rows, qtype)
                    size = row_bytes(target, n_cols)
                    buf = np.empty(n_rows * size, np.uint8)
                    imatrix = self._imatrix(out, name, n_cols, expert)
                    done = g.ggml_quantize_chunk(target, f32.ctypes.data, buf.ctypes.data, 0, n_rows, n_cols,
                                                 None if imatrix is None else imatrix.ctypes.data)
                    if done != buf.nbytes or not g.ggml_validate_row_data(target, buf.ctypes.data, done):
                        raise QuantkitError(f"llama.cpp's {gguf.GGMLQuantizationType(target).name} quantization of "
                                            f"{name} produced invalid data",
                                            "the weights hold NaN or infinite values: check the checkpoint")
                    at = out.offsets[name] + first_row * size
                if out.writer is None:
                    pwrite_all(out.fd, memoryview(buf), at)
                assert out.hash is not None
                out.hash.add(at, buf)  # with a writer, this writes it
                if self.on_rows:
                    self.on_rows(out.quant, n_rows)
        finally:
            self._slots.release()

    def _imatrix(self, out: _Output, name: str, n_cols: int, expert: int | None) -> np.ndarray | None:
        """The importance values of one tensor (of one expert), as llama.cpp picks them; None when it has none."""
        values = (out.opts.imatrix or {}).get(name)
        if values is None:
            return None
        shape = self._specs[name].shape
        if values.size != n_cols * (shape[0] if len(shape) == 3 else 1):  # llama.cpp: one row per expert (ne[2])
            if name == "token_embd.weight":
                return None  # llama.cpp ignores a mismatched embedding entry
            raise QuantkitError(f"the importance matrix has {values.size} values for {name} (rows of {n_cols})",
                                "recompute the importance matrix for this model")
        arr = np.ascontiguousarray(values, dtype=np.float32)
        return arr if expert is None else arr[expert * n_cols : (expert + 1) * n_cols]


def _extents(head: bytes, tensors: list[TensorSpec], offsets: list[int]) -> list[tuple[int, int]]:
    """The byte ranges of a file's header and tensors (what is not in them is padding)."""
    return [(0, len(head)), *((len(head) + o, len(head) + o + t.nbytes) for t, o in zip(tensors, offsets,
                                                                                         strict=True))]


_scratch = threading.local()


def _to_f32(rows: np.ndarray, qtype: int) -> np.ndarray:
    """`rows` widened to float32, in this thread's reused buffer (a fresh 16 MB array per slab cost page faults
    and zeroing: ~0.5 s of system time per GB of weights here)."""
    if qtype == _T.F32:
        return np.ascontiguousarray(rows, dtype=np.float32)
    buf = getattr(_scratch, "f32", None)
    if buf is None or buf.size < rows.size:
        buf = _scratch.f32 = np.empty(max(rows.size, SLAB_BYTES // 4), np.float32)
    out = buf[: rows.size].reshape(rows.shape)
    fn = ggml().ggml_bf16_to_fp32_row if qtype == _T.BF16 else ggml().ggml_fp16_to_fp32_row
    fn(rows.ctypes.data, out.ctypes.data, rows.size)
    return out

