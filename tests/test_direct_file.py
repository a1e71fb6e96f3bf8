"""Outputs written around the page cache (GGUF's `direct_file`), through the ordered hash and the one-pass quantizer.

What must hold: the bytes are the same as a plain write's (llama.cpp's, for the GGUF files), pieces may come in any
order from any thread, a hash that gives up still leaves a whole file, and the pages of a file written this way are
not left in the page cache (which is the point of it: filling the cache costs kernel time and evicts the user's).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.convert.converter import Converter
from quantkit.backends.gguf.ggufinfo import read_info
from quantkit.backends.gguf.quantize.core import QuantizeOptions, quantize
from quantkit.backends.gguf.quantize.direct_file import ALIGN, BLOCK, DirectFile
from quantkit.backends.gguf.quantize.fused import FusedQuantizer
from quantkit.backends.gguf.quantize.ordered_hash import OrderedHash
from quantkit.demo import build_checkpoint
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_fraction(path: Path) -> float:
    """The share of `path`'s pages in the page cache (mincore on a mapping that touches none of them)."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        assert addr not in (None, ctypes.c_void_p(-1).value)
        page = os.sysconf("SC_PAGE_SIZE")
        vec = (ctypes.c_ubyte * (-(-size // page)))()
        assert _libc.mincore(addr, size, vec) == 0
        _libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / len(vec)


def page_cache_kept(path: Path) -> bool:
    """Whether a file under `path` can be out of the page cache at all (tmpfs and ramfs live in it)."""
    best, kind = "", ""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        point = left.split()[4]
        if str(path.resolve()).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, right.split()[0]
    return kind not in ("tmpfs", "ramfs")


def readahead_bytes(path: Path) -> int:
    """The block device's readahead under `path` (what reading a file's header may pull in after it)."""
    dev = os.stat(path).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for f in (sysfs / "queue" / "read_ahead_kb", sysfs / ".." / "queue" / "read_ahead_kb"):
        if f.exists():
            return int(f.read_text()) << 10
    return 128 << 10


@pytest.fixture(scope="module")
def wide_qwen2(ckpt_root: Path) -> Path:
    """A Qwen2 fixture with 8192-wide MLPs (55 MB): tensors larger than a readahead window and than one slab."""
    path = ckpt_root / "wide-qwen2"
    if not (path / "config.json").exists():
        build_checkpoint(path, "qwen2", instruct=True, vocab_size=2048, hidden=512, layers=2, heads=4, kv_heads=2,
                         ffn=8192)
    return path


def _pieces(size: int, seed: int) -> tuple[bytes, list[tuple[int, int]], list[tuple[int, bytes]]]:
    """A file of `size` bytes as tensors with zero padding between them, cut into pieces, shuffled."""
    rng = random.Random(seed)
    data = bytearray(size)
    extents: list[tuple[int, int]] = []
    pieces: list[tuple[int, bytes]] = []
    at = 0
    while at < size - 100:
        at += rng.randrange(0, 32)
        end = min(size, at + rng.randrange(1, 3 * BLOCK // 2))
        chunk = np.random.default_rng(rng.randrange(1 << 30)).integers(0, 256, end - at, np.uint8).tobytes()
        data[at:end] = chunk
        extents.append((at, end))
        for a in range(at, end, 700_001):  # pieces that straddle blocks
            pieces.append((a, chunk[a - at : min(end, a + 700_001) - at]))
        at = end
    rng.shuffle(pieces)
    return bytes(data), extents, pieces


def _feed(h: OrderedHash, pieces: list[tuple[int, bytes]]) -> None:
    threads = [threading.Thread(target=lambda part=pieces[i::4]: [h.add(a, p) for a, p in part]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.parametrize("direct", [True, False])
def test_ordered_pieces_make_the_file(tmp_path: Path, direct: bool) -> None:
    """Shuffled pieces from 4 threads: the file and the digest are the data's; the size need not be a whole block."""
    size = 3 * BLOCK + 12_345
    data, extents, pieces = _pieces(size, 1)
    writer = DirectFile(tmp_path / "f.bin", direct=direct)
    h = OrderedHash(extents, size, writer=writer)
    _feed(h, pieces)
    writer.close(size)
    assert (tmp_path / "f.bin").read_bytes() == data
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_hash_that_gives_up_still_writes_everything(tmp_path: Path) -> None:
    """Past its memory limit the hash stops; what it held and what comes after are written where they go."""
    size = 2 * BLOCK + 999
    data, extents, pieces = _pieces(size, 2)
    pieces.sort(key=lambda p: -p[0])  # everything early arrives last
    writer = DirectFile(tmp_path / "f.bin")
    h = OrderedHash(extents, size, limit=BLOCK, writer=writer)
    _feed(h, pieces)
    writer.close(size)
    assert h.failed and h.hexdigest() is None
    assert (tmp_path / "f.bin").read_bytes() == data


def test_writer_error_reaches_the_caller(tmp_path: Path) -> None:
    """A failed write in the writer's thread (here: a closed descriptor) is raised by the next call, not lost."""
    writer = DirectFile(tmp_path / "f.bin", direct=False)
    os.close(writer._fd)  # the writer thread's next write fails with EBADF
    writer._fd = os.open(os.devnull, os.O_RDONLY)
    writer.append(bytes(BLOCK))
    with pytest.raises(OSError):
        writer.close(BLOCK)
    assert writer._fd == -1  # descriptors closed either way


def cache_measurable(folder: Path) -> bool:
    """Whether files under `folder` can be written around the page cache and be seen to be: the file system takes
    O_DIRECT and is not itself in memory. Elsewhere the same writes go through the cache (the buffered fallback),
    and the tests below check everything but where the pages are."""
    if not page_cache_kept(folder):
        return False
    w = DirectFile(folder / "probe.bin")
    w.append(bytes(ALIGN))
    w.close(ALIGN)
    ok = w.direct
    (folder / "probe.bin").unlink()
    return ok


def test_one_pass_around_the_page_cache(qwen2_ckpt: Path, gigachat3_ckpt: Path, tmp_path: Path) -> None:
    """The one pass with `direct`: the files are llama.cpp's, byte for byte (a dense model and a mixture of
    experts), the streamed hashes the files', and almost none of their pages are left in the page cache (where the
    file system can show it: `cache_measurable`)."""
    measurable = cache_measurable(tmp_path)
    for ckpt in (qwen2_ckpt, gigachat3_ckpt):
        ck = load_local(ckpt, name=ckpt.name, source=str(ckpt))
        out = tmp_path / ckpt.name
        out.mkdir()
        opts = [QuantizeOptions(q, threads=2) for q in ("Q8_0", "Q4_K_M")]
        with FusedQuantizer([(o.file_type, out / f"{o.file_type}.gguf", o) for o in opts], threads=2,
                            direct=True) as fq:
            base = Converter(ck, "bf16").write(out / "base.gguf", sink=fq)[0]
        assert fq.writes_base
        files = [base, *(fq.files(o.file_type)[0] for o in opts)]
        if measurable:
            assert max(cached_fraction(f) for f in files) < 0.3, [cached_fraction(f) for f in files]
        for o in opts:
            ref = quantize(base, tmp_path / f"ref-{ckpt.name}-{o.file_type}.gguf", o)[0]
            mine = fq.files(o.file_type)[0]
            assert mine.read_bytes() == ref.read_bytes(), f"{o.file_type} differs from llama_model_quantize's file"
            h = next(x for x in fq.outputs if x.quant == o.file_type).hash
            assert h is not None and h.hexdigest() == hashlib.sha256(mine.read_bytes()).hexdigest()
        assert fq.base_hash is not None and fq.base_hash.hexdigest() == hashlib.sha256(base.read_bytes()).hexdigest()


def test_the_backend_goes_around_the_cache_only_when_nothing_reads_back(wide_qwen2: Path, tmp_path: Path) -> None:
    """`--no-verify` without evaluation writes around the page cache, with the bytes of a verified run (whose files
    go through the cache: verification loads every one of them in llama.cpp). Reading a file's tensor table (the
    workspace's check) may pull in one readahead window after the header; the model is wide enough that the
    tensor data is well beyond that. Where the file system cannot show the cache (`cache_measurable`), the bytes
    and hashes are still checked."""
    measurable = cache_measurable(tmp_path)
    ck = load_local(wide_qwen2, name=wide_qwen2.name, source=str(wide_qwen2))
    shas = []
    for verify in (False, True):
        ws = Workspace(tmp_path / f"ws-{verify}")
        arts = make(JobContext.of(ck, ws), "gguf",
                                 GGUFOptions(types=["Q8_0"], imatrix=False, verify=verify))
        if measurable and not verify:
            for a in arts:
                size = a.path.stat().st_size
                allowed = read_info(a.path).data_start + 2 * readahead_bytes(a.path) + (1 << 20)
                assert size > 1.5 * allowed, "the test model is too small to tell"
                assert cached_fraction(a.path) * size < allowed, a.path.name
        shas.append({a.quant: hashlib.sha256(a.path.read_bytes()).hexdigest() for a in arts})
        assert all(ws.steps[s]["checks"][ws.rel(a.path)]["sha256"] == shas[-1][a.quant]
                   for a in arts for s in ws.steps if ws.rel(a.path) in (ws.steps[s].get("checks") or {}))
    assert shas[0] == shas[1]


def test_pieces_arrive_in_file_order(wide_qwen2: Path, tmp_path: Path) -> None:
    """The quantized files hold a block's tensors in llama.cpp's order (attention before MLP), the converter reads
    them in the checkpoint's (MLP first); the one pass quantizes each block in the files' order, so with one worker
    no file's writer holds more than the piece at hand (before: a block's three MLP matrices, 13 MB per Q8_0 file
    here, ~420 MB on a 32B model)."""
    ck = load_local(wide_qwen2, name=wide_qwen2.name, source=str(wide_qwen2))
    out = tmp_path / "f"
    out.mkdir()
    opts = [QuantizeOptions(q, threads=1) for q in ("Q8_0", "Q4_K_M")]
    with FusedQuantizer([(o.file_type, out / f"{o.file_type}.gguf", o) for o in opts], threads=1) as fq:
        base = Converter(ck, "bf16").write(out / "base.gguf", sink=fq)[0]
    names = [t.name for t in read_info(base).tensors]
    assert names.index("blk.0.ffn_down.weight") < names.index("blk.0.attn_q.weight")  # the orders do differ
    for o in opts:
        h = next(x for x in fq.outputs if x.quant == o.file_type).hash
        largest = max(t.n_bytes for t in read_info(fq.files(o.file_type)[0]).tensors)
        assert h is not None and h.hexdigest() is not None
        assert h.peak <= largest + (64 << 10), (o.file_type, h.peak, largest)
        ref = quantize(base, tmp_path / f"ref-{o.file_type}.gguf", o)[0]
        assert fq.files(o.file_type)[0].read_bytes() == ref.read_bytes()
    assert fq.base_hash is not None and fq.base_hash.peak <= max(t.n_bytes for t in read_info(base).tensors) + (
        64 << 10)
