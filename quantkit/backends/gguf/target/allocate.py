"""Size-targeted GGUF: one type per tensor, chosen by measured damage on Russian text, under a byte budget.

1. **Measure.** The BF16 GGUF is quantized once per candidate type with every tensor forced to it (llama.cpp
   quantizes each tensor independently, so any mix can be assembled from these pieces, and each piece's real size —
   fallbacks for row widths included — is known). For every tensor and candidate, the damage is the
   importance-weighted squared error of the dequantized weights: Σ_rows Σ_cols imp_col · (w − q)², where imp is the
   Russian importance matrix (mean squared input of each column, per expert for stacked experts), i.e. the expected
   squared error of the layer's output per token. Tensors without imatrix data (token embeddings, the output head)
   weigh every column 1.
   The weight-space damage does not say how much each kind of tensor moves the model's output (an error in the
   output head reaches the logits directly; one in a middle layer is damped or amplified on its way), so each group
   of tensors (``attn_q``, ``ffn_down``, ``output``, …) gets a factor measured end to end: llama.cpp's KL-divergence
   from the BF16 file on calibration text when only that group is at the lowest candidate type (the rest Q8_0),
   per unit of damage. Damage × factor is in KLD units, comparable across groups.
2. **Allocate.** Every tensor starts at its cheapest candidate; upgrades along each tensor's lower convex hull of
   (bytes, damage) are taken in order of damage removed per byte added while they fit the budget (a greedy
   multiple-choice knapsack), then a last pass takes any single upgrade that still fits.
3. **Write.** One llama.cpp quantization with one ``tensor-type`` override per tensor. The mix is also written as a
   ``--tensor-type-file`` that llama-quantize reads.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from quantkit.backends.gguf.ggufinfo import TensorEntry, read_info, tensor_bytes
from quantkit.errors import QuantkitError

Q = gguf.GGMLQuantizationType
CANDIDATES = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
_ALIGN_SLACK = 32  # GGUF pads each tensor's data to 32 bytes
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``4.5G`` / ``4500M`` / ``4.5GiB`` → bytes (G = 10⁹, GiB = 2³⁰, as file sizes are usually quoted)."""
    m = _SIZE.match(str(text))
    if not m:
        raise QuantkitError(f"bad size '{text}'", "write it like 4.5G, 900M or 4.2GiB")
    unit = (m.group(2) or "B").upper()
    power = {"K": 1, "M": 2, "G": 3, "T": 4}.get(unit[0], 0)
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base**power)


@dataclass
class Piece:
    """One tensor as one candidate type: its stored type (after llama.cpp's fallbacks), bytes and damage."""

    qtype: Q
    nbytes: int
    damage: float


@dataclass
class Plan:
    """The chosen type of every tensor, what it costs and what it is expected to cost in damage."""

    choice: dict[str, Piece]
    fixed_bytes: int  # header, metadata and tensors that are never quantized (norms, biases)
    budget: int
    n_weights: int
    groups: dict[str, dict[str, int]] = field(default_factory=dict)  # tensor group → type → tensor count

    @property
    def nbytes(self) -> int:
        return self.fixed_bytes + sum(p.nbytes + _ALIGN_SLACK for p in self.choice.values())

    @property
    def damage(self) -> float:
        return sum(p.damage for p in self.choice.values())

    @property
    def bpw(self) -> float:
        return self.nbytes * 8 / self.n_weights

    def tensor_types(self) -> list[tuple[str, int]]:
        """One exact-name override per tensor, in llama-quantize's ``--tensor-type`` form (regex, type id)."""
        return [(f"^{re.escape(name)}$", int(p.qtype)) for name, p in sorted(self.choice.items())]

    def type_file(self) -> str:
        """The mix as llama-quantize's ``--tensor-type-file``: one ``PATTERN=TYPE`` per line."""
        return "".join(f"^{re.escape(name)}$={p.qtype.name.lower()}\n" for name, p in sorted(self.choice.items()))


def group_of(name: str) -> str:
    """``blk.12.attn_q.weight`` → ``attn_q``; ``token_embd.weight`` → ``token_embd``."""
    parts = name.removesuffix(".weight").split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def _tensors(path: Path) -> dict[str, tuple[Path, TensorEntry]]:
    """The quantizable (2-D or more) tensors of a GGUF, from its tensor table alone (no metadata is decoded)."""
    return {t.name: (path, t) for t in read_info(path).tensors if len(t.shape) >= 2}


def _f32(item: tuple[Path, TensorEntry]) -> np.ndarray:
    """One tensor as float32 rows × columns (GGUF row order), dequantized if needed."""
    path, t = item
    raw, qtype = tensor_bytes(path, t), t.tensor_type
    if qtype == Q.F32:
        arr = raw.view(np.float32)
    elif qtype == Q.F16:
        arr = raw.view(np.float16).astype(np.float32)
    elif qtype == Q.BF16:
        arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        arr = gguf.quants.dequantize(raw, qtype)
    return np.asarray(arr, dtype=np.float32).reshape(-1, int(t.shape[0]))


