"""Convert and quantize in one pass (`quantkit.backends.gguf.quantize.fused`): the files are llama.cpp's, byte for byte.

Each quantized file written during the conversion is compared with what ``llama_model_quantize`` writes from the
converted file (the code ``llama-quantize`` runs), for every registered architecture, with and without an importance
matrix, with per-tensor overrides; and the sha256 the writers took on the way with the file's.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from quantkit.backends.base import JobContext
from quantkit.backends.gguf.backend import GGUFOptions
from quantkit.backends.gguf.convert.converter import Converter
from quantkit.backends.gguf.ggufinfo import read_info
from quantkit.backends.gguf.quantize.core import QuantizeOptions, parse_ggml_type, parse_tensor_types, quantize
from quantkit.backends.gguf.quantize.fused import FusedQuantizer
from quantkit.backends.gguf.quantize.ordered_hash import OrderedHash
from quantkit.errors import QuantkitError
from quantkit.pipeline import make
from quantkit.source import load_local
from quantkit.workspace import Workspace

FIXTURES = ["llama3_ckpt", "llama31_ckpt", "qwen2_ckpt", "qwen3_ckpt", "mistral_ckpt", "nemo_ckpt", "gemma3_ckpt",
            "gemma3mm_ckpt", "yandexgpt_ckpt", "gigachat3_ckpt", "gigachat3_noq_ckpt"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fused(ckpt_path: Path, out: Path, opts: list[QuantizeOptions], threads: int = 2,
           outtype: str = "bf16") -> tuple[Path, FusedQuantizer]:
    ck = load_local(ckpt_path, name=ckpt_path.name, source=str(ckpt_path))
    out.mkdir(parents=True, exist_ok=True)
    with FusedQuantizer([(o.file_type, out / f"{o.file_type}.gguf", o) for o in opts], threads=threads) as fq:
        base = Converter(ck, outtype).write(out / "base.gguf", sink=fq)[0]
    return base, fq


def _assert_llama_bytes(base: Path, fq: FusedQuantizer, opts: list[QuantizeOptions], ref_dir: Path) -> None:
    for o in opts:
        ref = quantize(base, ref_dir / f"{o.file_type}.gguf", o)[0]
        mine = fq.files(o.file_type)[0]
        assert mine.read_bytes() == ref.read_bytes(), f"{o.file_type} differs from llama_model_quantize's file"
        out = next(x for x in fq.outputs if x.quant == o.file_type)
        assert out.hash is not None and out.hash.hexdigest() == _sha(mine)
    assert fq.base_hash is not None and fq.base_hash.hexdigest() == _sha(base)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_every_architecture_byte_identical(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Plain, K- and legacy types and F16 in one pass; 1 thread, so chunking cannot hide a row-order bug."""
    opts = [QuantizeOptions(q, threads=1) for q in ("Q8_0", "Q4_K_M", "Q3_K_S", "Q5_0", "F16")]
    base, fq = _fused(request.getfixturevalue(fixture), tmp_path / "f", opts, threads=1)
    _assert_llama_bytes(base, fq, opts, tmp_path / "ref")


@pytest.mark.parametrize("outtype", ["f16", "f32"])
def test_other_unquantized_types(outtype: str, gigachat3_ckpt: Path, tmp_path: Path) -> None:
    """From an F16 or F32 conversion (widened by ggml's own row functions), BF16 among the targets."""
    opts = [QuantizeOptions(q, threads=2) for q in ("Q8_0", "Q4_K_M", "BF16")]
    base, fq = _fused(gigachat3_ckpt, tmp_path / "f", opts, outtype=outtype)
    _assert_llama_bytes(base, fq, opts, tmp_path / "ref")


