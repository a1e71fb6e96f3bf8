"""HF safetensors → GGUF, written with `gguf`'s writer, one tensor at a time.

Matches what llama.cpp's ``convert_hf_to_gguf.py`` writes for every architecture in the registry
(`quantkit.arch`): the same tensor names, types, shapes and bytes, and the same metadata keys. The common keys come
from the hyper-parameters as transformers completes them (what llama.cpp's converter reads), the rest from the
architecture class. Tensors are streamed: the header is written from the safetensors headers alone, then each
tensor is read, transformed (Q/K rows permuted, norms shifted, embeddings trimmed, as the architecture says) and
written before the next is read, so peak memory is about one tensor whatever the model size.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from quantkit import __version__, console
from quantkit.backends.gguf.convert.kvpack import fast_arrays
from quantkit.backends.gguf.convert.metadata import rope_parameters, write_common_metadata  # noqa: F401
from quantkit.backends.gguf.quantize.fused import STORAGE, TensorSpec
from quantkit.backends.gguf.tokenizer.files import vocab_token_count
from quantkit.backends.gguf.tokenizer.writer import add_vocab
from quantkit.errors import QuantkitError
from quantkit.safetensors_io import TensorSource, to_f32
from quantkit.source import Checkpoint
from quantkit.workspace import check_disk, staging_dir

if TYPE_CHECKING:
    from quantkit.backends.gguf.quantize.fused import FusedQuantizer

OUTTYPES = {
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
}
_SCORE_FUNCS = {"sigmoid": "SIGMOID", "softmax": "SOFTMAX"}


# Tensors llama.cpp's converter always keeps in F32 (besides 1-D tensors and norms), as llama-quantize expects.
_F32_TENSORS = {gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP, gguf.MODEL_TENSOR.POS_EMBD,
                gguf.MODEL_TENSOR.TOKEN_TYPES}


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    load: Callable[[], np.ndarray]  # returns the data already in the output storage type
    # a stacked tensor (experts) is written in slices, one source tensor at a time: peak memory is one slice
    chunks: Callable[[], Iterator[np.ndarray]] | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data in its storage type (BF16, F16 or F32)."""
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(STORAGE[self.qtype]).itemsize


def llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """The ``rope_freqs`` tensor llama.cpp uses for Llama-3.1's rope scaling.

    Computed in torch float32 like llama.cpp's converter, so the values are bit-identical to its output.
    """
    import torch

    base = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out: list[Any] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