def _damage(ref: np.ndarray, got: np.ndarray, importance: np.ndarray | None) -> float:
    err = (ref - got) ** 2  # rows × columns (columns = the input dimension)
    if importance is None:
        return float(err.sum())
    imp = importance.reshape(-1, ref.shape[1])  # one row per expert for stacked experts
    per_row = np.repeat(imp, ref.shape[0] // imp.shape[0], axis=0)
    return float((err * per_row).sum())


def measure(bf16: Path, pieces_dir: Path, imatrix: dict[str, np.ndarray] | None,
            quantize_all: Callable[[Q, Path], Path], candidates: tuple[Q, ...] = CANDIDATES,
            on_type: Callable[[Q], None] | None = None) -> dict[str, dict[Q, Piece]]:
    """Quantize the whole model once per candidate (`quantize_all(type, out)`), then damage and bytes of every
    tensor in every candidate; the files are memory-mapped and compared one tensor at a time."""
    ref = _tensors(bf16)
    table: dict[str, dict[Q, Piece]] = {name: {} for name in ref}
    for qtype in candidates:
        if qtype.name.startswith("IQ") and not imatrix:
            continue
        path = quantize_all(qtype, pieces_dir / f"all-{qtype.name}.gguf")
        got = _tensors(path)
        for name, t in ref.items():  # one tensor in memory at a time
            q = got[name][1]
            table[name][qtype] = Piece(q.tensor_type, q.n_bytes, _damage(_f32(t), _f32(got[name]),
                                                                          (imatrix or {}).get(name)))
        del got
        path.unlink()
        if on_type:
            on_type(qtype)
    return table


def _hull(options: list[Piece]) -> list[Piece]:
    """The lower convex hull of (bytes, damage), cheapest first: the upgrades worth taking, in order."""
    pts = sorted({(p.nbytes, p.damage, p.qtype): p for p in options}.values(), key=lambda p: (p.nbytes, p.damage))
    front: list[Piece] = []
    for p in pts:  # keep only those that lower the damage as bytes grow
        if not front or p.damage < front[-1].damage:
            front.append(p)
    hull: list[Piece] = []
    for p in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a→p: not on the lower hull
            if (b.damage - a.damage) * (p.nbytes - a.nbytes) >= (p.damage - a.damage) * (b.nbytes - a.nbytes):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def scaled(table: dict[str, dict[Q, Piece]], factors: dict[str, float]) -> dict[str, dict[Q, Piece]]:
    """The table with every tensor's damage multiplied by its group's end-to-end factor."""
    return {name: {q: Piece(p.qtype, p.nbytes, p.damage * factors.get(group_of(name), 1.0)) for q, p in opts.items()}
            for name, opts in table.items()}


def group_probe(table: dict[str, dict[Q, Piece]], group: str) -> tuple[list[tuple[str, int]], float]:
    """The overrides that put one group at the lowest candidate and the rest at the highest, and the group's damage
    difference between the two (what the probe's KL-divergence is divided by)."""
    overrides, damage = [], 0.0
    for name, opts in sorted(table.items()):
        low, high = min(opts.values(), key=lambda p: p.nbytes), max(opts.values(), key=lambda p: p.nbytes)
        pick = low if group_of(name) == group else high
        overrides.append((f"^{re.escape(name)}$", int(pick.qtype)))
        if group_of(name) == group:
            damage += low.damage - high.damage
    return overrides, damage


def allocate(table: dict[str, dict[Q, Piece]], budget: int, fixed_bytes: int, n_weights: int) -> Plan:
    """The least total damage under `budget` bytes (greedy along each tensor's hull, then a fill pass)."""
    hulls = {name: _hull(list(opts.values())) for name, opts in table.items()}
    at = {name: 0 for name in hulls}
    plan = Plan({name: h[0] for name, h in hulls.items()}, fixed_bytes, budget, n_weights)
    if plan.nbytes > budget:
        raise QuantkitError(f"the target {budget / 1e9:.3f} GB is below the smallest mix quantkit can build "
                            f"({plan.nbytes / 1e9:.3f} GB, {plan.bpw:.2f} bpw)",
                            "raise --target-size / --target-bpw, or use a stock IQ type")
    used = plan.nbytes
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain = (h[i].damage - h[i + 1].damage) / max(1, h[i + 1].nbytes - h[i].nbytes)
            heapq.heappush(heap, (-gain, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = h[i + 1].nbytes - h[i].nbytes
        if used + extra > budget:
            continue  # this tensor's next step does not fit; others may
        at[name] = i + 1
        plan.choice[name] = h[i + 1]
        used += extra
        push(name)
    # fill: any single step to a (non-hull) better option that still fits, best damage saved per byte first
    options = sorted(((p.damage - plan.choice[n].damage) / max(1, p.nbytes - plan.choice[n].nbytes), n, p)
                     for n, opts in table.items() for p in opts.values()
                     if p.damage < plan.choice[n].damage and p.nbytes > plan.choice[n].nbytes)
    for _, name, piece in options:
        extra = piece.nbytes - plan.choice[name].nbytes
        if piece.damage < plan.choice[name].damage and used + extra <= budget:
            plan.choice[name] = piece
            used += extra
    for name, piece in plan.choice.items():
        counts = plan.groups.setdefault(group_of(name), {})
        counts[piece.qtype.name] = counts.get(piece.qtype.name, 0) + 1
    return plan


def mix_damage(path: Path, bf16: Path, imatrix: dict[str, np.ndarray] | None) -> float:
    """The same damage measure for any quantized file (a stock type, to compare with a targeted mix)."""
    ref, got = _tensors(bf16), _tensors(path)
    return sum(_damage(_f32(t), _f32(got[name]), (imatrix or {}).get(name)) for name, t in ref.items())


def fixed_bytes(bf16: Path, quantizable: set[str]) -> int:
    """Bytes of a quantized file that no choice changes: header and metadata, and the 1-D tensors."""
    info = read_info(bf16)
    return info.data_start + sum(t.n_bytes + _ALIGN_SLACK for t in info.tensors if t.name not in quantizable)


def n_weights(bf16: Path) -> int:
    return sum(t.n_elements for t in read_info(bf16).tensors)