def _imatrix(base: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Positive importance values for every matrix (per expert for stacked ones), like a real matrix's."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in read_info(base).tensors:
        if len(t.shape) >= 2 and t.name.endswith(".weight") and "norm" not in t.name:
            n = int(t.shape[0]) * (int(t.shape[2]) if len(t.shape) == 3 else 1)
            out[t.name] = rng.gamma(2.0, 1.0, n).astype(np.float32)
    return out


@pytest.mark.parametrize("fixture", ["qwen2_ckpt", "gigachat3_ckpt"])
def test_importance_matrix_and_overrides(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Types that need a matrix, per-expert slices of it (GigaChat 3's stacked experts), per-tensor overrides."""
    path = request.getfixturevalue(fixture)
    base = Converter(load_local(path, name=path.name, source=str(path))).write(tmp_path / "probe.gguf")[0]
    imatrix = _imatrix(base)
    opts = [QuantizeOptions("IQ2_XS", imatrix=imatrix, threads=2),
            QuantizeOptions("Q4_K_M", imatrix=imatrix, threads=2),
            QuantizeOptions("Q4_K_S", imatrix=imatrix, tensor_types=parse_tensor_types(["attn_.*=q8_0"]),
                            output_type=parse_ggml_type("q6_k"), embedding_type=parse_ggml_type("q4_0"), threads=2)]
    base, fq = _fused(path, tmp_path / "f", opts)
    _assert_llama_bytes(base, fq, opts, tmp_path / "ref")
    # the matrix changed the bytes: it was used, for every expert slice too
    plain = QuantizeOptions("Q4_K_M", threads=2)
    assert quantize(base, tmp_path / "plain.gguf", plain)[0].read_bytes() != fq.files("Q4_K_M")[0].read_bytes()


def test_pipeline_records_streamed_hashes_and_falls_back(qwen2_ckpt: Path, tmp_path: Path) -> None:
    """`quantkit gguf` quantizes during conversion; the manifest's sha256 are the files'; a quantized file deleted
    later is redone from the converted file by llama.cpp, with the same bytes."""
    ck = load_local(qwen2_ckpt, name=qwen2_ckpt.name, source=str(qwen2_ckpt))
    ws = Workspace(tmp_path / "ws")
    ctx = JobContext.of(ck, ws)
    opts = GGUFOptions(types=["Q8_0", "Q4_K_M"], imatrix=False, verify=False)
    arts = make(ctx, "gguf", opts)
    files = {a.quant: a.path for a in arts}
    for quant, path in files.items():
        step = "gguf/convert/BF16" if quant == "BF16" else f"gguf/quantize/{quant}"
        assert ws.steps[step]["checks"][ws.rel(path)]["sha256"] == _sha(path)
    q4 = files["Q4_K_M"].read_bytes()
    files["Q4_K_M"].unlink()
    again = {a.quant: a.path for a in make(JobContext.of(ck, Workspace(ws.root)), "gguf",
                                                          opts)}
    assert again["Q4_K_M"].read_bytes() == q4
    assert not [p for p in (ws.root / "gguf").iterdir() if p.name.startswith(".")]


def test_bad_weights_leave_nothing(qwen2_ckpt: Path, tmp_path: Path) -> None:
    """An infinite weight fails llama.cpp's row check inside a worker: one clear error, no file of either kind."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in qwen2_ckpt.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    raw = bytearray((qwen2_ckpt / "model.safetensors").read_bytes())
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + n])
    key = next(k for k in header if "layers.1.mlp.down_proj" in k)
    assert header[key]["dtype"] == "BF16"
    struct.pack_into("<H", raw, 8 + n + header[key]["data_offsets"][0] + 2 * 7, 0x7F80)  # bf16 +inf
    (bad / "model.safetensors").write_bytes(raw)
    out = tmp_path / "out"
    with pytest.raises(QuantkitError, match="blk.1.ffn_down.weight produced invalid data"):
        _fused(bad, out, [QuantizeOptions("Q8_0", threads=2)])
    assert not list(out.iterdir())


def test_ordered_hash_any_order_any_thread() -> None:
    rng = random.Random(3)
    size, extents, pieces, at = 50_000, [], [], 0
    data = bytearray(size)
    while at < size - 100:
        at += rng.randrange(0, 40)  # a gap of padding (zeros)
        end = min(size, at + rng.randrange(1, 3000))
        chunk = bytes(rng.randrange(256) for _ in range(end - at))
        data[at:end] = chunk
        extents.append((at, end))
        cut = rng.randrange(at, end + 1)  # a piece may arrive in parts
        pieces += [(at, chunk[: cut - at]), (cut, chunk[cut - at :])] if at < cut < end else [(at, chunk)]
        at = end
    rng.shuffle(pieces)
    h = OrderedHash(extents, size)
    threads = [threading.Thread(target=lambda part=pieces[i::4]: [h.add(a, p) for a, p in part]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert h.hexdigest() == hashlib.sha256(bytes(data)).hexdigest()

    missing = OrderedHash(extents, size)
    for a, p in pieces[1:]:
        missing.add(a, p)
    assert missing.hexdigest() is None  # a piece never came: no digest rather than a wrong one

    held = OrderedHash(extents, size, limit=1000)
    for a, p in sorted(pieces, reverse=True):  # everything early arrives last: more than the limit is held
        held.add(a, p)
    assert held.failed and held.hexdigest() is None