class Converter:
    """Plans and writes the GGUF for one checkpoint."""

    def __init__(self, ckpt: Checkpoint, outtype: str = "bf16", *, pre_tokenizer: str | None = None) -> None:
        if outtype not in OUTTYPES:
            raise QuantkitError(f"unknown --outtype {outtype}", f"choose one of {', '.join(OUTTYPES)}")
        self.ckpt = ckpt
        self.arch = ckpt.arch
        self.arch.check_gguf()
        self.hp = self.arch.hparams
        self.gguf_arch = self.arch.gguf_model_arch()
        self.ftype, self.qtype = OUTTYPES[outtype]
        self.pre_tokenizer = pre_tokenizer
        self.rope = rope_parameters(self.hp)
        self.tmap = gguf.get_tensor_name_map(self.gguf_arch, self.arch.n_layer)
        self.src: TensorSource = ckpt.tensors
        self._planned: list[PlannedTensor] | None = None

    # -- metadata ----------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(self.ckpt.name)
        w.add_size_label(gguf.size_label(self.ckpt.n_params, 0, 0, 0))
        if self.ckpt.license:
            w.add_license(self.ckpt.license)
        w.add_languages(["ru"])
        if self.ckpt.hub_id:
            w.add_source_repo_url(f"https://huggingface.co/{self.ckpt.hub_id}")
        w.add_quantized_by(f"quantkit {__version__}")
        write_common_metadata(w, self.hp, self.ftype)
        self.arch.write_metadata(w)
        self.vocab_info = add_vocab(w, self.ckpt.path, self.arch, pre=self.pre_tokenizer)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # -- tensors -----------------------------------------------------------------------------------------
    def plan(self) -> list[PlannedTensor]:
        """Every tensor of the output, in order (planned once per converter)."""
        if self._planned is None:
            self._planned = self._plan()
        return list(self._planned)

    def _plan(self) -> list[PlannedTensor]:
        out: list[PlannedTensor] = []
        rope = self.rope.get("full_attention", self.rope)
        if self.arch.rope_freqs_tensor and str(rope.get("rope_type", "")).lower() == "llama3":
            factors = llama3_rope_factors(rope, self.arch.head_dim)
            out.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                                     factors.shape, gguf.GGMLQuantizationType.F32, lambda f=factors: f))
        names = self.ckpt.canonical_names
        tied = self.arch.tied_embeddings and "model.embed_tokens.weight" in names
        groups: dict[str, list[str]] = {}
        for name, hf_name in names.items():
            if name == "lm_head.weight" and tied:
                continue
            if (key := self.arch.merge_key(name)) is not None:
                group, stacked, _, size = key
                members = groups.setdefault(group, [])
                members.append(stacked)
                if len(members) == size:  # like llama.cpp: a layer's stacks follow its last expert tensor
                    out += [self._planned_stack(st) for st in sorted(set(members))]
                    del groups[group]
                continue
            shape = self.src.tensors[hf_name].shape
            if (parts := self.arch.split_shapes(name, shape)) is not None:
                for i, (part, part_shape) in enumerate(parts):
                    new, qtype = self._target(part, part_shape, hf_name)
                    out.append(PlannedTensor(new, part_shape, qtype, self._split_loader(name, hf_name, i, qtype)))
                continue
            new, qtype = self._target(name, shape, hf_name)
            if new == "token_embd.weight" and (rows := self.arch.embedding_rows(self._vocab_tokens())) is not None:
                shape = (min(rows, shape[0]), *shape[1:])
            out.append(PlannedTensor(new, shape, qtype, self._loader(name, hf_name, shape, qtype)))
        if groups:
            missing = ", ".join(sorted(groups))
            raise QuantkitError(f"incomplete expert tensors in {missing}",
                                "the checkpoint is missing some experts' weights: download it again")
        return out

    def _target(self, name: str, shape: tuple[int, ...], hf_name: str) -> tuple[str, gguf.GGMLQuantizationType]:
        """The GGUF name and storage type of a (canonical) tensor, by llama.cpp's converter's rules."""
        found = self.tmap.get_type_and_name(self.arch.gguf_key(name), try_suffixes=(".weight", ".bias"))
        if found is None:
            raise QuantkitError(f"cannot map tensor {hf_name} to a GGUF name",
                                f"the checkpoint has tensors that {self.arch.hf_name} does not use")
        kind, new = found
        if len(shape) <= 1 or new.endswith("_norm.weight") or kind in _F32_TENSORS or not new.endswith(".weight"):
            return new, gguf.GGMLQuantizationType.F32
        return new, self.qtype

    def _planned_stack(self, stacked: str) -> PlannedTensor:
        sources = self.arch.expert_sources(stacked)
        hf = [self.ckpt.canonical_names[s] for s in sources]
        first = self.src.tensors[hf[0]]
        shape = (len(hf), *first.shape)
        new, qtype = self._target(stacked, shape, hf[0])

        def chunks() -> Iterator[np.ndarray]:
            for name, hf_name in zip(sources, hf, strict=True):
                yield self._convert(name, self.src.tensors[hf_name].dtype, self.src.read(hf_name), qtype)

        return PlannedTensor(new, shape, qtype, lambda: np.concatenate([c.reshape(-1) for c in chunks()]), chunks)

    def _split_loader(self, name: str, hf_name: str, part: int,
                      qtype: gguf.GGMLQuantizationType) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            dtype = self.src.tensors[hf_name].dtype
            return self._convert(name, dtype, self.arch.split(name, self.src.read(hf_name))[part], qtype)

        return load

    def _convert(self, name: str, dtype: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        """Source data (raw storage) → the output storage type, through the architecture's transform."""
        as_f32 = self.arch.needs_f32(name)
        if as_f32:
            data = to_f32(data, dtype)
        data = self.arch.transform(name, data, as_f32)
        if not as_f32 and qtype == gguf.GGMLQuantizationType.BF16 and dtype == "BF16":
            return np.ascontiguousarray(data)  # bit-exact copy, no float round trip
        f32 = data if as_f32 else to_f32(data, dtype)
        if qtype == gguf.GGMLQuantizationType.F32:
            return np.ascontiguousarray(f32, dtype=np.float32)
        return gguf.quants.quantize(np.ascontiguousarray(f32, dtype=np.float32), qtype)

    def _vocab_tokens(self) -> int:
        return vocab_token_count(self.ckpt.path, self.arch)

    def _loader(self, name: str, hf_name: str, shape: tuple[int, ...],
                qtype: gguf.GGMLQuantizationType) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            info = self.src.tensors[hf_name]
            data = self.src.view(hf_name)
            if shape != info.shape:
                data = data[: shape[0]]
            return self._convert(name, info.dtype, data, qtype)

        return load

    def tensor_bytes(self) -> int:
        """The size the converted GGUF's tensor data will have."""
        return sum(t.nbytes for t in self.plan())

    def write(self, out: Path, *, split_max_size: int = 0, on_tensor: Callable[[str, int], None] | None = None,
              sink: FusedQuantizer | None = None) -> list[Path]:
        """Write the GGUF (split into parts when `split_max_size` > 0); returns the files, first part first.

        Everything is written into a hidden ``.partial`` folder beside `out` and moved into place when complete.
        A `sink` (`..quantize.fused`) gets the metadata and every tensor's data as it is written, and
        must have finished before the file is moved into place.
        """
        if sink is not None and split_max_size:
            raise ValueError("a split conversion cannot feed a fused quantizer")
        planned = self.plan()
        if self.arch.skip_note and len(self.ckpt.canonical_names) < len(self.src.tensors):
            console.info(f"{self.ckpt.name}: {self.arch.skip_note}")
        check_disk(out.parent, int(self.tensor_bytes() * 1.02) + (64 << 20), out.name)
        with staging_dir(out) as stage:
            writer = gguf.GGUFWriter(stage.work / out.name, gguf.MODEL_ARCH_NAMES[self.gguf_arch],
                                     split_max_size=split_max_size)
            fast_arrays(writer)
            self.write_metadata(writer)
            for t in planned:
                writer.add_tensor_info(t.name, t.shape, np.dtype(STORAGE[t.qtype]), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file(stage.work / out.name)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.flush()
            taken = False  # the sink writes the data (around the page cache)
            ahead: deque[PlannedTensor] = deque()  # to quantize, in the quantized files' order (`quantize_order`)
            if sink is not None:
                sink.start(writer._pack_val, list(writer.kv_data[0].items()),
                           [TensorSpec(t.name, tuple(t.shape), int(t.qtype), t.nbytes) for t in planned],
                           writer.data_alignment, base=stage.work / out.name)
                taken = sink.writes_base
                ahead = deque(sink.quantize_order(planned))
            hashed = sink if sink is not None and sink.base_hash is not None else None  # hashes (writes) the file
            lead = done = 0  # bytes handed on to quantize, and to the converted file: the first kept just ahead
            for t in planned:
                done += t.nbytes
                while ahead and lead < done:
                    lead += _quantize(sink, ahead.popleft())
                if t.chunks is not None:
                    feed = None if hashed is None else _expert_feed(hashed, t, quantize=False)
                    nbytes = _write_chunks(writer, t.chunks(), t.nbytes, feed, to_file=not taken)
                else:
                    data = t.load()
                    if not taken:
                        writer.write_tensor_data(data)
                    if hashed is not None:
                        hashed.tensor(t.name, int(t.qtype), data, quantize=False)
                    nbytes = data.nbytes
                    del data
                if on_tensor:
                    on_tensor(t.name, nbytes)
            if sink is not None:
                sink.finish()
            writer.close()
        return stage.files


def _expert_feed(sink: FusedQuantizer, t: PlannedTensor, *, quantize: bool) -> Callable[[int, np.ndarray], None]:
    """Hands each expert's slice of a stacked tensor to the fused quantizer, at its rows in the stack: to quantize,
    or for the converted file."""
    rows = int(np.prod(t.shape[1:-1], dtype=np.int64))

    def feed(i: int, chunk: np.ndarray) -> None:
        sink.tensor(t.name, int(t.qtype), chunk, i * rows, quantize=quantize, base=not quantize)

    return feed


def _quantize(sink: FusedQuantizer | None, t: PlannedTensor) -> int:
    """Give one tensor to the fused quantizer to quantize (not for the converted file); returns its bytes."""
    assert sink is not None
    if t.chunks is None:
        sink.tensor(t.name, int(t.qtype), t.load(), base=False)
    else:
        feed = _expert_feed(sink, t, quantize=True)
        for i, chunk in enumerate(t.chunks()):
            feed(i, chunk)
    return t.nbytes


def _write_chunks(writer: gguf.GGUFWriter, chunks: Iterator[np.ndarray], nbytes: int,
                  feed: Callable[[int, np.ndarray], None] | None = None, *, to_file: bool = True) -> int:
    """`GGUFWriter.write_tensor_data` for a tensor given in consecutive slices (gguf 0.19's writer, one slice in
    memory at a time): the same padding before and after, the same bookkeeping of which file and tensor is next.
    Without `to_file` the slices only go to `feed` (which writes them)."""
    if to_file:
        assert writer.fout is not None
        file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
        fout = writer.fout[file_id]
        info = writer.tensors[file_id].pop(next(iter(writer.tensors[file_id])))
        assert info.nbytes == nbytes
        writer.write_padding(fout, fout.tell())
    else:
        assert feed is not None
    written = 0
    for i, chunk in enumerate(chunks):
        if to_file:
            chunk.tofile(fout)
        written += chunk.nbytes
        if feed is not None:
            feed(i, chunk)
    if written != nbytes:
        raise QuantkitError(f"a stacked tensor came out {written} bytes instead of {nbytes}",
                            "the checkpoint's experts differ in shape; report it with the model id")
    if to_file:
        writer.write_padding(fout, nbytes)
        writer.state = gguf.gguf_writer.WriterState.WEIGHTS
    return written


def gguf_tensor_bytes(ckpt: Checkpoint, outtype: str = "bf16") -> int:
    """The size the converted GGUF's tensor data will have."""
    return Converter(ckpt, outtype).tensor_bytes()
