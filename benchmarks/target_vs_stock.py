"""Size-targeted GGUF against llama.cpp's stock mixes, on the benchmark model (Llama-3 layout, 120M parameters).

The model is converted, its Russian importance matrix computed, and quantized to Q3_K_M and Q4_K_M (llama.cpp's
mixes, with the imatrix); then quantkit's targeted mix is built at exactly Q4_K_M's size and halfway between Q3_K_M
and Q4_K_M. All are scored on held-out Russian text (builtin:ru-eval) against the bf16 model: mean KLD, PPL, top-1.

    .venv/bin/python benchmarks/target_vs_stock.py [--chunks 8]

Targets: at Q4_K_M's size, the targeted file's KLD is lower than Q4_K_M's; between the two stock types, it beats
Q3_K_M. The measurement's cost (one quantization per candidate type) is printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import WORK, print_summary, table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    from quantkit.backends.base import JobContext
    from quantkit.backends.gguf.backend import GGUFOptions
    from quantkit.pipeline import make
    from quantkit.quality.evaluate import evaluate_workspace
    from quantkit.workspace import Workspace

    ckpt_dir = common.bench_checkpoint()
    ck = common.load_checkpoint(ckpt_dir)
    ws = Workspace(WORK / "target-ws")
    ctx = JobContext.of(ck, ws, calib_samples=16, calib_seq_len=512)
    print(f"machine: {common.machine()}; model: {ckpt_dir.name}")
    stock = {a.quant: a for a in make(ctx, "gguf", GGUFOptions(types=["Q3_K_M", "Q4_K_M"], verify=False))}
    q3, q4 = stock["Q3_K_M"], stock["Q4_K_M"]
    targets = [str(q4.size), str((q3.size + q4.size) // 2)]
    t0 = time.perf_counter()
    arts = make(ctx, "gguf", GGUFOptions(types=["Q4_K_M"], target_sizes=targets, verify=False))
    spent = time.perf_counter() - t0
    rows_by = {r["artifact"]: r for r in evaluate_workspace(ws, model=str(ckpt_dir), chunks=args.chunks)["rows"]}
    rows = []
    for a in [q3, *[x for x in arts if x.info.get("target")], q4]:
        r = rows_by[ws.rel(a.path)]
        rows.append([a.path.name, f"{a.size / 1e6:.3f}", f"{a.bpw:.2f}", a.info.get("target", "stock"),
                     f"{r['kld_mean']:.6f}", f"{r['ppl']:.3f}", f"{r['top1']:.4f}"])
    print(table(rows, ["file", "MB", "bpw", "target", "KLD mean", "PPL", "top-1"]))
    print(f"measurement + 2 targeted files: {spent:.1f} s (7 candidate quantizations, damage table, 2 writes)")
    kld = {ws.rel(a.path): rows_by[ws.rel(a.path)]["kld_mean"] for a in arts}
    same, between = (next(a for a in arts if a.info.get("target") == t) for t in targets)
    q3k, q4k = rows_by[ws.rel(q3.path)]["kld_mean"], rows_by[ws.rel(q4.path)]["kld_mean"]
    print_summary([
        ("targeted ≤ Q4_K_M's size", same.size <= q4.size and between.size <= int(targets[1])),
        ("at Q4_K_M's size: KLD below Q4_K_M's", kld[ws.rel(same.path)] < q4k),
        ("between Q3_K_M and Q4_K_M: KLD below Q3_K_M's", kld[ws.rel(between.path)] < q3k),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
